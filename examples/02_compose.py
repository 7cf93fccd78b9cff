"""02: render the trained people: together in group photos laid out by a pose file, and
each alone over groupshot's default prompt set (eval/prompts.txt), for the course metrics.

    python examples/02_compose.py [--tiny]

The same from the command line:
    compose --people eileen,grace --pose examples/poses/two_standing.json --prompt "two women at a beach bar"
    compose --people eileen --prompts eval/prompts.txt
"""

from __future__ import annotations

import sys

from common import GROUP_POSE, GROUP_PROMPTS, prompt_set_file, setup


def main(argv: list[str] | None = None) -> int:
    ex = setup(__doc__.split("\n")[0], argv)

    from compose import ComposeRequest, GroupComposer
    from compose.prompt_set import read_prompt_set, render_prompt_set

    composer = GroupComposer.from_pretrained(ex.base_model, ex.controlnet, library=ex.library)
    people = list(ex.photos)

    # Together: each person's adapter acts only inside their own region of the pose.
    for prompt in GROUP_PROMPTS:
        request = ComposeRequest(people=people, pose=str(GROUP_POSE), prompt=prompt, out=str(ex.renders / "group"),
                                 **ex.render)
        result = composer(request)
        print(f"group: {len(result.images)} images, pose and masks in {result.run_dir}")

    # Alone: one run folder per prompt; {person} becomes "a <eileen> woman".
    prompts = read_prompt_set(prompt_set_file())[: ex.prompt_limit]
    for name in people:
        request = ComposeRequest(people=[name], prompt=prompts[0], out=str(ex.renders / name), **ex.render)
        runs = render_prompt_set(composer, request, prompts)
        print(f"{name}: {len(runs)} prompts rendered in {ex.renders / name}")
    return 0


if __name__ == "__main__":
    from personas import run_cli

    sys.exit(run_cli(main, prog="02_compose"))
