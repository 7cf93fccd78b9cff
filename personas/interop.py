"""Adapters in and out of other tools: kohya-layout LoRA files (AUTOMATIC1111, ComfyUI,
SD.Next, kohya's scripts, Civitai) and WebUI textual-inversion embeddings.

`export_persona` writes a persona's LoRA in the kohya layout and its learned tokens as a
WebUI embedding; `import_persona` turns an external SD1.x LoRA (kohya or diffusers layout)
and/or embedding into a persona that compose and evaluate use like a trained one. Key
names are converted by diffusers' own converters; files are read only from safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from personas.adapters import (
    EMBEDDINGS_KEY, TEXT_TARGETS, UNET_TARGETS, LoraWeights, _check_safetensors_path, _read_safetensors,
    _write_safetensors,
    check_lora_fits, load_embeddings, load_lora, save_embeddings, save_lora,
)
from personas.errors import GroupshotError
from personas.library import (
    ADAPTER_FILE, EMBEDDINGS_FILE, Library, Persona, sha256_file, utc_now, validate_name, write_json_atomic,
)
from personas.version import TOOLKIT_VERSION

log = logging.getLogger(__name__)

FORMATS = ("kohya",)
KOHYA_UNET_PREFIX = "lora_unet_"
# kohya's sd-scripts name SD1.x text-encoder layers lora_te_*; lora_te1_/lora_te2_ are SDXL's two encoders.
KOHYA_TEXT_PREFIX = "lora_te_"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# What a LoRA file of another kind holds, so that it is named rather than half-loaded.
FOREIGN_KEYS = {
    "hada_w1_a": "a LyCORIS LoHa file", "lokr_w1": "a LyCORIS LoKr file", "lokr_w2": "a LyCORIS LoKr file",
    "dora_scale": "a DoRA file (diffusers would drop its magnitude vectors and change the result)",
    "lora_magnitude_vector": "a DoRA file", ".diff": "a full-weight difference, not a LoRA",
    "oft_blocks": "an OFT file", "lora_te2_": "an SDXL LoRA (second text encoder); groupshot uses SD1.x",
    "lora_B.bias": "a LoRA with bias terms",
}


# -- export ----------------------------------------------------------------------------------


def lora_to_kohya(weights: LoraWeights) -> dict[str, Any]:
    """Our LoRA (scale folded into B) as a kohya state dict: lora_down/lora_up/alpha per layer.

    alpha = rank everywhere, so every kohya reader's scale alpha/rank is 1, as in our files.
    """
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft = {}
    for key, t in weights.state_dict().items():
        # kohya names the text encoder's layers as transformers 4 did (text_model.encoder...);
        # transformers 5's CLIPTextModel drops the text_model level.
        if key.startswith("text_encoder.") and not key.startswith("text_encoder.text_model."):
            key = "text_encoder.text_model." + key[len("text_encoder."):]
        peft[key] = t.float().contiguous()
    out = {}
    for key, t in convert_state_dict_to_kohya(peft).items():
        key = key.replace("lora_te1_", KOHYA_TEXT_PREFIX, 1)
        if key.endswith(".alpha"):
            t = torch.tensor(float(t), dtype=torch.float32)  # kohya writes a float scalar
        out[key] = t.contiguous()
    return out


@dataclass
class Exported:
    lora: Path | None
    embedding: Path | None
    usage: list[str]


def export_persona(persona: Persona, out: str | os.PathLike | None = None, *, format: str = "kohya",
                   overwrite: bool = False) -> Exported:
    """Write `persona` for other tools: the LoRA at `out` (kohya layout) and, for ti/pivotal,
    the token embedding beside it as `<stem>-emb.safetensors` (WebUI layout, emb_params).

    A ti persona has no LoRA: its embedding goes to `out` itself.
    """
    if format not in FORMATS:
        raise GroupshotError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    out = Path(out) if out is not None else Path(f"{persona.name}.safetensors")
    if out.suffix.lower() != ".safetensors":
        raise GroupshotError(f"--out {out}: exported files are .safetensors; name it e.g. {out.with_suffix('.safetensors').name}")
    if out.is_dir():
        raise GroupshotError(f"--out {out}: is a folder; give a file name, e.g. {out / (persona.name + '.safetensors')}")
    persona.verify_files()
    lora_out = out if persona.adapter_path is not None else None
    emb_out = None
    if persona.embeddings_path is not None:
        emb_out = out.with_name(f"{out.stem}-emb.safetensors") if lora_out is not None else out
    targets = [p for p in (lora_out, emb_out) if p is not None]
    if not overwrite:
        taken = [str(p) for p in targets if p.exists()]
        if taken:
            raise GroupshotError(f"{taken[0]} exists; pass --force to replace it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    trigger = persona.prompt_words()
    meta = {
        "groupshot_persona": persona.name, "groupshot_version": TOOLKIT_VERSION,
        "groupshot_base_model": json.dumps(persona.base_model), "groupshot_trigger": trigger,
    }
    usage = []
    if lora_out is not None:
        weights = load_lora(persona.adapter_path)
        rank = weights.rank
        kohya_meta = {
            **meta, "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": "sd_v1", "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
            "modelspec.title": persona.name, "modelspec.date": persona.created_at,
            "modelspec.trigger_phrase": trigger,
        }
        _save_atomic(lambda p: _write_safetensors(p, lora_to_kohya(weights), kohya_meta), lora_out)
    if emb_out is not None:
        emb = load_embeddings(persona.embeddings_path)
        emb_meta = {**meta, "tokens": json.dumps(persona.tokens)}
        _save_atomic(lambda p: _write_safetensors(p, {EMBEDDINGS_KEY: emb.float().contiguous()}, emb_meta), emb_out)
    # How each tool names the files: A1111 by file name (LoRA as <lora:NAME:1>, an embedding
    # by its bare name), ComfyUI's embeddings as embedding:NAME.
    webui_words = f"{emb_out.stem} {persona.class_word}" if emb_out is not None else trigger
    if lora_out is not None:
        usage.append(f"AUTOMATIC1111 / SD.Next: copy {lora_out.name} to models/Lora"
                     + (f" and {emb_out.name} to embeddings/" if emb_out else "")
                     + f"; prompt \"<lora:{lora_out.stem}:1> a photo of {webui_words}\"")
    elif emb_out is not None:
        usage.append(f"AUTOMATIC1111 / SD.Next: copy {emb_out.name} to embeddings/; prompt \"a photo of {webui_words}\"")
    comfy = [f"LoraLoader with {lora_out.name} (strength 1.0)"] if lora_out else []
    if emb_out is not None:
        comfy.append(f"{emb_out.name} in models/embeddings, prompt \"a photo of embedding:{emb_out.stem} {persona.class_word}\"")
    else:
        comfy.append(f"prompt \"a photo of {trigger}\"")
    usage.append("ComfyUI: " + "; ".join(comfy))
    usage.append(f"diffusers: pipe.load_lora_weights(\"{lora_out or ''}\")" if lora_out else
                 f"diffusers: pipe.load_textual_inversion(\"{emb_out}\", token=\"{persona.tokens[0]}\")")
    if lora_out and emb_out:
        usage[-1] += f"; pipe.load_textual_inversion(\"{emb_out}\", token=\"{persona.tokens[0]}\")"
    return Exported(lora=lora_out, embedding=emb_out, usage=usage)


def _save_atomic(write, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- import: reading other layouts -------------------------------------------------------------


@dataclass
class ImportedLora:
    weights: LoraWeights
    format: str                      # "kohya" | "diffusers"
    rank: int
    alpha: float | None              # the file's alpha where one value serves every layer
    dropped: list[str] = field(default_factory=list)  # UNet layers left out (--attention-only)


def _foreign(keys: Sequence[str], path: Path) -> None:
    for key in keys:
        for marker, what in FOREIGN_KEYS.items():
            if marker in key:
                raise GroupshotError(f"{path}: key {key!r} shows {what}; groupshot imports plain SD1.x LoRA only")


def _fold_alphas(tensors: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[float]]:
    """Multiply each layer's up/B factor by alpha/rank and drop the alpha keys."""
    out = dict(tensors)
    alphas = []
    for key in [k for k in tensors if k.endswith(".alpha")]:
        stem = key[: -len(".alpha")]
        for down_name, up_name in (("lora_down", "lora_up"), ("lora_A", "lora_B"), ("lora.down", "lora.up")):
            down, up = f"{stem}.{down_name}.weight", f"{stem}.{up_name}.weight"
            if down in tensors and up in tensors:
                break
        else:
            raise GroupshotError(f"{path}: {key} has no LoRA pair ({stem}.lora_down.weight / lora_up.weight)")
        alpha = float(out.pop(key).float().reshape(-1)[0])
        rank = tensors[down].shape[0]
        if not alpha > 0:
            raise GroupshotError(f"{path}: {key} is {alpha}; a LoRA alpha must be positive")
        out[up] = tensors[up].float() * (alpha / rank)
        alphas.append(alpha)
    return out, alphas


