"""The bad-input catalogue: every command fed every kind of bad input answers with exit code 2
and one line naming the file or argument and the problem (`personas check`: a status line
per file), never a traceback, and changes nothing on disk. No file runs code.

Each case is one test id: `<command>-<input>`. tests/README.md lists the catalogue.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import compose.cli
import eval.cli
import personas.cli
from personas.library import sha256_file

MAINS = {"personas": personas.cli.main, "compose": compose.cli.main, "evaluate": eval.cli.main}


# -- helpers ---------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: folders, symlinks (target) and files (sha256)."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.name.endswith(".lock"):  # a lock file holds its holder's pid: only its presence counts
                out[rel] = ("lock",)
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run_main(command: str, argv: list, capsys) -> tuple[int, str, str]:
    """Run a CLI in-process; any exception other than SystemExit is a crash and fails the test."""
    capsys.readouterr()
    if command == "compose" and "--replay" not in argv:
        # A case that slips through renders one small step, not 30 at 512 px (its own flags win).
        argv = ["--size", "64x64", "--steps", "1", *argv]
    try:
        code = MAINS[command]([os.fspath(a) if isinstance(a, Path) else str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit: usage + message, not our one line
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(prog: str, code: int, err: str) -> str:
    """The one `prog: error: ...` line of a refused command (exit 2, nothing else on stderr)."""
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err, err
    # Progress bars of the model loaders (transformers' "Loading weights") are not messages.
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "it/s]" not in l and "%|" not in l]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), f"expected one error line:\n{err}"
    return lines[0]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


class Marker:
    """A pickle whose loading creates `path`: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": Marker(marker)})


# -- the world every case starts from ---------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model, astronaut) -> Path:
    """people/ann: a persona of the tiny model with random adapters and one reference photo."""
    from personas.library import Library, write_json_atomic
    from personas.testing import make_random_persona

    root = tmp_path_factory.mktemp("template")
    lib = Library(root / "people")
    persona = make_random_persona(lib, "ann", tiny_model, seed=1)
    (persona.path / "refs").mkdir()
    Image.fromarray(astronaut).crop((100, 0, 356, 256)).save(persona.path / "refs" / "000.jpg", quality=95)
    record = json.loads((persona.path / "persona.json").read_text())
    record["photos"] = [{"file": "refs/000.jpg", "source": "a.png", "sha256": "0" * 64}]
    record["class_word"] = "woman"
    write_json_atomic(persona.path / "persona.json", record)
    return root / "people"


@pytest.fixture(scope="module")
def good_photo_bytes(astronaut) -> bytes:
    return encoded(Image.fromarray(astronaut), "JPEG", quality=92)


@dataclass
class Ctx:
    ws: Path  # the workspace: cwd of the command; everything under it is snapshot
    people: Path
    inputs: Path
    outside: Path  # a folder outside the library and workspace inputs
    tiny_model: Path
    good: bytes
    astronaut: np.ndarray
    eileen: Path  # four good photos
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str | bytes, data: bytes) -> Path:
        path = self.inputs / (os.fsdecode(name) if isinstance(name, bytes) else name)
        path.write_bytes(data)
        return path

    def persona_json(self, name: str = "ann") -> dict:
        return json.loads((self.people / name / "persona.json").read_text())

    def edit_persona(self, change: Callable[[dict], None], name: str = "ann") -> None:
        data = self.persona_json(name)
        change(data)
        (self.people / name / "persona.json").write_text(json.dumps(data))

    def replace_adapter(self, tensors: dict, file: str = "adapter_model.safetensors", raw: bytes | None = None) -> None:
        """Swap in another adapter file and fix its sha256 in persona.json (a consistent hand edit)."""
        from safetensors.torch import save_file

        path = self.people / "ann" / file
        if raw is None:
            save_file(tensors, str(path))
        else:
            path.write_bytes(raw)
        key = "adapter_sha256" if file.startswith("adapter") else "embeddings_sha256"
        self.edit_persona(lambda d: d.update({key: sha256_file(path)}))

    def models(self) -> list:
        return ["--base-model", self.tiny_model, "--controlnet", self.tiny_model / "controlnet"]


@pytest.fixture
def ctx(tmp_path, template, tiny_model, good_photo_bytes, astronaut, eileen_photos, monkeypatch, dlib_backend) -> Ctx:
    ws = tmp_path / "ws"
    shutil.copytree(template, ws / "people", symlinks=True)
    (ws / "inputs").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("GROUPSHOT_LIBRARY", str(ws / "people"))
    # Photo checks use the session's dlib backend rather than loading one per case.
    import personas.faces

    monkeypatch.setattr(personas.faces, "load_face_backend", lambda *a, **k: dlib_backend)
    # A case that slips through to the training loop fails at once instead of training for minutes.
    import personas.train

    real_train = personas.train._train

    def small_train(name, config, *args, **kwargs):
        assert config.max_train_steps <= 4 and config.resolution <= 64, "a bad input reached the training loop"
        return real_train(name, config, *args, **kwargs)

    monkeypatch.setattr(personas.train, "_train", small_train)
    return Ctx(ws, ws / "people", ws / "inputs", outside, tiny_model, good_photo_bytes, astronaut, eileen_photos,
               monkeypatch)


