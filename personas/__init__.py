"""groupshot stage 1: train one identity adapter (a persona) per person.

Importing this package loads no model and touches no network or GPU: the public names
below resolve on first use. compose and eval import only these names.
"""

from __future__ import annotations

import importlib
from typing import Any

from personas.errors import GroupshotError, ModelUnavailableError, run_cli
from personas.version import TOOLKIT_VERSION

_EXPORTS = {
    # library and file formats
    "Library": "personas.library", "Persona": "personas.library", "validate_name": "personas.library",
    "sha256_file": "personas.library", "utc_now": "personas.library", "write_json_atomic": "personas.library",
    "replace_dir": "personas.library",
    "LoraWeights": "personas.adapters", "load_lora": "personas.adapters", "save_lora": "personas.adapters",
    "load_embeddings": "personas.adapters", "save_embeddings": "personas.adapters",
    "check_lora_fits": "personas.adapters", "UNET_TARGETS": "personas.adapters", "PICKLE_SUFFIXES": "personas.adapters",
    # models
    "load_base_model": "personas.models", "load_controlnet": "personas.models", "load_scheduler": "personas.models",
    "same_base_model": "personas.models", "DEFAULT_BASE_MODEL": "personas.models",
    "DEFAULT_CONTROLNET": "personas.models", "SCHEDULERS": "personas.models",
    # faces and photos
    "Face": "personas.faces", "FaceBackend": "personas.faces", "load_face_backend": "personas.faces",
    "check_photos": "personas.photos", "open_photo": "personas.photos", "PhotoReport": "personas.photos",
    # training
    "TrainConfig": "personas.config", "read_toml": "personas.config", "train_persona": "personas.train", "TrainResult": "personas.train",
    "plot_loss": "personas.train", "unfinished_run": "personas.train",
    # several processes (accelerate launch)
    "launched": "personas.parallel", "is_main_process": "personas.parallel", "process_device": "personas.parallel",
    "my_share": "personas.parallel", "gather_items": "personas.parallel", "num_processes": "personas.parallel",
}

__all__ = sorted([*_EXPORTS, "GroupshotError", "ModelUnavailableError", "run_cli", "TOOLKIT_VERSION"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'personas' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
