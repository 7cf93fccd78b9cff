"""The web demo (`compose --ui`): upload checks and settings, and one real browser session
(headless Chromium through selenium) on the tiny offline model: train a person from
uploaded photos, compose two people, see the image and the scores, take a screenshot.

The screenshot goes to the test's folder; GROUPSHOT_UPDATE_DOCS=1 also copies it to
docs/demo.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from personas.errors import GroupshotError

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1400,1750"]


# -- checks without a browser -------------------------------------------------------------------


def test_uploads_are_checked_and_copied_into_a_fresh_folder(tmp_path, eileen_photos):
    from compose.ui import PHOTO_SUFFIXES, check_uploads

    photos = sorted(eileen_photos.iterdir())
    got = check_uploads(photos, tmp_path / "in", what="photos", suffixes=PHOTO_SUFFIXES, max_files=10, max_mb=5)
    assert [p.name for p in got] == [f"{i:03d}{p.suffix.lower()}" for i, p in enumerate(photos)]
    assert all(p.parent == tmp_path / "in" for p in got)

    fake = tmp_path / "photo.png"
    fake.write_bytes(b"not an image at all")
    script = tmp_path / "run.sh"
    script.write_text("echo hi")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases = [
        (dict(files=photos[:1]), "at least 3"),
        (dict(files=photos, max_files=2), "at most 2"),
        (dict(files=[*photos[:3], script]), "run.sh is not a jpg"),
        (dict(files=[*photos[:3], fake]), "photo.png"),
        (dict(files=[*photos[:3], empty]), "empty"),
        (dict(files=photos, max_mb=0.05), "the limit is 0.05 MB"),
        (dict(files=None), "0 file"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        args = dict(what="photos", suffixes=PHOTO_SUFFIXES, max_files=10, max_mb=5, min_files=3)
        args.update({k: v for k, v in kwargs.items() if k != "files"})
        with pytest.raises(GroupshotError, match=message):
            check_uploads(kwargs["files"], tmp_path / f"bad{i}", **args)


def test_settings_file(tmp_path, tiny_model):
    from compose.ui import DemoSettings

    f = tmp_path / "demo.toml"
    f.write_text('face_model = "dlib"\nrender_size = [64, 96]\n[train]\nresolution = 96\nmax_train_steps = 4\n')
    s = DemoSettings.from_toml(f, base_model=str(tiny_model))
    assert s.face_model == "dlib" and s.render_size == (64, 96) and s.train.max_train_steps == 4
    assert s.train.base_model == str(tiny_model)
    for text, message in [('colour = "red"\n', "unknown keys colour"), ("[train]\nsteps = 4\n", "steps"),
                          ('face_model = "eyes"\n', "face_model"), ("num_images = 0\n", "num_images"),
                          ("render_size = 5\n", "render_size"), ("[[", "not valid TOML")]:
        f.write_text(text)
        with pytest.raises(GroupshotError, match=message):
            DemoSettings.from_toml(f)


def test_pose_preview_names_the_people_and_notes_a_count_mismatch(tmp_path):
    from compose.ui import Demo, DemoSettings

    demo = Demo(DemoSettings(), library=tmp_path / "people", out=tmp_path / "renders")
    image, note = demo.preview(["ann"], "two_standing", (64, 64))
    assert "has 2 people; 1 picked" in note and image.size == (2 * 384, 384)
    image, note = demo.preview(["ann", "bob"], "two_standing", (512, 512))
    assert note == "" and image.size == (1024, 512)
    assert demo.preview([], None, (64, 64)) == (None, "")


def test_cli_flags_that_belong_to_ui(capsys):
    from compose.cli import main

    assert main(["--share", "--people", "a", "--prompt", "x"]) == 2
    assert "--share and --ui-config go with --ui" in capsys.readouterr().err


# -- the browser session ----------------------------------------------------------------------


def _chromium_or_skip() -> None:
    """Debian's chromium + chromium-driver, installed with apt-get when missing (never a
    downloaded browser); skip, saying why, only if they cannot be installed."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing and apt-get is not usable here "
                    "(install Debian's chromium and chromium-driver to run the browser test)")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"chromium could not be installed: `{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"apt-get installed chromium, but {CHROMIUM} / {CHROMEDRIVER} are still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"compose --ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"compose --ui did not answer on {url} in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory, eileen_photos):
    """`compose --ui` on the tiny model, with one person (grace) already in the library."""
    from personas.config import TrainConfig
    from personas.library import Library
    from personas.testing import sample_photos, write_tiny_clip
    from personas.train import train_persona

    _chromium_or_skip()
    root = tmp_path_factory.mktemp("demo")
    train = dict(resolution=96, max_train_steps=4, validation_every=0, checkpoint_every=0, log_every=1,
                 face_model="dlib", class_word="woman", learning_rate=5e-3, embedding_lr=5e-2)
    train_persona("grace", [sample_photos(root / "grace", "grace")],
                  TrainConfig(base_model=str(tiny_model), **train), library=Library(root / "people"), progress=False)
    config = root / "demo.toml"
    config.write_text(
        f'face_model = "dlib"\nclip_model = "local-dir:{write_tiny_clip(root / "clip")}"\n'
        "render_size = [64, 64]\nrender_steps = 4\nnum_images = 1\n[train]\n"
        + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in train.items()),
        encoding="utf-8",
    )
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(root / "gradio"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "compose.cli", "--ui", "--port", str(port), "--base-model", str(tiny_model),
           "--controlnet", str(tiny_model / "controlnet"), "--library", str(root / "people"),
           "--out", str(root / "renders"), "--ui-config", str(config)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/", proc, log)
        yield {"url": f"http://127.0.0.1:{port}/", "port": port, "root": root, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise AssertionError("selenium is not installed: `pip install -e .[test]` (tests/run.sh does)") from None
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # An explicit driver: selenium's own manager would look for (and download) one.
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_listens_on_localhost_only(server):
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    for address in addresses - {"127.0.0.1"}:
        if address.startswith("127."):
            continue
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, server["port"])) != 0, f"the demo answers on {address}"