# -- the catalogue ---------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    command: str  # personas | compose | evaluate
    build: Callable[[Ctx], list]  # sets up the inputs, returns argv
    expect: tuple[str, ...]  # regexes the error line (or check's status line) must match
    kind: str = "error"  # error | check-rejected | check-ok

    @property
    def prog(self) -> str:
        return self.command


CASES: list[Case] = []


def case(id: str, command: str, expect, kind: str = "error"):
    def register(build):
        CASES.append(Case(id, command, build, tuple([expect] if isinstance(expect, str) else expect), kind))
        return build
    return register


# ---- photos: (file name, bytes maker, reason regex); each goes to check, train and evaluate


def _animated(fmt: str) -> Callable[[Ctx], bytes]:
    def make(c: Ctx) -> bytes:
        frames = [Image.fromarray(c.astronaut).resize((128, 128)), Image.fromarray(255 - c.astronaut).resize((128, 128))]
        return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return make


BAD_PHOTOS: dict[str, tuple[str, Callable[[Ctx], bytes], str]] = {
    "zero-byte": ("empty.jpg", lambda c: b"", r"empty file"),
    "truncated-jpeg": ("cut.jpg", lambda c: c.good[: len(c.good) // 2], r"unreadable|truncated"),
    "truncated-png": ("cut.png", lambda c: encoded(Image.fromarray(c.astronaut), "PNG")[:5000], r"unreadable|truncated"),
    "text-as-jpg": ("notes.jpg", lambda c: b"dear diary, today I took no photos\n", r"not an image"),
    "html-as-png": ("page.png", lambda c: b"<!doctype html><html><body>hi</body></html>", r"not an image"),
    "heic-as-jpg": ("phone.jpg", lambda c: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
                    r"HEIC/AVIF"),
    "decompression-bomb": ("bomb.png", lambda c: bomb_png(), r"too large"),
    "animated-gif": ("anim.gif", _animated("GIF"), r"unsupported format GIF|animated"),
    "animated-webp": ("anim.webp", _animated("WEBP"), r"animated WEBP \(2 frames\)"),
}


def _photo_file(c: Ctx, key: str) -> Path:
    name, make, _ = BAD_PHOTOS[key]
    return c.file(name, make(c))


def _symlink(c: Ctx, kind: str) -> Path:
    link = c.inputs / "link.jpg"
    if kind == "to-outside":
        secret = c.outside / "secret.txt"
        secret.write_text("password=hunter2\n")
        link.symlink_to(secret)
    elif kind == "dangling":
        link.symlink_to(c.outside / "gone.jpg")
    else:
        (c.outside / "photo.jpg").write_bytes(c.good)
        link.symlink_to(c.outside / "photo.jpg")
    return link


BAD_LINKS = {"symlink-to-outside-file": ("to-outside", r"not an image"),
             "symlink-dangling": ("dangling", r"unreadable|not found|No such file")}

for _key, (_name, _make, _reason) in BAD_PHOTOS.items():
    def _check(c, key=_key):
        return ["check", _photo_file(c, key), "--face-model", "dlib"]

    def _train(c, key=_key):
        return ["train", "newbie", _photo_file(c, key), "--base-model", c.tiny_model]

    def _evaluate(c, key=_key):
        f = _photo_file(c, key)
        return ["--images", f.parent, "--people", "ann", "--prompt", "a woman", "--face-model", "dlib"]

    case(f"check-{_key}", "personas", _reason, kind="check-rejected")(_check)
    case(f"train-{_key}", "personas", (re.escape(_name), _reason))(_train)
    # evaluate lists images by suffix: an animated GIF is not one of them ("no images").
    case(f"evaluate-{_key}", "evaluate", (re.escape(_name), _reason, "--skip-unreadable")
         if _key != "animated-gif" else (r"no images",))(_evaluate)

def _linked(c: Ctx, kind: str) -> Path:
    """The inputs folder, holding one symlink of `kind`: a folder is how a stray link gets in."""
    _symlink(c, kind)
    return c.inputs


def _good_images(c: Ctx) -> Path:
    c.file("0.jpg", c.good)
    return c.inputs


for _key, (_kind, _reason) in BAD_LINKS.items():
    case(f"check-{_key}", "personas", _reason, kind="check-rejected")(
        lambda c, k=_kind: ["check", _linked(c, k), "--face-model", "dlib"])
    case(f"train-{_key}", "personas", ("link.jpg", _reason))(
        lambda c, k=_kind: ["train", "newbie", _linked(c, k), "--base-model", c.tiny_model])
    case(f"evaluate-{_key}", "evaluate", ("link.jpg", _reason))(
        lambda c, k=_kind: ["--images", _linked(c, k), "--people", "ann", "--prompt", "x", "--face-model", "dlib"])


# ---- odd but valid photos: `check` accepts each (converted to upright 8-bit RGB), one status line


def _exif_rotated(c: Ctx) -> bytes:
    im = Image.fromarray(c.astronaut).transpose(Image.Transpose.ROTATE_90)  # stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": upright again
    return encoded(im, "JPEG", quality=92, exif=exif)


def _png16(c: Ctx) -> bytes:
    grey = np.asarray(Image.fromarray(c.astronaut).convert("L"), np.uint16) * 257
    return encoded(Image.fromarray(grey), "PNG")  # mode I;16


ODD_PHOTOS: dict[str, tuple[str | bytes, Callable[[Ctx], bytes]]] = {
    "cmyk-jpeg": ("cmyk.jpg", lambda c: encoded(Image.fromarray(c.astronaut).convert("CMYK"), "JPEG", quality=92)),
    "16-bit-png": ("deep.png", _png16),
    "greyscale": ("grey.jpg", lambda c: encoded(Image.fromarray(c.astronaut).convert("L"), "JPEG", quality=92)),
    "rgba-png": ("alpha.png", lambda c: encoded(Image.fromarray(c.astronaut).convert("RGBA"), "PNG")),
    "palette-png": ("palette.png", lambda c: encoded(Image.fromarray(c.astronaut).convert("P"), "PNG")),
    "exif-rotated": ("rotated.jpg", _exif_rotated),
    "non-utf8-name": (b"caf\xe9-\xff.jpg", lambda c: c.good),
    "long-name-250-bytes": ("a" * 246 + ".jpg", lambda c: c.good),
}

for _key, (_name, _make) in ODD_PHOTOS.items():
    case(f"check-{_key}", "personas", r"face \d+ px", kind="check-ok")(
        lambda c, n=_name, m=_make: ["check", c.file(n, m(c)), "--face-model", "dlib"])
case("check-symlink-to-photo", "personas", r"face \d+ px", kind="check-ok")(
    lambda c: ["check", _symlink(c, "photo"), "--face-model", "dlib"])


@case("check-out-with-255-byte-name", "personas", r"face \d+ px", kind="check-ok")
def _(c):
    # The crop is saved as NNN-<stem>.jpg: longer than the name limit unless shortened.
    return ["check", c.file("b" * 251 + ".jpg", c.good), "--face-model", "dlib", "--out", c.ws / "crops"]


# ---- pose JSON, through compose

def _pose_person(x0: float = 100.0) -> list[float]:
    from compose.poses import template_pose

    person = template_pose("one_standing", size=(512, 512)).people[0].copy()
    person[:, 0] = np.where(person[:, 2] > 0, person[:, 0] * 0.4 + x0, 0)
    return [float(v) for v in person.reshape(-1)]


def _pose_case(id: str, content, *expect: str) -> None:
    def build(c: Ctx):
        path = c.inputs / "pose.json"
        path.write_bytes(content if isinstance(content, bytes) else
                         (content if isinstance(content, str) else json.dumps(content)).encode())
        return [*c.models(), "--people", "ann", "--prompt", "a woman", "--pose", path]
    case(f"compose-pose-{id}", "compose", ("pose.json", *expect))(build)


_one = _pose_person()
_pose_case("invalid-json", '{"people": [{"pose_keypoints_2d": [1, 2', "invalid JSON")
_pose_case("not-utf8", b'{"people": [], "name": "\xff\xfe"}', "cannot be read|UnicodeDecodeError")
_pose_case("top-level-list", [_one], '"people" list')
_pose_case("wrong-keypoint-count", {"people": [{"pose_keypoints_2d": _one[:51]}]}, "51 numbers", "54")
_pose_case("keypoints-as-strings", {"people": [{"pose_keypoints_2d": [str(v) for v in _one]}]}, "not a number")
_pose_case("nan-coordinate", '{"people": [{"pose_keypoints_2d": [NaN, ' + json.dumps(_one[1:])[1:] + "}]}",
           "NaN or infinite")
_pose_case("negative-coordinate", {"people": [{"pose_keypoints_2d": [-40.0] + _one[1:]}]}, "negative coordinate")
_pose_case("zero-people", {"people": []}, "no people")
_pose_case("twenty-people", {"people": [{"pose_keypoints_2d": _pose_person(10 + 20 * i)} for i in range(20)]},
           "20 people", "at most 8")
_pose_case("person-not-object", {"people": [[1, 2, 3]]}, "pose_keypoints_2d")
_pose_case("canvas-zero", {"canvas_width": 0, "canvas_height": 0, "people": [{"pose_keypoints_2d": _one}]},
           "canvas_width")
_pose_case("decompression-bomb-image", bomb_png(), "cannot be read|too large")  # a .json holding PNG bytes


@case("compose-pose-bomb-png", "compose", ("bomb.png", "too large|cannot be read|decompression"))
def _(c):
    return [*c.models(), "--people", "ann", "--prompt", "a woman", "--pose", c.file("bomb.png", bomb_png())]


@case("compose-pose-bomb-warning-size", "compose", ("big.png", "too large"))
def _(c):
    # Between PIL's pixel limit and twice it PIL only warns: 10000x10000 would decode 300 MB.
    return [*c.models(), "--people", "ann", "--prompt", "a woman", "--pose", c.file("big.png", bomb_png(10_000, 10_000))]


# ---- persona.json (compose loads and verifies, evaluate reads refs, `personas show` prints)

def _persona_case(id: str, change: Callable[[Ctx], None], *expect: str) -> None:
    def args(command: str) -> Callable[[Ctx], list]:
        def build(c: Ctx):
            change(c)
            if command == "compose":
                return [*c.models(), "--people", "ann", "--prompt", "a woman"]
            if command == "evaluate":
                c.file("000.jpg", c.good)
                return ["--images", c.inputs, "--people", "ann", "--prompt", "a woman", "--face-model", "dlib"]
            return ["show", "ann"]
        return build
    for command in ("compose", "evaluate", "personas"):
        case(f"{'show' if command == 'personas' else command}-persona-{id}", command, expect)(args(command))


def _symlinked_folder(c: Ctx) -> None:
    shutil.move(c.people / "ann", c.outside / "ann")
    (c.people / "ann").symlink_to(c.outside / "ann", target_is_directory=True)


_persona_case("missing-keys", lambda c: c.edit_persona(lambda d: d.pop("tokens")), "persona.json", "missing keys tokens")
_persona_case("newer-schema", lambda c: c.edit_persona(lambda d: d.update(schema_version=99)),
              "persona.json", "schema_version 99", "upgrade groupshot")
_persona_case("schema-not-a-number", lambda c: c.edit_persona(lambda d: d.update(schema_version="1")),
              "persona.json", "schema_version '1'")
_persona_case("photo-path-outside", lambda c: c.edit_persona(lambda d: d["photos"][0].update(file="../../../etc/passwd")),
              "persona.json", "outside the persona folder")
_persona_case("photo-path-absolute", lambda c: c.edit_persona(lambda d: d["photos"][0].update(file="/etc/passwd")),
              "persona.json", "outside the persona folder")
_persona_case("photos-not-objects", lambda c: c.edit_persona(lambda d: d.update(photos=["refs/000.jpg"])),
              "persona.json", "photos")
_persona_case("symlinked-folder", _symlinked_folder, "people/ann", "outside the library")
_persona_case("not-json", lambda c: (c.people / "ann" / "persona.json").write_text('{"name": "ann",'),
              "persona.json", "not valid JSON")
_persona_case("not-utf8", lambda c: (c.people / "ann" / "persona.json").write_bytes(b'{"name": "\xff"}'),
              "persona.json", "not valid JSON|UTF-8")
_persona_case("not-an-object", lambda c: (c.people / "ann" / "persona.json").write_text("[1, 2, 3]"),
              "persona.json", "not a JSON object")
_persona_case("other-name", lambda c: c.edit_persona(lambda d: d.update(name="bob")), "persona.json", "'bob'", "'ann'")
_persona_case("tokens-not-a-list", lambda c: c.edit_persona(lambda d: d.update(tokens="<ann>")),
              "persona.json", "tokens must be a list")
_persona_case("class-word-not-text", lambda c: c.edit_persona(lambda d: d.update(class_word=None)),
              "persona.json", "class_word")
_persona_case("hyperparameters-not-object", lambda c: c.edit_persona(lambda d: d.update(hyperparameters=[1])),
              "persona.json", "hyperparameters")
_persona_case("base-model-not-object", lambda c: c.edit_persona(lambda d: d.update(base_model="tiny")),
              "persona.json", "base_model")


# adapter files: compose reads them (after verifying their sha256)

def _adapter_case(id: str, change: Callable[[Ctx], None], *expect: str) -> None:
    def build(c: Ctx):
        change(c)
        return [*c.models(), "--people", "ann", "--prompt", "a woman", "--size", "64x64", "--steps", "1"]
    case(f"compose-adapter-{id}", "compose", expect)(build)


def _adapter_tensors(c: Ctx) -> dict:
    from safetensors.torch import load_file

    return load_file(str(c.people / "ann" / "adapter_model.safetensors"))


def _first_key(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _wrong_shapes(c: Ctx) -> None:
    t = _adapter_tensors(c)
    k = _first_key(t, "lora_B.weight")
    t[k] = t[k][:, :-1].contiguous()  # (out, r-1): does not pair with A (r, in)
    c.replace_adapter(t)


def _other_dims(c: Ctx) -> None:
    import torch

    t = _adapter_tensors(c)
    k = _first_key(t, "lora_A.weight")
    t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 8)  # an SD2-width layer: in_features differ
    c.replace_adapter(t)


def _other_keys(c: Ctx) -> None:
    import torch

    c.replace_adapter({"unet.down_blocks.7.attentions.3.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
                       "unet.down_blocks.7.attentions.3.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(320, 4)})


def _kohya_keys(c: Ctx) -> None:
    import torch

    c.replace_adapter({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                       "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)})


def _nan(c: Ctx) -> None:
    t = _adapter_tensors(c)
    k = _first_key(t, "lora_B.weight")
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")
    c.replace_adapter(t)


def _pickled_adapter(c: Ctx) -> None:
    c.replace_adapter({}, raw=evil_pickle(c.outside / "PWNED"))


def _embeddings(change: Callable) -> Callable[[Ctx], None]:
    def apply(c: Ctx) -> None:
        from safetensors.torch import load_file

        t = load_file(str(c.people / "ann" / "embeddings.safetensors"))
        c.replace_adapter(change(t), file="embeddings.safetensors")
    return apply


def _emb_nan(t):
    t["emb_params"] = t["emb_params"].clone()
    t["emb_params"][0, 0] = float("inf")
    return t


def _emb_dim(t):
    import torch

    return {"emb_params": torch.zeros(2, 768)}  # SD1.5's width, not the tiny model's 32


def _tampered(c: Ctx) -> None:
    with open(c.people / "ann" / "adapter_model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x00\x01")


_adapter_case("unpaired-shapes", _wrong_shapes, "adapter_model.safetensors", "do not pair")
_adapter_case("other-model-dims", _other_dims, "ann", "trained for another base model")
_adapter_case("other-model-keys", _other_keys, "ann", "does not exist in this base model")
_adapter_case("kohya-keys", _kohya_keys, "adapter_model.safetensors", "not in the diffusers LoRA layout")
_adapter_case("nan-weights", _nan, "adapter_model.safetensors", "NaN or infinite")
_adapter_case("pickle-content", _pickled_adapter, "adapter_model.safetensors", "not a readable safetensors")
_adapter_case("embeddings-inf", _embeddings(_emb_nan), "embeddings.safetensors", "NaN or infinite")
_adapter_case("embeddings-other-width", _embeddings(_emb_dim), "embeddings.safetensors", "another base model")
_adapter_case("sha256-mismatch", _tampered, "adapter_model.safetensors", "does not match persona.json")
_adapter_case("missing-file", lambda c: (c.people / "ann" / "adapter_model.safetensors").unlink(),
              "adapter_model.safetensors", "missing")


# ---- pickles anywhere a file is read: refused, never unpickled (tests check the marker too)

def _evil_model_folder(c: Ctx) -> Path:
    """A copy of the tiny model whose UNet weights are a pickle (diffusers' .bin fallback)."""
    folder = c.outside / "evil-model"
    shutil.copytree(c.tiny_model, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(evil_pickle(c.outside / "PWNED"))
    return folder


@case("train-base-model-ckpt-file", "personas", ("evil.ckpt", "pickle|safetensors"))
def _(c):
    f = c.outside / "evil.ckpt"
    f.write_bytes(evil_pickle(c.outside / "PWNED"))
    return ["train", "newbie", c.eileen, "--base-model", f]


@case("compose-base-model-ckpt-file", "compose", ("evil.ckpt", "pickle|safetensors"))
def _(c):
    f = c.outside / "evil.ckpt"
    f.write_bytes(evil_pickle(c.outside / "PWNED"))
    return ["--base-model", f, "--controlnet", c.tiny_model / "controlnet", "--people", "ann", "--prompt", "a woman"]


@case("compose-base-model-with-bin-weights", "compose", ("evil-model", "safetensors"))
def _(c):
    # Identity check needs the unet's safetensors: copy the persona's recorded base model id over.
    folder = _evil_model_folder(c)
    c.edit_persona(lambda d: d.update(base_model={"id": str(folder.resolve()), "revision": None, "sha256": None}))
    return ["--base-model", folder, "--controlnet", c.tiny_model / "controlnet", "--people", "ann",
            "--prompt", "a woman", "--size", "64x64", "--steps", "1"]


@case("train-base-model-with-bin-weights", "personas", ("evil-model", "safetensors"))
def _(c):
    cfg = c.inputs / "c.toml"
    cfg.write_text('face_model = "none"\nvalidation_every = 0\n')
    return ["train", "newbie", c.eileen, "--base-model", _evil_model_folder(c), "--resolution", "64", "--steps", "1",
            "--config", cfg]


@case("evaluate-clip-pretrained-pt-file", "evaluate", ("evil.pt", "pickle|safetensors"))
def _(c):
    f = c.outside / "evil.pt"
    f.write_bytes(evil_pickle(c.outside / "PWNED"))
    c.file("000.jpg", c.good)
    return ["--images", c.inputs, "--people", "ann", "--prompt", "a woman", "--face-model", "dlib",
            "--clip-model", "ViT-B-32", "--clip-pretrained", f]


@case("evaluate-clip-local-dir-bin", "evaluate", ("open_clip_pytorch_model.bin", "pickle|safetensors"))
def _(c):
    folder = c.outside / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))
    (folder / "open_clip_pytorch_model.bin").write_bytes(evil_pickle(c.outside / "PWNED"))
    c.file("000.jpg", c.good)
    return ["--images", c.inputs, "--people", "ann", "--prompt", "a woman", "--face-model", "dlib",
            "--clip-model", f"local-dir:{folder}"]


@case("train-resume-pickled-checkpoint", "personas", ("checkpoint.pt", "--restart"))
def _(c):
    # An unfinished run whose checkpoint was replaced by a pickle that would run code.
    from personas.config import TrainConfig

    work = c.people / ".work" / "ann"
    (work / "refs").mkdir(parents=True)
    Image.fromarray(c.astronaut).resize((64, 64)).save(work / "refs" / "000.jpg")
    config = TrainConfig(base_model=str(c.tiny_model), resolution=64, max_train_steps=4, face_model="none",
                         validation_every=0, min_photos=1)
    (work / "state.json").write_text(json.dumps({"config": config.to_dict(), "step": 2, "refs": [
        {"file": "refs/000.jpg", "source": "a.png", "sha256": "0" * 64, "face_box": [0, 0, 64, 64]}]}))
    (work / "photos.json").write_text("{}")
    (work / "checkpoint.pt").write_bytes(evil_pickle(c.outside / "PWNED"))
    (c.people / ".ann.lock").write_text("1")  # left by the run that was interrupted
    return ["train", "ann", "--resume", "--quiet"]


@case("compose-pose-detector-pickle", "compose", ("body_pose_model.pth", "not usable OpenPose detector weights"))
def _(c):
    # A photo as --pose runs the OpenPose detector, whose weights only exist as a .pth pickle.
    folder = c.outside / "detector"
    folder.mkdir()
    (folder / "body_pose_model.pth").write_bytes(evil_pickle(c.outside / "PWNED"))
    c.monkeypatch.setenv("GROUPSHOT_POSE_DETECTOR", str(folder))
    return [*c.models(), "--people", "ann", "--prompt", "a woman", "--pose", c.file("photo.jpg", c.good)]


# ---- personas import (external LoRA / embedding files)

def _import_case(id: str, build: Callable[[Ctx], list], *expect: str) -> None:
    case(f"import-{id}", "personas", expect)(lambda c: ["import", *build(c)])


def _import_file(c: Ctx, name: str, tensors: dict | None = None, raw: bytes | None = None) -> Path:
    from safetensors.torch import save_file

    path = c.outside / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_file(tensors, str(path))
    return path


def _nan_lora(c: Ctx) -> Path:
    t = _adapter_tensors(c)
    k = _first_key(t, "lora_A.weight")
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")
    return _import_file(c, "nan.safetensors", t)


_import_case("pickle-lora-ckpt", lambda c: ["bob", _import_file(c, "lora.ckpt", raw=evil_pickle(c.outside / "PWNED")),
                                             "--token", "bob"], "lora.ckpt", "pickles, which can run code")
_import_case("pickle-embedding-pt", lambda c: ["bob", "--embedding",
                                                _import_file(c, "emb.pt", raw=evil_pickle(c.outside / "PWNED"))],
             "emb.pt", "pickles, which can run code")
_import_case("pickle-in-safetensors-name", lambda c: ["bob", _import_file(c, "lora.safetensors",
                                                      raw=evil_pickle(c.outside / "PWNED")), "--token", "bob",
                                                      "--base-model", c.tiny_model],
             "lora.safetensors", "safetensors")
_import_case("zero-byte-lora", lambda c: ["bob", _import_file(c, "empty.safetensors", raw=b""), "--token", "bob",
                                          "--base-model", c.tiny_model], "empty.safetensors")
_import_case("nan-lora", lambda c: ["bob", _nan_lora(c), "--token", "bob", "--base-model", c.tiny_model],
             "nan.safetensors", "NaN or infinite")
_import_case("missing-lora", lambda c: ["bob", c.outside / "none.safetensors", "--token", "bob"], "none.safetensors",
             "not found")
_import_case("nothing", lambda c: ["bob"], "nothing to import")
_import_case("existing-name", lambda c: ["ann", c.people / "ann" / "adapter_model.safetensors", "--token", "ann"],
             "persona 'ann' exists")
_import_case("bad-name", lambda c: ["../bob", c.people / "ann" / "adapter_model.safetensors", "--token", "bob"],
             "invalid persona name")
_import_case("bad-refs", lambda c: ["bob", c.people / "ann" / "adapter_model.safetensors", "--token", "bob",
                                    "--base-model", c.tiny_model, "--refs", c.file("empty.jpg", b"")],
             "only 0 of 1 photos", "empty.jpg", "empty file")
_import_case("other-model-width", lambda c: ["bob", _import_file(c, "sd2.safetensors", {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": __import__("torch").zeros(4, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": __import__("torch").zeros(320, 4)}),
    "--token", "bob", "--base-model", c.tiny_model], "sd2.safetensors")


# ---- names

BAD_NAMES = {
    "dotdot": "..", "parent-path": "../ann", "slash": "a/b", "backslash": "a\\b", "absolute": "/etc",
    "space": "ann smith", "dot-name": "ann.v2", "too-long": "x" * 65, "non-ascii": "zoë", "empty": "",
}
for _key, _bad in BAD_NAMES.items():
    _expect = ("invalid persona name", re.escape(repr(_bad)))
    case(f"train-name-{_key}", "personas", _expect)(lambda c, n=_bad: ["train", n, c.eileen, "--base-model", c.tiny_model])
    case(f"show-name-{_key}", "personas", _expect)(lambda c, n=_bad: ["show", n])
    case(f"remove-name-{_key}", "personas", _expect)(lambda c, n=_bad: ["remove", n])
    if _bad and "," not in _bad:
        case(f"compose-name-{_key}", "compose", _expect)(
            lambda c, n=_bad: [*c.models(), "--people", f"ann,{n}", "--pose", "two_standing", "--prompt", "x"])
        case(f"evaluate-name-{_key}", "evaluate", _expect)(
            lambda c, n=_bad: ["--images", _good_images(c), "--people", n, "--prompt", "x", "--face-model", "dlib"])

case("show-unknown-persona", "personas", ("unknown persona 'nobody'", "have: ann"))(lambda c: ["show", "nobody"])
case("remove-unknown-persona", "personas", ("unknown persona 'nobody'", "personas list"))(lambda c: ["remove", "nobody"])
case("compose-unknown-persona", "compose", ("unknown persona 'nobody'", "ann"))(
    lambda c: [*c.models(), "--people", "nobody", "--prompt", "x"])
case("evaluate-unknown-persona", "evaluate", ("unknown persona 'nobody'", "ann"))(
    lambda c: ["--images", _good_images(c), "--people", "nobody", "--prompt", "x", "--face-model", "dlib"])


# ---- flags: contradictions and out-of-range numbers

def _train_flags(id: str, flags: list, *expect: str, photos: bool | list = True) -> None:
    def build(c: Ctx):
        given = [c.eileen] if photos is True else [f(c) if callable(f) else f for f in photos or []]
        return ["train", "newbie", *given, "--base-model", c.tiny_model, *[f(c) if callable(f) else f for f in flags]]
    case(f"train-{id}", "personas", expect)(build)


_train_flags("resume-and-restart", ["--resume", "--restart"], "--resume and --restart", photos=False)
_train_flags("resume-with-photos", ["--resume"], "--resume", "drop the other options")
_train_flags("resume-with-steps", ["--resume", "--steps", "5"], "--resume", "drop the other options", photos=False)
_train_flags("steps-0", ["--steps", "0"], "--steps", "max_train_steps=0", ">= 1")
_train_flags("steps-not-a-number", ["--steps", "many"], "--steps", "invalid int value: 'many'")
_train_flags("lr-negative", ["--lr=-1e-4"], "--lr", "learning_rate=-0.0001", "positive")
_train_flags("lr-nan", ["--lr", "nan"], "--lr", "learning_rate=nan", "finite|positive")
_train_flags("embedding-lr-inf", ["--embedding-lr", "inf"], "--embedding-lr", "embedding_lr=inf", "finite|positive")
_train_flags("resolution-not-multiple-of-8", ["--resolution", "100"], "--resolution", "resolution=100", "multiple of 8")
_train_flags("resolution-too-small", ["--resolution", "32"], "--resolution", "resolution=32", "at least 64")
_train_flags("rank-0", ["--rank", "0"], "--rank", "lora_rank=0", ">= 1")
_train_flags("alpha-negative", ["--alpha", "-4"], "--alpha", "lora_alpha=-4.0", "positive")
_train_flags("tokens-0", ["--tokens", "0"], "--tokens", "num_tokens=0")
_train_flags("min-photos-0", ["--min-photos", "0"], "--min-photos", "min_photos=0")
_train_flags("method-unknown", ["--method", "dreambooth"], "--method", "method='dreambooth'", "lora")
_train_flags("class-word-digits", ["--class-word", "r2d2"], "--class-word", "class_word='r2d2'")
_train_flags("mixed-precision-unknown", ["--mixed-precision", "fp8"], "--mixed-precision", "mixed_precision='fp8'")
_train_flags("fp16-on-cpu", ["--mixed-precision", "fp16"], "fp16", "GPU")
_train_flags("config-missing", ["--config", "nowhere.toml"], "nowhere.toml", "not found")
_train_flags("config-unknown-key", ["--config", lambda c: c.file("c.toml", b"learnig_rate = 1e-4\n")],
             "c.toml", "unknown keys learnig_rate")
_train_flags("config-not-toml", ["--config", lambda c: c.file("c.toml", b"lr = = 3\n")], "c.toml", "not valid TOML")
_train_flags("config-wrong-type", ["--config", lambda c: c.file("c.toml", b'lora_rank = "big"\n')],
             "c.toml", "lora_rank='big'")
_train_flags("config-not-utf8", ["--config", lambda c: c.file("c.toml", b"caption = '\xff'\n")], "c.toml", "not valid TOML")
_train_flags("base-model-missing-folder", ["--base-model", "./no-such-model"], "no-such-model",
             "neither an existing folder nor a hub id")
_train_flags("base-model-not-a-model", ["--base-model", lambda c: c.inputs], "inputs", "not a diffusers model folder")
_train_flags("no-photos", [], "no photos given", photos=False)
_train_flags("photo-path-missing", [], "nowhere.jpg", "not found", photos=["./nowhere.jpg"])
_train_flags("photo-folder-empty", [], "inputs", "no photos found", photos=[lambda c: c.inputs])
case("train-resume-nothing", "personas", ("no unfinished training of 'ann'", "without --resume"))(
    lambda c: ["train", "ann", "--resume"])
case("check-resolution-not-multiple-of-8", "personas", ("resolution", "multiple of 8"))(
    lambda c: ["check", c.eileen, "--face-model", "dlib", "--resolution", "100"])
case("check-missing-path", "personas", ("nowhere.jpg", "not found"))(lambda c: ["check", "nowhere.jpg"])
case("personas-no-command", "personas", "required")(lambda c: [])
case("personas-unknown-command", "personas", "invalid choice")(lambda c: ["fly"])

for _flag, _value, _expect in [
    ("--guidance", "nan", "--guidance nan"), ("--guidance", "0.5", "--guidance 0.5"),
    ("--size", "0x0", "--size 0x0"), ("--size", "64x-8", "--size 64x-8"), ("--num-images", "0", "--num-images 0"),
    ("--seed", "-1", "--seed -1"), ("--steps", "-3", "--steps -3"), ("--controlnet-scale", "-1", "--controlnet-scale -1"),
    ("--controlnet-scale", "inf", "--controlnet-scale inf"), ("--scheduler", "magic", "invalid choice"),
]:
    case(f"compose-{_flag[2:]}-{_value}", "compose", re.escape(_expect))(
        lambda c, f=_flag, v=_value: [*c.models(), "--people", "ann", "--prompt", "x", f"{f}={v}"])
case("compose-replay-missing", "compose", ("nowhere.json", "no such render.json"))(
    lambda c: [*c.models(), "--replay", "nowhere.json"])
case("compose-empty-prompt", "compose", "--prompt is empty")(lambda c: [*c.models(), "--people", "ann", "--prompt", " "])
case("evaluate-unknown-flag", "evaluate", "unrecognized arguments: --frobnicate")(
    lambda c: ["--frobnicate"])
case("evaluate-images-and-renders", "evaluate", "not both")(
    lambda c: [c.inputs, "--images", c.inputs, "--people", "ann"])
case("evaluate-workers-zero", "evaluate", ("--workers 0", "1 or more"))(
    lambda c: ["--images", c.inputs, "--people", "ann", "--workers", "0"])
case("evaluate-workers-not-a-number", "evaluate", ("--workers", "invalid int"))(
    lambda c: ["--images", c.inputs, "--people", "ann", "--workers", "many"])
case("evaluate-out-is-a-file", "evaluate", ("--out", "is a file"))(
    lambda c: ["--images", c.inputs, "--people", "ann", "--out", c.file("report", b"x")])


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, capsys):
    argv = case.build(ctx)
    before = snapshot(ctx.ws)
    code, out, err = run_main(case.command, argv, capsys)
    if case.kind == "error":
        line = error_line(case.prog, code, err)
        for pattern in case.expect:
            assert re.search(pattern, line), f"{pattern!r} not in: {line}"
    else:
        # check: one status row per file, in a table on stdout; exit 2 only if none is usable
        assert "Traceback" not in err and err.strip() == "", err
        rows = [l for l in out.splitlines() if re.search(r"\s(ok|rejected)\s", l)]
        assert len(rows) == 1, out
        status = "rejected" if case.kind == "check-rejected" else "ok"
        assert re.search(rf"\s{status}\s", rows[0]) and re.search(case.expect[0], rows[0]), rows[0]
        assert code == (2 if status == "rejected" else 0), out
    after = snapshot(ctx.ws)
    if case.id == "check-out-with-255-byte-name":  # --out is asked for: only the crop appears
        added = sorted(set(after) - set(before))
        assert added == ["crops"] + [a for a in added if a.startswith("crops/")] and len(added) == 2, added
        for k in before:
            assert after[k] == before[k], k
    else:
        assert after == before, f"changed on disk: {sorted(set(after) ^ set(before)) or 'contents'}"
    assert not (ctx.outside / "PWNED").exists(), "a pickle was unpickled"


def test_readme_lists_the_whole_catalogue():
    """tests/README.md's table is this catalogue: same count, every case id's input and command."""
    readme = (Path(__file__).parent / "README.md").read_text()
    stated = re.search(r"\*\*(\d+) cases\*\*", readme)
    assert stated and int(stated.group(1)) == len(CASES), "update the count and table in tests/README.md"
    rows = re.findall(r"^\| (\d+) \| (\S+) \| `([^`]+)` \|", readme, flags=re.M)
    assert len(rows) == len(CASES)


def test_unknown_persona_json_keys_still_load(ctx, capsys, caplog):
    """A newer groupshot's extra keys are a warning, not an error (the reader is forward tolerant)."""
    ctx.edit_persona(lambda d: d.update(future_field=1))
    code, out, err = run_main("personas", ["show", "ann"], capsys)
    assert code == 0, err
    assert "future_field" in caplog.text


def test_load_lora_refuses_pickle_suffixes(tmp_path):
    from personas.adapters import load_embeddings, load_lora
    from personas.errors import GroupshotError

    for suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        f = tmp_path / f"adapter{suffix}"
        f.write_bytes(evil_pickle(tmp_path / "PWNED"))
        with pytest.raises(GroupshotError, match="pickles, which can run code"):
            load_lora(f)
        with pytest.raises(GroupshotError, match="pickles, which can run code"):
            load_embeddings(f)
    assert not (tmp_path / "PWNED").exists()


def test_a_pickle_marker_really_fires(tmp_path):
    """The marker used above does run when unpickled: the catalogue's absence checks mean something."""
    pickle.loads(evil_pickle(tmp_path / "PWNED"))
    assert (tmp_path / "PWNED").exists()


CONSOLE = [
    ("personas", ["train", "x/y", "a.jpg"], "invalid persona name"),
    ("compose", ["--people", "ann", "--prompt", "x", "--size", "60x64"], "multiples of 8"),
    ("evaluate", ["--images", "nowhere", "--people", "ann"], "folder not found"),
    ("personas", ["check", "--resolution", "abc", "x.jpg"], "invalid int value"),
]


@pytest.mark.parametrize("prog, argv, expect", CONSOLE, ids=[f"{p}-{a[0]}" for p, a, _ in CONSOLE])
def test_console_scripts_exit_2_without_traceback(prog, argv, expect, tmp_path):
    """The installed entry points, in a fresh process: one line on stderr, exit 2."""
    exe = Path(sys.executable).parent / prog
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", f"import sys; from {dict(personas='personas', compose='compose', evaluate='eval')[prog]}.cli import main; sys.exit(main())"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GROUPSHOT_LIBRARY": str(tmp_path / "people")}
    proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and expect in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def catalogue_table() -> str:
    """The README's table: `python tests/test_bad_inputs.py` prints it."""
    commands = ("check", "train", "show", "remove", "import")
    lines = ["| # | input | command | expected (one line, exit 2; `check`: its status row) |", "|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        head, _, rest = c.id.partition("-")
        command = f"personas {head}" if c.command == "personas" and head in commands else c.command
        what = rest if head in (*commands, "compose", "evaluate", "personas") else c.id
        expect = " / ".join(e.replace("\\", "").replace("|", " or ").replace("`", "'") for e in c.expect)
        if c.kind != "error":
            expect = f"status `{'ok' if c.kind == 'check-ok' else 'rejected'}`: {expect}"
        lines.append(f"| {i} | {what} | `{command}` | {expect} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(catalogue_table())
