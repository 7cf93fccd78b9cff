"""Face detection and identity embeddings behind one interface (`FaceBackend`): `arcface`
(insightface model pack) and `dlib` (weights from a registry package, fully offline)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from personas.errors import GroupshotError, ModelUnavailableError

__all__ = [
    "Face",
    "FaceBackend",
    "DlibBackend",
    "ArcFaceBackend",
    "FACE_BACKENDS",
    "load_face_backend",
    "insightface_root",
    "arcface_pack_dir",
]

logger = logging.getLogger(__name__)

FACE_BACKENDS = ("auto", "arcface", "dlib")
DEFAULT_ARCFACE_PACK = "buffalo_l"


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Face:
    """One detected face: box and landmarks in pixels of the input image, unit-norm embedding."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float  # detector confidence (1.0 where the detector has none)
    embedding: np.ndarray = field(repr=False)  # (D,) float32, unit L2 norm
    landmarks: np.ndarray | None = field(default=None, repr=False)  # (K, 2) pixels

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.width * self.height


@runtime_checkable
class FaceBackend(Protocol):
    """What photos, train and eval need from a face model."""

    name: str  # "arcface" | "dlib"
    model: str  # model pack / file name
    # L2 distance between unit-normalised embeddings above which two faces are
    # "not the same person" for this backend.
    match_threshold: float

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 (H, W, 3) image, largest first."""
        ...

    def describe(self) -> dict:
        """{"name", "model", "version", "weights_sha256", "match_threshold", ...} for reports."""
        ...


# ---------------------------------------------------------------------------------------
# helpers shared by the backends


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be an RGB array of shape (H, W, 3), got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vector))
    # A zero vector has no direction; keep it zero rather than dividing into NaNs.
    return vector / norm if norm > 0 else vector


def _clip_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    """The box inside the image, corners in order (a detector's regression can swap them)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return (
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    )


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a weights file, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def _package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class _Rebuildable:
    """Pickled as its recipe (class + constructor keywords), not its model objects: eval's
    face workers rebuild the backend in their own process. Subclasses set self._kwargs."""

    _kwargs: dict

    def recipe(self) -> tuple[type, dict]:
        """(class, keyword arguments) that rebuild this backend, e.g. in a worker process."""
        return type(self), dict(self._kwargs)

    def __reduce__(self):
        return (_rebuild, self.recipe())


def _rebuild(cls, kwargs: dict):
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------
# dlib


def _dlib_models_dir() -> Path:
    # GROUPSHOT_DLIB_MODELS: a folder holding the .dat files, for machines where the
    # 100 MB face-recognition-models package cannot be installed (the GPU benchmarks).
    if os.environ.get("GROUPSHOT_DLIB_MODELS"):
        return Path(os.environ["GROUPSHOT_DLIB_MODELS"])
    # Located, not imported: face_recognition_models/__init__.py imports pkg_resources,
    # which setuptools >= 81 no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "face model 'dlib' needs the face-recognition-models package: "
            "pip install face-recognition-models dlib-bin"
        )
    return Path(spec.origin).parent / "models"


