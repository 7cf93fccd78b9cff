"""`compose`: render group photos from the command line (parses, calls GroupComposer, reports)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from personas import DEFAULT_BASE_MODEL, DEFAULT_CONTROLNET, SCHEDULERS, GroupshotError, run_cli

from compose.pipeline import METHODS, ComposeRequest

EXAMPLE = 'compose --people brad,leo --pose two_standing --prompt "two men at a beach bar"'


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line through run_cli, not usage + message
        raise GroupshotError(f"{message} (see compose --help)")


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(ComposeRequest) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compose", description=f"Render group photos, each person with their own adapter. e.g. {EXAMPLE}")
    p.add_argument("--people", help="comma-separated persona names, e.g. brad,leo")
    p.add_argument("--prompt", help=_help("prompt"))
    p.add_argument("--prompts", metavar="FILE", help="a prompt set instead of --prompt: one prompt per line, each its own "
                   "run; {person} becomes the people's words ('a <brad> man'). Under `accelerate launch` the "
                   "processes split the prompts")
    p.add_argument("--pose", help=_help("pose"))
    p.add_argument("--person-prompt", action="append", default=[], metavar="NAME=TEXT", help=_help("person_prompts") + " (repeatable)")
    p.add_argument("--assign", metavar="NAME=INDEX,...", help=_help("assign"))
    p.add_argument("--method", choices=METHODS, help=_help("method") + " (default composite)")
    p.add_argument("--negative-prompt", help=_help("negative_prompt"))
    p.add_argument("--size", metavar="WxH", help=_help("size") + " (default 512x512)")
    p.add_argument("--steps", type=int, help=_help("steps") + " (default 30)")
    p.add_argument("--guidance", type=float, help=_help("guidance") + " (default 7.5)")
    p.add_argument("--controlnet-scale", type=float, help=_help("controlnet_scale") + " (default 1.0)")
    p.add_argument("--seed", type=int, help=_help("seed") + " (default 0)")
    p.add_argument("--num-images", type=int, help=_help("num_images") + " (default 1)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help=_help("scheduler"))
    p.add_argument("--out", default="renders", help="folder that receives renders/<run>/ (default renders)")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help=f"hub id or diffusers folder (default {DEFAULT_BASE_MODEL})")
    p.add_argument("--controlnet", default=DEFAULT_CONTROLNET, help=f"OpenPose ControlNet, hub id or folder (default {DEFAULT_CONTROLNET})")
    p.add_argument("--library", help="persona library folder (default ./people or $GROUPSHOT_LIBRARY)")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda with float16 if available, else cpu)")
    p.add_argument("--replay", metavar="RENDER_JSON", help="render a run again from its render.json (same images)")
    p.add_argument("--list-poses", action="store_true", help="list the built-in pose templates")
    p.add_argument("--preview", action="store_true", help="with --pose: write the skeleton and mask overlay only (no model)")
    p.add_argument("--ui", action="store_true", help="start the web demo (people, compose, scores) on 127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="with --ui: the port (default 7860)")
    p.add_argument("--share", action="store_true", help="with --ui: also a public gradio.live link (off unless asked)")
    p.add_argument("--ui-config", metavar="FILE", help="with --ui: TOML of the demo's settings and [train] defaults")
    return p


def parse_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise GroupshotError(f"--size {text}: expected WIDTHxHEIGHT in pixels, e.g. 512x512")
    return int(width), int(height)


def parse_person_prompts(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise GroupshotError(f"--person-prompt {item}: expected NAME=TEXT, e.g. brad=\"white shirt\"")
        if name.strip() in out:
            raise GroupshotError(f"--person-prompt {name.strip()} is given twice; give each person one")
        out[name.strip()] = text.strip()
    return out


def _main(argv: list[str] | None) -> int:
    from personas import is_main_process, process_device

    from compose.pipeline import GroupComposer, preview_pose, replay
    from compose.prompt_set import read_prompt_set, render_prompt_set
    from compose.poses import list_templates, parse_assign

    args = build_parser().parse_args(argv)
    if args.ui:
        from compose.ui import Demo, DemoSettings, launch

        settings = DemoSettings.from_toml(args.ui_config, base_model=args.base_model) if args.ui_config else DemoSettings()
        launch(Demo(settings, base_model=args.base_model, controlnet=args.controlnet, library=args.library,
                    out=args.out, device=args.device), port=args.port, share=args.share)
        return 0
    if args.share or args.ui_config:
        raise GroupshotError("--share and --ui-config go with --ui")
    if args.list_poses:
        for name, n, description in list_templates():
            print(f"{name:15} {n}  {description}")
        return 0
    if args.replay:
        result = replay(args.replay, out=args.out, library=args.library, device=args.device)
        print(result.run_dir)
        return 0
    people = [n.strip() for n in args.people.split(",") if n.strip()] if args.people else None
    assign = parse_assign(args.assign) if args.assign else None
    size = parse_size(args.size) if args.size else None
    if args.preview:
        if not args.pose:
            raise GroupshotError("--preview needs --pose (a template name, skeleton image, OpenPose JSON or photo)")
        print(preview_pose(args.pose, size=size or (512, 512), people=people, assign=assign, out=args.out))
        return 0
    if args.prompt is not None and args.prompts is not None:
        raise GroupshotError("give --prompt TEXT or --prompts FILE, not both")
    prompts = read_prompt_set(args.prompts) if args.prompts is not None else None
    if not people or (args.prompt is None and prompts is None):
        raise GroupshotError(f"--people and --prompt are required (or --prompts FILE for a prompt set), e.g. {EXAMPLE}")
    given = dict(
        negative_prompt=args.negative_prompt, method=args.method, size=size, steps=args.steps,
        guidance=args.guidance, controlnet_scale=args.controlnet_scale, seed=args.seed,
        num_images=args.num_images, scheduler=args.scheduler,
    )
    request = ComposeRequest(
        people=people, prompt=args.prompt if prompts is None else prompts[0], person_prompts=parse_person_prompts(args.person_prompt),
        pose=args.pose, assign=assign, out=args.out, **{k: v for k, v in given.items() if v is not None},
    )
    # Under `accelerate launch`, each process on its own device (cuda:<local rank>).
    composer = GroupComposer.from_pretrained(args.base_model, args.controlnet, device=args.device or process_device(),
                                             library=args.library)
    if prompts is not None:
        run_dirs = render_prompt_set(composer, request, prompts)
        if is_main_process():
            for run_dir in run_dirs:
                print(run_dir)
        return 0
    result = composer(request)
    print(result.run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog="compose")


if __name__ == "__main__":
    sys.exit(main())
