"""personas train on the tiny model: end to end, plain-diffusers loading, resume, atomicity, lock."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from personas.config import TrainConfig
from personas.errors import GroupshotError
from personas.library import Library, Persona


def tiny_config(tiny_model: Path, **kw) -> TrainConfig:
    base = dict(base_model=str(tiny_model), resolution=64, max_train_steps=8, validation_every=0,
                checkpoint_every=0, class_word="woman", log_every=2, learning_rate=5e-3, embedding_lr=5e-2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, eileen_photos):
    """One pivotal persona trained for 8 steps, shared by the read-only tests below."""
    from personas.train import train_persona

    lib = Library(tmp_path_factory.mktemp("lib"))
    result = train_persona("eileen", [eileen_photos], tiny_config(tiny_model, validation_every=4),
                           library=lib, progress=False)
    return lib, result


def _unet_out(pipe, prompt: str) -> torch.Tensor:
    """One UNet evaluation on fixed inputs through the pipeline's own prompt encoding."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    emb, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), emb).sample


def test_train_writes_a_complete_persona(trained):
    lib, result = trained
    p = lib.load("eileen")  # verifies both sha256s
    assert p.method == "pivotal" and p.tokens == ["<eileen>", "<eileen>_1"]
    assert p.prompt_words() == "<eileen> woman"
    assert len(p.photos) == 4 and all(f.is_file() for f in p.ref_paths)
    train = p.path / "train"
    rows = (train / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,seconds" and len(rows) == 1 + 8
    assert (train / "loss.png").stat().st_size > 1000
    assert sorted(x.name for x in (train / "samples").iterdir()) == ["step-000004.png", "step-000008.png"]
    photos = json.loads((train / "photos.json").read_text())
    assert len(photos["accepted"]) == 4 and photos["face_backend"]["name"] in ("dlib", "arcface")
    assert TrainConfig.from_toml(train / "config.toml") == TrainConfig.from_dict(p.hyperparameters)
    assert not (lib.root / ".work" / "eileen").exists()  # checkpoints go once the persona is saved
    assert result.steps == 8 and result.steps_per_second > 0


def test_adapter_loads_in_plain_diffusers_and_changes_the_unet(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    lib, _ = trained
    p = lib.load("eileen")
    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    prompt = "a photo of a woman"
    before = _unet_out(plain, prompt)
    again = _unet_out(StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None), prompt)
    assert torch.equal(before, again)  # loading nothing changes nothing

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(str(p.path), weight_name="adapter_model.safetensors", adapter_name="eileen")
    pipe.load_textual_inversion(str(p.embeddings_path), token="<eileen>")
    after = _unet_out(pipe, prompt)
    rel = (after - before).norm() / before.norm()
    assert rel > 1e-3, f"the LoRA changed the UNet output by only {rel:.2e}"

    # The learned tokens are in the tokenizer and the text encoder holds the trained vectors.
    from personas.adapters import load_embeddings

    emb = load_embeddings(p.embeddings_path, dim=32)
    ids = pipe.tokenizer.convert_tokens_to_ids(p.tokens)
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(table[ids], emb, atol=1e-6)
    assert pipe.maybe_convert_prompt("a photo of <eileen> woman", pipe.tokenizer) == \
        "a photo of <eileen> <eileen>_1 woman"


def test_adapter_in_diffusers_equals_our_factors(trained, tiny_model):
    """The saved factors, applied by hand, give what diffusers' loader gives (scale folded in)."""
    from diffusers import StableDiffusionPipeline

    from personas.adapters import load_lora

    lib, _ = trained
    p = lib.load("eileen")
    weights = load_lora(p.adapter_path)
    path, (a, b) = next(iter(sorted(weights.unet.items())))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base_layer = dict(pipe.unet.named_modules())[path]
    x = torch.randn(3, base_layer.in_features)
    want = base_layer(x) + x @ a.T @ b.T
    pipe.load_lora_weights(str(p.path), weight_name="adapter_model.safetensors")
    got = dict(pipe.unet.named_modules())[path](x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_model, eileen_photos):
    from personas.adapters import load_embeddings, load_lora
    from personas.train import train_persona

    cfg = tiny_config(tiny_model, checkpoint_every=3)
    whole = Library(tmp_path / "whole")
    train_persona("eileen", [eileen_photos], cfg, library=whole, progress=False)

    split = Library(tmp_path / "split")
    first = train_persona("eileen", [eileen_photos], cfg, library=split, progress=False, stop_after=5)
    assert first.persona is None and not split.exists("eileen")
    state = json.loads((split.root / ".work" / "eileen" / "state.json").read_text())
    assert state["step"] == 5
    with pytest.raises(GroupshotError, match="--resume"):
        train_persona("eileen", [eileen_photos], cfg, library=split, progress=False)
    train_persona("eileen", None, cfg, library=split, resume=True, progress=False)

    a, b = whole.load("eileen"), split.load("eileen")
    la, lb = load_lora(a.adapter_path), load_lora(b.adapter_path)
    assert la.unet.keys() == lb.unet.keys()
    for k in la.unet:
        for x, y in zip(la.unet[k], lb.unet[k]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(load_embeddings(a.embeddings_path), load_embeddings(b.embeddings_path),
                               rtol=1e-4, atol=1e-6)
    la_loss = (a.path / "train" / "loss.csv").read_text().splitlines()
    lb_loss = (b.path / "train" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in la_loss] == [r.split(",")[:2] for r in lb_loss]


def test_failed_save_keeps_the_previous_persona(trained, tmp_path, tiny_model, eileen_photos, monkeypatch):
    import personas.train as train_mod

    lib_src, _ = trained
    lib = Library(tmp_path / "lib")
    shutil.copytree(lib_src.root / "eileen", lib.root / "eileen")
    before = (lib.root / "eileen" / "persona.json").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod, "save_lora", disk_full)
    with pytest.raises(OSError):
        train_mod.train_persona("eileen", [eileen_photos], tiny_config(tiny_model, max_train_steps=2),
                                library=lib, progress=False)
    assert (lib.root / "eileen" / "persona.json").read_bytes() == before
    lib.load("eileen")
    assert [p.name for p in lib.root.iterdir() if ".tmp-" in p.name] == []


def test_lora_and_ti_methods(tmp_path, tiny_model, eileen_photos):
    from personas.train import train_persona

    lib = Library(tmp_path)
    lora = train_persona("l1", [eileen_photos], tiny_config(tiny_model, method="lora", max_train_steps=2),
                         library=lib, progress=False).persona
    assert lora.tokens == [] and lora.embeddings_sha256 is None and lora.adapter_path.is_file()
    assert lora.prompt_words() == "l1 woman"
    ti = train_persona("t1", [eileen_photos], tiny_config(tiny_model, method="ti", num_tokens=3, max_train_steps=2),
                       library=lib, progress=False).persona
    assert ti.tokens == ["<t1>", "<t1>_1", "<t1>_2"] and ti.adapter_sha256 is None
    assert not (ti.path / "adapter_model.safetensors").exists()


def test_second_trainer_is_refused(tmp_path, tiny_model, eileen_photos):
    from personas.train import train_persona

    lib = Library(tmp_path)
    with lib.lock("eileen"):
        with pytest.raises(GroupshotError, match="being trained by another process"):
            train_persona("eileen", [eileen_photos], tiny_config(tiny_model), library=lib, progress=False)


def test_too_few_usable_photos(tmp_path, tiny_model, eileen_photos):
    from personas.train import train_persona

    with pytest.raises(GroupshotError, match=r"only 1 of 1 photos are usable \(min 3\)"):
        train_persona("eileen", [eileen_photos / "a.png"], tiny_config(tiny_model), library=Library(tmp_path),
                      progress=False)
    assert not (tmp_path / "eileen").exists()


GOLDEN = Path(__file__).parent / "data" / "persona_v1.json"


def test_golden_persona_v1_reads():
    p = Persona.from_json(json.loads(GOLDEN.read_text()), source=str(GOLDEN))
    assert p.name == "brad" and p.tokens == ["<brad>", "<brad>_1"] and p.prompt_words() == "<brad> man"
    assert p.to_json() == json.loads(GOLDEN.read_text())  # round trip, key for key


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("tokens"), "missing keys tokens"),
    (lambda d: d.update(schema_version=2), "newer than this groupshot"),
    (lambda d: d.update(method="magic"), "method 'magic'"),
    (lambda d: d.update(name="../etc"), "invalid persona name"),
    (lambda d: d["photos"].append({"file": "../../secret.jpg"}), "outside the persona folder"),
])
def test_damaged_persona_json_is_refused(change, message):
    data = json.loads(GOLDEN.read_text())
    change(data)
    with pytest.raises(GroupshotError, match=message):
        Persona.from_json(data)


