"""Hyperparameter sweeps (`evaluate sweep`): train one persona per setting, render a fixed
prompt set with and without it, score everything, pick the best variant, write one report.

The course asks for at least three comparison groups with the learning rate always among
the varied settings; a sweep is resumable (trained personas, finished renders are kept).

Best-variant rule (`choose_best`): among the variants with a face distance (some face was
assigned), keep those whose CLIP score is within CLIP_MARGIN (0.02) of the best CLIP score;
of those, the lowest face distance (compared to 3 decimals, the table's precision) wins,
then the fewest faceless images, then the higher CLIP score, then sweep order. If no
variant has any face, the fewest faceless images, then the highest CLIP score.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from personas import (
    GroupshotError, Library, TrainConfig, TOOLKIT_VERSION, unfinished_run, utc_now, validate_name,
    write_json_atomic,
)

from eval.report import SweepTable, check_output_dir, write_report
from eval.scoring import default_prompts, fill_prompt, score_images, score_renders, subject_phrase

if TYPE_CHECKING:
    from eval.scoring import Scores

__all__ = ["SweepSpec", "Variant", "SweepResult", "run_sweep", "choose_best", "GRID_FIELDS", "DEFAULT_LEARNING_RATES"]

log = logging.getLogger(__name__)

SWEEP_SCHEMA_VERSION = 1
DEFAULT_LEARNING_RATES = (5e-5, 1e-4, 5e-4)
CLIP_MARGIN = 0.02
MIN_GROUPS = 3  # the course: at least three comparison groups
# TrainConfig fields a sweep may vary -> their tag in variant names (NAME-lr1e-04-r16).
GRID_FIELDS = {"learning_rate": "lr", "lora_rank": "r", "lora_alpha": "a", "max_train_steps": "s", "num_tokens": "t"}
METRICS = ["face_distance", "clip_score", "faceless_images", "match_rate", "final_loss"]
GRID_PROMPTS = 8  # prompts shown in the base-vs-variants figure
GRID_TILE = 160  # px


def _tag(value: float | int, *, exponent: bool = False) -> str:
    """A value as a name-safe tag: 1e-4 -> '1e-04', 2.5e-4 -> '2p5e-04', 16 -> '16', 0.5 -> '0p5'."""
    if exponent:
        mantissa, exp = f"{float(value):.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa.replace('.', 'p')}e{exp}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:g}".replace(".", "p")


@dataclass
class Variant:
    name: str  # the persona it trains: NAME-lr1e-04-r16
    params: dict[str, Any]  # the grid's values for this variant
    config: TrainConfig


@dataclass
class SweepSpec:
    """What a sweep trains and renders. Checked on construction, before any model loads."""

    name: str = field(metadata={"help": "the person; each variant is a persona NAME-lr<lr>[-r<rank>...]"})
    photos: list[str] = field(metadata={"help": "photo files or folders of the person"})
    grid: dict[str, list] = field(metadata={"help": "TrainConfig field -> values; learning_rate always varies"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "settings shared by every variant"})
    prompts: list[str] = field(default_factory=default_prompts, metadata={"help": "prompt templates; {person} is the subject"})
    num_images: int = field(default=1, metadata={"help": "images per prompt (seeds seed, seed+1, ...)"})
    render_steps: int = field(default=30, metadata={"help": "denoising steps per image"})
    guidance: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    seed: int = field(default=0, metadata={"help": "seed of each prompt's first image"})
    negative_prompt: str = field(default="", metadata={"help": "negative prompt of every image"})

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not self.photos:
            raise GroupshotError("no photos given: pass photo files or folders after the sweep's NAME")
        missing = [str(p) for p in self.photos if not Path(p).exists()]
        if missing:
            raise GroupshotError(f"photos not found: {', '.join(missing)}")
        unknown = sorted(set(self.grid) - set(GRID_FIELDS))
        if unknown:
            raise GroupshotError(f"sweep over {', '.join(unknown)}: a sweep varies {', '.join(GRID_FIELDS)}")
        self.grid = {k: list(self.grid[k]) for k in GRID_FIELDS if k in self.grid}  # a fixed order
        self.grid.setdefault("learning_rate", list(DEFAULT_LEARNING_RATES))
        self.grid = {"learning_rate": self.grid.pop("learning_rate"), **self.grid}
        for key, values in self.grid.items():
            if not values:
                raise GroupshotError(f"sweep over {key}: give at least one value")
            if len(set(values)) != len(values):
                raise GroupshotError(f"sweep over {key}: values {values} repeat; give each once")
        if len(self.grid["learning_rate"]) < 2:
            raise GroupshotError(f"--lr {self.grid['learning_rate'][0]:g}: the learning rate must vary; give at least "
                                 f"two values (the course compares {MIN_GROUPS} or more), e.g. --lr 5e-5,1e-4,5e-4")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise GroupshotError("the prompt set is empty; give --prompts FILE with one prompt per line")
        for name, minimum in (("num_images", 1), ("render_steps", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise GroupshotError(f"--{name.replace('_', '-')} {value!r}: must be a whole number >= {minimum}")
        if not math.isfinite(self.guidance) or self.guidance < 1:
            raise GroupshotError(f"--guidance {self.guidance!r}: must be a number >= 1")
        self.variants()  # every variant's TrainConfig is checked now

    def variants(self) -> list[Variant]:
        """Every combination of the grid (the learning rate varies slowest)."""
        out = []
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)):
            params = dict(zip(keys, values))
            tags = [f"{GRID_FIELDS[k]}{_tag(v, exponent=k == 'learning_rate')}" for k, v in params.items()]
            name = "-".join([self.name, *tags])
            if len(name) > 64:
                raise GroupshotError(f"sweep NAME {self.name!r} is too long for its variant names ({name}); shorten it")
            config = TrainConfig.from_dict({**self.train.to_dict(), **params}, source=f"sweep variant {name}")
            out.append(Variant(validate_name(name), params, config))
        return out

    def render_settings(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "num_images": self.num_images, "steps": self.render_steps,
                "guidance": self.guidance, "seed": self.seed, "negative_prompt": self.negative_prompt,
                "size": [self.train.resolution, self.train.resolution], "class_word": self.train.class_word}


@dataclass
class SweepResult:
    report: Path
    best: str | None
    rows: list[dict[str, Any]]
    trained: list[str]  # variants trained (or resumed) by this call; the others were already there
    work: Path


# ---------------------------------------------------------------------------------------
# the rule


def choose_best(rows: Sequence[dict[str, Any]], *, clip_margin: float = CLIP_MARGIN) -> tuple[str | None, str]:
    """(name of the best row, the reason in words); see the module docstring for the rule."""
    if not rows:
        return None, "no variants"
    order = {r["name"]: i for i, r in enumerate(rows)}
    with_face = [r for r in rows if r["face_distance"] is not None]
    if not with_face:
        best = min(rows, key=lambda r: (r["faceless_images"], -(r["clip_score"] or -math.inf), order[r["name"]]))
        return best["name"], "no variant showed a face the face model could assign; fewest faceless images, then CLIP"
    clips = [r["clip_score"] for r in with_face if r["clip_score"] is not None]
    eligible = with_face
    reason = "lowest face distance"
    if clips:
        top = max(clips)
        eligible = [r for r in with_face if r["clip_score"] is not None and r["clip_score"] >= top - clip_margin]
        reason = f"lowest face distance among the variants with CLIP >= {top - clip_margin:.3f} (best {top:.3f} - {clip_margin})"
    best = min(eligible, key=lambda r: (round(r["face_distance"], 3), r["faceless_images"],
                                        -(r["clip_score"] if r["clip_score"] is not None else -math.inf),
                                        order[r["name"]]))
    return best["name"], reason


RULE_TEXT = (f"Best variant: among the variants with a face distance, those whose CLIP score is within {CLIP_MARGIN} "
             "of the best CLIP score; of these the lowest face distance (to 3 decimals), then the fewest faceless "
             "images, then the higher CLIP score.")


# ---------------------------------------------------------------------------------------
# the run


def run_sweep(spec: SweepSpec, *, library: Library | str | os.PathLike | None = None,
              work: str | os.PathLike | None = None, out: str | os.PathLike = "report",
              face_model: str = "arcface", clip_model: str | None = None, clip_pretrained: str | None = None,
              device: str | None = None, title: str | None = None, progress: bool = True) -> SweepResult:
    """Train, render and score every variant of `spec`, and write the report to `out`.

    Resumable: a variant whose persona is in the library with the same settings is not
    trained again (an unfinished one continues from its checkpoint), and renders whose
    settings and adapter are unchanged are kept. Scoring is redone each time (it is cheap),
    so a new face or CLIP model applies to every variant.
    """
    from personas import load_face_backend

    from eval.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ClipScorer

    lib = library if isinstance(library, Library) else Library(library)
    work = Path(work) if work is not None else Path("sweeps") / spec.name
    out = check_output_dir(out)
    variants = spec.variants()
    # -- checks, before anything trains ---------------------------------------------------
    for v in variants:
        if lib.exists(v.name):
            have = lib.load(v.name, verify=False).hyperparameters
            wanted = v.config.to_dict()
            if have != wanted:
                diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
                raise GroupshotError(
                    f"persona {v.name!r} is already in {lib.root} with other settings ({', '.join(diff[:4])}); "
                    f"remove it (`personas remove {v.name}`) or give the sweep another NAME"
                )
    if len(variants) < MIN_GROUPS:
        log.warning("%d variants: the course asks for at least %d comparison groups", len(variants), MIN_GROUPS)
    work.mkdir(parents=True, exist_ok=True)
    _write_state(work, spec, variants, {})
    # The scorers load before training: a missing face pack or CLIP checkpoint should stop
    # the sweep now, not after hours of training.
    face_backend = load_face_backend(face_model)
    clip = ClipScorer(clip_model or DEFAULT_CLIP_MODEL,
                      DEFAULT_CLIP_PRETRAINED if clip_pretrained is None else clip_pretrained, device=_clip_device(device))

    # -- train --------------------------------------------------------------------------------
    from personas import train_persona

    status: dict[str, str] = {}
    trained = []
    for i, v in enumerate(variants):
        if lib.exists(v.name):
            status[v.name] = "kept"
            log.info("variant %d/%d %s: already trained, kept", i + 1, len(variants), v.name)
            continue
        unfinished = unfinished_run(lib, v.name)
        resume = unfinished is not None and unfinished[1].to_dict() == v.config.to_dict()
        log.info("variant %d/%d %s: training%s", i + 1, len(variants), v.name,
                 f" (resuming at step {unfinished[0]})" if resume else "")
        train_persona(v.name, None if resume else spec.photos, v.config, library=lib, resume=resume,
                      restart=unfinished is not None and not resume, progress=progress)
        status[v.name] = "trained"
        trained.append(v.name)
        _write_state(work, spec, variants, status)

    # -- render: the base model once, then every variant -------------------------------------
    from compose import GroupComposer

    composer = GroupComposer.from_pretrained(spec.train.base_model, device=device, library=lib)
    base_files = _render_base(spec, work / "base", composer)
    runs = {v.name: _render_variant(spec, v, work / "renders" / v.name, composer, lib) for v in variants}
    del composer

    # -- score, choose, report -----------------------------------------------------------------
    scores = {v.name: score_renders(runs[v.name], library=lib, face_backend=face_backend, clip=clip) for v in variants}
    rows = [_row(v, scores[v.name], lib) for v in variants]
    best, reason = choose_best(rows)
    texts = [t for t in _base_prompts(spec) for _ in range(spec.num_images)]  # one per base image
    base = score_images(base_files, [best], texts, library=lib, face_backend=face_backend, clip=clip)
    grid = _comparison_grid(spec, variants, scores, base, work / "grid.png")
    note = " ".join([
        RULE_TEXT, f"Chosen: {best} ({reason}).",
        f"Base model without a persona: face distance {_fmt(base.metrics.face_distance.value)}, "
        f"CLIP {_fmt(base.metrics.clip_score.value)}, faceless {base.metrics.faceless_images.value} "
        f"of {len(base.images)} images.",
        f"Each variant renders {len(spec.prompts)} prompts x {spec.num_images} image(s), {spec.render_steps} steps, "
        f"guidance {spec.guidance:g}, seeds from {spec.seed}; the base model renders the same with the class word.",
        *([f"Only {len(variants)} variants: the course asks for at least {MIN_GROUPS} comparison groups."]
          if len(variants) < MIN_GROUPS else []),
    ])
    table = SweepTable(
        parameters=list(spec.grid), metrics=METRICS, rows=rows, title=f"Hyperparameter sweep: {spec.name}",
        best=best, note=note,
        curves={v.name: _curve(scores[v.name], v.name) for v in variants},
        grid=str(grid) if grid is not None else None,
    )
    report = write_report(scores[best], out, base=base, sweep=table,
                          title=title or f"groupshot sweep: {spec.name} (best: {best})")
    _write_state(work, spec, variants, status, rows=rows, best=best, report=str(out))
    return SweepResult(report=report, best=best, rows=rows, trained=trained, work=work)


def _clip_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_state(work: Path, spec: SweepSpec, variants: list[Variant], status: dict[str, str], **extra: Any) -> None:
    """sweep.json: what the sweep is and how far it got (for people; the library and the
    renders' own records are what resuming reads)."""
    write_json_atomic(work / "sweep.json", {
        "schema_version": SWEEP_SCHEMA_VERSION, "toolkit_version": TOOLKIT_VERSION, "updated_at": utc_now(),
        "name": spec.name, "photos": [str(p) for p in spec.photos], "grid": spec.grid,
        "train": spec.train.to_dict(), "render": spec.render_settings(),
        "variants": [{"name": v.name, "params": v.params, "status": status.get(v.name, "pending")} for v in variants],
        **extra,
    })


def _base_prompts(spec: SweepSpec) -> list[str]:
    """The prompt set with the class word for the subject: what the base model renders."""
    return [fill_prompt(t, subject_phrase(spec.train.class_word)) for t in spec.prompts]


def _render_base(spec: SweepSpec, folder: Path, composer: Any) -> list[Path]:
    """The base model's images of the prompt set (no persona), `pPPP-III.png`, rendered once.

    The same sampler, seeds, steps and guidance as the variants: compose's one-person
    composite path equals plain diffusers with the adapter, so these are the pairs' "without".
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from personas import load_base_model

    settings = {**spec.render_settings(), "base_model": composer.base_identity()}
    key = _key(settings)
    record = folder / "base.json"
    names = [f"p{p:03d}-{i:03d}.png" for p in range(len(spec.prompts)) for i in range(spec.num_images)]
    if record.is_file() and json.loads(record.read_text()).get("key") == key and all((folder / n).is_file() for n in names):
        log.info("base model images: kept (%d)", len(names))
        return [folder / n for n in names]
    shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = load_base_model(spec.train.base_model, dtype=composer.dtype, device=composer.device)
    pipe = StableDiffusionPipeline(**base.components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = spec.train.resolution
    log.info("base model images: rendering %d", len(names))
    for p, prompt in enumerate(_base_prompts(spec)):
        for i in range(spec.num_images):
            with torch.no_grad():
                image = pipe(prompt, negative_prompt=spec.negative_prompt or None, width=size, height=size,
                             num_inference_steps=spec.render_steps, guidance_scale=spec.guidance,
                             generator=torch.Generator("cpu").manual_seed(spec.seed + i)).images[0]
            image.save(tmp / f"p{p:03d}-{i:03d}.png")
    write_json_atomic(tmp / "base.json", {"key": key, "settings": settings, "prompts": _base_prompts(spec),
                                          "device": str(composer.device), "dtype": str(composer.dtype)})
    os.replace(tmp, folder)
    del pipe, base
    return [folder / n for n in names]


def _render_variant(spec: SweepSpec, v: Variant, folder: Path, composer: Any, lib: Library) -> list[Path]:
    """One compose run per prompt (one person, no pose), kept while settings and adapter hold."""
    from compose import ComposeRequest

    persona = lib.load(v.name)
    settings = {**spec.render_settings(), "adapter_sha256": persona.adapter_sha256,
                "embeddings_sha256": persona.embeddings_sha256, "persona_created_at": persona.created_at}
    key = _key(settings)
    record = folder / "runs.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        dirs = [folder / d for d in saved.get("runs", [])]
        if saved.get("key") == key and len(dirs) == len(spec.prompts) and all((d / "render.json").is_file() for d in dirs):
            log.info("%s: renders kept (%d prompts)", v.name, len(dirs))
            return dirs
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # A persona with tokens is named in the prompt ("a <eileen> woman ..."); a plain LoRA's
    # trigger words are put in front of the prompt by compose itself.
    subject = subject_phrase(persona.prompt_words() if persona.tokens else persona.class_word)
    size = (spec.train.resolution, spec.train.resolution)
    log.info("%s: rendering %d prompts x %d", v.name, len(spec.prompts), spec.num_images)
    dirs = []
    for template in spec.prompts:
        request = ComposeRequest(people=[v.name], prompt=fill_prompt(template, subject), negative_prompt=spec.negative_prompt,
                                 size=size, steps=spec.render_steps, guidance=spec.guidance, seed=spec.seed,
                                 num_images=spec.num_images, out=str(folder))
        dirs.append(composer(request).run_dir)
    write_json_atomic(record, {"key": key, "settings": settings, "runs": [d.name for d in dirs]})
    return dirs


def _row(v: Variant, scores: Scores, lib: Library) -> dict[str, Any]:
    m = scores.metrics
    persona = lib.load(v.name, verify=False)
    return {
        "name": v.name, **v.params,
        "face_distance": m.face_distance.value, "clip_score": m.clip_score.value,
        "faceless_images": m.faceless_images.value, "match_rate": m.counts["match_rate"],
        "final_loss": persona.extra.get("final_loss"),
        "images": m.counts["readable_images"], "points": m.total_points,
        "train_seconds": persona.extra.get("train_seconds"), "persona": str(persona.path),
    }


def _curve(scores: Scores, name: str) -> list[list[float]]:
    summary = scores.personas.get(name)
    curve = summary.losses() if summary is not None else None
    return [] if curve is None else [[float(s), float(l)] for s, l in zip(*curve)]


def _comparison_grid(spec: SweepSpec, variants: list[Variant], scores: dict[str, Scores], base: Scores,
                     path: Path) -> Path | None:
    """Base model and every variant side by side for the first prompts (first image each),
    each tile labelled with its face distance and CLIP score."""
    from PIL import Image, ImageDraw, ImageOps

    from personas import open_photo

    n_prompts = min(len(spec.prompts), GRID_PROMPTS)
    columns = [("base model", base)] + [(v.name, scores[v.name]) for v in variants]
    tile, label_h, head_h, left = GRID_TILE, 26, 30, 200
    sheet = Image.new("RGB", (left + len(columns) * (tile + 6), head_h + n_prompts * (tile + label_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (title, _) in enumerate(columns):
        draw.text((left + c * (tile + 6) + 2, 4), title[:28], fill=(0, 0, 0))
        if title == "base model" or len(title) <= 28:
            continue
        draw.text((left + c * (tile + 6) + 2, 16), title[28:56], fill=(0, 0, 0))
    for p in range(n_prompts):
        y = head_h + p * (tile + label_h + 6)
        words = spec.prompts[p].split()
        lines, line = [], ""
        for w in words:  # wrap the prompt into the left margin
            if len(line) + len(w) + 1 > 30:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:6]):
            draw.text((4, y + 4 + 12 * k), text, fill=(40, 40, 40))
        for c, (_, s) in enumerate(columns):
            index = p * spec.num_images
            if index >= len(s.images):
                continue
            im = s.images[index]
            x = left + c * (tile + 6)
            try:
                pic = ImageOps.contain(open_photo(im.path), (tile, tile))
                sheet.paste(pic, (x + (tile - pic.width) // 2, y + (tile - pic.height) // 2))
            except (GroupshotError, OSError):
                draw.text((x + 4, y + tile // 2), "unreadable", fill=(150, 0, 0))
            dist = next((r.distance for r in s.people if r.image == im.key), None)
            draw.text((x + 2, y + tile + 2), f"d={_fmt(dist)} CLIP={_fmt(im.clip_score)}", fill=(0, 0, 0))
            if im.faceless:
                draw.text((x + 2, y + tile + 13), "faceless", fill=(180, 60, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
