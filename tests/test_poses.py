"""compose.poses: templates, drawing (against controlnet_aux), every --pose input kind, every bad input, assignment."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import types
import typing
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from compose.poses import (
    BODY25_TO_COCO18, HEAD_KEYPOINTS, MAX_PEOPLE, Pose, assign_people, check_pose, draw_pose, export_templates,
    list_templates, load_pose, looks_like_skeleton, main, parse_assign, parse_skeleton_image, template_pose,
)
from personas import GroupshotError, ModelUnavailableError

REQUIRED = {"one_standing": 1, "two_standing": 2, "two_seated": 2, "two_hugging": 2, "three_row": 3, "four_two_rows": 4}
NAMES = [name for name, _, _ in list_templates()]
SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"


def head_x(person: np.ndarray) -> float:
    """The documented left-to-right key: mean x of the present head keypoints."""
    present = [k for k in HEAD_KEYPOINTS if person[k, 2] > 0]
    return float(person[present, 0].mean())


def assert_same_people(expected: list[np.ndarray], got: list[np.ndarray], tol: float) -> None:
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert ((a[:, 2] > 0) == (b[:, 2] > 0)).all()
        present = a[:, 2] > 0
        assert np.abs(a[present, :2] - b[present, :2]).max() <= tol


def one_line_error(excinfo, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def load_controlnet_aux_util():
    """controlnet_aux's open_pose/util.py itself, without importing controlnet_aux (which
    imports every detector, ~9 s): its one relative import is satisfied by a stub."""
    folder = Path(importlib.util.find_spec("controlnet_aux").submodule_search_locations[0]) / "open_pose"
    package = types.ModuleType("_cnaux_open_pose")
    package.__path__ = [str(folder)]
    body = types.ModuleType("_cnaux_open_pose.body")

    class Keypoint(typing.NamedTuple):
        x: float
        y: float
        score: float = 1.0
        id: int = -1

    body.Keypoint, body.BodyResult = Keypoint, tuple
    sys.modules.setdefault("_cnaux_open_pose", package)
    sys.modules.setdefault("_cnaux_open_pose.body", body)
    spec = importlib.util.spec_from_file_location("_cnaux_open_pose.util", folder / "util.py")
    util = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(util)
    return util, sys.modules["_cnaux_open_pose.body"].Keypoint


def controlnet_aux_draw(pose: Pose) -> np.ndarray:
    """controlnet_aux's draw_poses (body only): person by person."""
    util, Keypoint = load_controlnet_aux_util()
    canvas = np.zeros((pose.height, pose.width, 3), np.uint8)
    for person in pose.people:
        keypoints = [Keypoint(x / pose.width, y / pose.height) if c > 0 else None for x, y, c in person.tolist()]
        canvas = util.draw_bodypose(canvas, keypoints)
    return canvas


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def person_json(person: np.ndarray) -> dict:
    return {"pose_keypoints_2d": [float(v) for v in person.reshape(-1)]}


# ---------------------------------------------------------------------------------------------
# templates and drawing


def test_list_templates_has_the_required_ones():
    listed = {name: (n, description) for name, n, description in list_templates()}
    for name, n in REQUIRED.items():
        assert listed[name][0] == n
    assert all(description for _, description in listed.values())


@pytest.mark.parametrize("size", [(512, 512), (768, 512), (512, 768)])
@pytest.mark.parametrize("name", NAMES)
def test_templates_are_valid_on_any_canvas(name, size):
    pose = template_pose(name, size=size)
    n = dict((t[0], t[1]) for t in list_templates())[name]
    assert (pose.width, pose.height) == size and len(pose.people) == n
    check_pose(pose)
    xs = [head_x(p) for p in pose.people]
    assert xs == sorted(xs)
    for person in pose.people:
        present = person[:, 2] > 0
        assert (person[present, 0] >= 0).all() and (person[present, 0] <= size[0]).all()
        assert (person[present, 1] >= 0).all() and (person[present, 1] <= size[1]).all()
        assert present[[0, 1, 14, 15, 16, 17]].all()  # every face fully placed
    # Uniform scale: the same template at another aspect has the same body sizes.
    ref = template_pose(name, size=(512, 512))
    for a, b in zip(ref.people, pose.people):
        assert np.hypot(*(a[0, :2] - a[1, :2])) == pytest.approx(np.hypot(*(b[0, :2] - b[1, :2])), rel=1e-4)


