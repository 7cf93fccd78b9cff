"""04: the course's hyperparameter study: one persona per learning rate (at least three),
the prompt set rendered with and without each, scored, the best chosen, one report.

    python examples/04_sweep.py [--tiny]

The same from the command line:
    evaluate sweep eileen photos/eileen --class-word woman --lr 5e-5,1e-4,5e-4
"""

from __future__ import annotations

import sys

from common import prompt_set_file, setup

LEARNING_RATES = "5e-5,1e-4,5e-4"
TINY_LEARNING_RATES = "1e-3,5e-3,2e-2"  # the tiny model is trained for a few steps only


def main(argv: list[str] | None = None) -> int:
    ex = setup(__doc__.split("\n")[0], argv)

    from compose.prompt_set import read_prompt_set
    from eval.cli import main as evaluate

    name = next(iter(ex.photos))
    # Settings shared by every variant go in a sweep file's [train] table; the swept ones on the command line.
    config = ex.work / "sweep.toml"
    train = {k: v for k, v in ex.train.items() if k != "learning_rate"}
    config.write_text("[train]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in train.items()), encoding="utf-8")
    prompts = ex.work / "sweep-prompts.txt"
    prompts.write_text("\n".join(read_prompt_set(prompt_set_file())[: ex.prompt_limit]) + "\n", encoding="utf-8")
    return evaluate([
        "sweep", name, str(ex.photos[name]), "--class-word", ex.class_words[name], "--base-model", ex.base_model,
        "--lr", TINY_LEARNING_RATES if ex.tiny else LEARNING_RATES, "--config", str(config),
        "--prompts", str(prompts), "--render-steps", "2" if ex.tiny else "30",
        "--library", str(ex.library), "--work", str(ex.work / "sweeps" / name), "--out", str(ex.reports / "sweep"),
        *ex.eval_args, "--title", f"learning-rate sweep: {name}",
    ])


def _toml(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)


if __name__ == "__main__":
    from personas import run_cli

    sys.exit(run_cli(main, prog="04_sweep"))
