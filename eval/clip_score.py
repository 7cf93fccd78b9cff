"""CLIP text-image score with open_clip: cosine between L2-normalised image and text embeddings.

The course's CLIP Score (bands 0.20 / 0.25 / 0.30) is this cosine; torchmetrics' CLIPScore
is `max(100 * cosine, 0)` (`torchmetrics_scale`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from personas.errors import GroupshotError, ModelUnavailableError
from personas.library import sha256_file

__all__ = [
    "ClipScorer",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "torchmetrics_scale",
]

log = logging.getLogger(__name__)

# OpenAI CLIP ViT-B/32: the model whose cosines the course's bands fit (DreamBooth's and
# Textual Inversion's CLIP-T, ~0.30 for a good image, and FastComposer's CLIPEvaluator
# default). FastComposer's paper numbers use ViT-L/14, whose cosines for the same pair run
# ~0.03-0.05 lower: pick it with --clip-model ViT-L-14 --clip-pretrained openai and read
# the bands with that in mind.
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"


def torchmetrics_scale(cosine: np.ndarray | float) -> np.ndarray | float:
    """torchmetrics' CLIPScore scale: max(100 * cosine, 0)."""
    if np.isscalar(cosine):
        return max(100.0 * float(cosine), 0.0)
    return np.maximum(100.0 * np.asarray(cosine, dtype=np.float64), 0.0)


def _fix_hint(model: str, pretrained: str | None) -> str:
    return (
        f"fetch them once where there is network (`python -c \"import open_clip; "
        f"open_clip.create_model('{model}', pretrained='{pretrained}')\"`) and copy the Hugging Face cache "
        "(~/.cache/huggingface) here, or pass a checkpoint with --clip-pretrained FILE (OpenAI weights "
        "from a file need the -quickgelu architecture, e.g. --clip-model ViT-B-32-quickgelu)"
    )


