"""Find a person's photos, reject those that cannot serve (with a reason each), and crop
the rest to a square around face and shoulders at training resolution."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from personas.errors import GroupshotError
from personas.faces import Face, FaceBackend

__all__ = [
    "Photo",
    "Rejection",
    "PhotoReport",
    "check_photos",
    "open_photo",
    "face_crop_box",
    "PHOTO_FORMATS",
]

logger = logging.getLogger(__name__)

# Decided by the decoder (file content), never by extension. MPO is what many phones
# write for JPEG photos (main image + previews/depth); its first frame is the photo.
PHOTO_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})

# Crop geometry: the face box's height is 1/3 of the crop side, the face centre sits
# at half the width and 40% of the height, which leaves room for hair above and
# shoulders below. Detector boxes run about brow to chin, so the whole head is larger.
FACE_FRACTION = 1 / 3
FACE_CENTER_Y = 0.40
# When the photo cannot hold that square, the crop shrinks, but never below the face
# box's larger side times this (which keeps the box inside the crop: FACE_CENTER_Y
# needs at least 1.25).
MIN_CROP_OVER_FACE = 1.4


class _Unusable(Exception):
    """One photo's rejection reason (internal; becomes a Rejection or a GroupshotError)."""


@dataclass(frozen=True, eq=False)
class Photo:
    """An accepted photo: its square crop, and where the face is in it."""

    path: Path
    sha256: str  # of the source file's bytes
    source_size: tuple[int, int]  # (width, height) after EXIF orientation
    crop_box: tuple[int, int, int, int]  # the square, in source pixels: x0, y0, x1, y1
    image: Image.Image = field(repr=False)  # RGB, resolution x resolution
    face_box: tuple[float, float, float, float]  # face in crop pixels (face-weighted loss)
    face: Face | None = field(repr=False)  # as detected in the source image; None without a backend
    background_faces: int = 0  # smaller faces that were ignored


@dataclass(frozen=True)
class Rejection:
    path: Path
    reason: str


@dataclass
class PhotoReport:
    """Outcome of check_photos: every file checked, the accepted crops and the rejections."""

    paths: list[Path]  # every file checked, in input order
    accepted: list[Photo]
    rejected: list[Rejection]
    resolution: int
    face_model: dict = field(default_factory=dict)  # backend.describe()

    @property
    def total(self) -> int:
        return len(self.paths)

    def require(self, min_photos: int) -> "PhotoReport":
        """Raise GroupshotError unless at least `min_photos` photos were accepted."""
        if min_photos < 1:
            raise GroupshotError(f"--min-photos must be at least 1, got {min_photos}")
        if len(self.accepted) >= min_photos:
            return self
        reasons = "; ".join(f"{r.path.name}: {r.reason}" for r in self.rejected[:10])
        if len(self.rejected) > 10:
            reasons += f"; and {len(self.rejected) - 10} more"
        raise GroupshotError(
            f"only {len(self.accepted)} of {self.total} photos are usable (min {min_photos})"
            + (f": {reasons}" if reasons else "")
            + "; add more photos or lower --min-photos"
        )

    def table(self) -> str:
        """A plain-text table, one row per file in input order, for the CLI."""
        status = {p.path: ("ok", _describe_accepted(p)) for p in self.accepted}
        status.update({r.path: ("rejected", r.reason) for r in self.rejected})
        rows = [("photo", "status", "detail")] + [(p.name, *status[p]) for p in self.paths]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
        lines.append(f"{self.total} photos: {len(self.accepted)} usable, {len(self.rejected)} rejected")
        return "\n".join(lines)


def _describe_accepted(photo: Photo) -> str:
    crop = photo.crop_box[2] - photo.crop_box[0]
    if photo.face is None:
        return f"centre crop {crop} px -> {photo.image.width} px (no face detection)"
    face_h = round(photo.face.height)
    extra = f", {photo.background_faces} background face(s) ignored" if photo.background_faces else ""
    return f"face {face_h} px, crop {crop} px -> {photo.image.width} px{extra}"


