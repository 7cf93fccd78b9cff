"""Faults: training killed at random points, two trainings of one persona at once, a full disk
and a read-only folder while personas / renders / reports are written, Ctrl-C, and running
out of GPU memory (simulated on the CPU). Each time the user gets one clear line, what was
there before is intact, nothing half-written is left for a later run to trip over, and the
work can go on (`--resume`).

Full disks and read-only folders are real where the tests may mount (root): a small tmpfs
that is filled up at the moment of saving, and a read-only bind mount. Where mounting is not
permitted they fall back to making the writer raise OSError(ENOSPC) / OSError(EROFS), and
say so in the test's output (`-rs` lists the fallbacks as notes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from PIL import Image

from personas.config import TrainConfig
from personas.library import Library, sha256_file

TRAIN = dict(resolution=64, max_train_steps=6, validation_every=0, checkpoint_every=1, log_every=1,
             class_word="woman", learning_rate=5e-3, embedding_lr=5e-2, face_model="none", min_photos=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores; and the same arithmetic as the OMP_NUM_THREADS=1 subprocesses
    yield
    torch.set_num_threads(threads)


# -- helpers ------------------------------------------------------------------------------------


def config_file(folder: Path, tiny_model: Path, **kw) -> Path:
    path = folder / f"train-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(TrainConfig(base_model=str(tiny_model), **{**TRAIN, **kw}).to_toml())
    return path


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (symlinks by target), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file() and not p.name.endswith(".lock"):
            out[str(p.relative_to(root))] = sha256_file(p)
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary folders and files of interrupted writes."""
    return sorted(p.name for p in root.iterdir() if re.search(r"\.(tmp|old)-|\.run-.*\.tmp$|\.removing-", p.name))


def one_error_line(prog: str, code: int, err: str) -> str:
    assert "Traceback" not in err, err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "it/s]" not in l and "%|" not in l]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), f"exit {code}:\n{err}"
    return lines[0]


def cli(prog: str, argv: list, capsys) -> tuple[int, str]:
    import compose.cli
    import eval.cli
    import personas.cli

    capsys.readouterr()
    main = {"personas": personas.cli.main, "compose": compose.cli.main, "evaluate": eval.cli.main}[prog]
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def train_cmd(library: Path, *args) -> list[str]:
    return [sys.executable, "-m", "personas.cli", "--library", str(library), "train", "eileen", *map(str, args), "--quiet"]


def adapters_of(persona) -> dict[str, torch.Tensor]:
    from personas.adapters import load_embeddings, load_lora

    lora = load_lora(persona.adapter_path)
    out = {f"{k}.{ab}": t for k, (a, b) in lora.unet.items() for ab, t in (("A", a), ("B", b))}
    out["emb"] = load_embeddings(persona.embeddings_path)
    return out


def assert_same_adapters(a, b) -> None:
    ta, tb = adapters_of(a), adapters_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, eileen_photos):
    """The persona an uninterrupted run of TRAIN makes (in this process)."""
    from personas.train import train_persona

    lib = Library(tmp_path_factory.mktemp("reference"))
    return train_persona("eileen", [eileen_photos], TrainConfig(base_model=str(tiny_model), **TRAIN),
                         library=lib, progress=False).persona


@pytest.fixture
def previous(tmp_path, tiny_model):
    """A library holding an earlier persona `eileen` (random adapters): what a failed run must not touch."""
    from personas.testing import make_random_persona

    def make(root: Path) -> tuple[Library, dict[str, str]]:
        lib = Library(root)
        make_random_persona(lib, "eileen", tiny_model, seed=3, class_word="woman")
        return lib, tree(lib.path("eileen"))
    return make


