"""evaluate sweep: the best-variant rule, the spec's checks, and one sweep end to end on the
tiny model (2 variants, a few steps, dlib faces, tiny CLIP), then resumed."""

from __future__ import annotations

import json

import pytest

from personas.config import TrainConfig
from personas.errors import GroupshotError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _row(name, fd, clip, faceless):
    return {"name": name, "face_distance": fd, "clip_score": clip, "faceless_images": faceless}


def test_best_variant_rule():
    from eval.sweep import choose_best

    rows = [_row("a", 0.30, 0.20, 0), _row("b", 0.40, 0.27, 0), _row("c", 0.45, 0.28, 0)]
    # a has the lowest distance but its CLIP is more than 0.02 below the best (0.28): b wins.
    assert choose_best(rows)[0] == "b"
    assert choose_best(rows, clip_margin=0.1)[0] == "a"
    # Distances equal to 3 decimals: fewer faceless images, then higher CLIP.
    rows = [_row("a", 0.4001, 0.28, 3), _row("b", 0.4004, 0.28, 1), _row("c", 0.4002, 0.27, 1)]
    assert choose_best(rows)[0] == "b"
    rows = [_row("a", 0.4001, 0.27, 1), _row("b", 0.4004, 0.28, 1)]
    assert choose_best(rows)[0] == "b"
    # A variant without any face is never chosen over one with faces.
    assert choose_best([_row("a", None, 0.35, 4), _row("b", 0.9, 0.34, 3)])[0] == "b"
    # No faces anywhere: fewest faceless, then CLIP.
    assert choose_best([_row("a", None, 0.30, 4), _row("b", None, 0.20, 2)])[0] == "b"
    assert choose_best([_row("a", None, 0.20, 2), _row("b", None, 0.30, 2)])[0] == "b"
    # No CLIP score (no prompts): the lowest distance.
    assert choose_best([_row("a", 0.5, None, 0), _row("b", 0.4, None, 0)])[0] == "b"
    assert choose_best([]) == (None, "no variants")


