"""groupshot stage 3: score every face against its subject and write the report.

Importing this package loads no model: the names below resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "assign_faces": "eval.assign",
    "ClipScorer": "eval.clip_score",
    "torchmetrics_scale": "eval.clip_score",
    "compute_metrics": "eval.metrics",
    "Metrics": "eval.metrics",
    "score_renders": "eval.scoring",
    "score_images": "eval.scoring",
    "load_render": "eval.scoring",
    "default_prompts": "eval.scoring",
    "fill_prompt": "eval.scoring",
    "subject_phrase": "eval.scoring",
    "clip_text_for": "eval.scoring",
    "Scores": "eval.scoring",
    "write_report": "eval.report",
    "SweepTable": "eval.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
