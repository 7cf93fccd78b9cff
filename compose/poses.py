"""Poses: OpenPose COCO-18 skeletons from a template, OpenPose JSON, a skeleton image or a photo,
validated, ordered left to right, drawn in the standard OpenPose colours, and assigned to names."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageOps

from personas import GroupshotError, ModelUnavailableError

KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)
NOSE, NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = range(8)
R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE, R_EYE, L_EYE, R_EAR, L_EAR = range(8, 18)
# A face can be placed from any of these; a person with none of them is rejected.
HEAD_KEYPOINTS = (NOSE, NECK, R_EYE, L_EYE, R_EAR, L_EAR)

# controlnet_aux util.draw_bodypose's limbSeq (made 0-based) and colours, in its drawing order:
# limb i is drawn in 0.6 * COLORS[i], keypoint k as a circle in COLORS[k].
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
STICK_WIDTH = 4
KEYPOINT_RADIUS = 4

# OpenPose BODY_25 -> COCO-18: BODY_25 adds MidHip (8) and six foot points (19-24).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

# More people than this cannot each get a usable region (and a head of useful size) at 512 px.
MAX_PEOPLE = 8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
POSE_DETECTOR_ENV = "GROUPSHOT_POSE_DETECTOR"
POSE_DETECTOR_REPO = "lllyasviel/Annotators"
POSE_DETECTOR_FILE = "body_pose_model.pth"


@dataclass
class Pose:
    """People as OpenPose COCO-18 keypoints in pixels of a width x height canvas."""

    width: int
    height: int
    people: list[np.ndarray]  # each (18, 3): x, y, confidence (0 = missing); ordered left to right
    source: str = ""          # what it was loaded from ("template:two_standing", a path), for messages

    def __post_init__(self) -> None:
        self.width, self.height = int(self.width), int(self.height)
        if self.width < 1 or self.height < 1:
            raise GroupshotError(f"pose canvas {self.width}x{self.height}: width and height must be positive")
        people = []
        for i, person in enumerate(self.people):
            arr = np.asarray(person, dtype=np.float32)
            if arr.shape != (18, 3):
                raise GroupshotError(
                    f"pose person {i}: keypoints have shape {arr.shape}; expected (18, 3) (COCO-18 x, y, confidence)"
                )
            people.append(arr)
        self.people = people

    def to_json(self) -> dict:
        """OpenPose JSON in pixels, with the canvas size (what `load_pose` reads back)."""
        people = []
        for person in self.people:
            flat = []
            for x, y, c in person.tolist():
                flat += [round(x, 3), round(y, 3), max(round(c, 4), 1e-4)] if c > 0 else [0.0, 0.0, 0.0]
            people.append({"pose_keypoints_2d": flat})
        return {"canvas_width": self.width, "canvas_height": self.height, "people": people}


# ---------------------------------------------------------------------------------------------
# templates


@dataclass(frozen=True)
class _Template:
    n_people: int
    description: str
    build: Callable[[], list[np.ndarray]]  # people on the unit square: x, y in [0, 1], y down


# A frontal standing figure in head heights (x right, y down from the crown). The figure's right
# side is on the image's left, as OpenPose labels a person facing the camera.
_STANDING = {
    NOSE: (0.0, 0.62), NECK: (0.0, 1.45),
    R_SHOULDER: (-0.85, 1.5), R_ELBOW: (-0.95, 2.9), R_WRIST: (-0.85, 4.1),
    L_SHOULDER: (0.85, 1.5), L_ELBOW: (0.95, 2.9), L_WRIST: (0.85, 4.1),
    R_HIP: (-0.5, 4.0), R_KNEE: (-0.5, 5.9), R_ANKLE: (-0.5, 7.6),
    L_HIP: (0.5, 4.0), L_KNEE: (0.5, 5.9), L_ANKLE: (0.5, 7.6),
    R_EYE: (-0.2, 0.45), L_EYE: (0.2, 0.45), R_EAR: (-0.42, 0.52), L_EAR: (0.42, 0.52),
}
# Seated on a bench facing the camera: thighs come towards the camera, so knees sit just below
# the hips; hands rest on the knees.
_SEATED = {
    **_STANDING,
    R_ELBOW: (-1.1, 3.0), R_WRIST: (-0.65, 4.5), L_ELBOW: (1.1, 3.0), L_WRIST: (0.65, 4.5),
    R_HIP: (-0.55, 4.0), R_KNEE: (-0.7, 4.9), R_ANKLE: (-0.6, 6.6),
    L_HIP: (0.55, 4.0), L_KNEE: (0.7, 4.9), L_ANKLE: (0.6, 6.6),
}


def _figure(
    cx: float, top: float, head: float, base: dict = _STANDING, *, tilt: float = 0.0,
    override: dict[int, tuple[float, float]] | None = None, keep: tuple[int, ...] | None = None,
) -> np.ndarray:
    """One person on the unit square: centre x, crown y, head height, head tilt in degrees
    (positive leans the head towards image right); `override` gives absolute unit-square points."""
    person = np.zeros((18, 3), np.float32)
    t = math.radians(tilt)
    pivot = np.array(base[NECK])
    for k, (dx, dy) in base.items():
        p = np.array([dx, dy])
        if k in (NOSE, R_EYE, L_EYE, R_EAR, L_EAR) and tilt:
            # Rotate the head about the neck, as a real head tilts.
            d = p - pivot
            p = pivot + np.array([d[0] * math.cos(t) - d[1] * math.sin(t), d[0] * math.sin(t) + d[1] * math.cos(t)])
        person[k] = (cx + p[0] * head, top + p[1] * head, 1.0)
    for k, xy in (override or {}).items():
        person[k] = (*xy, 1.0)
    if keep is not None:
        person[[k for k in range(18) if k not in keep], 2] = 0.0
    # Whatever falls outside the frame is not in the picture (thighs-up framing cuts the legs).
    outside = (person[:, 0] < 0) | (person[:, 0] > 1) | (person[:, 1] < 0) | (person[:, 1] > 1)
    person[outside] = 0.0
    return person


def _one_standing() -> list[np.ndarray]:
    return [_figure(0.5, 0.05, 0.115)]


def _one_portrait() -> list[np.ndarray]:
    return [_figure(0.5, 0.12, 0.3)]


def _two_standing() -> list[np.ndarray]:
    return [_figure(0.3, 0.06, 0.19), _figure(0.7, 0.06, 0.19)]


def _two_seated() -> list[np.ndarray]:
    return [_figure(0.3, 0.08, 0.13, _SEATED), _figure(0.7, 0.08, 0.13, _SEATED)]


def _two_hugging() -> list[np.ndarray]:
    # Shoulder to shoulder, heads leaning in; the left person's arm goes round the right
    # person's shoulders (hand on their far shoulder), the right person's arm round the left
    # person's waist.
    left = _figure(0.32, 0.06, 0.19, tilt=8, override={L_ELBOW: (0.60, 0.42), L_WRIST: (0.78, 0.35)})
    right = _figure(0.68, 0.06, 0.19, tilt=-8, override={R_ELBOW: (0.47, 0.58), R_WRIST: (0.37, 0.65)})
    return [left, right]


def _three_row() -> list[np.ndarray]:
    return [_figure(x, 0.1, 0.14) for x in (0.2, 0.5, 0.8)]


def _four_two_rows() -> list[np.ndarray]:
    # The back row stands one step behind (slightly smaller), raised by about a head so every
    # face shows, in the gaps between the front people; their arms and hips are hidden.
    back = (NOSE, NECK, R_SHOULDER, L_SHOULDER, R_EYE, L_EYE, R_EAR, L_EAR)
    return [
        _figure(0.29, 0.33, 0.14), _figure(0.71, 0.33, 0.14),
        _figure(0.37, 0.09, 0.13, keep=back), _figure(0.63, 0.09, 0.13, keep=back),
    ]


_TEMPLATES: dict[str, _Template] = {
    "one_standing": _Template(1, "one person standing, full body", _one_standing),
    "one_portrait": _Template(1, "one person, head and shoulders (largest face)", _one_portrait),
    "two_standing": _Template(2, "two people side by side, thighs up", _two_standing),
    "two_seated": _Template(2, "two people seated side by side on a bench, full body", _two_seated),
    "two_hugging": _Template(
        2, "two people shoulder to shoulder, heads leaning in, arms round each other, thighs up", _two_hugging
    ),
    "three_row": _Template(3, "three people side by side, knees up", _three_row),
    "four_two_rows": _Template(
        4, "two people in front (waist up), two behind them, raised between them", _four_two_rows
    ),
}


def list_templates() -> list[tuple[str, int, str]]:
    """Built-in pose templates: (name, number of people, description)."""
    return [(name, t.n_people, t.description) for name, t in _TEMPLATES.items()]


def template_pose(name: str, *, size: tuple[int, int]) -> Pose:
    """A built-in template drawn on a `size` = (width, height) canvas.

    Templates live on the unit square, which is scaled by min(width, height), centred
    horizontally and anchored to the bottom edge, so people keep their proportions on any
    canvas and a body cut at the thighs stays cut at the frame.
    """
    if name not in _TEMPLATES:
        raise GroupshotError(f"--pose {name}: no such template; choose one of {', '.join(_TEMPLATES)}")
    width, height = _check_size(size)
    scale = min(width, height)
    ox, oy = (width - scale) / 2, height - scale
    people = []
    for person in _TEMPLATES[name].build():
        out = person.copy()
        present = out[:, 2] > 0
        out[present, 0] = out[present, 0] * scale + ox
        out[present, 1] = out[present, 1] * scale + oy
        people.append(out)
    return Pose(width, height, _left_to_right(people), source=f"template:{name}")


# ---------------------------------------------------------------------------------------------
# drawing


def draw_pose(pose: Pose) -> Image.Image:
    """The pose as an OpenPose skeleton image (controlnet_aux's palette, limbs and radii).

    Every limb of every person is drawn before any keypoint (the order of ControlNet 1.1's
    annotator; controlnet_aux draws person by person), so no keypoint is hidden under another
    person's limb and the image parses back to the same keypoints. One person: identical pixels.
    """
    canvas = np.zeros((pose.height, pose.width, 3), np.uint8)
    for (a, b), color in zip(LIMBS, COLORS):
        for person in pose.people:
            if person[a, 2] <= 0 or person[b, 2] <= 0:
                continue
            # Same arithmetic as controlnet_aux, including its int() truncations.
            (x0, y0), (x1, y1) = person[a, :2].astype(np.float64), person[b, :2].astype(np.float64)
            length = math.hypot(x0 - x1, y0 - y1)
            angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
            polygon = cv2.ellipse2Poly(
                (int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for k, color in enumerate(COLORS):
        for person in pose.people:
            if person[k, 2] > 0:
                cv2.circle(canvas, (int(person[k, 0]), int(person[k, 1])), KEYPOINT_RADIUS, color, thickness=-1)
    return Image.fromarray(canvas)


# ---------------------------------------------------------------------------------------------
# loading


def load_pose(spec: str | Path, *, size: tuple[int, int], detector: str | Path | None = None) -> Pose:
    """Read `--pose`: a template name, an OpenPose JSON file, a skeleton image or a photo.

    The result lives on a `size` = (width, height) canvas, people ordered left to right (by
    head position). JSON, skeleton images and photos are letterboxed into it: scaled to fit
    while keeping their aspect ratio, centred. Photos need the OpenPose detector weights:
    `detector` or $GROUPSHOT_POSE_DETECTOR names a folder holding body_pose_model.pth (from
    the hub repository lllyasviel/Annotators), else the Hugging Face cache is used.
    """
    width, height = _check_size(size)
    text = str(spec)
    path = Path(text).expanduser()
    if not path.is_file():
        if text in _TEMPLATES:
            return template_pose(text, size=(width, height))
        if path.is_dir():
            raise GroupshotError(
                f"--pose {text}: is a folder; give a skeleton image, an OpenPose JSON file, a photo or a template name"
            )
        if not path.suffix and os.sep not in text and "/" not in text:
            raise GroupshotError(f"--pose {text}: no such template or file; templates: {', '.join(_TEMPLATES)}")
        raise GroupshotError(
            f"--pose {text}: no such file; give a skeleton image, an OpenPose JSON file, a photo, "
            f"or a template name ({', '.join(_TEMPLATES)})"
        )
    suffix = path.suffix.lower()
    if suffix == ".json":
        raw = _pose_from_json(path, (width, height))
    elif suffix in IMAGE_SUFFIXES:
        raw = _pose_from_image_file(path, detector)
    else:
        raise GroupshotError(
            f"--pose {text}: unsupported file type '{suffix or '(none)'}'; use .json (OpenPose keypoints) "
            f"or an image ({', '.join(IMAGE_SUFFIXES)})"
        )
    check_pose(raw)
    return _fit(raw, (width, height))


def check_pose(pose: Pose) -> None:
    """Raise GroupshotError (one line, naming `pose.source`) unless every person can be placed."""
    where = f"--pose {pose.source}" if pose.source else "pose"
    n = len(pose.people)
    if n == 0:
        raise GroupshotError(f"{where}: no people found; the pose needs at least one skeleton")
    if n > MAX_PEOPLE:
        raise GroupshotError(f"{where}: {n} people; at most {MAX_PEOPLE} are supported, use a pose with fewer people")
    for i, person in enumerate(pose.people):
        who = f"{where}: person {i + 1} of {n}"
        if not np.isfinite(person[:, 2]).all():
            k = int(np.flatnonzero(~np.isfinite(person[:, 2]))[0])
            raise GroupshotError(f"{who}: {KEYPOINT_NAMES[k]} confidence is not a number; fix the keypoint file")
        present = person[:, 2] > 0
        for k in np.flatnonzero(present):
            x, y = float(person[k, 0]), float(person[k, 1])
            name = KEYPOINT_NAMES[k]
            if not (math.isfinite(x) and math.isfinite(y)):
                raise GroupshotError(f"{who}: {name} has a non-numeric coordinate ({x}, {y}); fix the keypoint file")
            if x < 0 or y < 0:
                raise GroupshotError(
                    f"{who}: {name} has a negative coordinate ({x:g}, {y:g}); "
                    "coordinates are pixels from the top-left corner"
                )
            if x > pose.width or y > pose.height:
                raise GroupshotError(
                    f"{who}: {name} at ({x:g}, {y:g}) lies outside the {pose.width}x{pose.height} canvas; "
                    "set canvas_width/canvas_height to the image the keypoints came from"
                )
        if not present[list(HEAD_KEYPOINTS)].any():
            raise GroupshotError(
                f"{who} has no head (no nose, neck, eyes or ears), so a face cannot be placed; add head keypoints"
            )


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise GroupshotError(f"pose size {size!r}: expected (width, height) in pixels, e.g. (512, 512)") from None
    if width < 8 or height < 8:
        raise GroupshotError(f"pose size {width}x{height}: width and height must be at least 8 pixels")
    return width, height


def _is_number(value) -> bool:
    # JSON integers have no size limit; one beyond float's range (1e308) is not a coordinate.
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1000)


def _head_x(person: np.ndarray) -> float:
    present = person[:, 2] > 0
    head = [k for k in HEAD_KEYPOINTS if present[k]]
    idx = head if head else np.flatnonzero(present)
    return float(person[idx, 0].mean()) if len(idx) else 0.0


def _left_to_right(people: list[np.ndarray]) -> list[np.ndarray]:
    # By head, not body: arms round a neighbour reach across, heads do not.
    return sorted(people, key=_head_x)


def _fit(pose: Pose, size: tuple[int, int]) -> Pose:
    """Letterbox `pose` into a `size` canvas: uniform scale to fit, centred."""
    width, height = size
    scale = min(width / pose.width, height / pose.height)
    ox, oy = (width - pose.width * scale) / 2, (height - pose.height * scale) / 2
    people = []
    for person in pose.people:
        out = person.copy()
        present = out[:, 2] > 0
        out[present, 0] = np.clip(out[present, 0] * scale + ox, 0, width)
        out[present, 1] = np.clip(out[present, 1] * scale + oy, 0, height)
        out[~present] = 0.0
        people.append(out)
    return Pose(width, height, _left_to_right(people), source=pose.source)


# ---- JSON


def _pose_from_json(path: Path, size: tuple[int, int]) -> Pose:
    """OpenPose JSON: {"people": [{"pose_keypoints_2d": [x, y, c, ...]}], "canvas_width", "canvas_height"}.

    COCO-18 (54 numbers a person) or BODY_25 (75, mapped to COCO-18). Coordinates are taken as
    normalised to [0, 1] when every present one (confidence > 0) lies in [0, 1], else as
    pixels. Pixels are relative to canvas_width x canvas_height when given, else to `size`;
    normalised ones to the canvas when given, else to `size` directly (no letterbox).
    """
    where = f"--pose {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GroupshotError(f"{where}: cannot be read ({e.__class__.__name__}: {e}); check the file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GroupshotError(
            f"{where}: invalid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix or re-export the file"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise GroupshotError(
            f'{where}: expected an OpenPose object with a "people" list, '
            'e.g. {"people": [{"pose_keypoints_2d": [x, y, c, ...]}]}'
        )

    canvas = None
    cw, ch = data.get("canvas_width"), data.get("canvas_height")
    if (cw is None) != (ch is None):
        raise GroupshotError(f"{where}: has only one of canvas_width/canvas_height; give both or neither")
    if cw is not None:
        if not all(_is_number(v) and math.isfinite(v) and v >= 1 for v in (cw, ch)):
            raise GroupshotError(f"{where}: canvas_width/canvas_height {cw!r}x{ch!r} must be positive pixel counts")
        canvas = (int(round(cw)), int(round(ch)))

    people = []
    for i, entry in enumerate(data["people"]):
        values = entry.get("pose_keypoints_2d") if isinstance(entry, dict) else None
        if not isinstance(values, list):
            raise GroupshotError(f"{where}: people[{i}] has no pose_keypoints_2d list; each person needs one")
        if len(values) not in (54, 75):
            raise GroupshotError(
                f"{where}: people[{i}] has {len(values)} numbers in pose_keypoints_2d; expected 54 (COCO-18) "
                "or 75 (BODY_25): x, y, confidence per keypoint"
            )
        if not all(_is_number(v) for v in values):
            raise GroupshotError(f"{where}: people[{i}] pose_keypoints_2d holds a value that is not a number; fix it")
        arr = np.asarray(values, np.float64).reshape(-1, 3)
        if len(arr) == 25:
            arr = arr[list(BODY25_TO_COCO18)]
        people.append(arr)

    if len(people) > MAX_PEOPLE:  # before anything else is reported about them
        raise GroupshotError(
            f"{where}: {len(people)} people; at most {MAX_PEOPLE} are supported, use a pose with fewer people"
        )
    for i, arr in enumerate(people):
        bad = ~np.isfinite(arr[:, 2]) | ((arr[:, 2] > 0) & ~np.isfinite(arr[:, :2]).all(axis=1))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise GroupshotError(f"{where}: people[{i}] {KEYPOINT_NAMES[k]} is NaN or infinite; fix the file")

    present = np.concatenate([a[a[:, 2] > 0, :2].ravel() for a in people]) if people else np.zeros(0)
    normalised = present.size > 0 and bool(((present >= 0) & (present <= 1)).all())
    if normalised:
        scale_to = canvas or size
        for arr in people:
            arr[:, 0] *= scale_to[0]
            arr[:, 1] *= scale_to[1]
    width, height = canvas or size
    people = [np.where(a[:, 2:3] > 0, a, 0.0) for a in people]
    return Pose(width, height, [a.astype(np.float32) for a in people], source=str(path))


# ---- images


def _pose_from_image_file(path: Path, detector: str | Path | None) -> Pose:
    try:
        with warnings.catch_warnings():
            # Between PIL's pixel limit and twice it PIL only warns; a skeleton image is never that large.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                rgb = np.asarray(im.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise GroupshotError(
            f"--pose {path}: image too large (over {(Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} Mpx); downscale it"
        ) from None
    except Exception as e:  # PIL raises a zoo of types for damaged files
        raise GroupshotError(
            f"--pose {path}: cannot be read as an image ({e.__class__.__name__}: {e}); check the file"
        ) from None
    h, w = rgb.shape[:2]
    if looks_like_skeleton(rgb):
        people = parse_skeleton_image(rgb)
        return Pose(w, h, people, source=str(path))
    people = _detect_people_in_photo(rgb, path, detector)
    return Pose(w, h, people, source=str(path))


# Reference colours for classifying pixels: 18 keypoint colours, 17 limb colours (0.6x), black.
_LIMB_LABELS = np.arange(18, 35)
_BLACK = 35
_OTHER = -1
_REFERENCE = np.array(
    list(COLORS) + [[int(float(c) * 0.6) for c in COLORS[i]] for i in range(len(LIMBS))] + [[0, 0, 0]], np.int32
)
# Pixels darker than this (max channel) are background: limb colours peak at 153, and resizing
# or JPEG blends edges towards black.
_DARK = 50
# How far (RGB distance) a pixel may sit from its nearest reference colour and still count as it.
_COLOR_TOLERANCE = 60.0


def _classify(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel label: 0-17 keypoint colour, 18-34 limb colour, 35 black, -1 anything else."""
    h, w = rgb.shape[:2]
    labels = np.full((h, w), _BLACK, np.int16)
    bright = rgb.max(axis=2) >= _DARK
    pixels = rgb[bright].astype(np.int32)  # (P, 3)
    if len(pixels):
        d2 = ((pixels[:, None, :] - _REFERENCE[None, :35, :]) ** 2).sum(-1)  # (P, 35)
        best = d2.argmin(1)
        ok = d2[np.arange(len(best)), best] <= _COLOR_TOLERANCE**2
        labels[bright] = np.where(ok, best, _OTHER).astype(np.int16)
    return labels


def looks_like_skeleton(rgb: np.ndarray) -> bool:
    """Tell an OpenPose skeleton image from a photo by content: mostly black, and the rest in
    the OpenPose palette (photos with dark backgrounds fail the second test)."""
    h, w = rgb.shape[:2]
    step = max(1, int(max(h, w) // 256))  # a subsample decides as well and much faster
    small = rgb[::step, ::step]
    dark = small.max(axis=2) < _DARK
    if dark.mean() < 0.6:
        return False
    if dark.all():
        return True  # an empty skeleton image: parsed, then rejected for having no people
    labels = _classify(small)
    bright = ~dark
    in_palette = ((labels >= 0) & (labels < _BLACK))[bright].mean()
    return bool(in_palette >= 0.5)


def parse_skeleton_image(rgb: np.ndarray) -> list[np.ndarray]:
    """People, (18, 3) each in the image's pixels, found in an OpenPose skeleton image.

    Keypoints are the blobs of the 18 keypoint colours. They are joined into people the way
    OpenPose joins its detections: limb by limb along the tree from the neck, a pair of
    keypoints is linked when the line between them runs over that limb's colour (so
    skeletons that touch or cross stay apart). Pieces cut off from a neck join the person
    they touch or, failing that, the nearest one (see _join_pieces).
    """
    labels = _classify(rgb)
    candidates: list[list[tuple[float, float]]] = [[] for _ in range(18)]
    blobs = []  # (keypoint, area, component image, component id, centroid)
    for k in range(18):
        mask = (labels == k).astype(np.uint8)
        if not mask.any():
            continue
        n, comp, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        blobs += [(k, int(stats[j, cv2.CC_STAT_AREA]), comp, j, centroids[j]) for j in range(1, n)]
    if not blobs:
        return []
    areas = [blob[1] for blob in blobs]
    typical = float(np.median([a for a in areas if a >= 4] or areas))  # one whole circle, at this image's scale
    radius = max(1.0, math.sqrt(typical / math.pi))
    # A circle drawn at int(x) stands for any x in [int(x), int(x) + 1): its pixel centre, + 0.5.
    for k, area, comp, j, centroid in blobs:
        if area < max(3.0, 0.2 * typical):
            continue  # edge pixels of a blended colour, not a keypoint
        copies = int(round(area / typical))
        if copies >= 2:
            # Two same-coloured circles overlapping (e.g. two people's wrists): split the blob.
            ys, xs = np.nonzero(comp == j)
            pts = np.stack([xs, ys], 1).astype(np.float32)
            criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.1)
            _, _, centres = cv2.kmeans(pts, min(copies, 3), None, criteria, 3, cv2.KMEANS_PP_CENTERS)
            candidates[k] += [(float(x) + 0.5, float(y) + 0.5) for x, y in centres]
        else:
            candidates[k].append((float(centroid[0]) + 0.5, float(centroid[1]) + 0.5))

    people = _assemble(candidates, labels, radius)
    out = []
    for person in _join_pieces(people, candidates, labels):
        arr = np.zeros((18, 3), np.float32)
        for k, j in person.items():
            arr[k] = (*candidates[k][j], 1.0)
        out.append(arr)
    return _left_to_right(out)


# The limb tree from the neck, parents before children: (parent, child, index into LIMBS).
_TREE = tuple(
    (a, b, LIMBS.index((a, b)) if (a, b) in LIMBS else LIMBS.index((b, a)))
    for a, b in (
        (1, 2), (1, 5), (1, 8), (1, 11), (1, 0), (2, 3), (5, 6), (8, 9), (11, 12),
        (0, 14), (0, 15), (3, 4), (6, 7), (9, 10), (12, 13), (14, 16), (15, 17),
    )
)
_PARENT = {child: parent for parent, child, _ in _TREE}


def _tree_depths() -> dict[int, int]:
    depth = {NECK: 0}
    for parent, child, _ in _TREE:
        depth[child] = depth[parent] + 1
    return depth


_DEPTH = _tree_depths()


def _limb_score(p: tuple[float, float], q: tuple[float, float], limb: int, labels: np.ndarray, radius: float) -> float:
    """How well the segment p-q is covered by limb `limb`'s colour: 0 (not a limb) to 1."""
    h, w = labels.shape
    length = math.hypot(q[0] - p[0], q[1] - p[1])
    n = int(min(64, max(8, length / 2)))
    t = np.linspace(0, 1, n)
    keep = (t * length > 1.3 * radius) & ((1 - t) * length > 1.3 * radius)  # outside the two circles
    if not keep.any():
        return 0.5 if length <= 3 * radius else 0.0  # circles touching: nothing to see, allow
    xs = np.clip(np.floor(p[0] + t[keep] * (q[0] - p[0])).astype(int), 0, w - 1)
    ys = np.clip(np.floor(p[1] + t[keep] * (q[1] - p[1])).astype(int), 0, h - 1)
    seen = labels[ys, xs]
    if (seen == _BLACK).mean() > 0.2:
        return 0.0
    # Keypoint circles drawn over the line (other people's) hide the limb without denying it.
    hidden = (seen < 18) & (seen >= 0)
    visible = max(1, int((~hidden).sum()))
    covered = float((seen == _LIMB_LABELS[limb]).sum()) / visible
    return covered if covered >= 0.35 else 0.0


def _assemble(candidates: list[list[tuple[float, float]]], labels: np.ndarray, radius: float) -> list[dict[int, int]]:
    """People as {keypoint: candidate index}: one per neck, grown limb by limb, best-covered
    pairs first (greedy, as OpenPose does); a child left over starts a neckless piece."""
    people: list[dict[int, int]] = [{NECK: j} for j in range(len(candidates[NECK]))]
    for parent, child, limb in _TREE:
        pairs = []
        for pi, person in enumerate(people):
            if parent not in person:
                continue
            p = candidates[parent][person[parent]]
            for cj, q in enumerate(candidates[child]):
                score = _limb_score(p, q, limb, labels, radius)
                if score > 0:
                    pairs.append((-score, math.hypot(q[0] - p[0], q[1] - p[1]), pi, cj))
        used_people, used_children = set(), set()
        for _, _, pi, cj in sorted(pairs):
            if pi in used_people or cj in used_children:
                continue
            people[pi][child] = cj
            used_people.add(pi)
            used_children.add(cj)
        # A keypoint whose parent is missing starts a piece of its own (joined up later).
        people += [{child: cj} for cj in range(len(candidates[child])) if cj not in used_children]
    return people


def _join_pieces(people: list[dict[int, int]], candidates, labels: np.ndarray) -> list[dict[int, int]]:
    """Give each neckless piece to a person. Pieces arise where a keypoint between them is
    missing, and OpenPose itself draws some (ears it linked through the shoulders, whose limb
    is not drawn). In order: the person its pixels touch; other pieces it touches; the
    nearest person within reach; else it stands alone (a lone dot is dropped as noise).
    Never two keypoints of one kind in a person."""
    bright = ((labels >= 0) & (labels != _BLACK)).astype(np.uint8)
    _, comp = cv2.connectedComponents(bright, connectivity=8)
    h, w = labels.shape

    def points(person: dict[int, int]) -> np.ndarray:
        return np.array([candidates[k][j] for k, j in person.items()])

    def component(person: dict[int, int]) -> int:
        xy = np.clip(np.floor(points(person)).astype(int), 0, [w - 1, h - 1])
        ids = list(comp[xy[:, 1], xy[:, 0]])
        return max(set(ids), key=ids.count)

    def gap(host: dict[int, int], piece: dict[int, int]) -> float:
        # Where the piece would hang on the host: from the piece's top joint to the host's
        # nearest present joint above it, per limb in between (so an elbow is judged by its
        # distance from a shoulder, not from whichever wrist happens to be close).
        top = min(piece, key=lambda k: _DEPTH[k])
        joint, hops = top, 0
        while joint not in host and joint in _PARENT:
            joint, hops = _PARENT[joint], hops + 1
        if joint not in host:
            return math.inf
        return math.dist(candidates[top][piece[top]], candidates[joint][host[joint]]) / max(hops, 1)

    def nearest(piece: dict[int, int], hosts: list[dict[int, int]], reach: float = math.inf) -> dict[int, int] | None:
        hosts = [p for p in hosts if not set(p) & set(piece) and gap(p, piece) <= reach]
        return min(hosts, key=lambda p: gap(p, piece)) if hosts else None

    whole = [p for p in people if NECK in p]
    pieces = sorted((p for p in people if NECK not in p), key=len, reverse=True)
    left = []
    for piece in pieces:
        host = nearest(piece, [p for p in whole if component(p) == component(piece)])
        host = host or nearest(piece, [p for p in left if component(p) == component(piece)])
        if host is not None:
            host.update(piece)
        else:
            left.append(dict(piece))
    lengths = [
        math.dist(candidates[a][p[a]], candidates[b][p[b]]) for p in whole for a, b in LIMBS if a in p and b in p
    ]
    reach = 1.5 * max(lengths) if lengths else 0.0  # per limb: a stray dot far from everyone stays out
    for piece in left:
        host = nearest(piece, whole, reach)
        if host is not None:
            host.update(piece)
        elif len(piece) >= 2:
            whole.append(piece)
    return whole


# ---- photos


def _detect_people_in_photo(rgb: np.ndarray, path: Path, detector: str | Path | None) -> list[np.ndarray]:
    weights = _pose_detector_weights(path, detector)
    from controlnet_aux.open_pose import OpenposeDetector  # slow: imports every controlnet_aux detector
    from controlnet_aux.open_pose.body import Body

    h, w = rgb.shape[:2]
    # The detector works at about 512 px on the short side (as controlnet_aux runs it); a
    # 4000 px photo would only be slow.
    scale = min(1.0, 512 / min(h, w))
    small_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(small_size, Image.BILINEAR))
    try:  # controlnet_aux reads the .pth with torch.load, which (torch >= 2.6) refuses anything but tensors
        body = Body(str(weights))
    except Exception as e:  # a damaged or foreign file: pickle, zip and torch errors alike
        raise ModelUnavailableError(
            f"--pose {path}: {weights} is not usable OpenPose detector weights ({e.__class__.__name__}); "
            f"get {POSE_DETECTOR_FILE} from {POSE_DETECTOR_REPO} again"
        ) from None
    poses = OpenposeDetector(body).detect_poses(small)
    people = []
    for result in poses:
        arr = np.zeros((18, 3), np.float32)
        for k, kp in enumerate(result.body.keypoints[:18]):
            if kp is not None:
                arr[k] = (kp.x * w, kp.y * h, min(1.0, max(1e-3, float(kp.score))))
        # Someone cut off by the frame (an arm, a leg) has no face to give a region to; in a
        # photo that is the photo's doing, not the user's, so it is left out, not refused.
        if (arr[list(HEAD_KEYPOINTS), 2] > 0).any():
            people.append(arr)
    return _left_to_right(people)


def _pose_detector_weights(path: Path, detector: str | Path | None) -> Path:
    """Find body_pose_model.pth before importing anything heavy, so offline fails at once."""
    hint = (
        f"point {POSE_DETECTOR_ENV} (or detector=) at a folder holding {POSE_DETECTOR_FILE} from the hub "
        f"repository {POSE_DETECTOR_REPO}, or give a skeleton image, OpenPose JSON or template instead"
    )
    where = f"--pose {path} is a photo: extracting its pose needs the OpenPose detector weights"
    given = detector if detector is not None else os.environ.get(POSE_DETECTOR_ENV)
    if given:
        folder = Path(given).expanduser()
        for candidate in (folder, folder / POSE_DETECTOR_FILE, folder / "annotator" / "ckpts" / POSE_DETECTOR_FILE):
            if candidate.is_file():
                return candidate
        raise ModelUnavailableError(f"{where}, but {folder} holds no {POSE_DETECTOR_FILE}; {hint}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(POSE_DETECTOR_REPO, POSE_DETECTOR_FILE))
    except Exception as e:  # offline, no cache, hub errors: all mean the same thing to the user
        raise ModelUnavailableError(
            f"{where} ({POSE_DETECTOR_REPO}/{POSE_DETECTOR_FILE}), which could not be had "
            f"({e.__class__.__name__}); {hint}"
        ) from None


# ---------------------------------------------------------------------------------------------
# people -> names


def assign_people(pose: Pose, names: list[str], assign: dict[str, int] | None = None) -> list[int]:
    """Skeleton index (0 = leftmost) for each of `names`, in order.

    Without `assign`, names go to skeletons left to right. `assign` pins some names to
    indices (`--assign leo=0,brad=1`); the other names take the remaining skeletons left to right.
    """
    n = len(pose.people)
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise GroupshotError(f"--people names {dup} twice; each person appears once")
    if len(names) != n:
        people = "person" if n == 1 else "people"
        raise GroupshotError(
            f"the pose has {n} {people} but --people names {len(names)}: give {n} name{'s' if n != 1 else ''}, "
            f"or a pose with {len(names)} {'person' if len(names) == 1 else 'people'}"
        )
    assign = dict(assign or {})
    taken: dict[int, str] = {}
    for name, index in assign.items():
        if name not in names:
            raise GroupshotError(f"--assign {name}={index}: {name} is not in --people ({', '.join(names)})")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise GroupshotError(
                f"--assign {name}={index}: no such skeleton; "
                f"the pose's people are numbered 0 to {n - 1} from left to right"
            )
        if int(index) in taken:
            raise GroupshotError(
                f"--assign gives skeleton {index} to both {taken[int(index)]} and {name}; give each a different one"
            )
        taken[int(index)] = name
    free = iter(i for i in range(n) if i not in taken)
    return [int(assign[name]) if name in assign else next(free) for name in names]


def parse_assign(text: str) -> dict[str, int]:
    """`leo=0,brad=1` -> {"leo": 0, "brad": 1} (the `--assign` flag)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, index = part.partition("=")
        name, index = name.strip(), index.strip()
        if not sep or not name or not index.lstrip("-").isdigit():
            raise GroupshotError(f"--assign {text}: expected name=index pairs separated by commas, e.g. leo=0,brad=1")
        if name in out:
            raise GroupshotError(f"--assign {text}: {name} is given twice")
        out[name] = int(index)
    return out


# ---------------------------------------------------------------------------------------------
# examples


def export_templates(folder: str | Path, *, size: tuple[int, int] = (512, 512)) -> list[Path]:
    """Write every template as <name>.json (OpenPose, pixels) and <name>.png (skeleton)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, _, _ in list_templates():
        pose = template_pose(name, size=size)
        (folder / f"{name}.json").write_text(json.dumps(pose.to_json()) + "\n", encoding="utf-8")
        draw_pose(pose).save(folder / f"{name}.png")
        written += [folder / f"{name}.json", folder / f"{name}.png"]
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m compose.poses", description="Pose templates.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in templates")
    export = sub.add_parser("export", help="write every template as OpenPose JSON and PNG")
    export.add_argument("folder")
    export.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (default 512x512)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, n, description in list_templates():
            print(f"{name:15} {n}  {description}")
        return 0
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size}: expected WIDTHxHEIGHT, e.g. 512x512")
    for path in export_templates(args.folder, size=(width, height)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
