"""01: train one persona per person: a LoRA and learned tokens from their photos.

    python examples/01_train_two_people.py           # SD1.5 on a GPU (add --mixed-precision fp16 on a T4)
    python examples/01_train_two_people.py --tiny    # tiny offline models, any CPU

The same from the command line, per person:
    personas train eileen photos/eileen --class-word woman
"""

from __future__ import annotations

import sys

from common import setup


def main(argv: list[str] | None = None) -> int:
    ex = setup(__doc__.split("\n")[0], argv)

    from personas import Library, TrainConfig, check_photos, load_face_backend, train_persona

    library = Library(ex.library)
    faces = load_face_backend(TrainConfig(**ex.train).face_model)
    for name, photos in ex.photos.items():
        # What the trainer will use, and why any photo is left out.
        config = TrainConfig(base_model=ex.base_model, class_word=ex.class_words[name], **ex.train)
        report = check_photos([photos], backend=faces, resolution=config.resolution)
        print(report.table())

        # restart: a run stopped half-way is discarded; `personas train NAME --resume` would continue it.
        result = train_persona(name, [photos], config, library=library, restart=True)
        persona = result.persona
        print(f"trained {name}: {result.steps} steps, final loss {result.final_loss:.4f}, "
              f"{result.steps_per_second:.1f} steps/s")
        print(f"  card: {persona.path / 'persona.json'}; loss curve: {persona.path / 'train' / 'loss.png'}")
        print(f"  in prompts: \"{persona.prompt_words()}\"")
    return 0


if __name__ == "__main__":
    from personas import run_cli

    sys.exit(run_cli(main, prog="01_train_two_people"))
