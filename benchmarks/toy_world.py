"""Toy-world separation benchmark: does each person's adapter act in its own region only?

Runs on the CPU in minutes:  python -m benchmarks.toy_world --out DIR --seeds 0 1 2

Per seed, end to end with the project's own code paths:
1. a tiny text-to-image base model is trained from scratch on synthetic pictures (muted
   backgrounds with shapes, "people" silhouettes) and saved as a diffusers folder with a
   controlnet/ sub-folder;
2. toy "people", each a saturated colour in coarse bands that no base picture has, are
   trained into personas by `personas.train_persona` (face_model="none", centre crops);
3. pairs and triples of them are composed on the two_standing and three_row templates by
   `compose.GroupComposer` with every method;
4. every pixel of every render is classified by colour, and each region (the render's own
   masks.npz) is scored: own pattern, leakage into the other people and the background,
   and how often one pattern takes over two people's regions.

Why the measurement can be trusted (more in benchmarks/RESULTS.md, "Toy-world separation"):
the VAE is not trained but built by hand to be an exact 4x4 average-pool encoder and a
nearest-neighbour decoder (error < 1e-5), so a decoded colour is the colour the diffusion
model produced in latent space; no base picture holds a colour in a pattern's band (its
vivid shapes sit halfway between two patterns' hues), so the base model alone scores (near)
zero on every pattern; and the pattern hues are 90 degrees apart, so a blend of two patterns
is not mistaken for a third.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 64          # pixels; the VAE averages 4x4 cells, so the model works on 16x16 latents
CELL = 4           # pixels per latent cell
METHODS = ("composite", "masked", "merge")
LAYOUTS = {"two_standing": ("a photo of two people", 2), "three_row": ("a photo of three people", 3)}

# -- the toy world --------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyPerson:
    """A toy identity: a saturated hue (two shades of it) laid out in a texture."""

    name: str
    hue: float      # degrees
    texture: str    # hstripes | vstripes | checker | diagonal
    label: str      # for tables: what it looks like


PEOPLE = (
    ToyPerson("ada", 0.0, "hstripes", "red, horizontal bands"),
    ToyPerson("ben", 90.0, "checker", "chartreuse, checkerboard"),
    ToyPerson("cleo", 180.0, "vstripes", "cyan, vertical bands"),
    ToyPerson("dev", 270.0, "diagonal", "violet, diagonal bands"),
)

# Backgrounds, silhouettes and half the shapes use these muted colours (HSV saturation
# <= 0.38, below MIN_SATURATION).
MUTED = {
    "grey": (128, 128, 128), "white": (225, 225, 218), "black": (40, 40, 42), "beige": (200, 185, 160),
    "brown": (120, 95, 75), "olive": (125, 125, 95), "slate": (95, 105, 120), "sand": (190, 175, 140),
    "taupe": (140, 125, 115), "sage": (140, 155, 135),
}
# Half the shapes are vivid, at hues 45 degrees from every pattern's (outside the
# classifier's 30-degree bands): the base model learns to draw saturated colour, as a real
# one can, and a persona only has to move it to its own hue. Without them personas trained
# for 100 steps often failed to show at all (the base had no way to draw saturated colour).
VIVID = ("orange", "spring", "azure", "rose")  # hues 45, 135, 225, 315
SHAPES = ("circle", "square", "triangle")
PEOPLE_CAPTIONS = {1: "a photo of a person", 2: "a photo of two people", 3: "a photo of three people"}

# The pixel classifier: a pixel shows pattern k when it is saturated, not dark, and its hue
# lies within HUE_TOLERANCE of pattern k's hue. Pattern hues are 90 degrees apart, so an
# even blend of two neighbours (45 degrees off each) shows neither.
MIN_SATURATION = 0.55
MIN_VALUE = 0.2
HUE_TOLERANCE = 30.0
MAJORITY = 0.5  # a region "shows" a pattern when at least this share of its pixels do


def _shade(hue: float, value: float, rng: np.random.Generator) -> np.ndarray:
    h = ((hue + rng.uniform(-6, 6)) % 360) / 360
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.85, 0.95), float(np.clip(value + rng.uniform(-0.05, 0.05), 0, 1)))
    return np.array([r, g, b]) * 255


def person_picture(person: ToyPerson, rng: np.random.Generator) -> np.ndarray:
    """A "photo" of a toy person: its texture over the whole frame, in two shades of its
    hue, at a random phase (uint8, SIZE x SIZE x 3)."""
    half = 4 * CELL  # 16 px bands: coarse enough for a LoRA to learn in a hundred steps
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    x = x + rng.integers(0, 2 * half)
    y = y + rng.integers(0, 2 * half)
    stripes = {
        "hstripes": (y // half) % 2,
        "vstripes": (x // half) % 2,
        "checker": (x // half + y // half) % 2,
        "diagonal": ((x + y) // half) % 2,
    }[person.texture]
    light, dark = _shade(person.hue, 0.95, rng), _shade(person.hue, 0.6, rng)
    return np.where(stripes[..., None] == 1, light, dark).astype(np.uint8)


def _muted(rng: np.random.Generator, exclude: str | None = None) -> tuple[str, np.ndarray]:
    names = [n for n in MUTED if n != exclude]
    name = names[rng.integers(len(names))]
    return name, np.clip(np.array(MUTED[name]) + rng.integers(-8, 9, 3), 0, 255)


def base_picture(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A base-model training picture and its caption: a shape on a background, or 1-3
    people silhouettes (from jittered pose templates) on a background."""
    from PIL import Image, ImageDraw

    bg_name, bg = _muted(rng)
    if rng.random() < 0.5:
        fg_name, fg = _muted(rng, exclude=bg_name)
        if rng.random() < 0.5:  # a vivid shape, its hue halfway between two patterns' hues
            j = int(rng.integers(len(VIVID)))
            fg_name = VIVID[j]
            fg = _shade(45.0 + 90.0 * j, float(rng.uniform(0.6, 0.95)), rng)
        shape = SHAPES[rng.integers(len(SHAPES))]
        im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in bg))
        draw = ImageDraw.Draw(im)
        r = rng.uniform(9, 20)
        cx, cy = rng.uniform(r, SIZE - r, 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        color = tuple(int(v) for v in fg)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        return np.asarray(im), f"a {fg_name} {shape} on a {bg_name} background"
    n = int(rng.integers(1, 4))
    masks = _silhouettes(n, rng)
    pixels = np.broadcast_to(bg, (SIZE, SIZE, 3)).astype(np.float64)
    for mask in masks:
        _, color = _muted(rng, exclude=bg_name)
        pixels = np.where(mask[..., None], color, pixels)
    return pixels.astype(np.uint8), PEOPLE_CAPTIONS[n]


def _silhouettes(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from compose.poses import Pose, template_pose
    from compose.regions import regions_from_pose

    template = {1: "one_standing", 2: "two_standing", 3: "three_row"}[n]
    pose = template_pose(template, size=(SIZE, SIZE))
    dx = rng.uniform(-6, 6)
    people = []
    for person in pose.people:
        p = person.copy()
        present = p[:, 2] > 0
        p[present, :2] += rng.normal(0, 1.0, (int(present.sum()), 2)) + (dx, rng.uniform(-2, 2))
        p[present, 0] = np.clip(p[present, 0], 0, SIZE)
        p[present, 1] = np.clip(p[present, 1], 0, SIZE)
        people.append(p)
    regions = regions_from_pose(Pose(SIZE, SIZE, people))
    return [m >= 0.5 for m in regions.people]


# -- the base model -------------------------------------------------------------------------

# The tiny UNet of personas.testing with one attention head per 32 channels: the CPU's SDPA
# kernel is about twice as fast with 32-wide heads than with 8 heads of 4.
UNET = dict(
    sample_size=SIZE // CELL, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(1, 2), norm_num_groups=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
    block_out_channels=(16, 16, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False, force_upcast=False,
)
_BIG = 1000.0   # constant channels that make GroupNorm's statistics (almost) content-free
_SHIFT = 20.0   # moves values to where SiLU is the identity to 1e-7


def pooling_vae(scaling_factor: float):
    """An AutoencoderKL whose encoder is exactly a 4x4 average pool of RGB (latent channel 3
    is always 0, the posterior's std ~3e-7) and whose decoder is exactly nearest-neighbour
    upsampling of latent channels 0-2: residual branches are zeroed, down/up-sampling
    convolutions average or copy, and each GroupNorm sees a group [x, -x, +BIG, -BIG] whose
    statistics do not depend on x, then a shift puts SiLU where it is the identity."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE, scaling_factor=scaling_factor)
    groups, width = VAE["norm_num_groups"], VAE["block_out_channels"][0]
    per = width // groups  # 4: x, -x, +BIG, -BIG

    def signal_in(conv, n_in: int) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for g in range(groups):
            if g < n_in:
                conv.weight[per * g, g, 1, 1] = 1.0
                conv.weight[per * g + 1, g, 1, 1] = -1.0
            conv.bias[per * g + 2], conv.bias[per * g + 3] = _BIG, -_BIG

    def norm_passes_signal(norm) -> None:
        norm.weight.zero_()
        norm.bias.zero_()
        for g in range(groups):
            norm.weight[per * g] = _BIG / math.sqrt(2)  # the group's std is BIG / sqrt(2)
            norm.bias[per * g] = _SHIFT

    def signal_out(conv, n_out: int) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for g in range(n_out):
            conv.weight[g, per * g, 1, 1] = 1.0
            conv.bias[g] = -_SHIFT

    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".conv2." in name:  # every ResNet block becomes its shortcut (the identity)
                p.zero_()
        signal_in(vae.encoder.conv_in, 3)
        for block in vae.encoder.down_blocks:
            for down in block.downsamplers or []:  # 3x3 stride 2 on (0, 1)-padded input: 2x2 mean
                down.conv.weight.zero_()
                down.conv.bias.zero_()
                for c in range(width):
                    down.conv.weight[c, c, :2, :2] = 0.25
        norm_passes_signal(vae.encoder.conv_norm_out)
        signal_out(vae.encoder.conv_out, 3)
        vae.encoder.conv_out.bias[4:] = -30.0  # log-variance: the posterior is (almost) a point
        signal_in(vae.decoder.conv_in, 3)
        for block in vae.decoder.up_blocks:
            for up in block.upsamplers or []:  # nearest 2x, then a centre-tap copy
                up.conv.weight.zero_()
                up.conv.bias.zero_()
                for c in range(width):
                    up.conv.weight[c, c, 1, 1] = 1.0
        norm_passes_signal(vae.decoder.conv_norm_out)
        signal_out(vae.decoder.conv_out, 3)
    return vae


def to_tensor(pictures: list[np.ndarray]):
    import torch

    x = torch.from_numpy(np.stack(pictures)).float().permute(0, 3, 1, 2)  # (N, 3, H, W)
    return x / 127.5 - 1.0


@dataclass
class Settings:
    """Everything that sets the size (and cost) of one run."""

    base_steps: int = 200          # base UNet optimizer steps
    base_batch: int = 16
    base_lr: float = 2e-3
    base_pictures: int = 1024      # synthetic training pictures, drawn once
    people: int = 3                # toy people (of PEOPLE)
    photos: int = 6                # "photos" per toy person
    persona_steps: int = 100
    persona_batch: int = 4
    persona_rank: int = 8
    persona_lr: float = 5e-3
    persona_embedding_lr: float = 2e-2
    compose_steps: int = 20
    guidance: float = 5.0
    images: int = 1                # images per composition and method
    threads: int = 1
    ema: float = 0.99              # EMA decay of the base UNet's weights
    clip: float = 1.0              # gradient-norm clip of the base UNet

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


SETTINGS = Settings()


def train_base(folder: Path, *, seed: int, settings: Settings) -> dict[str, Any]:
    """Train the base UNet from scratch on synthetic pictures; save a diffusers folder with
    the pooling VAE, personas.testing's tiny text encoder and CLIP tokenizer, and an
    OpenPose ControlNet copied from the UNet (zero output convolutions: it adds nothing)."""
    import torch
    import torch.nn.functional as F
    from diffusers import ControlNetModel, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from personas.testing import SD_SCHEDULER, build_components

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    parts = build_components("tiny", seed=seed)  # text encoder, tokenizer, scheduler (random, frozen)
    text_encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
    pictures, captions = zip(*(base_picture(rng) for _ in range(settings.base_pictures)))
    x = to_tensor(list(pictures))  # (N, 3, 64, 64)
    latents = torch.nn.functional.avg_pool2d(x, CELL)  # what pooling_vae encodes to, (N, 3, 16, 16)
    scaling = round(1.0 / float(latents.std()), 3)
    vae = pooling_vae(scaling)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * scaling  # (N, 4, 16, 16)
        vocabulary = sorted(set(captions)) + [""]
        ids = tokenizer(vocabulary, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        text = text_encoder(ids)[0]  # (V, 77, 32)
    caption_index = torch.tensor([vocabulary.index(c) for c in captions])
    empty = len(vocabulary) - 1

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    # An exponential moving average of the weights is what gets saved: after a few hundred
    # steps at a high learning rate the raw weights are noisy, their average is not.
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    # v-prediction: with noise prediction, a briefly trained model's x0 estimate at high noise
    # is its noise error times 1/sqrt(alpha_bar) (~10), and samples come out as coloured
    # noise; v holds x0 directly there.
    scheduler = DDIMScheduler.from_config(SD_SCHEDULER, prediction_type="v_prediction")
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.base_lr, weight_decay=1e-2)
    warmup = max(1, settings.base_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, settings.base_steps) / settings.base_steps)))
    g = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for step in range(settings.base_steps):
        idx = torch.randint(0, len(latents), (settings.base_batch,), generator=g)
        x0 = latents[idx]  # (B, 4, 16, 16)
        if torch.rand((), generator=g) < 0.5:  # the world is mirror-symmetric
            x0 = x0.flip(-1)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        # 10% empty captions: classifier-free guidance needs an unconditional model.
        rows = torch.where(torch.rand(len(idx), generator=g) < 0.1, empty, caption_index[idx])
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, text[rows]).sample
        loss = F.mse_loss(pred, noise_scheduler.get_velocity(x0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), settings.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(settings.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
        losses.append(float(loss.detach()))
    unet.load_state_dict(ema)
    unet.eval()

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    (folder / "TOY_WORLD_MODEL.txt").write_text(
        f"Toy-world base model (seed {seed}) written by benchmarks/toy_world.py: trained from scratch for "
        f"{settings.base_steps} steps on synthetic pictures; hand-built pooling VAE; untrained ControlNet.\n",
        encoding="utf-8")
    tail = losses[-max(1, len(losses) // 10):]
    return {"seconds": round(time.perf_counter() - t0, 1), "final_loss": round(sum(tail) / len(tail), 4),
            "latent_scaling": scaling}


# -- the toy people --------------------------------------------------------------------------


def train_people(model: Path, library, work: Path, *, seed: int, settings: Settings) -> dict[str, Any]:
    """Write each toy person's photos and train its persona with personas.train_persona,
    exactly as `personas train NAME PHOTOS --base-model MODEL --face-model none` would."""
    from PIL import Image

    from personas import TrainConfig, train_persona

    timings = {}
    for k, person in enumerate(PEOPLE[: settings.people]):
        rng = np.random.default_rng([seed, k])
        folder = work / "photos" / person.name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(settings.photos):
            Image.fromarray(person_picture(person, rng)).save(folder / f"{i:02d}.png")
        config = TrainConfig(
            method="pivotal", base_model=str(model), class_word="person", resolution=SIZE,
            learning_rate=settings.persona_lr, embedding_lr=settings.persona_embedding_lr,
            lora_rank=settings.persona_rank, max_train_steps=settings.persona_steps,
            batch_size=settings.persona_batch, mixed_precision="no", seed=seed * 100 + k,
            checkpoint_every=0, validation_every=0, face_model="none",
        )
        result = train_persona(person.name, [folder], config, library=library, progress=False)
        timings[person.name] = {"seconds": round(result.seconds, 1), "final_loss": round(result.final_loss, 4)}
    return timings


# -- measuring -------------------------------------------------------------------------------


def classify(image: np.ndarray, people: tuple[ToyPerson, ...] = PEOPLE) -> np.ndarray:
    """Per pixel, the index (into `people`) of the pattern it shows, or -1 (H, W)."""
    rgb = image[..., :3].astype(np.float64) / 255.0
    top, bottom = rgb.max(-1), rgb.min(-1)
    chroma = top - bottom
    saturation = np.where(top > 0, chroma / np.maximum(top, 1e-9), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-9)
    hue = np.select(
        [top == r, top == g],
        [((g - b) / safe) % 6, (b - r) / safe + 2],
        (r - g) / safe + 4,
    ) * 60.0  # degrees
    labels = np.full(image.shape[:2], -1, np.int64)
    coloured = (saturation >= MIN_SATURATION) & (top >= MIN_VALUE)
    for k, person in enumerate(people):
        off = np.abs((hue - person.hue + 180.0) % 360.0 - 180.0)
        labels[coloured & (off <= HUE_TOLERANCE)] = k
    return labels


def classify_render(image: np.ndarray) -> np.ndarray:
    """`classify` on the render averaged over 8x8 px (2x2 latent cells): a briefly trained
    model leaves cell-sized colour noise that would otherwise knock single cells out of a
    pattern's band. Patterns are 4 cells wide, so the average keeps their hue; at region
    borders it smears up to 4 px across, which every method is charged for alike."""
    import cv2

    return classify(cv2.blur(image.astype(np.float32), (2 * CELL, 2 * CELL)).round().astype(np.uint8))


def score_render(labels: np.ndarray, people: np.ndarray, background: np.ndarray, ids: list[int]) -> dict[str, Any]:
    """Scores of one render. `people` (N, H, W) and `background` (H, W) are the render's own
    soft masks (masks.npz); a pixel belongs to a region where its mask is >= 0.5. `ids[p]`
    is the pattern index of person p."""
    regions = [m >= 0.5 for m in people]
    share = np.array([[float((labels[r] == k).mean()) if r.any() else math.nan for k in ids] for r in regions])  # (N, N)
    n = len(ids)
    own = [share[p, p] for p in range(n)]
    leak_people = [share[q, p] for p in range(n) for q in range(n) if q != p]
    bg = background >= 0.5
    leak_background = float(np.isin(labels[bg], ids).mean()) if bg.any() else math.nan
    foreign = float(((labels >= 0) & ~np.isin(labels, ids)).mean())
    majority = share >= MAJORITY
    takeover = any(majority[p, p] and majority[q, p] for p in range(n) for q in range(n) if q != p)
    return {"own": own, "correct": [bool(majority[p, p]) for p in range(n)], "leak_people": leak_people,
            "leak_background": leak_background, "foreign": foreign, "takeover": takeover,
            "share": share.round(4).tolist()}


def compositions(n_people: int, group: int) -> list[tuple[int, ...]]:
    """Cyclic runs of `group` of the first `n_people` patterns: each pattern in each slot once."""
    return [tuple((i + j) % n_people for j in range(group)) for i in range(n_people)]


def compose_all(model: Path, library, out: Path, *, seed: int, settings: Settings) -> list[dict[str, Any]]:
    """Render every composition with every method through GroupComposer and score it."""
    import torch

    from compose import ComposeRequest, GroupComposer

    composer = GroupComposer.from_pretrained(str(model), str(model / "controlnet"), library=library,
                                             device="cpu", dtype=torch.float32)
    records = []
    for layout, (prompt, group) in LAYOUTS.items():
        for c, ids in enumerate(compositions(settings.people, group)):
            names = [PEOPLE[k].name for k in ids]
            for method in METHODS:
                request = ComposeRequest(
                    people=names, prompt=prompt, method=method, pose=layout, size=(SIZE, SIZE),
                    steps=settings.compose_steps, guidance=settings.guidance, num_images=settings.images,
                    seed=seed * 1000 + 10 * c + (0 if layout == "two_standing" else 500), out=str(out),
                )
                t0 = time.perf_counter()
                result = composer(request)
                seconds = time.perf_counter() - t0
                masks = np.load(result.run_dir / "masks.npz")
                for path in result.images:
                    from PIL import Image

                    labels = classify_render(np.asarray(Image.open(path).convert("RGB")))
                    records.append({"layout": layout, "method": method, "people": names,
                                    "image": str(path.relative_to(out)), "seconds": seconds / len(result.images),
                                    **score_render(labels, masks["people"], masks["background"], list(ids))})
    return records


def contact_sheet(records: list[dict[str, Any]], folder: Path):
    """One row per composition (layout, people), one column per method, 2x enlarged."""
    from PIL import Image

    rows: dict[tuple, dict[str, str]] = {}
    for r in records:
        rows.setdefault((r["layout"], tuple(r["people"])), {}).setdefault(r["method"], r["image"])
    sheet = Image.new("RGB", (SIZE * len(METHODS), SIZE * len(rows)), "white")
    for y, methods in enumerate(rows.values()):
        for x, method in enumerate(METHODS):
            if method in methods:
                sheet.paste(Image.open(folder / methods[method]).convert("RGB"), (x * SIZE, y * SIZE))
    return sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)


def base_false_positives(model: Path, *, seed: int, settings: Settings) -> float:
    """Share of pixels that show any pattern in the base model's own renders of the scene
    prompts (no adapter): the classifier's false-positive floor."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    shares = []
    for prompt, _ in LAYOUTS.values():
        for i in range(max(2, settings.images)):
            image = pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=settings.compose_steps,
                         guidance_scale=settings.guidance, generator=torch.Generator().manual_seed(seed * 1000 + i)).images[0]
            shares.append(float((classify_render(np.asarray(image)) >= 0).mean()))
    return float(np.mean(shares))


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{"<method>/<layout>" and "<method>/all": metric means} over one seed's renders."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        for layout in [*LAYOUTS, "all"]:
            rows = [r for r in records if r["method"] == method and layout in (r["layout"], "all")]
            if not rows:
                continue

            def mean(key: str) -> float:
                values = [v for r in rows for v in (r[key] if isinstance(r[key], list) else [r[key]])]
                values = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
                return float(np.mean(values)) if values else math.nan

            out[f"{method}/{layout}"] = {
                "own": mean("own"), "correct": mean("correct"), "leak_people": mean("leak_people"),
                "leak_background": mean("leak_background"), "takeover": mean("takeover"),
                "foreign": mean("foreign"), "images": len(rows),
            }
    return out


# -- one seed, several seeds, the table --------------------------------------------------------


def run_seed(seed: int, out: Path, settings: Settings) -> dict[str, Any]:
    """The whole pipeline for one seed in out/seed-<seed>/: base model, personas, renders, scores."""
    import torch

    from personas import Library

    torch.set_num_threads(settings.threads)
    work = out / f"seed-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = work / "model"
    if model.exists():
        import shutil

        shutil.rmtree(model)
    base = train_base(model, seed=seed, settings=settings)
    library = Library(work / "people")
    people = train_people(model, library, work, seed=seed, settings=settings)
    t_people = time.perf_counter()
    floor = base_false_positives(model, seed=seed, settings=settings)
    records = compose_all(model, library, work / "renders", seed=seed, settings=settings)
    summary = summarize(records)
    contact_sheet(records, work / "renders").save(work / "renders.png")
    result = {
        "seed": seed, "base": base, "people": people, "base_false_positive": round(floor, 4),
        "seconds": {"total": round(time.perf_counter() - t0, 1), "base": base["seconds"],
                    "people": round(sum(p["seconds"] for p in people.values()), 1),
                    "compose": round(time.perf_counter() - t_people, 1)},
        "summary": summary, "renders": records,
    }
    (work / "scores.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


METRICS = (
    ("own", "own pattern in own region", "share of a person's region showing their pattern (higher is better)"),
    ("correct", "correct rate", "share of people whose pattern holds the majority of their region"),
    ("leak_people", "leak into others", "share of another person's region showing this person's pattern"),
    ("leak_background", "leak into background", "share of the background showing any composed person's pattern"),
    ("takeover", "takeover rate", "share of images where one pattern holds the majority of two people's regions"),
)


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{"<method>/<layout>": {metric: [mean, std over seeds]}} (std 0 for one seed)."""
    table: dict[str, dict[str, list[float]]] = {}
    for key in results[0]["summary"]:
        table[key] = {}
        for metric in [m for m, _, _ in METRICS] + ["foreign"]:
            values = [r["summary"][key][metric] for r in results]
            table[key][metric] = [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]
        table[key]["images"] = results[0]["summary"][key]["images"]
    return table


def markdown_table(table: dict[str, dict[str, list[float]]], n_seeds: int) -> str:
    pm = " ± " if n_seeds > 1 else ""

    def cell(v: list[float]) -> str:
        return f"{v[0]:.3f}{pm}{v[1]:.3f}" if n_seeds > 1 else f"{v[0]:.3f}"

    head = "| method | layout | images/seed | " + " | ".join(title for _, title, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METRICS))]
    for key, row in table.items():
        method, layout = key.split("/")
        lines.append(f"| {method} | {layout} | {row['images']} | " + " | ".join(cell(row[m]) for m, _, _ in METRICS) + " |")
    return "\n".join(lines)


def run(seeds: list[int], out: Path, settings: Settings) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = [run_seed(seed, out, settings) for seed in seeds]
    table = aggregate(results)
    report = {
        "schema_version": 1, "benchmark": "toy_world", "seeds": seeds, "settings": asdict(settings),
        "settings_text": settings.describe(),
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_per_seed": [r["seconds"] for r in results],
        "base_false_positive": [r["base_false_positive"] for r in results],
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": settings.threads,
                    "platform": platform.platform()},
        "out": str(out), "table": table, "per_seed": [{k: v for k, v in r.items() if k != "renders"} for r in results],
    }
    (out / "toy_world.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "toy_world.md").write_text(markdown_table(table, len(seeds)) + "\n", encoding="utf-8")
    return report


# -- RESULTS.md --------------------------------------------------------------------------------

SECTION = "Toy-world separation"


def results_section(report: dict[str, Any], command: str) -> str:
    """The "Toy-world separation" section of benchmarks/RESULTS.md for `report`."""
    seeds = report["seeds"]
    per_seed = ", ".join(f"{s['total']:.0f} s" for s in report["seconds_per_seed"])
    parts = {k: np.mean([s[k] for s in report["seconds_per_seed"]]) for k in ("base", "people", "compose")}
    floor = report["base_false_positive"]
    people = report["settings"]["people"]
    legend = "\n".join(f"- **{title}**: {help_}." for _, title, help_ in METRICS)
    cast = "; ".join(f"`{p.name}` {p.label}" for p in PEOPLE[:people])
    return f"""## {SECTION}

Issue #9. Does each person's adapter act in its own region and nowhere else? Measured end to
end on the CPU in a toy world where identities are colour patterns: a tiny base model trained
from scratch, toy personas trained by `personas.train_persona`, group renders by
`compose.GroupComposer`, every pixel classified by colour, every region scored with the
render's own masks (`masks.npz`).

Command: `{command}`
Seeds: {", ".join(map(str, seeds))} (each seed trains its own base model and personas and renders
its own images; values are mean ± sample std over seeds). Settings: {report["settings_text"]}.
Runtime: {report["seconds"]:.0f} s in all on {report["machine"]["cpu_count"]} CPU cores,
{report["machine"]["threads"]} torch thread (per seed {per_seed}; on average base model
{parts["base"]:.0f} s, {people} personas {parts["people"]:.0f} s, renders and scoring {parts["compose"]:.0f} s).{report.get("note", "")}

{markdown_table(report["table"], len(seeds))}

{legend}

People: {cast}. Layouts: compose's `two_standing` (prompt "a photo of two people") and
`three_row` ("a photo of three people"); every pattern takes every slot once
(cyclic pairs and triples). Pixels showing a pattern of someone not in the picture: at most
{max(r["foreign"][0] for r in report["table"].values()):.3f} of a render in any row.
False-positive floor: the base model alone (no adapter) renders the scene prompts with
{np.mean(floor):.4f} of its pixels in some pattern's colour band (per seed: {", ".join(f"{v:.4f}" for v in floor)}).

How the world is built, and why the measurement can be trusted:
- **Pictures**: 64x64 px. Base pictures: a shape on a background ("a grey circle on a sand
  background", "an azure square on a slate background"), or 1-3 silhouettes from jittered
  pose templates ("a photo of two people"); backgrounds and silhouettes are muted (HSV
  saturation <= 0.38), half the shapes vivid at hues 45 degrees from every pattern's (so the
  base can draw saturated colour, as a real one can, and a persona only moves it to its own
  hue; with muted pictures only, personas often failed to show at all). A toy person's photos are its hue in
  two saturated shades (saturation ~0.9) laid out in 16 px bands (horizontal, checker,
  vertical or diagonal) over the whole frame; hues are 90 degrees apart. A render is
  averaged over 8x8 px (2x2 latent cells) and a pixel shows pattern k when saturation >=
  {MIN_SATURATION}, value >= {MIN_VALUE} and hue within {HUE_TOLERANCE:.0f} degrees of k's: no base
  picture can pass (the vivid hues are 39 degrees or more from every band centre), and an even
  blend of two patterns (45 degrees from each) shows neither.
  The 8x8 average removes the cell-sized colour noise the briefly trained model leaves
  (bands are 16 px, so it keeps their hue); at region borders it smears up to 4 px across,
  which every method is charged for alike.
- **VAE**: not trained but built by hand (`pooling_vae`): the encoder is exactly a 4x4
  average pool, the decoder exactly nearest-neighbour upsampling (error < 1e-5, tested). A
  random or briefly trained VAE would add colour errors of its own; with this one a decoded
  pixel is the colour the diffusion model put in latent space, so the score reads the UNet
  and its adapters only. The cost: the model works on 16x16 latent cells.
- **Base model**: the tiny UNet of `personas.testing` (but one 32-wide head per attention:
  twice as fast on the CPU) trained from scratch with v-prediction, caption dropout (for
  guidance) and an EMA of the weights; personas.testing's tiny random CLIP text encoder and
  the real CLIP tokenizer, frozen; DDIM. Two hundred CPU steps buy blotchy pictures in the
  data's palette with rough blobs, not clean shapes, and the prompt barely steers them
  (noise prediction was worse: coloured noise; 300 steps, 64 instead of 1024 pictures or
  3x the learning rate did not visibly help). That is enough here: the base must not paint
  patterns (its false-positive floor is above) and must give the personas something to
  adapt. Renders stay speckled at the cell level, hence the 8x8 average before classifying;
  each seed's `renders.png` (rows: compositions, columns: composite, masked, merge) shows them.
  The ControlNet is `ControlNetModel.from_unet` with its zero output convolutions: it adds
  nothing, so the pose acts only through the regions. Persona photos fill the frame, so an
  adapter paints its pattern wherever it acts: the benchmark measures *where adapters
  act*, not whether a pattern follows the body.
- **Personas**: `train_persona` with `face_model="none"`, method pivotal (2 new tokens + UNet
  LoRA), the same code path as `personas train`.
- A region is the pixels where the render's mask (`masks.npz`) is >= 0.5.

Reading it: `composite` keeps every adapter in its own region by construction (each region's
prediction comes from its own branch), so its leakage is what the 16x16 mask blending and the
8x8 average at the edges let through; `masked` confines LoRA deltas and prompts but the UNet's
convolutions and self-attention still carry a pattern across region borders; `merge` (the
baseline) runs every adapter everywhere with every person's tokens in one prompt, and one
pattern regularly takes over two people. "Own pattern" is modest for every method: personas
trained for 100 CPU steps paint their hue over part of their region only, and how well
varies by seed and person; the leakage columns, not "own", are what this benchmark pins
down. The numbers above: `benchmarks/results/2026-11-25-cpu-toy-world.json`. Output per run: `toy_world.json` / `toy_world.md` (the table), and per seed the base
model, the personas, every compose run folder (render.json, masks.npz), `scores.json` (every
render's per-region shares) and `renders.png`. `tests/test_toy_world.py` runs seed 0 in CI
and asserts the leakage ordering with thresholds from the per-seed numbers above.
"""


def replace_section(path: Path, title: str, body: str) -> None:
    """Put `body` (starting with its '## title' line) in place of that section of `path`,
    or append it; other sections are left as they are."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {title}"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + body.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toy_world", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for models, renders, toy_world.json/.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed (default 0 1 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more)")
    p.add_argument("--results-md", type=Path, default=None,
                   help=f"also write the '{SECTION}' section of this markdown file (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.WARNING)
    settings = replace(SETTINGS, threads=args.threads)
    report = run(args.seeds, args.out, settings)
    table = markdown_table(report["table"], len(args.seeds))
    print(table)
    print(f"\nbase-model false-positive floor: {report['base_false_positive']}; {report['seconds']:.0f} s")
    if args.results_md is not None:
        command = "python -m benchmarks.toy_world --out OUT --seeds " + " ".join(map(str, args.seeds))
        command += f" --threads {args.threads}" if args.threads != 1 else ""
        replace_section(args.results_md, SECTION, results_section(report, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
