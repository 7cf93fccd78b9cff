"""GPU-only checks that the fast paths compute what the straightforward paths compute."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_cuda_graph_training_matches_eager(tmp_path, tiny_model, eileen_photos):
    from personas.adapters import load_embeddings, load_lora
    from personas.config import TrainConfig
    from personas.library import Library
    from personas.train import train_persona

    cfg = dict(base_model=str(tiny_model), resolution=64, max_train_steps=12, validation_every=0,
               checkpoint_every=0, mixed_precision="bf16", learning_rate=1e-3, embedding_lr=1e-2)
    out = {}
    for graph in (False, True):
        lib = Library(tmp_path / f"g{graph}")
        out[graph] = train_persona("p", [eileen_photos], TrainConfig(**cfg, cuda_graph=graph), library=lib,
                                   progress=False).persona
    a, b = load_lora(out[False].adapter_path), load_lora(out[True].adapter_path)
    num = sum((x[1] - y[1]).norm() ** 2 for x, y in zip(a.unet.values(), b.unet.values())) ** 0.5
    den = sum(x[1].norm() ** 2 for x in a.unet.values()) ** 0.5
    assert num / den < 2e-2, f"graph vs eager LoRA B differ by {num / den:.3e} (bf16 tolerance 2e-2)"
    ea, eb = load_embeddings(out[False].embeddings_path), load_embeddings(out[True].embeddings_path)
    assert (ea - eb).norm() / ea.norm() < 2e-2


def test_cuda_graph_render_matches_eager(tmp_path, tiny_model):
    from compose.pipeline import ComposeRequest, GroupComposer
    from personas.library import Library
    from personas.testing import make_random_persona

    lib = Library(tmp_path / "people")
    for i, name in enumerate(("ann", "bob")):
        make_random_persona(lib, name, tiny_model, seed=i)
    outs = {}
    for method in ("composite", "masked"):
        for graph in (False, True):
            composer = GroupComposer.from_pretrained(str(tiny_model), str(tiny_model / "controlnet"), library=lib,
                                                     cuda_graph=graph)
            plan = composer.prepare(ComposeRequest(people=["ann", "bob"], prompt="two friends", method=method,
                                                   pose="two_standing", size=(64, 64), steps=6))
            outs[method, graph] = composer.generate(plan, [0, 1], output_type="latent")
        for eager, graphed in zip(outs[method, False], outs[method, True]):
            rel = ((eager.float() - graphed.float()).norm() / eager.float().norm()).item()
            assert rel < 1e-2, f"{method}: graph vs eager latents differ by {rel:.2e}"


def test_arcface_torch_runtime_on_the_gpu_matches_onnxruntime(tmp_path, astronaut):
    """The GPU face path (insightface's graphs run by torch, batched) finds the faces and
    embeddings that insightface's own path finds through onnxruntime on the CPU (TF32 convs)."""
    import numpy as np
    from PIL import Image

    from personas.face_nets import write_random_pack
    from personas.faces import ArcFaceBackend

    write_random_pack(tmp_path / "models" / "buffalo_l", "full", seed=2, detections=3)
    pil = Image.fromarray(astronaut)
    images = [astronaut, np.asarray(pil.resize((300, 700))), np.asarray(pil.rotate(15))]
    reference = ArcFaceBackend(root=tmp_path, runtime="onnxruntime")
    gpu = ArcFaceBackend(root=tmp_path)  # auto: torch on the GPU without onnxruntime-gpu
    assert gpu.runtime == "torch" and gpu.on_gpu
    for want, got in zip([reference.detect(im) for im in images], gpu.detect_many(images)):
        assert len(want) == len(got) and want
        key = lambda f: tuple(round(v) for v in f.box)  # noqa: E731
        for a, b in zip(sorted(want, key=key), sorted(got, key=key)):
            assert np.allclose(a.box, b.box, atol=0.5)
            assert float(a.embedding @ b.embedding) > 0.999