class DlibBackend(_Rebuildable):
    """dlib: HOG frontal detector, 5-point landmarks, ResNet 128-d descriptor; offline.

    HOG finds frontal and near-frontal faces only (profiles are missed) and, with the
    default upsample=1, faces down to about 40 px in the (downscaled) image.
    """

    name = "dlib"
    model = "dlib_face_recognition_resnet_model_v1"
    # dlib's documented threshold is 0.6 on *raw* descriptors, whose norms are not 1:
    # on the registry photos (astronaut, Grace Hopper, Tom Hanks, the six of t1.jpg) they
    # were 1.37-1.47 (mean 1.43), so 0.6 raw ~ 0.6 / 1.43 = 0.42 unit-normalised.
    # Measured unit-normalised (dlib-bin 20.0.1, HOG upsample 1): the same face mirrored,
    # cropped or rescaled 0.03-0.16 apart; different people 0.43-0.67 apart (closest pair:
    # two of the t1.jpg faces, 0.434; raw 0.63). deepface's "Dlib" euclidean_l2 threshold
    # is 0.40 (deepface/config/threshold.py), which agrees.
    match_threshold = 0.42

    WEIGHT_FILES = (
        "shape_predictor_5_face_landmarks.dat",
        "dlib_face_recognition_resnet_model_v1.dat",
    )

    def __init__(self, *, upsample: int = 1, min_score: float = 0.25, max_side: int | None = 1024):
        """upsample: HOG pyramid upsampling (1 finds ~40 px faces, each step costs ~4x time).
        min_score: HOG score a detection must exceed. dlib's own default is 0; on
        skimage's astronaut HOG scores the mission patch on her suit 0.12, while the weakest
        real face among the registry photos (t1.jpg) scores 0.37.
        max_side: detect on a copy downscaled to this longest side (HOG time grows with the
        pixel count); landmarks and embeddings still use the full image. None: never.
        """
        if upsample < 0:
            raise GroupshotError(f"upsample must be >= 0, got {upsample}")
        if max_side is not None and max_side < 64:
            raise GroupshotError(f"max_side must be >= 64 or None, got {max_side}")
        import dlib

        self.upsample = int(upsample)
        self.min_score = float(min_score)
        self.max_side = max_side
        self._models_dir = _dlib_models_dir()
        paths = [self._models_dir / f for f in self.WEIGHT_FILES]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ModelUnavailableError(
                f"face model 'dlib': weights missing ({', '.join(missing)}); "
                "reinstall with: pip install --force-reinstall face-recognition-models"
            )
        self._dlib = dlib
        self._kwargs = dict(upsample=upsample, min_score=min_score, max_side=max_side)
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(paths[0]))
        self._encoder = dlib.face_recognition_model_v1(str(paths[1]))
        self._weights_sha256: dict[str, str] | None = None

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _check_image(image)
        height, width = image.shape[:2]
        scale = 1.0
        small = image
        if self.max_side is not None and max(height, width) > self.max_side:
            from PIL import Image

            scale = self.max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        rects, scores, _ = self._detector.run(small, self.upsample, self.min_score)
        if not rects:
            return []
        dlib = self._dlib
        shapes = dlib.full_object_detections()
        full_rects = []
        for r in rects:
            full = dlib.rectangle(
                round(r.left() / scale), round(r.top() / scale),
                round(r.right() / scale), round(r.bottom() / scale),
            )
            full_rects.append(full)
            shapes.append(self._predictor(image, full))
        descriptors = self._encoder.compute_face_descriptor(image, shapes)
        faces = []
        for rect, score, shape, descriptor in zip(full_rects, scores, shapes, descriptors):
            landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
            # dlib rectangles are inclusive; +1 makes x1 - x0 the width in pixels.
            box = (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
            faces.append(
                Face(
                    box=_clip_box(box, width, height),
                    score=float(score),
                    embedding=_unit(np.array(descriptor)),
                    landmarks=landmarks,
                )
            )
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def describe(self) -> dict:
        if self._weights_sha256 is None:
            self._weights_sha256 = {
                f: _file_sha256(self._models_dir / f) for f in self.WEIGHT_FILES
            }
        return {
            "name": self.name,
            "model": self.model,
            "version": f"dlib {self._dlib.__version__}, face_recognition_models "
            f"{_package_version('face_recognition_models')}",
            "weights_sha256": dict(self._weights_sha256),
            "match_threshold": self.match_threshold,
            "detector": f"hog upsample={self.upsample} min_score={self.min_score} "
            f"max_side={self.max_side}",
        }


# ---------------------------------------------------------------------------------------
# insightface (ArcFace)


def insightface_root(root: str | os.PathLike | None = None) -> Path:
    """The insightface root: `root`, else $GROUPSHOT_INSIGHTFACE_ROOT, else ~/.insightface."""
    chosen = root or os.environ.get("GROUPSHOT_INSIGHTFACE_ROOT") or "~/.insightface"
    return Path(chosen).expanduser()


def arcface_pack_dir(pack: str = DEFAULT_ARCFACE_PACK, root: str | os.PathLike | None = None) -> Path:
    """Where insightface keeps (and downloads) a model pack: <root>/models/<pack>."""
    return insightface_root(root) / "models" / pack


def _pack_present(pack_dir: Path) -> bool:
    return pack_dir.is_dir() and any(pack_dir.glob("*.onnx"))


def _onnx_providers() -> list[str]:
    import onnxruntime

    # CUDA when this onnxruntime build offers it (onnxruntime-gpu), else CPU.
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


ARCFACE_RUNTIMES = ("auto", "onnxruntime", "torch")


def _is_cuda(device: str | None) -> bool:
    return device is not None and str(device).startswith("cuda")


def _choose_runtime(runtime: str, providers: list[str] | None, device: str | None = None) -> str:
    """auto: onnxruntime on the CPU for device "cpu"; else onnxruntime where it has CUDA (or
    providers were named), else torch on a CUDA GPU when onnx2torch is installed, else
    onnxruntime on the CPU."""
    if runtime not in ARCFACE_RUNTIMES:
        raise GroupshotError(f"ArcFace runtime {runtime!r}: choose one of {', '.join(ARCFACE_RUNTIMES)}")
    if runtime != "auto":
        return runtime
    if device is not None and not _is_cuda(device):
        return "onnxruntime"
    if providers or _onnx_providers()[0] != "CPUExecutionProvider":
        return "onnxruntime"
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("onnx2torch") is not None:
        return "torch"
    return "onnxruntime"


class _TorchNet:
    """An ONNX model run by PyTorch (onnx2torch converts the graph to torch modules): the GPU
    path where onnxruntime has no CUDA build for this machine (onnxruntime-gpu follows one
    CUDA major version at a time), and one that takes any batch size."""

    def __init__(self, path: str, device: str):
        import torch
        from onnx2torch import convert

        self._torch = torch
        self.path = path
        self.device = torch.device(device)
        self.module = convert(path).eval().to(self.device)
        self.batches = True  # False once the graph turns out to fix its batch size at 1

    def __call__(self, images: np.ndarray, mean: float, std: float, chunk: int) -> list[np.ndarray]:
        """Outputs for (N, H, W, 3) uint8 RGB images, normalised here as insightface's
        cv2.dnn.blobFromImages does ((x - mean) / std, channels first), on the device: a
        quarter of the bytes to copy and no float blob on the CPU. Run `chunk` images at a
        time; each output comes back as (N, ...) for a graph with a batch axis and
        (N * A, C) for one that folds the batch into its rows."""
        torch = self._torch
        if not self.batches:
            chunk = 1
        parts: list[list[np.ndarray]] = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], chunk):
                x = torch.from_numpy(images[start:start + chunk]).to(self.device, non_blocking=True)
                x = (x.permute(0, 3, 1, 2).float() - mean) * (1.0 / std)  # (n, 3, H, W)
                try:
                    # Full fp32 convolutions (PyTorch lets cuDNN use TF32 by default): the
                    # scores near the detection threshold then agree with onnxruntime's, and
                    # the face networks are small enough that the GPU is not the bottleneck.
                    cudnn = torch.backends.cudnn
                    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                     deterministic=cudnn.deterministic, allow_tf32=False):
                        out = self.module(x)
                except RuntimeError:
                    if x.shape[0] == 1:
                        raise
                    # An export with a fixed batch of 1 (a Reshape to constant sizes): go on
                    # one image at a time.
                    logger.info("%s takes one image at a time; running it unbatched", self.path)
                    self.batches = False
                    return self(images, mean, std, 1)
                out = list(out) if isinstance(out, (list, tuple)) else [out]
                parts.append([o.float().cpu().numpy() for o in out])
        return [np.concatenate(column) for column in zip(*parts)]


