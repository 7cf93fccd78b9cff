"""`evaluate sweep`: the course's hyperparameter study in one command (parses, calls run_sweep)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

from personas.errors import GroupshotError, OneLineArgumentParser

SWEEP_HELP = """Train one persona per hyperparameter setting, render the prompt set with and without
each, score them (Face Distance, CLIP Score, Faceless Images), pick the best variant and
write one report: the sweep table, metric-vs-setting plots, every variant's loss curve and
base-vs-personalized images.

Variants are personas named NAME-lr<lr>[-r<rank>][-a<alpha>][-s<steps>][-t<tokens>] (one
tag per swept setting) in the library, so they can be composed later. The learning rate
always varies (default 5e-5,1e-4,5e-4: the course asks for at least 3 comparison groups);
every combination of the lists is trained.

Best variant: among the variants with a face distance, those whose CLIP score is within
0.02 of the best CLIP score; of these the lowest face distance (to 3 decimals), then the
fewest faceless images, then the higher CLIP score.

Resumable: run the same command again and finished variants are kept (an interrupted one
continues from its checkpoint); renders are kept while their settings and adapter hold.

Sweep file (--config FILE): TrainConfig fields for every variant at the top or under
[train], and the lists to sweep under [sweep]; flags override the file:
  [train]
  base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  class_word = "woman"
  max_train_steps = 400
  [sweep]
  learning_rate = [5e-5, 1e-4, 5e-4]
  lora_rank = [4, 16]

examples:
  evaluate sweep eileen photos/eileen --class-word woman
  evaluate sweep eileen photos/eileen --lr 5e-5,1e-4,5e-4 --rank 4,16 --out report/
  evaluate sweep eileen photos/eileen --config sweep.toml --prompts my_prompts.txt --num-images 2
"""

# flag -> (TrainConfig field, value type): comma-separated lists
GRID_FLAGS = {"--lr": ("learning_rate", float), "--rank": ("lora_rank", int), "--alpha": ("lora_alpha", float),
              "--steps": ("max_train_steps", int), "--tokens": ("num_tokens", int)}


def build_parser() -> argparse.ArgumentParser:
    from eval.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

    p = OneLineArgumentParser(prog="evaluate sweep", description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the person: variants are personas NAME-lr...")
    p.add_argument("photos", nargs="+", help="photo files or folders of the person")
    for flag, (field_name, typ) in GRID_FLAGS.items():
        p.add_argument(flag, metavar="V1,V2,...", help=f"values of {field_name} to sweep (comma-separated)")
    p.add_argument("--config", type=Path, metavar="FILE", help="sweep file: TrainConfig fields, [sweep] lists")
    p.add_argument("--base-model", help="base model of every variant (hub id, folder or file)")
    p.add_argument("--class-word", help="what the person is (man, woman, person)")
    p.add_argument("--prompts", metavar="FILE", help="prompt set, {person} for the subject (default: eval/prompts.txt, 26 prompts)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--render-steps", type=int, default=30, help="denoising steps per image (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image (default 0)")
    p.add_argument("--work", type=Path, metavar="DIR", help="renders and state (default sweeps/NAME)")
    p.add_argument("--out", default="report", metavar="DIR", help="report folder, replaced whole (default report)")
    p.add_argument("--library", metavar="DIR", help="persona library (default: $GROUPSHOT_LIBRARY or ./people)")
    p.add_argument("--face-model", choices=("arcface", "dlib"), default="arcface", help="face model (default arcface)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help=f"open_clip architecture or local-dir:FOLDER (default {DEFAULT_CLIP_MODEL})")
    p.add_argument("--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED, metavar="TAG_OR_FILE",
                   help=f"open_clip weights tag or checkpoint file (default {DEFAULT_CLIP_PRETRAINED})")
    p.add_argument("--device", help="device for rendering and CLIP (default: cuda if available, else cpu)")
    p.add_argument("--title", help="report title")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_list(flag: str, text: str, typ: type) -> list[Any]:
    values = []
    for item in text.split(","):
        try:
            values.append(typ(item.strip()))
        except ValueError:
            raise GroupshotError(f"{flag} {text}: {item.strip()!r} is not a{'n integer' if typ is int else ' number'}; "
                                 f"give a comma-separated list, e.g. {flag} {'4,16' if typ is int else '5e-5,1e-4,5e-4'}") from None
    return values


def read_sweep_file(path: Path) -> tuple[dict[str, Any], dict[str, list]]:
    """(TrainConfig fields, sweep lists) from a sweep file."""
    from personas import read_toml

    data = read_toml(path, f"--config {path}")
    grid = data.pop("sweep", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        raise GroupshotError(f"--config {path}: [sweep] must map settings to lists, e.g. learning_rate = [5e-5, 1e-4, 5e-4]")
    if isinstance(data.get("train"), dict):  # keys may sit at the top or under [train], as for `personas train`
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    return data, grid


def sweep_main(argv: Sequence[str]) -> int:
    from personas import Library, TrainConfig

    from eval.scoring import default_prompts, read_prompts
    from eval.sweep import SweepSpec, run_sweep

    args = build_parser().parse_args(list(argv))
    if args.quiet:  # compose's per-image bars too (tqdm reads this when each bar is made)
        os.environ["TQDM_DISABLE"] = "1"
    fixed, grid = read_sweep_file(args.config) if args.config else ({}, {})
    for flag, (field_name, typ) in GRID_FLAGS.items():
        text = getattr(args, flag.lstrip("-").replace("-", "_"))
        if text is not None:
            grid[field_name] = parse_list(flag, text, typ)
    for key, value in (("base_model", args.base_model), ("class_word", args.class_word)):
        if value is not None:
            fixed[key] = value
    source = str(args.config) if args.config else "flags"
    spec = SweepSpec(
        name=args.name, photos=args.photos, grid=grid, train=TrainConfig.from_dict(fixed, source=source),
        prompts=read_prompts(args.prompts) if args.prompts else default_prompts(), num_images=args.num_images,
        render_steps=args.render_steps, guidance=args.guidance, seed=args.seed,
    )
    result = run_sweep(spec, library=Library(args.library), work=args.work, out=args.out, face_model=args.face_model,
                       clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, device=args.device,
                       title=args.title, progress=not args.quiet)
    head = ["variant", *spec.grid, "face distance", "CLIP", "faceless"]
    rows = [[r["name"] + (" *" if r["name"] == result.best else ""), *(f"{r[k]:g}" for k in spec.grid),
             _fmt(r["face_distance"]), _fmt(r["clip_score"]), str(r["faceless_images"])] for r in result.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for line in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(f"{c:<{w}}" for c, w in zip(line, widths)).rstrip())
    print(f"best: {result.best}  (trained now: {', '.join(result.trained) or 'none, all kept'})")
    print(f"report: {result.report}/report.html (also .pdf .md .json .csv); renders in {result.work}")
    return 0


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