@pytest.mark.parametrize("name", [n for n, count, _ in list_templates() if count >= 2])
def test_group_templates_show_large_heads(name):
    from compose.regions import head_boxes

    pose = template_pose(name, size=(512, 512))
    for x0, y0, x1, y1 in head_boxes(pose):
        assert y1 - y0 >= 0.12 * 512  # at least ~60 px of head at 512 px


def test_draw_pose_matches_controlnet_aux_pixel_for_pixel():
    rng = np.random.default_rng(0)
    poses = [template_pose("one_standing", size=(512, 512)), template_pose("one_portrait", size=(333, 517))]
    # A pose with fractional coordinates and missing points, drawn off-centre.
    person = template_pose("one_standing", size=(400, 300)).people[0].copy()
    person[:, :2] += rng.uniform(-5, 5, (18, 2)).astype(np.float32)
    person[[4, 10, 17], :] = 0
    poses.append(Pose(400, 300, [person]))
    for pose in poses:
        ours = np.asarray(draw_pose(pose))
        assert ours.shape == (pose.height, pose.width, 3)
        assert (ours != controlnet_aux_draw(pose)).sum() == 0


# ---------------------------------------------------------------------------------------------
# skeleton images


@pytest.mark.parametrize("name", NAMES)
def test_skeleton_image_round_trip(name, tmp_path):
    pose = template_pose(name, size=(512, 512))
    path = tmp_path / f"{name}.png"
    draw_pose(pose).save(path)
    loaded = load_pose(path, size=(512, 512))
    assert_same_people(pose.people, loaded.people, tol=1.5)
    assert loaded.source == str(path)


@pytest.mark.parametrize("name", [n for n, count, _ in list_templates() if count >= 2])
def test_skeleton_drawn_by_controlnet_aux_parses(name):
    # controlnet_aux draws person by person, so later people's limbs may cover earlier keypoints' limbs.
    pose = template_pose(name, size=(512, 512))
    # Up to ~2 px off where a circle is partly covered (its centroid moves away from the cover).
    assert_same_people(pose.people, parse_skeleton_image(controlnet_aux_draw(pose)), tol=2.5)


def test_jpeg_rescaled_and_letterboxed_skeletons(tmp_path):
    pose = template_pose("two_hugging", size=(512, 512))
    buffer = io.BytesIO()
    draw_pose(pose).save(buffer, "JPEG", quality=80)
    (tmp_path / "hug.jpg").write_bytes(buffer.getvalue())
    # Twice the size: coordinates double.
    loaded = load_pose(tmp_path / "hug.jpg", size=(1024, 1024))
    assert_same_people([p * [2, 2, 1] for p in pose.people], loaded.people, tol=5)
    # Wider canvas: letterboxed (scale 1, centred, 128 px each side), not stretched.
    loaded = load_pose(tmp_path / "hug.jpg", size=(768, 512))
    assert_same_people([p + [128, 0, 0] * (p[:, 2:] > 0) for p in pose.people], loaded.people, tol=3)
    # An upscaled skeleton (thicker limbs, bigger dots), as controlnet_aux's resize makes.
    big = cv2.resize(np.asarray(draw_pose(pose)), (900, 900), interpolation=cv2.INTER_LINEAR)
    Image.fromarray(big).save(tmp_path / "big.png")
    loaded = load_pose(tmp_path / "big.png", size=(512, 512))
    assert_same_people(pose.people, loaded.people, tol=2)


@pytest.mark.parametrize("gap", [0.35, 0.2, 0.12])
def test_touching_skeletons_stay_apart(gap):
    # Two people closer and closer, until arms and shoulders overlap.
    base = template_pose("one_standing", size=(512, 512)).people[0]
    left, right = base.copy(), base.copy()
    left[:, 0] -= gap * 256 * (left[:, 2] > 0)
    right[:, 0] += gap * 256 * (right[:, 2] > 0)
    pose = Pose(512, 512, [left, right])
    assert_same_people(pose.people, parse_skeleton_image(np.asarray(draw_pose(pose))), tol=2.5)


