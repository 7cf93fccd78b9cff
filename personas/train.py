"""Train one persona: photos in, an identity adapter (LoRA and/or new tokens) out.

The loop reads top to bottom: check photos, load the base model, cache latents (and the
caption's text embedding when nothing in the text path trains), then optimise. Every
random draw of step k comes from a generator seeded by (seed, k), so a run resumed from
a checkpoint takes exactly the steps an uninterrupted run would have taken.

Under `accelerate launch` (or `personas train --gpus N`) the loop runs data-parallel: the
UNet is DDP-wrapped, the gradients of the parameters outside it (new tokens, text-encoder
LoRA) are averaged by hand, every process takes its slice of the same global batch, and
only the main process writes the work folder, checkpoints and the persona.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from personas.adapters import UNET_TARGETS, TEXT_TARGETS, LoraWeights, lora_from_peft, save_embeddings, save_lora
from personas.config import TrainConfig
from personas.errors import GroupshotError
from personas.library import (
    ADAPTER_FILE, EMBEDDINGS_FILE, Library, Persona, sha256_file, utc_now, validate_name, write_json_atomic,
)
from personas.parallel import process_state, run_on_main

log = logging.getLogger(__name__)

REF_RESOLUTION = 512  # the smallest size refs/ are stored at
WORK_DIR = ".work"  # <library>/.work/<name>/: checkpoints of an unfinished run, never the persona itself


@dataclass
class TrainResult:
    persona: Persona
    steps: int
    seconds: float
    steps_per_second: float
    final_loss: float
    peak_memory_gb: float | None


class TrainingInterrupted(GroupshotError):
    """Ctrl-C during training: a checkpoint was saved and `--resume` continues."""


def persona_tokens(name: str, n: int) -> list[str]:
    """Token strings as diffusers' load_textual_inversion names a multi-vector embedding."""
    first = f"<{name}>"
    return [first] + [f"{first}_{i}" for i in range(1, n)]


def _device_and_precision(config: TrainConfig) -> tuple[str, str]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mp = config.mixed_precision
    if mp == "auto":
        mp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device == "cuda" else "no"
    if device == "cpu" and mp == "fp16":
        raise GroupshotError("mixed_precision=fp16 needs a GPU; use no or bf16 on the CPU")
    return device, mp


def _step_generator(seed: int, step: int, device):
    import torch

    # One independent stream per step: resume needs no RNG state, only the step number.
    # Drawn on the training device: a host-to-device copy of pageable memory would
    # synchronise the GPU every step.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63))


