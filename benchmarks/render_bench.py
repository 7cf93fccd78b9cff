"""Rendering part of gpu_bench.py: composite / masked / merge against diffusers' pipelines."""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def _time_images(fn, n: int) -> tuple[float, float]:
    """(first call seconds, median of the next n calls), synchronised."""
    import torch

    times = []
    for _ in range(n + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def bench_render(args, model_dir: Path, work: Path, row, peak_reset, peak_gib, floor_cn_image_s: float) -> None:
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from compose.pipeline import ComposeRequest, GroupComposer
    from compose.poses import draw_pose, template_pose
    from personas.library import Library
    from personas.testing import make_random_persona

    n = args.render_images
    lib = Library(work / "render-people")
    for seed, name in enumerate(("ann", "bob", "cid")):
        if not lib.exists(name):
            make_random_persona(lib, name, model_dir, method="pivotal", rank=16, seed=seed)
    settings = dict(num_inference_steps=30, guidance_scale=7.5, height=512, width=512)
    pose_image = draw_pose(template_pose("two_standing", size=(512, 512)))

    # Baselines: diffusers' own pipelines, fp16, SDPA, same settings.
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float16, safety_checker=None).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator("cpu").manual_seed(0)
    peak_reset()
    _, plain_s = _time_images(lambda: pipe("a photo of two people", generator=g(), **settings), n)
    row("render: diffusers StableDiffusionPipeline (30 steps, cfg 7.5, fp16)", plain_s, None, "s/image", None, peak_gib())
    cn = ControlNetModel.from_pretrained(model_dir / "controlnet", torch_dtype=torch.float16)
    cpipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=cn).to("cuda")
    cpipe.set_progress_bar_config(disable=True)
    peak_reset()
    _, cn_s = _time_images(lambda: cpipe("a photo of two people", image=pose_image, generator=g(), **settings), n)
    row("render: diffusers StableDiffusionControlNetPipeline (baseline)", cn_s, None, "s/image", floor_cn_image_s, peak_gib())
    del pipe, cpipe, cn
    torch.cuda.empty_cache()

    def ours(label: str, people: list[str], pose: str, method: str, cuda_graph: bool = True) -> None:
        composer = GroupComposer.from_pretrained(str(model_dir), str(model_dir / "controlnet"), library=lib,
                                                 cuda_graph=cuda_graph)
        request = ComposeRequest(people=people, prompt="a photo of friends at the beach", method=method, pose=pose,
                                 steps=30, guidance=7.5, out=str(work / "renders"))
        plan = composer.prepare(request)
        composer.generate(plan, [0])  # loads models, tokens; not timed
        peak_reset()
        first, steady = _time_images(lambda: composer.generate(plan, [1]), n)
        row(f"render: groupshot {label}", steady, cn_s, "s/image", floor_cn_image_s, peak_gib(),
            f"every image re-warms and re-captures its graph; first call {first:.2f} s")
        del composer
        torch.cuda.empty_cache()

    ours("composite, 2 people, CUDA graph", ["ann", "bob"], "two_standing", "composite")
    ours("composite, 2 people, eager", ["ann", "bob"], "two_standing", "composite", cuda_graph=False)
    ours("masked, 2 people, CUDA graph", ["ann", "bob"], "two_standing", "masked")
    ours("masked, 2 people, eager", ["ann", "bob"], "two_standing", "masked", cuda_graph=False)
    ours("merge, 2 people (diffusers set_adapters)", ["ann", "bob"], "two_standing", "merge")
    ours("composite, 3 people, CUDA graph", ["ann", "bob", "cid"], "three_row", "composite")
    ours("masked, 3 people, CUDA graph", ["ann", "bob", "cid"], "three_row", "masked")
