"""Property-based tests (hypothesis) of the pure readers: whatever they are given, they return
a value or raise GroupshotError (the CLIs turn it into one line and exit code 2), never
another exception. Round trips and geometry live in test_poses/test_regions/test_eval_assign.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from personas.errors import GroupshotError

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Any JSON value, numbers at their extremes included (huge integers, +-1e308, NaN, inf:
# Python's json reads NaN and Infinity).
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)
numbers = (st.integers(-5, 600) | st.floats(allow_nan=True, allow_infinity=True) | st.floats(-10, 600)
           | st.integers(min_value=-(10**400), max_value=10**400) | st.booleans() | st.none() | st.text(max_size=3))


def only_groupshot_errors(fn, *args, **kwargs):
    """fn's value, or None when it raised GroupshotError; any other exception fails the test.
    (run_cli prints a GroupshotError on one line whatever it holds, so newlines are allowed.)"""
    try:
        return fn(*args, **kwargs)
    except GroupshotError:
        return None


# -- OpenPose JSON ---------------------------------------------------------------------------------


@st.composite
def openpose_like(draw):
    """Mostly OpenPose-shaped objects with something wrong somewhere, sometimes anything at all."""
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    people = []
    for _ in range(draw(st.integers(0, 10))):
        length = draw(st.sampled_from([54, 54, 54, 75, 0, 51, 57]))
        keypoints = draw(st.lists(numbers if draw(st.booleans()) else st.floats(0, 600), min_size=length,
                                  max_size=length))
        person = {"pose_keypoints_2d": keypoints}
        if draw(st.integers(0, 8)) == 0:
            person = draw(json_values)
        people.append(person)
    data = {"people": people}
    if draw(st.booleans()):
        data["canvas_width"] = draw(numbers)
        data["canvas_height"] = draw(numbers)
    if draw(st.integers(0, 6)) == 0:
        data["people"] = draw(json_values)
    return data


@settings(max_examples=150, **SETTINGS)
@given(openpose_like(), st.sampled_from([(64, 64), (512, 384), (8, 8)]))
def test_pose_json_reader_raises_only_groupshot_errors(data, size):
    from compose.poses import Pose, load_pose

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pose.json"
        # allow_nan: Python's json writes and reads NaN/Infinity, as hand-written files may hold
        path.write_text(json.dumps(data, allow_nan=True))
        pose = only_groupshot_errors(load_pose, path, size=size)
    if pose is not None:  # what loads is usable: on the canvas, finite, 1-8 people with heads
        assert isinstance(pose, Pose) and (pose.width, pose.height) == size
        assert 1 <= len(pose.people) <= 8
        for person in pose.people:
            assert person.shape == (18, 3)
            assert all(math.isfinite(v) for v in person.reshape(-1))
            present = person[:, 2] > 0
            assert (person[present, 0] >= 0).all() and (person[present, 0] <= size[0]).all()


@settings(max_examples=80, **SETTINGS)
@given(st.text(max_size=30))
def test_assign_and_size_parsers_raise_only_groupshot_errors(text):
    from compose.cli import parse_person_prompts, parse_size
    from compose.poses import parse_assign

    assign = only_groupshot_errors(parse_assign, text)
    if assign is not None:
        assert all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in assign.items())
    size = only_groupshot_errors(parse_size, text)
    if size is not None:
        assert all(isinstance(v, int) for v in size)
    only_groupshot_errors(parse_person_prompts, [text])


# -- persona.json ----------------------------------------------------------------------------------

GOLDEN = json.loads((Path(__file__).parent / "data" / "persona_v1.json").read_text())


@st.composite
def persona_like(draw):
    """The golden v1 persona with some keys removed, retyped or added."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    data = json.loads(json.dumps(GOLDEN))
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=4, unique=True)):
        action = draw(st.integers(0, 3))
        if action == 0:
            del data[key]
        else:
            data[key] = draw(json_values)
    if draw(st.booleans()):
        data["photos"] = draw(st.lists(st.dictionaries(st.sampled_from(["file", "source", "sha256"]), json_values)
                                       | json_values, max_size=3))
    if draw(st.integers(0, 4)) == 0:
        data[draw(st.text(max_size=6))] = draw(json_values)
    return data


