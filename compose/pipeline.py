"""Group photos: `GroupComposer(request)` renders people laid out by a pose, each person's
adapter acting only in their own region, and writes `renders/<run>/` with render.json.

Methods (`ComposeRequest.method`), all on the same regions and adapters:

- composite: per step one batched UNet call holds, for the background and for every person,
  an unconditional and a conditional branch (that person's adapter, tokens and regional
  prompt; the background has no adapter); each branch pair is guided (CFG) and the
  predictions are blended by the region masks at latent resolution. The pose ControlNet
  runs once per step (unconditional + global prompt) and its residuals are shared.
- masked: one UNet pass (unconditional + conditional); each person's LoRA delta is scaled
  by their mask at every attention layer, and cross-attention reads each region's own
  prompt, blended by the masks (compose.lora).
- merge: the baseline: diffusers' weighted adapter merge (`load_lora_weights` +
  `set_adapters`) in diffusers' own pipeline, every person's words in one prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from personas import (
    DEFAULT_BASE_MODEL, DEFAULT_CONTROLNET, SCHEDULERS, TOOLKIT_VERSION, UNET_TARGETS, GroupshotError, Library,
    Persona, check_lora_fits, load_base_model, load_controlnet, load_embeddings, load_lora, load_scheduler,
    same_base_model, sha256_file, utc_now, validate_name, write_json_atomic,
)

log = logging.getLogger(__name__)

METHODS = ("composite", "masked", "merge")
RENDER_SCHEMA_VERSION = 1
RENDER_FILE = "render.json"
POSE_IMAGE, POSE_KEYPOINTS, MASK_OVERLAY, MASKS = "pose.png", "pose.json", "masks.png", "masks.npz"
RENDER_KEYS = (
    "schema_version", "toolkit_version", "created_at", "request", "base_model", "controlnet", "people",
    "global_prompt_for_clip", "images", "pose_image", "mask_overlay", "masks", "device", "dtype", "timing",
)


# -- the request ---------------------------------------------------------------------------


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ComposeRequest:
    """What to render. Checked on construction; `GroupComposer.prepare` checks it against the
    library, the pose and the base model, all before any model is loaded."""

    people: list[str] = _help("persona names, in the pose's left-to-right order unless `assign` says otherwise")
    prompt: str = _help("the scene, e.g. 'two men at a beach bar'; each person's words are added to their own region")
    person_prompts: dict[str, str] = _help("extra words for one person's region, e.g. {'brad': 'white shirt'}", default_factory=dict)
    negative_prompt: str = _help("what to steer away from (the unconditional branch)", default="")
    method: str = _help(f"how adapters are kept apart: {', '.join(METHODS)}", default="composite")
    pose: str | None = _help("template name, OpenPose JSON, skeleton image or photo; None for one person without a pose", default=None)
    assign: dict[str, int] | None = _help("pin people to skeletons (0 = leftmost), e.g. {'leo': 0, 'brad': 1}", default=None)
    size: tuple[int, int] = _help("(width, height) in pixels, multiples of 8", default=(512, 512))
    steps: int = _help("denoising steps", default=30)
    guidance: float = _help("classifier-free guidance scale (1 turns guidance off)", default=7.5)
    controlnet_scale: float = _help("strength of the pose ControlNet", default=1.0)
    seed: int = _help("seed of the first image; image i uses seed + i", default=0)
    num_images: int = _help("how many images", default=1)
    scheduler: str | None = _help(f"sampler: {', '.join(SCHEDULERS)}; None keeps the model's own", default=None)
    out: str = _help("folder that receives the run folder", default="renders")

    def __post_init__(self) -> None:
        if isinstance(self.people, str) or not isinstance(self.people, (list, tuple)) or not self.people:
            raise GroupshotError(f"--people {self.people!r}: give one or more persona names, e.g. brad,leo")
        self.people = [validate_name(n) for n in self.people]
        dup = sorted({n for n in self.people if self.people.count(n) > 1})
        if dup:
            raise GroupshotError(f"--people names {', '.join(dup)} twice; each person appears once")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise GroupshotError("--prompt is empty; describe the scene, e.g. --prompt 'two people at a beach bar'")
        self.person_prompts = dict(self.person_prompts or {})
        for name, text in self.person_prompts.items():
            if name not in self.people:
                raise GroupshotError(f"--person-prompt {name}=...: {name} is not in --people ({', '.join(self.people)})")
            if not isinstance(text, str):
                raise GroupshotError(f"--person-prompt {name}={text!r}: expected text")
        if not isinstance(self.negative_prompt, str):
            raise GroupshotError(f"--negative-prompt {self.negative_prompt!r}: expected text")
        if self.method not in METHODS:
            raise GroupshotError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.pose is not None:
            self.pose = str(self.pose)
        elif len(self.people) > 1:
            raise GroupshotError(
                f"--people names {len(self.people)} people but no --pose is given; a group needs a pose "
                "(a template such as two_standing, a skeleton image, OpenPose JSON or a photo)"
            )
        if self.assign is not None:
            if self.pose is None:
                raise GroupshotError("--assign needs --pose (it pins people to the pose's skeletons)")
            self.assign = dict(self.assign)
        try:
            width, height = (int(v) for v in self.size)
        except (TypeError, ValueError):
            raise GroupshotError(f"--size {self.size!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise GroupshotError(f"--size {width}x{height}: width and height must be positive multiples of 8, e.g. 512x512")
        self.size = (width, height)
        for name, minimum in (("steps", 1), ("num_images", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise GroupshotError(f"--{name.replace('_', '-')} {value!r}: must be a whole number >= {minimum}")
        if self.seed + self.num_images > 2**63:
            raise GroupshotError(f"--seed {self.seed}: too large; use a seed below 2**63 - num_images")
        for name, minimum in (("guidance", 1.0), ("controlnet_scale", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
                raise GroupshotError(f"--{name.replace('_', '-')} {value!r}: must be a number >= {minimum:g}")
            setattr(self, name, float(value))
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise GroupshotError(f"--scheduler {self.scheduler}: choose one of {', '.join(SCHEDULERS)}")
        self.out = str(self.out)

    def to_json(self) -> dict[str, Any]:
        """The request as render.json records it (without `out`: where, not what)."""
        d = dataclasses.asdict(self)
        d.pop("out")
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any], *, out: str = "renders", source: str = RENDER_FILE) -> "ComposeRequest":
        known = {f.name for f in dataclasses.fields(cls)} - {"out"}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise GroupshotError(f"{source}: request is missing {', '.join(missing)}; the file is damaged")
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("%s: ignoring unknown request keys %s (written by a newer groupshot?)", source, unknown)
        return cls(**{k: v for k, v in data.items() if k in known}, out=out)


# -- prompts -------------------------------------------------------------------------------


def person_words(persona: Persona) -> str:
    """What stands for the person in a prompt, with only the first learned token: diffusers'
    `maybe_convert_prompt` expands `<name>` to all of `<name> <name>_1 ...` itself."""
    words = persona.prompt_words()
    for token in persona.tokens[1:]:
        words = re.sub(rf"\s*{re.escape(token)}(?![\w-])", "", words)
    return " ".join(words.split())


def mentions(prompt: str, persona: Persona) -> bool:
    """Does `prompt` name this persona by its (first) token?"""
    return bool(persona.tokens) and re.search(_token_pattern(persona), prompt) is not None


def _token_pattern(persona: Persona) -> str:
    # The first token, any of its other tokens right after it, and the class word if it follows.
    first, rest = persona.tokens[0], persona.tokens[1:]
    pattern = re.escape(first) + "".join(rf"(?:\s+{re.escape(t)})?" for t in rest) + r"(?![\w-])"
    return pattern + rf"(?:\s+{re.escape(persona.class_word)}\b)?"


def with_class_words(prompt: str, personas: list[Persona]) -> str:
    """`prompt` with each persona's tokens (and the class word after them) replaced by its
    class word: what a CLIP score reads, and what one person's region sees of the others."""
    for persona in personas:
        if persona.tokens:
            prompt = re.sub(_token_pattern(persona), persona.class_word, prompt)
    return prompt


