"""Models for tests and benchmarks built from configs, with random weights and no download.

`python -m personas.testing tiny-model DIR` writes a tiny Stable-Diffusion-layout folder
(with an OpenPose-style ControlNet in DIR/controlnet) usable as `--base-model DIR`.
`python -m personas.testing sd15-random DIR` writes the same at real SD1.5 size (random
weights: for speed and memory measurements, not for pictures). `python -m personas.testing
tiny-clip DIR` writes a tiny random open_clip model for offline eval. `python -m
personas.testing arcface-random DIR` writes insightface's buffalo_l layouts with random weights
(personas.face_nets).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# -- tokenizer -----------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    # The byte <-> printable-character table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The real CLIP BPE vocabulary, rebuilt from the merges file open_clip ships."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is needed to build the CLIP tokenizer offline")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the same slice open_clip's SimpleTokenizer takes
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(vocab_list) == CLIP_VOCAB_SIZE, len(vocab_list)  # internal invariant of the file
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Write a transformers CLIPTokenizer folder equal to SD1.5's tokenizer, without download."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    import inspect

    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4
        files = dict(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    else:  # transformers 5 takes the vocabulary and merges themselves
        files = dict(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    tok = CLIPTokenizer(
        **files,
        model_max_length=77,  # without it the SD pipeline overflows (ENVIRONMENT.md)
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP tokenizer of {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    tok.save_pretrained(folder)
    return folder


def clip_tokenizer():
    """An in-memory CLIPTokenizer equal to SD1.5's (built once per process, in a temp folder)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_clip_tokenizer(d)
        return CLIPTokenizer.from_pretrained(d, model_max_length=77)


# -- configs -------------------------------------------------------------------------------

# Tiny: 64 px images, VAE factor 4 (16x16 latents), attention at two resolutions so that
# region masks are exercised at more than one latent size.
TINY = {
    "unet": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    "text_encoder": dict(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    ),
    # 2 stride-2 convolutions: the conditioning image must come down by the VAE's factor 4.
    "controlnet_conditioning_channels": (8, 16, 32),
}

# Stable Diffusion 1.5, exact (runwayml/stable-diffusion-v1-5 configs).
SD15 = {
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
        freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        act_fn="silu",
    ),
    "text_encoder": dict(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_act="quick_gelu",
    ),
    "controlnet_conditioning_channels": (16, 32, 96, 256),
}

SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)