def _scale_from_metadata(config: dict[str, Any], module: str) -> float:
    """peft's scale for one layer from a diffusers lora_adapter_metadata LoraConfig."""
    from peft.utils.other import get_pattern_key

    r = config.get("r", 8)
    alpha = config.get("lora_alpha", r)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if rank_pattern:
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), r)
    if alpha_pattern:
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha)
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def read_external_lora(path: str | os.PathLike, unet: Any, text_encoder: Any, *,
                       attention_only: bool = False) -> ImportedLora:
    """A kohya/Civitai or diffusers-layout SD1.x LoRA as our LoraWeights, fitted to `unet` and
    `text_encoder` (which may be weightless skeletons on the meta device).

    UNet layers outside attention (proj_in, ff, resnets) are refused, or left out with
    `attention_only`: compose applies LoRA per region only on to_q/to_k/to_v/to_out.0.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft,
    )

    path = Path(path)
    tensors, meta = _read_safetensors(path, "LoRA")  # refuses pickles, NaN and damaged files
    if not tensors:
        raise GroupshotError(f"{path}: holds no tensors")
    if set(tensors) <= {EMBEDDINGS_KEY} or all(k.startswith("string_to_param") for k in tensors):
        raise GroupshotError(f"{path}: is a textual-inversion embedding, not a LoRA; pass it with --embedding")
    _foreign(list(tensors), path)
    is_kohya = all(k.startswith(KOHYA_PREFIXES) for k in tensors)
    fmt = "kohya" if is_kohya else "diffusers"
    tensors, alphas = _fold_alphas(tensors, path)
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(tensors, unet_config=unet.config)
    except (ValueError, KeyError) as e:
        raise GroupshotError(f"{path}: not a LoRA layout diffusers knows ({' '.join(str(e).split())[:200]})") from None

    if not any(k.startswith(("unet.", "text_encoder.")) for k in converted):
        converted = {f"unet.{k}": v for k, v in converted.items()}  # old attention-processor files: UNet only
    parts: dict[str, dict[str, Any]] = {"unet": {}, "text_encoder": {}}
    for key, t in converted.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise GroupshotError(f"{path}: key {key!r} belongs to neither the UNet nor the text encoder of an SD1.x model")
        parts[prefix][rest] = t
    unet_sd = convert_unet_state_dict_to_peft(parts["unet"]) if parts["unet"] else {}
    text_sd = {}
    if parts["text_encoder"]:
        try:
            text_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(parts["text_encoder"]))
        except ValueError as e:
            raise GroupshotError(f"{path}: text-encoder keys in no layout diffusers knows ({e})") from None
        has_text_model = hasattr(text_encoder, "text_model")
        text_sd = {(k if has_text_model or not k.startswith("text_model.") else k[len("text_model."):]): v
                   for k, v in text_sd.items()}
        if has_text_model:
            text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_sd.items()}

    config = {}
    raw = meta.get(LORA_ADAPTER_METADATA_KEY)
    if raw and not alphas:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            raise GroupshotError(f"{path}: its {LORA_ADAPTER_METADATA_KEY} metadata is not JSON") from None

    weights = LoraWeights(metadata={"imported_from": path.name, "source_format": fmt})
    for prefix, sd, model in (("unet", unet_sd, unet), ("text_encoder", text_sd, text_encoder)):
        pairs: dict[str, dict[str, Any]] = {}
        for key, t in sd.items():
            m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
            if m is None:
                raise GroupshotError(f"{path}: key {prefix}.{key} is not a LoRA factor (lora_A/lora_B weight)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        component = {k.removeprefix(f"{prefix}."): v for k, v in config.items() if k.startswith(f"{prefix}.")}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise GroupshotError(f"{path}: {prefix} layer {module} has lora_{next(iter(ab))} without its pair")
            a, b = ab["A"].float(), ab["B"].float()
            if component:
                b = b * _scale_from_metadata(component, module)
            getattr(weights, prefix)[module] = (a, b)
    if not weights.unet and not weights.text_encoder:
        raise GroupshotError(f"{path}: holds no LoRA layers")

    dropped = [p for p in weights.unet if not any(p.endswith("." + t) for t in UNET_TARGETS)]
    if dropped:
        if not attention_only:
            raise GroupshotError(
                f"{path}: LoRA on {len(dropped)} UNet layers outside attention (e.g. {dropped[0]}); compose applies "
                f"LoRA per region only on attention {', '.join(UNET_TARGETS)}: pass --attention-only to keep only "
                "those (the LoRA then acts somewhat more weakly), or use a LoRA trained on attention only"
            )
        for p in dropped:
            del weights.unet[p]
    for prefix, layers in (("unet", weights.unet), ("text_encoder", weights.text_encoder)):
        for module, (a, b) in layers.items():
            if a.ndim != 2 or b.ndim != 2:
                raise GroupshotError(f"{path}: {prefix} layer {module} has {a.ndim}-D factors; only linear LoRA layers import")
    check_lora_fits(weights, unet, text_encoder, source=str(path))
    ranks = {a.shape[0] for a, _ in [*weights.unet.values(), *weights.text_encoder.values()]}
    alpha = alphas[0] if alphas and len(set(alphas)) == 1 else None
    if config and alpha is None:
        alpha = config.get("unet.lora_alpha", config.get("text_encoder.lora_alpha"))
    return ImportedLora(weights=weights, format=fmt, rank=max(ranks), alpha=alpha, dropped=dropped)


def read_external_embedding(path: str | os.PathLike, dim: int) -> Any:
    """Token vectors (n, dim) from a WebUI/kohya (`emb_params`), A1111 (`string_to_param.*`)
    or diffusers (`{token: vector}`) embedding file."""
    path = Path(path)
    tensors, _ = _read_safetensors(path, "token embeddings")
    keys = sorted(tensors)
    if {"clip_l", "clip_g"} & set(keys):
        raise GroupshotError(f"{path}: an SDXL embedding (clip_l/clip_g); groupshot uses SD1.x")
    if EMBEDDINGS_KEY in tensors:
        emb = tensors[EMBEDDINGS_KEY]
    elif len(keys) == 1:
        emb = tensors[keys[0]]  # string_to_param.* or diffusers' {token: vector}
    else:
        if any(k.endswith((".lora_down.weight", ".lora_A.weight", "lora_B.weight")) for k in keys):
            raise GroupshotError(f"{path}: is a LoRA, not an embedding; pass it as the LoRA file")
        raise GroupshotError(f"{path}: {len(keys)} tensors ({', '.join(keys[:3])}...); an embedding file holds one")
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise GroupshotError(
            f"{path}: embedding of shape {tuple(emb.shape)} does not fit this text encoder (width {dim}); "
            "it was made for another base model (SD2.x embeddings are 1024 wide, SD1.x 768)"
        )
    return emb.float().contiguous()


def trigger_hint(path: str | os.PathLike) -> str:
    """The trigger words a kohya file records (modelspec or its most frequent caption tags), if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return ""
    if meta.get("modelspec.trigger_phrase"):
        return meta["modelspec.trigger_phrase"]
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return ""
    counts: dict[str, int] = {}
    for tags in freq.values() if isinstance(freq, dict) else []:
        for tag, n in (tags.items() if isinstance(tags, dict) else []):
            counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    return ", ".join(sorted(counts, key=counts.get, reverse=True)[:3])


