"""The `compose` command: a render and its replay, previews, and every bad input as one
line on stderr with exit code 2 and nothing written."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from compose.cli import main
from personas.library import Library
from personas.testing import make_random_persona


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: see test_compose.py
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def library(tiny_model, tmp_path_factory) -> Library:
    lib = Library(tmp_path_factory.mktemp("people"))
    make_random_persona(lib, "ann", tiny_model, seed=1)
    make_random_persona(lib, "bob", tiny_model, seed=2, n_tokens=1)
    # zed: trained on another base model
    shutil.copytree(lib.path("bob"), lib.path("zed"))
    record = json.loads((lib.path("zed") / "persona.json").read_text())
    record.update(name="zed", base_model={"id": "someone/other-model", "revision": None, "sha256": "0" * 64})
    (lib.path("zed") / "persona.json").write_text(json.dumps(record))
    return lib


@pytest.fixture
def models(tiny_model, library) -> list[str]:
    return ["--base-model", str(tiny_model), "--controlnet", str(tiny_model / "controlnet"), "--library", str(library.root)]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_render_then_replay_gives_the_same_pixels(models, tmp_path, capsys):
    code, out, err = run([
        "--people", "ann,bob", "--pose", "two_standing", "--prompt", "two people at a beach bar",
        "--person-prompt", "bob=white shirt", "--assign", "bob=0", "--size", "64x48", "--steps", "2",
        "--num-images", "2", "--seed", "7", "--out", tmp_path / "renders", *models,
    ], capsys)
    assert code == 0, err
    run_dir = tmp_path / "renders" / out.strip().split("/")[-1]
    record = json.loads((run_dir / "render.json").read_text())
    assert record["request"]["size"] == [64, 48] and record["request"]["assign"] == {"bob": 0}
    assert [p["skeleton"] for p in record["people"]] == [1, 0]
    assert record["people"][1]["prompt"] == "<bob> person, white shirt, two people at a beach bar"

    code, out, err = run(["--replay", run_dir / "render.json", "--out", tmp_path / "again", *models[-2:]], capsys)
    assert code == 0, err
    again = tmp_path / "again" / out.strip().split("/")[-1]
    for name in ("000.png", "001.png"):
        assert (again / name).read_bytes() == (run_dir / name).read_bytes()
        assert np.asarray(Image.open(again / name)).shape == (48, 64, 3)


def test_list_poses(capsys):
    code, out, _ = run(["--list-poses"], capsys)
    assert code == 0 and "two_standing" in out and "three_row" in out


def test_preview_writes_skeleton_and_masks_only(tmp_path, capsys):
    code, out, err = run(["--pose", "three_row", "--preview", "--size", "128x96", "--people", "a,b,c",
                          "--out", tmp_path], capsys)
    assert code == 0, err
    folder = tmp_path / out.strip().split("/")[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["masks.png", "pose.png"]
    assert Image.open(folder / "pose.png").size == (128, 96)


@pytest.fixture
def bad_poses(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "empty.png")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--people", "ann,nobody", "--pose", "two_standing"], "unknown persona 'nobody'"),
    (["--people", "ann", "--pose", "two_standing"], "the pose has 2 people but --people names 1"),
    (["--people", "ann,bob", "--pose", "three_row"], "the pose has 3 people but --people names 2"),
    (["--people", "zed", "--pose", "one_standing"], "trained on base model 'someone/other-model'"),
    (["--people", "ann", "--pose", "{poses}/garbage.png"], "cannot be read as an image"),
    (["--people", "ann", "--pose", "{poses}/empty.png"], "no people found"),
    (["--people", "ann", "--pose", "nope"], "no such template"),
    (["--people", "ann", "--size", "64"], "--size 64: expected WIDTHxHEIGHT"),
    (["--people", "ann", "--size", "60x64"], "multiples of 8"),
    (["--people", "ann,bob", "--pose", "two_standing", "--assign", "ann=x"], "expected name=index"),
    (["--people", "ann,bob", "--pose", "two_standing", "--assign", "zed=0"], "zed is not in --people"),
    (["--people", "ann,bob", "--pose", "two_standing", "--assign", "ann=2"], "no such skeleton"),
    (["--people", "ann,bob", "--pose", "two_standing", "--assign", "ann=0,bob=0"], "both"),
    (["--people", "ann", "--steps", "0"], "--steps 0"),
    (["--people", "ann", "--steps", "many"], "invalid int value"),
    (["--people", "ann,bob"], "no --pose"),
    (["--people", "ann", "--person-prompt", "hat"], "expected NAME=TEXT"),
    (["--people", "ann", "--method", "blend"], "invalid choice"),
    (["--people", "ann", "--base-model", "{poses}/no-model"], "neither an existing folder nor a hub id|not a diffusers"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, models, bad_poses, tmp_path, capsys):
    out = tmp_path / "renders"
    argv = [a.format(poses=bad_poses) for a in args]
    if "--base-model" in argv:
        models = models[4:]
    code, stdout, err = run([*models, *argv, "--prompt", "two people", "--out", out], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("compose: error: "), err
    assert re.search(message, err), err
    assert "Traceback" not in err and not out.exists()


def test_missing_prompt(capsys, tmp_path):
    code, _, err = run(["--people", "ann", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "--people and --prompt are required" in err and not (tmp_path / "r").exists()