def region_prompt(persona: Persona, person_prompt: str, prompt: str, others: list[Persona]) -> str:
    """`<words>, <person prompt>, <scene>`: the person's words (unless the scene names them
    already), their own extra words, and the scene with everyone else's tokens replaced by
    class words (no one's identity tokens act in another's region)."""
    lead = [] if mentions(prompt, persona) else [person_words(persona)]
    return ", ".join(p.strip() for p in [*lead, person_prompt, with_class_words(prompt, others)] if p.strip())


def merged_prompt(personas: list[Persona], person_prompts: dict[str, str], prompt: str) -> str:
    """The merge baseline's single prompt: every person's words and extra words, then the scene."""
    parts = []
    for persona in personas:
        if not mentions(prompt, persona):
            parts.append(person_words(persona))
        parts.append(person_prompts.get(persona.name, ""))
    return ", ".join(p.strip() for p in [*parts, prompt] if p.strip())


# -- plan and result -----------------------------------------------------------------------


@dataclass
class RenderPlan:
    """A checked request with everything resolved that needs no model."""

    request: ComposeRequest
    personas: list[Persona]         # in request.people order
    pose: Any                       # compose.poses.Pose on the request's canvas, or None
    skeletons: list[int] | None     # per person, the skeleton index in `pose`
    regions: Any                    # compose.regions.Regions, people in request.people order
    region_prompts: list[str]       # per person, the prompt of their region
    merged_prompt: str              # the merge baseline's prompt
    prompt_for_clip: str            # the scene with persona tokens replaced by class words
    base_model: dict[str, Any]      # identity record of the base model to use
    controlnet: dict[str, Any] | None

    @functools.cached_property
    def pose_image(self) -> Any:
        """The skeleton image the ControlNet sees (PIL), or None."""
        from compose.poses import draw_pose

        return None if self.pose is None else draw_pose(self.pose)


