"""personas export/import: kohya-layout LoRA and WebUI embeddings, checked against diffusers'
own loader and a hand merge of the factors into the weights, round trips, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from PIL import Image
from safetensors.torch import load_file, save_file

from personas.adapters import load_embeddings, load_lora
from personas.errors import GroupshotError
from personas.interop import export_persona, import_persona, lora_to_kohya
from personas.library import Library
from personas.testing import make_random_persona


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: a second thread only spin-waits on tiny models
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def library(tiny_model, tmp_path_factory) -> Library:
    lib = Library(tmp_path_factory.mktemp("people"))
    make_random_persona(lib, "eileen", tiny_model, seed=3, text_lora=True)  # pivotal: tokens + UNet and text LoRA
    return lib


@pytest.fixture(scope="module")
def exported(library, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "eileen.safetensors"
    return export_persona(library.load("eileen"), out)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]),
            torch.randn(1, 77, 32, generator=g), torch.randint(0, 49406, (1, 77), generator=g))


def _outputs(unet, text_encoder):
    latents, t, text, ids = _inputs()
    with torch.no_grad():
        return unet(latents, t, text).sample, text_encoder(ids)[0]


def _merged_outputs(tiny_model, weights):
    """UNet and text-encoder outputs with every LoRA factor merged into its weight by hand."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    for model, layers in ((unet, weights.unet), (text_encoder, weights.text_encoder)):
        modules = dict(model.named_modules())
        with torch.no_grad():
            for path, (a, b) in layers.items():
                modules[path].weight += b @ a  # (out, r) @ (r, in)
    return _outputs(unet, text_encoder)


def _diffusers_outputs(pipe, lora_file):
    pipe.load_lora_weights(str(lora_file), adapter_name="x")
    try:
        return _outputs(pipe.unet, pipe.text_encoder)
    finally:
        pipe.unload_lora_weights()


def test_export_writes_the_kohya_layout_and_webui_embedding(library, exported):
    persona = library.load("eileen")
    ours = load_lora(persona.adapter_path)
    kohya = load_file(exported.lora)
    rank = ours.rank
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    out0 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"
    te = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    for name in (q, out0, te):
        assert kohya[f"{name}.lora_down.weight"].shape[0] == rank
        assert kohya[f"{name}.alpha"].dtype == torch.float32 and float(kohya[f"{name}.alpha"]) == rank
    a, b = ours.unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    torch.testing.assert_close(kohya[f"{q}.lora_down.weight"], a)
    torch.testing.assert_close(kohya[f"{q}.lora_up.weight"], b)
    n_layers = len(ours.unet) + len(ours.text_encoder)
    assert len(kohya) == 3 * n_layers
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.count(".") in (1, 2) for k in kohya)
    with safe_open(str(exported.lora), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(rank)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["groupshot_base_model"]) == persona.base_model

    assert exported.embedding.name == "eileen-emb.safetensors"
    emb = load_file(exported.embedding)
    assert list(emb) == ["emb_params"]
    torch.testing.assert_close(emb["emb_params"], load_embeddings(persona.embeddings_path))
    assert any("<lora:eileen:1>" in line and "eileen-emb" in line for line in exported.usage)


def test_exported_kohya_file_loads_in_diffusers_with_the_same_outputs(tiny_model, library, exported, pipe):
    weights = load_lora(library.load("eileen").adapter_path)
    unet_ref, text_ref = _merged_outputs(tiny_model, weights)
    base_unet, base_text = _outputs(pipe.unet, pipe.text_encoder)
    unet_out, text_out = _diffusers_outputs(pipe, exported.lora)
    assert (unet_ref - base_unet).abs().max() > 1e-2  # the adapter changes the output
    assert (text_ref - base_text).abs().max() > 1e-2
    torch.testing.assert_close(unet_out, unet_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text_out, text_ref, atol=1e-4, rtol=1e-4)