def test_photos_are_told_from_skeletons():
    for name in NAMES:
        assert looks_like_skeleton(np.asarray(draw_pose(template_pose(name, size=(512, 512)))))
    # Real photos, one of them mostly black with coloured specks (a deep-field sky).
    for file in ("astronaut.png", "hubble_deep_field.jpg", "coffee.png", "camera.png"):
        assert not looks_like_skeleton(np.asarray(Image.open(SKIMAGE_DATA / file).convert("RGB")))


# ---------------------------------------------------------------------------------------------
# photos (detector weights are not available offline)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("GROUPSHOT_POSE_DETECTOR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_photo_offline_raises_model_unavailable(offline_hub, tmp_path, monkeypatch):
    photo = tmp_path / "friends.jpg"
    Image.open(SKIMAGE_DATA / "astronaut.png").convert("RGB").save(photo)
    heavy_before = "controlnet_aux.open_pose" in sys.modules
    with pytest.raises(ModelUnavailableError) as excinfo:
        load_pose(photo, size=(512, 512))
    one_line_error(excinfo, str(photo), "photo", "GROUPSHOT_POSE_DETECTOR", "lllyasviel/Annotators", "body_pose_model.pth")
    # A folder without the weights, by environment variable or argument.
    monkeypatch.setenv("GROUPSHOT_POSE_DETECTOR", str(tmp_path))
    with pytest.raises(ModelUnavailableError) as excinfo:
        load_pose(photo, size=(512, 512))
    one_line_error(excinfo, str(tmp_path), "body_pose_model.pth")
    with pytest.raises(ModelUnavailableError):
        load_pose(photo, size=(512, 512), detector=tmp_path / "elsewhere")
    assert heavy_before or "controlnet_aux.open_pose" not in sys.modules  # failed before the slow import


def fake_detector(monkeypatch, found: list[list[tuple[float, float] | None]], seen: list) -> None:
    """controlnet_aux.open_pose stand-in returning `found` (normalised keypoints per person)."""

    class Keypoint(typing.NamedTuple):
        x: float
        y: float
        score: float = 0.9

    class Body:
        def __init__(self, path):
            seen.append(("weights", path))

    class OpenposeDetector:
        def __init__(self, body):
            pass

        def detect_poses(self, image):
            seen.append(("image", image.shape))
            body = types.SimpleNamespace
            return [body(body=body(keypoints=[Keypoint(*p) if p else None for p in person])) for person in found]

    open_pose = types.ModuleType("controlnet_aux.open_pose")
    open_pose.OpenposeDetector = OpenposeDetector
    body_module = types.ModuleType("controlnet_aux.open_pose.body")
    body_module.Body = Body
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    monkeypatch.setitem(sys.modules, "controlnet_aux.open_pose", open_pose)
    monkeypatch.setitem(sys.modules, "controlnet_aux.open_pose.body", body_module)


def test_photo_pose_from_detector(monkeypatch, tmp_path):
    photo = tmp_path / "pair.jpg"
    Image.open(SKIMAGE_DATA / "coffee.png").convert("RGB").resize((1200, 800)).save(photo)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "body_pose_model.pth").write_bytes(b"")
    monkeypatch.setenv("GROUPSHOT_POSE_DETECTOR", str(tmp_path / "weights"))
    template = template_pose("two_standing", size=(1200, 800))
    found = [[(x / 1200, y / 800) if c > 0 else None for x, y, c in p.tolist()] for p in reversed(template.people)]
    arm_only = [None] * 18
    arm_only[3], arm_only[4] = (0.95, 0.5), (0.97, 0.7)  # someone cut off by the frame: left out
    seen = []
    fake_detector(monkeypatch, found + [arm_only], seen)
    pose = load_pose(photo, size=(600, 600))  # 1200x800 into 600x600: scale 0.5, 100 px down
    expected = [np.where(p[:, 2:] > 0, p * [0.5, 0.5, 0.9] + [0, 100, 0], 0) for p in template.people]
    assert_same_people(expected, pose.people, tol=1e-3)
    assert ("weights", str(tmp_path / "weights" / "body_pose_model.pth")) in seen
    assert ("image", (512, 768, 3)) in seen  # detected at 512 px on the short side, as controlnet_aux does


