"""Face backends on real photos (dlib) and insightface's code path driven by tiny ONNX models."""

from __future__ import annotations

import hashlib
import itertools
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personas import faces
from personas.errors import GroupshotError, ModelUnavailableError
from personas.faces import (
    ArcFaceBackend,
    DlibBackend,
    Face,
    FaceBackend,
    arcface_pack_dir,
    insightface_root,
    load_face_backend,
)

REPO = Path(__file__).resolve().parents[1]


def _distance(a: Face, b: Face) -> float:
    return float(np.linalg.norm(a.embedding - b.embedding))


def _variants(image: np.ndarray) -> list[np.ndarray]:
    """The same picture mirrored, cropped and rescaled."""
    pil = Image.fromarray(image)
    w, h = pil.size
    return [
        np.ascontiguousarray(image[:, ::-1]),
        np.asarray(pil.crop((int(w * 0.08), int(h * 0.05), int(w * 0.95), int(h * 0.9)))),
        np.asarray(pil.resize((int(w * 0.7), int(h * 0.7)), Image.Resampling.LANCZOS)),
    ]


def _only_face(backend: FaceBackend, image: np.ndarray) -> Face:
    faces = backend.detect(image)
    assert len(faces) == 1, f"expected one face, found {len(faces)}"
    return faces[0]


# --- dlib on real photos ---------------------------------------------------------------


def test_dlib_finds_one_face_on_single_portraits(dlib_backend, astronaut, grace_hopper):
    for image in (astronaut, grace_hopper):
        face = _only_face(dlib_backend, image)
        h, w = image.shape[:2]
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert 60 < face.height < 300  # a portrait's face, not a patch or the whole frame
        assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
        assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
        assert face.landmarks.shape == (5, 2)
        # the landmarks (eye corners, nose) lie inside the face box
        assert np.all((face.landmarks[:, 0] >= x0) & (face.landmarks[:, 0] <= x1))


def test_dlib_astronaut_face_is_where_her_face_is(dlib_backend, astronaut):
    # Her face is at about x 175-265, y 76-166 (by eye); the mission patch on her suit,
    # which HOG scores 0.12, must not be reported.
    x0, y0, x1, y1 = _only_face(dlib_backend, astronaut).box
    assert 160 < (x0 + x1) / 2 < 280 and 60 < (y0 + y1) / 2 < 180


def test_dlib_finds_every_face_of_a_group_largest_first(dlib_backend, group_photo):
    faces = dlib_backend.detect(group_photo)
    assert len(faces) == 6
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    # six different boxes
    centers = {(round((f.box[0] + f.box[2]) / 20), round((f.box[1] + f.box[3]) / 20)) for f in faces}
    assert len(centers) == 6


def test_dlib_no_face_on_a_flat_image_or_a_face_turned_away(dlib_backend, camera):
    assert dlib_backend.detect(np.full((300, 400, 3), 128, np.uint8)) == []
    # the cameraman looks into his viewfinder, face half hidden: HOG sees frontal faces only
    assert dlib_backend.detect(camera) == []


def test_dlib_threshold_separates_same_face_from_different_people(
    dlib_backend, astronaut, grace_hopper, tom_hanks, group_photo
):
    people = {}
    for name, image in (("astronaut", astronaut), ("hopper", grace_hopper)):
        people[name] = [_only_face(dlib_backend, v) for v in [image, *_variants(image)]]
    # a 112 px aligned crop: too small to crop or shrink further, so just mirrored
    mirrored = np.ascontiguousarray(tom_hanks[:, ::-1])
    people["hanks"] = [_only_face(dlib_backend, v) for v in (tom_hanks, mirrored)]
    for i, face in enumerate(dlib_backend.detect(group_photo)):
        people[f"t1-{i}"] = [face]

    same = [_distance(a, b) for faces in people.values() for a, b in itertools.combinations(faces, 2)]
    different = [
        _distance(a, b)
        for (_, fa), (_, fb) in itertools.combinations(people.items(), 2)
        for a in fa
        for b in fb
    ]
    assert len(same) == 6 + 6 + 1
    assert len(different) == 4 * 4 + 2 * (4 * 2) + (4 + 4 + 2) * 6 + 15
    # measured: same 0.03-0.16, different 0.43-0.67 (see DlibBackend.match_threshold)
    assert max(same) < dlib_backend.match_threshold < min(different)
    assert max(same) < 0.25 and min(different) > 0.4