class ArcFaceBackend(_Rebuildable):
    """insightface: SCRFD detector + ArcFace recogniser (512-d), from a model pack or two files.

    Either `pack` (a name under <root>/models/, or a folder path) or both `detector` and
    `recognizer` (ONNX files; insightface routes them by their input/output shapes).
    Never downloads: a missing pack raises ModelUnavailableError. det_size (640, 640) is
    the single scale buffalo_l is usually run and evaluated at; None takes insightface's
    own default (2.1: 128 and 640 px).
    """

    name = "arcface"
    # L2 between unit embeddings; cos = 1 - d^2 / 2. deepface calibrates ArcFace on LFW
    # at euclidean_l2 1.13 and insightface's buffalo_l at 1.10 (deepface/config/threshold.py);
    # cosine similarity ~0.4, the usual verification cut for ArcFace models, is
    # sqrt(2 - 2 * 0.4) = 1.095. We use 1.10 (cos ~0.395).
    match_threshold = 1.10

    def __init__(
        self,
        pack: str = DEFAULT_ARCFACE_PACK,
        *,
        root: str | os.PathLike | None = None,
        detector: str | os.PathLike | None = None,
        recognizer: str | os.PathLike | None = None,
        det_size: tuple[int, int] | None = (640, 640),
        det_thresh: float = 0.5,
        providers: list[str] | None = None,
        threads: int | None = None,
        runtime: str = "auto",
        device: str | None = None,
        batch_size: int = 32,
    ):
        """threads: onnxruntime's intra-op threads per model (None: onnxruntime's default,
        every physical core); eval's face workers run one each.
        runtime: "onnxruntime" (insightface's own path), "torch" (the same ONNX graphs run by
        PyTorch on `device`, images and faces in batches of `batch_size`), or "auto" (see
        _choose_runtime). device: torch runtime only; default cuda when available, else cpu."""
        if (detector is None) != (recognizer is None):
            raise GroupshotError("ArcFaceBackend: give both detector= and recognizer= ONNX files, or neither")
        if batch_size < 1:
            raise GroupshotError(f"ArcFace batch_size must be >= 1, got {batch_size}")
        self.root = insightface_root(root)
        self.det_size = tuple(det_size) if det_size is not None else None
        self.det_thresh = float(det_thresh)
        self.runtime = _choose_runtime(runtime, providers, device)
        if self.runtime == "onnxruntime" and providers is None and device == "cpu":
            providers = ["CPUExecutionProvider"]
        self.batch_size = int(batch_size)
        self.device = None
        if self.runtime == "torch":
            if importlib.util.find_spec("onnx2torch") is None:
                raise ModelUnavailableError("ArcFace runtime 'torch' needs onnx2torch: pip install onnx2torch")
            import torch

            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # The torch runtime still loads the models through insightface (routing, input
        # normalisation, thresholds); onnxruntime on the CPU serves only that.
        self.providers = ["CPUExecutionProvider"] if self.runtime == "torch" else (providers or _onnx_providers())
        self.threads = threads
        self._kwargs = dict(pack=pack, root=root, detector=detector, recognizer=recognizer, det_size=det_size,
                            det_thresh=det_thresh, providers=providers, threads=threads, runtime=self.runtime,
                            device=device, batch_size=batch_size)
        if detector is not None:
            files = {"detector": Path(detector), "recognizer": Path(recognizer)}
            for role, path in files.items():
                if not path.is_file():
                    raise ModelUnavailableError(f"ArcFace {role} file not found: {path}")
            self.model = f"{files['detector'].name}+{files['recognizer'].name}"
            self._load_files(files["detector"], files["recognizer"])
        else:
            # A path names a folder; a bare name is looked up under <root>/models/ only, so
            # a folder that happens to share the name in the working directory is not used.
            as_path = os.sep in pack or "/" in pack or pack.startswith("~")
            pack_dir = Path(pack).expanduser() if as_path else self.root / "models" / pack
            # Check before insightface sees the name: FaceAnalysis would try to download.
            if not _pack_present(pack_dir):
                raise ModelUnavailableError(
                    f"face model pack '{pack}' not found in {pack_dir}: on a networked machine run "
                    f"`python -c \"from insightface.app import FaceAnalysis; "
                    f"FaceAnalysis(name='{pack}', root='{self.root}')\"` (insightface downloads "
                    f"the pack to <root>/models/{pack}; copy it to {pack_dir} if you ran it "
                    "elsewhere), or use --face-model dlib, which works offline"
                )
            self.model = pack_dir.name
            self._load_pack(pack_dir)
        self._weights_sha256: dict[str, str] | None = None

    @property
    def on_gpu(self) -> bool:
        if self.runtime == "torch":
            return _is_cuda(self.device)
        return self.providers[0] != "CPUExecutionProvider"

    def _session_kwargs(self) -> dict:
        if self.threads is None:
            return {}
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = int(self.threads)
        return {"sess_options": options}

    def _load_pack(self, pack_dir: Path) -> None:
        from insightface.app import FaceAnalysis

        # name=<folder> makes FaceAnalysis load that folder as is (no download); root= keeps
        # any folder it might create inside our root rather than in ~/.insightface.
        try:
            app = FaceAnalysis(
                name=str(pack_dir),
                root=str(self.root),
                allowed_modules=["detection", "recognition"],
                providers=self.providers,
                **self._session_kwargs(),
            )
        except AssertionError:  # insightface asserts that a pack holds a detector
            app = None
        for task in ("detection", "recognition"):
            if app is None or task not in app.models:
                raise ModelUnavailableError(
                    f"face model pack {pack_dir} has no {task} model (*.onnx); re-download or "
                    "replace that folder, or use --face-model dlib"
                )
        self._setup(app.models["detection"], app.models["recognition"])

    def _load_files(self, detector: Path, recognizer: Path) -> None:
        from insightface.model_zoo import get_model

        det = get_model(str(detector), providers=self.providers, **self._session_kwargs())
        rec = get_model(str(recognizer), providers=self.providers, **self._session_kwargs())
        for role, model, task in (("detector", det, "detection"), ("recognizer", rec, "recognition")):
            if model is None or model.taskname != task:
                got = "nothing" if model is None else model.taskname
                raise ModelUnavailableError(
                    f"ArcFace {role} {detector if role == 'detector' else recognizer}: "
                    f"insightface reads it as {got}, expected a {task} model"
                )
        self._setup(det, rec)

    def _setup(self, det, rec) -> None:
        from insightface.app.common import Face as InsightFace

        det.prepare(0, input_size=self.det_size, det_thresh=self.det_thresh)
        rec.prepare(0)
        self._det, self._rec, self._insight_face = det, rec, InsightFace
        self._torch_det = self._torch_rec = None
        if self.runtime == "torch":
            self._torch_det = _TorchNet(det.model_file, self.device)
            self._torch_rec = _TorchNet(rec.model_file, self.device)

    def detect(self, image: np.ndarray) -> list[Face]:
        if self.runtime == "torch":
            return self.detect_many([image])[0]
        image = _check_image(image)
        height, width = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # insightface works in OpenCV's BGR
        boxes, keypoints = self._det.detect(bgr)
        faces = []
        for i in range(boxes.shape[0]):
            kps = None if keypoints is None else np.asarray(keypoints[i], dtype=np.float32)
            if kps is None:
                # ArcFace embeds an aligned crop made from the 5 keypoints; without them
                # there is nothing to embed.
                raise ModelUnavailableError(f"ArcFace detector {self._det.model_file} gives no keypoints")
            found = self._insight_face(bbox=boxes[i, :4], kps=kps, det_score=boxes[i, 4])
            self._rec.get(bgr, found)
            faces.append(
                Face(
                    box=_clip_box(boxes[i, :4], width, height),
                    score=float(boxes[i, 4]),
                    embedding=_unit(found.embedding),
                    landmarks=kps,
                )
            )
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def detect_many(self, images: list[np.ndarray]) -> list[list[Face]]:
        """detect() for several images; the torch runtime runs them through each network as
        one batch. Same decoding as insightface's SCRFD.detect (tested against it)."""
        if self.runtime != "torch":
            return [self.detect(image) for image in images]
        from insightface.utils import face_align

        # insightface works in BGR and swaps to RGB for the networks; resizing and alignment
        # act on each channel alone, so staying in RGB gives the same network inputs.
        rgbs = [_check_image(image) for image in images]
        found = self._find_boxes(rgbs)  # per image: (det (K, 5), kps (K, 5, 2))
        rec = self._rec
        width, height = rec.input_size
        crops = [face_align.norm_crop(rgb, landmark=kps[k], image_size=width)
                 for rgb, (det, kps) in zip(rgbs, found) for k in range(det.shape[0])]
        embeddings = np.zeros((0, 1), np.float32)
        if crops:
            import cv2

            crops = [c if c.shape[:2] == (height, width) else cv2.resize(c, (width, height)) for c in crops]
            embeddings = self._torch_rec(np.stack(crops), rec.input_mean, rec.input_std, 4 * self.batch_size)[0]
        out, at = [], 0
        for image, (det, kps) in zip(images, found):
            height, width = image.shape[:2]
            faces = [Face(box=_clip_box(det[k, :4], width, height), score=float(det[k, 4]),
                          embedding=_unit(embeddings[at + k]), landmarks=kps[k].astype(np.float32))
                     for k in range(det.shape[0])]
            at += det.shape[0]
            faces.sort(key=lambda f: f.area, reverse=True)
            out.append(faces)
        return out

    def _find_boxes(self, rgbs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """SCRFD.detect's candidates, merge and NMS for a batch of RGB images."""
        import cv2
        from insightface.model_zoo.scrfd import distance2bbox, distance2kps

        det = self._det
        if not det.use_kps:
            raise ModelUnavailableError(f"ArcFace detector {det.model_file} gives no keypoints")
        sizes = list(getattr(det, "input_sizes", None) or [det.input_size])  # insightface >= 2: several
        candidates: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in rgbs]
        for width_in, height_in in sizes:
            canvases = np.zeros((len(rgbs), height_in, width_in, 3), np.uint8)  # (N, H, W, 3)
            scales = []
            for i, rgb in enumerate(rgbs):  # resize into the top-left, keeping the aspect ratio
                h, w = rgb.shape[:2]
                if h / w > height_in / width_in:
                    new_h, new_w = height_in, int(height_in / (h / w))
                else:
                    new_w, new_h = width_in, int(width_in * (h / w))
                canvases[i, :new_h, :new_w] = cv2.resize(rgb, (new_w, new_h))
                scales.append(new_h / h)
            outs = self._torch_det(canvases, det.input_mean, det.input_std, self.batch_size)
            n = len(rgbs)
            # (N, A, C) per output; a graph that folds the batch into A gives (N * A, C)
            outs = [o.reshape(n, -1, o.shape[-1]) for o in outs]
            fmc = det.fmc
            centres = [self._anchor_centres(height_in // stride, width_in // stride, stride)
                       for stride in det._feat_stride_fpn]
            for i, scale in enumerate(scales):
                scores_l, boxes_l, kps_l = [], [], []
                for idx, (stride, centers) in enumerate(zip(det._feat_stride_fpn, centres)):
                    scores = outs[idx][i]
                    keep = np.where(scores >= det.det_thresh)[0]
                    scores_l.append(scores[keep])
                    boxes_l.append(distance2bbox(centers, outs[idx + fmc][i] * stride)[keep])
                    points = distance2kps(centers, outs[idx + 2 * fmc][i] * stride)
                    kps_l.append(points.reshape(points.shape[0], -1, 2)[keep])
                scores = np.vstack(scores_l)
                if scores.size == 0:
                    continue
                order = np.argsort(-scores.ravel(), kind="stable")
                pre = np.hstack((np.vstack(boxes_l) / scale, scores)).astype(np.float32, copy=False)[order]
                candidates[i].append((pre, (np.vstack(kps_l) / scale)[order]))
        found = []
        for parts in candidates:
            if not parts:
                found.append((np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)))
                continue
            pre = np.vstack([p for p, _ in parts])
            kps = np.vstack([k for _, k in parts])
            order = np.argsort(-pre[:, 4], kind="stable")
            pre, kps = pre[order], kps[order]
            keep = det.nms(pre)
            found.append((pre[keep], kps[keep]))
        return found

    def _anchor_centres(self, rows: int, cols: int, stride: int) -> np.ndarray:
        """(rows * cols * anchors, 2) pixel centres, laid out as SCRFD.forward lays them."""
        centres = np.stack(np.mgrid[:rows, :cols][::-1], axis=-1).astype(np.float32)
        centres = (centres * stride).reshape(-1, 2)
        if self._det._num_anchors > 1:
            centres = np.stack([centres] * self._det._num_anchors, axis=1).reshape(-1, 2)
        return centres

    def describe(self) -> dict:
        import insightface

        files = {"detector": Path(self._det.model_file), "recognizer": Path(self._rec.model_file)}
        if self._weights_sha256 is None:
            self._weights_sha256 = {p.name: _file_sha256(p) for p in files.values()}
        return {
            "name": self.name,
            "model": self.model,
            "version": f"insightface {insightface.__version__}",
            "weights_sha256": dict(self._weights_sha256),
            "match_threshold": self.match_threshold,
            "detector": f"{files['detector'].name} det_size={self.det_size} det_thresh={self.det_thresh}",
            "runtime": self.runtime if self.runtime == "onnxruntime"
            else f"torch {self.device} (onnx2torch {_package_version('onnx2torch')}, batch {self.batch_size})",
            "providers": list(self.providers),
        }


