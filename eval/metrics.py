"""The course's three metrics with its scoring bands, the failure counts kept apart from them,
and per-face figures split by face size.

Definitions (written into every report):

- Face Distance Score: mean, over every (image, expected person) that has a face assigned,
  of the L2 distance between the face's unit-normalised embedding and the person's
  reference (the mean of the unit embeddings of its refs/ photos, renormalised to unit
  length). Lower is better. People with no face are counted as missing, never averaged in.
- CLIP Score: mean over readable images of the cosine between the L2-normalised CLIP image
  and text embeddings (persona tokens replaced by the class word).
- Number of Faceless Images: readable images with no face at all, or where some expected
  person has no face within the face backend's match_threshold of its reference (for one
  person: "the best face is farther than the threshold").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

__all__ = [
    "Band",
    "FACE_DISTANCE_BANDS",
    "CLIP_SCORE_BANDS",
    "FACELESS_BANDS",
    "SIZE_BUCKETS",
    "MetricResult",
    "Metrics",
    "FaceRecord",
    "PersonRecord",
    "ImageRecord",
    "band_for",
    "size_bucket",
    "compute_metrics",
    "DEFINITIONS",
]


@dataclass(frozen=True)
class Band:
    """lo <= value < hi earns `points` (None: unbounded on that side)."""

    lo: float | None
    hi: float | None
    points: int
    label: str

    def contains(self, value: float) -> bool:
        return (self.lo is None or value >= self.lo) and (self.hi is None or value < self.hi)


# The course's scoring table (评估指标评分细则), 25 points in all.
FACE_DISTANCE_BANDS = (
    Band(None, 0.8, 10, "< 0.8"),
    Band(0.8, 1.0, 8, "0.8-1.0"),
    Band(1.0, 1.2, 6, "1.0-1.2"),
    Band(1.2, None, 3, ">= 1.2"),
)
CLIP_SCORE_BANDS = (
    Band(0.30, None, 8, ">= 0.30"),
    Band(0.25, 0.30, 6, "0.25-0.30"),
    Band(0.20, 0.25, 4, "0.20-0.25"),
    Band(None, 0.20, 2, "< 0.20"),
)
FACELESS_BANDS = (  # integer counts: <= 2, 3-4, 5-6, >= 7
    Band(None, 3, 7, "<= 2"),
    Band(3, 5, 5, "3-4"),
    Band(5, 7, 3, "5-6"),
    Band(7, None, 0, ">= 7"),
)

# Face width as a fraction of image width. Generated faces below ~10% of the width are
# where identity usually breaks down first, so the small end is split finest.
SIZE_BUCKETS = ((0.10, "< 0.10"), (0.20, "0.10-0.20"), (0.35, "0.20-0.35"), (math.inf, ">= 0.35"))

DEFINITIONS = {
    "face_distance": "mean L2 distance between the unit-normalised embedding of each assigned face and its "
    "person's reference (mean of the unit embeddings of the persona's refs/ photos, renormalised); lower is "
    "better; people without a face are counted as missing, never averaged in",
    "clip_score": "mean cosine between L2-normalised CLIP image and text embeddings over readable images "
    "(persona tokens replaced by the class word); torchmetrics' scale is max(100 * cosine, 0)",
    "faceless_images": "readable images with no face, or where an expected person has no face within the face "
    "backend's match_threshold of its reference",
    "missing_people": "(image, person) pairs where no face in the person's region could be assigned",
    "extra_faces": "detected faces not assigned to any expected person",
    "identity_swaps": "assigned faces nearer another expected person's reference (in the same image) than "
    "their own",
}


def band_for(bands: Sequence[Band], value: float) -> Band:
    for band in bands:
        if band.contains(value):
            return band
    raise ValueError(f"no band holds {value!r}")


def size_bucket(width_fraction: float) -> str:
    for upper, label in SIZE_BUCKETS:
        if width_fraction < upper:
            return label
    return SIZE_BUCKETS[-1][1]


# ---------------------------------------------------------------------------------------
# records: what scoring measured, one row per face / (image, person) / image


@dataclass
class FaceRecord:
    """One detected face."""

    image: str  # the image's key ("run/000.png")
    index: int  # in the detector's order (largest first)
    box: list[float]  # x0, y0, x1, y1 pixels
    det_score: float
    width_fraction: float  # face width / image width
    distances: dict[str, float]  # to every expected person's reference
    person: str | None = None  # assigned person; None: an extra face
    swap: bool = False

    @property
    def size_bucket(self) -> str:
        return size_bucket(self.width_fraction)

    @property
    def distance(self) -> float | None:
        return None if self.person is None else self.distances[self.person]

    @property
    def nearest(self) -> str | None:
        return min(self.distances, key=self.distances.get) if self.distances else None


@dataclass
class PersonRecord:
    """One expected person in one image."""

    image: str
    person: str
    face: int | None  # index of the assigned face; None: missing
    distance: float | None = None
    width_fraction: float | None = None
    match: bool = False  # a face within the backend's match_threshold
    swap: bool = False

    @property
    def missing(self) -> bool:
        return self.face is None

    @property
    def cosine(self) -> float | None:
        # unit vectors: |a - b|^2 = 2 - 2 cos
        return None if self.distance is None else 1.0 - self.distance**2 / 2.0


@dataclass
class ImageRecord:
    """One image: its status, CLIP score and face outcome."""

    key: str  # "run/000.png": unique across the sources of a report
    path: str
    source: str  # the render or images folder it came from
    people: list[str]
    status: str = "ok"  # "ok" or "unreadable: <reason>"
    width: int | None = None
    height: int | None = None
    clip_text: str | None = None
    clip_score: float | None = None
    n_faces: int = 0
    faceless: bool = False
    missing: list[str] = field(default_factory=list)
    extra_faces: int = 0
    swaps: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------
# metrics


@dataclass
class MetricResult:
    name: str
    value: float | None  # None: nothing to measure (no face assigned / no prompt)
    band: str | None
    points: int | None
    max_points: int
    n: int  # how many values the mean is over (faces, images)
    definition: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Metrics:
    face_distance: MetricResult
    clip_score: MetricResult
    faceless_images: MetricResult
    counts: dict[str, Any]  # images, unreadable, faceless, missing, extra, swaps, with rates
    per_person: dict[str, dict[str, Any]]
    by_face_size: list[dict[str, Any]]
    match_threshold: float

    @property
    def course(self) -> list[MetricResult]:
        return [self.face_distance, self.clip_score, self.faceless_images]

    @property
    def total_points(self) -> int | None:
        pts = [m.points for m in self.course]
        return None if any(p is None for p in pts) else sum(pts)

    @property
    def max_points(self) -> int:
        return sum(m.max_points for m in self.course)

    def to_json(self) -> dict[str, Any]:
        return {
            "course": {m.name: m.to_json() for m in self.course},
            "total_points": self.total_points,
            "max_points": self.max_points,
            "match_threshold": self.match_threshold,
            "counts": self.counts,
            "per_person": self.per_person,
            "by_face_size": self.by_face_size,
            "definitions": DEFINITIONS,
        }


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def _metric(name: str, value: float | None, bands: Sequence[Band], n: int) -> MetricResult:
    band = None if value is None else band_for(bands, value)
    return MetricResult(
        name=name,
        value=value,
        band=None if band is None else band.label,
        points=None if band is None else band.points,
        max_points=max(b.points for b in bands),
        n=n,
        definition=DEFINITIONS[name],
    )


def compute_metrics(
    images: Sequence[ImageRecord],
    people: Sequence[PersonRecord],
    faces: Sequence[FaceRecord],
    *,
    match_threshold: float,
) -> Metrics:
    """The course metrics with bands and points, and everything counted apart."""
    readable = [im for im in images if im.ok]
    readable_keys = {im.key for im in readable}
    people = [p for p in people if p.image in readable_keys]
    faces = [f for f in faces if f.image in readable_keys]
    assigned = [p for p in people if not p.missing]

    face_distance = _metric("face_distance", _mean(p.distance for p in assigned), FACE_DISTANCE_BANDS, len(assigned))
    clipped = [im.clip_score for im in readable if im.clip_score is not None]
    clip_score = _metric("clip_score", _mean(clipped), CLIP_SCORE_BANDS, len(clipped))
    n_faceless = int(sum(im.faceless for im in readable))
    faceless = _metric("faceless_images", n_faceless, FACELESS_BANDS, len(readable))

    n_missing = sum(p.missing for p in people)
    n_extra = sum(f.person is None for f in faces)
    n_swaps = sum(p.swap for p in assigned)
    counts = {
        "images": len(images),
        "readable_images": len(readable),
        "unreadable_images": len(images) - len(readable),
        "faces_detected": len(faces),
        "person_instances": len(people),
        "faceless_images": n_faceless,
        "faceless_rate": _rate(n_faceless, len(readable)),
        "images_without_any_face": sum(im.n_faces == 0 for im in readable),
        "missing_people": n_missing,
        "missing_rate": _rate(n_missing, len(people)),
        "matched_people": sum(p.match for p in people),
        "match_rate": _rate(sum(p.match for p in people), len(people)),
        "extra_faces": n_extra,
        "extra_face_rate": _rate(n_extra, len(faces)),
        "images_with_extra_faces": sum(im.extra_faces > 0 for im in readable),
        "identity_swaps": n_swaps,
        "swap_rate": _rate(n_swaps, len(assigned)),
        "images_with_swaps": sum(im.swaps > 0 for im in readable),
    }

    per_person: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(p.person for p in people):
        rows = [p for p in people if p.person == name]
        got = [p for p in rows if not p.missing]
        dists = [p.distance for p in got]
        per_person[name] = {
            "images": len(rows),
            "assigned": len(got),
            "matched": sum(p.match for p in rows),
            "match_rate": _rate(sum(p.match for p in rows), len(rows)),
            "missing": len(rows) - len(got),
            "swaps": sum(p.swap for p in got),
            "not_matched_images": sum(not p.match for p in rows),
            "mean_distance": _mean(dists),
            "min_distance": min(dists) if dists else None,
            "max_distance": max(dists) if dists else None,
            "mean_cosine": _mean(p.cosine for p in got),
        }

    by_size = []
    for _, label in SIZE_BUCKETS:
        bucket_faces = [f for f in faces if f.size_bucket == label]
        mine = [f for f in bucket_faces if f.person is not None]
        dists = [f.distance for f in mine]
        by_size.append({
            "bucket": label,
            "faces": len(bucket_faces),
            "assigned": len(mine),
            "extra": len(bucket_faces) - len(mine),
            "matched": sum(d <= match_threshold for d in dists),
            "match_rate": _rate(sum(d <= match_threshold for d in dists), len(mine)),
            "swaps": sum(f.swap for f in mine),
            "mean_distance": _mean(dists),
        })

    return Metrics(
        face_distance=face_distance,
        clip_score=clip_score,
        faceless_images=faceless,
        counts=counts,
        per_person=per_person,
        by_face_size=by_size,
        match_threshold=match_threshold,
    )
