"""Scoring throughput: faces (dlib on the CPU) + CLIP (ViT-B-32 on the GPU) through eval's own path.

    GROUPSHOT_DLIB_MODELS=... python benchmarks/score_bench.py --images 200 --out DIR

ArcFace (insightface) weights and onnxruntime-gpu are not available on the device machine,
so the face side runs dlib on the CPU; CLIP is a ViT-B-32 with random weights (speed does not
depend on weight values). Prints images/s for faces + CLIP, CLIP alone and faces alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("score-bench"))
    p.add_argument("--work", type=Path, default=Path("/tmp/gsscore"))
    args = p.parse_args()
    import numpy as np
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from eval.clip_score import ClipScorer
    from eval.scoring import score_images
    from personas.faces import load_face_backend
    from personas.library import Library, Persona, sha256_file, utc_now
    from personas.photos import check_photos
    from personas.testing import sample_photos

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    backend = load_face_backend("dlib")

    # A persona whose refs are real face crops (what eval reads); no adapter needed to score.
    lib = Library(work / "people")
    staged = lib.staging("eileen")
    (staged / "refs").mkdir()
    report = check_photos([sample_photos(work / "photos", "eileen")], backend=backend, resolution=512)
    photos = []
    for i, ph in enumerate(report.accepted):
        ph.image.save(staged / "refs" / f"{i:03d}.jpg", quality=95)
        photos.append({"file": f"refs/{i:03d}.jpg", "source": ph.path.name, "sha256": ph.sha256})
    save_file({"emb_params": torch.zeros(1, 768)}, str(staged / "embeddings.safetensors"))
    lib.commit("eileen", staged, Persona(
        name="eileen", tokens=["<eileen>"], class_word="woman", base_model={"id": "none"}, method="ti",
        hyperparameters={}, photos=photos, adapter_sha256=None,
        embeddings_sha256=sha256_file(staged / "embeddings.safetensors"), created_at=utc_now()))

    # Images: 512x512 crops of the photo at random offsets and scales, one face each.
    import skimage.data

    src = Image.fromarray(skimage.data.astronaut())
    rng = np.random.default_rng(0)
    img_dir = work / "images"
    img_dir.mkdir()
    for i in range(args.images):
        s = int(rng.integers(380, 512))
        x, y = int(rng.integers(0, 512 - s + 1)), int(rng.integers(0, 512 - s + 1))
        src.crop((x, y, x + s, y + s)).resize((512, 512)).save(img_dir / f"{i:04d}.png")

    ckpt = work / "vit-b-32-random.safetensors"
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = ClipScorer("ViT-B-32", pretrained=str(ckpt), device=device, batch_size=64)
    prompt = "a photo of {person} in a space suit"

    rows = {}
    score_images(img_dir, ["eileen"], prompt, library=lib, face_backend=backend, clip=clip)  # warm caches
    for label, kw in (("faces + CLIP", dict(face_backend=backend, clip=clip)),
                      ("faces only", dict(face_backend=backend, clip=None))):
        t0 = time.perf_counter()
        scores = score_images(img_dir, ["eileen"], prompt if kw["clip"] else None, library=lib, **kw)
        rows[label] = args.images / (time.perf_counter() - t0)
    images = [Image.open(f).convert("RGB") for f in sorted(img_dir.iterdir())]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    clip.score(images, "a photo of a woman in a space suit")
    sync()
    rows["CLIP only (decoded images)"] = args.images / (time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    env = dict(card=card, torch=torch.__version__, images=args.images)
    (args.out / "score_bench.json").write_text(json.dumps({"env": env, "images_per_second": rows}, indent=2))
    print(env)
    for k, v in rows.items():
        print(f"{k:<28} {v:8.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
