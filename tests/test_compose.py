"""compose on tiny random models: every method against diffusers' own pipelines, each
adapter confined to its person's region, the run folder, and request checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from compose.lora import layer_size
from compose.pipeline import (
    METHODS, ComposeRequest, GroupComposer, merged_prompt, person_words, read_render, region_prompt,
    with_class_words,
)
from compose.regions import Regions
from personas.adapters import load_lora, save_lora
from personas.errors import GroupshotError
from personas.library import ADAPTER_FILE, EMBEDDINGS_FILE, Library, sha256_file
from personas.testing import make_random_persona

SIZE = (64, 64)  # tiny model: 16x16 latents, attention at 16x16 and 8x8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: torch's second thread mostly spin-waits and makes tiny models ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_model, tmp_path_factory):
    """The tiny model, its ControlNet's zero-initialised output convolutions made random: a
    fresh ControlNet adds exactly nothing, and the tests must see the pose residuals."""
    from diffusers import ControlNetModel

    folder = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(tiny_model, folder)
    controlnet = ControlNetModel.from_pretrained(folder / "controlnet")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / conv.weight.shape[1] ** 0.5)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def library(tiny_model, tmp_path_factory) -> Library:
    lib = Library(tmp_path_factory.mktemp("people"))
    make_random_persona(lib, "ann", tiny_model, seed=1)  # pivotal: 2 tokens + UNet LoRA
    make_random_persona(lib, "bob", tiny_model, seed=2)
    make_random_persona(lib, "cat", tiny_model, method="lora", seed=3, text_lora=True)
    return lib


@pytest.fixture(scope="module")
def composer(model, library) -> GroupComposer:
    return GroupComposer.from_pretrained(model, model / "controlnet", library=library)


def reference_pipe(model, personas=(), *, pose: bool = True):
    """diffusers' own pipeline with the personas loaded by diffusers' own loaders."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    if pose:
        controlnet = ControlNetModel.from_pretrained(model / "controlnet")
        pipe = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=controlnet, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    for persona in personas:
        if persona.embeddings_path is not None:
            pipe.load_textual_inversion(str(persona.embeddings_path), token=persona.tokens[0])
        if persona.adapter_path is not None:
            pipe.load_lora_weights(str(persona.adapter_path), adapter_name=persona.name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_latents(pipe, prompt: str, pose_image=None, *, seed: int = 0, steps: int = 2, guidance: float = 7.5,
                      controlnet_scale: float = 1.0):
    kwargs = dict(prompt=prompt, width=SIZE[0], height=SIZE[1], num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="latent")
    if pose_image is not None:
        kwargs.update(image=pose_image, controlnet_conditioning_scale=controlnet_scale)
    with torch.no_grad():
        return pipe(**kwargs).images  # (1, 4, 16, 16)


def with_regions(plan, people: np.ndarray, background: np.ndarray):
    return dataclasses.replace(plan, regions=Regions(people.astype(np.float32), background.astype(np.float32), []))


def close(ours, ref) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


# -- against diffusers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ann_pose_reference(model, library, composer):
    """diffusers + ControlNet with ann's LoRA and tokens, and the same without any adapter."""
    prompt = "<ann> person at a beach"
    pose_image = composer.prepare(ComposeRequest(people=["ann"], prompt=prompt, pose="one_standing", size=SIZE)).pose_image
    pipe = reference_pipe(model, [library.load("ann")])
    with_ann = reference_latents(pipe, prompt, pose_image)
    # The pose matters (else these tests could not see the ControlNet residuals mishandled).
    assert (with_ann - reference_latents(pipe, prompt, pose_image, controlnet_scale=0.0)).abs().max() > 0.05
    plain = reference_latents(reference_pipe(model), "a beach", pose_image)
    return with_ann, plain


@pytest.mark.parametrize("method", METHODS)
def test_one_person_everywhere_equals_diffusers_with_their_adapter(composer, ann_pose_reference, method):
    request = ComposeRequest(people=["ann"], prompt="<ann> person at a beach", pose="one_standing",
                             size=SIZE, steps=2, method=method)
    plan = composer.prepare(request)
    assert plan.region_prompts == ["<ann> person at a beach"]  # the scene names ann: used as written
    everywhere = with_regions(plan, np.ones((1, 64, 64)), np.zeros((64, 64)))
    ours = composer.generate(everywhere, [0], output_type="latent")[0]
    with_ann, plain = ann_pose_reference
    close(ours, with_ann)
    assert (with_ann - plain).abs().max() > 0.05  # the adapter does change the picture


@pytest.mark.parametrize("method", ["composite", "masked"])
def test_without_guidance_two_people_in_halves_equal_diffusers_per_half(composer, model, library, method):
    # guidance 1 (no unconditional branch); ann on the left half, bob on the right: after one
    # step each half of the composite is exactly that person's own render. (ControlNet off:
    # diffusers would condition it on the person's prompt, compose on the scene's.)
    request = ComposeRequest(people=["ann", "bob"], prompt="two people", pose="two_standing", size=SIZE,
                             steps=1, guidance=1.0, controlnet_scale=0.0, method=method)
    plan = composer.prepare(request)
    left = np.zeros((64, 64))
    left[:, :32] = 1
    halves = with_regions(plan, np.stack([left, 1 - left]), np.zeros((64, 64)))
    ours = composer.generate(halves, [0], output_type="latent")[0]
    for person, columns in (("ann", slice(0, 8)), ("bob", slice(8, 16))):
        alone = reference_latents(reference_pipe(model, [library.load(person)]), plan.region_prompts[request.people.index(person)],
                                  plan.pose_image, steps=1, guidance=1.0, controlnet_scale=0.0)
        if method == "composite":
            close(ours[..., columns], alone[..., columns])
        else:  # masked: attention mixes the halves, so each half only comes nearer its person
            assert (ours - alone)[..., columns].abs().mean() < (ours - alone).abs().mean()


@pytest.mark.parametrize("method", ["composite", "masked"])
def test_person_with_an_empty_region_changes_nothing(composer, ann_pose_reference, method):
    request = ComposeRequest(people=["ann"], prompt="a beach", pose="one_standing", size=SIZE, steps=2, method=method)
    nowhere = with_regions(composer.prepare(request), np.zeros((1, 64, 64)), np.ones((64, 64)))
    ours = composer.generate(nowhere, [0], output_type="latent")[0]
    close(ours, ann_pose_reference[1])  # = diffusers without any adapter


@pytest.mark.parametrize("method", ["composite", "masked"])
def test_one_person_without_pose_is_plain_generation_with_text_encoder_lora(composer, model, library, method):
    cat = library.load("cat")  # LoRA on the UNet and the text encoder, no tokens
    request = ComposeRequest(people=["cat"], prompt="portrait", size=SIZE, steps=2, method=method)
    plan = composer.prepare(request)
    assert plan.region_prompts == ["person, portrait"]
    pipe = reference_pipe(model, [cat], pose=False)
    assert any("lora_A" in name for name, _ in pipe.text_encoder.named_modules())
    close(composer.generate(plan, [0], output_type="latent")[0], reference_latents(pipe, "person, portrait"))


# -- separation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ann_perturbed(library, tmp_path_factory) -> Library:
    """A copy of the library where only ann's LoRA differs (lora_B 10% larger)."""
    lib = Library(tmp_path_factory.mktemp("people-perturbed"))
    for name in ("ann", "bob"):
        shutil.copytree(library.path(name), lib.path(name))
    ann = lib.load("ann")
    weights = load_lora(ann.adapter_path)
    weights.unet = {path: (a, b * 1.1) for path, (a, b) in weights.unet.items()}
    staged = lib.staging("ann")
    shutil.copy(ann.path / EMBEDDINGS_FILE, staged / EMBEDDINGS_FILE)
    save_lora(staged / ADAPTER_FILE, weights)
    ann.adapter_sha256 = sha256_file(staged / ADAPTER_FILE)
    lib.commit("ann", staged, ann)
    return lib


def render_both(composer, library, perturbed, request, output_type):
    plans = []
    try:
        for lib in (library, perturbed):
            composer.library = lib
            plans.append(composer.prepare(request))
    finally:
        composer.library = library
    return plans[0], [composer.generate(plan, [0], output_type=output_type)[0] for plan in plans]


@pytest.mark.parametrize("method", METHODS)
def test_first_step_change_of_one_adapter_stays_in_its_region(composer, library, ann_perturbed, method):
    request = ComposeRequest(people=["ann", "bob"], prompt="two people at a beach", pose="two_standing",
                             size=SIZE, steps=1, method=method)
    plan, (before, after) = render_both(composer, library, ann_perturbed, request, "latent")
    change = (after - before).abs().sum(1)[0]  # (16, 16)
    ann = torch.from_numpy(plan.regions.resized(*change.shape).people[0] > 0)
    assert 0 < ann.sum() < ann.numel()
    assert change[ann].max() > 1e-3
    if method == "composite":
        assert change[~ann].max() == 0  # exact: only ann's branch changed, blended by ann's mask
    elif method == "masked":
        # Self-attention reads ann's keys and values everywhere: mostly, not exactly, ann's.
        assert change[ann].mean() > 1.2 * change[~ann].mean()
    else:  # the merge baseline changes everyone
        assert change[~ann].mean() > 0.5 * change[ann].mean()


@pytest.mark.parametrize("method", ["composite", "masked"])
def test_final_image_changes_mostly_in_the_adapters_region(composer, library, ann_perturbed, method):
    request = ComposeRequest(people=["ann", "bob"], prompt="two people at a beach", pose="two_standing",
                             size=SIZE, steps=2, method=method)
    plan, images = render_both(composer, library, ann_perturbed, request, "pil")
    change = np.abs(np.asarray(images[1], float) - np.asarray(images[0], float)).sum(-1)  # (64, 64)
    ann, bob = plan.regions.people[0] > 0.5, plan.regions.people[1] > 0.5
    background = plan.regions.background > 0.5
    assert change[ann].mean() > 1.5 * change[background].mean()
    assert change[ann].mean() > (2.0 if method == "composite" else 1.0) * change[bob].mean()


# -- the run folder ---------------------------------------------------------------------------


def test_run_folder_and_render_json(composer, library, tmp_path):
    out = tmp_path / "renders"
    request = ComposeRequest(
        people=["bob", "ann"], prompt="two people at a beach bar", person_prompts={"ann": "red hat"},
        pose="two_standing", assign={"ann": 0}, size=SIZE, steps=2, num_images=2, seed=5, out=str(out),
    )
    result = composer(request)
    assert [p.name for p in out.iterdir()] == [result.run_dir.name]  # no staging folder left
    assert sorted(p.name for p in result.run_dir.iterdir()) == [
        "000.png", "001.png", "masks.npz", "masks.png", "pose.json", "pose.png", "render.json"]
    record = read_render(result.run_dir)
    assert record["request"] == json.loads(json.dumps(request.to_json()))
    assert record["base_model"] == composer.base_identity() and record["controlnet"]["sha256"]
    bob, ann = record["people"]
    persona = library.load("ann")
    assert (ann["name"], ann["skeleton"], bob["skeleton"]) == ("ann", 0, 1)
    assert ann["prompt"] == "<ann> person, red hat, two people at a beach bar"
    assert ann["tokens"] == ["<ann>", "<ann>_1"] and ann["class_word"] == "person"
    assert ann["adapter_sha256"] == persona.adapter_sha256 and ann["embeddings_sha256"] == persona.embeddings_sha256
    assert ann["head_box"][2] <= 32 <= bob["head_box"][0]  # ann on the left, bob on the right
    assert ann["box"][0] < ann["head_box"][0] and len(bob["box"]) == 4
    assert record["global_prompt_for_clip"] == "two people at a beach bar"
    assert [(im["file"], im["seed"]) for im in record["images"]] == [("000.png", 5), ("001.png", 6)]
    for im in record["images"]:
        assert im["sha256"] == sha256_file(result.run_dir / im["file"])
    assert (record["device"], record["dtype"]) == ("cpu", "float32")
    masks = np.load(result.run_dir / "masks.npz")
    assert masks["people"].shape == (2, 64, 64) and list(masks["names"]) == ["bob", "ann"]
    np.testing.assert_allclose(masks["people"].sum(0) + masks["background"], 1, atol=1e-5)
    assert masks["people"][1][:, :24].mean() > masks["people"][0][:, :24].mean()  # ann's mask on the left


def test_a_crash_leaves_no_run(composer, tmp_path, monkeypatch):
    out = tmp_path / "renders"
    request = ComposeRequest(people=["ann"], prompt="a portrait", size=SIZE, steps=1, num_images=2, out=str(out))
    calls = []
    real = composer._denoise

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(composer, "_denoise", fail_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        composer(request)
    assert list(out.iterdir()) == []
    assert composer._base.unet.attn_processors[  # the UNet's own processors are back
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"].__class__.__name__ != "RegionalAttnProcessor"


# -- checks before any model ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=(60, 64)), "multiples of 8"),
    (dict(steps=0), "--steps 0"),
    (dict(people=["ann", "bob"]), "no --pose"),
    (dict(method="blend"), "--method blend"),
    (dict(person_prompts={"zed": "hat"}), "zed is not in --people"),
    (dict(guidance=0.5), "--guidance"),
    (dict(assign={"ann": 0}), "--assign needs --pose"),
    (dict(people=["ann", "ann"], pose="two_standing"), "twice"),
    (dict(people=["../ann"]), "invalid persona name"),
    (dict(prompt=" "), "--prompt is empty"),
    (dict(scheduler="lms"), "--scheduler lms"),
])
def test_request_rejects_bad_fields(kwargs, message):
    fields = dict(people=["ann"], prompt="a portrait") | kwargs
    with pytest.raises(GroupshotError, match=message):
        ComposeRequest(**fields)


def test_prepare_fails_before_loading_any_model(tiny_model, library, tmp_path):
    other = Library(tmp_path / "other")
    shutil.copytree(library.path("ann"), other.path("zed"))
    zed = json.loads((other.path("zed") / "persona.json").read_text())
    zed.update(name="zed", base_model={"id": "someone/other-model", "revision": None, "sha256": "0" * 64})
    (other.path("zed") / "persona.json").write_text(json.dumps(zed))
    shutil.copytree(library.path("ann"), other.path("ann"))
    fresh = GroupComposer.from_pretrained(tiny_model, tiny_model / "controlnet", library=other)
    cases = [
        (dict(people=["ann", "nobody"], pose="two_standing"), "unknown persona 'nobody'"),
        (dict(people=["ann"], pose="two_standing"), "the pose has 2 people but --people names 1"),
        (dict(people=["zed"]), "trained on base model 'someone/other-model' but --base-model is"),
        (dict(people=["ann"], pose=str(tmp_path / "missing.png")), "no such file"),
        (dict(people=["ann"], pose="one_standing", assign={"ann": 5}), "no such skeleton"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GroupshotError, match=message):
            fresh.prepare(ComposeRequest(prompt="x", size=SIZE, **kwargs))
    assert fresh._base is None and fresh._controlnet is None


# -- prompts and helpers ----------------------------------------------------------------------


def test_prompts(library):
    ann, bob, cat = (library.load(n) for n in ("ann", "bob", "cat"))
    assert person_words(ann) == "<ann> person"  # only the first token: diffusers expands it
    assert region_prompt(ann, "red hat", "two people at a bar", [bob]) == "<ann> person, red hat, two people at a bar"
    # Others' tokens become class words in one's region; one's own named token stays.
    assert region_prompt(ann, "", "<ann> person and <bob> person", [bob]) == "<ann> person and person"
    assert region_prompt(cat, "", "a bar", []) == "person, a bar"
    assert merged_prompt([ann, bob], {"bob": "hat"}, "at a bar") == "<ann> person, <bob> person, hat, at a bar"
    assert with_class_words("<ann> <ann>_1 person with <bob> at a bar", [ann, bob]) == "person with person at a bar"


def test_layer_size():
    assert layer_size(256, (16, 16)) == (16, 16)
    assert layer_size(64, (16, 16)) == (8, 8)
    assert layer_size(6 * 8, (12, 16)) == (6, 8)
    assert layer_size(5 * 9, (17, 9)) == (9, 5)  # rounding up, as stride-2 convolutions do
    with pytest.raises(ValueError):
        layer_size(7, (16, 16))


def test_importing_compose_loads_no_torch():
    code = ("import sys, compose, compose.pipeline, compose.cli, compose.lora; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# A render.json as DEVELOPING.md documents schema v1 (values filled in): readers must keep reading it.
GOLDEN_RENDER_V1 = {
    "schema_version": 1, "toolkit_version": "0.1.0", "created_at": "2026-11-25T16:00:00+00:00",
    "request": {"people": ["brad", "leo"], "prompt": "two men at a beach bar", "person_prompts": {"brad": "white shirt"},
                "negative_prompt": "blurry", "method": "composite", "pose": "two_standing",
                "assign": None, "size": [512, 512], "steps": 30, "guidance": 7.5,
                "controlnet_scale": 1.0, "seed": 0, "num_images": 4, "scheduler": "pndm"},
    "base_model": {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "revision": "abc", "sha256": "1" * 64},
    "controlnet": {"id": "lllyasviel/control_v11p_sd15_openpose", "revision": "def", "sha256": "2" * 64},
    "people": [{"name": "brad", "skeleton": 0, "tokens": ["<brad>"], "class_word": "man",
                "prompt": "<brad> man, white shirt", "adapter_sha256": "3" * 64,
                "embeddings_sha256": "4" * 64, "persona_created_at": "2026-11-24T10:00:00+00:00",
                "box": [10, 20, 200, 500], "head_box": [60, 30, 140, 120]}],
    "global_prompt_for_clip": "two men at a beach bar",
    "images": [{"file": "000.png", "seed": 0, "sha256": "5" * 64}],
    "pose_image": "pose.png", "mask_overlay": "masks.png", "masks": "masks.npz",
    "device": "cpu", "dtype": "float32", "timing": {"seconds_per_image": 0.2},
}


def test_reads_a_golden_v1_render_json(tmp_path, caplog):
    path = tmp_path / "render.json"
    path.write_text(json.dumps(GOLDEN_RENDER_V1 | {"from_the_future": 1}))
    record = read_render(path)
    assert "from_the_future" in caplog.text  # unknown keys: a warning, not a failure
    request = ComposeRequest.from_json(record["request"])
    assert request.size == (512, 512) and request.person_prompts == {"brad": "white shirt"}
    assert request.to_json() == GOLDEN_RENDER_V1["request"]
    path.write_text(json.dumps({k: v for k, v in GOLDEN_RENDER_V1.items() if k != "images"}))
    with pytest.raises(GroupshotError, match="missing keys images"):
        read_render(path)
    path.write_text(json.dumps(GOLDEN_RENDER_V1 | {"schema_version": 2}))
    with pytest.raises(GroupshotError, match="newer"):
        read_render(path)