def test_export_then_import_round_trips(tiny_model, library, exported, pipe, tmp_path):
    from compose.pipeline import ComposeRequest, GroupComposer

    imported = import_persona("eileen2", exported.lora, embedding=exported.embedding, class_word="person",
                              base_model=str(tiny_model), library=library)
    original = library.load("eileen")
    assert imported.method == "pivotal" and imported.tokens == ["<eileen2>", "<eileen2>_1"]
    assert imported.prompt_words() == "<eileen2> person" and imported.photos == []
    assert imported.base_model == original.base_model
    assert imported.extra["imported"]["lora"]["format"] == "kohya"
    a, b = load_lora(original.adapter_path), load_lora(imported.adapter_path)
    for part in ("unet", "text_encoder"):
        assert set(getattr(a, part)) == set(getattr(b, part))
        for path, (down, up) in getattr(a, part).items():
            torch.testing.assert_close(getattr(b, part)[path][0], down)
            torch.testing.assert_close(getattr(b, part)[path][1], up)
    torch.testing.assert_close(load_embeddings(imported.embeddings_path), load_embeddings(original.embeddings_path))
    for x, y in zip(_diffusers_outputs(pipe, original.adapter_path), _diffusers_outputs(pipe, imported.adapter_path)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)

    # compose renders the imported persona exactly as the original: same vectors under other token names.
    composer = GroupComposer.from_pretrained(str(tiny_model), str(tiny_model / "controlnet"), library=library)
    images = []
    for name in ("eileen", "eileen2"):
        request = ComposeRequest(people=[name], prompt="a portrait", size=(64, 64), steps=2, out=str(tmp_path))
        with Image.open(composer(request).images[0]) as im:
            images.append(np.asarray(im.convert("RGB")))
    assert np.array_equal(images[0], images[1])


def _ldm_name(path: str, layers_per_block: int = 1) -> str:
    """A diffusers UNet path in the original LDM naming that older A1111 LoRAs use."""
    parts = path.split(".")
    if parts[0] == "down_blocks":
        block = 1 + int(parts[1]) * (layers_per_block + 1) + int(parts[3])
        return ".".join(["input_blocks", str(block), "1", *parts[4:]])
    if parts[0] == "up_blocks":
        block = int(parts[1]) * (layers_per_block + 1) + int(parts[3])
        return ".".join(["output_blocks", str(block), "1", *parts[4:]])
    return ".".join(["middle_block", "1", *parts[3:]])  # mid_block.attentions.0


def _kohya_file(tmp_path, tiny_model, *, alpha: float, extra: dict | None = None, ldm_names: bool = False,
                name: str = "civitai"):
    """A kohya file as kohya's scripts write one: random factors, one alpha for all layers."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    g = torch.Generator().manual_seed(7)
    sd = {}
    for path, m in unet.named_modules():
        if path.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_out.0")):
            name = "lora_unet_" + (_ldm_name(path) if ldm_names else path).replace(".", "_")
            sd[f"{name}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5
            sd[f"{name}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g)
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    sd.update(extra or {})
    file = tmp_path / f"{name}.safetensors"
    save_file(sd, str(file), metadata={"ss_tag_frequency": json.dumps({"img": {"ohwx": 12, "man": 9, "smile": 2}})})
    return file


def test_import_applies_alpha_as_diffusers_does(tiny_model, pipe, tmp_path):
    """alpha 1 with rank 4: scale 1/4, folded into the up factor. The file uses the LDM block
    names of older A1111 LoRAs (which diffusers' load_lora_weights cannot map without the UNet
    config); the reference loads the same factors under diffusers names."""
    file = _kohya_file(tmp_path, tiny_model, alpha=1.0, ldm_names=True, name="ldm")
    lib = Library(tmp_path / "people")
    persona = import_persona("ohwx", file, token="ohwx", class_word="man", base_model=str(tiny_model), library=lib)
    assert persona.method == "lora" and persona.tokens == [] and persona.prompt_words() == "ohwx man"
    assert persona.hyperparameters["lora_alpha"] == 1.0
    weights = load_lora(persona.adapter_path)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in weights.unet
    unet_ref, _ = _merged_outputs(tiny_model, weights)
    unet_out, _ = _diffusers_outputs(pipe, _kohya_file(tmp_path, tiny_model, alpha=1.0))
    torch.testing.assert_close(unet_out, unet_ref, atol=1e-4, rtol=1e-4)
    # the same weights at alpha = rank would be 4x larger
    full = import_persona("full", _kohya_file(tmp_path, tiny_model, alpha=4.0, name="a4"), token="ohwx",
                          base_model=str(tiny_model), library=lib)
    path = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    torch.testing.assert_close(load_lora(full.adapter_path).unet[path][1], 4 * weights.unet[path][1])


def test_text_encoder_mlp_layers_import_as_diffusers_loads_them(tiny_model, exported, pipe, tmp_path):
    """Civitai files often train the text encoder's MLP too (kohya names *_mlp_fc1/fc2)."""
    sd = load_file(exported.lora)
    g = torch.Generator().manual_seed(0)
    for name, (n_in, n_out) in {"lora_te_text_model_encoder_layers_0_mlp_fc1": (32, 37),
                                "lora_te_text_model_encoder_layers_1_mlp_fc2": (37, 32)}.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(4, n_in, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(n_out, 4, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    file = tmp_path / "mlp.safetensors"
    save_file(sd, str(file))
    persona = import_persona("mlp", file, token="sks", base_model=str(tiny_model), library=Library(tmp_path / "p"))
    weights = load_lora(persona.adapter_path)
    layers = {p.removeprefix("text_model."): ab for p, ab in weights.text_encoder.items()}
    for path, name in (("encoder.layers.0.mlp.fc1", "lora_te_text_model_encoder_layers_0_mlp_fc1"),
                       ("encoder.layers.1.mlp.fc2", "lora_te_text_model_encoder_layers_1_mlp_fc2")):
        torch.testing.assert_close(layers[path][0], sd[f"{name}.lora_down.weight"])
        torch.testing.assert_close(layers[path][1], sd[f"{name}.lora_up.weight"] * 2.0 / 4)  # alpha / rank
    # The UNet part against diffusers' own loader. (Its text-encoder output is no reference
    # here: diffusers 0.42 with transformers 5 ignores per-layer text-encoder alphas, whose
    # alpha_pattern keys keep the "text_model." prefix the model no longer has.)
    unet_out, _ = _diffusers_outputs(pipe, file)
    torch.testing.assert_close(unet_out, _merged_outputs(tiny_model, weights)[0], atol=1e-4, rtol=1e-4)


def test_import_reads_the_diffusers_layout_and_its_alpha_metadata(tiny_model, library, pipe, tmp_path):
    """A peft-layout file with lora_alpha 8 at rank 4 in its metadata (diffusers' trainers write this)."""
    ours = load_lora(library.load("eileen").adapter_path)
    sd = {f"unet.{p}.lora_{ab}.weight": t for p, (a, b) in ours.unet.items() for ab, t in (("A", a), ("B", b))}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}),
            "format": "pt"}
    file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(file), metadata=meta)
    persona = import_persona("dl", file, token="sks", base_model=str(tiny_model), library=Library(tmp_path / "p"))
    weights = load_lora(persona.adapter_path)
    assert persona.extra["imported"]["lora"]["format"] == "diffusers"
    path = next(iter(ours.unet))
    torch.testing.assert_close(weights.unet[path][1], 2 * ours.unet[path][1])
    unet_out, _ = _diffusers_outputs(pipe, file)
    torch.testing.assert_close(unet_out, _merged_outputs(tiny_model, weights)[0], atol=1e-4, rtol=1e-4)


