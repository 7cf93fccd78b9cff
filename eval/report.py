"""Write an evaluation's report folder: report.json, report.csv, report.md, a self-contained
report.html and report.pdf. The folder appears whole or not at all (built aside, renamed)."""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from personas import GroupshotError, replace_dir
from personas.version import TOOLKIT_VERSION

from eval.metrics import DEFINITIONS, FACE_DISTANCE_BANDS, CLIP_SCORE_BANDS, FACELESS_BANDS, Band, MetricResult

if TYPE_CHECKING:
    from PIL import Image

    from eval.scoring import Scores

__all__ = ["REPORT_SCHEMA_VERSION", "REPORT_FILES", "SweepTable", "write_report", "check_output_dir", "summary_lines"]

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "report.csv", "report.md", "report.html", "report.pdf")
METRIC_TITLES = {"face_distance": "Face Distance Score", "clip_score": "CLIP Score",
                 "faceless_images": "Number of Faceless Images"}
BANDS = {"face_distance": FACE_DISTANCE_BANDS, "clip_score": CLIP_SCORE_BANDS, "faceless_images": FACELESS_BANDS}
THUMB = 256  # px, longest side of an image in the HTML/PDF grids
FACE_THUMB = 112
COLOURS = {"match": (40, 170, 60), "far": (235, 150, 20), "swap": (220, 40, 40), "extra": (150, 150, 150)}


@dataclass
class SweepTable:
    """A hyperparameter comparison for the report: one row per variant.

    rows hold each variant's `name`, its parameter values and its metric values, e.g.
    {"name": "lr-1e-4", "learning_rate": 1e-4, "face_distance": 0.41, "clip_score": 0.29}.
    """

    parameters: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]]
    title: str = "Hyperparameter sweep"
    best: str | None = None  # the chosen row's name
    note: str = ""
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[step, loss], ...]: drawn beside the metrics
    grid: str | None = None  # a PNG file comparing the variants' images (e.g. base model and each variant per prompt)

    def __post_init__(self) -> None:
        if not self.parameters or not self.metrics:
            raise GroupshotError("a sweep table needs at least one parameter and one metric")
        for i, row in enumerate(self.rows):
            missing = [k for k in ("name", *self.parameters, *self.metrics) if k not in row]
            if missing:
                raise GroupshotError(f"sweep row {i} lacks {', '.join(missing)}")


# ---------------------------------------------------------------------------------------
# output folder


