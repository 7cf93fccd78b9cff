"""eval.scoring + eval.report on real faces: the dlib backend on registry photos (Eileen Collins
from skimage, Grace Hopper from matplotlib), two personas whose refs are real crops, a render
folder written by hand per the render.json contract, and a tiny random CLIP."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from personas.errors import GroupshotError
from personas.library import Persona, write_json_atomic

from personas.testing import write_tiny_clip

# Where dlib (HOG, upsample 1) finds the faces: astronaut (512x512) and Grace Hopper cropped
# to 512x512 (rows 40-552). Used only to cut the reference crops and draw the regions.
EILEEN_FACE = (175, 76, 266, 167)
GRACE_FACE = (180, 99, 367, 286)
W = 512


def _persona(name: str, class_word: str, refs: list[Image.Image], root: Path) -> None:
    folder = root / name
    (folder / "refs").mkdir(parents=True)
    photos = []
    for i, im in enumerate(refs):
        rel = f"refs/{i:03d}.jpg"
        im.save(folder / rel, quality=95)
        photos.append({"file": rel, "source": f"{name}_{i}.jpg", "sha256": "0" * 64})
    persona = Persona(name=name, tokens=[f"<{name}>"], class_word=class_word, base_model={"id": "tiny"},
                      method="pivotal", hyperparameters={"learning_rate": 1e-4, "lora_rank": 4},
                      photos=photos, adapter_sha256="a" * 64, embeddings_sha256="b" * 64,
                      created_at="2026-11-25T16:00:00+00:00", trigger=f"<{name}> {class_word}")
    write_json_atomic(folder / "persona.json", persona.to_json())
    (folder / "train").mkdir()
    with open(folder / "train" / "loss.csv", "w", encoding="utf-8") as f:
        f.write("step,loss,seconds\n" + "".join(f"{s},{0.3 / (1 + s / 20):.5f},{s * 0.1:.2f}\n" for s in range(60)))
    write_json_atomic(folder / "train" / "photos.json", {
        "accepted": [{"file": p["file"]} for p in photos],
        "rejected": [{"file": "/photos/blurry.jpg", "reason": "no face found"}],
    })


def _render_json(people: list[tuple[str, list[int], list[int]]], files: list[str], size=(2 * W, W)) -> dict:
    return {
        "schema_version": 1, "toolkit_version": "0.1.0", "created_at": "2026-11-25T16:00:00+00:00",
        "request": {"people": [p[0] for p in people], "prompt": "two people standing side by side",
                    "method": "composite", "pose": "two_standing", "size": list(size), "steps": 2,
                    "guidance": 7.5, "seed": 0, "num_images": len(files)},
        "base_model": {"id": "tiny", "revision": None, "sha256": None}, "controlnet": None,
        "people": [{"name": n, "skeleton": i, "tokens": [f"<{n}>"], "class_word": "person",
                    "prompt": f"<{n}> person", "adapter_sha256": "a" * 64, "box": box, "head_box": head}
                   for i, (n, box, head) in enumerate(people)],
        "global_prompt_for_clip": "two people standing side by side",
        "images": [{"file": f, "seed": i, "sha256": "0" * 64} for i, f in enumerate(files)],
        "pose_image": None, "mask_overlay": "masks.png", "masks": "masks.npz",
        "device": "cpu", "dtype": "float32", "timing": {"seconds_per_image": 0.1},
    }


LEFT, RIGHT = [0, 0, W, W], [W, 0, 2 * W, W]
LEFT_HEAD, RIGHT_HEAD = [150, 40, 290, 200], [W + 160, 70, W + 390, 310]


@pytest.fixture(scope="module")
def world(tmp_path_factory, astronaut, grace_hopper):
    """people/ (eileen, grace), renders/run (composite, solo, flat), renders/swapped, CLIP folder."""
    from personas.photos import face_crop_box

    root = tmp_path_factory.mktemp("eval-world")
    eileen = Image.fromarray(astronaut)
    grace = Image.fromarray(grace_hopper).crop((0, 40, W, 40 + W))
    e_crop = eileen.crop(face_crop_box(EILEEN_FACE, W, W))
    g_crop = grace.crop(face_crop_box(GRACE_FACE, W, W))
    _persona("eileen", "woman", [e_crop, ImageOps.mirror(e_crop)], root / "people")
    _persona("grace", "woman", [g_crop, ImageOps.mirror(g_crop)], root / "people")

    run = root / "renders" / "run"
    run.mkdir(parents=True)
    composite = Image.new("RGB", (2 * W, W))
    composite.paste(eileen, (0, 0))
    composite.paste(grace, (W, 0))
    composite.save(run / "000.png")
    solo = Image.new("RGB", (2 * W, W), (128, 128, 128))  # Eileen alone; Grace's region is empty
    solo.paste(eileen, (0, 0))
    solo.save(run / "001.png")
    Image.new("RGB", (2 * W, W), (90, 140, 200)).save(run / "002.png")  # flat colour: no face
    people = [("eileen", LEFT, LEFT_HEAD), ("grace", RIGHT, RIGHT_HEAD)]
    write_json_atomic(run / "render.json", _render_json(people, ["000.png", "001.png", "002.png"]))

    swapped = root / "renders" / "swapped"  # the same picture, people named the wrong way round
    swapped.mkdir()
    composite.save(swapped / "000.png")
    write_json_atomic(swapped / "render.json",
                      _render_json([("grace", LEFT, LEFT_HEAD), ("eileen", RIGHT, RIGHT_HEAD)], ["000.png"]))
    clip_dir = write_tiny_clip(root / "clip")
    return {"root": root, "library": root / "people", "run": run, "swapped": swapped, "clip": clip_dir}


@pytest.fixture(scope="module")
def clip(world):
    from eval.clip_score import ClipScorer

    return ClipScorer(f"local-dir:{world['clip']}")


@pytest.fixture(scope="module")
def run_scores(world, dlib_backend, clip):
    from eval.scoring import score_renders

    return score_renders([world["run"]], library=world["library"], face_backend=dlib_backend, clip=clip)


def _person(scores, image_key, name):
    return next(p for p in scores.people if p.image == image_key and p.person == name)


def test_each_face_goes_to_its_person(run_scores, dlib_backend):
    s = run_scores
    eileen, grace = _person(s, "run/000.png", "eileen"), _person(s, "run/000.png", "grace")
    faces = {f.index: f for f in s.faces if f.image == "run/000.png"}
    assert len(faces) == 2
    assert faces[eileen.face].box[2] <= W < faces[grace.face].box[0]  # left face is Eileen's
    # the refs are crops of these very photos: near; the other person: beyond the threshold
    assert eileen.match and grace.match and not eileen.swap and not grace.swap
    assert eileen.distance < 0.25 and grace.distance < 0.25
    assert faces[eileen.face].distances["grace"] > dlib_backend.match_threshold
    im = s.image("run/000.png")
    assert (im.faceless, im.missing, im.extra_faces, im.swaps) == (False, [], 0, 0)


def test_one_person_of_two_is_missing_and_flat_image_is_faceless(run_scores):
    s = run_scores
    solo = s.image("run/001.png")
    assert solo.n_faces == 1 and solo.missing == ["grace"] and solo.faceless
    assert _person(s, "run/001.png", "eileen").match
    flat = s.image("run/002.png")
    assert flat.n_faces == 0 and flat.faceless and flat.missing == ["eileen", "grace"]
    c = s.metrics.counts
    assert (c["missing_people"], c["faceless_images"], c["identity_swaps"], c["extra_faces"]) == (3, 2, 0, 0)
    # missing people are counted apart: the Face Distance mean is over the 3 faces found
    assert s.metrics.face_distance.n == 3
    assert s.metrics.face_distance.points == 10
    assert s.metrics.faceless_images.value == 2 and s.metrics.faceless_images.points == 7


def test_clip_scores_every_readable_image(run_scores, clip):
    s = run_scores
    assert all(im.clip_score is not None and -1 <= im.clip_score <= 1 for im in s.images)
    im = s.image("run/000.png")
    assert im.clip_text == "two people standing side by side"
    again = clip.score([Image.open(im.path)], im.clip_text)[0]
    assert im.clip_score == pytest.approx(again, abs=1e-6)
    assert s.metrics.clip_score.n == 3
    assert s.clip["weights_sha256"] and s.face_backend["name"] == "dlib"
    assert s.timing["images_per_second"] > 0


def test_swapped_people_are_identity_swaps(world, dlib_backend, clip):
    from eval.scoring import score_renders

    s = score_renders([world["swapped"]], library=world["library"], face_backend=dlib_backend, clip=None)
    rows = [p for p in s.people if p.image == "swapped/000.png"]
    assert len(rows) == 2 and all(p.swap and not p.missing and not p.match for p in rows)
    assert s.metrics.counts["identity_swaps"] == 2 and s.image("swapped/000.png").swaps == 2
    assert s.metrics.clip_score.value is None  # no CLIP given: not computed, not zero


def test_images_folder_without_regions(world, dlib_backend, clip, tmp_path):
    """--images: no render.json, so any face may be anyone; the Hungarian step still gets it right."""
    from eval.scoring import score_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    composite = Image.open(world["run"] / "000.png")
    ImageOps.mirror(composite).save(folder / "a.png")  # Grace now on the left
    composite.save(folder / "b.jpg")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable: a status, not a crash
    (folder / "notes.txt").write_text("ignored")
    s = score_images(folder, ["eileen", "grace"], ["{person} at a beach", "two women", "x"],
                     library=world["library"], face_backend=dlib_backend, clip=clip)
    assert [im.key for im in s.images] == ["imgs/a.png", "imgs/b.jpg", "imgs/c.png"]
    assert s.image("imgs/a.png").clip_text == "a woman and a woman at a beach"
    for key in ("imgs/a.png", "imgs/b.jpg"):
        faces = {f.index: f for f in s.faces if f.image == key}
        left = min(faces.values(), key=lambda f: f.box[0])
        assert left.person == ("grace" if key == "imgs/a.png" else "eileen")
        assert all(f.person == f.nearest for f in faces.values())
    assert s.image("imgs/c.png").status.startswith("unreadable")
    assert s.metrics.counts["unreadable_images"] == 1 and s.metrics.counts["readable_images"] == 2

    one = score_images([folder / "b.jpg"], ["eileen"], None,
                       library=world["library"], face_backend=dlib_backend, clip=None)
    assert one.metrics.counts["extra_faces"] == 1  # Grace is in the picture but not expected
    with pytest.raises(GroupshotError, match="3 prompts for 2 images"):
        score_images([folder / "a.png", folder / "b.jpg"], ["eileen"], ["a", "b", "c"],
                     library=world["library"], face_backend=dlib_backend, clip=None)


def _without_timing(scores) -> dict:
    data = scores.to_json()
    data.pop("timing"), data.pop("created_at")
    for ref in data["references"].values():
        ref.pop("from_cache")
    return data


def test_face_workers_give_the_same_scores(world, dlib_backend, clip, tmp_path):
    """The face stage in two spawned worker processes (each rebuilding dlib from its recipe)
    gives the scores of one process, image for image, in order, unreadable files included."""
    from eval.scoring import score_images, score_renders

    one = score_renders([world["run"], world["swapped"]], library=world["library"], face_backend=dlib_backend,
                        clip=clip, workers=1)
    two = score_renders([world["run"], world["swapped"]], library=world["library"], face_backend=dlib_backend,
                        clip=clip, workers=2)
    assert one.timing["face_workers"] == 1 and two.timing["face_workers"] == 2
    assert _without_timing(one) == _without_timing(two)
    assert [p.swap for p in two.people if p.image.startswith("swapped")] == [True, True]

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.open(world["run"] / f"00{i % 3}.png").save(folder / f"{i}.png")
    (folder / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    kw = dict(library=world["library"], face_backend=dlib_backend, clip=clip)
    a = score_images(folder, ["eileen", "grace"], "two women", workers=1, **kw)
    b = score_images(folder, ["eileen", "grace"], "two women", workers=3, **kw)
    # CLIP on this CPU ran one torch thread beside the workers: another summation order
    clip_a, clip_b = (np.array([im.clip_score or 0.0 for im in s.images]) for s in (a, b))
    assert np.allclose(clip_a, clip_b, rtol=0, atol=1e-5)
    ja, jb = _without_timing(a), _without_timing(b)
    for data in (ja, jb):
        for im in data["images"]:
            im.pop("clip_score")
        data["metrics"]["course"].pop("clip_score", None)
    assert ja == jb
    assert b.image("imgs/5.png").status.startswith("unreadable") and b.image("imgs/0.png").n_faces == 2
    assert [im.clip_score is not None for im in b.images] == [True] * 5 + [False]


class BatchedDlib:
    """dlib behind the GPU backends' interface (on_gpu, batch_size, detect_many); notes the
    batches it is given."""

    name, model, match_threshold = "dlib", "dlib", 0.42
    on_gpu, batch_size = True, 2

    def __init__(self, real):
        self.real, self.batches = real, []

    def describe(self):
        return self.real.describe()

    def detect(self, image):
        return self.real.detect(image)

    def detect_many(self, images):
        self.batches.append(len(images))
        return [self.real.detect(im) for im in images]


def test_gpu_face_stage_batches_and_keeps_order(world, dlib_backend, clip, tmp_path):
    """A GPU backend gets the readable images in batches of its batch_size while threads decode
    ahead; scores are those of the one-image-at-a-time path, in order, unreadable files
    included."""
    from eval.scoring import score_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.open(world["run"] / f"00{i % 3}.png").save(folder / f"{i}.png")
    (folder / "2b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    batched = BatchedDlib(dlib_backend)
    kw = dict(library=world["library"], clip=clip)
    a = score_images(folder, ["eileen", "grace"], "two women", face_backend=dlib_backend, workers=1, **kw)
    b = score_images(folder, ["eileen", "grace"], "two women", face_backend=batched, **kw)
    assert b.timing["face_workers"] == 1
    assert batched.batches == [2, 1, 2]  # batches of 2 files; the unreadable one is not sent
    assert _without_timing(a) == _without_timing(b)
    assert b.image("imgs/2b.png").status.startswith("unreadable") and b.image("imgs/3.png").n_faces == 2


class DyingBackend:
    """dlib in this process; in a worker process, detect() kills the process (a crashed model)."""

    name, model, match_threshold = "dlib", "dlib", 0.42

    def __init__(self):
        from personas.faces import DlibBackend

        self.real = DlibBackend()

    def recipe(self):
        return type(self), {}

    def describe(self):
        return self.real.describe()

    def detect(self, image):
        import multiprocessing
        import os

        if multiprocessing.parent_process() is not None:
            os._exit(3)
        return self.real.detect(image)


def test_a_dying_face_worker_is_one_error_naming_the_fix(world):
    from eval.scoring import score_renders

    with pytest.raises(GroupshotError, match=r"face worker process died .* --workers 1"):
        score_renders([world["run"]], library=world["library"], face_backend=DyingBackend(), clip=None, workers=2)


def test_face_worker_count():
    from eval.scoring import IMAGES_PER_WORKER, face_workers_for, usable_cpus

    class NoRecipe:
        name, model, match_threshold = "x", "x", 1.0

    class OnGpu(NoRecipe):
        on_gpu = True

        def recipe(self):
            return type(self), {}

    class Cpu(NoRecipe):
        def recipe(self):
            return type(self), {}

    assert face_workers_for(Cpu(), 3) == 1  # too few images to pay for a worker's start
    assert face_workers_for(Cpu(), 10_000) == usable_cpus()
    assert face_workers_for(Cpu(), 10_000, reserve=1) == max(1, usable_cpus() - 1)  # a core for CLIP
    assert face_workers_for(Cpu(), 2 * IMAGES_PER_WORKER) == min(2, usable_cpus())
    assert face_workers_for(OnGpu(), 10_000) == 1 and face_workers_for(NoRecipe(), 10_000) == 1
    assert face_workers_for(Cpu(), 5, workers=4) == 4
    with pytest.raises(GroupshotError, match="no recipe"):
        face_workers_for(NoRecipe(), 5, workers=4)
    with pytest.raises(GroupshotError, match="--workers 0"):
        face_workers_for(Cpu(), 5, workers=0)


def test_reference_cache_is_keyed_by_the_refs(world, dlib_backend):
    from eval.scoring import load_personas, reference_embedding

    persona = load_personas(world["library"], ["eileen"])["eileen"]
    cache = world["library"] / ".cache" / "eval-refs"
    first = reference_embedding(persona, dlib_backend, cache_dir=cache)
    second = reference_embedding(persona, dlib_backend, cache_dir=cache)
    assert second.from_cache and np.allclose(first.embedding, second.embedding)
    assert np.linalg.norm(first.embedding) == pytest.approx(1.0, abs=1e-5)
    assert first.with_face == [True, True]
    # a changed ref photo is a different key: recomputed, and the stale entry goes
    ref = persona.ref_paths[1]
    original = ref.read_bytes()
    try:
        ImageOps.mirror(Image.open(ref)).save(ref, quality=90)
        third = reference_embedding(persona, dlib_backend, cache_dir=cache)
        assert not third.from_cache
        assert len(list(cache.glob("eileen.dlib.*.npz"))) == 1
    finally:
        ref.write_bytes(original)


def test_render_json_checks(tmp_path):
    from eval.scoring import load_render

    def write(data) -> Path:
        folder = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "render.json").write_text(json.dumps(data))
        return folder

    good = _render_json([("eileen", LEFT, LEFT_HEAD)], ["000.png"])
    with pytest.raises(GroupshotError, match="schema_version 2 is newer.*upgrade groupshot"):
        load_render(write({**good, "schema_version": 2}))
    with pytest.raises(GroupshotError, match="missing keys images"):
        load_render(write({k: v for k, v in good.items() if k != "images"}))
    with pytest.raises(GroupshotError, match="inside the folder"):
        load_render(write({**good, "images": [{"file": "../../etc/passwd"}]}))
    with pytest.raises(GroupshotError, match="more than once"):
        load_render(write({**good, "people": good["people"] * 2}))
    with pytest.raises(GroupshotError, match="no render.json"):
        load_render(tmp_path)


GOLDEN_RENDER_V1 = """{
  "schema_version": 1, "toolkit_version": "0.1.0", "created_at": "2026-11-25T16:00:00+00:00",
  "request": {"people": ["brad", "leo"], "prompt": "<brad> man and <leo> man at a beach bar",
              "person_prompts": {"brad": "white shirt"}, "negative_prompt": "blurry", "method": "composite",
              "pose": "two_standing", "assign": null, "size": [512, 512], "steps": 30, "guidance": 7.5,
              "controlnet_scale": 1.0, "seed": 0, "num_images": 4, "scheduler": "pndm"},
  "base_model": {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "revision": "abc", "sha256": null},
  "controlnet": {"id": "lllyasviel/control_v11p_sd15_openpose", "revision": "def", "sha256": null},
  "people": [{"name": "brad", "skeleton": 0, "tokens": ["<brad>"], "class_word": "man",
              "prompt": "<brad> man, white shirt", "adapter_sha256": "1", "embeddings_sha256": "2",
              "persona_created_at": "2026-11-25T15:00:00+00:00", "box": [10, 20, 250, 500],
              "head_box": [80, 30, 170, 130]},
             {"name": "leo", "skeleton": 1, "tokens": ["<leo>"], "class_word": "man",
              "prompt": "<leo> man", "adapter_sha256": "3", "embeddings_sha256": "4",
              "persona_created_at": "2026-11-25T15:00:00+00:00", "box": [260, 20, 500, 500],
              "head_box": [330, 30, 420, 130]}],
  "global_prompt_for_clip": "two men at a beach bar",
  "images": [{"file": "000.png", "seed": 0, "sha256": "aa"}, {"file": "001.png", "seed": 1, "sha256": "bb"}],
  "pose_image": "pose.png", "mask_overlay": "masks.png", "masks": "masks.npz",
  "device": "cpu", "dtype": "float32", "timing": {"seconds_per_image": 0.2}
}"""


def test_golden_render_v1_reads(tmp_path, caplog):
    from eval.scoring import load_render

    (tmp_path / "render.json").write_text(GOLDEN_RENDER_V1)
    r = load_render(tmp_path)
    assert [p.name for p in r.people] == ["brad", "leo"]
    assert r.people[1].head_box == (330.0, 30.0, 420.0, 130.0)
    assert r.images == [tmp_path / "000.png", tmp_path / "001.png"]
    assert r.clip_text == "two men at a beach bar" and r.size == (512, 512)
    assert r.summary()["request"]["method"] == "composite"
    assert "unknown keys" not in caplog.text


# ---------------------------------------------------------------------------------------
# the report


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


@pytest.fixture(scope="module")
def report_dir(world, run_scores, dlib_backend, clip, tmp_path_factory):
    from eval.report import SweepTable, write_report
    from eval.scoring import score_images

    base = score_images([world["run"] / "002.png", world["run"] / "001.png", world["run"] / "000.png"],
                        ["eileen", "grace"], "two people", library=world["library"], face_backend=dlib_backend,
                        clip=clip)
    sweep = SweepTable(parameters=["learning_rate"], metrics=["face_distance", "clip_score"], best="lr-0.0001",
                       rows=[{"name": f"lr-{lr:g}", "learning_rate": lr, "face_distance": d, "clip_score": c}
                             for lr, d, c in ((1e-5, 0.9, 0.31), (1e-4, 0.5, 0.29), (1e-3, 0.7, 0.22))])
    out = tmp_path_factory.mktemp("reports") / "report"
    return write_report(run_scores, out, base=base, sweep=sweep)


def test_report_files_exist_and_parse(report_dir, run_scores):
    from eval.report import REPORT_FILES

    assert sorted(p.name for p in report_dir.iterdir() if p.is_file()) == sorted(REPORT_FILES)
    data = json.loads((report_dir / "report.json").read_text())
    assert data["schema_version"] == 1 and data["toolkit_version"]
    assert data["face_backend"]["name"] == "dlib" and data["face_backend"]["match_threshold"] > 0
    assert data["clip"]["weights_sha256"]
    course = data["metrics"]["course"]
    assert set(course) == {"face_distance", "clip_score", "faceless_images"}
    assert course["face_distance"]["band"] == "< 0.8" and course["faceless_images"]["value"] == 2
    assert len(data["images"]) == 3 and len(data["people"]) == 6 and len(data["faces"]) == 3
    assert data["personas"]["eileen"]["photos_rejected"] == [{"file": "blurry.jpg", "reason": "no face found"}]
    assert data["base"]["metrics"]["counts"]["readable_images"] == 3
    assert data["sweep"]["best"] == "lr-0.0001"
    rows = list(csv.DictReader(open(report_dir / "report.csv", encoding="utf-8")))
    assert len(rows) == 6  # one per (image, person); no extra faces here
    grace_solo = next(r for r in rows if r["image"] == "run/001.png" and r["person"] == "grace")
    assert grace_solo["missing"] == "1" and grace_solo["distance"] == ""
    md = (report_dir / "report.md").read_text()
    assert "| Face Distance Score |" in md and "figures/loss-eileen.png" in md
    assert (report_dir / "figures" / "loss-eileen.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Hyperparameter sweep" in md and "lr-0.0001 (best)" in md


def test_html_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(text)
    assert parser.refs, "the report shows images"
    assert all(r.startswith("data:") for r in parser.refs), [r[:40] for r in parser.refs if not r.startswith("data:")]
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not re.search(r"url\((?!data:)", text)
    for section in ("Course metrics", "Counted apart", "By face size", "Faces and references",
                    "Base vs personalized", "Training loss", "Data", "Hyperparameter sweep"):
        assert f">{section}<" in text
    assert text.count("data:image/png;base64,") >= 3  # loss curves x2 + sweep plot


def test_html_report_renders_in_a_browser(report_dir, tmp_path):
    """Headless Chromium (Debian's, as the demo test uses) draws the report: a tall page whose
    top holds the tables and whose images are the real photos (many colours, not blank).
    GROUPSHOT_UPDATE_DOCS=1 also copies the screenshot to docs/report.png (the README's)."""
    import os
    import shutil
    import subprocess

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (bash .ci/venv.sh installs it as root)")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2400", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", (report_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[:2] == (2400, 1200)
    assert (rgb[:200] < 100).all(axis=2).mean() > 0.005  # dark text of the title and first table
    colours = {tuple(c) for c in rgb[::4, ::4].reshape(-1, 3) // 16}
    assert len(colours) > 500  # photos and plots, not an empty or error page
    if os.environ.get("GROUPSHOT_UPDATE_DOCS") == "1":
        repo = Path(__file__).resolve().parents[1]
        shutil.copyfile(shot, repo / "docs" / "report.png")


def test_pdf(report_dir):
    data = (report_dir / "report.pdf").read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    assert data.count(b"/Type /Page\n") + data.count(b"/Type /Page ") + data.count(b"/Type/Page") >= 6


def test_report_is_atomic(report_dir, run_scores, monkeypatch):
    """A failure while writing leaves the earlier report whole and no temporary folder behind."""
    from eval import report

    before = (report_dir / "report.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "_pdf", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        report.write_report(run_scores, report_dir)
    assert (report_dir / "report.json").read_bytes() == before
    assert sorted(p.name for p in report_dir.parent.iterdir()) == ["report"]
    fresh = report_dir.parent / "fresh"
    with pytest.raises(RuntimeError):
        report.write_report(run_scores, fresh)
    assert not fresh.exists()


def test_output_folder_with_other_files_is_refused(tmp_path, run_scores):
    from eval.report import write_report

    (tmp_path / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(GroupshotError, match="choose a new or empty folder"):
        write_report(run_scores, tmp_path)
    assert (tmp_path / "holiday.jpg").exists()


def test_face_crops_of_odd_boxes_never_fail():
    """Boxes the wrong way round, of no width or outside the image still crop (the report
    must not fail on what a detector reports)."""
    from PIL import Image

    from eval.report import FACE_THUMB, _crop_face

    pil = Image.new("RGB", (300, 200), (10, 20, 30))
    for box in [(50, 40, 120, 150), (120, 150, 50, 40), (300, 8.6, 300, 8.4), (-20, -20, -5, -5), (400, 300, 500, 420)]:
        crop = _crop_face(pil, box)
        assert crop.size == (FACE_THUMB, FACE_THUMB)
    inner = np.asarray(_crop_face(pil, (120, 150, 50, 40)))
    assert (inner == (10, 20, 30)).all(axis=-1).mean() > 0.5  # the region, not an empty page
