"""groupshot stage 2: compose group photos where every person keeps their own face.

Importing this package loads no model and imports no torch or diffusers: the public names
below are looked up on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # pipeline: the one way to render
    "GroupComposer": "compose.pipeline",
    "ComposeRequest": "compose.pipeline",
    "RenderPlan": "compose.pipeline",
    "RenderResult": "compose.pipeline",
    "METHODS": "compose.pipeline",
    "RENDER_FILE": "compose.pipeline",
    "read_render": "compose.pipeline",
    "replay": "compose.pipeline",
    "preview_pose": "compose.pipeline",
    "with_class_words": "compose.pipeline",
    # poses and regions
    "Pose": "compose.poses",
    "load_pose": "compose.poses",
    "draw_pose": "compose.poses",
    "assign_people": "compose.poses",
    "list_templates": "compose.poses",
    "Regions": "compose.regions",
    "regions_from_pose": "compose.regions",
    "head_boxes": "compose.regions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compose' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
