"""Out-of-GPU-memory check (device machine): a training that cannot fit must end with one clear
line naming the settings that need less memory, and leave the library as it was.

    python benchmarks/oom_check.py --out /tmp/oom [--model DIR] [--cap-gib 2] [--big-cap-gib GIB]

Builds the SD1.5-size random model (personas.testing.write_model(dir, "sd15", device="cuda"))
unless --model names one, puts an earlier persona `eileen` in a fresh library, then trains
`eileen` with GPU memory capped by torch.cuda.set_per_process_memory_fraction, each run in its
own process (an out-of-memory error can leave CUDA in a state the next run should not inherit):

1. the default settings under --cap-gib (2 GiB: the bf16 weights alone do not fit);
2. batch_size 8 under --big-cap-gib (default: 1.25 x the peak of an uncapped run at the default
   settings, measured first, so that the model fits and the batch-8 step does not: this one
   runs out inside the training loop, and batch_size 1 with accumulation should fit);

For each: exit code 2, one `personas: error: out of GPU memory ...` line on stderr, no
traceback, the earlier persona byte-for-byte the same, no `.eileen.tmp-*` folder. Then every
lower-memory setting the message names (personas.train.lower_memory_settings) is tried alone
for a few steps under the same cap, and the report says which fit. Results go to
OUT/oom_check.json; the exit code is 0 when every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(cap_gib: float, argv: list[str]) -> int:
    """In a fresh process: cap this process's GPU memory, then run `personas` with argv."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), 0)
    from personas.cli import main

    return main(argv)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_capped(cap_gib: float, argv: list[str], timeout: int = 900) -> dict:
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(cap_gib), "--", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [l for l in proc.stderr.replace("\r", "\n").splitlines()
             if l.strip() and "it/s]" not in l and "%|" not in l and not l.startswith("There are modules")]
    return {"argv": argv, "cap_gib": cap_gib, "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "stderr_lines": lines[-5:], "traceback": "Traceback" in proc.stderr, "stdout": proc.stdout.strip()[-500:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/oom-check"))
    p.add_argument("--model", type=Path, help="an SD1.5-size diffusers folder (default: build the random one in OUT/sd15)")
    p.add_argument("--cap-gib", type=float, default=2.0, help="memory cap of scenario 1 (default 2)")
    p.add_argument("--big-cap-gib", type=float, help="memory cap of scenario 2 (default: 1.25 x the measured "
                   "peak of the default settings)")
    p.add_argument("--big-batch", type=int, default=8, help="batch_size of scenario 2 (default 8)")
    p.add_argument("--steps", type=int, default=5, help="steps of each run (default 5)")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("oom_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    from personas.config import TrainConfig
    from personas.library import Library
    from personas.testing import make_random_persona, sample_photos, write_model
    from personas.train import lower_memory_settings

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = out / "sd15"
        if not (model / "model_index.json").is_file():
            t0 = time.perf_counter()
            write_model(model, "sd15", device="cuda")
            print(f"[setup] SD1.5-size random model in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
    photos = sample_photos(out / "photos", "eileen")
    lib = Library(out / f"people-{int(time.time())}")
    make_random_persona(lib, "eileen", model, seed=3, class_word="woman")  # on the CPU, before any cap
    before = _tree(lib.path("eileen"))
    torch.cuda.empty_cache()

    base = dict(base_model=str(model), max_train_steps=args.steps, face_model="none", validation_every=0,
                checkpoint_every=0, class_word="woman", min_photos=3)
    report = {"device": torch.cuda.get_device_name(0),
              "total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
              "torch": torch.__version__, "scenarios": []}
    big_cap = args.big_cap_gib
    if big_cap is None:  # the default settings' own peak, uncapped, in a scratch library
        cfg = out / "measure.toml"
        cfg.write_text(TrainConfig(**base).to_toml())
        run = _run_capped(1000.0, ["--library", str(out / "probes"), "train", "measure", str(photos), "--config",
                                   str(cfg), "--quiet", "--restart"])
        found = re.search(r"peak GPU memory ([0-9.]+) GiB", run["stdout"])
        if run["exit_code"] != 0 or not found:
            print(f"oom_check: the uncapped run failed: {run['stderr_lines']}", file=sys.stderr)
            return 1
        report["default_peak_gib"] = float(found.group(1))
        big_cap = round(1.25 * float(found.group(1)), 2)
        print(f"[measure] default settings peak {found.group(1)} GiB: scenario 2 capped at {big_cap} GiB", flush=True)
    scenarios = [("default settings", args.cap_gib, {}),
                 (f"batch_size {args.big_batch}", big_cap, {"batch_size": args.big_batch})]
    ok = True
    for title, cap, changes in scenarios:
        config = TrainConfig(**base, **changes)
        cfg = out / f"{title.replace(' ', '-')}.toml"
        cfg.write_text(config.to_toml())
        print(f"[run] {title} under {cap} GiB", flush=True)
        run = _run_capped(cap, ["--library", str(lib.root), "train", "eileen", str(photos), "--config", str(cfg),
                                "--quiet", "--restart"])
        err = run["stderr_lines"]
        checks = {
            "exit code 2": run["exit_code"] == 2,
            "no traceback": not run["traceback"],
            "one error line": len([l for l in err if l.startswith("personas: error:")]) == 1,
            "says out of GPU memory": any("out of GPU memory" in l for l in err),
            "names smaller settings": any("settings that need less memory" in l for l in err),
            "earlier persona unchanged": _tree(lib.path("eileen")) == before,
            "no half-saved persona": not any(lib.root.glob(".eileen.tmp-*")),
        }
        # Each lower-memory setting alone, under the same cap, in a scratch library.
        mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        tried = []
        for text, change in lower_memory_settings(config, mp):
            probe_cfg = out / f"probe-{len(tried)}.toml"
            probe_cfg.write_text(TrainConfig(**{**base, **changes, **change}).to_toml())
            probe = _run_capped(cap, ["--library", str(out / "probes"), "train", f"probe{len(tried)}", str(photos),
                                      "--config", str(probe_cfg), "--quiet", "--restart"])
            tried.append({"setting": text, "fits": probe["exit_code"] == 0, "seconds": probe["seconds"],
                          "result": probe["stdout"].splitlines()[0] if probe["exit_code"] == 0 and probe["stdout"]
                          else (probe["stderr_lines"] or [""])[-1][:300]})
            print(f"[probe] {text}: {'fits' if tried[-1]['fits'] else 'does not fit'}", flush=True)
        if title != "default settings":  # the measured cap: the step, not the model, is what does not fit
            checks["ran out inside the training loop"] = any("out of GPU memory at step" in l for l in err)
            checks["a named lower-memory setting fits"] = any(t["fits"] for t in tried)
        ok &= all(checks.values())
        report["scenarios"].append({"title": title, "cap_gib": cap, "settings": changes, "run": run,
                                    "checks": checks, "lower_memory_settings": tried})
        for name, passed in checks.items():
            print(f"  {'PASS' if passed else 'FAIL'}  {name}", flush=True)
        print(f"  message: {next((l for l in err if 'error:' in l), err[-1] if err else '')}", flush=True)

    report["all_checks_passed"] = ok
    (out / "oom_check.json").write_text(json.dumps(report, indent=2))
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; details in {out / 'oom_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        rest = sys.argv[sys.argv.index("--") + 1:]
        sys.exit(_child(float(sys.argv[2]), rest))
    sys.exit(main())