# -- import: the persona -------------------------------------------------------------------------


@dataclass
class ModelSkeleton:
    """A base model's UNet, text encoder and tokenizer for fitting adapters; weightless
    (meta device) when the model is a folder, so an import loads no weights."""

    unet: Any
    text_encoder: Any
    tokenizer: Any  # None unless asked for (reading its 49k-word vocabulary takes a second)
    identity: dict[str, Any]


def model_skeleton(base_model: str, *, tokenizer: bool = False) -> ModelSkeleton:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from personas.models import SINGLE_FILE_SUFFIXES, _fingerprint, load_base_model, resolve_model_folder

    p = Path(base_model).expanduser()
    if p.suffix.lower() in SINGLE_FILE_SUFFIXES and p.is_file():
        base = load_base_model(base_model)
        return ModelSkeleton(base.unet, base.text_encoder, base.tokenizer, base.identity)
    folder, identity = resolve_model_folder(base_model)
    identity["sha256"] = _fingerprint(folder / "unet", "diffusion_pytorch_model*.safetensors")
    try:
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", model_max_length=77) if tokenizer else None
    except (OSError, ValueError) as e:
        raise GroupshotError(f"base model {base_model!r}: cannot read its configs ({str(e).splitlines()[0]})") from None
    return ModelSkeleton(unet, text_encoder, tok, identity)