# ---------------------------------------------------------------------------------------
# decoding


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is flattened onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit greyscale PNGs decode as "I;16"/"I": convert("L") would clip at 255,
        # so rescale the 16-bit range to 8 bits (8-bit data stored as "I" stays as is).
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > 255:
            values = values / 65535.0 * 255.0
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # A transparent background's hidden RGB is arbitrary (often black); white is
        # what a viewer shows and what a face detector copes with.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (PIL undoes Adobe's inverted CMYK JPEGs), L, 1, YCbCr, LAB, HSV: PIL's
    # conversion. Embedded ICC profiles are ignored.
    return image.convert("RGB") if image.mode != "RGB" else image


def _decode(data: bytes) -> Image.Image:
    """Decode one file's bytes to an upright RGB image, or raise _Unusable."""
    if not data:
        raise _Unusable("not an image (empty file)")
    with warnings.catch_warnings():
        # Between PIL's pixel limit and twice it PIL only warns; treat both as too large.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            if fmt not in PHOTO_FORMATS:
                raise _Unusable(f"unsupported format {fmt} (use JPEG, PNG or WebP)")
            if getattr(image, "is_animated", False) and fmt != "MPO":
                raise _Unusable(f"animated {fmt} ({image.n_frames} frames): use a still photo")
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # PIL checks the header's size before decoding; its message holds the count.
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)) / 1e6:.1f} Mpx, " if found else ""
            limit = (Image.MAX_IMAGE_PIXELS or 0) / 1e6
            raise _Unusable(f"image too large ({size}limit {limit:.1f} Mpx): downscale it") from None
        except UnidentifiedImageError:
            if data[4:8] == b"ftyp":  # ISO media: what iPhones write (HEIC), or AVIF
                raise _Unusable("HEIC/AVIF photo: convert it to JPEG") from None
            raise _Unusable("not an image (JPEG, PNG or WebP expected)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # truncated or corrupt data; PIL raises all of these from its decoders
            raise _Unusable(f"unreadable: {e}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        if path.is_symlink() and not path.exists():
            raise _Unusable(f"unreadable: broken symbolic link (its target {os.readlink(path)} is missing)") from None
        raise _Unusable(f"unreadable: {e.strerror or e}") from None


def open_photo(path: str | os.PathLike) -> Image.Image:
    """Decode a JPEG/PNG/WebP photo as upright 8-bit RGB (EXIF orientation applied).

    Raises GroupshotError naming the file and the problem.
    """
    path = Path(path)
    try:
        return _decode(_read(path))
    except _Unusable as e:
        raise GroupshotError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------
# cropping


def face_crop_box(
    face_box: tuple[float, float, float, float], width: int, height: int
) -> tuple[int, int, int, int] | None:
    """The square crop (x0, y0, x1, y1) for a face in a width x height image.

    Face height 1/3 of the side, centred horizontally, centre at 40% from the top; when
    the photo is too small for that square the side shrinks to fit (never padded).
    None when even the smallest allowed square (MIN_CROP_OVER_FACE x the face) does not fit.
    """
    fx0, fy0, fx1, fy1 = face_box
    face_w, face_h = fx1 - fx0, fy1 - fy0
    side = min(face_h / FACE_FRACTION, width, height)
    if side < MIN_CROP_OVER_FACE * max(face_w, face_h):
        return None
    side = int(np.floor(side))
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - FACE_CENTER_Y * side, 0), height - side)))
    return (x0, y0, x0 + side, y0 + side)


# ---------------------------------------------------------------------------------------