@dataclass
class RenderResult:
    run_dir: Path
    images: list[Path]
    record: dict[str, Any]  # render.json


# -- the composer --------------------------------------------------------------------------


class GroupComposer:
    """Renders a `ComposeRequest`. Models load on the first render, after the request has been
    checked; they stay loaded for the next."""

    def __init__(self, base_model: str, controlnet: str, *, device: Any = None, dtype: Any = None,
                 library: Library | str | os.PathLike | None = None, cuda_graph: bool = True):
        self.cuda_graph = cuda_graph  # replay each denoising step's network calls as one CUDA graph
        self.base_model_spec = str(base_model)
        self.controlnet_spec = str(controlnet)
        self.library = library if isinstance(library, Library) else Library(library)
        self._device, self._dtype = device, dtype
        self._base_folder: Path | None = None
        self._base_identity: dict[str, Any] | None = None
        self._controlnet_identity: dict[str, Any] | None = None
        self._base: Any = None
        self._controlnet: Any = None
        self._pipes: dict[str, Any] = {}
        self._tokens: dict[str, str | None] = {}  # first token -> sha256 of the embeddings loaded for it

    @classmethod
    def from_pretrained(cls, base_model: str = DEFAULT_BASE_MODEL, controlnet: str = DEFAULT_CONTROLNET, *,
                        device: Any = None, dtype: Any = None,
                        library: Library | str | os.PathLike | None = None,
                        cuda_graph: bool = True) -> "GroupComposer":
        """A composer for a base model and OpenPose ControlNet (hub ids or local folders).

        device/dtype default to cuda + float16 where CUDA is available, else cpu + float32.
        `library` is a persona Library or its folder (default ./people or $GROUPSHOT_LIBRARY).
        """
        return cls(base_model, controlnet, device=device, dtype=dtype, library=library, cuda_graph=cuda_graph)

    def __call__(self, request: ComposeRequest) -> RenderResult:
        """Check, load the models (once), render every image, write `<out>/<run>/` whole."""
        plan = self.prepare(request)
        self._load(controlnet=plan.pose is not None)
        return self._write_run(plan)

    # -- checks (no model) ----------------------------------------------------------------

    def prepare(self, request: ComposeRequest) -> RenderPlan:
        """Check `request` against the library, the pose and the base model; load no model."""
        import numpy as np

        from compose.poses import assign_people, load_pose
        from compose.regions import Regions, regions_from_pose

        if not isinstance(request, ComposeRequest):
            raise TypeError(f"expected a ComposeRequest, got {type(request).__name__}")
        personas = [self.library.load(name) for name in request.people]
        base = self.base_identity()
        for persona in personas:
            if not same_base_model(persona.base_model, base):
                theirs = persona.base_model.get("id")
                if theirs == base.get("id"):  # same name, other weights
                    theirs = f"{theirs} (sha256 {str(persona.base_model.get('sha256'))[:12]}, now {str(base.get('sha256'))[:12]})"
                raise GroupshotError(
                    f"persona {persona.name!r} was trained on base model {theirs!r} but --base-model is "
                    f"{base.get('id')!r}; render with the persona's base model or re-train the persona on this one"
                )
        width, height = request.size
        if request.pose is None:
            # One person without a pose: plain personalized generation, the person everywhere.
            pose, skeletons = None, None
            regions = Regions(np.ones((1, height, width), np.float32), np.zeros((height, width), np.float32), [])
        else:
            pose = load_pose(request.pose, size=(width, height))
            skeletons = assign_people(pose, request.people, request.assign)
            regions = regions_from_pose(pose)
            regions = Regions(regions.people[skeletons], regions.background, [regions.heads[i] for i in skeletons])
        controlnet = self.controlnet_identity() if pose is not None else None
        prompts = [
            region_prompt(p, request.person_prompts.get(p.name, ""), request.prompt, [q for q in personas if q is not p])
            for p in personas
        ]
        return RenderPlan(
            request=request, personas=personas, pose=pose, skeletons=skeletons, regions=regions,
            region_prompts=prompts, merged_prompt=merged_prompt(personas, request.person_prompts, request.prompt),
            prompt_for_clip=with_class_words(request.prompt, personas), base_model=base, controlnet=controlnet,
        )

    def base_identity(self) -> dict[str, Any]:
        """{"id", "revision", "sha256"} of the base model, from its files (no weights loaded)."""
        if self._base_identity is None:
            # personas exports no "identity without loading" yet: these three are its internals.
            from personas.models import SINGLE_FILE_SUFFIXES, _fingerprint, resolve_model_folder

            path = Path(self.base_model_spec).expanduser()
            if path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file():
                self._base_identity = {"id": str(path.resolve()), "revision": None, "sha256": sha256_file(path)}
            else:
                self._base_folder, identity = resolve_model_folder(self.base_model_spec)
                identity["sha256"] = _fingerprint(self._base_folder / "unet", "diffusion_pytorch_model*.safetensors")
                self._base_identity = identity
        return self._base_identity

    def controlnet_identity(self) -> dict[str, Any]:
        if self._controlnet_identity is None:
            from personas.models import _fingerprint, resolve_model_folder

            folder, identity = resolve_model_folder(self.controlnet_spec, what="ControlNet", subfolder_check="config.json")
            identity["sha256"] = _fingerprint(folder, "diffusion_pytorch_model*.safetensors")
            self._controlnet_identity = identity
        return self._controlnet_identity

    # -- models ---------------------------------------------------------------------------

    @property
    def device(self) -> Any:
        import torch

        if self._device is None or isinstance(self._device, str):
            self._device = torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return self._device

    @property
    def dtype(self) -> Any:
        import torch

        if self._dtype is None:
            self._dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        elif isinstance(self._dtype, str):
            self._dtype = getattr(torch, self._dtype.removeprefix("torch."))
        return self._dtype

    def _load(self, *, controlnet: bool) -> None:
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

        if self._base is None:
            self._base = load_base_model(self.base_model_spec, dtype=self.dtype, device=self.device)
            self._base_identity = self._base.identity
            parts = dict(self._base.components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self._pipes["plain"] = StableDiffusionPipeline(**parts)
        if controlnet and self._controlnet is None:
            self._controlnet, self._controlnet_identity = load_controlnet(
                self.controlnet_spec, dtype=self.dtype, device=self.device
            )
            parts = dict(self._base.components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self._pipes["pose"] = StableDiffusionControlNetPipeline(**parts, controlnet=self._controlnet)
        for pipe in self._pipes.values():
            pipe.set_progress_bar_config(unit="step", leave=False)

    def _scheduler(self, name: str | None) -> Any:
        """A fresh scheduler for one image (schedulers keep per-image state)."""
        if self._base_folder is None:
            if name is not None:
                raise GroupshotError(f"--scheduler {name}: a single-file base model has only its own scheduler; omit --scheduler")
            return type(self._base.scheduler).from_config(self._base.scheduler.config)
        return load_scheduler(self._base_folder, name)

    def _load_tokens(self, persona: Persona) -> None:
        """The persona's learned tokens in the tokenizer and text encoder (kept for later renders)."""
        import torch

        if persona.embeddings_path is None:
            return
        first = persona.tokens[0]
        if self._tokens.get(first) == persona.embeddings_sha256:
            return
        pipe = self._pipes["plain"]
        table = pipe.text_encoder.get_input_embeddings().weight
        emb = load_embeddings(persona.embeddings_path, dim=table.shape[1])
        names = [first] + [f"{first}_{i}" for i in range(1, len(emb))]
        if first in self._tokens:
            # Another persona of this name was loaded before (re-trained, other library): same
            # token names, new vectors.
            ids = pipe.tokenizer.convert_tokens_to_ids(names)
            if len(ids) != len(emb) or pipe.tokenizer.unk_token_id in ids:
                raise GroupshotError(
                    f"persona {persona.name!r}: its token count changed since it was loaded; start a new composer"
                )
            with torch.no_grad():
                table[ids] = emb.to(table.device, table.dtype)
        else:
            try:
                pipe.load_textual_inversion(str(persona.embeddings_path), token=first)
            except ValueError as e:
                raise GroupshotError(f"persona {persona.name!r}: its token {first} cannot be added ({e})") from None
        self._tokens[first] = persona.embeddings_sha256

    def _adapter(self, persona: Persona) -> Any:
        """The persona's LoRA (checked against the loaded model), or None."""
        if persona.adapter_path is None:
            return None
        weights = load_lora(persona.adapter_path)
        source = f"persona {persona.name!r} ({persona.adapter_path})"
        check_lora_fits(weights, self._base.unet, self._base.text_encoder, source=source)
        grouped = {f"{attn}.{t}" for attn, layers in weights.attention_layers().items() for t in layers}
        other = sorted(set(weights.unet) - grouped)
        if other:
            raise GroupshotError(
                f"{source}: LoRA on {other[0]} ({len(other)} such layers); compose applies LoRA per region only "
                f"on attention {', '.join(UNET_TARGETS)}: re-train the persona with those targets"
            )
        return weights

    # -- rendering ------------------------------------------------------------------------

    def generate(self, plan: RenderPlan, seeds: list[int], *, output_type: str = "pil") -> list[Any]:
        """Images (PIL) or final latents (1, 4, h, w) for `plan`, one per seed."""
        return list(self.iter_images(plan, seeds, output_type=output_type))

    def iter_images(self, plan: RenderPlan, seeds: list[int], *, output_type: str = "pil") -> Iterator[Any]:
        """`generate`, one image at a time (adapters are set up once for all seeds)."""
        import torch

        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type {output_type!r}: expected 'pil' or 'latent'")
        self._load(controlnet=plan.pose is not None)
        for persona in plan.personas:
            self._load_tokens(persona)
        adapters = [self._adapter(p) for p in plan.personas]
        labels = [f"image {k + 1}/{len(seeds)}" for k in range(len(seeds))]
        # no_grad around each call, never around a yield (it would leak into the caller).
        if plan.request.method == "merge":
            with self._merged(plan, adapters) as pipe:
                for seed, label in zip(seeds, labels):
                    with torch.no_grad():
                        image = self._generate_merge(pipe, plan, seed, output_type, label)
                    yield image
            return
        from compose.lora import RegionalLora

        regional = RegionalLora(
            self._base.unet, [a.attention_layers() if a is not None else None for a in adapters],
            device=self.device, dtype=self.dtype,
        )
        with torch.no_grad():
            inputs = self._regional_inputs(plan, adapters)
        with regional.installed():
            predict = self._noise_predictor(plan, inputs, regional)
            for seed, label in zip(seeds, labels):
                with torch.no_grad():
                    image = self._denoise(plan, predict, seed, output_type, label)
                yield image

    def _regional_inputs(self, plan: RenderPlan, adapters: list[Any]) -> "_RegionalInputs":
        """Branches (background if it shows, then every person), their text, the pose image."""
        import numpy as np
        import torch

        from compose.lora import text_encoder_lora

        request, pipe = plan.request, self._pipes["plain"]
        guided = request.guidance > 1
        negative = request.negative_prompt or None
        has_background = bool(plan.regions.background.max() > 0)
        branch_person = ([None] if has_background else []) + list(range(len(plan.personas)))
        branch_prompt = ([request.prompt] if has_background else []) + plan.region_prompts

        def encode(prompt: str, person: int | None) -> tuple[Any, Any]:
            # The person's text-encoder LoRA acts on their own prompt (and its negative) only.
            layers = None
            if person is not None and adapters[person] is not None:
                layers = {k: (a.to(self.device, self.dtype), b.to(self.device, self.dtype))
                          for k, (a, b) in adapters[person].text_encoder.items()}
            with text_encoder_lora(pipe.text_encoder, layers):
                cond, uncond = pipe.encode_prompt(prompt, self.device, 1, guided, negative)  # (1, 77, C) each
            return uncond, cond

        pairs = [encode(prompt, person) for prompt, person in zip(branch_prompt, branch_person)]
        global_pair = encode(request.prompt, None)
        if guided:
            row_text = torch.cat([u for u, _ in pairs] + [c for _, c in pairs])  # (2R, 77, C): uncond rows, cond rows
            region_text = torch.stack([torch.cat(pair) for pair in pairs])  # (R, 2, 77, C)
            global_text = torch.cat(global_pair)  # (2, 77, C)
        else:
            row_text = torch.cat([c for _, c in pairs])  # (R, 77, C)
            region_text = torch.stack([c for _, c in pairs])  # (R, 1, 77, C)
            global_text = global_pair[1]  # (1, 77, C)

        def masks_at(h: int, w: int) -> Any:
            small = plan.regions.resized(h, w)
            layers = ([small.background[None]] if has_background else []) + [small.people]
            return torch.from_numpy(np.concatenate(layers)).to(self.device, self.dtype)  # (R, h, w)

        control = None
        if plan.pose is not None:
            control = self._pipes["pose"].prepare_image(
                image=plan.pose_image, width=request.size[0], height=request.size[1], batch_size=1,
                num_images_per_prompt=1, device=self.device, dtype=self._controlnet.dtype,
                do_classifier_free_guidance=guided, guess_mode=False,
            )  # (2, 3, H, W), or (1, ...) without guidance
        return _RegionalInputs(branch_person, row_text, region_text, global_text, masks_at, control, guided)

    def _noise_predictor(self, plan: RenderPlan, inputs: "_RegionalInputs", regional: Any) -> Callable[[Any, Any], Any]:
        """The guided, region-blended noise prediction for (scaled latents, t) by the composite
        or masked method: the ControlNet once, then the UNet; on a GPU, replayed as a graph."""
        import torch

        request, unet = plan.request, self._base.unet
        width, height = request.size
        factor = self._pipes["plain"].vae_scale_factor
        latent_size = (height // factor, width // factor)
        branches = len(inputs.branch_person)
        pairs = 2 if inputs.guided else 1
        masks = inputs.masks_at(*latent_size).unsqueeze(1)  # (R, 1, h, w), summing to 1 over R
        if request.method == "composite":
            regional.use_rows(inputs.branch_person * pairs)
            # Row i of the UNet batch takes the ControlNet residuals of its (uncond, cond) pair.
            residual_rows = torch.arange(pairs, device=self.device).repeat_interleave(branches)  # (pairs * R,)
        else:
            regional.use_masks(inputs.masks_at, inputs.branch_person, inputs.region_text, latent_size)

        def predict(scaled: Any, t: Any) -> Any:
            residuals = {}
            if inputs.control is not None:
                # The pose ControlNet once per step, on the unconditional + global prompt.
                down, mid = self._controlnet(
                    scaled.repeat(pairs, 1, 1, 1), t, encoder_hidden_states=inputs.global_text,
                    controlnet_cond=inputs.control, conditioning_scale=request.controlnet_scale,
                    guess_mode=False, return_dict=False,
                )  # down: [(pairs, C_i, h_i, w_i)], mid: (pairs, C, h/4, w/4)
                if request.method == "composite":
                    down, mid = [d[residual_rows] for d in down], mid[residual_rows]
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)

            if request.method == "composite":
                # One batch: every branch's uncond row, then every branch's cond row.
                noise = unet(scaled.repeat(pairs * branches, 1, 1, 1), t, encoder_hidden_states=inputs.row_text,
                             **residuals, return_dict=False)[0]  # (pairs * R, 4, h, w)
                if inputs.guided:
                    uncond, cond = noise.chunk(2)  # (R, 4, h, w) each
                    noise = uncond + request.guidance * (cond - uncond)
                return (masks * noise).sum(0, keepdim=True)  # (1, 4, h, w): each region from its branch
            # One pass; the processors scale each LoRA by its mask and read each region's prompt.
            noise = unet(scaled.repeat(pairs, 1, 1, 1), t, encoder_hidden_states=inputs.global_text,
                         **residuals, return_dict=False)[0]  # (pairs, 4, h, w)
            if inputs.guided:
                uncond, cond = noise.chunk(2)  # (1, 4, h, w) each
                noise = uncond + request.guidance * (cond - uncond)
            return noise

        if self.cuda_graph and self.device.type == "cuda":
            return _GraphedCall(predict)
        return predict

    def _denoise(self, plan: RenderPlan, predict: Callable[[Any, Any], Any], seed: int,
                 output_type: str, label: str) -> Any:
        """One image: the scheduler's loop around `predict`, then the VAE."""
        import torch
        from tqdm.auto import tqdm

        request, pipe, unet = plan.request, self._pipes["plain"], self._base.unet
        width, height = request.size
        generator = torch.Generator("cpu").manual_seed(seed)
        scheduler = pipe.scheduler = self._scheduler(request.scheduler)
        scheduler.set_timesteps(request.steps, device=self.device)
        extra_step = pipe.prepare_extra_step_kwargs(generator, 0.0)
        latents = pipe.prepare_latents(1, unet.config.in_channels, height, width, self.dtype, self.device, generator)  # (1, 4, h, w)
        for t in tqdm(scheduler.timesteps, desc=label, unit="step", leave=False):
            scaled = scheduler.scale_model_input(latents, t)  # (1, 4, h, w)
            noise = predict(scaled, t)  # (1, 4, h, w)
            latents = scheduler.step(noise, t, latents, **extra_step, return_dict=False)[0]  # (1, 4, h, w)

        if output_type == "latent":
            return latents
        vae = self._base.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]  # (1, 3, H, W)
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]

    @contextlib.contextmanager
    def _merged(self, plan: RenderPlan, adapters: list[Any]) -> Iterator[Any]:
        """diffusers' own pipeline with every persona's LoRA merged at weight 1 (the baseline)."""
        pipe = self._pipes["pose" if plan.pose is not None else "plain"]
        names = [p.name for p, a in zip(plan.personas, adapters) if a is not None]
        try:
            with warnings.catch_warnings():
                # peft's note that a second adapter joins the first: that is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                for persona, adapter in zip(plan.personas, adapters):
                    if adapter is not None:
                        pipe.load_lora_weights(str(persona.adapter_path), adapter_name=persona.name)
            if names:
                pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
            yield pipe
        finally:
            if names:
                pipe.unload_lora_weights()

    def _generate_merge(self, pipe: Any, plan: RenderPlan, seed: int, output_type: str, label: str) -> Any:
        import torch

        request = plan.request
        pipe.scheduler = self._scheduler(request.scheduler)
        pipe.set_progress_bar_config(desc=label, unit="step", leave=False)
        kwargs = dict(
            prompt=plan.merged_prompt, negative_prompt=request.negative_prompt or None,
            width=request.size[0], height=request.size[1], num_inference_steps=request.steps,
            guidance_scale=request.guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
        )
        if plan.pose is not None:
            kwargs.update(image=plan.pose_image, controlnet_conditioning_scale=request.controlnet_scale)
        images = pipe(**kwargs).images
        return images if output_type == "latent" else images[0]

    # -- output ---------------------------------------------------------------------------

    def _write_run(self, plan: RenderPlan) -> RenderResult:
        """Render every image into a hidden folder beside the run, then rename it into place."""
        import numpy as np

        request = plan.request
        for persona in plan.personas:  # a broken adapter or embedding fails before anything is written
            self._load_tokens(persona)
            self._adapter(persona)
        out = Path(request.out)
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f".run-{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            names = list(request.people)
            pose_image = plan.pose_image
            if pose_image is not None:
                pose_image.save(staging / POSE_IMAGE)
                write_json_atomic(staging / POSE_KEYPOINTS, _pose_keypoints(plan.pose))
            plan.regions.overlay(pose_image, names).save(staging / MASK_OVERLAY)
            np.savez_compressed(staging / MASKS, people=plan.regions.people, background=plan.regions.background,
                                names=np.array(names))
            seeds = [request.seed + i for i in range(request.num_images)]
            images, started = [], time.perf_counter()
            with contextlib.closing(self.iter_images(plan, seeds)) as rendered:
                for i, (seed, image) in enumerate(zip(seeds, rendered)):
                    file = f"{i:03d}.png"
                    image.save(staging / file, format="PNG")
                    images.append({"file": file, "seed": seed, "sha256": sha256_file(staging / file)})
            seconds = (time.perf_counter() - started) / len(seeds)
            record = self._record(plan, images, seconds, has_pose=pose_image is not None)
            write_json_atomic(staging / RENDER_FILE, record)
            run_dir = _rename_into_place(staging, out, _run_name(request))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return RenderResult(run_dir, [run_dir / im["file"] for im in images], record)

    def _record(self, plan: RenderPlan, images: list[dict], seconds: float, *, has_pose: bool) -> dict[str, Any]:
        request = plan.request
        width, height = request.size
        people = []
        for p, persona in enumerate(plan.personas):
            people.append({
                "name": persona.name,
                "skeleton": plan.skeletons[p] if plan.skeletons is not None else None,
                "tokens": list(persona.tokens),
                "class_word": persona.class_word,
                "prompt": plan.merged_prompt if request.method == "merge" else plan.region_prompts[p],
                "adapter_sha256": persona.adapter_sha256,
                "embeddings_sha256": persona.embeddings_sha256,
                "persona_created_at": persona.created_at,
                "box": _mask_box(plan.regions.people[p]) if has_pose else [0, 0, width, height],
                "head_box": [round(float(v), 2) for v in plan.regions.heads[p]] if plan.regions.heads else None,
            })
        return {
            "schema_version": RENDER_SCHEMA_VERSION,
            "toolkit_version": TOOLKIT_VERSION,
            "created_at": utc_now(),
            "request": request.to_json(),
            "base_model": dict(plan.base_model),
            "controlnet": dict(plan.controlnet) if plan.controlnet is not None else None,
            "people": people,
            "global_prompt_for_clip": plan.prompt_for_clip,
            "images": images,
            "pose_image": POSE_IMAGE if has_pose else None,
            "mask_overlay": MASK_OVERLAY,
            "masks": MASKS,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "timing": {"seconds_per_image": round(seconds, 4)},
        }


