"""Load a Stable Diffusion base model (and an OpenPose ControlNet) by hub id, folder or file.

Every loader records what it loaded ({"id", "revision", "sha256"}) so outputs can say
exactly which weights made them. Offline, an uncached hub id fails with one line that
names the model and how to point at a local folder instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personas.adapters import PICKLE_SUFFIXES
from personas.errors import ModelUnavailableError

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNET = "lllyasviel/control_v11p_sd15_openpose"
SINGLE_FILE_SUFFIXES = (".safetensors",)


@dataclass
class BaseModel:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    identity: dict[str, Any]  # {"id", "revision", "sha256"}

    def components(self) -> dict[str, Any]:
        return dict(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, scheduler=self.scheduler)


def _offline_hint(model_id: str, what: str) -> str:
    return (
        f"cannot load {what} {model_id!r}: it is not a local folder and not in the Hugging Face "
        "cache, and the hub cannot be reached; on a networked machine run "
        f"`huggingface-cli download {model_id}` (or pass a local diffusers folder; "
        "`python -m personas.testing tiny-model DIR` makes a tiny offline test model)"
    )


def _fingerprint(folder: Path, weight_glob: str) -> str | None:
    """sha256 of a model's main weights file, cached beside the user's cache by size+mtime."""
    files = sorted(folder.glob(weight_glob))
    if not files:
        return None
    f = files[0]
    st = f.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "groupshot" / "sha256.json"
    key = f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache))
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def resolve_model_folder(model: str, *, what: str = "base model", subfolder_check: str = "model_index.json",
                         revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A local folder for `model` (a folder, or a hub id from the cache / a download)."""
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelUnavailableError(
                f"{what} {model!r} is a pickle ({p.suffix}), which can run code when loaded; groupshot loads "
                "only .safetensors weights: convert it with a trusted tool, or pass a diffusers folder or hub id"
            )
        if not p.is_dir():
            raise ModelUnavailableError(f"{what} {model!r} is a file; pass a diffusers folder or hub id")
        if not (p / subfolder_check).is_file():
            raise ModelUnavailableError(
                f"{what} folder {model!r} has no {subfolder_check}; it is not a diffusers model folder"
            )
        return p, {"id": str(p.resolve()), "revision": None}
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelUnavailableError(f"{what} {model!r} is neither an existing folder nor a hub id like owner/name")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as e:  # offline / not found / auth: all mean "not available here"
        log.debug("snapshot_download(%s) failed: %r", model, e)
        raise ModelUnavailableError(_offline_hint(model, what)) from None
    return folder, {"id": model, "revision": folder.name}


BASE_MODEL_WEIGHTS = ("unet", "vae", "text_encoder")


def check_safetensors_weights(folder: Path, subfolders: tuple[str, ...], *, what: str) -> None:
    """Refuse a model whose weights are only pickles (.bin/.ckpt/...), which can run code when loaded."""
    for sub in subfolders:
        d = folder / sub
        if not any(d.glob("*.safetensors")):
            pickles = sorted(p.name for p in d.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
            found = f"only {', '.join(pickles)} (pickles, which can run code)" if pickles else "no weights"
            raise ModelUnavailableError(
                f"{what}: {d} holds {found}; groupshot loads only .safetensors weights: "
                "convert the model with a trusted tool or use its safetensors release"
            )


def load_base_model(model: str = DEFAULT_BASE_MODEL, *, dtype: Any = None, device: Any = None,
                    revision: str | None = None) -> BaseModel:
    """UNet, VAE, text encoder, tokenizer and scheduler of an SD1.x model."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES and Path(model).is_file():
        return _load_single_file(model, dtype=dtype, device=device)
    folder, identity = resolve_model_folder(model, revision=revision)
    check_safetensors_weights(folder, BASE_MODEL_WEIGHTS, what=f"base model {model!r}")
    dtype = dtype or torch.float32
    try:
        # use_safetensors: never fall back to a pickled .bin, which could run code
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype,
                                                     use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", model_max_length=77)
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(f"base model {model!r}: cannot load its components ({str(e).splitlines()[0]})") from None
    # transformers 5 returns a 2-token tokenizer from an empty folder instead of failing.
    if len(tokenizer) < 49408:
        raise ModelUnavailableError(f"base model {model!r}: its tokenizer has {len(tokenizer)} tokens, not a CLIP tokenizer")
    scheduler = load_scheduler(folder)
    identity["sha256"] = _fingerprint(folder / "unet", "diffusion_pytorch_model*.safetensors")
    base = BaseModel(unet, vae, text_encoder, tokenizer, scheduler, identity)
    if device is not None:
        for m in (unet, vae, text_encoder):
            m.to(device)
    return base


def load_scheduler(folder: Path, name: str | None = None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler

    classes = {
        None: None, "pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "unipc": UniPCMultistepScheduler,
    }
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    cls = classes.get(name) if name else None
    if cls is None:
        import diffusers

        cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"))
    return cls.from_config(config)


SCHEDULERS = ("pndm", "ddim", "dpm++", "euler", "euler_a", "unipc")


def load_controlnet(model: str = DEFAULT_CONTROLNET, *, dtype: Any = None, device: Any = None):
    """An OpenPose ControlNet and its identity record."""
    import torch
    from diffusers import ControlNetModel

    folder, identity = resolve_model_folder(model, what="ControlNet", subfolder_check="config.json")
    check_safetensors_weights(folder, (".",), what=f"ControlNet {model!r}")
    try:
        cn = ControlNetModel.from_pretrained(folder, torch_dtype=dtype or torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(f"ControlNet {model!r}: cannot load it ({str(e).splitlines()[0]})") from None
    identity["sha256"] = _fingerprint(folder, "diffusion_pytorch_model*.safetensors")
    if device is not None:
        cn.to(device)
    return cn, identity


def _load_single_file(path: str, *, dtype: Any, device: Any) -> BaseModel:
    # A single-file checkpoint needs the SD1.5 configs, which diffusers fetches from the hub
    # (or its cache); offline without them this fails with the usual hint.
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(path, torch_dtype=dtype or torch.float32)
    except Exception as e:
        raise ModelUnavailableError(
            f"single-file checkpoint {path!r} could not be loaded ({str(e).splitlines()[0]}); diffusers "
            "needs the SD1.5 configs from the hub cache for single files: convert it to a folder on a networked machine"
        ) from None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    base = BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                     {"id": str(Path(path).resolve()), "revision": None, "sha256": h.hexdigest()})
    if device is not None:
        for m in (base.unet, base.vae, base.text_encoder):
            m.to(device)
    return base


def same_base_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two identity records name the same weights (by sha256 when both have it)."""
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return a.get("id") == b.get("id") and (a.get("revision") in (None, b.get("revision")) or b.get("revision") is None)