def import_persona(
    name: str,
    lora: str | os.PathLike | None = None,
    *,
    embedding: str | os.PathLike | None = None,
    token: str | None = None,
    class_word: str = "person",
    base_model: str | None = None,
    refs: Sequence[str | os.PathLike] = (),
    attention_only: bool = False,
    face_model: str = "auto",
    library: Library | None = None,
) -> Persona:
    """Make persona `name` from an external LoRA and/or embedding, committed atomically.

    `token`: with an embedding, the word that stands for it in prompts (default `<name>`);
    with a LoRA only, the trigger words it was trained with. `refs`: photos of the person
    for eval (cropped and checked like training photos); without them eval cannot score
    this persona's faces.
    """
    from personas.models import DEFAULT_BASE_MODEL

    validate_name(name)
    library = library or Library()
    if lora is None and embedding is None:
        raise GroupshotError("nothing to import: give a LoRA file and/or --embedding FILE")
    for f, what in ((lora, "LoRA"), (embedding, "embedding")):
        if f is not None:
            _check_safetensors_path(Path(f), what)
    if not isinstance(class_word, str) or not class_word.strip() or len(class_word.split()) > 3:
        raise GroupshotError(f"--class-word {class_word!r}: give what the person is in a word or two, e.g. man")
    class_word = " ".join(class_word.split())
    if token is not None:
        token = " ".join(str(token).split())
        if not token:
            raise GroupshotError("--token is empty; give the word(s) that call up the person")
    if embedding is None and token is None:
        hint = trigger_hint(lora)
        raise GroupshotError(
            "--token is required with a LoRA only: the trigger word(s) it was trained with (see its model page"
            + (f"; the file's metadata suggests: {hint}" if hint else "") + "), e.g. --token ohwx"
        )
    if embedding is not None:
        token = token or f"<{name}>"
        if len(token.split()) != 1:
            raise GroupshotError(f"--token {token!r}: an embedding's token is one word without spaces, e.g. <{name}>")
    if library.exists(name):
        raise GroupshotError(f"persona {name!r} exists in {library.root}; remove it first (`personas remove {name}`) or pick another name")

    # -- photos first, before any model (fail at the door) -----------------------------------
    photo_report = None
    if refs:
        from personas.faces import load_face_backend
        from personas.photos import check_photos

        backend = None if face_model == "none" else load_face_backend(face_model)
        photo_report = check_photos([Path(p) for p in refs], backend=backend, resolution=512)
        photo_report.require(1)

    skeleton = model_skeleton(base_model or DEFAULT_BASE_MODEL, tokenizer=embedding is not None)
    imported = read_external_lora(lora, skeleton.unet, skeleton.text_encoder, attention_only=attention_only) if lora else None
    emb = None
    tokens: list[str] = []
    if embedding is not None:
        dim = skeleton.text_encoder.config.hidden_size
        emb = read_external_embedding(embedding, dim)
        tokens = [token] + [f"{token}_{i}" for i in range(1, emb.shape[0])]
        vocab = skeleton.tokenizer.get_vocab()
        clash = [t for t in tokens if t in vocab]
        if clash:
            raise GroupshotError(f"--token {token}: {clash[0]} is already a word of the base model's vocabulary; pick another, e.g. <{name}>")
    method = "pivotal" if imported and emb is not None else ("lora" if imported else "ti")

    with library.lock(name):
        staged = library.staging(name)
        try:
            adapter_sha = emb_sha = None
            record: dict[str, Any] = {}
            if imported is not None:
                save_lora(staged / ADAPTER_FILE, imported.weights)
                adapter_sha = sha256_file(staged / ADAPTER_FILE)
                record["lora"] = {"file": Path(lora).name, "sha256": sha256_file(lora), "format": imported.format,
                                  "rank": imported.rank, "alpha": imported.alpha,
                                  "unet_layers": len(imported.weights.unet),
                                  "text_encoder_layers": len(imported.weights.text_encoder),
                                  "dropped_layers": len(imported.dropped)}
            if emb is not None:
                save_embeddings(staged / EMBEDDINGS_FILE, emb, tokens)
                emb_sha = sha256_file(staged / EMBEDDINGS_FILE)
                record["embedding"] = {"file": Path(embedding).name, "sha256": sha256_file(embedding),
                                       "vectors": int(emb.shape[0])}
            photos = []
            if photo_report is not None:
                (staged / "refs").mkdir()
                for i, ph in enumerate(photo_report.accepted):
                    rel = f"refs/{i:03d}.jpg"
                    ph.image.save(staged / rel, quality=95)
                    photos.append({"file": rel, "source": Path(ph.path).name, "sha256": ph.sha256})
                (staged / "train").mkdir()
                write_json_atomic(staged / "train" / "photos.json", {
                    "face_backend": photo_report.face_model,
                    "accepted": photos,
                    "rejected": [{"file": str(r.path), "reason": r.reason} for r in photo_report.rejected],
                })
            persona = Persona(
                name=name, tokens=tokens, class_word=class_word, base_model=skeleton.identity, method=method,
                hyperparameters={"lora_rank": imported.rank if imported else None,
                                 "lora_alpha": imported.alpha if imported else None,
                                 "num_tokens": len(tokens)},
                photos=photos, adapter_sha256=adapter_sha, embeddings_sha256=emb_sha, created_at=utc_now(),
                trigger=f"{token} {class_word}",
                extra={"imported": record},
            )
            return library.commit(name, staged, persona)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
