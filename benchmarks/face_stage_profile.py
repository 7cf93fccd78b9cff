"""Where the GPU face stage (ArcFaceBackend, torch runtime) spends its time: detect_many on
decoded images at three batch sizes, then a cProfile of one batch-32 pass.

    python benchmarks/face_stage_profile.py INSIGHTFACE_ROOT IMAGE_DIR

INSIGHTFACE_ROOT holds models/buffalo_l (score_bench.py --face-model arcface-random leaves
one, random weights, in its --work folder); needs a CUDA GPU.
"""

import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import numpy as np
    import torch
    from PIL import Image

    from personas.faces import ArcFaceBackend

    root, folder = Path(sys.argv[1]), Path(sys.argv[2])
    backend = ArcFaceBackend(root=root, runtime="torch", device="cuda")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())[:128]]
    for batch in (8, 32, 64):
        backend.batch_size = batch
        backend.detect_many(images[:batch])  # warm
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        found = backend.detect_many(images)
        torch.cuda.synchronize()
        rate = len(images) / (time.perf_counter() - t0)
        print(f"batch {batch}: {rate:.1f} images/s detect_many on decoded images, "
              f"{sum(map(len, found)) / len(images):.2f} faces/image")
    backend.batch_size = 32
    profile = cProfile.Profile()
    profile.enable()
    backend.detect_many(images)
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
