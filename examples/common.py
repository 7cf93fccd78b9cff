"""Settings shared by the numbered examples (01_train_two_people.py ... 04_sweep.py).

Real use: Stable Diffusion 1.5 + the OpenPose ControlNet (downloaded once), a GPU, ArcFace
and CLIP ViT-B/32 for the scores. `--tiny`: random tiny models built offline in seconds,
the dlib face model and a tiny random CLIP; it runs anywhere on a CPU and exercises every
step, but its pictures are noise and its scores mean nothing.

To train your own people, edit PEOPLE: name -> (class word, folder of 5-20 photos). With
None for the folder, the person is one of the two public-domain sample people below.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# name -> (class word, photo folder or None for the sample photos of that name)
PEOPLE: dict[str, tuple[str, str | None]] = {
    "eileen": ("woman", None),  # Eileen Collins: scikit-image's `astronaut` (NASA, public domain)
    "grace": ("woman", None),   # Grace Hopper: matplotlib's sample photo (US Navy, public domain)
}
EXAMPLES = Path(__file__).resolve().parent
POSES = EXAMPLES / "poses"  # pose templates as files: OpenPose JSON and skeleton images
GROUP_POSE = POSES / "two_standing.json"
GROUP_PROMPTS = ["two women standing in front of a space shuttle, photo", "two women at a beach bar with palm trees"]


def prompt_set_file() -> Path:
    """groupshot's default prompt set (eval/prompts.txt): clothing, actions, backgrounds."""
    return Path(str(resources.files("eval").joinpath("prompts.txt")))


@dataclass
class Example:
    tiny: bool
    work: Path                       # everything the examples write
    base_model: str
    controlnet: str
    photos: dict[str, Path]          # person -> photo folder
    class_words: dict[str, str]      # person -> class word
    train: dict[str, Any]            # TrainConfig fields
    render: dict[str, Any]           # ComposeRequest fields: size, steps, num_images
    prompt_limit: int | None         # how many prompts of the prompt set to render (None: all)
    eval_args: list[str] = field(default_factory=list)  # `evaluate` flags: face and CLIP models

    @property
    def library(self) -> Path:
        return self.work / "people"

    @property
    def renders(self) -> Path:
        return self.work / "renders"

    @property
    def reports(self) -> Path:
        return self.work / "reports"


def setup(description: str, argv: list[str] | None = None) -> Example:
    """Parse --tiny/--work/--mixed-precision; in tiny mode build the offline models once."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny random offline models (CPU, about a minute)")
    p.add_argument("--work", type=Path, default=Path("groupshot-example"), help="folder for everything (default ./groupshot-example)")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="training precision: fp16 on a T4 (Colab), auto picks bf16 where the GPU has it")
    args = p.parse_args(argv)

    from personas import DEFAULT_BASE_MODEL, DEFAULT_CONTROLNET
    from personas.testing import sample_photos

    work = args.work
    photos = {name: Path(folder) if folder else sample_photos(work / "photos" / name, name)
              for name, (_, folder) in PEOPLE.items()}
    class_words = {name: word for name, (word, _) in PEOPLE.items()}
    if args.tiny:
        import torch

        from personas.testing import write_model, write_tiny_clip

        # Tiny models on a CPU: a second thread mostly spin-waits and slows them down.
        torch.set_num_threads(1)

        model = work / "tiny-model"
        if not (model / "model_index.json").is_file():
            write_model(model, "tiny")
        clip = work / "tiny-clip"
        if not (clip / "open_clip_model.safetensors").is_file():
            write_tiny_clip(clip)
        return Example(
            tiny=True, work=work, base_model=str(model), controlnet=str(model / "controlnet"), photos=photos,
            class_words=class_words,
            # 96 px, not the tiny model's native 64: the reference crops (refs/) are saved at the
            # training resolution, and dlib finds no face in a 64 px crop.
            train=dict(resolution=96, max_train_steps=4, learning_rate=5e-3, embedding_lr=5e-2, validation_every=0,
                       checkpoint_every=0, log_every=1, face_model="dlib", mixed_precision="no"),
            render=dict(size=(64, 64), steps=4, num_images=1), prompt_limit=2,
            eval_args=["--face-model", "dlib", "--clip-model", f"local-dir:{clip}"],
        )
    return Example(
        tiny=False, work=work, base_model=DEFAULT_BASE_MODEL, controlnet=DEFAULT_CONTROLNET, photos=photos,
        class_words=class_words, train=dict(mixed_precision=args.mixed_precision),
        render=dict(size=(512, 512), steps=30, num_images=1), prompt_limit=None,
        eval_args=["--face-model", "arcface"],  # CLIP: ViT-B-32 / openai, open_clip downloads it once
    )