def test_non_attention_layers_are_refused_or_left_out(tiny_model, tmp_path):
    g = torch.Generator().manual_seed(1)
    extra = {  # a 1x1-conv proj_in LoRA and a feed-forward one, as Civitai files often hold
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1, generator=g),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight": torch.randn(4, 128, generator=g),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_up.weight": torch.randn(32, 4, generator=g),
    }
    file = _kohya_file(tmp_path, tiny_model, alpha=4.0, extra=extra)
    lib = Library(tmp_path / "people")
    with pytest.raises(GroupshotError, match="2 UNet layers outside attention.*--attention-only"):
        import_persona("x", file, token="ohwx", base_model=str(tiny_model), library=lib)
    assert lib.names() == []
    persona = import_persona("x", file, token="ohwx", base_model=str(tiny_model), library=lib, attention_only=True)
    assert persona.extra["imported"]["lora"]["dropped_layers"] == 2
    assert all(p.endswith(("to_q", "to_k", "to_out.0")) for p in load_lora(persona.adapter_path).unet)


def test_bad_imports_are_refused_with_the_reason(tiny_model, library, exported, tmp_path):
    lib = Library(tmp_path / "people")
    base = str(tiny_model)
    kohya = load_file(exported.lora)

    def write(name, tensors, **meta):
        f = tmp_path / name
        save_file(tensors, str(f), metadata=meta or None)
        return f

    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not read")  # never unpickled: refused by its suffix
    bad_width = {k: (torch.zeros(v.shape[0], 64) if k.endswith("attn1_to_q.lora_down.weight") else v) for k, v in kohya.items()}
    nan = dict(kohya, **{next(iter(kohya)): torch.full_like(next(iter(kohya.values())), float("nan"))})
    cases = [
        (dict(lora=pickle, token="x"), "pickles"),
        (dict(lora=tmp_path / "none.safetensors", token="x"), "not found"),
        (dict(lora=exported.lora), "--token is required.*suggests: <eileen> person"),
        (dict(lora=_kohya_file(tmp_path, tiny_model, alpha=1.0)), "suggests: ohwx, man, smile"),
        (dict(lora=exported.embedding, token="x"), "embedding, not a LoRA"),
        (dict(lora=write("sdxl.safetensors", {"lora_te2_text_model_x.lora_down.weight": torch.zeros(1, 1)}), token="x"), "SDXL"),
        (dict(lora=write("loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(1, 1)}), token="x"), "LoHa"),
        (dict(lora=write("dora.safetensors", dict(kohya, **{"lora_unet_x.dora_scale": torch.zeros(1)})), token="x"), "DoRA"),
        (dict(lora=write("wide.safetensors", bad_width), token="x"), "another base model"),
        (dict(lora=write("nan.safetensors", nan), token="x"), "NaN"),
        (dict(lora=write("odd.safetensors", {"some.weight": torch.zeros(2, 2)}), token="x"), "odd.safetensors"),
        (dict(embedding=write("sd2.safetensors", {"emb_params": torch.zeros(2, 1024)})), "1024 wide"),
        (dict(embedding=write("xl.safetensors", {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 64)})), "SDXL"),
        (dict(embedding=exported.embedding, token="a photo"), "one word"),
        (dict(embedding=exported.embedding, token="man</w>"), "already a word"),
        (dict(embedding=exported.embedding, class_word=""), "--class-word"),
        (dict(), "nothing to import"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GroupshotError, match=message):
            import_persona("x", base_model=base, library=lib, **kwargs)
    assert lib.names() == [] and not any(p.name.startswith(".x.tmp") for p in lib.root.glob(".*"))
    with pytest.raises(GroupshotError, match="exists"):
        import_persona("eileen", exported.lora, token="x", base_model=base, library=library)


def test_import_of_an_embedding_alone_in_other_layouts(tiny_model, tmp_path):
    lib = Library(tmp_path / "people")
    vec = torch.randn(32)
    a1111 = tmp_path / "a1111.safetensors"
    save_file({"string_to_param.*": vec[None]}, str(a1111))
    diffusers_file = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": vec}, str(diffusers_file))
    for name, f in (("a", a1111), ("b", diffusers_file)):
        p = import_persona(name, embedding=f, class_word="woman", base_model=str(tiny_model), library=lib)
        assert p.method == "ti" and p.tokens == [f"<{name}>"] and p.adapter_sha256 is None
        torch.testing.assert_close(load_embeddings(p.embeddings_path), vec[None])


def test_refs_make_an_imported_persona_scorable(tiny_model, exported, eileen_photos, tmp_path):
    from eval.scoring import load_personas

    lib = Library(tmp_path / "people")
    import_persona("bare", exported.lora, token="eileen", base_model=str(tiny_model), library=lib)
    with pytest.raises(GroupshotError, match="imported without reference photos.*--refs"):
        load_personas(lib, ["bare"])
    p = import_persona("withrefs", exported.lora, token="eileen", class_word="woman", base_model=str(tiny_model),
                       refs=[eileen_photos], face_model="dlib", library=lib)
    assert len(p.photos) >= 3 and all(f.is_file() for f in p.ref_paths)
    assert load_personas(lib, ["withrefs"])["withrefs"].photos == p.photos


def test_kohya_names_for_transformers_4_and_5_text_encoders():
    from personas.adapters import LoraWeights

    a, b = torch.zeros(2, 4), torch.zeros(4, 2)
    for path in ("encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"):
        keys = set(lora_to_kohya(LoraWeights(text_encoder={path: (a, b)})))
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys


def test_cli_export_and_import(tiny_model, library, tmp_path, capsys):
    from personas.cli import main

    lib = ["--library", str(library.root)]
    out = tmp_path / "cli" / "eileen.safetensors"
    assert main([*lib, "export", "eileen", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "eileen-emb.safetensors" in text and "<lora:eileen:1>" in text
    assert main([*lib, "export", "eileen", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*lib, "export", "eileen", "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main([*lib, "import", "cli1", str(out), "--embedding", str(out.with_name("eileen-emb.safetensors")),
                 "--class-word", "woman", "--base-model", str(tiny_model)]) == 0
    text = capsys.readouterr().out
    assert "kohya LoRA, rank 4" in text and "<cli1> woman" in text and "--refs" in text
    assert main([*lib, "show", "cli1"]) == 0
    assert "imported     lora eileen.safetensors" in capsys.readouterr().out
    assert main([*lib, "import", "cli2", str(tmp_path / "w.bin"), "--token", "x", "--base-model", str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pickles" in err and "Traceback" not in err
