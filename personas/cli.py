"""`personas`: train, list, show, check, remove, export and import identity adapters. Parses and calls only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from personas.errors import GroupshotError, OneLineArgumentParser, run_cli

TRAIN_ALL_HELP = """Train every person of a roster, skipping those already trained with the same settings.

Whole personas are spread over the GPUs, one persona per GPU at a time (each in its own
process with CUDA_VISIBLE_DEVICES set); without GPUs, --workers N trains N at a time on the
CPU. A failed persona is reported and does not stop the others; the exit code is 1 if any
failed. An interrupted run continues from its checkpoint when started again; a persona
already in the library with other settings is reported as failed (remove it to retrain).

roster.toml:
  [train]                        # TrainConfig fields for everyone (optional)
  base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  max_train_steps = 500

  [[person]]
  name = "brad"
  photos = ["photos/brad"]       # files or folders, relative to the roster file
  overrides = { class_word = "man", learning_rate = 2e-4 }

  [[person]]
  name = "leo"
  photos = "photos/leo"
"""

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

    p = OneLineArgumentParser(prog="personas", description="Train and manage identity adapters (personas).")
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
    t.add_argument("--gpus", type=int, metavar="N", help="train data-parallel on N GPUs of this machine: re-launches "
                   "itself through `accelerate launch`; batch_size is per GPU, so the global batch is N x batch_size")

    ta = sub.add_parser("train-all", help="train every person of a roster file, whole personas spread over the GPUs",
                        description=TRAIN_ALL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ta.add_argument("roster", type=Path, help="roster TOML: [train] settings for everyone, [[person]] name, photos, overrides")
    ta.add_argument("--gpus", type=int, metavar="N", help="use the first N visible GPUs, one persona per GPU at a time (default: all)")
    ta.add_argument("--workers", type=int, metavar="N", help="without GPUs: N personas at a time on the CPU (default 1)")
    ta.add_argument("--logs", type=Path, metavar="DIR", help="one log per persona (default LIBRARY/.logs)")

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
    e = sub.add_parser("export", help="write a persona for AUTOMATIC1111 / ComfyUI / kohya (LoRA + embedding)")
    e.add_argument("name")
    e.add_argument("--format", default="kohya", choices=("kohya",), help="file layout (default kohya)")
    e.add_argument("--out", type=Path, help="the LoRA file (default NAME.safetensors); the embedding goes beside it as <stem>-emb.safetensors")
    e.add_argument("--force", action="store_true", help="replace existing files")
    i = sub.add_parser("import", help="make a persona from an external SD1.x LoRA (kohya/Civitai or diffusers layout) and/or embedding")
    i.add_argument("name", help="persona name: letters, digits, '_' or '-'")
    i.add_argument("lora", nargs="?", type=Path, help="LoRA .safetensors file (pickled .ckpt/.pt/.bin are refused)")
    i.add_argument("--embedding", type=Path, help="textual-inversion embedding .safetensors (WebUI, kohya or diffusers layout)")
    i.add_argument("--token", help="with --embedding: its word in prompts (default <NAME>); with a LoRA only: its trigger word(s)")
    i.add_argument("--class-word", default="person", help="what the person is (man, woman, person, ...)")
    i.add_argument("--base-model", default=None, help="the SD1.x model the LoRA was made for and compose will use "
                   "(default stable-diffusion-v1-5/stable-diffusion-v1-5)")
    i.add_argument("--refs", nargs="+", default=[], metavar="PHOTO", help="photos of the person: eval compares faces with them")
    i.add_argument("--attention-only", action="store_true", help="keep only the UNet attention layers of a LoRA that has others")
    i.add_argument("--face-model", default="auto", choices=("auto", "arcface", "dlib", "none"), help="face detector for --refs")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog="personas")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --gpus re-launches it
    from personas.library import Library

    library = Library(args.library)
    return {"train": _train, "list": _list, "show": _show, "check": _check, "remove": _remove,
            "env": _env, "export": _export, "import": _import, "train-all": _train_all}[args.cmd](args, library)


def _export(args, library) -> int:
    from personas.interop import export_persona

    result = export_persona(library.load(args.name), args.out, format=args.format, overwrite=args.force)
    for what, path in (("LoRA (kohya layout)", result.lora), ("embedding (WebUI layout)", result.embedding)):
        if path is not None:
            print(f"wrote {what}: {path}")
    for line in result.usage:
        print(f"  {line}")
    return 0


def _import(args, library) -> int:
    from personas.interop import import_persona

    p = import_persona(args.name, args.lora, embedding=args.embedding, token=args.token, class_word=args.class_word,
                       base_model=args.base_model, refs=args.refs, attention_only=args.attention_only,
                       face_model=args.face_model, library=library)
    lora = p.extra["imported"].get("lora")
    if lora:
        dropped = f", {lora['dropped_layers']} non-attention layers left out" if lora["dropped_layers"] else ""
        print(f"imported {p.name}: {lora['format']} LoRA, rank {lora['rank']}, "
              f"{lora['unet_layers']} UNet + {lora['text_encoder_layers']} text-encoder layers{dropped}")
    else:
        print(f"imported {p.name}: embedding of {len(p.tokens)} vectors")
    print(f"saved {p.path}  (use it in prompts as \"{p.prompt_words()}\")")
    if not p.photos:
        print(f"note: no reference photos, so `evaluate` cannot score {p.name}'s faces; to add some, remove it and import again with --refs PHOTOS")
    return 0


def _train(args, library) -> int:
    from personas.config import TrainConfig
    from personas.train import train_persona

    if args.gpus is not None:
        code = _gpus(args)
        if code is not None:
            return code
    overrides = {f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f) is not None}
    if args.resume and args.restart:
        raise GroupshotError("--resume and --restart contradict each other: pick one")
    if args.resume and (overrides or args.photos or args.config):
        raise GroupshotError("--resume continues with the run's saved photos and settings: drop the other options")
    try:  # the flags alone first, so that a bad value is named by the flag the user typed
        TrainConfig(**overrides)
    except GroupshotError as e:
        flag = TRAIN_FLAGS.get(str(e).partition("=")[0], (None,))[0]
        raise GroupshotError(f"{flag}: {e}" if flag else str(e)) from None
    config = TrainConfig.from_toml(args.config, **overrides) if args.config else TrainConfig(**overrides)
    result = train_persona(args.name, args.photos, config, library=library, resume=args.resume,
                           restart=args.restart, progress=not args.quiet)
    p = result.persona
    if p is None:  # another process of a data-parallel run: the main process saved and reports
        return 0
    mem = f", peak GPU memory {result.peak_memory_gb:.2f} GiB" if result.peak_memory_gb else ""
    print(f"trained {p.name}: {result.steps} steps at {result.steps_per_second:.2f} steps/s, "
          f"final loss {result.final_loss:.4f}{mem}")
    print(f"saved {p.path}  (use it in prompts as \"{p.prompt_words()}\")")
    return 0


def _gpus(args) -> int | None:
    """--gpus N: the exit code of the same command re-launched in N processes, or None to
    train here (N = 1, or already one of the N processes)."""
    import subprocess

    from personas.parallel import launch_command, launched, num_processes, without_option

    if args.gpus < 1:
        raise GroupshotError(f"--gpus {args.gpus}: give the number of GPUs to train on, 1 or more")
    if launched():
        if args.gpus != num_processes():
            raise GroupshotError(f"--gpus {args.gpus} under a launcher running {num_processes()} processes; drop --gpus")
        return None
    if args.gpus == 1:
        return None
    import torch

    have = torch.cuda.device_count()
    if have < args.gpus:
        raise GroupshotError(f"--gpus {args.gpus}: this machine has {have} visible CUDA GPU(s); "
                             f"give --gpus {max(have, 1)} or fewer (CUDA_VISIBLE_DEVICES may hide some)")
    cmd = launch_command("personas.cli", without_option(args.argv, "--gpus"), args.gpus)
    return subprocess.run(cmd).returncode


def _train_all(args, library) -> int:
    from personas.roster import load_roster, summary_table, train_all

    roster = load_roster(args.roster)
    outcomes = train_all(roster, library=library, gpus=args.gpus, workers=args.workers, logs=args.logs)
    print(summary_table(outcomes))
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} failed: {', '.join(failed)} (logs in {outcomes[0].log.parent}); "
              "run the same command again to retry them, finished ones are skipped", file=sys.stderr)
        return 1
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
    if "imported" in ex:
        src = ", ".join(f"{k} {v['file']} (sha256 {v['sha256'][:12]})" for k, v in ex["imported"].items())
        lines.append(f"imported     {src}")
    elif ex:
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
            stem = os.fsdecode(os.fsencode(ph.path.stem)[:200])  # the name limit is 255 bytes
            ph.image.save(args.out / f"{i:03d}-{stem}.jpg", quality=95)
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