def test_unknown_persona_json_keys_warn(caplog):
    data = json.loads(GOLDEN.read_text())
    data["future_field"] = 1
    Persona.from_json(data)
    assert "future_field" in caplog.text


@pytest.mark.parametrize("kw, message", [
    (dict(max_train_steps=0), "max_train_steps=0"),
    (dict(learning_rate=-1e-4), "learning_rate=-0.0001"),
    (dict(resolution=100), "resolution=100: must be a multiple of 8"),
    (dict(method="dreambooth"), "method='dreambooth'"),
    (dict(caption="a photo"), "must contain {person}"),
    (dict(lora_alpha=float("nan")), "lora_alpha"),
])
def test_config_checks(kw, message):
    with pytest.raises(GroupshotError, match=message.replace("(", r"\(").replace("{", r"\{")):
        TrainConfig(**kw)


def test_config_toml_unknown_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("learning_rate = 1e-4\nlearnig_rate = 2e-4\n")
    with pytest.raises(GroupshotError, match="unknown keys learnig_rate"):
        TrainConfig.from_toml(f)
    f.write_text("[train]\nlora_rank = 8\n")
    assert TrainConfig.from_toml(f, seed=3) == TrainConfig(lora_rank=8, seed=3)


def test_photos_without_face_detection_are_centre_cropped(tmp_path):
    """face_model none (objects, styles, toy patterns): every readable image is used whole."""
    import numpy as np
    from PIL import Image

    from personas.photos import check_photos

    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    (tmp_path / "text.jpg").write_text("not an image")
    report = check_photos([tmp_path], backend=None, resolution=64, min_side=32)
    assert [p.path.name for p in report.accepted] == ["flat.png"]
    assert report.accepted[0].crop_box == (15, 0, 105, 90) and report.accepted[0].image.size == (64, 64)
    assert [r.path.name for r in report.rejected] == ["text.jpg"]
    assert report.face_model["name"] == "none"