def _expand(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Files as given, and the files directly inside folders (sorted; not recursive, hidden
    files skipped), without repeats. A missing path is an error, before any work."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        p = Path(given)
        if p.is_dir():
            # Not recursive: a subfolder (say, last run's crops) is not silently mixed in.
            # A broken symlink is listed too, so that it is reported rather than silently left out.
            inside = sorted(q for q in p.iterdir()
                            if (q.is_file() or (q.is_symlink() and not q.exists())) and not q.name.startswith("."))
        elif p.is_file():
            inside = [p]
        else:
            raise FileNotFoundError(f"photo path not found: {p}")
        for q in inside:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                files.append(q)
    if not files:
        folders = ", ".join(str(p) for p in paths)
        raise GroupshotError(f"no photos found in {folders}: add JPEG, PNG or WebP files")
    return files


def check_photos(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    backend: FaceBackend | None,
    resolution: int = 512,
    min_side: int | None = None,
    background_face_ratio: float = 0.25,
) -> PhotoReport:
    """Check every photo (files, or the files directly inside folders) and crop the usable ones.

    A photo is rejected, with a reason, when it is unreadable or not a JPEG/PNG/WebP
    image, animated, too large to decode safely, smaller than `min_side` on its short side
    (default resolution // 2), an exact duplicate of an earlier one (same file bytes or
    same decoded pixels), without a face, with several faces, or when its face is too
    small (crop side under `min_side`) or fills the photo. Faces smaller than
    `background_face_ratio` x the largest face's area (half its height at 0.25) are
    treated as background and ignored.
    """
    if resolution < 64 or resolution % 8:
        raise GroupshotError(f"resolution must be a multiple of 8 and at least 64, got {resolution}")
    min_side = resolution // 2 if min_side is None else min_side
    if min_side < 1:
        raise GroupshotError(f"min_side must be at least 1, got {min_side}")
    if not 0 <= background_face_ratio < 1:
        raise GroupshotError(
            f"background_face_ratio must be in [0, 1), got {background_face_ratio}"
        )
    files = _expand(paths)

    described = backend.describe() if backend is not None else {"name": "none", "note": "no face detection"}
    report = PhotoReport(paths=files, accepted=[], rejected=[], resolution=resolution, face_model=described)
    file_hashes: dict[str, Path] = {}
    pixel_hashes: dict[str, Path] = {}
    for path in files:
        try:
            photo = _check_one(
                path, backend, resolution, min_side, background_face_ratio, file_hashes, pixel_hashes
            )
        except _Unusable as e:
            logger.debug("%s: rejected: %s", path, e)
            report.rejected.append(Rejection(path, str(e)))
        else:
            report.accepted.append(photo)
    return report


def _check_one(
    path: Path,
    backend: FaceBackend | None,
    resolution: int,
    min_side: int,
    background_face_ratio: float,
    file_hashes: dict[str, Path],
    pixel_hashes: dict[str, Path],
) -> Photo:
    """Check and crop one photo, or raise _Unusable. The hash tables hold accepted photos
    only, so a copy of a rejected photo gets that photo's own reason."""
    data = _read(path)
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in file_hashes:
        raise _Unusable(f"duplicate of {file_hashes[sha256].name}")
    image = _decode(data)
    pixels = np.asarray(image)
    # The same picture saved twice (re-encoded PNG, stripped metadata) decodes to the
    # same pixels even though the files differ.
    pixel_sha = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    if pixel_sha in pixel_hashes:
        raise _Unusable(f"duplicate of {pixel_hashes[pixel_sha].name} (same pixels)")
    width, height = image.size
    if min(width, height) < min_side:
        raise _Unusable(f"too small: {width}x{height} px (minimum {min_side} px on the short side)")

    if backend is None:  # not a face (an object, a style, a toy pattern): centre square
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
        crop = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
        file_hashes[sha256] = path
        pixel_hashes[pixel_sha] = path
        whole = (0.0, 0.0, float(resolution), float(resolution))
        return Photo(path=path, sha256=sha256, source_size=(width, height), crop_box=box, image=crop,
                     face_box=whole, face=None, background_faces=0)

    faces = backend.detect(pixels)
    if not faces:
        raise _Unusable("no face found")
    largest = max(faces, key=lambda f: f.area)
    main = [f for f in faces if f.area >= background_face_ratio * largest.area]
    if len(main) > 1:
        raise _Unusable(f"{len(main)} faces found (exactly one person per photo)")
    face = main[0]

    box = face_crop_box(face.box, width, height)
    if box is None:
        raise _Unusable(
            f"face fills the photo ({round(face.width)}x{round(face.height)} px face in a "
            f"{width}x{height} photo): use one with space around the face"
        )
    side = box[2] - box[0]
    if side < min_side:
        raise _Unusable(
            f"face too small: {round(face.height)} px high, a {side} px crop "
            f"(minimum {min_side} px): use a closer or larger photo"
        )
    scale = resolution / side
    crop = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    fx0, fy0, fx1, fy1 = face.box
    face_box = (
        (fx0 - box[0]) * scale,
        (fy0 - box[1]) * scale,
        (fx1 - box[0]) * scale,
        (fy1 - box[1]) * scale,
    )
    file_hashes[sha256] = path
    pixel_hashes[pixel_sha] = path
    return Photo(
        path=path,
        sha256=sha256,
        source_size=(width, height),
        crop_box=box,
        image=crop,
        face_box=face_box,
        face=face,
        background_faces=len(faces) - 1,
    )
