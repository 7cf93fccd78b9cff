"""`personas`: train, list, show, check and remove identity adapters. Parses and calls only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from personas.errors import GroupshotError, run_cli

# flag -> TrainConfig field; the rest of TrainConfig lives in --config FILE.
TRAIN_FLAGS = {
    "base_model": ("--base-model", str), "method": ("--method", str), "learning_rate": ("--lr", float),
    "embedding_lr": ("--embedding-lr", float), "lora_rank": ("--rank", int), "lora_alpha": ("--alpha", float),
    "max_train_steps": ("--steps", int), "num_tokens": ("--tokens", int), "class_word": ("--class-word", str),
    "resolution": ("--resolution", int), "seed": ("--seed", int), "min_photos": ("--min-photos", int),
    "mixed_precision": ("--mixed-precision", str),
}


def build_parser() -> argparse.ArgumentParser:
    from personas.config import field_help

    p = argparse.ArgumentParser(prog="personas", description="Train and manage identity adapters (personas).")
    p.add_argument("--library", help="persona library folder (default ./people or $GROUPSHOT_LIBRARY)")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a persona from 5-20 photos of one person")
    t.add_argument("name", help="persona name: letters, digits, '_' or '-'")
    t.add_argument("photos", nargs="*", help="photo files or folders (JPEG, PNG, WebP)")
    helps = field_help()
    for field_name, (flag, typ) in TRAIN_FLAGS.items():
        t.add_argument(flag, dest=field_name, type=typ, default=None, help=helps[field_name])
    t.add_argument("--config", type=Path, help="TOML file with any TrainConfig field (flags override it)")
    t.add_argument("--resume", action="store_true", help="continue the unfinished run of NAME from its checkpoint")
    t.add_argument("--restart", action="store_true", help="discard an unfinished run of NAME and start over")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("list", help="list the personas in the library")
    s = sub.add_parser("show", help="show a persona's card")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="print persona.json")
    c = sub.add_parser("check", help="check photos: which are usable and why not")
    c.add_argument("photos", nargs="+")
    c.add_argument("--resolution", type=int, default=512)
    c.add_argument("--face-model", default="auto", choices=("auto", "arcface", "dlib"))
    c.add_argument("--out", type=Path, help="also save the crops to this folder")
    r = sub.add_parser("remove", help="delete a persona")
    r.add_argument("name")
    sub.add_parser("env", help="versions and devices, for bug reports")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog="personas")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from personas.library import Library

    library = Library(args.library)
    return {"train": _train, "list": _list, "show": _show, "check": _check, "remove": _remove,
            "env": _env}[args.cmd](args, library)


def _train(args, library) -> int:
    from personas.config import TrainConfig
    from personas.train import train_persona

    overrides = {f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f) is not None}
    if args.resume and args.restart:
        raise GroupshotError("--resume and --restart contradict each other: pick one")
    if args.resume and (overrides or args.photos or args.config):
        raise GroupshotError("--resume continues with the run's saved photos and settings: drop the other options")
    config = TrainConfig.from_toml(args.config, **overrides) if args.config else TrainConfig(**overrides)
    result = train_persona(args.name, args.photos, config, library=library, resume=args.resume,
                           restart=args.restart, progress=not args.quiet)
    p = result.persona
    mem = f", peak GPU memory {result.peak_memory_gb:.2f} GiB" if result.peak_memory_gb else ""
    print(f"trained {p.name}: {result.steps} steps at {result.steps_per_second:.2f} steps/s, "
          f"final loss {result.final_loss:.4f}{mem}")
    print(f"saved {p.path}  (use it in prompts as \"{p.prompt_words()}\")")
    return 0


def _list(args, library) -> int:
    names = library.names()
    if not names:
        print(f"no personas in {library.root}; train one with `personas train NAME PHOTOS...`")
        return 0
    rows = [("name", "method", "words", "photos", "steps", "created")]
    for n in names:
        try:
            p = library.load(n, verify=False)
            rows.append((n, p.method, p.prompt_words(), str(len(p.photos)), str(p.extra.get("steps", "")),
                         p.created_at[:19]))
        except GroupshotError as e:
            rows.append((n, "BROKEN", str(e)[:60], "", "", ""))
    print(_table(rows))
    return 0


def _show(args, library) -> int:
    p = library.load(args.name)
    if args.json:
        print(json.dumps(p.to_json(), indent=2))
        return 0
    hp = p.hyperparameters
    lines = [
        f"persona      {p.name}  ({p.path})",
        f"prompt words {p.prompt_words()}",
        f"method       {p.method}  rank {hp.get('lora_rank')}  alpha {hp.get('lora_alpha') or hp.get('lora_rank')}  "
        f"lr {hp.get('learning_rate')}  steps {hp.get('max_train_steps')}  tokens {len(p.tokens)}",
        f"base model   {p.base_model.get('id')}  revision {p.base_model.get('revision')}  "
        f"sha256 {(p.base_model.get('sha256') or '')[:12]}",
        f"photos       {len(p.photos)} references in refs/",
        f"adapter      sha256 {(p.adapter_sha256 or '-')[:12]}   embeddings sha256 {(p.embeddings_sha256 or '-')[:12]}",
        f"trained      {p.created_at}  groupshot {p.toolkit_version}",
    ]
    ex = p.extra
    if ex:
        lines.append(f"training     {ex.get('steps')} steps, {ex.get('steps_per_second')} steps/s, "
                     f"final loss {ex.get('final_loss')}, {ex.get('total_seconds')} s on {ex.get('device')}")
    if (p.path / "train" / "loss.png").is_file():
        lines.append(f"loss curve   {p.path / 'train' / 'loss.png'}")
    print("\n".join(lines))
    return 0


def _check(args, library) -> int:
    from personas.faces import load_face_backend
    from personas.photos import check_photos

    report = check_photos(args.photos, backend=load_face_backend(args.face_model), resolution=args.resolution)
    print(report.table())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, ph in enumerate(report.accepted):
            ph.image.save(args.out / f"{i:03d}-{ph.path.stem}.jpg", quality=95)
        print(f"crops saved to {args.out}")
    return 0 if report.accepted else 2


def _remove(args, library) -> int:
    path = library.remove(args.name)
    print(f"removed {path}")
    return 0


def _env(args, library) -> int:
    import platform
    from importlib import metadata

    from personas.version import TOOLKIT_VERSION

    rows = [("groupshot", TOOLKIT_VERSION), ("python", platform.python_version()), ("platform", platform.platform())]
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "open_clip_torch",
                "controlnet_aux", "insightface", "onnxruntime", "onnxruntime-gpu", "dlib-bin", "opencv-python"):
        try:
            rows.append((pkg, metadata.version(pkg)))
        except metadata.PackageNotFoundError:
            rows.append((pkg, "not installed"))
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{prop.name}, {prop.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}"))
    else:
        rows.append(("device", "cpu (no CUDA GPU visible)"))
    rows.append(("library", str(library.root.resolve())))
    print(_table(rows, header=False))
    return 0


def _table(rows, header: bool = True) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)).rstrip() for r in rows]
    if header:
        out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