def check_output_dir(out: str | os.PathLike) -> Path:
    """Refuse an --out that exists and holds something other than an earlier report."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise GroupshotError(f"--out {out} is a file; give a folder for the report")
        entries = [p for p in out.iterdir()]
        if entries and not (out / "report.json").is_file():
            raise GroupshotError(
                f"--out {out} is a folder with other files ({len(entries)} entries, no report.json); "
                "the report replaces its folder whole, so choose a new or empty folder"
            )
    return out


def write_report(
    scores: Scores,
    out: str | os.PathLike,
    *,
    base: Scores | None = None,
    sweep: SweepTable | None = None,
    title: str | None = None,
    max_images: int = 64,
) -> Path:
    """Write all report files into `out`, replacing an earlier report there atomically."""
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        ctx = _Context(scores, base, sweep, title or _default_title(scores), max_images)
        data = report_json(ctx)
        with open(tmp / "report.json", "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
            f.write("\n")
        _write_csv(ctx, tmp / "report.csv")
        (tmp / "figures").mkdir()
        figures = _loss_curves(ctx, tmp / "figures")  # name -> PNG bytes, each also figures/<name>.png
        sweep_fig = _sweep_figure(ctx.sweep) if ctx.sweep is not None and ctx.sweep.rows else None
        more = _contact_sheets(ctx) | ({} if sweep_fig is None else {"sweep": _png(sweep_fig)})
        if ctx.sweep is not None and ctx.sweep.grid:
            more["sweep-grid"] = Path(ctx.sweep.grid).read_bytes()
        for name, png in more.items():
            (tmp / "figures" / f"{name}.png").write_bytes(png)
        figures |= more
        (tmp / "report.md").write_text(_markdown(ctx, figures), encoding="utf-8")
        (tmp / "report.html").write_text(_html(ctx, figures), encoding="utf-8")
        _pdf(ctx, figures, sweep_fig, tmp / "report.pdf")
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:  # a failed write() names no file: name the report
            raise OSError(e.errno, e.strerror, str(out)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("report written to %s", out)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------
# shared


@dataclass
class _Context:
    scores: Scores
    base: Scores | None
    sweep: SweepTable | None
    title: str
    max_images: int
    _thumbs: dict = field(default_factory=dict)


def _default_title(scores: Scores) -> str:
    names = ", ".join(scores.personas) or "no personas"
    return f"groupshot evaluation: {names}"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def report_json(ctx: _Context) -> dict[str, Any]:
    data = {"schema_version": REPORT_SCHEMA_VERSION, "toolkit_version": TOOLKIT_VERSION, "title": ctx.title}
    data.update(ctx.scores.to_json())
    data["base"] = None if ctx.base is None else ctx.base.to_json()
    data["sweep"] = None if ctx.sweep is None else asdict(ctx.sweep)
    return data


def _metric_rows(m: MetricResult) -> list[str]:
    return [METRIC_TITLES[m.name], _fmt(m.value), m.band or "n/a", "n/a" if m.points is None else f"{m.points} / {m.max_points}", str(m.n)]


def _scale_note(scores: Scores) -> str:
    """The Face Distance bands are fixed numbers; what a distance means depends on the face model."""
    t = scores.metrics.match_threshold
    return (f"Face distances depend on the face model: for {scores.face_backend.get('name')} two faces farther "
            f"apart than {t:g} are different people (its match_threshold), so read the Face Distance bands "
            "against that number.")


def _bands_text(bands: Sequence[Band]) -> str:
    return "; ".join(f"{b.label}: {b.points}" for b in bands)


def _settings(ctx: _Context) -> list[tuple[str, str]]:
    s = ctx.scores
    rows = [("created", s.created_at), ("toolkit", TOOLKIT_VERSION)]
    fb = s.face_backend
    rows.append(("face model", f"{fb.get('name')} / {fb.get('model')} ({fb.get('version', '')}), "
                               f"match_threshold {fb.get('match_threshold')}"))
    if s.clip:
        sha = (s.clip.get("weights_sha256") or "")[:12]
        rows.append(("CLIP model", f"{s.clip.get('model')} / {s.clip.get('pretrained') or s.clip.get('weights_file')}"
                                   f" (sha256 {sha or 'n/a'}, open_clip {s.clip.get('open_clip_version')})"))
    else:
        rows.append(("CLIP model", "not used (no prompts)"))
    for src in s.sources:
        if src["kind"] == "render":
            req = src.get("request", {})
            base = (src.get("base_model") or {}).get("id", "n/a")
            rows.append((f"render {Path(src['path']).name}",
                         f"method {req.get('method', 'n/a')}, people {', '.join(src['people'])}, "
                         f"{src['images']} images, steps {req.get('steps', 'n/a')}, guidance {req.get('guidance', 'n/a')}, "
                         f"seed {req.get('seed', 'n/a')}, base model {base}"))
            rows.append(("  prompt", str(req.get("prompt", "n/a"))))
            rows.append(("  CLIP text", str(src.get("clip_text"))))
        else:
            rows.append((f"images {Path(src['path']).name}", f"people {', '.join(src['people'])}, {src['images']} images"))
    for name, p in s.personas.items():
        hp = p.hyperparameters
        keys = ("learning_rate", "lora_rank", "lora_alpha", "max_train_steps", "num_tokens", "resolution")
        hps = ", ".join(f"{k} {hp[k]}" for k in keys if k in hp)
        rows.append((f"persona {name}", f"method {p.method}, class word '{p.class_word}', tokens {' '.join(p.tokens)}"
                                        f"{', ' + hps if hps else ''}; base {p.base_model.get('id', 'n/a')}"))
    t = s.timing
    rows.append(("timing", f"{t.get('images_scored')} images in {t.get('scoring_seconds')} s "
                           f"({t.get('images_per_second')} images/s, {t.get('face_workers', 1)} face worker process(es)), "
                           f"references {t.get('reference_seconds')} s"))
    return rows


def _counts_rows(scores: Scores) -> list[list[str]]:
    c = scores.metrics.counts
    return [
        ["images (readable / all)", f"{c['readable_images']} / {c['images']}", ""],
        ["faceless images", str(c["faceless_images"]), _pct(c["faceless_rate"])],
        ["images with no face at all", str(c["images_without_any_face"]), ""],
        ["missing people (no face in region)", f"{c['missing_people']} of {c['person_instances']}", _pct(c["missing_rate"])],
        ["people matched (within threshold)", f"{c['matched_people']} of {c['person_instances']}", _pct(c["match_rate"])],
        ["extra faces", f"{c['extra_faces']} of {c['faces_detected']}", _pct(c["extra_face_rate"])],
        ["identity swaps", str(c["identity_swaps"]), _pct(c["swap_rate"])],
    ]


def _person_rows(scores: Scores) -> list[list[str]]:
    rows = []
    for name, p in scores.metrics.per_person.items():
        rows.append([name, str(p["images"]), str(p["assigned"]), f"{p['matched']} ({_pct(p['match_rate'])})",
                     str(p["missing"]), str(p["swaps"]), _fmt(p["mean_distance"]), _fmt(p["mean_cosine"])])
    return rows


def _size_rows(scores: Scores) -> list[list[str]]:
    return [[b["bucket"], str(b["faces"]), str(b["assigned"]), str(b["extra"]),
             f"{b['matched']} ({_pct(b['match_rate'])})", str(b["swaps"]), _fmt(b["mean_distance"])]
            for b in scores.metrics.by_face_size]


def _image_rows(scores: Scores) -> list[list[str]]:
    return [[im.key, im.status, _fmt(im.clip_score), str(im.n_faces), _fmt(im.faceless),
             ", ".join(im.missing) or "-", str(im.extra_faces), str(im.swaps)] for im in scores.images]


def _sweep_rows(sweep: SweepTable) -> tuple[list[str], list[list[str]]]:
    head = ["variant", *sweep.parameters, *sweep.metrics]
    rows = []
    for r in sweep.rows:
        name = f"{r['name']} (best)" if sweep.best is not None and r["name"] == sweep.best else str(r["name"])
        rows.append([name, *(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in sweep.parameters),
                     *(_fmt(r[k]) for k in sweep.metrics)])
    return head, rows


HEADS = {
    "metrics": ["metric", "value", "band", "points", "n"],
    "counts": ["counted apart", "count", "rate"],
    "people": ["person", "images", "face assigned", "matched", "missing", "swaps", "mean distance", "mean cosine"],
    "sizes": ["face width / image width", "faces", "assigned", "extra", "matched", "swaps", "mean distance"],
    "images": ["image", "status", "CLIP", "faces", "faceless", "missing", "extra", "swaps"],
}


# ---------------------------------------------------------------------------------------
# CSV


CSV_COLUMNS = ["source", "image", "status", "row", "person", "face_index", "x0", "y0", "x1", "y1",
               "face_width_fraction", "size_bucket", "distance", "cosine", "match", "missing", "swap",
               "nearest", "clip_score", "clip_text"]


def _write_csv(ctx: _Context, path: Path) -> None:
    s = ctx.scores
    faces = {(f.image, f.index): f for f in s.faces}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for im in s.images:
            common = {"source": im.source, "image": im.key, "status": im.status,
                      "clip_score": _csv(im.clip_score), "clip_text": im.clip_text or ""}
            if not im.ok:
                w.writerow({**common, "row": "image"})
                continue
            for p in (p for p in s.people if p.image == im.key):
                f = faces.get((im.key, p.face)) if p.face is not None else None
                w.writerow({**common, "row": "person", "person": p.person, "face_index": _csv(p.face),
                            **_box_cols(f), "face_width_fraction": _csv(p.width_fraction),
                            "size_bucket": f.size_bucket if f else "", "distance": _csv(p.distance),
                            "cosine": _csv(p.cosine), "match": int(p.match), "missing": int(p.missing),
                            "swap": int(p.swap), "nearest": f.nearest if f else ""})
            for f in (f for f in s.faces if f.image == im.key and f.person is None):
                w.writerow({**common, "row": "extra_face", "face_index": f.index, **_box_cols(f),
                            "face_width_fraction": _csv(f.width_fraction), "size_bucket": f.size_bucket,
                            "nearest": f.nearest or ""})


def _csv(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _box_cols(f) -> dict[str, str]:
    if f is None:
        return {}
    return dict(zip(("x0", "y0", "x1", "y1"), (_csv(float(v)) for v in f.box)))


# ---------------------------------------------------------------------------------------
# pictures


def _open(path: str | os.PathLike) -> "Image.Image | None":
    """The decoded image, or None when unreadable. Callers never draw on it (they crop,
    resize or copy), so recent decodes are shared: every face of an image, in the HTML and
    again in the PDF, would otherwise decode it anew."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _open_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _open_cached(path: str, mtime_ns: int, size: int) -> "Image.Image | None":  # keyed by mtime/size: a changed file misses
    from personas.photos import open_photo

    try:
        return open_photo(path)
    except (GroupshotError, OSError):
        return None