@dataclass(eq=False)
class ClipScorer:
    """An open_clip model that scores images against texts.

    model: an open_clip architecture name (`ViT-B-32`, `ViT-L-14`, ...) or
      `local-dir:FOLDER` (open_clip_config.json + weights, as open_clip's hub exports are).
    pretrained: an open_clip tag for `model` (`openai`, `laion2b_s34b_b79k`, ...) or a
      checkpoint file; ignored for `local-dir:`. Random weights are refused: a CLIP score
      from them means nothing.
    """

    model: str = DEFAULT_CLIP_MODEL
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    device: str = "cpu"
    batch_size: int = 16
    _net: Any = field(init=False, repr=False, default=None)
    _preprocess: Any = field(init=False, repr=False, default=None)
    _tokenizer: Any = field(init=False, repr=False, default=None)
    _record: dict = field(init=False, repr=False, default_factory=dict)
    _text_cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise GroupshotError(f"CLIP batch size must be >= 1, got {self.batch_size}")
        self._load()

    # -- loading --------------------------------------------------------------------------
    def _load(self) -> None:
        import open_clip
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

        name, pretrained = self.model, self.pretrained
        kwargs: dict[str, Any] = {}
        weights_file: str | None = None
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):])
            if not (folder / "open_clip_config.json").is_file():
                raise GroupshotError(
                    f"--clip-model {name}: {folder} has no open_clip_config.json; give a folder "
                    "exported by open_clip (config + weights) or an architecture name like ViT-B-32"
                )
            found = sorted(p for ext in ("safetensors", "bin", "pth") for p in folder.glob(f"*.{ext}"))
            # open_clip would build a random model from a folder without weights, and pick
            # one of several silently; either way the report could not say what scored.
            if len(found) != 1:
                raise ModelUnavailableError(
                    f"--clip-model {name}: expected one checkpoint (*.safetensors, *.bin, *.pth) in "
                    f"{folder}, found {len(found)}; keep exactly one next to open_clip_config.json"
                )
            weights_file = str(found[0])
            _refuse_pickle(Path(weights_file), f"--clip-model {name}")
            pretrained = None  # open_clip picks the folder's checkpoint itself
        elif name.startswith("hf-hub:"):
            pretrained = None  # open_clip reads config and weights from the hub (or its cache)
        else:
            arch = name.replace("/", "-")
            if arch not in open_clip.list_models():
                near = [m for m in open_clip.list_models() if m.lower().startswith(arch.lower()[:5])][:8]
                raise GroupshotError(
                    f"--clip-model {name!r} is not an open_clip architecture"
                    f" (similar: {', '.join(near) or 'none'}); see open_clip.list_models()"
                )
            if not pretrained:
                raise GroupshotError(
                    f"--clip-pretrained is empty for {name}: a CLIP score needs trained weights; "
                    f"give a tag ({DEFAULT_CLIP_PRETRAINED}, ...) or a checkpoint file"
                )
            tag_cfg = get_pretrained_cfg(arch, pretrained)
            if tag_cfg:
                # open_clip 3 only warns when a tag trained with QuickGELU (all OpenAI
                # weights) is put into a GELU config; the embeddings would be wrong.
                kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
                try:
                    weights_file = download_pretrained(tag_cfg)
                except Exception as e:  # offline, not cached, hub error: all mean "not here"
                    log.debug("download of %s/%s failed: %s", name, pretrained, e)
                    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
                    raise ModelUnavailableError(
                        f"CLIP weights {name}/{pretrained} are not on this machine and could not be "
                        f"downloaded{offline}; {_fix_hint(name, pretrained)}"
                    ) from None
            elif Path(pretrained).is_file():
                _refuse_pickle(Path(pretrained), "--clip-pretrained")
                weights_file = pretrained
            else:
                tags = list_pretrained_tags_by_model(arch)
                raise GroupshotError(
                    f"--clip-pretrained {pretrained!r} is neither a file nor a tag of {name} "
                    f"(tags: {', '.join(tags[:8]) or 'none'}{', ...' if len(tags) > 8 else ''})"
                )
        # open_clip narrates every step with logging.info on the root logger; keep its
        # warnings, not the narration.
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=self.device, **kwargs
            )
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, OSError, KeyError, TypeError, ValueError) as e:  # KeyError etc.: a damaged config
            raise ModelUnavailableError(
                f"CLIP model {name} ({pretrained or 'folder weights'}) could not be loaded: "
                f"{' '.join(str(e).split())[:200]}; {_fix_hint(name, pretrained)}"
            ) from None
        finally:
            root.setLevel(level)
        net.eval()
        self._net, self._preprocess, self._tokenizer = net, preprocess, tokenizer
        self._record = {
            "model": name,
            "pretrained": pretrained if pretrained else None,
            "weights_file": None if weights_file is None else Path(weights_file).name,
            "weights_sha256": None if weights_file is None else sha256_file(weights_file),
            "quick_gelu": bool(kwargs.get("force_quick_gelu", False)),
            "image_size": list(np.atleast_1d(net.visual.image_size).tolist()),
            "open_clip_version": open_clip.__version__,
            "device": self.device,
            "score": "cosine(image, text) of L2-normalised CLIP embeddings; "
            "torchmetrics scale = max(100 * cosine, 0)",
        }
        log.info("CLIP model %s (%s) loaded", name, pretrained or weights_file)

    def describe(self) -> dict:
        """What was used, for reports: model, pretrained tag/file, weights sha256, versions."""
        return dict(self._record)

    # -- embeddings -----------------------------------------------------------------------
    def image_embeddings(self, images: Sequence[Any]) -> np.ndarray:
        """(N, D) float32 unit-norm embeddings of PIL images (any mode; converted to RGB)."""
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self._preprocess(im.convert("RGB")) for im in images[i:i + self.batch_size]])
            with torch.no_grad():
                emb = self._net.encode_image(batch.to(self.device))
            out.append(_normalise(emb))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 unit-norm embeddings; each distinct text is encoded once per scorer."""
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            with torch.no_grad():
                emb = _normalise(self._net.encode_text(self._tokenizer(chunk).to(self.device)))
            self._text_cache.update(zip(chunk, emb))
        if not texts:
            return np.zeros((0, 0), np.float32)
        return np.stack([self._text_cache[t] for t in texts])

    def score(self, images: Sequence[Any], texts: Sequence[str] | str) -> np.ndarray:
        """Cosine per image against its text (one text per image, or one text for all)."""
        if isinstance(texts, str):
            texts = [texts] * len(images)
        if len(texts) != len(images):
            raise GroupshotError(f"CLIP score: {len(images)} images but {len(texts)} texts; give one text per image")
        img = self.image_embeddings(images)
        txt = self.text_embeddings(list(texts))
        return np.einsum("nd,nd->n", img.astype(np.float64), txt.astype(np.float64))


def _refuse_pickle(path: Path, what: str) -> None:
    from personas import PICKLE_SUFFIXES

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise GroupshotError(
            f"{what}: {path} is a pickle ({path.suffix}), which can run code when loaded; groupshot reads "
            "CLIP weights given as files only from .safetensors: convert it with a trusted tool"
        )


def _normalise(emb) -> np.ndarray:
    emb = emb.float().cpu().numpy()
    return (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float32)
