"""The examples run top to bottom with --tiny (offline models, public-domain photos), and so
do the Colab notebook's code cells with TINY = True, so that neither rots.

They run in this process (runpy / exec), which has torch and diffusers imported already:
a subprocess per script would spend most of its time importing them again.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["01_train_two_people.py", "02_compose.py", "03_evaluate.py", "04_sweep.py"]


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "common", raising=False)


def _run_script(name: str, work: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), "--tiny", "--work", str(work)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert e.value.code == 0, f"{name} exited with {e.value.code}"


def test_numbered_examples_run_top_to_bottom(tmp_path, examples_on_path, monkeypatch):
    work = tmp_path / "work"
    for name in SCRIPTS:
        _run_script(name, work, monkeypatch)

    people = work / "people"
    assert sorted(p.name for p in people.iterdir() if not p.name.startswith(".")) == [
        "eileen", "eileen-lr1e-03", "eileen-lr2e-02", "eileen-lr5e-03", "grace"]
    for name in ("eileen", "grace"):
        assert (people / name / "train" / "loss.png").is_file()
        assert len(list((work / "renders" / name).iterdir())) == 2  # one run per prompt (--tiny: the first 2)
    group_runs = list((work / "renders" / "group").iterdir())
    assert len(group_runs) == 2 and all((r / "masks.png").is_file() for r in group_runs)
    for report in ("people", "group", "sweep"):
        data = json.loads((work / "reports" / report / "report.json").read_text())
        text = json.dumps(data)
        assert "dlib" in text and "tiny-clip" in text, f"report {report} does not name its models"
    sweep = json.loads((work / "reports" / "sweep" / "report.json").read_text())
    assert "sweep" in json.dumps(sweep)


def _notebook_code(path: Path) -> list[str]:
    """The notebook's code cells with TINY switched on; shell lines (!pip ...) left out."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        cells.append("\n".join(line for line in lines if not line.lstrip().startswith(("!", "%"))))
    source = "\n".join(cells)
    assert source.count("TINY = False  # @param") == 1, "the notebook's TINY switch moved; update this test"
    return [c.replace("TINY = False  # @param", "TINY = True  # @param") for c in cells]


def test_colab_notebook_runs_with_tiny(tmp_path, monkeypatch):
    nb = EXAMPLES / "groupshot_colab.ipynb"
    cells = _notebook_code(nb)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for i, code in enumerate(cells):
        try:
            exec(compile(code, f"{nb.name}[cell {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"notebook code cell {i} failed: {type(e).__name__}: {e}") from e
    work = tmp_path / "groupshot-colab"
    assert namespace["study"].best and (work / "reports" / "study" / "report.pdf").is_file()
    assert (work / "reports" / "group" / "report.html").is_file()
    assert (work / "groupshot-reports.zip").is_file()
