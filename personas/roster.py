"""Train many people from one roster file: whole personas spread over the GPUs (or CPU
workers), one `personas train` process each, resumable, failures reported not fatal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personas.config import TrainConfig
from personas.errors import GroupshotError
from personas.library import Library, validate_name

log = logging.getLogger(__name__)

PERSON_KEYS = ("name", "photos", "overrides")


@dataclass
class RosterEntry:
    name: str
    photos: list[Path]  # files or folders, resolved against the roster's folder
    config: TrainConfig  # the roster's [train] table with this person's overrides on top


@dataclass
class Roster:
    path: Path
    people: list[RosterEntry]


@dataclass
class Outcome:
    """What became of one person: trained, skipped (already trained with these settings) or failed."""

    name: str
    status: str
    seconds: float = 0.0
    slot: str = ""  # "gpu 0", "cpu worker 1"
    detail: str = ""  # final loss, the reason for skipping, or the error
    log: Path = field(default_factory=Path)


def load_roster(path: str | os.PathLike) -> Roster:
    """Read and check a roster (names, photo paths, every person's TrainConfig) before anything trains."""
    from personas.config import read_toml

    path = Path(path)
    data = read_toml(path, f"roster {path}")
    unknown = sorted(set(data) - {"train", "person"})
    if unknown:
        raise GroupshotError(f"roster {path}: unknown top-level keys {', '.join(unknown)}; "
                             "expected a [train] table and [[person]] entries")
    shared = data.get("train", {})
    if not isinstance(shared, dict):
        raise GroupshotError(f"roster {path}: [train] must be a table of TrainConfig fields")
    people = data.get("person")
    if not isinstance(people, list) or not people:
        raise GroupshotError(f"roster {path}: no [[person]] entries; add one per person with name and photos")
    entries: list[RosterEntry] = []
    for i, person in enumerate(people):
        where = f"roster {path}: person {i + 1}"
        if not isinstance(person, dict):
            raise GroupshotError(f"{where}: expected a [[person]] table")
        bad = sorted(set(person) - set(PERSON_KEYS))
        if bad:
            raise GroupshotError(f"{where}: unknown keys {', '.join(bad)}; a person has {', '.join(PERSON_KEYS)} "
                                 "(TrainConfig fields go under overrides)")
        name = person.get("name")
        if not isinstance(name, str):
            raise GroupshotError(f"{where}: needs name = \"...\"")
        validate_name(name)
        where = f"roster {path}: person {name!r}"
        photos = person.get("photos")
        photos = [photos] if isinstance(photos, str) else photos
        if not isinstance(photos, list) or not photos or not all(isinstance(p, str) for p in photos):
            raise GroupshotError(f"{where}: photos must be a file/folder or a list of them")
        resolved = [(path.parent / p).expanduser() for p in photos]
        missing = [str(p) for p in resolved if not p.exists()]
        if missing:
            raise GroupshotError(f"{where}: photos not found: {', '.join(missing)} (paths are relative to the roster file)")
        overrides = person.get("overrides", {})
        if not isinstance(overrides, dict):
            raise GroupshotError(f"{where}: overrides must be a table of TrainConfig fields")
        config = TrainConfig.from_dict({**shared, **overrides}, source=where)
        entries.append(RosterEntry(name, resolved, config))
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise GroupshotError(f"roster {path}: {', '.join(twice)} listed twice; each person once")
    return Roster(path, entries)


def _slots(gpus: int | None, workers: int | None) -> list[tuple[str, dict[str, str]]]:
    """(label, environment changes) per slot: one per GPU used, else one per CPU worker."""
    import torch

    have = torch.cuda.device_count()
    if workers is not None and workers < 1:
        raise GroupshotError(f"--workers {workers}: give 1 or more")
    if gpus is not None and gpus < 1:
        raise GroupshotError(f"--gpus {gpus}: give 1 or more")
    if have:
        if workers is not None:
            raise GroupshotError("--workers is for machines without GPUs; with GPUs, train-all runs one persona per GPU (--gpus N)")
        if gpus is not None and gpus > have:
            raise GroupshotError(f"--gpus {gpus}: this machine has {have} visible CUDA GPU(s)")
        # Physical ids as the parent sees them, so CUDA_VISIBLE_DEVICES=2,3 gives slots 2 and 3.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(have)]
        return [(f"gpu {i}", {"CUDA_VISIBLE_DEVICES": i}) for i in ids[: gpus or have]]
    if gpus is not None:
        raise GroupshotError(f"--gpus {gpus}: no CUDA GPU is visible; use --workers N to train on the CPU")
    n = workers or 1
    # Each worker gets its share of the cores: N processes with all cores each would fight.
    threads = str(max(1, (os.cpu_count() or 1) // n))
    return [(f"cpu worker {k}", {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
            for k in range(n)]


def _plan(entry: RosterEntry, library: Library) -> tuple[str, list[str]] | Outcome:
    """The `personas train` arguments for `entry` ("fresh"/"resume"/"restart"), or an Outcome
    when there is nothing to run."""
    from personas.train import unfinished_run

    wanted = entry.config.to_dict()
    if library.exists(entry.name):
        try:
            have = library.load(entry.name, verify=False).hyperparameters
        except GroupshotError as e:
            return Outcome(entry.name, "failed", detail=f"the library's persona is broken ({e}); remove it to retrain")
        if have == wanted:
            return Outcome(entry.name, "skipped", detail="already trained with these settings")
        diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
        return Outcome(entry.name, "failed", detail=f"a persona of this name was trained with other settings "
                       f"({', '.join(diff[:4])}); `personas remove {entry.name}` to retrain it")
    unfinished = unfinished_run(library, entry.name)
    if unfinished is not None and unfinished[1].to_dict() == wanted:
        return "resume", ["train", entry.name, "--resume"]
    return ("restart" if unfinished is not None else "fresh"), ["train", entry.name, *map(str, entry.photos)]


def train_all(roster: Roster, *, library: Library, gpus: int | None = None, workers: int | None = None,
              logs: str | os.PathLike | None = None, poll_seconds: float = 0.5) -> list[Outcome]:
    """Train every person of `roster` not yet in `library`, one process per free slot.

    Returns one Outcome per person, in roster order. Never raises for one person's failure.
    """
    slots = _slots(gpus, workers)
    logs = Path(logs) if logs is not None else library.root / ".logs"
    logs.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, Outcome] = {}
    queue: list[tuple[RosterEntry, str, list[str]]] = []
    for entry in roster.people:
        plan = _plan(entry, library)
        if isinstance(plan, Outcome):
            plan.log = logs / f"{entry.name}.log"
            outcomes[entry.name] = plan
            log.info("%s: %s (%s)", entry.name, plan.status, plan.detail)
        else:
            queue.append((entry, *plan))

    running: dict[str, tuple[subprocess.Popen, float, str, Any, RosterEntry]] = {}  # slot label -> ...
    with tempfile.TemporaryDirectory(prefix="groupshot-roster-") as tmp:
        try:
            while queue or running:
                for label, env in slots:
                    if label in running or not queue:
                        continue
                    entry, how, argv = queue.pop(0)
                    if how != "resume":
                        config_file = Path(tmp) / f"{entry.name}.toml"
                        config_file.write_text(entry.config.to_toml(), encoding="utf-8")
                        argv += ["--config", str(config_file)] + (["--restart"] if how == "restart" else [])
                    cmd = [sys.executable, "-m", "personas.cli", "--library", str(library.root), *argv, "--quiet"]
                    out = open(logs / f"{entry.name}.log", "w", encoding="utf-8")
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
                    running[label] = (proc, time.perf_counter(), how, out, entry)
                    log.info("%s: training on %s%s", entry.name, label, " (resuming)" if how == "resume" else "")
                for label in list(running):
                    proc, started, how, out, entry = running[label]
                    if proc.poll() is None:
                        continue
                    out.close()
                    del running[label]
                    o = _finished(entry, proc.returncode, time.perf_counter() - started, label, logs / f"{entry.name}.log", library)
                    outcomes[entry.name] = o
                    log.info("%s: %s on %s in %.0f s (%s)", o.name, o.status, label, o.seconds, o.detail)
                if running:
                    time.sleep(poll_seconds)
        except KeyboardInterrupt:
            # The children got the same Ctrl-C: each saves a checkpoint and exits.
            for label, (proc, started, _, out, entry) in running.items():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                out.close()
                outcomes[entry.name] = Outcome(entry.name, "failed", time.perf_counter() - started, label,
                                               "interrupted; run train-all again to resume it", logs / f"{entry.name}.log")
            raise
    return [outcomes[e.name] for e in roster.people if e.name in outcomes]


def _finished(entry: RosterEntry, code: int, seconds: float, label: str, log_file: Path, library: Library) -> Outcome:
    if code == 0 and library.exists(entry.name):
        loss = library.load(entry.name, verify=False).extra.get("final_loss")
        detail = f"final loss {loss:.4f}" if isinstance(loss, (int, float)) else "trained"
        return Outcome(entry.name, "trained", seconds, label, detail, log_file)
    return Outcome(entry.name, "failed", seconds, label, f"exit code {code}: {_last_error(log_file)}", log_file)


def _last_error(log_file: Path) -> str:
    """The child's one-line error (`personas: error: ...`), else the last line of its log."""
    try:
        lines = [l.strip() for l in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("personas: error:"):
            return line.removeprefix("personas: error:").strip()
    return lines[-1][:200] if lines else "no output"


def summary_table(outcomes: list[Outcome]) -> str:
    rows = [("person", "status", "seconds", "where", "detail")]
    rows += [(o.name, o.status, f"{o.seconds:.0f}" if o.seconds else "-", o.slot or "-", o.detail) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(f"{c:<{w}}" for c, w in zip(r[:-1], widths)), r[-1]]).rstrip() for r in rows]
    lines.insert(1, "  ".join(["-" * w for w in widths] + ["------"]))
    return "\n".join(lines)