def test_dlib_downscaled_detection_maps_boxes_back(grace_hopper):
    # max_side=256 detects on a half-size copy; boxes must still be in input pixels
    full = DlibBackend(max_side=None)
    small = DlibBackend(max_side=256)
    a, b = _only_face(full, grace_hopper), _only_face(small, grace_hopper)
    # HOG's boxes come in pyramid steps, so compare centres and sizes, not corners
    center = lambda f: np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2])  # noqa: E731
    assert np.linalg.norm(center(a) - center(b)) < 0.1 * a.height
    assert 0.8 < b.height / a.height < 1.25
    assert _distance(a, b) < 0.15


def test_dlib_describe_records_weights(dlib_backend):
    info = dlib_backend.describe()
    assert info["name"] == "dlib" and info["match_threshold"] == dlib_backend.match_threshold
    assert "dlib" in info["version"]
    import importlib.util

    models = Path(importlib.util.find_spec("face_recognition_models").origin).parent / "models"
    for filename, digest in info["weights_sha256"].items():
        assert digest == hashlib.sha256((models / filename).read_bytes()).hexdigest()
    assert set(info["weights_sha256"]) == set(DlibBackend.WEIGHT_FILES)
    assert isinstance(dlib_backend, FaceBackend)


def test_detect_rejects_non_rgb_input(dlib_backend):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dlib_backend.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dlib_backend.detect(np.zeros((64, 64, 3), np.float32))


# --- loading ---------------------------------------------------------------------------


def test_importing_faces_loads_no_model_library():
    code = (
        "import sys, personas.faces, personas.photos\n"
        "heavy = [m for m in ('dlib', 'insightface', 'onnxruntime', 'cv2', 'torch') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_backend_name_lists_choices():
    with pytest.raises(GroupshotError, match="choose one of auto, arcface, dlib"):
        load_face_backend("facenet")


def test_arcface_missing_pack_is_one_line_naming_the_fix(tmp_path):
    root = tmp_path / "insightface"
    with pytest.raises(ModelUnavailableError) as caught:
        load_face_backend("arcface", root=str(root))
    message = str(caught.value)
    assert "\n" not in message
    assert "buffalo_l" in message and str(root / "models" / "buffalo_l") in message
    assert "--face-model dlib" in message and "FaceAnalysis" in message
    assert not root.exists()  # nothing downloaded, no folder created


def test_insightface_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPSHOT_INSIGHTFACE_ROOT", str(tmp_path / "envroot"))
    assert insightface_root() == tmp_path / "envroot"
    assert insightface_root(tmp_path / "arg") == tmp_path / "arg"
    assert arcface_pack_dir("buffalo_s", tmp_path) == tmp_path / "models" / "buffalo_s"
    monkeypatch.delenv("GROUPSHOT_INSIGHTFACE_ROOT")
    assert insightface_root() == Path.home() / ".insightface"


def test_auto_falls_back_to_dlib_with_one_warning(tmp_path, caplog, monkeypatch):
    import personas.faces

    monkeypatch.setattr(personas.faces, "_warned_auto_fallback", False)
    with caplog.at_level(logging.WARNING, logger="personas.faces"):
        first = load_face_backend("auto", root=tmp_path)
        second = load_face_backend("auto", root=tmp_path)
    assert first.name == second.name == "dlib"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dlib" in warnings[0].getMessage()


# --- insightface's code path, with tiny ONNX models made here ---------------------------

DET_SIZE = 128  # the tiny detector's fixed input
STRIDES = (8, 16, 32)
# keypoints around each anchor, in strides: eyes, nose, mouth corners
KPS = np.array([[-0.15, -0.1], [0.15, -0.1], [0.0, 0.05], [-0.12, 0.2], [0.12, 0.2]], np.float32)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_tiny_detector(path: Path) -> Path:
    """An SCRFD-shaped detector (9 outputs: scores, boxes, keypoints at strides 8/16/32, 2
    anchors each). Only stride 32 fires: a cell scores ~1 when its 32x32 patch is bright
    (mean > 0.5 in SCRFD's normalised input), boxes are +-16 px around the anchor."""
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []

    def const(name, array, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))

    cells = (DET_SIZE // 32) ** 2
    weight = np.full((1, 3, 32, 32), 20.0 / (3 * 32 * 32))  # 20 x mean brightness of a patch
    node("Conv", ["input.1", const("w", weight), const("b", [-10.0])], "logit",
         kernel_shape=[32, 32], strides=[32, 32])
    node("Sigmoid", ["logit"], "prob")
    node("Reshape", ["prob", const("cells", [cells, 1], np.int64)], "per_cell")
    node("Concat", ["per_cell", "per_cell"], "per_anchor", axis=1)  # 2 anchors, same score
    node("Reshape", ["per_anchor", const("rows", [cells * 2, 1], np.int64)], "score_32")
    outputs = {}
    for stride in STRIDES:
        n = (DET_SIZE // stride) ** 2 * 2
        if stride != 32:
            node("Identity", [const(f"z{stride}", np.zeros((n, 1)))], f"score_{stride}")
        node("Identity", [const(f"d{stride}", np.full((n, 4), 0.5))], f"bbox_{stride}")
        node("Identity", [const(f"k{stride}", np.tile(KPS.ravel(), (n, 1)))], f"kps_{stride}")
        outputs[stride] = n
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
        [
            helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [outputs[s], width])
            for kind, width in (("score", 1), ("bbox", 4), ("kps", 10))
            for s in STRIDES
        ],
        inits,
    )
    return _save(graph, path)