def test_train_compose_and_score_in_a_browser(server, eileen_photos, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        wait = WebDriverWait(driver, 240)

        def text(element_id: str) -> str:
            return driver.find_element(By.ID, element_id).text

        def errors() -> list[str]:
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".toast-body") if e.text.strip()]

        def tab(label: str) -> None:
            driver.find_element(By.XPATH, f"//button[@role='tab'][contains(., '{label}')]").click()

        driver.get(server["url"])
        # People: train "ann" from four uploaded photos.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#train-name textarea"))
        driver.find_element(By.CSS_SELECTOR, "#train-name textarea").send_keys("ann")
        photos = sorted(str(p) for p in eileen_photos.iterdir())
        driver.find_element(By.CSS_SELECTOR, "#train-photos input[type=file]").send_keys("\n".join(photos))
        # Each uploaded file gets a download link once the server has it.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#train-photos a[download]")) == len(photos))
        driver.find_element(By.ID, "train-button").click()
        wait.until(lambda d: "trained ann" in text("train-status") or errors())
        assert not errors(), errors()
        assert "<ann> woman" in text("train-status")
        wait.until(lambda d: "### ann" in text("persona-card") or "prompt words" in text("persona-card"))
        assert "ann" in text("people-table") and "grace" in text("people-table")
        assert driver.find_elements(By.CSS_SELECTOR, "#persona-loss img"), "no loss curve on the card"

        # Compose: both people on the two_standing template; the preview names them.
        tab("Compose")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#compose-people input[name='grace']"))
        for name in ("ann", "grace"):
            box = driver.find_element(By.CSS_SELECTOR, f"#compose-people input[name='{name}']")
            box.click()
            wait.until(lambda d, box=box: box.is_selected())
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pose-preview img") and not text("pose-note"))
        prompt = driver.find_element(By.CSS_SELECTOR, "#compose-prompt textarea")
        prompt.clear()
        prompt.send_keys("two women at a beach bar, photo")
        driver.find_element(By.ID, "compose-button").click()
        wait.until(lambda d: "Face Distance" in text("compose-scores") or errors())
        assert not errors(), errors()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#compose-gallery img")) >= 1
        scores = text("compose-scores")
        assert "CLIP Score" in scores and "Faceless Images" in scores
        assert "faces: dlib" in scores and "CLIP: local-dir:" in scores  # the models used are named
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))

        # Scores: the per-image table and, per person, the reference beside their face.
        tab("Scores")
        wait.until(lambda d: "000.png" in text("score-images"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#score-faces img")) >= 2
        assert "ann, grace" in text("score-images")  # noise has no faces: both counted missing, never scored 0
    finally:
        driver.quit()

    run = next((server["root"] / "renders").iterdir())
    assert (run / "render.json").is_file() and (run / "report" / "report.html").is_file()
    with Image.open(shot) as im:
        assert im.size[0] >= 1000
    if os.environ.get("GROUPSHOT_UPDATE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "demo.png")
    # Uploads never land beside the library: only personas (and the library's own folders) are there.
    assert sorted(p.name for p in (server["root"] / "people").iterdir() if not p.name.startswith(".")) == ["ann", "grace"]
