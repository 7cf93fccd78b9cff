"""`evaluate`: every bad input is one line on stderr, exit code 2, no traceback and no report;
and one full run on real faces (dlib + tiny CLIP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from personas.library import write_json_atomic

from test_eval_scoring import LEFT, LEFT_HEAD, _persona, _render_json


@pytest.fixture(scope="module")
def setup(tmp_path_factory, astronaut):
    """A library with one persona (refs only; no model is loaded to build it) and a render folder."""
    root = tmp_path_factory.mktemp("cli")
    _persona("eileen", "woman", [Image.fromarray(astronaut).crop((100, 0, 340, 240))], root / "people")
    run = root / "run"
    run.mkdir()
    Image.fromarray(astronaut).save(run / "000.png")
    write_json_atomic(run / "render.json", _render_json([("eileen", LEFT, LEFT_HEAD)], ["000.png"], size=(512, 512)))
    return root


def _run(argv, capsys):
    from eval.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("evaluate: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def _bad_render(root: Path, name: str, **changes) -> Path:
    folder = root / name
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64)).save(folder / "000.png")
    data = {**_render_json([("eileen", LEFT, LEFT_HEAD)], ["000.png"]), **changes}
    (folder / "render.json").write_text(json.dumps(data))
    return folder


def test_bad_inputs(setup, tmp_path, capsys):
    lib = ["--library", setup / "people", "--out", tmp_path / "report", "--face-model", "dlib"]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "a.png")
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    cases = [
        ([], ["render folders"]),
        ([tmp_path / "nowhere"], ["nowhere", "not found"]),
        ([empty], ["no render.json", "--images"]),
        ([_bad_render(tmp_path, "newer", schema_version=2)], ["newer", "upgrade groupshot"]),
        ([_bad_render(tmp_path, "unknown", people=[{"name": "zed"}])], ["unknown persona 'zed'", "eileen"]),
        (["--images", empty, "--people", "eileen"], ["no images"]),
        (["--images", broken, "--people", "eileen"], ["b.png", "--skip-unreadable"]),
        (["--images", broken], ["--people"]),
        (["--images", broken, "--people", "eileen", "--prompts", prompts], ["3 prompts for 2 images"]),
        (["--images", broken, "--people", "eileen", "--prompts", tmp_path / "none.txt"], ["none.txt"]),
        ([setup / "run", "--people", "eileen"], ["--people"]),
        ([setup / "run", "--base", empty], ["--base", "no images"]),
    ]
    for argv, needles in cases:
        code, out, err = _run([*argv, *lib], capsys)
        _assert_user_error(code, err, *needles)
        assert not (tmp_path / "report").exists(), argv

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("x")
    code, out, err = _run([setup / "run", "--library", setup / "people", "--out", tmp_path / "taken"], capsys)
    _assert_user_error(code, err, "taken", "choose a new or empty folder")


def test_missing_arcface_names_dlib(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GROUPSHOT_INSIGHTFACE_ROOT", str(tmp_path / "insightface"))
    code, out, err = _run([setup / "run", "--library", setup / "people", "--out", tmp_path / "r"], capsys)
    _assert_user_error(code, err, "buffalo_l", "--face-model dlib")
    assert not (tmp_path / "r").exists()


def test_missing_clip_weights_name_the_fix(setup, tmp_path, capsys):
    code, out, err = _run([setup / "run", "--library", setup / "people", "--out", tmp_path / "r",
                           "--face-model", "dlib"], capsys)
    _assert_user_error(code, err, "ViT-B-32/openai", "--clip-pretrained FILE")
    assert not (tmp_path / "r").exists()


def test_console_script_has_no_traceback(tmp_path):
    """The installed entry point, in a fresh process: a newer render.json is one line and exit 2."""
    folder = _bad_render(tmp_path, "newer", schema_version=7)
    proc = subprocess.run([sys.executable, "-c", "import sys; from eval.cli import main; sys.exit(main())",
                           str(folder), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "schema_version 7" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_full_run_on_real_faces(setup, tmp_path, capsys):
    from personas.testing import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    out = tmp_path / "report"
    code, stdout, err = _run([setup / "run", "--library", setup / "people", "--out", out, "--face-model", "dlib",
                              "--clip-model", f"local-dir:{clip}", "--base", setup / "run", "--title", "t"], capsys)
    assert code == 0, err
    assert "Face Distance Score" in stdout and "points" in stdout
    data = json.loads((out / "report.json").read_text())
    assert data["title"] == "t"
    assert data["metrics"]["counts"]["matched_people"] == 1
    assert data["clip"]["model"] == f"local-dir:{clip}"
    assert data["base"] is not None
    # a second run replaces the report whole
    code, _, err = _run(["--images", setup / "run", "--people", "eileen", "--prompt", "{person} in space",
                         "--library", setup / "people", "--out", out, "--face-model", "dlib",
                         "--clip-model", f"local-dir:{clip}"], capsys)
    assert code == 0, err
    data = json.loads((out / "report.json").read_text())
    assert data["sources"][0]["kind"] == "images"
    assert data["images"][0]["clip_text"] == "a woman in space"
