"""GPU benchmark: groupshot's training and rendering against diffusers' reference paths, one run.

Run on one GPU (the device machine):  python benchmarks/gpu_bench.py [train] [render] --out DIR
Builds SD1.5-architecture models with random weights (speed does not depend on weight
values), times ours and the baselines in the same process, and prints one table:
figure, baseline, ratio, floor, peak memory. Full numbers go to DIR/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS: list[dict] = []
# FLOP floors at the measured 790 TFLOP/s bf16 (issue 5): LoRA step with cached inputs 1.71
# TFLOP; one 30-step ControlNet image with guidance 67.7 TFLOP.
PEAK_TFLOPS = 790.0
FLOOR_TRAIN_MS = 1.71e12 / (PEAK_TFLOPS * 1e12) * 1e3
FLOOR_CN_IMAGE_S = 67.7e12 / (PEAK_TFLOPS * 1e12)


def row(what, ours, base=None, unit="", floor=None, mem=None, note="", higher_is_better=False):
    ratio = None
    if base:
        ratio = (ours / base) if higher_is_better else (base / ours)
    ROWS.append(dict(what=what, ours=ours, baseline=base, ratio=ratio, unit=unit, floor=floor, peak_gib=mem, note=note))
    print(f"[row] {what}: {ours:.4g} {unit} (baseline {base}) mem {mem}", flush=True)


def peak_reset():
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def peak_gib():
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def reference_lora_steps(model_dir: Path, photos: list, steps: int = 60, warmup: int = 10, rank: int = 4):
    """A DreamBooth-LoRA step the way diffusers' train_dreambooth_lora.py takes it:
    VAE encode and text encode every step, fp32 LoRA params, AdamW, bf16 autocast,
    grad-norm clipping, loss.item() logged every step."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    dev, dt = "cuda", torch.bfloat16
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(dev, dt)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(dev, dt)
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(dev, dt)
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pix = [torch.from_numpy(np.asarray(p.resize((512, 512)), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for p in photos]
    ids = tok("a photo of sks woman", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    times = []
    peak_reset()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x = pix[i % len(pix)][None].to(dev, dt)
        with torch.autocast("cuda", dtype=dt):
            lat = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(lat)
            t = torch.randint(0, 1000, (1,), device=dev)
            noisy = sched.add_noise(lat, noise, t)
            emb = te(ids.to(dev))[0]
            pred = unet(noisy, t, emb).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        loss.detach().item()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    mem = peak_gib()
    del unet, vae, te, opt
    torch.cuda.empty_cache()
    return med, mem


def bench_train(args, model_dir: Path, work: Path):
    import torch
    from PIL import Image

    from personas.config import TrainConfig
    from personas.library import Library
    from personas.train import train_persona

    from personas.testing import sample_photos

    photos_dir = sample_photos(work / "photos", "eileen")
    photos = [Image.open(p).convert("RGB") for p in sorted(photos_dir.iterdir())]
    ref_s, ref_mem = reference_lora_steps(model_dir, photos, steps=args.ref_steps)
    row("train: reference DreamBooth-LoRA step (rank 4, bf16, VAE+text encode every step)", 1 / ref_s,
        None, "steps/s", 1e3 / FLOOR_TRAIN_MS, ref_mem, f"median {ref_s * 1e3:.1f} ms/step", higher_is_better=True)

    lib = Library(work / "people")
    same = dict(base_model=str(model_dir), method="lora", lora_rank=4, batch_size=1, resolution=512,
                mixed_precision="bf16", max_train_steps=args.train_steps, validation_every=0, checkpoint_every=0,
                log_every=50, face_model="dlib")
    levers = {"eager": {"cuda_graph": False}, "compile": {"compile_unet": True},
              "graph+channels_last": {"channels_last": True}, "eager+channels_last": {"cuda_graph": False, "channels_last": True}}
    variants = {"cuda-graph": {}, **{k: levers[k] for k in args.train_variants}}
    for name, kw in variants.items():
        peak_reset()
        res = train_persona(f"bench-{name.replace('+', '-')}", [photos_dir], TrainConfig(**{**same, **kw}),
                            library=lib, progress=False)
        row(f"train: groupshot {name} (rank 4, bf16, batch 1, 512 px, cached latents)", res.steps_per_second,
            1 / ref_s, "steps/s", 1e3 / FLOOR_TRAIN_MS, peak_gib(), f"{res.steps} steps incl. warm-up",
            higher_is_better=True)

    # A default persona, end to end: photo prep, model load, caching, all steps, save.
    peak_reset()
    t0 = time.perf_counter()
    res = train_persona("default", [photos_dir], TrainConfig(base_model=str(model_dir), face_model="dlib"),
                        library=lib, progress=False)
    wall = time.perf_counter() - t0
    row("train: default persona wall time (pivotal, rank 16, 500 steps, validation + checkpoints)", wall, None,
        "s", None, peak_gib(), f"{res.steps_per_second:.1f} steps/s in the loop")

    # Colab T4 setting: fp16 within 16 GB (capped on this card).
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(15.0 * 2**30 / total)
    peak_reset()
    res = train_persona("t4", [photos_dir], TrainConfig(base_model=str(model_dir), face_model="dlib", mixed_precision="fp16",
                                                         max_train_steps=100, validation_every=50, checkpoint_every=50),
                        library=lib, progress=False)
    row("train: T4 setting (fp16, defaults, GPU memory capped at 15 GiB)", res.steps_per_second, None, "steps/s",
        None, peak_gib(), "completed under the cap")
    torch.cuda.set_per_process_memory_fraction(1.0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("parts", nargs="*", default=["train"])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/gsbench"))
    p.add_argument("--ref-steps", type=int, default=60)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-variants", nargs="*", default=[])
    p.add_argument("--render-images", type=int, default=3, help="timed images per render variant (after one warm-up)")
    args = p.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "sd15"
    if not (model_dir / "model_index.json").is_file():
        from personas.testing import write_model

        t0 = time.perf_counter()
        write_model(model_dir, "sd15", device="cuda")
        print(f"built random SD1.5 in {time.perf_counter() - t0:.1f} s", flush=True)
    if "train" in args.parts:
        bench_train(args, model_dir, args.work)
    if "render" in args.parts:
        from benchmarks.render_bench import bench_render

        bench_render(args, model_dir, args.work, row, peak_reset, peak_gib, FLOOR_CN_IMAGE_S)

    import diffusers
    import transformers

    env = dict(card=torch.cuda.get_device_name(0), torch=torch.__version__, diffusers=diffusers.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"))
    (args.out / "bench.json").write_text(json.dumps({"env": env, "rows": ROWS}, indent=2))
    print("\n" + " | ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'what':<92} {'ours':>10} {'baseline':>10} {'ratio':>7} {'floor':>8} {'peak GiB':>8}")
    for r in ROWS:
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}g}"
        print(f"{r['what'][:92]:<92} {f(r['ours'], 4):>10} {f(r['baseline'], 4):>10} {f(r['ratio']):>7} "
              f"{f(r['floor'], 4):>8} {f(r['peak_gib']):>8}  {r['unit']} {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
