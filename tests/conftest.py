"""Shared fixtures: an isolated home for every test session, and real photos from registry packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# huggingface_hub reads these when it is first imported, which can happen while test
# modules are collected, before any fixture runs: set them here too. Without offline
# mode each hub id retries for minutes before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HOME and the caches point into a temporary folder, so that nothing (insightface's
    ~/.insightface, onnxruntime's ~/.cache, matplotlib's config) is written outside it."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
        mp.setenv("XDG_CACHE_HOME", str(home / ".cache"))
        mp.setenv("MPLCONFIGDIR", str(home / ".config" / "matplotlib"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.delenv("GROUPSHOT_INSIGHTFACE_ROOT", raising=False)
        yield home


def _package_file(package: str, *parts: str) -> Path:
    # Located, not imported: importing matplotlib or insightface only to find a file
    # costs seconds and writes config folders.
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"{package} is not installed"
    return Path(spec.origin).parent.joinpath(*parts)


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# Real photos, each an RGB uint8 array (H, W, 3). Each fixture also has a *_path twin
# where a test needs the file itself.


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """Eileen Collins, one face (skimage), 512x512."""
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def grace_hopper_path() -> Path:
    return _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")


@pytest.fixture(scope="session")
def grace_hopper(grace_hopper_path: Path) -> np.ndarray:
    """Grace Hopper, one face (matplotlib sample data), 512x600."""
    return _rgb(grace_hopper_path)


@pytest.fixture(scope="session")
def group_photo_path() -> Path:
    return _package_file("insightface", "data", "images", "t1.jpg")


@pytest.fixture(scope="session")
def group_photo(group_photo_path: Path) -> np.ndarray:
    """Six people in one photo (insightface's t1.jpg), 1280x886."""
    return _rgb(group_photo_path)


@pytest.fixture(scope="session")
def tom_hanks() -> np.ndarray:
    """Tom Hanks, an aligned 112x112 face crop shipped with insightface; skips if absent."""
    path = _package_file("insightface", "data", "images", "Tom_Hanks_54745.png")
    if not path.is_file():
        pytest.skip(f"insightface does not ship {path.name} in this version")
    return _rgb(path)


@pytest.fixture(scope="session")
def camera() -> np.ndarray:
    """skimage's cameraman (greyscale, as RGB), 512x512."""
    import skimage.data

    return np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)


@pytest.fixture(scope="session")
def dlib_backend():
    """The offline dlib face backend, loaded once per session (about 1 s)."""
    from personas.faces import DlibBackend

    return DlibBackend()


# -- tiny random models (shared by the personas, compose and eval tests) --------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD folder with controlnet/ (personas.testing), built once per session."""
    from personas.testing import write_model

    return write_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def eileen_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four usable photos of Eileen Collins (skimage's astronaut): original, mirrored, cropped, darker."""
    from personas.testing import sample_photos

    return sample_photos(tmp_path_factory.mktemp("eileen"), "eileen")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    on this shared 2-core machine OpenMP's spinning threads make the tiny model's small ops
    many times slower when the cores are busy (measured: the sweep test 198 s -> 75 s wall at
    load 5)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
