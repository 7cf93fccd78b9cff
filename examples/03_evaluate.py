"""03: score every face against its person and every image against its prompt (the
course's Face Distance, CLIP Score and Faceless Images), and write the reports.

    python examples/03_evaluate.py [--tiny]

The same from the command line:
    evaluate renders/eileen/* renders/grace/* --out reports/people
"""

from __future__ import annotations

import sys

from common import setup


def main(argv: list[str] | None = None) -> int:
    ex = setup(__doc__.split("\n")[0], argv)

    from eval.cli import main as evaluate

    # One report for the people alone (the course's metrics), one for the group photos. Each
    # report names the face model and CLIP model that scored it.
    jobs = {"people": sorted(d for name in ex.photos for d in (ex.renders / name).iterdir() if d.is_dir()),
            "group": sorted(d for d in (ex.renders / "group").iterdir() if d.is_dir())}
    for report, runs in jobs.items():
        out = ex.reports / report
        code = evaluate([*map(str, runs), "--library", str(ex.library), "--out", str(out), *ex.eval_args,
                         "--title", f"groupshot example: {report}"])
        if code:
            return code
    return 0


if __name__ == "__main__":
    from personas import run_cli

    sys.exit(run_cli(main, prog="03_evaluate"))
