"""Adapter files: LoRA weights and learned token embeddings, safetensors only.

adapter_model.safetensors uses the diffusers LoRA layout, which
`StableDiffusionPipeline.load_lora_weights` reads:

    unet.<module path>.lora_A.weight          (rank, in_features)
    unet.<module path>.lora_B.weight          (out_features, rank)
    text_encoder.<module path>.lora_A.weight  (optional)

with the LoRA scale alpha/rank already folded into lora_B, so every loader (diffusers,
peft, kohya after export) reproduces the same output with its default alpha = rank.
embeddings.safetensors holds `emb_params` (n_tokens, dim), the layout that diffusers'
`load_textual_inversion` and the A1111 WebUI read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personas.errors import GroupshotError

# The attention projections DreamBooth-LoRA trains (diffusers' reference trainer targets
# the same four). compose applies these deltas itself, per region.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
EMBEDDINGS_KEY = "emb_params"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class LoraWeights:
    """LoRA factors keyed by module path: {path: (A (r, in), B (out, r))}, scale folded into B."""

    unet: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    text_encoder: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        for a, _ in self.unet.values():
            return int(a.shape[0])
        return 0

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for prefix, layers in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            for path, (a, b) in sorted(layers.items()):
                out[f"{prefix}.{path}.lora_A.weight"] = a.contiguous()
                out[f"{prefix}.{path}.lora_B.weight"] = b.contiguous()
        return out

    def attention_layers(self) -> dict[str, dict[str, tuple[Any, Any]]]:
        """UNet factors grouped by attention module: {attn path: {"to_q": (A, B), ...}}."""
        groups: dict[str, dict[str, tuple[Any, Any]]] = {}
        for path, ab in self.unet.items():
            for t in UNET_TARGETS:
                if path.endswith("." + t):
                    groups.setdefault(path[: -len(t) - 1], {})[t] = ab
                    break
        return groups


def _check_safetensors_path(path: Path, what: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise GroupshotError(
            f"{path}: {path.suffix} files are pickles, which can run code; groupshot reads {what} "
            "only from .safetensors (convert it with a trusted tool first)"
        )
    if not path.is_file():
        raise GroupshotError(f"{path}: {what} file not found")


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    _check_safetensors_path(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise GroupshotError(f"{path}: not a readable safetensors {what} file ({type(e).__name__}: {e})".split("\n")[0]) from None
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise GroupshotError(f"{path}: tensor {k} holds NaN or infinite values; the {what} is broken")
    return tensors, meta


def _write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    # Serialised in memory, written by Python: a full disk is an OSError (ENOSPC) naming the
    # file, which the CLIs report in one line; safetensors' own writer raises its own type.
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:  # a failed write() names no file: say which one
        raise OSError(e.errno, e.strerror, str(path)) from None


def save_lora(path: str | Path, weights: LoraWeights) -> None:
    meta = {"format": "pt", **{k: str(v) for k, v in weights.metadata.items()}}
    _write_safetensors(path, weights.state_dict(), meta)


def load_lora(path: str | Path) -> LoraWeights:
    """Read a diffusers-layout LoRA file; fail on pickles, NaN, unknown or unpaired keys."""
    path = Path(path)
    tensors, meta = _read_safetensors(path, "LoRA adapter")
    weights = LoraWeights(metadata=dict(meta))
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for key, t in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in ("unet", "text_encoder") or not (rest.endswith(".lora_A.weight") or rest.endswith(".lora_B.weight")):
            raise GroupshotError(
                f"{path}: key {key!r} is not in the diffusers LoRA layout (unet.*/text_encoder.* "
                "lora_A/lora_B); for a kohya/Civitai file use `personas import`"
            )
        module, ab = rest[: -len(".lora_A.weight")], rest[-len("A.weight")]
        pairs.setdefault((prefix, module), {})[ab] = t
    for (prefix, module), d in pairs.items():
        if set(d) != {"A", "B"}:
            raise GroupshotError(f"{path}: {prefix}.{module} has lora_{next(iter(d))} without its pair")
        a, b = d["A"], d["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise GroupshotError(
                f"{path}: {prefix}.{module} has LoRA shapes {tuple(a.shape)} and {tuple(b.shape)} "
                "that do not pair (expected (r, in) and (out, r))"
            )
        getattr(weights, prefix)[module] = (a, b)
    if not weights.unet and not weights.text_encoder:
        raise GroupshotError(f"{path}: holds no LoRA weights")
    return weights


def check_lora_fits(weights: LoraWeights, unet: Any, text_encoder: Any | None = None, *, source: str = "adapter") -> None:
    """Fail with a clear message when the LoRA was made for another base model."""
    for prefix, model, layers in (("unet", unet, weights.unet), ("text_encoder", text_encoder, weights.text_encoder)):
        if not layers:
            continue
        if model is None:
            raise GroupshotError(f"{source}: has {prefix} LoRA weights but no {prefix} is loaded")
        modules = dict(model.named_modules())
        for path, (a, b) in layers.items():
            m = modules.get(path)
            if m is None or not hasattr(m, "weight"):
                raise GroupshotError(
                    f"{source}: LoRA module {prefix}.{path} does not exist in this base model; "
                    "the adapter was trained for another model architecture"
                )
            out_f, in_f = m.weight.shape[:2]
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise GroupshotError(
                    f"{source}: LoRA {prefix}.{path} is {b.shape[0]}x{a.shape[1]} but the base model's "
                    f"layer is {out_f}x{in_f}; the adapter was trained for another base model"
                )


def save_embeddings(path: str | Path, embeddings: Any, tokens: list[str]) -> None:
    """Write learned token embeddings (n_tokens, dim) in the WebUI/diffusers layout."""
    _write_safetensors(
        path,
        {EMBEDDINGS_KEY: embeddings.detach().float().contiguous().cpu()},
        {"format": "pt", "tokens": json.dumps(tokens)},
    )


def load_embeddings(path: str | Path, *, dim: int | None = None) -> Any:
    path = Path(path)
    tensors, _ = _read_safetensors(path, "token embeddings")
    if set(tensors) != {EMBEDDINGS_KEY}:
        raise GroupshotError(f"{path}: expected one tensor {EMBEDDINGS_KEY!r}, found {sorted(tensors)}")
    emb = tensors[EMBEDDINGS_KEY]
    if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
        raise GroupshotError(
            f"{path}: embeddings of shape {tuple(emb.shape)} do not fit this text encoder "
            f"(expected (n, {dim})); they were trained for another base model"
        )
    return emb


def lora_from_peft(model: Any, adapter_name: str = "default") -> dict[str, tuple[Any, Any]]:
    """Factors of a peft-wrapped model, scale folded into B: {module path: (A, B)}."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
            a = m.lora_A[adapter_name].weight.detach()
            b = m.lora_B[adapter_name].weight.detach() * m.scaling[adapter_name]
            path = name.replace("base_model.model.", "")
            out[path] = (a.float().cpu().clone(), b.float().cpu().clone())
    return out


def lora_scale(rank: int, alpha: float) -> float:
    if rank <= 0 or not math.isfinite(alpha) or alpha <= 0:
        raise GroupshotError(f"lora rank {rank} and alpha {alpha} must be positive")
    return alpha / rank
