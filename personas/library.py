"""The persona library: a folder of persona folders, read and written atomically.

A persona folder holds persona.json (schema v1), the LoRA adapter and/or the learned token
embeddings (safetensors only), the cropped reference photos and the training record.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from personas.errors import GroupshotError
from personas.version import TOOLKIT_VERSION

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PERSONA_FILE = "persona.json"
ADAPTER_FILE = "adapter_model.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
DEFAULT_LIBRARY = "people"
METHODS = ("lora", "ti", "pivotal")

# Letters, digits, '_' and '-', starting with a letter or digit: safe as a folder name on
# every OS and as an adapter name inside diffusers/peft (which uses it as a module key).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid persona name, else raise a one-line error."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise GroupshotError(
            f"invalid persona name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit (no spaces, dots or path separators)"
        )
    return name


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class Persona:
    """persona.json, schema v1. `path` is where it was read from (not stored)."""

    name: str
    tokens: list[str]  # learned tokens, e.g. ["<brad>", "<brad>_1"]; [] for plain lora
    class_word: str  # "man", "woman", "person", ...
    base_model: dict[str, Any]  # {"id": ..., "revision": ... or None, "sha256": ... or None}
    method: str  # lora | ti | pivotal
    hyperparameters: dict[str, Any]
    photos: list[dict[str, Any]]  # [{"file": "refs/000.jpg", "source": name, "sha256": ...}]
    adapter_sha256: str | None  # sha256 of adapter_model.safetensors, None for ti
    embeddings_sha256: str | None  # sha256 of embeddings.safetensors, None for lora
    created_at: str
    toolkit_version: str = TOOLKIT_VERSION
    schema_version: int = SCHEMA_VERSION
    trigger: str = ""  # the words a prompt uses for this person, e.g. "<brad_0> <brad_1> man"
    extra: dict[str, Any] = field(default_factory=dict)  # training summary: steps, loss, time
    path: Path | None = field(default=None, compare=False)

    REQUIRED = (
        "schema_version", "toolkit_version", "name", "tokens", "class_word", "base_model",
        "method", "hyperparameters", "photos", "adapter_sha256", "embeddings_sha256",
        "created_at",
    )

    # -- files ----------------------------------------------------------------------------
    @property
    def adapter_path(self) -> Path | None:
        return None if self.adapter_sha256 is None else self._folder() / ADAPTER_FILE

    @property
    def embeddings_path(self) -> Path | None:
        return None if self.embeddings_sha256 is None else self._folder() / EMBEDDINGS_FILE

    @property
    def ref_paths(self) -> list[Path]:
        return [self._folder() / p["file"] for p in self.photos]

    def _folder(self) -> Path:
        if self.path is None:
            raise GroupshotError(f"persona {self.name!r} was not loaded from a folder")
        return self.path

    def prompt_words(self) -> str:
        """What stands for this person in a prompt: its tokens and class word."""
        # diffusers' maybe_convert_prompt expands the first token into all of them.
        return self.trigger or " ".join([*self.tokens[:1], self.class_word])

    # -- (de)serialisation ------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "persona.json") -> "Persona":
        if not isinstance(data, dict):
            raise GroupshotError(f"{source}: not a JSON object; re-train or restore the persona")
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise GroupshotError(
                f"{source}: missing keys {', '.join(missing)}; the file is damaged or hand-edited: "
                "re-train the persona or restore the file"
            )
        version = data["schema_version"]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise GroupshotError(
                f"{source}: schema_version {version!r} is newer than this groupshot understands "
                f"({SCHEMA_VERSION}); upgrade groupshot"
            )
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("%s: ignoring unknown keys %s (written by a newer groupshot?)", source, unknown)
        kwargs = {k: v for k, v in data.items() if k in known}
        persona = cls(**kwargs)
        persona._check(source)
        return persona

    def _check(self, source: str) -> None:
        validate_name(self.name)
        if self.method not in METHODS:
            raise GroupshotError(f"{source}: method {self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.tokens, list) or not all(isinstance(t, str) for t in self.tokens):
            raise GroupshotError(f"{source}: tokens must be a list of strings")
        if self.method in ("ti", "pivotal") and (not self.tokens or self.embeddings_sha256 is None):
            raise GroupshotError(f"{source}: method {self.method} needs tokens and embeddings_sha256")
        if self.method in ("lora", "pivotal") and self.adapter_sha256 is None:
            raise GroupshotError(f"{source}: method {self.method} needs adapter_sha256")
        if not isinstance(self.base_model, dict) or "id" not in self.base_model:
            raise GroupshotError(f"{source}: base_model must be an object with an 'id'")
        # Types of the fields the CLIs print and compose builds prompts from: a hand edit that
        # breaks one fails here, in one line, not later in a traceback.
        for key in ("class_word", "trigger", "created_at", "toolkit_version"):
            if not isinstance(getattr(self, key), str):
                raise GroupshotError(f"{source}: {key} must be text, not {getattr(self, key)!r}")
        for key in ("adapter_sha256", "embeddings_sha256"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise GroupshotError(f"{source}: {key} must be a sha256 hex string or null")
        for key in ("hyperparameters", "extra"):
            if not isinstance(getattr(self, key), dict):
                raise GroupshotError(f"{source}: {key} must be a JSON object")
        if not isinstance(self.photos, list) or not all(isinstance(p, dict) and isinstance(p.get("file"), str)
                                                        for p in self.photos):
            raise GroupshotError(f"{source}: photos must be a list of objects with a 'file' path")
        for p in self.photos:
            _inside_check(p["file"], source)

    def verify_files(self) -> None:
        """Check that every file persona.json names exists inside the folder with its sha256."""
        folder = self._folder()
        for rel, digest in ((ADAPTER_FILE, self.adapter_sha256), (EMBEDDINGS_FILE, self.embeddings_sha256)):
            if digest is None:
                continue
            f = folder / rel
            if not f.is_file():
                raise GroupshotError(f"persona {self.name!r}: {f} is missing; re-train the persona")
            actual = sha256_file(f)
            if actual != digest:
                raise GroupshotError(
                    f"persona {self.name!r}: {f.name} sha256 {actual[:12]} does not match persona.json "
                    f"({digest[:12]}); the file was changed: re-train or restore it"
                )


def _inside_check(rel: str, source: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise GroupshotError(f"{source}: photo path {rel!r} points outside the persona folder")


class Library:
    """A folder of personas: `people/<name>/persona.json`."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get("GROUPSHOT_LIBRARY") or DEFAULT_LIBRARY)

    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / PERSONA_FILE).is_file()
        )

    def exists(self, name: str) -> bool:
        return (self.path(name) / PERSONA_FILE).is_file()

    def load(self, name: str, *, verify: bool = True) -> Persona:
        folder = self.path(name)
        pj = folder / PERSONA_FILE
        if not pj.is_file():
            have = ", ".join(self.names()) or "none"
            raise GroupshotError(
                f"unknown persona {name!r} in library {self.root} (have: {have}); "
                f"train it with `personas train {name} PHOTOS...` or pass --library"
            )
        if folder.is_symlink() or not folder.resolve().is_relative_to(self.root.resolve()):
            raise GroupshotError(f"persona folder {folder} points outside the library {self.root}")
        try:
            data = json.loads(pj.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GroupshotError(f"{pj}: not valid JSON ({e}); re-train or restore the persona") from None
        persona = Persona.from_json(data, source=str(pj))
        if persona.name != name:
            raise GroupshotError(f"{pj}: names persona {persona.name!r} but lives in folder {name!r}")
        persona.path = folder
        if verify:
            persona.verify_files()
        return persona

    def remove(self, name: str) -> Path:
        folder = self.path(name)
        if not self.exists(name):
            raise GroupshotError(f"unknown persona {name!r} in library {self.root}; `personas list` shows them")
        trash = folder.with_name(f".{name}.removing-{uuid.uuid4().hex[:8]}")
        os.replace(folder, trash)  # atomic: the persona disappears at once, never half-deleted
        shutil.rmtree(trash, ignore_errors=True)
        return folder

    def staging(self, name: str) -> Path:
        """A fresh sibling folder to build a persona in before `commit`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{validate_name(name)}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def commit(self, name: str, staged: Path, persona: Persona) -> Persona:
        """Write persona.json into `staged` and swap it in for `name` atomically.

        The old folder (if any) is moved aside by one rename and the new one moved in by
        another; a crash between the two leaves the old folder under `.NAME.old-*`, which
        `recover()` restores. The old one is deleted only after the new one is in place.
        """
        persona.name = name
        write_json_atomic(staged / PERSONA_FILE, persona.to_json())
        _fsync_dir(staged)
        final = self.path(name)
        replace_dir(staged, final)
        persona.path = final
        return persona

    def recover(self) -> None:
        """Restore personas left aside by a crash between the two renames of `commit`."""
        if not self.root.is_dir():
            return
        for p in self.root.glob(".*.old-*"):
            name = p.name[1:].split(".old-")[0]
            if not (self.root / name).exists() and (p / PERSONA_FILE).is_file():
                os.replace(p, self.root / name)
                log.warning("restored persona %s from an interrupted save", name)

    def discard_staging(self, name: str) -> None:
        """Delete `.NAME.tmp-*` folders that a killed writer of `name` left; call it holding `lock(name)`."""
        if self.root.is_dir():
            for p in self.root.glob(f".{validate_name(name)}.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed %s, left by an interrupted save of %s", p.name, name)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock on training `name`: a second trainer refuses instead of both writing."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / f".{validate_name(name)}.lock"
        import fcntl

        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GroupshotError(
                    f"persona {name!r} is being trained by another process (lock {lock_path}); "
                    "wait for it to finish or stop it"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)


def replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Swap folder `staged` in for `final` with two renames; the old one goes last.

    A crash between the renames leaves the old folder beside as `.NAME.old-*` (which
    `Library.recover` restores for personas); readers never see a half-written folder.
    """
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def json_default(o: Any) -> Any:
    """json.dump default for Paths and dataclasses in records."""
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


BuildFn = Callable[[Path], Persona]