@settings(max_examples=200, **SETTINGS)
@given(persona_like())
def test_persona_reader_raises_only_groupshot_errors(data):
    from personas.library import Persona

    persona = only_groupshot_errors(Persona.from_json, data, source="persona.json")
    if persona is not None:  # what loads can be used: its words, its file paths, its record
        persona.path = Path("/library/ann")
        assert isinstance(persona.prompt_words(), str)
        for ref in persona.ref_paths:
            assert ref.resolve().is_relative_to(Path("/library/ann"))
        assert isinstance(persona.hyperparameters, dict) and isinstance(persona.extra, dict)
        json.dumps(persona.to_json())


# -- TrainConfig -------------------------------------------------------------------------------------


def _config_fields() -> list[str]:
    from dataclasses import fields

    from personas.config import TrainConfig

    return [f.name for f in fields(TrainConfig)]


@settings(max_examples=250, **SETTINGS)
@given(st.data())
def test_train_config_raises_only_groupshot_errors(data):
    from personas.config import TrainConfig

    names = _config_fields()
    values = {n: data.draw(json_values | numbers, label=n)
              for n in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))}
    config = only_groupshot_errors(TrainConfig.from_dict, values)
    if config is not None:  # what is accepted round-trips through its TOML file
        import tomllib

        assert TrainConfig.from_dict(tomllib.loads(config.to_toml())) == config


@settings(max_examples=60, **SETTINGS)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
def test_train_config_from_dict_unknown_keys(data):
    from personas.config import TrainConfig

    assume(set(data) - set(_config_fields()))
    with pytest.raises(GroupshotError, match="unknown keys"):
        TrainConfig.from_dict(data)


# -- photo decoding ----------------------------------------------------------------------------------


def _small_files() -> list[bytes]:
    import numpy as np

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = []
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("PNG", {"bits": 4}),
                    ("JPEG", {"progressive": True})):
        buf = io.BytesIO()
        (im.convert("P") if fmt == "GIF" else im).save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


SMALL_FILES = _small_files()


@st.composite
def damaged_images(draw):
    """Small valid images with bytes flipped, cut or inserted; or random bytes."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(draw(st.sampled_from(SMALL_FILES)))
    for _ in range(draw(st.integers(1, 6))):
        op, at = draw(st.integers(0, 2)), draw(st.integers(0, len(data) - 1))
        if op == 0:
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        if not data:
            break
    return bytes(data)


@settings(max_examples=200, **SETTINGS)
@given(damaged_images())
def test_photo_decoder_raises_only_groupshot_errors(data):
    from personas.photos import open_photo

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        path.write_bytes(data)
        image = only_groupshot_errors(open_photo, path)
    if image is not None:
        assert image.mode == "RGB" and image.width > 0 and image.height > 0


# -- render.json ----------------------------------------------------------------------------------


@st.composite
def render_like(draw):
    from test_eval_scoring import LEFT, LEFT_HEAD, _render_json

    data = _render_json([("eileen", LEFT, LEFT_HEAD)], ["000.png"])
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=3, unique=True)):
        data[key] = draw(json_values)
    if draw(st.booleans()):
        sub = draw(st.sampled_from(["request", "people", "images"]))
        if isinstance(data.get(sub), dict):
            data[sub][draw(st.sampled_from(["size", "prompt", "people"]))] = draw(json_values)
        elif isinstance(data.get(sub), list) and data[sub] and isinstance(data[sub][0], dict):
            data[sub][0][draw(st.sampled_from(["name", "box", "head_box", "file"]))] = draw(json_values)
    return data


@settings(max_examples=120, **SETTINGS)
@given(render_like())
def test_render_reader_raises_only_groupshot_errors(data):
    from eval.scoring import load_render

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "render.json").write_text(json.dumps(data, allow_nan=True))
        render = only_groupshot_errors(load_render, tmp)
    if render is not None:
        assert render.images and all(Path(tmp) in p.parents for p in render.images)
