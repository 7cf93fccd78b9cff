"""Regions: per-person soft masks (head, torso, limbs) and a background mask from a Pose, at the
image's resolution and at every latent resolution the UNet uses; head boxes; a mask overlay."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from personas import GroupshotError

from compose.poses import (
    L_ANKLE, L_EAR, L_ELBOW, L_EYE, L_HIP, L_KNEE, L_SHOULDER, L_WRIST, LIMBS, NECK, NOSE,
    R_ANKLE, R_EAR, R_ELBOW, R_EYE, R_HIP, R_KNEE, R_SHOULDER, R_WRIST, Pose,
)

# After resizing, every person who had any area keeps at least one cell where their share is
# this large, so that even at 8x8 each adapter acts somewhere (see Regions.resized).
MIN_PEAK = 0.5

# Limbs as thick segments: (from, to, width in body units).
_LIMB_WIDTHS = (
    (R_SHOULDER, R_ELBOW, 0.5), (R_ELBOW, R_WRIST, 0.42), (L_SHOULDER, L_ELBOW, 0.5), (L_ELBOW, L_WRIST, 0.42),
    (R_HIP, R_KNEE, 0.7), (R_KNEE, R_ANKLE, 0.5), (L_HIP, L_KNEE, 0.7), (L_KNEE, L_ANKLE, 0.5),
)
# Hands and feet as discs: (keypoint, radius in body units).
_ENDS = ((R_WRIST, 0.32), (L_WRIST, 0.32), (R_ANKLE, 0.25), (L_ANKLE, 0.25))
_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel keypoints stay sub-pixel
_OVERLAY_COLORS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
)


@dataclass
class Regions:
    """Soft masks that share every pixel: people.sum(0) + background == 1."""

    people: np.ndarray      # (N, H, W) float32 in [0, 1]
    background: np.ndarray  # (H, W) float32
    heads: list[tuple[float, float, float, float]] = field(default_factory=list)  # x0, y0, x1, y1 in these pixels

    def __post_init__(self) -> None:
        self.people = np.asarray(self.people, np.float32)
        self.background = np.asarray(self.background, np.float32)
        if self.people.ndim != 3 or self.background.shape != self.people.shape[1:]:
            raise ValueError(f"regions: people {self.people.shape} and background {self.background.shape} do not match")
        if self.heads and len(self.heads) != len(self.people):
            raise ValueError(f"regions: {len(self.heads)} head boxes for {len(self.people)} people")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.background.shape

    def resized(self, h: int, w: int) -> "Regions":
        """The masks at h x w (e.g. 64, 32, 16, 8 for a 512 px image).

        Area interpolation, then every pixel is divided by its total so the sum rule holds
        again. Then each person who had any area and now peaks below MIN_PEAK gets one cell
        raised to MIN_PEAK: their strongest cell that no other person already holds at
        MIN_PEAK; the others' shares in that cell shrink in proportion. So at 8x8 every
        adapter still has a cell of its own, and people never both claim one cell fully.
        """
        people, background = _resize(self, h, w, cv2.INTER_AREA)

        had_area = [bool(m.max() > 0) for m in self.people]
        held = np.zeros((h, w), bool)
        need = []
        for i in sorted(range(len(people)), key=lambda i: -float(people[i].max())):
            cell = np.unravel_index(int(people[i].argmax()), (h, w))
            if people[i][cell] >= MIN_PEAK and not held[cell]:
                held[cell] = True
            elif had_area[i]:
                need.append(i)
        for i in need:
            free = np.where(held, -1.0, people[i])
            if free.max() < 0:
                free = people[i]  # more people than cells: share rather than vanish
            cell = np.unravel_index(int(free.argmax()), (h, w))
            old = float(people[i][cell])
            if old < MIN_PEAK:
                rest = 1.0 - old
                factor = (1.0 - MIN_PEAK) / rest if rest > 0 else 0.0
                others = [j for j in range(len(people)) if j != i]
                people[others, cell[0], cell[1]] *= factor
                background[cell] *= factor
                people[i][cell] = MIN_PEAK
            held[cell] = True
        return Regions(people, background, _scaled_boxes(self, h, w))

    def overlay(
        self, image: Image.Image | np.ndarray | None = None, names: list[str] | None = None, *, alpha: float = 0.5
    ) -> Image.Image:
        """Colour-coded masks blended over `image` (the skeleton or a render; black if None),
        each head box outlined and each person's name written above their head."""
        n = len(self.people)
        names = list(names) if names is not None else [str(i) for i in range(n)]
        if len(names) != n:
            raise ValueError(f"overlay: {len(names)} names for {n} people")
        if image is None:
            base = np.zeros((*self.size, 3), np.float32)
        else:
            image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
            base = np.asarray(image.convert("RGB"), np.float32)
        h, w = base.shape[:2]
        if (h, w) != self.size:  # show the masks on a render of another size
            regions = Regions(*_resize(self, h, w, cv2.INTER_LINEAR), _scaled_boxes(self, h, w))
        else:
            regions = self
        out = base * (1 - alpha * regions.people.sum(0))[..., None]
        for i, mask in enumerate(regions.people):
            out += alpha * mask[..., None] * np.array(_OVERLAY_COLORS[i % len(_OVERLAY_COLORS)], np.float32)
        img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        font_size = max(12, min(h, w) // 28)
        font = _font(font_size)
        for i, name in enumerate(names):
            color = _OVERLAY_COLORS[i % len(_OVERLAY_COLORS)]
            if regions.heads:
                x0, y0, x1, y1 = regions.heads[i]
                draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
                x, top = (x0 + x1) / 2, y0
            else:
                ys, xs = np.nonzero(regions.people[i] >= 0.5 * regions.people[i].max())
                x, top = (float(xs.mean()), float(ys.min())) if len(xs) else (w / 2, h / 2)
            # Above the head; inside the box where there is no room above it.
            xy, anchor = ((x, top - 2), "mb") if top - 2 >= font_size else ((x, top + 2), "mt")
            draw.text(xy, name, fill=(255, 255, 255), font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
        return img


def regions_from_pose(pose: Pose, *, dilate: float = 0.15, feather: float = 0.35) -> Regions:
    """Per-person soft masks at the pose's resolution, plus the background.

    Each person's body (head ellipse, neck, torso polygon, limbs as thick segments, hands,
    feet; sizes from their body unit, about a head height) is grown by `dilate` units at
    full strength, then falls smoothly to 0 over the next `feather` units. Where people
    overlap, each pixel's person mass (the largest of their masks) goes to the nearest
    skeleton, a head counting as distance 0 inside its ellipse. A skeleton within a fifth of
    a unit of the nearest still gets a share (smoothstep), so the seam is not a hard edge;
    beyond that it gets none, so faces belong to their person alone.
    """
    if not (dilate >= 0 and feather >= 0):
        raise GroupshotError(f"regions: dilate={dilate} and feather={feather} must be >= 0 (in head heights)")
    h, w = pose.height, pose.width
    n = len(pose.people)
    if n == 0:
        return Regions(np.zeros((0, h, w), np.float32), np.ones((h, w), np.float32), [])
    masks, dists, units = [], [], []
    for person in pose.people:
        unit = body_unit(person, (w, h))
        body, core = _draw_person(person, unit, (h, w))
        outside = cv2.distanceTransform((body == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        # A ramp on the distance, not a Gaussian blur of the mask: blur would pull thin limbs
        # below 1 and makes the falloff width depend on the part's size.
        t = np.clip((outside - dilate * unit) / max(feather * unit, 1e-6), 0, 1)
        masks.append((1 - t * t * (3 - 2 * t)).astype(np.float32))  # smoothstep from 1 to 0
        dists.append(cv2.distanceTransform((core == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE))
        units.append(unit)
    masks_arr = np.stack(masks)  # (N, H, W)
    dist_arr = np.stack(dists)   # (N, H, W) pixels to each skeleton
    mass = masks_arr.max(0)
    band = max(1.0, 0.2 * float(np.median(units)))
    dist_arr = np.where(masks_arr > 0, dist_arr, np.inf)
    nearest = dist_arr.min(0)
    t = np.clip((dist_arr - np.where(np.isfinite(nearest), nearest, 0)) / band, 0, 1)
    weights = masks_arr * (1 - t * t * (3 - 2 * t))  # (N, H, W); 1 for the nearest, 0 beyond the band
    total = weights.sum(0)
    people = np.where(total > 0, mass * weights / np.where(total > 0, total, 1), 0).astype(np.float32)
    background = np.clip(1 - people.sum(0), 0, 1).astype(np.float32)
    return Regions(people, background, head_boxes(pose))


def head_boxes(pose: Pose) -> list[tuple[float, float, float, float]]:
    """Per person, the box (x0, y0, x1, y1, pixels) around their head ellipse, clipped to the canvas."""
    boxes = []
    for person in pose.people:
        cx, cy, ax, ay, angle = head_ellipse(person, body_unit(person, (pose.width, pose.height)))
        a = math.radians(angle)
        hx = math.hypot(ax * math.cos(a), ay * math.sin(a))
        hy = math.hypot(ax * math.sin(a), ay * math.cos(a))
        boxes.append((
            max(0.0, cx - hx), max(0.0, cy - hy), min(float(pose.width), cx + hx), min(float(pose.height), cy + hy),
        ))
    return boxes


def body_unit(person: np.ndarray, canvas: tuple[int, int]) -> float:
    """About one head height in pixels: the median of what each visible pair of keypoints
    says (median, so one foreshortened part, e.g. shoulders seen from the side, does not rule)."""
    present = person[:, 2] > 0

    def dist(a: int, b: int) -> float | None:
        return float(np.hypot(*(person[a, :2] - person[b, :2]))) if present[a] and present[b] else None

    ratios = ((NOSE, NECK, 0.83), (R_SHOULDER, L_SHOULDER, 1.7), (R_EYE, L_EYE, 0.4), (R_EAR, L_EAR, 0.84),
              (R_HIP, L_HIP, 1.0), (R_SHOULDER, R_ELBOW, 1.4), (L_SHOULDER, L_ELBOW, 1.4),
              (R_HIP, R_KNEE, 1.9), (L_HIP, L_KNEE, 1.9), (NECK, R_HIP, 2.55), (NECK, L_HIP, 2.55))
    estimates = [d / r for a, b, r in ratios if (d := dist(a, b)) is not None and d > 0]
    if estimates:
        return max(2.0, float(np.median(estimates)))
    return max(2.0, 0.1 * min(canvas))  # a lone keypoint says nothing about size


def head_ellipse(person: np.ndarray, unit: float) -> tuple[float, float, float, float, float]:
    """(cx, cy, semi-axis across, semi-axis along, angle in degrees) of the head, hair included."""
    present = person[:, 2] > 0
    angle = 0.0
    for a, b in ((R_EYE, L_EYE), (R_EAR, L_EAR)):
        if present[a] and present[b]:
            dx, dy = person[b, :2] - person[a, :2]
            if dx < 0:  # facing away: the person's right is on the image's right
                dx, dy = -dx, -dy
            angle = math.degrees(math.atan2(dy, dx))
            break
    up = np.array([math.sin(math.radians(angle)), -math.cos(math.radians(angle))])
    face = [k for k in (R_EYE, L_EYE, R_EAR, L_EAR) if present[k]]
    if face:
        centre = person[face, :2].mean(0) + 0.05 * unit * up
    elif present[NOSE]:
        centre = person[NOSE, :2] + 0.12 * unit * up
    elif present[NECK]:
        hips = [k for k in (R_HIP, L_HIP) if present[k]]
        if hips:  # the head sits on the spine's line, whatever way the body lies
            spine = person[NECK, :2] - person[hips, :2].mean(0)
            up = spine / max(float(np.linalg.norm(spine)), 1e-6)
        else:
            up = np.array([0.0, -1.0])
        centre = person[NECK, :2] + 0.95 * unit * up
    else:
        centre = person[present, :2].mean(0) if present.any() else np.zeros(2)
    return float(centre[0]), float(centre[1]), 0.5 * unit, 0.55 * unit, angle


def _draw_person(person: np.ndarray, unit: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(body, core) uint8 masks: the filled body, and the skeleton used to split overlaps."""
    body = np.zeros(shape, np.uint8)
    core = np.zeros(shape, np.uint8)
    present = person[:, 2] > 0
    pts = {k: person[k, :2].astype(np.float64) for k in range(18) if present[k]}

    def fx(p: np.ndarray) -> tuple[int, int]:
        return int(round(p[0] * (1 << _SHIFT))), int(round(p[1] * (1 << _SHIFT)))

    def thick(img: np.ndarray, p: np.ndarray, q: np.ndarray, width: float) -> None:
        cv2.line(img, fx(p), fx(q), 1, max(1, int(round(width))), cv2.LINE_8, _SHIFT)

    cx, cy, ax, ay, angle = head_ellipse(person, unit)
    head_axes = (int(round(ax * (1 << _SHIFT))), int(round(ay * (1 << _SHIFT))))
    cv2.ellipse(body, fx((cx, cy)), head_axes, angle, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)
    cv2.ellipse(core, fx((cx, cy)), head_axes, angle, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)
    head = np.array([cx, cy])
    if NECK in pts:
        thick(body, head, pts[NECK], 0.55 * unit)
        thick(core, head, pts[NECK], 1)

    corners = _torso_corners(pts, unit)
    if corners is not None:
        poly = np.array([fx(p) for p in corners], np.int32)
        cv2.fillPoly(body, [poly], 1, cv2.LINE_8, _SHIFT)
        # The keypoints are joints; flesh reaches about a quarter unit past them.
        cv2.polylines(body, [poly], True, 1, max(1, int(round(0.5 * unit))), cv2.LINE_8, _SHIFT)
        # Only medial lines join the core: a torso outline would sit on a neighbour's spine.
        rs, ls, lh, rh = corners
        for p, q in ((rs, ls), (rh, lh), ((rs + ls) / 2, (rh + lh) / 2)):
            thick(core, p, q, 1)

    for a, b, width in _LIMB_WIDTHS:
        if a in pts and b in pts:
            thick(body, pts[a], pts[b], width * unit)
            thick(core, pts[a], pts[b], 1)
    for k, radius in _ENDS:
        if k in pts:
            cv2.circle(body, fx(pts[k]), int(round(radius * unit * (1 << _SHIFT))), 1, -1, cv2.LINE_8, _SHIFT)
    for a, b in LIMBS:  # the drawn skeleton's own lines (head, shoulders, hips) join the core too
        if a in pts and b in pts:
            thick(core, pts[a], pts[b], 1)
    for p in pts.values():
        cv2.circle(core, fx(p), 0, 1, -1, cv2.LINE_8, _SHIFT)
    return body, core


def _torso_corners(pts: dict[int, np.ndarray], unit: float) -> tuple[np.ndarray, ...] | None:
    """(r_shoulder, l_shoulder, l_hip, r_hip), filling in missing ones from the rest; None
    without shoulders or neck (no torso to draw)."""
    rs, ls, neck = pts.get(R_SHOULDER), pts.get(L_SHOULDER), pts.get(NECK)
    if rs is None and ls is None:
        if neck is None:
            return None
        rs, ls = neck - (0.85 * unit, 0), neck + (0.85 * unit, 0)
    elif rs is None:
        rs = 2 * neck - ls if neck is not None else ls - (1.7 * unit, 0)
    elif ls is None:
        ls = 2 * neck - rs if neck is not None else rs + (1.7 * unit, 0)
    rh, lh = pts.get(R_HIP), pts.get(L_HIP)
    if rh is None and lh is None:
        # Hidden hips (people behind others, portraits): the torso still goes down ~2.5 units.
        across = ls - rs
        down = np.array([-across[1], across[0]]) / max(float(np.linalg.norm(across)), 1e-6)
        rh = rs + 0.2 * across + 2.5 * unit * down
        lh = ls - 0.2 * across + 2.5 * unit * down
    elif rh is None:
        rh = lh - 0.6 * (ls - rs)
    elif lh is None:
        lh = rh + 0.6 * (ls - rs)
    return rs, ls, lh, rh


def _resize(regions: Regions, h: int, w: int, interpolation: int) -> tuple[np.ndarray, np.ndarray]:
    """People (N, h, w) and background (h, w), each pixel divided by its total so they sum to 1."""
    people = np.zeros((len(regions.people), h, w), np.float32)
    for i, mask in enumerate(regions.people):
        people[i] = cv2.resize(mask, (w, h), interpolation=interpolation)
    background = cv2.resize(regions.background, (w, h), interpolation=interpolation)
    people, background = np.clip(people, 0, None), np.clip(background, 0, None)
    total = people.sum(0) + background
    total[total <= 0] = 1.0
    return people / total, background / total


def _scaled_boxes(regions: Regions, h: int, w: int) -> list[tuple[float, float, float, float]]:
    sy, sx = h / regions.size[0], w / regions.size[1]
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in regions.heads]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()