# ---------------------------------------------------------------------------------------

_warned_auto_fallback = False


def load_face_backend(name: str = "auto", *, root: str | os.PathLike | None = None,
                      device: str | None = None) -> FaceBackend:
    """Load a face backend by name: "arcface", "dlib", or "auto". device: where ArcFace runs
    ("cpu", "cuda", "cuda:1", ...; None: a CUDA GPU when there is one); dlib is CPU-only.

    "auto" is arcface when its pack (buffalo_l under `root`) is present, else dlib with a
    one-time warning; it is meant for photo checking and cropping, never for eval scores.
    """
    if name not in FACE_BACKENDS:
        raise GroupshotError(f"unknown face model {name!r}: choose one of {', '.join(FACE_BACKENDS)}")
    if device is None:
        from personas.parallel import process_device

        device = process_device()  # under `accelerate launch`: this process's own GPU
    if name == "dlib":
        return DlibBackend()
    if name == "arcface":
        return ArcFaceBackend(root=root, device=device)
    pack_dir = arcface_pack_dir(DEFAULT_ARCFACE_PACK, root)
    if _pack_present(pack_dir):
        return ArcFaceBackend(root=root, device=device)
    global _warned_auto_fallback
    if not _warned_auto_fallback:
        _warned_auto_fallback = True
        logger.warning(
            "face model: ArcFace pack %s not found in %s, using dlib (offline) for face "
            "detection and cropping",
            DEFAULT_ARCFACE_PACK,
            pack_dir,
        )
    return DlibBackend()