@pytest.mark.slow
def test_photo_pose_with_the_real_detector_code(tmp_path, monkeypatch):
    """controlnet_aux's own Body and detector on random weights: the call path works and
    finds nobody (so the error says no people). ~15 s: imports torch and every detector."""
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    state = {".".join(k.split(".")[1:]): v for k, v in bodypose_model().state_dict().items()}
    torch.save(state, tmp_path / "body_pose_model.pth")
    photo = tmp_path / "astronaut.png"
    Image.open(SKIMAGE_DATA / "astronaut.png").convert("RGB").resize((256, 256)).save(photo)
    with pytest.raises(GroupshotError) as excinfo:
        load_pose(photo, size=(512, 512), detector=tmp_path)
    one_line_error(excinfo, "no people")


# ---------------------------------------------------------------------------------------------
# JSON


def test_json_coco18_pixels_with_canvas_is_letterboxed(tmp_path):
    pose = template_pose("two_standing", size=(400, 300))
    path = write_json(tmp_path / "p.json", pose.to_json())
    same = load_pose(path, size=(400, 300))
    assert_same_people(pose.people, same.people, tol=1e-2)
    twice = load_pose(path, size=(800, 800))  # scale 2, centred vertically: 100 px above
    assert_same_people([p * [2, 2, 1] + [0, 100, 0] * (p[:, 2:] > 0) for p in pose.people], twice.people, tol=1e-2)


def test_json_without_canvas_is_in_output_pixels(tmp_path):
    pose = template_pose("three_row", size=(512, 512))
    data = pose.to_json()
    del data["canvas_width"], data["canvas_height"]
    data["people"].reverse()  # file order does not matter: people come back left to right
    loaded = load_pose(write_json(tmp_path / "p.json", data), size=(512, 512))
    assert_same_people(pose.people, loaded.people, tol=1e-2)


def test_json_normalised_coordinates(tmp_path):
    pose = template_pose("two_seated", size=(640, 480))
    people = [p / [640, 480, 1] for p in pose.people]
    plain = {"people": [person_json(p) for p in people]}
    # No canvas: relative to the requested size.
    assert_same_people(pose.people, load_pose(write_json(tmp_path / "a.json", plain), size=(640, 480)).people, 1e-2)
    # With a canvas: relative to it, then letterboxed (640x480 into 320x320: scale 0.5, 40 px down).
    with_canvas = {**plain, "canvas_width": 640, "canvas_height": 480}
    loaded = load_pose(write_json(tmp_path / "b.json", with_canvas), size=(320, 320))
    assert_same_people([p * [0.5, 0.5, 1] + [0, 40, 0] * (p[:, 2:] > 0) for p in pose.people], loaded.people, 1e-2)


def test_json_body25_maps_to_coco18(tmp_path):
    pose = template_pose("two_hugging", size=(512, 512))
    people = []
    for person in pose.people:
        body25 = np.zeros((25, 3), np.float32)
        body25[list(BODY25_TO_COCO18)] = person
        body25[8] = (person[8] + person[11]) / 2  # MidHip
        body25[19:25] = (person[10, 0] + 5, person[10, 1] + 3, 0.7)  # feet; dropped
        people.append(person_json(body25))
    loaded = load_pose(write_json(tmp_path / "b25.json", {"people": people}), size=(512, 512))
    assert_same_people(pose.people, loaded.people, tol=1e-2)


def test_openpose_json_extras_are_ignored(tmp_path):
    # What OpenPose itself writes: version, face and hand keypoints, missing points as 0, 0, 0.
    person = template_pose("one_standing", size=(512, 512)).people[0]
    data = {"version": 1.3, "people": [{**person_json(person), "face_keypoints_2d": [], "hand_left_keypoints_2d": []}]}
    loaded = load_pose(write_json(tmp_path / "op.json", data), size=(512, 512))
    assert_same_people([person], loaded.people, tol=1e-2)