def _placeholder(text: str, size: int = THUMB) -> "Image.Image":
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (225, 225, 225))
    ImageDraw.Draw(im).text((8, size // 2 - 6), text[:36], fill=(90, 90, 90))
    return im


def _face_colour(scores: Scores, face) -> tuple[int, int, int]:
    if face.person is None:
        return COLOURS["extra"]
    if face.swap:
        return COLOURS["swap"]
    return COLOURS["match"] if face.distance <= scores.metrics.match_threshold else COLOURS["far"]


def _annotated(ctx: _Context, scores: Scores, key: str) -> "Image.Image":
    """The image scaled to THUMB with its faces boxed (green matched, orange far, red swap, grey extra)."""
    cache_key = (id(scores), key)
    if cache_key in ctx._thumbs:
        return ctx._thumbs[cache_key]
    from PIL import ImageDraw

    im_rec = scores.image(key)
    pil = _open(im_rec.path) if im_rec.ok else None
    if pil is None:
        thumb = _placeholder("unreadable")
    else:
        scale = THUMB / max(pil.size)
        thumb = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))))
        draw = ImageDraw.Draw(thumb)
        for f in (f for f in scores.faces if f.image == key):
            if scores is ctx.scores and f.person is not None:  # the faces the face table shows,
                _face_thumb(ctx, im_rec.path, f.box, pil)  # cropped while the image is decoded
            box = [v * scale for v in f.box]
            colour = _face_colour(scores, f)
            draw.rectangle(box, outline=colour, width=3)
            draw.text((box[0] + 3, box[1] + 2), f.person or "extra", fill=colour)
    ctx._thumbs[cache_key] = thumb
    return thumb