# -- small disks and read-only folders ---------------------------------------------------------


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "8m") -> Iterator[bool]:
    """`folder` on its own tmpfs of `size` (True), or a plain folder where mounting is not allowed (False)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[bool]:
    """`folder` made read-only by a read-only bind mount (True: root ignores chmod), else not (False)."""
    mounted = os.geteuid() == 0 and _mount("--bind", str(folder), str(folder))
    if mounted and not _mount("-o", "remount,bind,ro", str(folder)):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_up(folder: Path) -> Path:
    """Fill the file system of `folder` to the last block; returns the filler (delete it to free the space)."""
    filler = folder / f"filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:  # unbuffered: nothing is left to flush (and fail) on close
        for block in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * block):
                    pass
    finally:
        os.close(fd)
    return filler


def fault_at(monkeypatch, module, attr: str, fault: Callable[[], None]) -> None:
    """Run `fault()` just before `module.attr` is called (then call it)."""
    real = getattr(module, attr)

    def wrapped(*args, **kwargs):
        fault()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, wrapped)


def raise_oserror(code: int) -> Callable[[], None]:
    def fault():
        raise OSError(code, os.strerror(code), "(simulated)")
    return fault


def note_fallback(what: str) -> None:
    warnings.warn(f"{what}: mounting is not permitted here, so the fault was simulated by raising OSError")


# -- training killed at random points ----------------------------------------------------------


def _wait(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready():
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the training never got to the point to interrupt")
        time.sleep(0.005)


def _step(state_file: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(json.loads(state_file.read_text())["step"])
    return -1


@pytest.mark.slow
def test_training_survives_kills_at_random_points(tmp_path, tiny_model, eileen_photos, reference, previous):
    """Three interruptions of `personas train` in a subprocess, each at a random moment after a
    milestone (model loading, a checkpoint, the save): SIGKILL, SIGINT (Ctrl-C), SIGKILL. After
    each the earlier persona loads (sha256s verified); then `--resume` finishes, and the persona
    equals an uninterrupted run's."""
    rng = random.Random(20261125)
    lib, before = previous(tmp_path / "people")
    cfg = config_file(tmp_path, tiny_model)
    work = lib.root / ".work" / "eileen"
    milestones = {
        "loading": lambda: (work / "state.json").is_file(),
        "checkpoint": lambda start: _step(work / "state.json") > start,
        "saving": lambda: any(lib.root.glob(".eileen.tmp-*")),
    }
    interrupted = []
    for milestone, sig, delay in (("loading", signal.SIGKILL, 2.0), ("checkpoint", signal.SIGINT, 0.3),
                                  ("saving", signal.SIGKILL, 0.3)):
        resume = (work / "state.json").is_file()
        start = _step(work / "state.json")
        proc = subprocess.Popen(train_cmd(lib.root, *(["--resume"] if resume else [eileen_photos, "--config", cfg])),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        check = milestones[milestone]
        _wait(proc, (lambda: check(start)) if milestone == "checkpoint" else check)
        time.sleep(rng.uniform(0, delay))
        if proc.poll() is None:
            proc.send_signal(sig)
            interrupted.append(f"{sig.name} after {milestone}")
        _, err = proc.communicate(timeout=240)
        if interrupted and interrupted[-1].endswith(milestone):
            interrupted[-1] += f" (exit {proc.returncode})"
        assert "Traceback" not in err, err
        if sig == signal.SIGINT and proc.returncode != 0:
            # Ctrl-C in the loop saves a checkpoint and says how to go on (exit 2); before
            # the loop there is nothing to save (exit 130).
            line = one_error_line("personas", 2, err) if proc.returncode == 2 else err.strip()
            assert proc.returncode in (2, 130), err
            if proc.returncode == 2:
                assert "checkpoint saved" in line and "personas train eileen --resume" in line, line
        # The persona in the library is always whole: the earlier one, or (killed after the
        # swap) the finished new one.
        now = lib.load("eileen")
        assert tree(now.path) == before or now.extra.get("steps") == TRAIN["max_train_steps"]
    assert len(interrupted) >= 2, f"only {interrupted} landed: the runs finished too fast"

    runs = 0
    while (work / "state.json").is_file() or lib.load("eileen").extra.get("steps") != TRAIN["max_train_steps"]:
        args = ["--resume"] if (work / "state.json").is_file() else [eileen_photos, "--config", cfg]
        proc = subprocess.run(train_cmd(lib.root, *args), capture_output=True, text=True, env=subprocess_env(),
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs += 1
        assert runs <= 2
    assert leftovers(lib.root) == []
    assert not (work / "state.json").exists()
    assert_same_adapters(lib.load("eileen"), reference)
    print(f"interruptions survived: {interrupted}")


@pytest.mark.slow
def test_second_training_of_the_same_persona_is_refused(tmp_path, tiny_model, eileen_photos):
    """Two `personas train eileen` processes at once: the second stops at the lock, exit 2, one line,
    and (even with --restart) leaves the first one's work folder alone."""
    lib = tmp_path / "people"
    cfg = config_file(tmp_path, tiny_model, max_train_steps=100_000, checkpoint_every=0)
    first = subprocess.Popen(train_cmd(lib, eileen_photos, "--config", cfg), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        _wait(first, lambda: (lib / ".work" / "eileen" / "state.json").is_file())
        assert first.poll() is None, first.stderr.read()
        work_before = tree(lib / ".work" / "eileen")
        for extra in ([], ["--restart"]):
            second = subprocess.run(train_cmd(lib, eileen_photos, "--config", cfg, *extra), capture_output=True,
                                    text=True, env=subprocess_env(), timeout=240)
            line = one_error_line("personas", second.returncode, second.stderr)
            assert "'eileen' is being trained by another process" in line and ".eileen.lock" in line, line
            assert tree(lib / ".work" / "eileen") == work_before
        assert first.poll() is None  # the first one never noticed
    finally:
        first.kill()
        first.wait()


def test_two_trainings_in_one_process_are_refused(tmp_path, tiny_model, eileen_photos, capsys):
    """The lock as the CLI reports it, without subprocesses (the slow test above runs two processes)."""
    lib = Library(tmp_path / "people")
    with lib.lock("eileen"):
        code, err = cli("personas", ["--library", lib.root, "train", "eileen", eileen_photos,
                                     "--config", config_file(tmp_path, tiny_model)], capsys)
    line = one_error_line("personas", code, err)
    assert "being trained by another process" in line
    assert not (lib.root / ".work").exists()


def test_a_killed_save_is_cleaned_up_or_restored(tmp_path, tiny_model, eileen_photos, reference, capsys):
    """What a SIGKILL can leave, made by hand: a half-built `.eileen.tmp-*` (killed while saving) and
    the old persona moved aside as `.eileen.old-*` (killed between the two renames of the swap).
    The next run restores the old persona, deletes the half-built one, and trains."""
    lib = Library(tmp_path / "people")
    shutil.copytree(reference.path, lib.root / f".eileen.old-{uuid.uuid4().hex[:8]}")
    half = lib.root / f".eileen.tmp-{uuid.uuid4().hex[:8]}"
    (half / "refs").mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    assert lib.names() == []  # neither is a persona to readers
    lib.recover()
    assert lib.load("eileen").adapter_sha256 == reference.adapter_sha256
    code, err = cli("personas", ["--library", lib.root, "train", "eileen", eileen_photos,
                                 "--config", config_file(tmp_path, tiny_model, max_train_steps=2), "--quiet"], capsys)
    assert code == 0, err
    assert leftovers(lib.root) == [] and lib.load("eileen").extra["steps"] == 2


# -- Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model, eileen_photos, reference, previous,
                                                       monkeypatch, capsys):
    """SIGINT delivered to this process during step 3: the step finishes, a checkpoint is saved,
    the CLI says how to go on (exit 2); `--resume` finishes with the uninterrupted run's persona."""
    import personas.train

    lib, before = previous(tmp_path / "people")
    real = personas.train._step_generator

    def ctrl_c_at_step_2(seed, step, device):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(seed, step, device)

    monkeypatch.setattr(personas.train, "_step_generator", ctrl_c_at_step_2)
    code, err = cli("personas", ["--library", lib.root, "train", "eileen", eileen_photos,
                                 "--config", config_file(tmp_path, tiny_model), "--quiet"], capsys)
    line = one_error_line("personas", code, err)
    assert "interrupted at step 3; checkpoint saved" in line and "personas train eileen --resume" in line, line
    assert json.loads((lib.root / ".work" / "eileen" / "state.json").read_text())["step"] == 3
    assert tree(lib.path("eileen")) == before and leftovers(lib.root) == []

    monkeypatch.setattr(personas.train, "_step_generator", real)
    code, err = cli("personas", ["--library", lib.root, "train", "eileen", "--resume", "--quiet"], capsys)
    assert code == 0, err
    assert_same_adapters(lib.load("eileen"), reference)


# -- out of GPU memory (simulated) ---------------------------------------------------------------------


def test_out_of_gpu_memory_names_the_settings_that_need_less(tmp_path, tiny_model, eileen_photos, previous,
                                                             monkeypatch, capsys):
    """torch.cuda.OutOfMemoryError in step 3 (raised by hand: the CPU has no GPU memory to run out
    of): one line naming the run's settings and smaller ones, the checkpoint of step 2 and the
    earlier persona untouched, no half-saved persona."""
    import personas.train

    lib, before = previous(tmp_path / "people")
    real = personas.train._step_generator

    def oom_at_step_2(seed, step, device):
        if step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(seed, step, device)

    monkeypatch.setattr(personas.train, "_step_generator", oom_at_step_2)
    cfg = config_file(tmp_path, tiny_model, batch_size=2)
    code, err = cli("personas", ["--library", lib.root, "train", "eileen", eileen_photos, "--config", cfg,
                                 "--quiet"], capsys)
    line = one_error_line("personas", code, err)
    for fragment in ("out of GPU memory at step 3 of training 'eileen'", "batch_size=2", "resolution=64",
                     "batch_size = 1 with gradient_accumulation = 2", "gradient_checkpointing = true",
                     "--mixed-precision fp16", "--restart", "the checkpoint at step 2 is kept"):
        assert fragment in line, (fragment, line)
    assert tree(lib.path("eileen")) == before and leftovers(lib.root) == []
    assert json.loads((lib.root / ".work" / "eileen" / "state.json").read_text())["step"] == 2


def test_out_of_gpu_memory_before_the_first_step(tmp_path, tiny_model, eileen_photos, previous, monkeypatch, capsys):
    """Out of memory while the photos' latents are cached (or the model is placed): the same one
    line, saying it happened outside the steps, and nothing of the earlier persona touched."""
    import personas.train

    lib, before = previous(tmp_path / "people")

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(personas.train, "_encode_photos", oom)
    code, err = cli("personas", ["--library", lib.root, "train", "eileen", eileen_photos,
                                 "--config", config_file(tmp_path, tiny_model), "--quiet"], capsys)
    line = one_error_line("personas", code, err)
    assert "out of GPU memory outside the steps" in line and "gradient_checkpointing = true" in line, line
    assert "no checkpoint was saved" in line
    assert tree(lib.path("eileen")) == before and leftovers(lib.root) == []


def test_out_of_memory_message_suggests_a_lower_resolution():
    from personas.train import _out_of_memory_message

    config = TrainConfig(resolution=512, gradient_checkpointing=True, text_encoder_lora=True)
    msg = _out_of_memory_message("brad", config, "bf16", 0, Path("/nonexistent"))
    assert "--resolution 384" in msg and "text_encoder_lora = false" in msg and "no checkpoint was saved" in msg
    assert "gradient_checkpointing = true" not in msg and "--mixed-precision" not in msg
    assert "\n" not in msg


# -- full disk and read-only folder: training ------------------------------------------------------


def test_disk_full_while_saving_a_persona(tmp_path, tiny_model, eileen_photos, previous, monkeypatch, capsys):
    """The library's disk fills up as the new persona is written: one line, the earlier persona
    intact, no half-built folder; once there is space again `--resume` finishes."""
    import personas.train

    disk = tmp_path / "disk"
    with small_disk(disk) as real_disk:
        lib, before = previous(disk / "people")
        fillers = []
        fault_at(monkeypatch, personas.train, "save_lora",
                 (lambda: fillers.append(fill_up(disk))) if real_disk else raise_oserror(errno.ENOSPC))
        if not real_disk:
            note_fallback("disk full while saving a persona")
        code, err = cli("personas", ["--library", lib.root, "train", "eileen", eileen_photos,
                                     "--config", config_file(tmp_path, tiny_model, max_train_steps=2), "--quiet"], capsys)
        line = one_error_line("personas", code, err)
        assert "disk full while writing" in line and "free some space" in line, line
        assert tree(lib.path("eileen")) == before and leftovers(lib.root) == []
        lib.load("eileen")

        for f in fillers:
            f.unlink()
        monkeypatch.undo()
        code, err = cli("personas", ["--library", lib.root, "train", "eileen", "--resume", "--quiet"], capsys)
        assert code == 0, err
        assert lib.load("eileen").extra["steps"] == 2 and leftovers(lib.root) == []


def test_read_only_library(tmp_path, tiny_model, eileen_photos, previous, monkeypatch, capsys):
    """Training into, or removing from, a read-only library: one line naming the file system
    problem, every file as it was."""
    lib, before = previous(tmp_path / "people")
    with read_only(lib.root) as really:
        if not really:
            note_fallback("read-only library")
            monkeypatch.setattr(Library, "lock", lambda self, name: (_ for _ in ()).throw(
                OSError(errno.EROFS, "Read-only file system", str(self.root / f".{name}.lock"))))
            monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(
                OSError(errno.EROFS, "Read-only file system", str(a[0]))))
        for argv in (["train", "eileen", eileen_photos, "--config", config_file(tmp_path, tiny_model)],
                     ["remove", "eileen"]):
            code, err = cli("personas", ["--library", lib.root, *argv], capsys)
            line = one_error_line("personas", code, err)
            assert "read-only file system" in line and str(lib.root) in line, line
            assert tree(lib.path("eileen")) == before
    lib.load("eileen")


# -- full disk and read-only folder: compose's run folder and evaluate's report ---------------------------


@pytest.fixture
def ann(tmp_path, tiny_model, astronaut) -> Library:
    """A persona with random adapters and one reference photo (compose and evaluate both use it)."""
    from personas.library import write_json_atomic
    from personas.testing import make_random_persona

    lib = Library(tmp_path / "people")
    p = make_random_persona(lib, "ann", tiny_model, seed=1, class_word="woman")
    (p.path / "refs").mkdir()
    Image.fromarray(astronaut).crop((100, 0, 356, 256)).save(p.path / "refs" / "000.jpg", quality=95)
    record = json.loads((p.path / "persona.json").read_text())
    record["photos"] = [{"file": "refs/000.jpg", "source": "a.png", "sha256": "0" * 64}]
    write_json_atomic(p.path / "persona.json", record)
    return lib


def _compose_argv(tiny_model: Path, ann: Library, out: Path) -> list:
    return ["--base-model", tiny_model, "--controlnet", tiny_model / "controlnet", "--library", ann.root,
            "--people", "ann", "--prompt", "a woman", "--size", "64x64", "--steps", "1", "--out", out]


def _previous_run(out: Path) -> dict[str, str]:
    run = out / "20261125-160000-ann-a-woman"
    run.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(run / "000.png")
    (run / "render.json").write_text('{"schema_version": 1}\n')
    return tree(out)


def test_disk_full_while_writing_a_render(tmp_path, tiny_model, ann, monkeypatch, capsys):
    import compose.pipeline

    disk = tmp_path / "disk"
    with small_disk(disk) as real_disk:
        out = disk / "renders"
        before = _previous_run(out)
        fault_at(monkeypatch, compose.pipeline.GroupComposer, "_record",
                 (lambda: fill_up(disk)) if real_disk else raise_oserror(errno.ENOSPC))
        if not real_disk:
            note_fallback("disk full while writing a render")
        code, err = cli("compose", _compose_argv(tiny_model, ann, out), capsys)
        line = one_error_line("compose", code, err)
        assert "disk full while writing" in line, line
        assert tree(out) == before and leftovers(out) == []


def test_disk_full_while_exporting_a_persona(tmp_path, ann, monkeypatch, capsys):
    """`personas export` on a full disk: one line naming the file, no half-written file left
    (it wrote through safetensors' own writer before, whose error was a traceback)."""
    import personas.interop

    disk = tmp_path / "disk"
    with small_disk(disk) as real_disk:
        before = tree(disk)
        fault_at(monkeypatch, personas.interop, "_write_safetensors",
                 (lambda: fill_up(disk)) if real_disk else raise_oserror(errno.ENOSPC))
        if not real_disk:
            note_fallback("disk full while exporting a persona")
        code, err = cli("personas", ["--library", ann.root, "export", "ann", "--format", "kohya",
                                     "--out", disk / "ann.safetensors"], capsys)
        line = one_error_line("personas", code, err)
        assert "disk full while writing" in line, line
        assert {k: v for k, v in tree(disk).items() if not k.startswith("filler-")} == before
        assert leftovers(disk) == [] and not list(disk.glob("*.safetensors"))


def test_read_only_render_folder(tmp_path, tiny_model, ann, capsys):
    out = tmp_path / "renders"
    before = _previous_run(out)
    with read_only(out) as really:
        if not really:
            pytest.skip("read-only bind mounts need root (the disk-full test covers the same clean-up path)")
        code, err = cli("compose", _compose_argv(tiny_model, ann, out), capsys)
    line = one_error_line("compose", code, err)
    assert "read-only file system" in line and str(out) in line, line
    assert tree(out) == before


@pytest.fixture
def eval_inputs(tmp_path, ann, astronaut, dlib_backend, monkeypatch) -> list:
    import personas.faces
    from personas.testing import write_tiny_clip

    monkeypatch.setattr(personas.faces, "load_face_backend", lambda *a, **k: dlib_backend)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(astronaut).save(images / "000.png")
    clip = write_tiny_clip(tmp_path / "clip")
    return ["--images", images, "--people", "ann", "--prompt", "{person} in space", "--library", ann.root,
            "--face-model", "dlib", "--clip-model", f"local-dir:{clip}"]


def _previous_report(folder: Path) -> dict[str, str]:
    out = folder / "report"
    out.mkdir(parents=True)
    (out / "report.json").write_text('{"title": "last week"}\n')
    (out / "report.html").write_text("<html>last week</html>\n")
    return tree(folder)


def test_disk_full_while_writing_a_report(tmp_path, eval_inputs, monkeypatch, capsys):
    """A report is written whole or not at all: a full disk half way leaves last week's report."""
    import eval.report

    disk = tmp_path / "disk"
    with small_disk(disk) as real_disk:
        before = _previous_report(disk)
        fault_at(monkeypatch, eval.report, "_pdf", (lambda: fill_up(disk)) if real_disk else raise_oserror(errno.ENOSPC))
        if not real_disk:
            note_fallback("disk full while writing a report")
        code, err = cli("evaluate", [*eval_inputs, "--out", disk / "report"], capsys)
        line = one_error_line("evaluate", code, err)
        assert "disk full while writing" in line, line
        assert {k: v for k, v in tree(disk).items() if not k.startswith("filler-")} == before
        assert leftovers(disk) == []


def test_read_only_report_folder(tmp_path, eval_inputs, capsys):
    folder = tmp_path / "reports"
    before = _previous_report(folder)
    with read_only(folder) as really:
        if not really:
            pytest.skip("read-only bind mounts need root (the disk-full test covers the same clean-up path)")
        code, err = cli("evaluate", [*eval_inputs, "--out", folder / "report"], capsys)
    line = one_error_line("evaluate", code, err)
    assert "read-only file system" in line, line
    assert tree(folder) == before