class _GraphedCall:
    """`fn(scaled, t)` captured once as a CUDA graph and replayed with new inputs.

    A denoising step is a few thousand small kernels; launched one by one from Python they
    leave the GPU idle most of the time. Two eager warm-up calls (on a side stream, as
    capture requires) fill the lazy caches (region masks, cuBLAS handles); then one capture,
    and every later call copies its inputs into the captured tensors and replays.
    """

    def __init__(self, fn: Callable[[Any, Any], Any], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graph = self.inputs = self.output = None

    def __call__(self, scaled: Any, t: Any) -> Any:
        import torch

        if not torch.is_tensor(t):
            t = torch.tensor(t, device=scaled.device)
        if self.warmup > 0:
            self.warmup -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn(scaled, t)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.inputs = (scaled.clone(), t.clone())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.fn(*self.inputs)
        self.inputs[0].copy_(scaled)
        self.inputs[1].copy_(t)
        self.graph.replay()
        return self.output.clone()


@dataclass
class _RegionalInputs:
    """What the composite and masked loops need, computed once for all images of a plan."""

    branch_person: list[int | None]  # per branch (region): the person, None for the background
    row_text: Any     # composite: (pairs * R, 77, C), uncond rows then cond rows
    region_text: Any  # masked: (R, pairs, 77, C)
    global_text: Any  # the ControlNet's (and masked UNet's) (pairs, 77, C): negative, scene prompt
    masks_at: Any     # (h, w) -> (R, h, w) region weights at that size
    control: Any      # pose image (pairs, 3, H, W) or None
    guided: bool


# -- replay, preview, records --------------------------------------------------------------


def read_render(path: str | os.PathLike) -> dict[str, Any]:
    """A render.json (schema v1): fail on missing keys or a newer schema, warn on unknown keys."""
    path = Path(path)
    if path.is_dir():
        path = path / RENDER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GroupshotError(f"{path}: no such render.json; give renders/<run>/render.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GroupshotError(f"{path}: not a readable render.json ({type(e).__name__}: {e})".split("\n")[0]) from None
    if not isinstance(data, dict):
        raise GroupshotError(f"{path}: not a render.json (expected a JSON object)")
    missing = [k for k in RENDER_KEYS if k not in data]
    if missing:
        raise GroupshotError(f"{path}: missing keys {', '.join(missing)}; the file is damaged or not a render.json")
    version = data["schema_version"]
    if not isinstance(version, int) or version > RENDER_SCHEMA_VERSION:
        raise GroupshotError(f"{path}: schema_version {version!r} is newer than this groupshot reads ({RENDER_SCHEMA_VERSION}); upgrade groupshot")
    unknown = sorted(set(data) - set(RENDER_KEYS))
    if unknown:
        log.warning("%s: ignoring unknown keys %s (written by a newer groupshot?)", path, unknown)
    return data


def replay(render_json: str | os.PathLike, *, out: str | os.PathLike = "renders",
           library: Library | str | os.PathLike | None = None, device: Any = None) -> RenderResult:
    """Render a run again from its render.json: same request, models, adapters, pose and
    seeds, so on the same device the images come out bit for bit the same."""
    path = Path(render_json)
    record = read_render(path)
    run_dir = path.parent if path.name == RENDER_FILE else path
    request = ComposeRequest.from_json(record["request"], out=str(out), source=str(path))
    if request.pose is not None and (run_dir / POSE_KEYPOINTS).is_file():
        # The exact keypoints the run used, even if the original pose file moved or changed.
        request.pose = str(run_dir / POSE_KEYPOINTS)
    base, controlnet = record["base_model"], record["controlnet"] or {}
    composer = GroupComposer.from_pretrained(
        base["id"], controlnet.get("id", DEFAULT_CONTROLNET), device=device, dtype=record["dtype"], library=library,
    )
    plan = composer.prepare(request)
    if not same_base_model(plan.base_model, base):
        raise GroupshotError(f"{path}: base model {base['id']!r} has changed since the run (sha256 differs); cannot replay")
    recorded = {p["name"]: p for p in record["people"]}
    for persona in plan.personas:
        was = recorded.get(persona.name, {})
        for key in ("adapter_sha256", "embeddings_sha256"):
            if was.get(key) != getattr(persona, key):
                raise GroupshotError(
                    f"{path}: persona {persona.name!r} has changed since the run ({key} {str(getattr(persona, key))[:12]} "
                    f"!= {str(was.get(key))[:12]}); replay needs the same adapter"
                )
    composer._load(controlnet=plan.pose is not None)
    return composer._write_run(plan)


def preview_pose(pose: str, *, size: tuple[int, int] = (512, 512), people: list[str] | None = None,
                 assign: dict[str, int] | None = None, out: str | os.PathLike = "renders") -> Path:
    """Write the skeleton (pose.png) and the mask overlay (masks.png) of a pose, no model.

    With `people`, the masks are labelled with their names (and the count is checked).
    """
    from compose.poses import assign_people, draw_pose, load_pose
    from compose.regions import regions_from_pose

    size = ComposeRequest(people=["preview"], prompt="preview", size=size).size  # the same size checks
    loaded = load_pose(pose, size=size)
    regions = regions_from_pose(loaded)
    if people:
        order = assign_people(loaded, list(people), assign)
        names = [""] * len(order)
        for name, index in zip(people, order):
            names[index] = name
    else:
        names = [str(i) for i in range(len(loaded.people))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".run-{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        skeleton = draw_pose(loaded)
        skeleton.save(staging / POSE_IMAGE)
        regions.overlay(skeleton, names).save(staging / MASK_OVERLAY)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return _rename_into_place(staging, out, f"{stamp}-preview-{_slug(Path(str(pose)).stem)}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _pose_keypoints(pose: Any) -> dict[str, Any]:
    """OpenPose JSON with the keypoints at full precision (load_pose reads it back exactly)."""
    people = [{"pose_keypoints_2d": [float(v) for v in person.reshape(-1)]} for person in pose.people]
    return {"canvas_width": pose.width, "canvas_height": pose.height, "people": people}


def _mask_box(mask: Any) -> list[int] | None:
    import numpy as np

    ys, xs = np.nonzero(mask >= 0.5)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _slug(text: str, limit: int = 24) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for word in words:
        if len(slug) + len(word) + 1 > limit:
            break
        slug = f"{slug}-{word}" if slug else word
    return slug or "run"


def _run_name(request: ComposeRequest) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug('-'.join(request.people) + ' ' + request.prompt)}"


def _rename_into_place(staging: Path, out: Path, name: str) -> Path:
    """Rename the finished folder to out/name (name-2, name-3, ... if taken): the run appears whole."""
    for n in range(1, 1000):
        final = out / (name if n == 1 else f"{name}-{n}")
        if final.exists():
            continue
        try:
            os.rename(staging, final)  # fails if another process created `final` meanwhile
            return final
        except OSError:
            if not final.exists():
                raise
    raise GroupshotError(f"{out}: too many runs named {name}; choose another --out")


