"""`evaluate`: score renders (or any folder of images) against their personas and write the report."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from personas.errors import GroupshotError, OneLineArgumentParser, run_cli

log = logging.getLogger("eval")

EXAMPLES = """examples:
  evaluate renders/beach renders/office --out report/
  evaluate renders/beach --face-model dlib --clip-model ViT-L-14 --clip-pretrained openai
  evaluate renders/beach --base renders/beach-base
  evaluate --images my_images/ --people brad --prompts prompts.txt
  evaluate sweep eileen photos/eileen --lr 5e-5,1e-4,5e-4 --rank 4,16 --out report/   (see evaluate sweep --help)
  accelerate launch --num_processes 4 -m eval.cli renders/*   (the processes split the images; one report)
"""


def build_parser() -> argparse.ArgumentParser:
    from eval.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

    p = OneLineArgumentParser(
        prog="evaluate",
        description="Score every face against its persona (Face Distance, Faceless Images) and every image "
        "against its prompt (CLIP Score); write report.json/.csv/.md/.html/.pdf.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("renders", nargs="*", metavar="RENDER_DIR", help="render folders written by `compose`")
    p.add_argument("--images", metavar="DIR", help="score a plain folder of images instead (needs --people)")
    p.add_argument("--people", metavar="NAMES", help="with --images: comma-separated personas the images show")
    p.add_argument("--prompts", metavar="FILE", help="with --images: prompts, one per image (sorted by name) or one for all")
    p.add_argument("--prompt", metavar="TEXT", help="with --images: one prompt for every image")
    p.add_argument("--base", metavar="DIR", help="images of the base model (a render folder or a folder of images, "
                   "paired with the personalized ones by order) for the base-vs-personalized comparison")
    p.add_argument("--library", metavar="DIR", help="persona library (default: $GROUPSHOT_LIBRARY or ./people)")
    p.add_argument("--out", metavar="DIR", default="report", help="report folder, replaced whole (default: report)")
    p.add_argument("--face-model", choices=("arcface", "dlib"), default="arcface",
                   help="face detector + embedding (default: arcface; dlib works offline)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help=f"open_clip architecture or local-dir:FOLDER (default: {DEFAULT_CLIP_MODEL})")
    p.add_argument("--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED, metavar="TAG_OR_FILE",
                   help=f"open_clip weights tag or checkpoint file (default: {DEFAULT_CLIP_PRETRAINED})")
    p.add_argument("--device", default="auto", help="device for CLIP and ArcFace: auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="face worker processes (default: one per CPU core for large sets; 1: no pool)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="score the readable images and list the others in the report, instead of stopping")
    p.add_argument("--title", help="report title")
    return p


def _split_names(value: str | None) -> list[str]:
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def _check_readable(paths: Sequence[Path], skip: bool) -> None:
    """Decode every image before any model loads, so a bad file stops the run at once."""
    from personas.photos import open_photo

    from concurrent.futures import ThreadPoolExecutor

    from eval.scoring import usable_cpus

    def problem(path: Path) -> str | None:
        try:
            open_photo(path)
        except GroupshotError as e:
            return str(e)
        return None

    # Threads: PIL decodes with the GIL released, so this scales with the cores.
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        bad = [msg for msg in pool.map(problem, paths) if msg is not None]
    if bad and not skip:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise GroupshotError(f"{bad[0]}{more}; fix or remove it, or pass --skip-unreadable to score the rest")
    for msg in bad:
        log.warning("skipping unreadable image: %s", msg)


def _device(name: str) -> str:
    if name != "auto":
        return name
    from personas import process_device

    if process_device() is not None:  # under `accelerate launch`: this process's own GPU
        return process_device()
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _main(argv: Sequence[str] | None) -> int:
    import compose
    from personas.library import Library

    from eval.report import check_output_dir, summary_lines, write_report
    from eval.scoring import (check_workers, list_images, load_personas, load_render, read_prompts, score_images,
                              score_renders)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:  # `evaluate sweep ...`: train, render and score a hyperparameter grid
        from eval.sweep_cli import sweep_main

        return sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    check_workers(args.workers)
    library = Library(args.library)
    out = check_output_dir(args.out)

    # -- every input checked before any model loads --------------------------------------
    if args.images:
        if args.renders:
            raise GroupshotError("give render folders or --images DIR, not both")
        people = _split_names(args.people)
        if not people:
            raise GroupshotError("--images needs --people NAME[,NAME...]: the personas the images should show")
        if args.prompts and args.prompt:
            raise GroupshotError("give --prompts FILE or --prompt TEXT, not both")
        files = list_images(args.images)
        personas = load_personas(library, people)
        prompts = read_prompts(args.prompts) if args.prompts else args.prompt
        if isinstance(prompts, list) and len(prompts) not in (1, len(files)):
            raise GroupshotError(f"--prompts {args.prompts}: {len(prompts)} prompts for {len(files)} images in "
                                 f"{args.images}; give one per image (sorted by name) or one for all")
        renders = []
        has_text = prompts is not None
    else:
        if not args.renders:
            raise GroupshotError("give one or more render folders, or --images DIR --people NAME")
        if args.people or args.prompts or args.prompt:
            raise GroupshotError("--people, --prompts and --prompt go with --images; a render folder names its own")
        renders = [load_render(d) for d in args.renders]
        files = [f for r in renders for f in r.images]
        personas = load_personas(library, [p.name for r in renders for p in r.people])
        has_text = any(r.clip_text for r in renders)
    base_render = base_files = None
    if args.base:
        base_dir = Path(args.base)
        base_render = load_render(base_dir) if (base_dir / compose.RENDER_FILE).is_file() else None
        base_files = base_render.images if base_render else list_images(base_dir, arg="--base")
        if base_render is None and len(base_files) != len(files):
            raise GroupshotError(f"--base {base_dir}: {len(base_files)} images but {len(files)} personalized ones; "
                                 "they are paired by order, so give as many")
    _check_readable(files + (base_files or []), args.skip_unreadable)

    # -- models ----------------------------------------------------------------------------
    from personas.faces import load_face_backend

    # ArcFace runs where CLIP runs (under `accelerate launch`, this process's own GPU)
    face_backend = load_face_backend(args.face_model, device=_device(args.device))
    clip = None
    if has_text:
        from eval.clip_score import ClipScorer

        clip = ClipScorer(args.clip_model, args.clip_pretrained, device=_device(args.device))
    else:
        log.warning("no prompts: the CLIP Score is not computed (give --prompts or --prompt)")

    if renders:
        scores = score_renders(renders, library=library, face_backend=face_backend, clip=clip,
                               workers=args.workers)
    else:
        scores = score_images(files, list(personas), prompts, library=library, face_backend=face_backend, clip=clip,
                              workers=args.workers)
    base = None
    if base_files is not None:
        names = list(scores.personas)
        texts = ([base_render.clip_text or ""] * len(base_files) if base_render
                 else [im.clip_text or "" for im in scores.images])
        base = score_images(base_files, names, texts if clip else None, library=library,
                            face_backend=face_backend, clip=clip, workers=args.workers)
    from personas import is_main_process

    if not is_main_process():  # under `accelerate launch`: every process scored its share, one writes
        return 0
    write_report(scores, out, base=base, title=args.title)
    for line in summary_lines(scores):
        print(line)
    print(f"report: {out}/report.html (also .pdf .md .json .csv)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, prog="evaluate")


if __name__ == "__main__":
    sys.exit(main())