def train_persona(
    name: str,
    photos: Sequence[str | os.PathLike] | None,
    config: TrainConfig,
    *,
    library: Library | None = None,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train persona `name` from `photos` and commit it to the library atomically.

    `stop_after` ends the run early (after saving a checkpoint) and is for tests of resume.
    """
    validate_name(name)
    library = library or Library()
    work = library.root / WORK_DIR / name
    with contextlib.ExitStack() as held:
        def setup() -> TrainConfig:
            # Under `accelerate launch` only the main process holds the lock, checks the
            # photos and writes the work folder; the others get its config (or its error).
            # Every check that writes nothing comes first: a bad input leaves the library as it was.
            report = _check_before_writing(name, work, photos, config, resume=resume, restart=restart)
            library.recover()
            held.enter_context(library.lock(name))
            library.discard_staging(name)  # a save that was killed half way
            return _setup_work_dir(name, work, report, config, resume=resume, restart=restart)

        config = run_on_main(setup)
        import torch

        try:
            return _train(name, config, library, work, progress=progress, stop_after=stop_after)
        except torch.cuda.OutOfMemoryError:  # before the loop (which says its step itself): the model, the latents
            raise GroupshotError(_out_of_memory_message(name, config, _device_and_precision(config)[1], None, work)) from None


def _check_before_writing(name: str, work: Path, photos: Sequence[str | os.PathLike] | None, config: TrainConfig, *,
                          resume: bool, restart: bool) -> Any:
    """Refuse a run before anything is written: no run to resume (or one in the way), a
    precision the device lacks, a base model that is missing or pickled, unusable photos.
    Returns the photo report (None when resuming: the run's photos are already cropped)."""
    from personas.models import SINGLE_FILE_SUFFIXES, BASE_MODEL_WEIGHTS, check_safetensors_weights, resolve_model_folder

    state_file = work / "state.json"
    if resume:
        if not state_file.is_file():
            raise GroupshotError(f"no unfinished training of {name!r} to resume in {work}; start it without --resume")
        config = TrainConfig.from_dict(json.loads(state_file.read_text())["config"], source=str(state_file))
    elif state_file.is_file() and not restart:
        return None  # _setup_work_dir says what to do, under the lock
    _device_and_precision(config)
    path = Path(config.base_model).expanduser()
    if not (path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()):
        folder, _ = resolve_model_folder(config.base_model)
        check_safetensors_weights(folder, BASE_MODEL_WEIGHTS, what=f"base model {config.base_model!r}")
    if resume:
        return None
    if not photos:
        raise GroupshotError("no photos given: pass photo files or folders after the persona name")
    return _check_training_photos(photos, config)


def _setup_work_dir(name: str, work: Path, report: Any, config: TrainConfig, *,
                    resume: bool, restart: bool) -> TrainConfig:
    """The run's config: the saved one (resume) or `config` with a fresh work folder (of the
    photos in `report`, from _check_before_writing)."""
    state_file = work / "state.json"
    if resume:
        if not state_file.is_file():
            raise GroupshotError(f"no unfinished training of {name!r} to resume in {work}; start it without --resume")
        saved = json.loads(state_file.read_text())
        return TrainConfig.from_dict(saved["config"], source=str(state_file))
    if work.exists():
        if not restart and state_file.is_file():
            step = json.loads(state_file.read_text()).get("step", 0)
            raise GroupshotError(
                f"{name!r} has an unfinished training run (step {step}) in {work}; "
                "pass --resume to continue it or --restart to discard it"
            )
        shutil.rmtree(work)
    if report is None:  # another process finished or removed the run while this one started
        raise GroupshotError(f"the unfinished run of {name!r} changed while starting; run the command again")
    _prepare_work_dir(work, report, config)
    return config


def unfinished_run(library: Library, name: str) -> tuple[int, TrainConfig] | None:
    """(step, config) of an unfinished run of `name` (what `resume=True` would continue), or None."""
    state_file = library.root / WORK_DIR / validate_name(name) / "state.json"
    if not state_file.is_file():
        return None
    saved = json.loads(state_file.read_text())
    return int(saved.get("step", 0)), TrainConfig.from_dict(saved["config"], source=str(state_file))


def _check_training_photos(photos: Sequence[str | os.PathLike], config: TrainConfig) -> Any:
    """Check photos (before any model loads): a PhotoReport with at least min_photos accepted."""
    from personas.faces import load_face_backend
    from personas.photos import check_photos

    backend = None if config.face_model == "none" else load_face_backend(config.face_model)
    # refs/ serve eval as face references too, so they are kept at >= REF_RESOLUTION even
    # when training runs smaller (a 64 px face crop is too small for any face detector).
    report = check_photos([Path(p) for p in photos], backend=backend, min_side=config.resolution // 2,
                          resolution=max(config.resolution, REF_RESOLUTION))
    return report.require(config.min_photos)


def _prepare_work_dir(work: Path, report: Any, config: TrainConfig) -> None:
    """Write the checked photos' crops and the run's state into a fresh work folder."""
    tmp = work.with_name(work.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "refs").mkdir(parents=True)
    refs = []
    for i, ph in enumerate(report.accepted):
        rel = f"refs/{i:03d}.jpg"
        ph.image.save(tmp / rel, quality=95)
        refs.append({"file": rel, "source": _text(Path(ph.path).name), "sha256": ph.sha256,
                     "face_box": [round(float(v), 2) for v in ph.face_box]})
    photo_record = {
        "face_backend": report.face_model,
        "accepted": [{"file": r["file"], "source": r["source"], "sha256": r["sha256"]} for r in refs],
        "rejected": [{"file": _text(str(r.path)), "reason": r.reason} for r in report.rejected],
    }
    write_json_atomic(tmp / "photos.json", photo_record)
    write_json_atomic(tmp / "state.json", {"config": config.to_dict(), "refs": refs, "step": 0})
    work.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, work)


def _text(file_name: str) -> str:
    """A file name as JSON can hold it: bytes that are not UTF-8 become \\xNN escapes."""
    return os.fsencode(file_name).decode("utf-8", "backslashreplace")


def _train(name: str, config: TrainConfig, library: Library, work: Path, *, progress: bool,
           stop_after: int | None) -> TrainResult:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from PIL import Image
    from tqdm.auto import tqdm

    from personas.models import load_base_model

    state = json.loads((work / "state.json").read_text())
    refs = state["refs"]
    device, mp = _device_and_precision(config)
    # accelerate places the model and runs data parallel under `accelerate launch`; precision
    # (autocast, loss scaling) is ours, so that one process can train several personas
    # with different settings (accelerate's state is a process-wide singleton).
    from accelerate.state import AcceleratorState

    if process_state().num_processes == 1:
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=device == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1 and config.prior_preservation:
        # The prior term is a second forward through the DDP-wrapped UNet per backward; not
        # supported data-parallel yet.
        raise GroupshotError("prior_preservation=true is not supported with several processes yet; train on one GPU")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    t_start = time.perf_counter()

    # -- model -----------------------------------------------------------------------------
    base = load_base_model(config.base_model)
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32)  # fp16 VAE encodes can overflow; it runs once
    unet.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    uses_tokens = config.method in ("ti", "pivotal")
    uses_lora = config.method in ("lora", "pivotal")
    tokens = persona_tokens(name, config.num_tokens) if uses_tokens else []
    # Prompts through a diffusers pipeline name only the first token (maybe_convert_prompt
    # expands it); the caption we tokenize ourselves spells every token out.
    person_words = f"{tokens[0]} {config.class_word}" if uses_tokens else f"{name} {config.class_word}"
    caption = config.caption.format(person=" ".join(tokens + [config.class_word]) if uses_tokens else person_words)

    # New tokens: a separate trainable (n, D) table spliced into the frozen embedding
    # output by a hook, so the 49k-row matrix never needs a gradient or an optimizer state.
    new_emb = None
    if uses_tokens:
        n_added = tokenizer.add_tokens(tokens)
        if n_added != len(tokens):
            raise GroupshotError(f"tokens {tokens} clash with the base model's vocabulary; rename the persona")
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from new_emb
        first_id = tokenizer.convert_tokens_to_ids(tokens[0])
        emb_layer = text_encoder.get_input_embeddings()
        init_ids = tokenizer(config.class_word, add_special_tokens=False).input_ids
        init = emb_layer.weight[init_ids].float().mean(0).detach()  # (D,) start from the class word
        new_emb = torch.nn.Parameter(init.repeat(len(tokens), 1).to(accelerator.device))  # (n, D)

        def splice(module, inputs, output):
            ids = inputs[0]  # (B, 77)
            rows = new_emb[(ids - first_id).clamp(0, len(tokens) - 1)].to(output.dtype)  # (B, 77, D)
            # torch.where, not boolean indexing: no host sync, so CUDA graphs can hold it.
            return torch.where((ids >= first_id)[..., None], rows, output)

        emb_layer.register_forward_hook(splice)

    lora_params: list[torch.nn.Parameter] = []
    if uses_lora:
        from peft import LoraConfig

        torch.manual_seed(config.seed)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=list(UNET_TARGETS)))
        if config.text_encoder_lora:
            text_encoder.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.alpha,
                                                init_lora_weights="gaussian", target_modules=list(TEXT_TARGETS)))
        for m in (unet, text_encoder):
            for p in m.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # fp32 trainable weights under bf16/fp16 autocast
                    lora_params.append(p)

    groups = []
    if lora_params:
        groups.append({"params": lora_params, "lr": config.learning_rate})
    if new_emb is not None:
        groups.append({"params": [new_emb], "lr": config.embedding_lr, "weight_decay": 0.0})
    on_gpu = accelerator.device.type == "cuda"
    # CUDA graphs replay a whole step (forward, backward, AdamW) with one launch: the UNet's
    # thousands of small kernels otherwise leave the GPU waiting on Python.
    use_graph = (config.cuda_graph and on_gpu and mp != "fp16" and config.gradient_accumulation == 1
                 and not config.prior_preservation and accelerator.num_processes == 1 and not config.compile_unet)
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2,
                                  **({"fused": True, "capturable": use_graph} if on_gpu else {}))
    scaler = torch.amp.GradScaler("cuda", enabled=mp == "fp16")

    # -- cached inputs -----------------------------------------------------------------------
    images = [Image.open(work / r["file"]).convert("RGB") for r in refs]
    latents_mean, latents_std, face_masks = _encode_photos(vae, images, [r["face_box"] for r in refs], config,
                                                           accelerator.device)  # (2N, 4, h, w) each
    scaling = vae.config.scaling_factor
    prior = _class_latents(base, config, accelerator.device, weight_dtype, work) if config.prior_preservation else None
    vae.to("cpu")  # only validation needs it again
    token_ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(accelerator.device)  # (1, 77)
    class_ids = tokenizer(config.caption.format(person=config.class_word), padding="max_length",
                          max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(accelerator.device)
    text_trains = uses_tokens or config.text_encoder_lora
    cached_text = None
    if not text_trains:
        with torch.no_grad():
            cached_text = text_encoder(token_ids)[0]  # (1, 77, D)

    # -- resume --------------------------------------------------------------------------------
    start_step = 0
    losses: list[tuple[int, float, float]] = []  # (step, loss, seconds since start)
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file() and state.get("step", 0) > 0:
        saved = _load_torch_file(ckpt, accelerator.device, keys=("step", "lora", "new_emb", "optimizer", "losses"))
        for p, v in zip(lora_params, saved["lora"]):
            p.data.copy_(v)
        if new_emb is not None:
            new_emb.data.copy_(saved["new_emb"])
        optimizer.load_state_dict(saved["optimizer"])
        start_step = int(saved["step"])
        losses = [tuple(x) for x in saved["losses"]]
        log.info("resuming %s at step %d", name, start_step)

    unet_t = accelerator.prepare(unet)  # DDP-wrapped under `accelerate launch`, else unchanged
    if config.channels_last:
        unet_t.to(memory_format=torch.channels_last)
    if config.compile_unet:
        unet_t = torch.compile(unet_t)

    def save_checkpoint(step: int) -> None:
        if not accelerator.is_main_process:
            return
        tmp = work / "checkpoint.pt.tmp"
        torch.save({"step": step, "lora": [p.detach() for p in lora_params],
                    "new_emb": None if new_emb is None else new_emb.detach(),
                    "optimizer": optimizer.state_dict(), "losses": losses}, tmp)
        os.replace(tmp, ckpt)
        write_json_atomic(work / "state.json", {**state, "step": step})

    # -- loop ------------------------------------------------------------------------------------
    n_photos = latents_mean.shape[0] // 2
    end_step = config.max_train_steps if stop_after is None else min(config.max_train_steps, stop_after)
    bar = tqdm(total=config.max_train_steps, initial=start_step, desc=f"train {name}", unit="step",
               disable=not progress or not accelerator.is_main_process, dynamic_ncols=True)
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    dev = accelerator.device
    autocast = torch.autocast(dev.type, dtype=weight_dtype, enabled=mp != "no", cache_enabled=False)
    predicts_noise = noise_scheduler.config.prediction_type == "epsilon"

    def batch_for(step: int):
        """Step `step`'s inputs from its own generator: latents, noise, timesteps, loss weights,
        the loss normaliser and the generator.

        Data parallel: every process draws the whole global batch (batch_size x accumulation
        x processes) from the same (seed, step) stream and keeps its own slice, picked by its
        process index. So N processes at batch B train on exactly the batch that one process
        at batch N*B draws, and the face weights are normalised over that global batch: the
        averaged gradient is the one-process gradient, up to float rounding.
        """
        g = _step_generator(config.seed, step, dev)
        b = config.batch_size * config.gradient_accumulation * world
        idx = torch.randint(0, n_photos, (b,), generator=g, device=dev)
        if config.flip:  # flipped copies sit after the originals
            idx = idx + n_photos * (torch.rand(b, generator=g, device=dev) < 0.5).long()
        shape = (b, *latents_mean.shape[1:])
        eps_latent = torch.randn(shape, generator=g, device=dev)
        noise = torch.randn(shape, generator=g, device=dev)  # (b, 4, h, w)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g, device=dev)
        latents = (latents_mean[idx] + latents_std[idx] * eps_latent) * scaling  # (b, 4, h, w)
        weights = 1.0 + config.face_loss_weight * face_masks[idx]  # (b, 1, h, w)
        norm = weights.mean()  # over the global batch, micro-batches and processes alike
        mine = slice(rank * b // world, (rank + 1) * b // world)
        return latents[mine], noise[mine], timesteps[mine], weights[mine], norm, g

    def loss_of(latents, noise, timesteps, weights, norm, g):
        """Face-weighted denoising loss of one micro-batch (plus the prior term); `norm` is the
        mean face weight of the step's global batch (None: of this micro-batch)."""
        with autocast:
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w)
            if cached_text is not None:
                text = cached_text.expand(noisy.shape[0], -1, -1)
            else:
                text = text_encoder(token_ids.expand(noisy.shape[0], -1))[0]  # (B, 77, D)
            pred = unet_t(noisy.to(weight_dtype), timesteps, text.to(weight_dtype)).sample
            target = noise if predicts_noise else noise_scheduler.get_velocity(latents, noise, timesteps)
            loss = ((pred.float() - target.float()) ** 2 * weights).mean() / (weights.mean() if norm is None else norm)
            if prior is not None:
                loss = loss + config.prior_loss_weight * _prior_loss(
                    prior, unet_t, text_encoder, class_ids, noise_scheduler, g, dev, weight_dtype)
        return loss

    # DDP averages the UNet's LoRA gradients; the new token vectors and a text-encoder LoRA
    # live outside the wrapped UNet, so their gradients are averaged here.
    unet_param_ids = {id(p) for p in unet.parameters()}
    outside_ddp = [p for group in groups for p in group["params"] if id(p) not in unet_param_ids]

    def eager_step(batch):
        latents, noise, timesteps, weights, norm, g = batch
        total = 0.0
        for micro in range(config.gradient_accumulation):
            sl = slice(micro * config.batch_size, (micro + 1) * config.batch_size)
            last = micro == config.gradient_accumulation - 1
            with contextlib.nullcontext() if last or world == 1 else accelerator.no_sync(unet_t):
                loss = loss_of(latents[sl], noise[sl], timesteps[sl], weights[sl], norm, g) / config.gradient_accumulation
                scaler.scale(loss).backward()
            total = total + loss.detach()
        if world > 1:
            for p in outside_ddp:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return total

    graph = static = static_loss = None
    side_stream = torch.cuda.Stream() if use_graph else None

    def graph_step(batch, step: int):
        """The first steps run eagerly on a side stream (capture needs warm caches); then one
        captured step is replayed with each step's inputs copied into its static tensors."""
        nonlocal graph, static, static_loss
        if step < start_step + 3:
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                loss = eager_step(batch)
            torch.cuda.current_stream().wait_stream(side_stream)
            return loss
        if graph is None:
            static = [t.clone() for t in batch[:4]]
            optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_loss = loss_of(*static, None, None)
                static_loss.backward()
                optimizer.step()
        for dst, src in zip(static, batch[:4]):
            dst.copy_(src)
        graph.replay()
        return static_loss.detach().clone()

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _in_main_thread() else None
    pending = []  # device loss tensors not yet read: reading each step would sync the GPU
    t_loop = time.perf_counter()
    step = start_step
    try:
        unet_t.train()
        for step in range(start_step, end_step):
            batch = batch_for(step)
            loss = graph_step(batch, step) if use_graph else eager_step(batch)
            pending.append(loss)
            done = step + 1
            if done % config.log_every == 0 or done == end_step:
                now = time.perf_counter() - t_start
                logged = torch.stack(pending).float()
                if world > 1:  # the loss of the global batch: the mean of the processes' losses
                    logged = accelerator.reduce(logged, reduction="mean")
                for k, l in enumerate(logged.cpu().tolist()):
                    losses.append((done - len(pending) + k + 1, l, now))
                pending.clear()
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            bar.update(1)
            if config.validation_every and done % config.validation_every == 0 and accelerator.is_main_process:
                _validation_images(base, unet, text_encoder, tokenizer, config, person_words, work / "samples", done)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.max_train_steps:
                save_checkpoint(done)
            if interrupted:
                save_checkpoint(done)
                raise TrainingInterrupted(
                    f"training of {name!r} interrupted at step {done}; checkpoint saved, "
                    f"continue with `personas train {name} --resume`"
                )
        step = end_step
    except torch.cuda.OutOfMemoryError:
        # Nothing is saved now (the GPU is in no state to); the last checkpoint and any earlier
        # persona of this name stay as they were.
        raise GroupshotError(_out_of_memory_message(name, config, mp, step, work)) from None
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    loop_seconds = time.perf_counter() - t_loop
    steps_done = end_step - start_step
    if end_step < config.max_train_steps:  # stopped early on purpose (tests of resume)
        save_checkpoint(end_step)
        return TrainResult(persona=None, steps=end_step, seconds=loop_seconds,  # type: ignore[arg-type]
                           steps_per_second=steps_done / max(loop_seconds, 1e-9),
                           final_loss=losses[-1][1] if losses else math.nan, peak_memory_gb=_peak_gb())

    # -- save: build the persona beside the library, then swap it in ---------------------------
    if not accelerator.is_main_process:
        # Returns once the main process has saved the persona: a next stage of the same
        # processes finds it in the library. (If the main process fails, the launcher stops us.)
        accelerator.wait_for_everyone()
        return TrainResult(None, end_step, loop_seconds, steps_done / loop_seconds, losses[-1][1], _peak_gb())  # type: ignore[arg-type]
    unet_raw = accelerator.unwrap_model(unet_t)
    staged = library.staging(name)
    try:
        if config.validation_every and end_step % config.validation_every:
            _validation_images(base, unet, text_encoder, tokenizer, config, person_words, work / "samples", end_step)
        adapter_sha = emb_sha = None
        if uses_lora:
            weights = LoraWeights(
                unet=lora_from_peft(unet_raw),
                text_encoder=lora_from_peft(text_encoder) if config.text_encoder_lora else {},
                metadata={"groupshot_persona": name, "rank": config.lora_rank, "alpha": config.alpha},
            )
            save_lora(staged / ADAPTER_FILE, weights)
            adapter_sha = sha256_file(staged / ADAPTER_FILE)
        if new_emb is not None:
            save_embeddings(staged / EMBEDDINGS_FILE, new_emb, tokens)
            emb_sha = sha256_file(staged / EMBEDDINGS_FILE)
        shutil.copytree(work / "refs", staged / "refs")
        train_dir = staged / "train"
        train_dir.mkdir()
        if (work / "samples").is_dir():
            shutil.copytree(work / "samples", train_dir / "samples")
        shutil.copy(work / "photos.json", train_dir / "photos.json")
        (train_dir / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        _write_losses(train_dir, losses)
        total = time.perf_counter() - t_start
        persona = Persona(
            name=name, tokens=tokens, class_word=config.class_word, base_model=base.identity,
            method=config.method, hyperparameters=config.to_dict(),
            photos=[{k: r[k] for k in ("file", "source", "sha256")} for r in refs],
            adapter_sha256=adapter_sha, embeddings_sha256=emb_sha, created_at=utc_now(),
            trigger=person_words,
            extra={"steps": end_step, "final_loss": losses[-1][1] if losses else None,
                   "train_seconds": round(loop_seconds, 2), "total_seconds": round(total, 2),
                   "steps_per_second": round(steps_done / max(loop_seconds, 1e-9), 3),
                   "device": str(accelerator.device), "processes": world,
                   "global_batch_size": config.batch_size * config.gradient_accumulation * world,
                   "mixed_precision": mp, "peak_memory_gb": _peak_gb(),
                   "caption": caption},
        )
        persona = library.commit(name, staged, persona)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()  # the other processes return now (a no-op alone)
    return TrainResult(persona, end_step, loop_seconds, steps_done / max(loop_seconds, 1e-9),
                       losses[-1][1] if losses else math.nan, _peak_gb())


def lower_memory_settings(config: TrainConfig, mp: str) -> list[tuple[str, dict[str, Any]]]:
    """Changes to `config` that need less GPU memory, biggest saving first: (how to say it, the
    TrainConfig fields it changes). The out-of-memory message names them; benchmarks/oom_check.py
    tries each."""
    out = []
    if config.batch_size > 1:
        n = config.batch_size * config.gradient_accumulation
        out.append((f"batch_size = 1 with gradient_accumulation = {n} (same effective batch)",
                    {"batch_size": 1, "gradient_accumulation": n}))
    if not config.gradient_checkpointing:
        out.append(("gradient_checkpointing = true", {"gradient_checkpointing": True}))
    if mp == "no":
        out.append(("--mixed-precision fp16 (bf16 where supported)", {"mixed_precision": "fp16"}))
    if config.resolution > 256:
        smaller = max(256, config.resolution * 3 // 4 // 64 * 64)
        out.append((f"--resolution {smaller}", {"resolution": smaller}))
    for flag in ("text_encoder_lora", "cuda_graph", "prior_preservation"):
        if getattr(config, flag):
            out.append((f"{flag} = false", {flag: False}))
    return out


def _out_of_memory_message(name: str, config: TrainConfig, mp: str, step: int | None, work: Path) -> str:
    """One line: what ran out of memory, with which settings, and the settings that need less."""
    import torch

    where = ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        where = f" on {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    when = f"at step {step + 1} of" if step is not None else "outside the steps (model, cached latents, save) of"
    less = [text for text, _ in lower_memory_settings(config, mp)]
    state_file = work / "state.json"
    saved = json.loads(state_file.read_text()).get("step", 0) if state_file.is_file() else 0
    kept = f"the checkpoint at step {saved} is kept until then" if saved else "no checkpoint was saved"
    return (
        f"out of GPU memory {when} training {name!r}{where} with batch_size={config.batch_size}, "
        f"resolution={config.resolution}, mixed_precision={mp}, gradient_checkpointing="
        f"{str(config.gradient_checkpointing).lower()}; settings that need less memory: "
        + ("; ".join(less) if less else "none left: use a GPU with more memory")
        + f" (the = ones in a --config file); start again with them and --restart ({kept}, "
        "and an earlier persona of this name is unchanged)"
    )


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _peak_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _encode_photos(vae, images, face_boxes, config: TrainConfig, device):
    """Latent distributions of every photo and its mirror image, and face masks at latent size."""
    import numpy as np
    import torch

    arrays = [np.asarray(im.resize((config.resolution,) * 2), dtype=np.float32) / 127.5 - 1.0 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, R, R)
    x = torch.cat([x, x.flip(-1)])  # (2N, 3, R, R): originals, then mirrored
    means, stds = [], []
    with torch.no_grad():
        for chunk in x.split(4):
            dist = vae.encode(chunk.to(device)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)  # (2N, 4, h, w)
    h, w = mean.shape[-2:]
    masks = torch.zeros(len(images), 1, h, w)
    for i, (x0, y0, x1, y1) in enumerate(face_boxes):
        f = images[i].width / w  # face boxes are in the stored photo's pixels
        masks[i, 0, int(y0 / f): math.ceil(y1 / f), int(x0 / f): math.ceil(x1 / f)] = 1.0
    masks = torch.cat([masks, masks.flip(-1)]).to(device)  # (2N, 1, h, w)
    return mean, std, masks


def _load_torch_file(path: Path, device, keys: tuple[str, ...] = ()) -> Any:
    """A file of the work folder, read with weights_only (tensors and plain containers, never
    code); anything else, such as a planted pickle, is refused with the way out."""
    import torch

    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: not a file this run wrote
        raise GroupshotError(f"{path}: not a file groupshot wrote ({type(e).__name__}); "
                             "discard the unfinished run with --restart") from None
    if keys and not (isinstance(data, dict) and set(keys) <= set(data)):
        raise GroupshotError(f"{path}: not a groupshot checkpoint; discard the unfinished run with --restart")
    return data


def _class_latents(base, config: TrainConfig, device, dtype, work: Path):
    """Latents of class images generated by the base model (prior preservation), cached on disk."""
    import torch

    cache = work / "class_latents.pt"
    if cache.is_file():
        return _load_torch_file(cache, device)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**base.components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(device)
    prompt = config.caption.format(person=config.class_word)
    latents = []
    g = torch.Generator(device="cpu").manual_seed(config.seed + 7919)
    for _ in range(config.num_class_images):
        out = pipe(prompt, height=config.resolution, width=config.resolution, num_inference_steps=25,
                   generator=g, output_type="latent").images  # (1, 4, h, w), already scaled
        latents.append(out.float() / base.vae.config.scaling_factor)
    lat = torch.cat(latents)
    torch.save(lat, cache)
    return lat.to(device)


def _prior_loss(prior, unet, text_encoder, class_ids, scheduler, g, device, dtype):
    """Denoising loss on one generated class image: keeps the class word's meaning."""
    import torch
    import torch.nn.functional as F

    i = torch.randint(0, prior.shape[0], (1,), generator=g, device=device)
    noise = torch.randn((1, *prior.shape[1:]), generator=g, device=device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g, device=device)
    noisy = scheduler.add_noise(prior[i] * 0.18215, noise, t)  # (1, 4, h, w)
    text = text_encoder(class_ids)[0]
    pred = unet(noisy.to(dtype), t, text.to(dtype)).sample
    return F.mse_loss(pred.float(), noise.float())


def _validation_images(base, unet, text_encoder, tokenizer, config, person_words, folder: Path, step: int) -> None:
    """Render the validation prompts with the adapter as it is now, one grid per step."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    device = next(unet.parameters()).device
    vae = base.vae.to(device)
    was_training = unet.training
    unet.eval()
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = config.resolution
    tiles = []
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for i, prompt in enumerate(config.validation_prompts):
            g = torch.Generator(device="cpu").manual_seed(config.seed + i)
            tiles.append(pipe(prompt.format(person=person_words), height=size, width=size, generator=g,
                              num_inference_steps=config.validation_steps).images[0])
    grid = Image.new("RGB", (size * len(tiles), size))
    for i, t in enumerate(tiles):
        grid.paste(t, (i * size, 0))
    grid.save(folder / f"step-{step:06d}.png")
    vae.to("cpu")
    unet.train(was_training)


def _write_losses(folder: Path, losses: list[tuple[int, float, float]]) -> None:
    with open(folder / "loss.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "seconds"])
        for step, loss, sec in losses:
            w.writerow([step, f"{loss:.6f}", f"{sec:.3f}"])
    plot_loss(losses, folder / "loss.png")


def plot_loss(losses: list[tuple[int, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not losses:
        return
    steps = np.array([l[0] for l in losses])
    vals = np.array([l[1] for l in losses])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, vals, lw=0.6, alpha=0.4, label="loss")
    k = max(1, len(vals) // 20)
    if len(vals) > k:
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
