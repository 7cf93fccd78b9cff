"""Quick start: two public-domain people trained, composed into one photo, and scored.

    python examples/quickstart.py           # real SD1.5 + OpenPose ControlNet (downloads, GPU)
    python examples/quickstart.py --tiny    # tiny random offline models: runs anywhere in ~2 min

The people come from photos that ship inside registry packages: Eileen Collins
(scikit-image's `astronaut`, NASA, public domain) and Grace Hopper (matplotlib's sample
photo, US Navy, public domain). One photo each, so the training set is that photo and
three variants of it (`personas.testing.sample_photos`: mirror, crop, exposure); real
use takes 5-20 different photos.
With --tiny every model has random weights: the run exercises the whole loop (train,
compose, evaluate, report) but its pictures are noise and its scores mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PEOPLE = {"eileen": "woman", "grace": "woman"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random offline models instead of SD1.5 (CI, CPU)")
    p.add_argument("--work", type=Path, default=Path("quickstart"), help="folder for everything this writes")
    args = p.parse_args(argv)

    from compose import ComposeRequest, GroupComposer
    from eval.cli import main as evaluate
    from personas import DEFAULT_BASE_MODEL, DEFAULT_CONTROLNET, Library, TrainConfig, train_persona

    work = args.work
    library = Library(work / "people")
    from personas.testing import sample_photos

    photos = {name: sample_photos(work / "photos" / name, name) for name in PEOPLE}

    if args.tiny:
        from personas.testing import write_model, write_tiny_clip

        base = work / "tiny-model"
        if not (base / "model_index.json").is_file():
            write_model(base, "tiny")
        base_model, controlnet = str(base), str(base / "controlnet")
        clip = ["--clip-model", f"local-dir:{write_tiny_clip(work / 'tiny-clip')}"]
        train = dict(resolution=64, max_train_steps=40, validation_every=20, validation_steps=4, checkpoint_every=20)
        render = dict(size=(64, 64), steps=8, num_images=2)
    else:
        base_model, controlnet = DEFAULT_BASE_MODEL, DEFAULT_CONTROLNET
        clip = []  # ViT-B-32 / openai, downloaded by open_clip
        train = {}
        render = dict(num_images=4)

    # 1. One persona per person (skipped when it is already in the library).
    for name, class_word in PEOPLE.items():
        if library.exists(name):
            print(f"persona {name} already trained: {library.path(name)}")
            continue
        config = TrainConfig(base_model=base_model, class_word=class_word, face_model="dlib", **train)
        result = train_persona(name, [photos[name]], config, library=library)
        print(f"trained {name}: {result.steps} steps, {result.steps_per_second:.1f} steps/s -> {result.persona.path}")

    # 2. Both in one photo, laid out by the built-in two-person pose.
    composer = GroupComposer.from_pretrained(base_model, controlnet, library=library)
    rendered = composer(ComposeRequest(
        people=list(PEOPLE), prompt="two women standing in front of a space shuttle, photo", pose="two_standing",
        out=str(work / "renders"), **render,
    ))
    print(f"rendered {len(rendered.images)} images -> {rendered.run_dir}")

    # 3. Every face scored against its person; the report.
    code = evaluate([str(rendered.run_dir), "--library", str(library.root), "--out", str(work / "report"),
                     "--face-model", "dlib", *clip])
    if code == 0:
        print(f"report -> {work / 'report' / 'report.html'} (also .md, .pdf, .json, .csv)")
    return code


if __name__ == "__main__":
    from personas import run_cli

    sys.exit(run_cli(main, prog="quickstart"))
