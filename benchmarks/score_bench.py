"""Scoring throughput: faces + CLIP through eval's own path, one face process against a pool.

    GROUPSHOT_DLIB_MODELS=... python benchmarks/score_bench.py --images 200 --out DIR

Faces: dlib (HOG + ResNet, on the CPU; the only face model whose weights exist offline).
ArcFace (insightface) needs the buffalo_l pack, which no offline machine here has. CLIP: a
ViT-B-32 (eval's default architecture) with random weights on the GPU (speed does not depend
on weight values). Every figure comes from this one run: `score_images` with the face stage
in this process (workers=1, the baseline) and in a pool of worker processes (workers=N), on
one-face 512x512 images and on two-face 1024x512 ones; CLIP alone; and the `evaluate` command
end to end (image check, models, scoring, report files). Prints one table.
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
    backend = load_face_backend("dlib")
    lib = Library(work / "people")
    _persona(lib, "eileen", sample_photos(work / "photos", "eileen"), backend)
    sets = {"1 face, 512x512": work / "one", "2 faces, 1024x512": work / "two"}
    for (label, folder), two in zip(sets.items(), (False, True)):
        _images(folder, args.images, two)

    ckpt = work / "vit-b-32-random.safetensors"
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = ClipScorer("ViT-B-32", pretrained=str(ckpt), device=device)
    prompt = "a photo of {person} in a space suit"
    pool = face_workers_for(backend, args.images, args.workers, reserve=1)

    rows: list[dict] = []
    score_images(sets["1 face, 512x512"], ["eileen"], prompt, library=lib, face_backend=backend, clip=clip,
                 workers=1)  # warm: reference cache, CLIP kernels
    for label, folder in sets.items():
        base = None
        for workers in (1, pool):
            for what, c in (("faces + CLIP", clip), ("faces only", None)):
                if workers == 1 and c is None and folder != sets["1 face, 512x512"]:
                    continue  # one baseline of faces alone is enough; each costs a minute or two
                t0 = time.perf_counter()
                s = score_images(folder, ["eileen"], prompt if c else None, library=lib, face_backend=backend,
                                 clip=c, workers=workers)
                rate = args.images / (time.perf_counter() - t0)
                faces = sum(im.n_faces for im in s.images)
                row = dict(images=label, what=what, workers=workers, images_per_second=round(rate, 2),
                           faces_found=faces)
                if workers == 1 and what == "faces + CLIP":
                    base = rate
                row["vs_one_process"] = round(rate / base, 2) if what == "faces + CLIP" else None
                rows.append(row)
                print(row, flush=True)

    images = [Image.open(f).convert("RGB") for f in sorted(sets["1 face, 512x512"].iterdir())]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    clip.score(images, "a photo of a woman in a space suit")
    sync()
    rows.append(dict(images="1 face, 512x512", what="CLIP only (decoded images)", workers=None,
                     images_per_second=round(args.images / (time.perf_counter() - t0), 2)))

    # The command a user runs, end to end: image check, face model + CLIP load, scoring, report.
    env = {**os.environ, "GROUPSHOT_LIBRARY": str(lib.root), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "eval.cli", "--images", str(sets["2 faces, 1024x512"]), "--people", "eileen",
           "--prompt", prompt, "--face-model", "dlib", "--clip-model", "ViT-B-32", "--clip-pretrained", str(ckpt),
           "--out", str(work / "report")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stderr[-2000:])
    report = json.loads((work / "report" / "report.json").read_text()) if done.returncode == 0 else {}
    timing = report.get("timing", {})
    rows.append(dict(images="2 faces, 1024x512", what="`evaluate` end to end (report included)",
                     workers=timing.get("face_workers"), images_per_second=round(args.images / wall, 2),
                     scoring_only=timing.get("images_per_second"), rc=done.returncode))

    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    import dlib

    env_info = dict(card=card, torch=torch.__version__, dlib=dlib.__version__, open_clip=open_clip.__version__,
                    cpus=usable_cpus(), images_per_set=args.images, clip="ViT-B-32 (random weights)",
                    command=" ".join(sys.argv))
    (args.out / "score_bench.json").write_text(json.dumps({"env": env_info, "rows": rows}, indent=2))
    print(env_info)
    print(f"{'images':<20} {'what':<42} {'workers':>7} {'images/s':>9} {'vs 1 proc':>9}")
    for r in rows:
        ratio = r.get("vs_one_process")
        print(f"{r['images']:<20} {r['what']:<42} {str(r['workers']):>7} {r['images_per_second']:>9.1f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