@st.composite
def pixel_poses(draw):
    width = draw(st.integers(16, 2000))
    height = draw(st.integers(16, 2000))
    n = draw(st.integers(1, MAX_PEOPLE))
    people = []
    for i in range(n):
        person = np.zeros((18, 3), np.float64)
        for k in range(18):
            if draw(st.booleans()) or k == 0:
                x = draw(st.floats(0, width, allow_nan=False))
                y = draw(st.floats(0, height, allow_nan=False))
                c = draw(st.floats(0.01, 1))
                person[k] = (round(x, 3), round(y, 3), round(c, 4))
        person[0, 0] = 2 + (width - 2) * (i + 0.5) / n  # distinct, above 1: pixels, not normalised
        person[0, 1] = max(person[0, 1], 2.0)
        people.append(person.astype(np.float32))
    return Pose(width, height, people)


@settings(max_examples=40, deadline=None)
@given(pixel_poses())
def test_json_round_trip_property(pose):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_json(Path(tmp) / "pose.json", pose.to_json())
        loaded = load_pose(path, size=(pose.width, pose.height))
    expected = sorted(pose.people, key=head_x)
    assert_same_people(expected, loaded.people, tol=max(pose.width, pose.height) * 1e-6 + 2e-3)
    for a, b in zip(expected, loaded.people):
        assert np.allclose(a[:, 2], b[:, 2], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input: every one a one-line GroupshotError naming the file


def people_json(n: int) -> dict:
    person = template_pose("one_standing", size=(512, 512)).people[0]
    return {"people": [person_json(person * [0.1, 0.1, 1] + [i * 40, 0, 0] * (person[:, 2:] > 0)) for i in range(n)]}


def bad_files(tmp_path: Path) -> list[tuple[Path, tuple[str, ...]]]:
    person = template_pose("one_standing", size=(512, 512)).people[0]
    cases = []

    def case(name: str, content, *words: str) -> None:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        cases.append((path, words))

    case("garbage.png", b"\x89PNG this is not an image", "cannot be read")
    case("broken.json", '{"people": [', "invalid JSON", "line 1")
    case("list.json", [1, 2, 3], '"people"')
    case("count.json", {"people": [{"pose_keypoints_2d": [1.0] * 51}]}, "51", "54", "75")
    case("text.json", {"people": [{"pose_keypoints_2d": ["a"] * 54}]}, "not a number")
    nan = person.copy()
    nan[5, 0] = np.nan
    case("nan.json", json.dumps({"people": [person_json(nan)]}), "l_shoulder", "NaN")
    negative = person.copy()
    negative[3, 0] = -4
    case("negative.json", {"people": [person_json(negative)]}, "r_elbow", "negative")
    case("outside.json", {"canvas_width": 100, "canvas_height": 100, "people": [person_json(person)]}, "outside", "100x100")
    case("outside_no_canvas.json", {"people": [person_json(person * [3, 3, 1])]}, "outside", "512x512", "canvas_width")
    case("zero.json", {"people": []}, "no people")
    case("twenty.json", people_json(20), "20 people", f"at most {MAX_PEOPLE}")
    headless = person.copy()
    headless[list(HEAD_KEYPOINTS)] = 0
    case("headless.json", {"people": [person_json(person), person_json(headless + [200, 0, 0] * (headless[:, 2:] > 0))]}, "no head", "person 2 of 2")
    case("half_canvas.json", {"canvas_width": 512, "people": [person_json(person)]}, "canvas_height")
    case("pose.txt", "hello", "unsupported file type", ".txt")
    black = io.BytesIO()
    Image.new("RGB", (256, 256)).save(black, "PNG")
    case("black.png", black.getvalue(), "no people")
    return cases


def test_bad_files_raise_one_line_errors(tmp_path):
    for path, words in bad_files(tmp_path):
        with pytest.raises(GroupshotError) as excinfo:
            load_pose(path, size=(512, 512))
        one_line_error(excinfo, str(path), *words)


def test_bad_skeleton_images(tmp_path):
    # Twenty people in one image: all found, then refused.
    small = template_pose("one_standing", size=(200, 200)).people[0]
    crowd = [small + [i * 80 - 60, 0, 0] * (small[:, 2:] > 0) for i in range(20)]
    draw_pose(Pose(1600, 200, crowd)).save(tmp_path / "crowd.png")
    with pytest.raises(GroupshotError) as excinfo:
        load_pose(tmp_path / "crowd.png", size=(512, 512))
    one_line_error(excinfo, "20 people")
    # A skeleton with legs and hips only: no face to place.
    legs = template_pose("one_standing", size=(512, 512)).people[0].copy()
    legs[[k for k in range(18) if k not in (8, 9, 10, 11, 12, 13)]] = 0
    draw_pose(Pose(512, 512, [legs])).save(tmp_path / "legs.png")
    with pytest.raises(GroupshotError) as excinfo:
        load_pose(tmp_path / "legs.png", size=(512, 512))
    one_line_error(excinfo, "no head")


def test_bad_specs(tmp_path):
    with pytest.raises(GroupshotError) as excinfo:
        load_pose("five_dancing", size=(512, 512))
    one_line_error(excinfo, "five_dancing", "two_standing")
    with pytest.raises(GroupshotError) as excinfo:
        load_pose(tmp_path / "missing.png", size=(512, 512))
    one_line_error(excinfo, "missing.png", "no such file")
    with pytest.raises(GroupshotError) as excinfo:
        load_pose(tmp_path, size=(512, 512))
    one_line_error(excinfo, "folder")
    with pytest.raises(GroupshotError):
        load_pose("two_standing", size=(0, 512))
    with pytest.raises(GroupshotError):
        Pose(512, 512, [np.zeros((17, 3))])


# ---------------------------------------------------------------------------------------------
# names -> skeletons


def test_assign_people():
    pose = template_pose("three_row", size=(512, 512))
    assert assign_people(pose, ["ann", "bob", "cy"]) == [0, 1, 2]
    assert assign_people(pose, ["ann", "bob", "cy"], {"cy": 0, "ann": 2}) == [2, 1, 0]
    assert assign_people(pose, ["ann", "bob", "cy"], {"bob": 0}) == [1, 0, 2]
    assert assign_people(pose, ["ann", "bob", "cy"], parse_assign("cy=1, bob=2")) == [0, 2, 1]


def test_assign_people_errors():
    pose = template_pose("three_row", size=(512, 512))
    with pytest.raises(GroupshotError) as excinfo:
        assign_people(pose, ["leo", "brad"])
    assert str(excinfo.value).startswith("the pose has 3 people but --people names 2:")
    bad = [
        ({"zed": 0}, ("zed", "not in --people")),
        ({"ann": 3}, ("ann=3", "0 to 2")),
        ({"ann": -1}, ("ann=-1",)),
        ({"ann": 1, "bob": 1}, ("skeleton 1", "ann", "bob")),
    ]
    for assign, words in bad:
        with pytest.raises(GroupshotError) as excinfo:
            assign_people(pose, ["ann", "bob", "cy"], assign)
        one_line_error(excinfo, "--assign", *words)
    with pytest.raises(GroupshotError) as excinfo:
        assign_people(pose, ["ann", "ann", "cy"])
    one_line_error(excinfo, "ann")
    for text in ("leo", "leo=x", "=1", "leo=0,leo=1"):
        with pytest.raises(GroupshotError) as excinfo:
            parse_assign(text)
        one_line_error(excinfo, "--assign")


# ---------------------------------------------------------------------------------------------
# examples and import hygiene


def test_export_templates(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--size", "512x512"]) == 0
    for name in NAMES:
        pose = template_pose(name, size=(512, 512))
        assert_same_people(pose.people, load_pose(tmp_path / f"{name}.json", size=(512, 512)).people, 1e-2)
        assert (np.asarray(Image.open(tmp_path / f"{name}.png")) == np.asarray(draw_pose(pose))).all()
    assert len(export_templates(tmp_path / "wide", size=(768, 512))) == 2 * len(NAMES)


def test_examples_folder_is_current():
    folder = Path(__file__).resolve().parents[1] / "examples" / "poses"
    if not folder.is_dir():
        pytest.skip("examples/poses not generated")
    for name in NAMES:
        exported = json.loads((folder / f"{name}.json").read_text())
        assert exported == json.loads(json.dumps(template_pose(name, size=(512, 512)).to_json()))


def test_importing_loads_no_model_library():
    code = (
        "import sys, compose.poses, compose.regions; "
        "heavy = [m for m in ('torch', 'controlnet_aux', 'diffusers', 'transformers', 'huggingface_hub') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
