"""Scoring throughput: faces + CLIP through eval's own path, against the straightforward one.

    GROUPSHOT_DLIB_MODELS=... python benchmarks/score_bench.py --images 200 --out DIR
    python benchmarks/score_bench.py --face-model arcface-random --images 200 --out DIR

--face-model dlib (HOG + ResNet, on the CPU; the only face model whose weights exist offline):
`score_images` with the face stage in this process (workers=1, the baseline) and in a pool of
worker processes (workers=N). --face-model arcface-random: insightface's buffalo_l layout
(SCRFD-10G-KPS detector, iresnet50 recogniser) built with random weights
(personas.face_nets; no registry ships the real ones), scored by insightface's own path on
onnxruntime (one process, the baseline; onnxruntime-gpu is not installable there) and by the
torch runtime on the GPU in batches. Both on one-face 512x512 images and two-face 1024x512
ones; CLIP alone; and the `evaluate` command end to end (image check, models, scoring, report
files). CLIP: a ViT-B-32 (eval's default architecture) with random weights on the GPU (speed
does not depend on weight values). Every figure comes from this one run. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _persona(lib, name: str, photos_dir: Path, backend) -> None:
    import torch
    from safetensors.torch import save_file

    from personas.library import Persona, sha256_file, utc_now
    from personas.photos import check_photos

    staged = lib.staging(name)
    (staged / "refs").mkdir()
    report = check_photos([photos_dir], backend=backend, resolution=512)
    photos = []
    for i, ph in enumerate(report.accepted):
        ph.image.save(staged / "refs" / f"{i:03d}.jpg", quality=95)
        photos.append({"file": f"refs/{i:03d}.jpg", "source": ph.path.name, "sha256": ph.sha256})
    save_file({"emb_params": torch.zeros(1, 768)}, str(staged / "embeddings.safetensors"))
    lib.commit(name, staged, Persona(
        name=name, tokens=[f"<{name}>"], class_word="woman", base_model={"id": "none"}, method="ti",
        hyperparameters={}, photos=photos, adapter_sha256=None,
        embeddings_sha256=sha256_file(staged / "embeddings.safetensors"), created_at=utc_now()))


def _images(folder: Path, n: int, two: bool) -> None:
    """n images at random offsets and scales of the registry photos: one face (512x512,
    Eileen Collins) or two (1024x512, Eileen Collins and Grace Hopper side by side)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from personas.testing import sample_photos

    eileen = Image.fromarray(skimage.data.astronaut())
    grace = Image.open(sample_photos(folder.parent / "grace-src", "grace") / "a.png").convert("RGB")
    grace = grace.resize((512, round(512 * grace.height / grace.width))).crop((0, 40, 512, 552))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)

    def jitter(src):
        s = int(rng.integers(380, 512))
        x, y = int(rng.integers(0, 512 - s + 1)), int(rng.integers(0, 512 - s + 1))
        return src.crop((x, y, x + s, y + s)).resize((512, 512))

    for i in range(n):
        if two:
            im = Image.new("RGB", (1024, 512))
            im.paste(jitter(eileen), (0, 0))
            im.paste(jitter(grace), (512, 0))
        else:
            im = jitter(eileen)
        im.save(folder / f"{i:04d}.png")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--workers", type=int, default=None, help="pool size (default: eval's choice)")
    p.add_argument("--out", type=Path, default=Path("score-bench"))
    p.add_argument("--work", type=Path, default=Path("/tmp/gsscore"))
    p.add_argument("--face-model", choices=("dlib", "arcface-random"), default="dlib")
    p.add_argument("--no-report", action="store_true", help="skip the `evaluate` end-to-end row")
    args = p.parse_args()
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from eval.clip_score import ClipScorer
    from eval.scoring import face_workers_for, score_images, usable_cpus
    from personas.faces import load_face_backend
    from personas.library import Library
    from personas.testing import sample_photos

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cli_env: dict[str, str] = {}
    if args.face_model == "dlib":
        backend = baseline = load_face_backend("dlib")
        pool = face_workers_for(backend, args.images, args.workers, reserve=1)
        runs = [("one process", baseline, 1), (f"{pool} face workers", backend, pool)]
    else:
        from personas.face_nets import write_random_pack
        from personas.faces import ArcFaceBackend

        root = work / "insightface"
        write_random_pack(root / "models" / "buffalo_l", "full", detections=2)
        baseline = ArcFaceBackend(root=root, runtime="onnxruntime")
        backend = ArcFaceBackend(root=root, runtime="torch", device=device)
        runs = [("onnxruntime, one process", baseline, 1), (f"torch {device}, batch {backend.batch_size}", backend, 1)]
        cli_env["GROUPSHOT_INSIGHTFACE_ROOT"] = str(root)
    lib = Library(work / "people")
    _persona(lib, "eileen", sample_photos(work / "photos", "eileen"),
             backend if args.face_model == "dlib" else None)
    sets = {"1 face, 512x512": work / "one", "2 faces, 1024x512": work / "two"}
    for (label, folder), two in zip(sets.items(), (False, True)):
        _images(folder, args.images, two)

    ckpt = work / "vit-b-32-random.safetensors"
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    clip = ClipScorer("ViT-B-32", pretrained=str(ckpt), device=device)
    prompt = "a photo of {person} in a space suit"

    rows: list[dict] = []
    for _, b, _ in runs:  # warm: reference cache, CLIP and face-model kernels
        score_images(sets["1 face, 512x512"], ["eileen"], prompt, library=lib, face_backend=b, clip=clip, workers=1)
    for label, folder in sets.items():
        base = None
        for i, (how, b, workers) in enumerate(runs):
            is_baseline = i == 0
            for what, c in (("faces + CLIP", clip), ("faces only", None)):
                if is_baseline and c is None and folder != sets["1 face, 512x512"]:
                    continue  # one baseline of faces alone is enough; each costs a minute or two
                t0 = time.perf_counter()
                s = score_images(folder, ["eileen"], prompt if c else None, library=lib, face_backend=b,
                                 clip=c, workers=workers)
                rate = args.images / (time.perf_counter() - t0)
                faces = sum(im.n_faces for im in s.images)
                row = dict(images=label, what=what, how=how, workers=workers, images_per_second=round(rate, 2),
                           faces_found=faces)
                if is_baseline and what == "faces + CLIP":
                    base = rate
                row["vs_baseline"] = round(rate / base, 2) if what == "faces + CLIP" else None
                rows.append(row)
                print(row, flush=True)

    images = [Image.open(f).convert("RGB") for f in sorted(sets["1 face, 512x512"].iterdir())]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    clip.score(images, "a photo of a woman in a space suit")
    sync()
    rows.append(dict(images="1 face, 512x512", what="CLIP only (decoded images)", how=device, workers=None,
                     images_per_second=round(args.images / (time.perf_counter() - t0), 2)))

    # The command a user runs, end to end: image check, face model + CLIP load, scoring, report.
    if not args.no_report:
        env = {**os.environ, **cli_env, "GROUPSHOT_LIBRARY": str(lib.root), "HF_HUB_OFFLINE": "1"}
        cli_face = "dlib" if args.face_model == "dlib" else "arcface"
        cmd = [sys.executable, "-m", "eval.cli", "--images", str(sets["2 faces, 1024x512"]), "--people", "eileen",
               "--prompt", prompt, "--face-model", cli_face, "--clip-model", "ViT-B-32", "--clip-pretrained",
               str(ckpt), "--out", str(work / "report")]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stderr[-2000:])
        report = json.loads((work / "report" / "report.json").read_text()) if done.returncode == 0 else {}
        timing = report.get("timing", {})
        rows.append(dict(images="2 faces, 1024x512", what="`evaluate` end to end (report included)",
                         how=report.get("face_backend", {}).get("runtime", cli_face),
                         workers=timing.get("face_workers"), images_per_second=round(args.images / wall, 2),
                         scoring_only=timing.get("images_per_second"), rc=done.returncode))

    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    from importlib import metadata

    versions = {}
    for dist in ("dlib-bin", "insightface", "onnxruntime", "onnx2torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    env_info = dict(card=card, torch=torch.__version__, open_clip=open_clip.__version__, **versions,
                    cpus=usable_cpus(), images_per_set=args.images, clip="ViT-B-32 (random weights)",
                    face_model=args.face_model, command=" ".join(sys.argv))
    (args.out / "score_bench.json").write_text(json.dumps({"env": env_info, "rows": rows}, indent=2))
    print(env_info)
    print(f"{'images':<20} {'what':<42} {'how':<34} {'images/s':>9} {'vs base':>8}")
    for r in rows:
        ratio = r.get("vs_baseline")
        print(f"{r['images']:<20} {r['what']:<42} {str(r['how'])[:34]:<34} {r['images_per_second']:>9.1f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