def _face_thumb(ctx: _Context, path: str, box: Sequence[float], pil: "Image.Image | None" = None) -> "Image.Image":
    """The face's crop, made once per report (the HTML table and the PDF pages show the same
    crops); `pil`: the image, when the caller has it decoded."""
    key = ("face", path, tuple(box))
    if key not in ctx._thumbs:
        pil = pil if pil is not None else _open(path)
        ctx._thumbs[key] = _placeholder("unreadable", FACE_THUMB) if pil is None else _crop_face(pil, box)
    return ctx._thumbs[key]


def _crop_face(pil: "Image.Image", box: Sequence[float], size: int = FACE_THUMB) -> "Image.Image":
    # A detector can report corners the wrong way round or a box of no width (SCRFD's
    # distances are unconstrained): crop what the box spans, at least one pixel.
    (x0, x1), (y0, y1) = sorted(box[0::2]), sorted(box[1::2])
    m = 0.25 * max(x1 - x0, y1 - y0)  # some hair and chin around the detector's tight box
    left, top = min(max(0, x0 - m), pil.width - 1), min(max(0, y0 - m), pil.height - 1)
    right, bottom = max(min(pil.width, x1 + m), left + 1), max(min(pil.height, y1 + m), top + 1)
    return _fit(pil.crop((left, top, right, bottom)), size)


def _fit(im: "Image.Image", size: int) -> "Image.Image":
    from PIL import Image

    im = im.copy()
    im.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def _ref_crop(scores: Scores, name: str, size: int = FACE_THUMB) -> "Image.Image":
    ref = scores.references.get(name)
    pil = _open(ref.crop) if ref is not None and ref.crop else None
    return _placeholder("no reference", size) if pil is None else _fit(pil, size)


def _data_uri(im: "Image.Image", fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format=fmt, quality=85)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _png_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}"


def _shown_images(ctx: _Context, scores: Scores) -> list:
    return scores.images[: ctx.max_images]


def _pairs(ctx: _Context) -> list[tuple[Any, Any]]:
    """(base image, personalised image) pairs, matched by order."""
    if ctx.base is None:
        return []
    return list(zip(ctx.base.images, ctx.scores.images))[: ctx.max_images]


# ---------------------------------------------------------------------------------------
# matplotlib figures (PNG bytes, shared by md, html and pdf)


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so no global figure state and no GUI backend.
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _sweep_figure(sweep: SweepTable):
    """Each metric against the first parameter, one line per setting of the other parameters
    (the best variant starred), and every variant's training loss when the table has curves."""
    param, others = sweep.parameters[0], sweep.parameters[1:]
    xs = [r[param] for r in sweep.rows]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    position = {x: i for i, x in enumerate(dict.fromkeys(xs))}  # categorical x: first-seen order
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for r in sweep.rows:
        lines.setdefault(tuple(r[k] for k in others), []).append(r)
    panels = [*sweep.metrics, *(["training loss"] if any(sweep.curves.values()) else [])]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(3.4 * cols + 0.4, 3.0 * nrows + 0.5)
    for i, metric in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        ax.grid(alpha=0.3)
        if metric == "training loss":
            for name, curve in sweep.curves.items():
                if not curve:
                    continue
                steps, vals = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
                k = max(1, len(vals) // 20)  # the mean of k steps, as personas.train.plot_loss draws it
                if len(vals) > k > 1:
                    steps, vals = steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid")
                ax.plot(steps, vals, lw=1.2, label=name)
            ax.set_xlabel("step")
            ax.set_title("training loss (moving mean)", fontsize=9)
            ax.legend(fontsize=5)
            continue
        for key, rows in lines.items():
            pts = sorted((r[param] if numeric else position[r[param]], r[metric], r["name"]) for r in rows
                         if r[metric] is not None)
            label = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in zip(others, key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
            for x, y, name in pts:
                if name == sweep.best:
                    ax.plot([x], [y], marker="*", ms=14, color="gold", mec="black", zorder=5)
        if numeric and all(x > 0 for x in xs) and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(position)), [str(x) for x in position], rotation=30, fontsize=7)
        for band in BANDS.get(metric, ()):
            for edge in (band.lo, band.hi):
                if edge is not None:
                    ax.axhline(edge, color="grey", lw=0.5, ls=":")
        ax.set_xlabel(param)
        ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=9)
        if others and len(lines) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(sweep.title + ("  (star: best)" if sweep.best else ""), fontsize=10)
    fig.tight_layout()
    return fig


def _loss_curves(ctx: _Context, folder: Path) -> dict[str, bytes]:
    """Each persona's training loss, drawn the way training draws it (personas.train.plot_loss)."""
    from personas.train import plot_loss

    out = {}
    for name, p in ctx.scores.personas.items():
        curve = p.losses()
        if curve is not None:
            path = folder / f"loss-{name}.png"
            plot_loss([(step, loss, 0.0) for step, loss in zip(*curve)], path)
            out[path.stem] = path.read_bytes()
    return out