def build_components(size: str = "tiny", *, seed: int = 0, device: Any = None, dtype: Any = None) -> dict[str, Any]:
    """Random-weight SD components: unet, vae, text_encoder, tokenizer, scheduler, controlnet."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {"tiny": TINY, "sd15": SD15}[size]
    ctx = torch.device(device) if device is not None else torch.device("cpu")
    with ctx:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**cfg["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        torch.manual_seed(seed + 3)
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=cfg["controlnet_conditioning_channels"]
        )
        # from_unet zero-initialises the output convolutions (as training starts), so a
        # random ControlNet would add exactly nothing and tests could not see the pose.
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.02)
            torch.nn.init.zeros_(conv.bias)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, controlnet=controlnet)
    if dtype is not None:
        for m in parts.values():
            m.to(dtype)
    parts["tokenizer"] = clip_tokenizer()
    parts["scheduler"] = PNDMScheduler.from_config(SD_SCHEDULER)
    return parts


def write_model(folder: str | Path, size: str = "tiny", *, seed: int = 0, device: Any = None) -> Path:
    """Write a diffusers-layout SD folder with a `controlnet/` sub-folder.

    `device="cuda"` initialises the random weights on the GPU (seconds instead of a minute
    at SD1.5 size); the files are the same layout either way.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    parts = build_components(size, seed=seed, device=device)
    controlnet = parts.pop("controlnet")
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    dtype = torch.float16 if size == "sd15" else None
    if dtype is not None:
        pipe.to(dtype=dtype)
        controlnet.to(dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    (folder / "GROUPSHOT_TEST_MODEL.txt").write_text(
        f"Random weights ({size}, seed {seed}) written by `python -m personas.testing`.\n"
        "For tests and benchmarks only: it draws noise, not pictures.\n",
        encoding="utf-8",
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m personas.testing", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("tiny-model", "a tiny random model (seconds, a few MB)"),
                        ("sd15-random", "SD1.5 architecture with random weights (about 2.6 GB)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("dir", type=Path)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--device", default=None, help="initialise weights on this device (e.g. cuda)")
    c = sub.add_parser("tiny-clip", help="a tiny random open_clip model for offline eval (evaluate --clip-model local-dir:DIR)")
    c.add_argument("dir", type=Path)
    c.add_argument("--seed", type=int, default=0)
    af = sub.add_parser("arcface-random", help="insightface buffalo_l layouts (SCRFD-10G-KPS, iresnet50) with random "
                        "weights, as a model pack: ArcFaceBackend(pack=DIR); for speed measurements")
    af.add_argument("dir", type=Path)
    af.add_argument("--size", choices=("full", "tiny"), default="full")
    af.add_argument("--seed", type=int, default=0)
    ph = sub.add_parser("sample-photos", help="public-domain photos of two people (Eileen Collins, Grace Hopper) in DIR/<name>/")
    ph.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        print(f"error: {args.dir} exists and is not empty; pick a new folder", file=sys.stderr)
        return 2
    if args.cmd == "sample-photos":
        for who in ("eileen", "grace"):
            print(sample_photos(args.dir / who, who))
        return 0
    if args.cmd == "arcface-random":
        from personas.face_nets import write_random_pack

        print(write_random_pack(args.dir, args.size, seed=args.seed))
        return 0
    if args.cmd == "tiny-clip":
        write_tiny_clip(args.dir, seed=args.seed)
    else:
        write_model(args.dir, "tiny" if args.cmd == "tiny-model" else "sd15", seed=args.seed, device=args.device)
    print(args.dir)
    return 0



# -- random personas (compose and eval tests) ------------------------------------------------


def make_random_persona(
    library: Any, name: str, base_model_dir: str | Path, *, method: str = "pivotal", rank: int = 4,
    n_tokens: int = 2, seed: int = 0, class_word: str = "person", text_lora: bool = False,
) -> Any:
    """A persona with random adapters of the right shapes for `base_model_dir`, committed to `library`.

    LoRA factors on every UNet attention to_q/to_k/to_v/to_out.0 (lora_B non-zero, so the
    adapter changes the output; `text_lora` adds text-encoder q/k/v/out_proj factors),
    and `n_tokens` random token embeddings for ti/pivotal, saved in the formats that
    personas.adapters writes and diffusers reads.
    """
    import torch

    from personas.adapters import TEXT_TARGETS, UNET_TARGETS, LoraWeights, save_embeddings, save_lora
    from personas.library import ADAPTER_FILE, EMBEDDINGS_FILE, Persona, sha256_file, utc_now
    from personas.models import load_base_model

    if method not in ("lora", "ti", "pivotal"):
        raise ValueError(f"method {method!r}: expected lora, ti or pivotal")
    base = load_base_model(str(base_model_dir))
    gen = torch.Generator().manual_seed(seed)

    def factors(module: Any) -> tuple[Any, Any]:
        out_f, in_f = module.weight.shape
        # Deltas about as large as the layer's own weights: clearly visible in a 2-step render.
        a = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        b = torch.randn(out_f, rank, generator=gen) / rank**0.5
        return a, b

    def lora_layers(model: Any, targets: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
        modules = dict(model.named_modules())
        return {path: factors(m) for path, m in modules.items()
                if any(path.endswith("." + t) for t in targets) and isinstance(m, torch.nn.Linear)}

    tokens = [f"<{name}>"] + [f"<{name}>_{i}" for i in range(1, n_tokens)] if method != "lora" else []
    staged = library.staging(name)
    adapter_sha = embeddings_sha = None
    if method in ("lora", "pivotal"):
        weights = LoraWeights(unet=lora_layers(base.unet, UNET_TARGETS), metadata={"random_seed": seed})
        if text_lora:
            weights.text_encoder = lora_layers(base.text_encoder, TEXT_TARGETS)
        save_lora(staged / ADAPTER_FILE, weights)
        adapter_sha = sha256_file(staged / ADAPTER_FILE)
    if tokens:
        table = base.text_encoder.get_input_embeddings().weight
        emb = torch.randn(len(tokens), table.shape[1], generator=gen) * float(table.detach().std())
        save_embeddings(staged / EMBEDDINGS_FILE, emb, tokens)
        embeddings_sha = sha256_file(staged / EMBEDDINGS_FILE)
    persona = Persona(
        name=name, tokens=tokens, class_word=class_word, base_model=base.identity, method=method,
        hyperparameters={"rank": rank, "n_tokens": len(tokens), "random_seed": seed, "text_lora": text_lora},
        photos=[], adapter_sha256=adapter_sha, embeddings_sha256=embeddings_sha, created_at=utc_now(),
        extra={"note": "random adapters made by personas.testing.make_random_persona"},
    )
    return library.commit(name, staged, persona)


def sample_photos(folder: str | Path, who: str = "eileen") -> Path:
    """Four training photos of a public-domain person, from a photo a registry package ships.

    `eileen`: Eileen Collins (scikit-image's `astronaut`, NASA); `grace`: Grace Hopper
    (matplotlib's sample photo, US Navy). The set is the photo, its mirror image, a crop and
    a darker, smaller copy: enough for tests and the quick start, not for a real persona.
    """
    import importlib.util

    from PIL import Image, ImageEnhance, ImageOps

    if who == "eileen":
        import skimage.data

        im = Image.fromarray(skimage.data.astronaut())
    elif who == "grace":
        spec = importlib.util.find_spec("matplotlib")
        im = Image.open(Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg").convert("RGB")
    else:
        raise ValueError(f"no sample photos of {who!r}: choose eileen or grace")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = im.size
    scaled = lambda f: (round(w * f), round(h * f))  # noqa: E731
    im.save(folder / "a.png")
    ImageOps.mirror(im).save(folder / "b.jpg", quality=95)
    im.crop((round(w * 0.04), 0, w, h - round(h * 0.04))).resize(scaled(0.9375)).save(folder / "c.webp")
    ImageEnhance.Brightness(im).enhance(0.8).resize(scaled(0.78125)).save(folder / "d.jpg", quality=95)
    return folder


# -- a tiny CLIP for eval (open_clip layout) ---------------------------------------------------

# A CLIP small enough to build in milliseconds: 32 px images, one layer per tower. Its
# scores are meaningless (random weights); it lets eval run offline end to end.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """An open_clip `local-dir:` folder (open_clip_config.json + random weights as safetensors),
    usable as `evaluate --clip-model local-dir:FOLDER`."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "GROUPSHOT_TEST_MODEL.txt").write_text(
        f"Random CLIP weights (seed {seed}) written by `python -m personas.testing tiny-clip`.\n"
        "For tests and offline examples only: its scores mean nothing.\n",
        encoding="utf-8",
    )
    return folder


if __name__ == "__main__":
    sys.exit(main())