def test_spec_names_variants_and_checks_them(eileen_photos):
    from eval.sweep import SweepSpec

    spec = SweepSpec("eileen", [str(eileen_photos)], {"lora_rank": [4, 16], "learning_rate": [5e-5, 2.5e-4]},
                     train=TrainConfig(class_word="woman"), prompts=["{person}"])
    names = [v.name for v in spec.variants()]
    assert names == ["eileen-lr5e-05-r4", "eileen-lr5e-05-r16", "eileen-lr2p5e-04-r4", "eileen-lr2p5e-04-r16"]
    v = spec.variants()[3]
    assert v.config.learning_rate == 2.5e-4 and v.config.lora_rank == 16 and v.config.class_word == "woman"
    default = SweepSpec("eileen", [str(eileen_photos)], {}, prompts=["{person}"])
    assert [v.params["learning_rate"] for v in default.variants()] == [5e-5, 1e-4, 5e-4]
    photos = [str(eileen_photos)]
    cases = [
        (dict(grid={"learning_rate": [1e-4]}), "must vary"),
        (dict(grid={"resolution": [256, 512]}), "a sweep varies"),
        (dict(grid={"lora_rank": [4, 4]}), "repeat"),
        (dict(grid={"lora_rank": [0, 4]}), "lora_rank"),
        (dict(grid={}, prompts=[]), "prompt set is empty"),
        (dict(grid={}, num_images=0), "--num-images"),
        (dict(grid={}, photos=["/nowhere"]), "photos not found"),
        (dict(name="x" * 60, grid={}), "too long"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(GroupshotError, match=needle):
            SweepSpec(**{"name": "eileen", "photos": photos, "prompts": ["{person}"], **kwargs})


def test_sweep_cli_bad_inputs(eileen_photos, tmp_path, capsys):
    from eval.cli import main

    (tmp_path / "sweep.toml").write_text("[sweep]\nlearning_rate = 1e-4\n")
    cases = [
        (["--lr", "1e-4,abc"], "'abc' is not a number"),
        (["--rank", "4,x"], "not an integer"),
        (["--lr", "1e-4"], "must vary"),
        (["--config", str(tmp_path / "sweep.toml")], "[sweep] must map settings to lists"),
        (["--config", str(tmp_path / "none.toml")], "file not found"),
        (["--prompts", str(tmp_path / "none.txt")], "none.txt"),
        (["--bogus"], "unrecognized arguments"),
    ]
    for extra, needle in cases:
        code = main(["sweep", "eileen", str(eileen_photos), "--library", str(tmp_path / "lib"), *extra])
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("evaluate: error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "lib").exists()  # nothing trained, nothing written


def test_sweep_end_to_end_and_resumed(tmp_path, tiny_model, eileen_photos, capsys):
    from personas.library import Library
    from personas.testing import write_tiny_clip

    from eval.cli import main

    clip = write_tiny_clip(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("{person} with a beard and a white shirt\na portrait photo of {person}\n")
    # Fixed settings in the sweep file; 96 px is the smallest at which dlib finds the face in the reference crops.
    (tmp_path / "sweep.toml").write_text(
        '[train]\nresolution = 96\nvalidation_every = 0\ncheckpoint_every = 0\nlog_every = 1\nface_model = "dlib"\n'
        "embedding_lr = 0.05\n[sweep]\nmax_train_steps = [3]\n")
    argv = ["sweep", "eileen", str(eileen_photos), "--lr", "1e-3,5e-3", "--config", str(tmp_path / "sweep.toml"),
            "--base-model", str(tiny_model), "--class-word", "woman", "--prompts", str(tmp_path / "prompts.txt"),
            "--render-steps", "2", "--library", str(tmp_path / "lib"), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "report"), "--face-model", "dlib", "--clip-model", f"local-dir:{clip}", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    names = ["eileen-lr1e-03-s3", "eileen-lr5e-03-s3"]
    assert Library(tmp_path / "lib").names() == names
    report = tmp_path / "report"
    for f in ("report.json", "report.csv", "report.md", "report.html", "report.pdf",
              "figures/sweep.png", "figures/sweep-grid.png", "figures/base-images.png"):
        assert (report / f).is_file() and (report / f).stat().st_size > 0, f
    data = json.loads((report / "report.json").read_text())
    sweep = data["sweep"]
    assert [r["name"] for r in sweep["rows"]] == names  # one row per variant
    assert sweep["parameters"] == ["learning_rate", "max_train_steps"]
    assert [r["learning_rate"] for r in sweep["rows"]] == [1e-3, 5e-3]
    assert sweep["best"] in names and f"Chosen: {sweep['best']}" in sweep["note"]
    for r in sweep["rows"]:
        # The tiny model draws no faces: every image is faceless and counted so, never scored 0.
        assert r["images"] == 2 and r["faceless_images"] == 2 and r["face_distance"] is None
        assert r["clip_score"] is not None and r["final_loss"] is not None
        assert len(sweep["curves"][r["name"]]) == 3  # every step's loss
    assert data["base"] is not None and len(data["base"]["images"]) == 2
    assert list(data["personas"]) == [sweep["best"]]  # the report's images are the best variant's
    md = (report / "report.md").read_text()
    assert "## Hyperparameter sweep: eileen" in md and f"{sweep['best']} (best)" in md
    assert "## Base vs personalized" in md and "figures/sweep-grid.png" in md
    assert f"best: {sweep['best']}" in out
    state = json.loads((tmp_path / "work" / "sweep.json").read_text())
    assert [v["status"] for v in state["variants"]] == ["trained", "trained"] and state["best"] == sweep["best"]
    renders = sorted((tmp_path / "work" / "renders").iterdir())
    assert [r.name for r in renders] == names
    first = sorted(p.name for p in renders[0].iterdir())

    # Again: nothing is trained or rendered again; the report is rewritten whole.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained now: none, all kept" in out
    assert sorted(p.name for p in renders[0].iterdir()) == first
    assert json.loads((report / "report.json").read_text())["sweep"]["best"] == sweep["best"]

    # A variant name taken by a persona with other settings stops the sweep before anything trains.
    (tmp_path / "sweep.toml").write_text((tmp_path / "sweep.toml").read_text().replace("embedding_lr = 0.05", "embedding_lr = 0.01"))
    assert main(argv) == 2
    assert "already in" in capsys.readouterr().err
