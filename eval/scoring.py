"""Score renders and image folders: detect and embed every face, assign faces to the expected
people, CLIP-score every image, and gather what the report needs."""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from personas import gather_items, my_share, num_processes
from personas.errors import GroupshotError
from personas.library import Library, Persona, sha256_file

from eval.assign import assign_faces
from eval.metrics import FaceRecord, ImageRecord, Metrics, PersonRecord, compute_metrics

if TYPE_CHECKING:
    from personas.faces import FaceBackend

    from eval.clip_score import ClipScorer

__all__ = [
    "IMAGE_SUFFIXES",
    "Render",
    "RenderPerson",
    "Reference",
    "PersonaSummary",
    "Scores",
    "load_render",
    "list_images",
    "read_prompts",
    "default_prompts",
    "fill_prompt",
    "subject_phrase",
    "clip_text_for",
    "load_personas",
    "reference_embedding",
    "score_renders",
    "score_images",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what personas.photos.open_photo decodes
PLACEHOLDER = "{person}"
# A face may stand for a person when its centre lies in the person's box, or in the head
# box grown by this fraction of its size on every side: generated heads drift from the
# skeleton's head by a fraction of a head, rarely more.
HEAD_MARGIN = 0.5


# ---------------------------------------------------------------------------------------
# prompts


def default_prompts() -> list[str]:
    """The default prompt set (eval/prompts.txt): clothing, actions, backgrounds.

    `{person}` stands for the subject with its article: "a <brad> man" when generating,
    "a man" when CLIP-scoring (`fill_prompt`, `subject_phrase`).
    """
    text = resources.files("eval").joinpath("prompts.txt").read_text(encoding="utf-8")
    return _prompt_lines(text)


def _prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file: one per line; blank lines and `#` comments skipped."""
    path = Path(path)
    try:
        lines = _prompt_lines(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GroupshotError(f"--prompts {path}: file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise GroupshotError(f"--prompts {path}: not a UTF-8 text file ({type(e).__name__})") from None
    if not lines:
        raise GroupshotError(f"--prompts {path}: no prompts in the file (one per line)")
    return lines


def subject_phrase(words: str) -> str:
    """'man' -> 'a man', 'old man' -> 'an old man', '<brad> man' -> 'a <brad> man'."""
    return f"{'an' if words[:1].lower() in 'aeiou' and words[:1] else 'a'} {words}"


def fill_prompt(template: str, subject: str) -> str:
    """Put `subject` (with its article) where the template says {person}."""
    return template.replace(PLACEHOLDER, subject)


def clip_text_for(prompt: str, personas: Sequence[Persona]) -> str:
    """The text CLIP scores an image against: {person} and persona tokens become class words.

    CLIP knows "a man", not "<brad>"; the course scores prompt consistency on plain words.
    """
    import compose

    if PLACEHOLDER in prompt:
        prompt = fill_prompt(prompt, " and ".join(subject_phrase(p.class_word) for p in personas) or "a person")
    return " ".join(compose.with_class_words(prompt, list(personas)).split())


# ---------------------------------------------------------------------------------------
# inputs: render folders, image folders, personas


@dataclass
class RenderPerson:
    name: str
    box: tuple[float, float, float, float] | None  # the person's region, pixels of `size`
    head_box: tuple[float, float, float, float] | None
    prompt: str | None = None


@dataclass
class Render:
    """A render folder as eval reads it (render.json schema_version 1)."""

    path: Path
    data: dict[str, Any] = field(repr=False)
    people: list[RenderPerson]
    images: list[Path]
    clip_text: str | None
    size: tuple[int, int] | None  # (width, height) the boxes are in

    def summary(self) -> dict[str, Any]:
        req = self.data.get("request") or {}
        keep = ("method", "pose", "prompt", "negative_prompt", "size", "steps", "guidance",
                "controlnet_scale", "seed", "num_images", "scheduler")
        return {
            "kind": "render",
            "path": str(self.path),
            "people": [p.name for p in self.people],
            "images": len(self.images),
            "clip_text": self.clip_text,
            "request": {k: req[k] for k in keep if k in req},
            "person_prompts": {p.name: p.prompt for p in self.people if p.prompt},
            "base_model": self.data.get("base_model"),
            "controlnet": self.data.get("controlnet"),
            "toolkit_version": self.data.get("toolkit_version"),
            "created_at": self.data.get("created_at"),
            "device": self.data.get("device"),
            "dtype": self.data.get("dtype"),
            "timing": self.data.get("timing"),
        }


def _box(value: Any, what: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        raise GroupshotError(f"{what}: expected [x0, y0, x1, y1] numbers, got {value!r}; the file is damaged")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def load_render(folder: str | os.PathLike) -> Render:
    """Read and check a render folder's render.json (no images decoded, no model loaded)."""
    import compose

    folder = Path(folder)
    source = folder / compose.RENDER_FILE
    if not folder.is_dir():
        raise GroupshotError(f"render folder {folder} not found; give a folder written by `compose`")
    if not source.is_file():
        raise GroupshotError(
            f"{folder} has no {compose.RENDER_FILE}: not a compose render folder; "
            "for a plain folder of images use `evaluate --images DIR --people NAME`"
        )
    data = compose.read_render(source)  # schema version, required and unknown keys

    people_data = data["people"]
    if not isinstance(people_data, list) or not people_data:
        raise GroupshotError(f"{source}: 'people' must be a non-empty list")
    people = []
    for i, p in enumerate(people_data):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise GroupshotError(f"{source}: people[{i}] has no 'name'")
        people.append(RenderPerson(
            name=p["name"],
            box=_box(p.get("box"), f"{source}: people[{i}].box"),
            head_box=_box(p.get("head_box"), f"{source}: people[{i}].head_box"),
            prompt=p.get("prompt"),
        ))
    names = [p.name for p in people]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise GroupshotError(f"{source}: lists {', '.join(twice)} more than once; eval keys people by name")

    images_data = data["images"]
    if not isinstance(images_data, list):
        raise GroupshotError(f"{source}: 'images' must be a list")
    images = []
    for i, im in enumerate(images_data):
        rel = im.get("file") if isinstance(im, dict) else None
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise GroupshotError(f"{source}: images[{i}].file {rel!r} must be a file name inside the folder")
        images.append(folder / rel)
    if not images:
        raise GroupshotError(f"{source}: lists no images; nothing to evaluate")

    req = data.get("request") if isinstance(data.get("request"), dict) else {}
    size = req.get("size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise GroupshotError(f"{source}: request.size {size!r} must be [width, height] in pixels; the file is damaged")
        size = (size[0], size[1])
    clip_text = data.get("global_prompt_for_clip") or req.get("prompt")
    if clip_text is not None and not isinstance(clip_text, str):
        raise GroupshotError(f"{source}: global_prompt_for_clip {clip_text!r} must be text; the file is damaged")
    return Render(path=folder, data=data, people=people, images=images, clip_text=clip_text, size=size)


def list_images(folder: str | os.PathLike, *, arg: str = "--images") -> list[Path]:
    """Image files (by suffix) directly inside `folder`, sorted by name; hidden files skipped.

    arg: the option the folder came from, for error messages.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GroupshotError(f"{arg} {folder}: folder not found")
    files = sorted(
        p for p in folder.iterdir()  # broken symlinks too: the readability check names them
        if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise GroupshotError(f"{arg} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return files


def load_personas(library: Library | str | os.PathLike | None, names: Iterable[str]) -> dict[str, Persona]:
    """Load every named persona (their refs/ are what faces are compared with)."""
    lib = _as_library(library)
    out = {}
    for name in dict.fromkeys(names):
        # verify=False: eval reads only refs/, so a persona whose adapter file moved still scores
        persona = lib.load(name, verify=False)
        if not persona.photos:
            if "imported" in persona.extra:  # `personas import` without --refs: adapters, no photos
                raise GroupshotError(
                    f"persona {name!r} was imported without reference photos, so its faces cannot be scored; "
                    f"remove it (`personas remove {name}`) and import it again with photos of the person (--refs PHOTOS)"
                )
            raise GroupshotError(f"persona {name!r} has no reference photos (refs/); re-train it")
        out[name] = persona
    return out


@dataclass
class PersonaSummary:
    """What the report's data section says about a persona."""

    name: str
    class_word: str
    tokens: list[str]
    method: str
    base_model: dict[str, Any]
    hyperparameters: dict[str, Any]
    created_at: str
    photos_used: list[str]  # refs/ files (their source names where known)
    photos_rejected: list[dict[str, str]]  # [{"file", "reason"}] from train/photos.json
    loss_csv: str | None  # people/<name>/train/loss.csv when present
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, persona: Persona) -> "PersonaSummary":
        folder = persona.path
        rejected: list[dict[str, str]] = []
        photos_json = folder / "train" / "photos.json" if folder else None
        if photos_json is not None and photos_json.is_file():
            try:
                record = json.loads(photos_json.read_text(encoding="utf-8"))
                rejected = [
                    {"file": Path(str(r.get("file", ""))).name, "reason": str(r.get("reason", ""))}
                    for r in record.get("rejected", []) if isinstance(r, dict)
                ]
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                log.warning("%s: unreadable (%s); the report lists no rejected photos", photos_json, e)
        loss = folder / "train" / "loss.csv" if folder else None
        return cls(
            name=persona.name,
            class_word=persona.class_word,
            tokens=list(persona.tokens),
            method=persona.method,
            base_model=dict(persona.base_model),
            hyperparameters=dict(persona.hyperparameters),
            created_at=persona.created_at,
            photos_used=[str(p.get("source") or p.get("file")) for p in persona.photos],
            photos_rejected=rejected,
            loss_csv=str(loss) if loss is not None and loss.is_file() else None,
            extra=dict(persona.extra),
        )

    def losses(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(steps, loss) from loss.csv, or None when absent or unreadable."""
        if self.loss_csv is None:
            return None
        try:
            with open(self.loss_csv, newline="", encoding="utf-8") as f:
                rows = [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
        except (OSError, KeyError, ValueError, TypeError) as e:
            log.warning("%s: unreadable (%s); no loss curve for %s", self.loss_csv, e, self.name)
            return None
        if not rows:
            return None
        arr = np.array(rows, dtype=np.float64)
        return arr[:, 0], arr[:, 1]


# ---------------------------------------------------------------------------------------
# references


@dataclass
class Reference:
    """A persona's identity reference for one face backend."""

    name: str
    embedding: np.ndarray = field(repr=False)  # (D,) unit norm
    refs: list[str]  # ref files, persona order
    with_face: list[bool]  # whether a face was found in each
    crop: str | None  # the first ref with a face: shown next to matched faces
    from_cache: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"refs": self.refs, "with_face": self.with_face, "crop": self.crop, "from_cache": self.from_cache,
                "refs_used": int(sum(self.with_face))}


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > 0 else v.astype(np.float32)


def reference_embedding(persona: Persona, backend: FaceBackend, *, cache_dir: Path | None = None) -> Reference:
    """The mean of the unit embeddings of the largest face in each ref photo, renormalised.

    Cached on disk under `cache_dir`, keyed by the refs' sha256s and the backend's
    describe() (model, weights, detector settings): a changed photo or model misses.
    """
    from personas.photos import open_photo

    paths = persona.ref_paths
    for p in paths:
        if not p.is_file():
            raise GroupshotError(f"persona {persona.name!r}: reference photo {p} is missing; re-train the persona")
    key_src = json.dumps({"backend": backend.describe(), "refs": [sha256_file(p) for p in paths]}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache_file = None if cache_dir is None else cache_dir / f"{persona.name}.{backend.name}.{key}.npz"
    rels = [str(p.relative_to(persona.path)) if persona.path else p.name for p in paths]
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                emb, with_face = z["embeddings"], z["with_face"].astype(bool).tolist()
            if len(with_face) == len(paths):
                return _reference(persona.name, emb, with_face, paths, rels, from_cache=True)
        except (OSError, KeyError, ValueError) as e:
            log.warning("reference cache %s unreadable (%s); recomputing", cache_file, e)

    embeddings, with_face = [], []
    for p in paths:
        faces = backend.detect(np.asarray(open_photo(p)))
        with_face.append(bool(faces))
        if faces:
            embeddings.append(faces[0].embedding)  # largest first: the person the crop is about
        else:
            log.warning("persona %s: no face found in reference %s (%s); left out", persona.name, p.name, backend.name)
    if not embeddings:
        raise GroupshotError(
            f"persona {persona.name!r}: the {backend.name} face model finds no face in any of its "
            f"{len(paths)} reference photos; re-train it with clearer photos or try another --face-model"
        )
    emb = np.stack(embeddings).astype(np.float32)
    if cache_file is not None:
        _save_cache(cache_file, emb, with_face, persona.name, backend.name)
    return _reference(persona.name, emb, with_face, paths, rels, from_cache=False)


def _reference(name, emb, with_face, paths, rels, *, from_cache: bool) -> Reference:
    mean = _unit(np.mean([_unit(e) for e in emb], axis=0))
    first = next(i for i, ok in enumerate(with_face) if ok)
    return Reference(name=name, embedding=mean, refs=rels, with_face=with_face, crop=str(paths[first]),
                     from_cache=from_cache)


def _save_cache(cache_file: Path, emb: np.ndarray, with_face: list[bool], name: str, backend: str) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp-{uuid.uuid4().hex[:8]}.npz")
        np.savez(tmp, embeddings=emb, with_face=np.array(with_face))
        os.replace(tmp, cache_file)
        # Earlier entries of this persona and backend are stale now (other refs or model).
        for old in cache_file.parent.glob(f"{name}.{backend}.*.npz"):
            if old != cache_file:
                old.unlink(missing_ok=True)
    except OSError as e:  # a read-only library still scores, it just recomputes next time
        log.warning("could not cache reference embeddings in %s (%s)", cache_file.parent, e)


# ---------------------------------------------------------------------------------------
# scoring


@dataclass
class Scores:
    """Everything one evaluation measured; report.py turns it into files."""

    images: list[ImageRecord]
    people: list[PersonRecord]
    faces: list[FaceRecord]
    metrics: Metrics
    face_backend: dict[str, Any]
    clip: dict[str, Any] | None
    sources: list[dict[str, Any]]
    personas: dict[str, PersonaSummary]
    references: dict[str, Reference]
    timing: dict[str, Any]
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())

    def image(self, key: str) -> ImageRecord:
        return next(im for im in self.images if im.key == key)

    def to_json(self) -> dict[str, Any]:
        def face_row(f: FaceRecord) -> dict[str, Any]:
            return {**asdict(f), "size_bucket": f.size_bucket, "distance": f.distance, "nearest": f.nearest}

        def person_row(p: PersonRecord) -> dict[str, Any]:
            return {**asdict(p), "missing": p.missing, "cosine": p.cosine}

        return {
            "created_at": self.created_at,
            "face_backend": self.face_backend,
            "clip": self.clip,
            "sources": self.sources,
            "personas": {n: asdict(s) for n, s in self.personas.items()},
            "references": {n: r.to_json() for n, r in self.references.items()},
            "metrics": self.metrics.to_json(),
            "timing": self.timing,
            "images": [asdict(im) for im in self.images],
            "people": [person_row(p) for p in self.people],
            "faces": [face_row(f) for f in self.faces],
        }


@dataclass
class _Job:
    """One image to score: where it is and what it should show."""

    key: str
    path: Path
    source: str
    people: list[str]
    clip_text: str | None
    regions: list[RenderPerson] | None = None
    size: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------
# the face stage: decode + detect + embed, in this process or in a pool of worker processes


@dataclass
class _Found:
    """What the face stage returns for one image."""

    status: str | None  # None, or why the image could not be read
    size: tuple[int, int] | None = None  # (width, height)
    faces: list = field(default_factory=list)  # personas.faces.Face, largest first
    pixels: np.ndarray | None = None  # (H, W, 3) uint8, when CLIP needs the image


def _decode(path: Path) -> _Found:
    from personas.photos import open_photo

    try:
        pil = open_photo(path)
    except (GroupshotError, OSError) as e:
        return _Found(status=f"unreadable: {' '.join(str(e).split())}")
    return _Found(status=None, size=pil.size, pixels=np.asarray(pil))


def _find_faces(path: Path, backend: FaceBackend, keep_pixels: bool) -> _Found:
    found = _decode(path)
    if found.status is None:
        found.faces = backend.detect(found.pixels)
        if not keep_pixels:
            found.pixels = None
    return found


_worker_backend: Any = None


def _worker_init(recipe: tuple[type, dict]) -> None:
    global _worker_backend
    cls, kwargs = recipe
    _worker_backend = cls(**kwargs)


def _worker_find(item: tuple[str, bool]) -> _Found:
    return _find_faces(Path(item[0]), _worker_backend, item[1])


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_workers(workers: int | None) -> None:
    """--workers: None (choose) or 1 or more."""
    if workers is not None and workers < 1:
        raise GroupshotError(f"--workers {workers}: give 1 or more face worker processes (1: no pool)")


def face_workers_for(backend: FaceBackend, n_images: int, workers: int | None = None, *, reserve: int = 0) -> int:
    """How many worker processes the face stage uses (1: this process, no pool).

    workers=None picks: one per usable CPU core (of this process's share of them under
    `accelerate launch`), no more than one per IMAGES_PER_WORKER
    images (a worker costs about a second to start and load its face model); 1 for a backend
    that runs on the GPU (one session serves the card) or that cannot be rebuilt in a
    worker (no `recipe()`). reserve: cores left to this process (1 while it runs CLIP).
    """
    if workers is not None:
        check_workers(workers)
        if workers > 1 and not hasattr(backend, "recipe"):
            raise GroupshotError(f"face backend {backend.name!r} has no recipe() to rebuild it in a worker "
                                 "process; score with workers=1")
        return workers
    if not hasattr(backend, "recipe") or getattr(backend, "on_gpu", False):
        return 1
    cores = usable_cpus() // num_processes()  # under `accelerate launch` the processes share the cores
    return max(1, min(cores - reserve, n_images // IMAGES_PER_WORKER))


IMAGES_PER_WORKER = 8


def _faces_in_order(jobs: Sequence[_Job], backend: FaceBackend, workers: int,
                    keep_pixels: bool) -> Iterable[_Found]:
    """_Found for every job, in job order. With workers > 1 a pool of spawned processes
    (each with its own copy of the backend) works ahead of the caller, at most
    4 x workers images in flight so decoded pixels never pile up in memory."""
    if workers <= 1 and getattr(backend, "on_gpu", False) and hasattr(backend, "detect_many"):
        yield from _faces_batched(jobs, backend, keep_pixels)
        return
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _find_faces(job.path, backend, keep_pixels)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    cls, kwargs = backend.recipe()  # type: ignore[attr-defined]
    if "threads" in kwargs:
        kwargs["threads"] = 1  # onnxruntime: one thread per worker, the pool is the parallelism
    # spawn, not fork: the parent may hold CUDA (CLIP) and OpenMP threads, which fork breaks.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=((cls, kwargs),))
    try:
        for job, future in _ahead(pool, _worker_find, jobs, lambda j: (str(j.path), keep_pixels), 4 * workers):
            try:
                found = future.result()
            except BrokenProcessPool:
                raise GroupshotError(
                    f"a face worker process died (out of memory, or the face model crashed) at or before {job.path}; "
                    "score again with --workers 1 to see the error in this process") from None
            yield found
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ahead(pool, fn: Callable, jobs: Sequence[_Job], args: Callable[[_Job], Any], window: int) -> Iterator[tuple[_Job, Any]]:
    """(job, future of fn(args(job))) in job order, with `window` jobs submitted to `pool`
    ahead of the caller; the next job is submitted when the caller comes back for more."""
    import collections

    pending: collections.deque = collections.deque()  # (job, future), oldest first
    items = iter(jobs)

    def submit() -> None:
        job = next(items, None)
        if job is not None:
            pending.append((job, pool.submit(fn, args(job))))

    for _ in range(window):
        submit()
    while pending:
        yield pending.popleft()
        submit()


def _faces_batched(jobs: Sequence[_Job], backend: FaceBackend, keep_pixels: bool) -> Iterable[_Found]:
    """The GPU face stage: threads decode images ahead (PIL and zlib let go of the GIL) while
    this thread runs the backend on a batch of them at a time (`detect_many`)."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    batch = int(getattr(backend, "batch_size", 16))
    with ThreadPoolExecutor(max_workers=max(1, min(8, usable_cpus() - 1))) as pool:
        decoded = (future.result() for _, future in _ahead(pool, _decode, jobs, lambda j: j.path, 3 * batch))
        while group := list(itertools.islice(decoded, batch)):
            readable = [f for f in group if f.status is None]
            if readable:
                for found, faces in zip(readable, backend.detect_many([f.pixels for f in readable])):  # type: ignore[attr-defined]
                    found.faces = faces
            for found in group:
                if not keep_pixels:
                    found.pixels = None
                yield found


def _allowed(faces, regions: list[RenderPerson], width: int, height: int, size: tuple[int, int] | None) -> np.ndarray:
    """(F, P) bool: may face f stand for person p, given where the render put p."""
    sx, sy = (width / size[0], height / size[1]) if size else (1.0, 1.0)
    allowed = np.zeros((len(faces), len(regions)), dtype=bool)
    for i, face in enumerate(faces):
        cx, cy = (face.box[0] + face.box[2]) / 2 / sx, (face.box[1] + face.box[3]) / 2 / sy
        for j, r in enumerate(regions):
            if r.box is None and r.head_box is None:
                allowed[i, j] = True  # no region given: anywhere
                continue
            inside = False
            if r.box is not None:
                x0, y0, x1, y1 = r.box
                inside = x0 <= cx <= x1 and y0 <= cy <= y1
            if not inside and r.head_box is not None:
                x0, y0, x1, y1 = r.head_box
                mx, my = HEAD_MARGIN * (x1 - x0), HEAD_MARGIN * (y1 - y0)
                inside = x0 - mx <= cx <= x1 + mx and y0 - my <= cy <= y1 + my
            allowed[i, j] = inside
    return allowed


def _score_faces(job: _Job, faces: list, width: int, height: int, match_threshold: float,
                 refs: dict[str, Reference], record: ImageRecord) -> tuple[list[PersonRecord], list[FaceRecord]]:
    names = job.people
    ref_emb = np.stack([refs[n].embedding for n in names])  # (P, D)
    face_emb = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, ref_emb.shape[1]), np.float32)
    dist = np.linalg.norm(face_emb[:, None, :].astype(np.float64) - ref_emb[None].astype(np.float64), axis=-1)
    allowed = None if job.regions is None else _allowed(faces, job.regions, width, height, job.size)
    chosen = assign_faces(face_emb, ref_emb, allowed)

    face_rows = [
        FaceRecord(
            image=job.key, index=i, box=[round(float(v), 1) for v in f.box], det_score=round(float(f.score), 4),
            width_fraction=(f.box[2] - f.box[0]) / width,
            distances={n: float(dist[i, j]) for j, n in enumerate(names)},
        )
        for i, f in enumerate(faces)
    ]
    person_rows = []
    for j, (name, fi) in enumerate(zip(names, chosen)):
        row = PersonRecord(image=job.key, person=name, face=fi)
        if fi is not None:
            face = face_rows[fi]
            face.person = name
            row.distance = float(dist[fi, j])
            row.width_fraction = face.width_fraction
            row.match = row.distance <= match_threshold
            # nearer another subject of this image than its own: the adapters crossed
            row.swap = face.swap = any(dist[fi, k] < dist[fi, j] for k in range(len(names)) if k != j)
        person_rows.append(row)

    record.n_faces = len(faces)
    record.missing = [p.person for p in person_rows if p.missing]
    record.extra_faces = sum(f.person is None for f in face_rows)
    record.swaps = sum(p.swap for p in person_rows)
    record.faceless = not faces or not all(p.match for p in person_rows)
    return person_rows, face_rows


@contextlib.contextmanager
def _one_torch_thread(active: bool):
    """While face workers hold every other core, this process's torch (CLIP) runs one thread:
    idle OpenMP threads spin and take the workers' cores."""
    if not active:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score_all(share: list[_Job], found_all: Iterable[_Found], refs: dict[str, Reference], face_backend: FaceBackend,
               clip: ClipScorer | None, images: list[ImageRecord], people: list[PersonRecord],
               faces: list[FaceRecord]) -> None:
    pending: list[tuple[ImageRecord, Any]] = []  # CLIP runs in batches

    def flush() -> None:
        if pending and clip is not None:
            scores = clip.score([im for _, im in pending], [r.clip_text for r, _ in pending])
            for (r, _), s in zip(pending, scores):
                r.clip_score = float(s)
        pending.clear()

    for job, found in zip(share, found_all):
        record = ImageRecord(key=job.key, path=str(job.path), source=job.source, people=list(job.people),
                             clip_text=job.clip_text)
        images.append(record)
        if found.status is not None:
            record.status = found.status
            log.warning("%s: %s", job.path, record.status)
            continue
        record.width, record.height = found.size
        p_rows, f_rows = _score_faces(job, found.faces, found.size[0], found.size[1],
                                      face_backend.match_threshold, refs, record)
        people += p_rows
        faces += f_rows
        if clip is not None and job.clip_text:
            from PIL import Image

            pending.append((record, Image.fromarray(found.pixels)))
            if len(pending) >= clip.batch_size:
                flush()
    flush()


def _run(jobs: list[_Job], personas: dict[str, Persona], *, library: Library, face_backend: FaceBackend,
         clip: ClipScorer | None, sources: list[dict[str, Any]], workers: int | None) -> Scores:
    t0 = time.perf_counter()
    cache_dir = library.root / ".cache" / "eval-refs"
    refs = {n: reference_embedding(p, face_backend, cache_dir=cache_dir) for n, p in personas.items()}
    t_refs = time.perf_counter() - t0

    images: list[ImageRecord] = []
    people: list[PersonRecord] = []
    faces: list[FaceRecord] = []
    t1 = time.perf_counter()
    # Under `accelerate launch` each process scores its share of the images; every process
    # gets all records back, in job order (only the main process writes the report).
    share = list(my_share(jobs))
    workers = face_workers_for(face_backend, len(share), workers, reserve=int(clip is not None))
    found_all = _faces_in_order(share, face_backend, workers, keep_pixels=clip is not None)
    with _one_torch_thread(workers > 1 and clip is not None):
        _score_all(share, found_all, refs, face_backend, clip, images, people, faces)
    images, people, faces = gather_items(images), gather_items(people), gather_items(faces)
    seconds = time.perf_counter() - t1
    readable = sum(im.ok for im in images)
    metrics = compute_metrics(images, people, faces, match_threshold=face_backend.match_threshold)
    timing = {
        "reference_seconds": round(t_refs, 3),
        "scoring_seconds": round(seconds, 3),
        "images_scored": readable,
        "images_per_second": round(readable / seconds, 3) if seconds > 0 and readable else None,
        "processes": num_processes(),
        "face_workers": workers,
    }
    log.info("scored %d images in %.1f s (%.2f images/s)", readable, seconds, readable / max(seconds, 1e-9))
    return Scores(
        images=images, people=people, faces=faces, metrics=metrics,
        face_backend=face_backend.describe(), clip=None if clip is None else clip.describe(),
        sources=sources, personas={n: PersonaSummary.of(p) for n, p in personas.items()},
        references=refs, timing=timing,
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Short labels for source folders: the folder name, made unique with its parent."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _as_library(library: Library | str | os.PathLike | None) -> Library:
    return library if isinstance(library, Library) else Library(library)


def score_renders(
    render_dirs: Sequence[str | os.PathLike | Render],
    *,
    library: Library | str | os.PathLike | None = None,
    face_backend: FaceBackend,
    clip: ClipScorer | None,
    workers: int | None = None,
) -> Scores:
    """Score compose render folders: faces assigned within each person's region, CLIP against
    the render's global_prompt_for_clip. Unreadable images get a status, not an exception.

    workers: face worker processes (None: one per CPU core for large sets; 1: no pool);
    the scores do not depend on it."""
    lib = _as_library(library)
    renders = [r if isinstance(r, Render) else load_render(r) for r in render_dirs]
    if not renders:
        raise GroupshotError("no render folders given")
    personas = load_personas(lib, [p.name for r in renders for p in r.people])
    jobs = []
    for label, render in zip(_unique_names([r.path for r in renders]), renders):
        _warn_retrained(render, personas)
        names = [p.name for p in render.people]
        text = None if render.clip_text is None else clip_text_for(render.clip_text, [personas[n] for n in names])
        jobs += [_Job(key=f"{label}/{p.name}", path=p, source=str(render.path), people=names, clip_text=text,
                      regions=render.people, size=render.size) for p in render.images]
    return _run(jobs, personas, library=lib, face_backend=face_backend, clip=clip,
                sources=[r.summary() for r in renders], workers=workers)


def _warn_retrained(render: Render, personas: dict[str, Persona]) -> None:
    for p in render.data["people"]:
        had, now = p.get("adapter_sha256"), personas[p["name"]].adapter_sha256
        if had and now and had != now:
            log.warning("%s: persona %s was re-trained after this render; faces are compared with its current refs",
                        render.path, p["name"])


def score_images(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    people: Sequence[str],
    prompts: Sequence[str] | str | os.PathLike | None = None,
    *,
    library: Library | str | os.PathLike | None = None,
    face_backend: FaceBackend,
    clip: ClipScorer | None,
    workers: int | None = None,
) -> Scores:
    """Score a folder (or a list) of images against `people`; no regions, so any face may be anyone.

    prompts: one per image (matched to the images sorted by name), one for all, a prompts
    file, or None (no CLIP score). workers: as for `score_renders`.
    """
    if not people:
        raise GroupshotError("--people: name at least one persona the images should show")
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        files = list_images(folder)
    else:
        files = [Path(f) for f in images]
        if not files:
            raise GroupshotError("no images given")
        folder = files[0].parent
    lib = _as_library(library)
    personas = load_personas(lib, people)
    texts = _prompts_for(files, prompts, [personas[n] for n in people])
    label = folder.name or str(folder)
    jobs = [_Job(key=f"{label}/{f.name}", path=f, source=str(folder), people=list(people), clip_text=t)
            for f, t in zip(files, texts)]
    source = {"kind": "images", "path": str(folder), "people": list(people), "images": len(files),
              "prompts": sorted(set(t for t in texts if t))[:50]}
    return _run(jobs, personas, library=lib, face_backend=face_backend, clip=clip, sources=[source],
                workers=workers)


def _prompts_for(files: list[Path], prompts, personas: list[Persona]) -> list[str | None]:
    if prompts is None:
        return [None] * len(files)
    if isinstance(prompts, os.PathLike):
        prompts = read_prompts(prompts)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(files)
    if len(prompts) != len(files):
        raise GroupshotError(
            f"{len(prompts)} prompts for {len(files)} images: give one prompt per image (matched to the "
            "images sorted by name) or a single prompt for all"
        )
    return [clip_text_for(p, personas) for p in prompts]