def _contact_sheets(ctx: _Context) -> dict[str, bytes]:
    out = {}
    grid = _contact_sheet(ctx, ctx.scores)
    if grid is not None:
        out["images"] = grid
    if ctx.base is not None:
        sheet = _contact_sheet(ctx, ctx.base)
        if sheet is not None:
            out["base-images"] = sheet
    return out


def _contact_sheet(ctx: _Context, scores: Scores, cols: int = 4) -> bytes | None:
    """The shown images in a grid, each with its key and CLIP score underneath."""
    shown = _shown_images(ctx, scores)
    if not shown:
        return None
    cells = [(_annotated(ctx, scores, im.key), f"{im.key}  CLIP {_fmt(im.clip_score)}"[:40]) for im in shown]
    buf = io.BytesIO()
    _grid(cells, min(cols, len(cells)), THUMB).save(buf, format="PNG")  # optimize=True: 3x the time
    return buf.getvalue()


def _grid(cells: list[tuple["Image.Image", str]], cols: int, width: int, rows: int | None = None) -> "Image.Image":
    """Pictures in a grid of `cols` columns, `width` px wide cells, each with its (possibly
    multi-line) label underneath; `rows` fixes the height (a page's grid keeps its size)."""
    from PIL import Image, ImageDraw

    gap, line_h = 8, 12
    label_h = line_h * max(1, max(label.count("\n") + 1 for _, label in cells)) + 4
    cell_h = max(pic.height for pic, _ in cells) + label_h + gap
    rows = rows or math.ceil(len(cells) / cols)
    sheet = Image.new("RGB", (cols * (width + gap) - gap, rows * cell_h - gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (pic, label) in enumerate(cells):
        x, y = (i % cols) * (width + gap), (i // cols) * cell_h
        sheet.paste(pic, (x + (width - pic.width) // 2, y))
        draw.multiline_text((x + 4, y + cell_h - gap - label_h + 2), label, fill=(0, 0, 0), spacing=2)
    return sheet


# ---------------------------------------------------------------------------------------
# Markdown


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(ctx: _Context, figures: dict[str, bytes]) -> str:
    s = ctx.scores
    m = s.metrics
    out = [f"# {ctx.title}", ""]
    out += [_md_table(["setting", "value"], [[k, v] for k, v in _settings(ctx)]), ""]
    total = "n/a" if m.total_points is None else f"{m.total_points} / {m.max_points}"
    out += ["## Course metrics", "", _md_table(HEADS["metrics"], [_metric_rows(x) for x in m.course]), "",
            f"Points: **{total}**. Bands: Face Distance {_bands_text(FACE_DISTANCE_BANDS)}; "
            f"CLIP {_bands_text(CLIP_SCORE_BANDS)}; Faceless {_bands_text(FACELESS_BANDS)}.", "",
            _scale_note(s), ""]
    out += ["## Counted apart", "", _md_table(HEADS["counts"], _counts_rows(s)), ""]
    out += ["## Per person", "", _md_table(HEADS["people"], _person_rows(s)), ""]
    out += ["## By face size", "", _md_table(HEADS["sizes"], _size_rows(s)), ""]
    if "images" in figures:
        out += ["## Images", "", "Boxes: green matched, orange beyond the match threshold, red identity swap, "
                "grey extra face.", "", "![images](figures/images.png)", ""]
    if ctx.base is not None:
        out += ["## Base vs personalized", "", _md_table(["metric", "base", "personalized"], _compare_rows(ctx)), ""]
        if "base-images" in figures:
            out += ["![base images](figures/base-images.png)", ""]
    losses = [n for n in figures if n.startswith("loss-")]
    if losses:
        out += ["## Training loss", ""]
        for n in losses:
            out += [f"### {n.removeprefix('loss-')}", "", f"![{n}](figures/{n}.png)", ""]
    out += ["## Data", "", _md_table(["persona", "photos used", "rejected", "refs with a face"], _data_rows(s)), ""]
    for name, p in s.personas.items():
        for r in p.photos_rejected:
            out.append(f"- {name}: rejected `{r['file']}`: {r['reason']}")
    if ctx.sweep is not None:
        head, rows = _sweep_rows(ctx.sweep)
        out += ["", f"## {ctx.sweep.title}", "", _md_table(head, rows), ""]
        if ctx.sweep.note:
            out += [ctx.sweep.note, ""]
        if "sweep" in figures:
            out += ["![sweep](figures/sweep.png)", ""]
        if "sweep-grid" in figures:
            out += ["![base model and every variant](figures/sweep-grid.png)", ""]
    out += ["## Per image", "", _md_table(HEADS["images"], _image_rows(s)), ""]
    out += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()] + [""]
    return "\n".join(out)


def _data_rows(scores: Scores) -> list[list[str]]:
    rows = []
    for name, p in scores.personas.items():
        ref = scores.references.get(name)
        used = f"{sum(ref.with_face)} of {len(ref.refs)}" if ref else "n/a"
        rows.append([name, str(len(p.photos_used)), str(len(p.photos_rejected)), used])
    return rows


def _compare_rows(ctx: _Context) -> list[list[str]]:
    b, s = ctx.base.metrics, ctx.scores.metrics
    rows = [[METRIC_TITLES[x.name], f"{_fmt(x.value)} ({x.band or 'n/a'})", f"{_fmt(y.value)} ({y.band or 'n/a'})"]
            for x, y in zip(b.course, s.course)]
    rows.append(["identity matched", _pct(b.counts["match_rate"]), _pct(s.counts["match_rate"])])
    return rows


# ---------------------------------------------------------------------------------------
# HTML (self-contained: every image is a data: URI, no external file, script or font)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:14px}th{background:#f0f0f0}h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:1.6em}
.grid{display:flex;flex-wrap:wrap;gap:10px}.cell{width:256px;font-size:12px}.cell img{display:block}
.band-top{background:#d9f2d9}.band-low{background:#fde0dc}.muted{color:#777}
.faces td{vertical-align:middle}code{background:#f4f4f4;padding:0 3px}
"""


def _h(v: Any) -> str:
    return html.escape(str(v))


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{_h(c)}</th>" for c in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_metrics(m) -> str:
    out = ['<table><tr>' + "".join(f"<th>{_h(c)}</th>" for c in HEADS["metrics"]) + "<th>bands</th></tr>"]
    for x in m.course:
        top = x.points is not None and x.points == x.max_points
        low = x.points is not None and x.points <= min(b.points for b in BANDS[x.name])
        cls = "band-top" if top else "band-low" if low else ""
        cells = _metric_rows(x) + [_bands_text(BANDS[x.name])]
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{_h(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_grid(ctx: _Context, scores: Scores) -> str:
    cells = []
    for im in _shown_images(ctx, scores):
        thumb = _data_uri(_annotated(ctx, scores, im.key))
        flags = []
        if im.faceless:
            flags.append("faceless")
        if im.missing:
            flags.append("missing " + ", ".join(im.missing))
        if im.swaps:
            flags.append(f"{im.swaps} swap(s)")
        if im.extra_faces:
            flags.append(f"{im.extra_faces} extra")
        caption = (f"<b>{_h(im.key)}</b><br>CLIP {_h(_fmt(im.clip_score))}, {im.n_faces} face(s)"
                   + (f'<br><span class="muted">{_h("; ".join(flags))}</span>' if flags else "")
                   + ("" if im.ok else f"<br>{_h(im.status)}"))
        cells.append(f'<div class="cell"><img src="{thumb}" alt="{_h(im.key)}">{caption}</div>')
    more = len(scores.images) - len(_shown_images(ctx, scores))
    tail = f'<p class="muted">{more} more images in report.json</p>' if more > 0 else ""
    return '<div class="grid">' + "\n".join(cells) + "</div>" + tail


def _html_faces(ctx: _Context) -> str:
    s = ctx.scores
    faces = {(f.image, f.index): f for f in s.faces}
    rows = ['<table class="faces"><tr><th>image</th><th>person</th><th>generated face</th><th>reference</th>'
            "<th>distance</th><th>outcome</th></tr>"]
    refs = {n: _data_uri(_ref_crop(s, n)) for n in s.personas}
    shown = {im.key for im in _shown_images(ctx, s)}
    for p in (p for p in s.people if p.image in shown):
        im = s.image(p.image)
        if p.missing:
            crop, outcome = "<span class='muted'>no face in region</span>", "missing"
        else:
            f = faces[(p.image, p.face)]
            crop = f'<img src="{_data_uri(_face_thumb(ctx, im.path, f.box))}" alt="face">'
            outcome = "swap (nearer " + f.nearest + ")" if p.swap else "match" if p.match else "beyond threshold"
        rows.append(f"<tr><td>{_h(p.image)}</td><td>{_h(p.person)}</td><td>{crop}</td>"
                    f'<td><img src="{refs[p.person]}" alt="reference {_h(p.person)}"></td>'
                    f"<td>{_h(_fmt(p.distance))}</td><td>{_h(outcome)}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _html_pairs(ctx: _Context) -> str:
    rows = ["<table><tr><th>prompt</th><th>base</th><th>personalized</th></tr>"]
    for b, s in _pairs(ctx):
        rows.append(
            f"<tr><td>{_h(s.clip_text or '')}</td>"
            f'<td><img src="{_data_uri(_annotated(ctx, ctx.base, b.key))}" alt="base"><br>'
            f"{_h(b.key)} CLIP {_h(_fmt(b.clip_score))}</td>"
            f'<td><img src="{_data_uri(_annotated(ctx, ctx.scores, s.key))}" alt="personalized"><br>'
            f"{_h(s.key)} CLIP {_h(_fmt(s.clip_score))}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _html(ctx: _Context, figures: dict[str, bytes]) -> str:
    s = ctx.scores
    m = s.metrics
    total = "n/a" if m.total_points is None else f"{m.total_points} / {m.max_points}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_h(ctx.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_h(ctx.title)}</h1>",
        _html_table(["setting", "value"], [[k, v] for k, v in _settings(ctx)]),
        "<h2>Course metrics</h2>", _html_metrics(m), f"<p>Points: <b>{_h(total)}</b></p>",
        f'<p class="muted">{_h(_scale_note(s))}</p>',
        "<h2>Counted apart</h2>", _html_table(HEADS["counts"], _counts_rows(s)),
        "<h2>Per person</h2>", _html_table(HEADS["people"], _person_rows(s)),
        "<h2>By face size</h2>", _html_table(HEADS["sizes"], _size_rows(s)),
        "<h2>Images</h2>",
        '<p class="muted">Boxes: green matched, orange beyond the match threshold, red identity swap, '
        "grey extra face.</p>",
        _html_grid(ctx, s),
        "<h2>Faces and references</h2>", _html_faces(ctx),
    ]
    if ctx.base is not None:
        parts += ["<h2>Base vs personalized</h2>",
                  _html_table(["metric", "base", "personalized"], _compare_rows(ctx)), _html_pairs(ctx)]
    losses = [n for n in figures if n.startswith("loss-")]
    if losses:
        parts.append("<h2>Training loss</h2>")
        for n in losses:
            parts += [f"<h3>{_h(n.removeprefix('loss-'))}</h3>", f'<img src="{_png_uri(figures[n])}" alt="{_h(n)}">']
    parts += ["<h2>Data</h2>", _html_table(["persona", "photos used", "rejected", "refs with a face"], _data_rows(s))]
    rejected = [[n, r["file"], r["reason"]] for n, p in s.personas.items() for r in p.photos_rejected]
    if rejected:
        parts.append(_html_table(["persona", "rejected photo", "reason"], rejected))
    if ctx.sweep is not None:
        head, rows = _sweep_rows(ctx.sweep)
        parts += [f"<h2>{_h(ctx.sweep.title)}</h2>", _html_table(head, rows)]
        if ctx.sweep.note:
            parts.append(f"<p>{_h(ctx.sweep.note)}</p>")
        if "sweep" in figures:
            parts.append(f'<img src="{_png_uri(figures["sweep"])}" alt="sweep">')
        if "sweep-grid" in figures:
            parts.append(f'<img src="{_png_uri(figures["sweep-grid"])}" alt="base model and every variant">')
    parts += ["<h2>Per image</h2>", _html_table(HEADS["images"], _image_rows(s)),
              "<h2>Definitions</h2>", "<ul>" + "".join(f"<li><b>{_h(k)}</b>: {_h(v)}</li>"
                                                         for k, v in DEFINITIONS.items()) + "</ul>",
              "</body></html>"]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# PDF (matplotlib PdfPages: title, metrics, image grids, faces, loss curves, sweep, data)


def _text_page(title: str, lines: list[str]):
    fig = _new_figure(8.27, 11.69)  # A4
    fig.text(0.06, 0.95, title, fontsize=15, weight="bold", va="top")
    y = 0.90
    for line in lines:
        for chunk in _wrap(line, 95):
            fig.text(0.06, y, chunk, fontsize=8.5, family="monospace", va="top")
            y -= 0.018
            if y < 0.04:
                return fig
    return fig


def _wrap(line: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(line, width, subsequent_indent="    ") or [""]


def _table_page(title: str, tables: list[tuple[str, list[str], list[list[str]]]]):
    fig = _new_figure(8.27, 11.69)
    fig.text(0.06, 0.96, title, fontsize=14, weight="bold", va="top")
    n = len(tables)
    for i, (sub, head, rows) in enumerate(tables):
        ax = fig.add_axes((0.05, 0.92 - (i + 1) * 0.88 / n, 0.9, 0.88 / n - 0.03))
        ax.axis("off")
        ax.set_title(sub, fontsize=10, loc="left")
        if rows:
            t = ax.table(cellText=rows[:30], colLabels=head, loc="upper left", cellLoc="left")
            t.auto_set_font_size(False)
            t.set_fontsize(7)
            t.scale(1, 1.2)
    return fig


# A page of pictures is one picture (drawn with PIL, placed by one matplotlib axes): a
# matplotlib axes per thumbnail made the PDF most of `evaluate`'s time.


def _image_pages(ctx: _Context, scores: Scores, title: str, per_page: int = 12) -> list:
    shown = _shown_images(ctx, scores)
    pages = []
    for start in range(0, len(shown), per_page):
        cells = []
        for im in shown[start:start + per_page]:
            flags = " faceless" if im.faceless else ""
            flags += f" swaps {im.swaps}" if im.swaps else ""
            cells.append((_annotated(ctx, scores, im.key), f"{im.key}\nCLIP {_fmt(im.clip_score)}{flags}"))
        pages.append(_picture_page(title, _grid(cells, 3, THUMB, rows=4)))
    return pages


def _face_pages(ctx: _Context, per_page: int = 8) -> list:
    s = ctx.scores
    faces = {(f.image, f.index): f for f in s.faces}
    shown = {im.key for im in _shown_images(ctx, s)}
    rows = [p for p in s.people if p.image in shown]
    pages = []
    for start in range(0, len(rows), per_page):
        cells = []
        for p in rows[start:start + per_page]:
            im = s.image(p.image)
            gen = (_placeholder("missing", FACE_THUMB) if p.missing
                   else _face_thumb(ctx, im.path, faces[(p.image, p.face)].box))
            outcome = "missing" if p.missing else "swap" if p.swap else "match" if p.match else "far"
            cells += [(gen, f"{p.image}\n{p.person}\nd={_fmt(p.distance)} {outcome}"),
                      (_ref_crop(s, p.person), "reference")]
        pages.append(_picture_page("Generated faces next to their persona's reference",
                                   _grid(cells, 4, FACE_THUMB * 3 // 2, rows=per_page // 2)))
    return pages


def _png_page(title: str, png: bytes):
    from PIL import Image

    return _picture_page(title, Image.open(io.BytesIO(png)).convert("RGB"), height=5.8)


def _picture_page(title: str, picture: "Image.Image", height: float = 11.69):
    fig = _new_figure(8.27, height)
    ax = fig.add_axes((0.03, 0.03, 0.94, 0.88 if height < 8 else 0.92))
    ax.imshow(np.asarray(picture))
    ax.set_axis_off()
    fig.suptitle(title, fontsize=12)
    return fig


def _pdf(ctx: _Context, figures: dict[str, bytes], sweep_fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_pdf import PdfPages

    s = ctx.scores
    m = s.metrics
    settings = [f"{k}: {v}" for k, v in _settings(ctx)]
    method = ["", "Method: faces are detected and embedded with the face model above; each expected person",
              "gets at most one face by the Hungarian algorithm on embedding distance (within its region when",
              "a render.json gives one); the person's reference is the mean of its refs/ unit embeddings.", ""]
    method += [f"{k}: {v}" for k, v in DEFINITIONS.items()] + ["", _scale_note(s)]
    pages = [_text_page(ctx.title, settings + method)]
    total = "n/a" if m.total_points is None else f"{m.total_points} / {m.max_points}"
    pages.append(_table_page(f"Metrics (points {total})", [
        ("Course metrics", HEADS["metrics"], [_metric_rows(x) for x in m.course]),
        ("Counted apart", HEADS["counts"], _counts_rows(s)),
        ("Per person", HEADS["people"], _person_rows(s)),
        ("By face size", HEADS["sizes"], _size_rows(s)),
    ]))
    pages += _image_pages(ctx, s, "Images (green matched, orange far, red swap, grey extra)")
    pages += _face_pages(ctx)
    if ctx.base is not None:
        pages.append(_table_page("Base vs personalized", [("Metrics", ["metric", "base", "personalized"],
                                                           _compare_rows(ctx))]))
        pages += _image_pages(ctx, ctx.base, "Base model images")
    pages += [_png_page(f"Training loss: {name.removeprefix('loss-')}", png)
              for name, png in figures.items() if name.startswith("loss-")]
    if ctx.sweep is not None:
        head, rows = _sweep_rows(ctx.sweep)
        pages.append(_table_page(ctx.sweep.title, [("Variants", head, rows)]))
        if ctx.sweep.note:
            pages.append(_text_page(f"{ctx.sweep.title}: notes", [ctx.sweep.note]))
        if sweep_fig is not None:
            pages.append(sweep_fig)
        if "sweep-grid" in figures:
            pages.append(_png_page("Base model and every variant", figures["sweep-grid"]))
    data = _data_rows(s)
    rejected = [[n, r["file"], r["reason"][:60]] for n, p in s.personas.items() for r in p.photos_rejected]
    pages.append(_table_page("Data", [("Photos per persona", ["persona", "photos used", "rejected", "refs with a face"], data),
                                      ("Rejected photos", ["persona", "file", "reason"], rejected)]))
    # Built in memory, then written: matplotlib's PDF writer turns a full disk into a zlib error.
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": ctx.title, "Creator": f"groupshot {TOOLKIT_VERSION}"}) as pdf:
        for fig in pages:
            pdf.savefig(fig)
    path.write_bytes(buf.getvalue())


# ---------------------------------------------------------------------------------------


def summary_lines(scores: Scores) -> list[str]:
    """A few lines for the terminal: the course metrics with bands and points, and the counts."""
    m = scores.metrics
    lines = []
    for x in m.course:
        pts = "n/a" if x.points is None else f"{x.points}/{x.max_points}"
        lines.append(f"{METRIC_TITLES[x.name]:<26} {_fmt(x.value):>8}  band {x.band or 'n/a':<9} points {pts}")
    total = "n/a" if m.total_points is None else f"{m.total_points}/{m.max_points}"
    c = m.counts
    lines.append(f"{'points':<26} {total:>8}")
    lines.append(f"missing people {c['missing_people']}, extra faces {c['extra_faces']}, "
                 f"identity swaps {c['identity_swaps']}, unreadable images {c['unreadable_images']}")
    return lines
