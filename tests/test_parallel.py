"""Several processes on the CPU (gloo), tiny model: data-parallel training matches one process
at the same global batch, compose and evaluate split their items and gather one result,
`personas train --gpus`, and `personas train-all` over a roster with CPU workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personas.errors import GroupshotError
from personas.library import Library

RESOLUTION = 96  # the smallest at which dlib still finds the face in the 96 px reference crops
TRAIN = {"resolution": RESOLUTION, "max_train_steps": 3, "validation_every": 0, "checkpoint_every": 0,
         "log_every": 1, "face_model": "dlib", "class_word": "woman", "learning_rate": 5e-3, "embedding_lr": 5e-2}
LAUNCH_TIMEOUT = 480


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def _env(tmp_path: Path) -> dict[str, str]:
    # One thread per process: two processes on two cores, as a real launch would share them.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GROUPSHOT_LOG": "WARNING"}


def test_launch_command_and_option_stripping():
    from personas.parallel import launch_command, without_option

    cmd = launch_command("personas.cli", ["train", "x", "--gpus", "2"], 2, port=1234)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[cmd.index("--main_process_port") + 1] == "1234"
    assert cmd[-6:] == ["-m", "personas.cli", "train", "x", "--gpus", "2"]
    assert without_option(["--library", "L", "train", "x", "--gpus", "2", "--quiet"], "--gpus") == \
        ["--library", "L", "train", "x", "--quiet"]
    assert without_option(["train", "--gpus=4", "x"], "--gpus") == ["train", "x"]
    with pytest.raises(ValueError):
        launch_command("personas.cli", [], 1)


def test_alone_nothing_is_split_or_gathered():
    from personas.parallel import gather_items, is_main_process, launched, my_share, process_device, run_on_main

    assert not launched() and is_main_process() and process_device() is None
    assert my_share([1, 2, 3]) == [1, 2, 3] and gather_items([4]) == [4]
    assert run_on_main(lambda: "x") == "x"
    with pytest.raises(GroupshotError, match="boom"):
        run_on_main(lambda: (_ for _ in ()).throw(GroupshotError("boom")))


def test_gpus_flag_on_a_machine_without_enough_gpus(capsys, tmp_path):
    import torch

    from personas.cli import main

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs: --gpus 2 would really launch")
    code = main(["--library", str(tmp_path), "train", "x", str(tmp_path), "--gpus", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--gpus 2" in err and "visible CUDA GPU" in err and "Traceback" not in err
    assert main(["--library", str(tmp_path), "train", "x", "--gpus", "0"]) == 2


# -- one launch, three stages: data-parallel training, a prompt set, an evaluation ----------

DRIVER = '''
import json, sys
from personas.cli import main as personas_main
from compose.cli import main as compose_main
from eval.cli import main as evaluate_main

for stage, argv in json.loads(sys.argv[1]):
    code = {"personas": personas_main, "compose": compose_main, "evaluate": evaluate_main}[stage](argv)
    if code:
        sys.exit(code)
'''


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory, tiny_model, eileen_photos):
    """`accelerate launch` with 2 CPU processes running, in turn: `personas train` (batch 1
    per process), `compose --prompts` (3 prompts), `evaluate --images` (4 images)."""
    from personas.parallel import launch_command
    from personas.testing import write_tiny_clip

    root = tmp_path_factory.mktemp("launch")
    (root / "gs_launch_driver.py").write_text(DRIVER)
    (root / "train.toml").write_text(_toml({**TRAIN, "base_model": str(tiny_model)}))
    (root / "prompts.txt").write_text("# three prompts for two processes\n{person} with a beard\n"
                                      "a portrait photo of {person}\n{person} on a beach\n")
    clip = write_tiny_clip(root / "clip")
    images = root / "images"  # real faces (Eileen) and one image without any
    images.mkdir()
    for i, name in enumerate(["a.png", "b.jpg", "d.jpg"]):
        Image.open(eileen_photos / name).convert("RGB").save(images / f"{i}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(images / "3.png")
    lib = root / "lib"
    stages = {
        "train": ["--library", str(lib), "train", "e", str(eileen_photos), "--config", str(root / "train.toml"), "--quiet"],
        "compose": ["--library", str(lib), "--people", "e", "--prompts", str(root / "prompts.txt"),
                    "--base-model", str(tiny_model), "--controlnet", str(tiny_model / "controlnet"),
                    "--size", "64x64", "--steps", "2"],
        "evaluate": ["--library", str(lib), "--images", str(images), "--people", "e", "--prompt", "{person} in space",
                     "--face-model", "dlib", "--clip-model", f"local-dir:{clip}"],
    }
    argv = [("personas", stages["train"]), ("compose", [*stages["compose"], "--out", str(root / "renders2")]),
            ("evaluate", [*stages["evaluate"], "--out", str(root / "report2")])]
    cmd = launch_command("gs_launch_driver", [json.dumps(argv)], 2)
    proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, stages, proc.stdout


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(folder / "adapter_model.safetensors"), **load_file(folder / "embeddings.safetensors")}


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a)
    return (num / sum(float((b[k].double() ** 2).sum()) for k in b)) ** 0.5


def test_data_parallel_training_matches_one_process_at_the_same_global_batch(launched_run, tiny_model, eileen_photos):
    from personas.config import TrainConfig
    from personas.train import train_persona

    root, _, stdout = launched_run
    lib = Library(root / "lib")
    # Only the main process wrote: one persona, no staging leftovers, one report line.
    assert lib.names() == ["e"] and not [p for p in lib.root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert stdout.count("trained e:") == 1
    p = lib.load("e")
    assert p.extra["processes"] == 2 and p.extra["global_batch_size"] == 2 and p.hyperparameters["batch_size"] == 1

    one = Library(root / "one")
    config = TrainConfig(**{**TRAIN, "base_model": str(tiny_model), "batch_size": 2})
    train_persona("e", [eileen_photos], config, library=one, progress=False)
    # Same global batch (2 processes x 1 vs 1 process x 2): the same adapter and token vectors
    # up to float rounding (measured 2e-6). Without the gradient averaging, or with each
    # process drawing its own batch, they differ by about 0.2 (as batch 1 vs batch 2 does).
    assert _rel(_adapter(p.path), _adapter(one.path("e"))) < 1e-4
    # The logged loss is the global batch's: the two loss curves agree.
    curve = lambda folder: [float(l.split(",")[1]) for l in (folder / "train" / "loss.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(curve(p.path), curve(one.path("e")), atol=1e-5)


def _renders(out: Path) -> dict[str, list[np.ndarray]]:
    runs = {}
    for run in sorted(out.iterdir()):
        record = json.loads((run / "render.json").read_text())
        runs[record["request"]["prompt"]] = [np.asarray(Image.open(run / im["file"]), dtype=np.int16) for im in record["images"]]
    return runs


def test_compose_splits_a_prompt_set_between_processes(launched_run, capsys):
    from compose.cli import main

    root, stages, stdout = launched_run
    two = _renders(root / "renders2")
    assert sorted(two) == ["a <e> woman on a beach", "a <e> woman with a beard", "a portrait photo of a <e> woman"]
    printed = [l for l in stdout.splitlines() if str(root / "renders2") in l]
    assert len(printed) == 3 and sorted(printed) == sorted(str(p) for p in (root / "renders2").iterdir())
    # One process renders the same images (the same seeds; threads may round differently).
    assert main([*stages["compose"], "--out", str(root / "renders1")]) == 0
    lines = capsys.readouterr().out.split()
    one = _renders(root / "renders1")
    assert one.keys() == two.keys() and len(lines) == 3
    # In prompt order, as the file lists them.
    assert [json.loads((Path(l) / "render.json").read_text())["request"]["prompt"] for l in lines] == \
        ["a <e> woman with a beard", "a portrait photo of a <e> woman", "a <e> woman on a beach"]
    for prompt in one:
        assert np.abs(one[prompt][0] - two[prompt][0]).max() <= 2, prompt


def test_evaluate_splits_the_images_and_writes_one_report(launched_run):
    from eval.cli import main

    root, stages, stdout = launched_run
    assert stdout.count("report:") == 1  # only the main process wrote and reported
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".report")) == []
    assert main([*stages["evaluate"], "--out", str(root / "report1")]) == 0
    two = json.loads((root / "report2" / "report.json").read_text())
    one = json.loads((root / "report1" / "report.json").read_text())
    assert two["timing"]["processes"] == 2 and one["timing"]["processes"] == 1
    assert [im["key"] for im in two["images"]] == [im["key"] for im in one["images"]]  # every image once, in order
    assert [im["n_faces"] for im in two["images"]] == [im["n_faces"] for im in one["images"]] == [1, 1, 1, 0]
    for name in ("face_distance", "clip_score", "faceless_images"):
        a, b = two["metrics"]["course"][name]["value"], one["metrics"]["course"][name]["value"]
        assert a == pytest.approx(b, abs=1e-5), name
    assert two["metrics"]["counts"] == one["metrics"]["counts"]


# -- train-all ------------------------------------------------------------------------------


def test_roster_errors(tmp_path):
    from personas.roster import load_roster

    def roster(text: str) -> Path:
        path = tmp_path / "roster.toml"
        path.write_text(text)
        return path

    (tmp_path / "photos").mkdir()
    cases = [
        ("", "no [[person]] entries"),
        ('[[person]]\nname = "a"\nphotos = "photos"\nlr = 1\n', "unknown keys lr"),
        ('[[person]]\nname = "a b"\nphotos = "photos"\n', "invalid persona name"),
        ('[[person]]\nname = "a"\nphotos = "nowhere"\n', "photos not found"),
        ('[[person]]\nname = "a"\nphotos = "photos"\noverrides = { rank = 4 }\n', "unknown keys rank"),
        ('[train]\nlearning_rate = -1\n[[person]]\nname = "a"\nphotos = "photos"\n', "learning_rate"),
        ('[[person]]\nname = "a"\nphotos = "photos"\n[[person]]\nname = "a"\nphotos = "photos"\n', "listed twice"),
        ('[people]\n', "unknown top-level keys people"),
    ]
    for text, needle in cases:
        with pytest.raises(GroupshotError) as e:
            load_roster(roster(text))
        assert needle in str(e.value), (text, str(e.value))
    r = load_roster(roster('[train]\nlora_rank = 8\n[[person]]\nname = "a"\nphotos = ["photos"]\n'
                           'overrides = { learning_rate = 2e-4 }\n'))
    assert r.people[0].config.lora_rank == 8 and r.people[0].config.learning_rate == 2e-4
    assert r.people[0].photos == [tmp_path / "photos"]


def test_train_all_with_cpu_workers(tmp_path, tiny_model, eileen_photos, camera, capsys, monkeypatch):
    from personas.cli import main

    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    (tmp_path / "noface").mkdir()
    Image.fromarray(camera).save(tmp_path / "noface" / "cam.png")
    roster = tmp_path / "roster.toml"
    roster.write_text("[train]\n" + _toml({**TRAIN, "base_model": str(tiny_model), "max_train_steps": 2})
                      + '[[person]]\nname = "cat"\nphotos = ["noface"]\n'
                      + f'[[person]]\nname = "ann"\nphotos = [{json.dumps(str(eileen_photos))}]\n'
                      + 'overrides = { method = "lora" }\n')
    lib = tmp_path / "lib"
    code = main(["--library", str(lib), "train-all", str(roster), "--workers", "2"])
    out, err = capsys.readouterr()
    assert code == 1, err
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "failed" in rows["cat"] and "no face found" in rows["cat"] and "trained" in rows["ann"]
    assert "cpu worker" in rows["ann"] and "1 of 2 failed: cat" in err
    assert Library(lib).names() == ["ann"] and Library(lib).load("ann").method == "lora"
    assert (lib / ".logs" / "cat.log").is_file()

    # Again: ann is skipped, cat fails again (and alone decides the exit code).
    code = main(["--library", str(lib), "train-all", str(roster), "--workers", "2"])
    out, _ = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert code == 1 and "skipped" in rows["ann"] and "failed" in rows["cat"]


def test_prompt_set_inputs(tmp_path, capsys):
    from compose.cli import main
    from compose.prompt_set import fill_people
    from personas.library import Persona

    brad = Persona(name="brad", tokens=["<brad>", "<brad>_1"], class_word="man", base_model={}, method="pivotal",
                   hyperparameters={}, photos=[], adapter_sha256=None, embeddings_sha256=None, created_at="",
                   trigger="<brad> man")
    ann = Persona(name="ann", tokens=[], class_word="woman", base_model={}, method="lora", hyperparameters={},
                  photos=[], adapter_sha256=None, embeddings_sha256=None, created_at="", trigger="ann woman")
    assert fill_people("{person} at a bar", [brad, ann]) == "a <brad> man and a woman at a bar"
    assert fill_people("two people at a bar", [brad]) == "two people at a bar"
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    for argv, needle in [
        (["--prompt", "x", "--prompts", str(tmp_path / "empty.txt")], "not both"),
        (["--prompts", str(tmp_path / "none.txt")], "file not found"),
        (["--prompts", str(tmp_path / "empty.txt")], "no prompts"),
    ]:
        code = main(["--people", "ann", "--library", str(tmp_path / "lib"), "--out", str(tmp_path / "r"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r").exists()


def test_train_all_slots_are_checked(tmp_path, capsys):
    import torch

    from personas.cli import main

    if torch.cuda.is_available():
        pytest.skip("CPU-only checks")
    roster = tmp_path / "roster.toml"
    (tmp_path / "p").mkdir()
    roster.write_text('[[person]]\nname = "a"\nphotos = "p"\n')
    for argv, needle in [(["--gpus", "1"], "no CUDA GPU is visible"), (["--workers", "0"], "--workers 0")]:
        assert main(["--library", str(tmp_path / "lib"), "train-all", str(roster), *argv]) == 2
        assert needle in capsys.readouterr().err