def make_tiny_recognizer(path: Path, dim: int = 16, seed: int = 0) -> np.ndarray:
    """An ArcFace-shaped recogniser: 112x112 input, 16x16 average pool, a random linear map."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((3 * 7 * 7, dim)).astype(np.float32)
    # Node names must not start with Sub/Mul: insightface would take that for an mxnet
    # export with normalisation built in.
    nodes = [
        helper.make_node(
            "AveragePool", ["data"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16], name="pool"
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "proj_w"], ["fc1"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(weight, "proj_w")],
    )
    _save(graph, path)
    return weight


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    """<root>/models/buffalo_l holding the tiny detector and recogniser."""
    root = tmp_path_factory.mktemp("insightface")
    pack = root / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    make_tiny_detector(pack / "det_tiny.onnx")
    weight = make_tiny_recognizer(pack / "w_tiny.onnx")
    return root, pack, weight


def _bright_square_image() -> np.ndarray:
    # 256x256 dark image, a bright 64x64 square at x 128-192, y 64-128. The detector
    # sees it at half size: the stride-32 cell at row 1, column 2 lights up.
    image = np.full((256, 256, 3), 10, np.uint8)
    image[64:128, 128:192] = (250, 240, 230)
    image[80:90, 140:150] = (0, 0, 255)  # some structure for the recogniser, not symmetric
    return image


def _expected_embedding(image_rgb: np.ndarray, kps: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The tiny recogniser by hand: insightface's alignment, then pool and project in numpy."""
    from insightface.utils import face_align

    aligned_bgr = face_align.norm_crop(image_rgb[:, :, ::-1].copy(), landmark=kps, image_size=112)
    x = (aligned_bgr[:, :, ::-1].astype(np.float32) - 127.5) / 127.5  # RGB, ArcFace's normalisation
    pooled = x.transpose(2, 0, 1).reshape(3, 7, 16, 7, 16).mean(axis=(2, 4))
    embedding = pooled.reshape(-1) @ weight
    return embedding / np.linalg.norm(embedding)


def test_arcface_pack_detects_and_embeds_with_tiny_models(tiny_pack):
    root, _, weight = tiny_pack
    backend = load_face_backend("arcface", root=root)
    assert backend.name == "arcface" and backend.model == "buffalo_l"
    image = _bright_square_image()
    face = _only_face(backend, image)
    # anchor (64, 32) in detector pixels, +-16 px, detector scale 0.5
    assert face.box == pytest.approx((96.0, 32.0, 160.0, 96.0))
    assert face.score > 0.99
    expected_kps = (np.array([64.0, 32.0]) + KPS * 32) * 2
    assert np.allclose(face.landmarks, expected_kps, atol=1e-3)
    assert face.embedding.dtype == np.float32 and face.embedding.shape == (16,)
    assert np.allclose(face.embedding, _expected_embedding(image, face.landmarks, weight), atol=1e-4)
    assert backend.detect(np.full((100, 300, 3), 10, np.uint8)) == []


