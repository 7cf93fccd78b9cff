"""eval.clip_score: a tiny random open_clip model, scored against a hand computation (PIL + numpy
preprocessing, our own encode calls and cosine), and the offline errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personas.errors import GroupshotError, ModelUnavailableError
from personas.testing import TINY_CLIP_CONFIG, write_tiny_clip

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    from eval.clip_score import ClipScorer

    return ClipScorer(f"local-dir:{tiny_clip_dir}", batch_size=2)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (40, 40), (33, 90), (120, 60), (32, 32)]  # (w, h): landscape, portrait, exact size
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _hand_preprocess(im: Image.Image, size: int) -> np.ndarray:
    """CLIP's eval preprocessing by hand: shortest side to `size` (bicubic), centre crop, normalise."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = (size, int(h * scale)) if w <= h else (int(w * scale), size)
    im = im.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    x = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0
    return ((x - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1)  # (3, size, size)


def test_scores_match_a_hand_computation(scorer):
    import open_clip
    import torch

    images = _images()
    texts = ["a man with a beard", "a red car", "a man with a beard", "two people at a beach", "x"]
    got = scorer.score(images, texts)

    net = scorer._net
    pixels = torch.tensor(np.stack([_hand_preprocess(im, 32) for im in images]), dtype=torch.float32)
    tokens = open_clip.tokenize(texts)
    with torch.no_grad():
        img = net.encode_image(pixels).double().numpy()
        txt = net.encode_text(tokens).double().numpy()
    expected = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(img, txt)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (5,) and np.all(np.abs(got) <= 1)


def test_batching_and_one_text_for_all(scorer):
    from eval.clip_score import ClipScorer

    images = _images()
    one_by_one = np.array([scorer.score([im], "a man")[0] for im in images])
    np.testing.assert_allclose(scorer.score(images, "a man"), one_by_one, atol=1e-5)
    with pytest.raises(GroupshotError, match="5 images but 2 texts"):
        scorer.score(images, ["a", "b"])
    with pytest.raises(GroupshotError, match="batch size"):
        ClipScorer("local-dir:/nowhere", batch_size=0)


def test_torchmetrics_scale():
    from eval.clip_score import torchmetrics_scale

    assert torchmetrics_scale(0.3125) == pytest.approx(31.25)
    assert torchmetrics_scale(-0.2) == 0.0
    np.testing.assert_allclose(torchmetrics_scale(np.array([0.25, -0.1])), [25.0, 0.0])


def test_describe_records_model_and_weights(scorer, tiny_clip_dir):
    import hashlib

    d = scorer.describe()
    assert d["model"] == f"local-dir:{tiny_clip_dir}"
    assert d["weights_file"] == "open_clip_model.safetensors"
    assert d["weights_sha256"] == hashlib.sha256((tiny_clip_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert d["image_size"] == [32, 32]
    json.dumps(d)


def test_checkpoint_file_for_a_named_architecture(tiny_clip_dir, tmp_path, monkeypatch):
    """--clip-pretrained FILE: open_clip builds the named architecture and loads the file."""
    import open_clip
    from open_clip import factory

    from eval.clip_score import ClipScorer

    (tmp_path / "gs-tiny-test.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", [*factory._MODEL_CONFIG_PATHS])
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    open_clip.add_model_config(tmp_path / "gs-tiny-test.json")
    weights = tiny_clip_dir / "open_clip_model.safetensors"
    by_file = ClipScorer("gs-tiny-test", str(weights))
    by_dir = ClipScorer(f"local-dir:{tiny_clip_dir}")
    images = _images()[:2]
    np.testing.assert_allclose(by_file.score(images, "a man"), by_dir.score(images, "a man"), atol=1e-6)
    assert by_file.describe()["pretrained"] == str(weights)


def test_offline_tag_names_the_model_and_the_fix():
    from eval.clip_score import ClipScorer

    with pytest.raises(ModelUnavailableError) as e:
        ClipScorer("ViT-B-32", "openai")
    msg = str(e.value)
    assert "ViT-B-32/openai" in msg and "--clip-pretrained FILE" in msg and "\n" not in msg


@pytest.mark.parametrize("model, pretrained, match", [
    ("ViT-B-99", "openai", "not an open_clip architecture"),
    ("ViT-B-32", "no-such-tag", "neither a file nor a tag of ViT-B-32"),
    ("ViT-B-32", None, "needs trained weights"),
])
def test_bad_names(model, pretrained, match):
    from eval.clip_score import ClipScorer

    with pytest.raises(GroupshotError, match=match):
        ClipScorer(model, pretrained)


def test_local_dir_without_weights_is_refused(tmp_path):
    from eval.clip_score import ClipScorer

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    with pytest.raises(ModelUnavailableError, match="found 0"):
        ClipScorer(f"local-dir:{tmp_path}")
    with pytest.raises(GroupshotError, match="no open_clip_config.json"):
        ClipScorer(f"local-dir:{tmp_path / 'nothing'}")