def test_backends_pickle_as_their_recipe(tiny_pack, dlib_backend, astronaut):
    """eval's face workers get the backend pickled: the copy is rebuilt from its settings and
    finds the same faces; ArcFace's copy with threads=1 runs one onnxruntime thread."""
    import pickle

    copy = pickle.loads(pickle.dumps(DlibBackend(upsample=0, min_score=0.3)))
    assert copy.describe()["detector"] == "hog upsample=0 min_score=0.3 max_side=1024"
    a, b = dlib_backend.detect(astronaut), pickle.loads(pickle.dumps(dlib_backend)).detect(astronaut)
    assert [f.box for f in a] == [f.box for f in b] and np.array_equal(a[0].embedding, b[0].embedding)

    root, _, _ = tiny_pack
    arc = load_face_backend("arcface", root=root)
    cls, kwargs = arc.recipe()
    one = cls(**{**kwargs, "threads": 1})
    assert one._det.session.get_session_options().intra_op_num_threads == 1
    image = _bright_square_image()
    f1, f2 = _only_face(arc, image), _only_face(pickle.loads(pickle.dumps(one)), image)
    assert f1.box == f2.box and np.allclose(f1.embedding, f2.embedding, atol=1e-6)


def test_arcface_from_explicit_files_matches_pack(tiny_pack):
    root, pack, _ = tiny_pack
    from_pack = load_face_backend("arcface", root=root)
    from_files = ArcFaceBackend(detector=pack / "det_tiny.onnx", recognizer=pack / "w_tiny.onnx")
    image = _bright_square_image()
    a, b = _only_face(from_pack, image), _only_face(from_files, image)
    assert np.array_equal(a.embedding, b.embedding) and a.box == b.box
    info = from_files.describe()
    assert info["name"] == "arcface" and info["match_threshold"] == pytest.approx(1.10)
    assert info["weights_sha256"]["w_tiny.onnx"] == hashlib.sha256((pack / "w_tiny.onnx").read_bytes()).hexdigest()
    assert info["providers"][-1] == "CPUExecutionProvider"


def test_arcface_rejects_files_in_the_wrong_roles(tiny_pack, tmp_path):
    _, pack, _ = tiny_pack
    with pytest.raises(ModelUnavailableError, match="expected a recognition model"):
        ArcFaceBackend(detector=pack / "det_tiny.onnx", recognizer=pack / "det_tiny.onnx")
    with pytest.raises(GroupshotError, match="both detector= and recognizer="):
        ArcFaceBackend(detector=pack / "det_tiny.onnx")
    with pytest.raises(ModelUnavailableError, match="recognizer file not found"):
        ArcFaceBackend(detector=pack / "det_tiny.onnx", recognizer=tmp_path / "nope.onnx")


def test_auto_prefers_arcface_when_its_pack_is_present(tiny_pack):
    root, _, _ = tiny_pack
    assert load_face_backend("auto", root=root).name == "arcface"


def test_arcface_pack_by_folder_path_and_incomplete_packs(tiny_pack, tmp_path):
    _, pack, _ = tiny_pack
    assert ArcFaceBackend(str(pack), root=tmp_path / "unused").model == "buffalo_l"
    half = tmp_path / "half_pack"
    half.mkdir()
    (half / "w_tiny.onnx").write_bytes((pack / "w_tiny.onnx").read_bytes())
    with pytest.raises(ModelUnavailableError, match="has no detection model"):
        ArcFaceBackend(str(half))


# -- the torch runtime: insightface's ONNX graphs run by PyTorch (onnx2torch), in batches -----


def test_torch_runtime_finds_the_hand_computed_face(tiny_pack):
    """The hand-built pack above, whose right answer is known: the torch runtime gets it."""
    root, _, weight = tiny_pack
    backend = ArcFaceBackend(root=root, runtime="torch", device="cpu")
    assert backend.runtime == "torch" and not backend.on_gpu
    image = _bright_square_image()
    face = _only_face(backend, image)
    assert face.box == pytest.approx((96.0, 32.0, 160.0, 96.0))
    assert np.allclose(face.landmarks, (np.array([64.0, 32.0]) + KPS * 32) * 2, atol=1e-3)
    assert np.allclose(face.embedding, _expected_embedding(image, face.landmarks, weight), atol=1e-4)
    assert backend.detect_many([np.full((100, 300, 3), 10, np.uint8), image])[0] == []
    assert backend.describe()["runtime"].startswith("torch cpu (onnx2torch")


@pytest.fixture(scope="module")
def layout_pack(tmp_path_factory):
    """insightface's own layouts (SCRFD-10G-KPS, iresnet50) at tiny width, random weights."""
    from personas.face_nets import write_random_pack

    root = tmp_path_factory.mktemp("layout")
    write_random_pack(root / "models" / "buffalo_l", "tiny", seed=1, detections=3)
    return root


def _photos_of_many_shapes(astronaut) -> list[np.ndarray]:
    from PIL import Image

    pil = Image.fromarray(astronaut)
    return [astronaut, np.asarray(pil.resize((300, 700))), np.asarray(pil.resize((900, 240))),
            np.ascontiguousarray(astronaut[:, ::-1]), np.asarray(pil.rotate(20))]


@pytest.mark.parametrize("det_size", [(640, 640), None])  # None: insightface's 128 + 640 px
def test_torch_runtime_equals_insightface_on_onnxruntime(layout_pack, astronaut, det_size):
    """Our batched decoding of SCRFD's outputs and batched recognition give what insightface's
    own SCRFD.detect + ArcFaceONNX.get give through onnxruntime, on the same graphs."""
    images = _photos_of_many_shapes(astronaut)
    reference = ArcFaceBackend(root=layout_pack, runtime="onnxruntime", det_size=det_size)
    fast = ArcFaceBackend(root=layout_pack, runtime="torch", device="cpu", det_size=det_size, batch_size=2)
    want = [reference.detect(im) for im in images]
    got = fast.detect_many(images)
    assert sum(map(len, want)) >= len(images)  # the random detector finds something to compare
    assert len({round(f[0].box[0], 2) for f in want if f}) > 1  # and not the same box everywhere
    def in_place_order(found):  # faces of equal area (and tied scores) may come in either order
        return sorted(found, key=lambda f: tuple(round(v, 1) for v in (*f.box, f.score)))

    for w, g in zip(want, got):
        assert len(w) == len(g)
        for a, b in zip(in_place_order(w), in_place_order(g)):
            assert np.allclose(a.box, b.box, atol=1e-3) and a.score == pytest.approx(b.score, abs=1e-5)
            assert np.allclose(a.landmarks, b.landmarks, atol=1e-3)
            assert np.allclose(a.embedding, b.embedding, atol=1e-5)
    one = fast.detect(images[1])  # one image through the same path
    assert np.allclose([f.box for f in in_place_order(one)], [f.box for f in in_place_order(got[1])], atol=1e-3)


def test_random_face_models_have_the_published_sizes():
    """The benchmark's stand-ins are insightface's models in all but weights: parameters and
    multiply-accumulates of SCRFD-10G-KPS (4.23 M, 10 GFLOPs at 640x480 in the SCRFD paper)
    and iresnet50 (43.6 M, 6.3 G at 112x112)."""
    from personas.face_nets import build_detector, build_recognizer, count_macs

    det, rec = build_detector("full"), build_recognizer("full")
    assert sum(p.numel() for p in det.parameters()) / 1e6 == pytest.approx(4.23, abs=0.01)
    assert count_macs(det, (1, 3, 480, 640)) / 1e9 == pytest.approx(10.0, abs=0.1)
    assert sum(p.numel() for p in rec.parameters()) / 1e6 == pytest.approx(43.59, abs=0.01)
    assert count_macs(rec, (1, 3, 112, 112)) / 1e9 == pytest.approx(6.31, abs=0.02)


def test_arcface_runtime_choices(tiny_pack, monkeypatch):
    root, _, _ = tiny_pack
    with pytest.raises(GroupshotError, match="choose one of auto, onnxruntime, torch"):
        ArcFaceBackend(root=root, runtime="tensorrt")
    with pytest.raises(GroupshotError, match="batch_size must be >= 1"):
        ArcFaceBackend(root=root, runtime="torch", batch_size=0)
    # auto on a machine without CUDA: insightface's own onnxruntime path
    assert ArcFaceBackend(root=root).runtime == "onnxruntime"
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert faces._choose_runtime("auto", None) == "torch"  # a CUDA card, no onnxruntime-gpu
    assert faces._choose_runtime("auto", ["CPUExecutionProvider"]) == "onnxruntime"  # providers named


def test_arcface_device_cpu_keeps_it_on_onnxruntime(tiny_pack, monkeypatch):
    """evaluate --device cpu: ArcFace stays on the CPU even where a GPU would be chosen."""
    import torch

    root, _, _ = tiny_pack
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = load_face_backend("arcface", root=root, device="cpu")
    assert backend.runtime == "onnxruntime" and not backend.on_gpu
    assert backend.providers == ["CPUExecutionProvider"]
    assert faces._choose_runtime("auto", None, "cuda:1") == "torch"
