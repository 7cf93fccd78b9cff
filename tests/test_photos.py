"""check_photos on real photos and on every kind of bad file, with the dlib backend."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personas.errors import GroupshotError
from personas.photos import (
    FACE_CENTER_Y,
    FACE_FRACTION,
    PhotoReport,
    check_photos,
    face_crop_box,
    open_photo,
)


def _save(image: np.ndarray | Image.Image, path: Path, **kwargs) -> Path:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **kwargs)
    return path


def _reasons(report: PhotoReport) -> dict[str, str]:
    return {r.path.name: r.reason for r in report.rejected}


def _only(report: PhotoReport):
    assert not report.rejected, report.table()
    assert len(report.accepted) == 1
    return report.accepted[0]


def _face_inside(photo, resolution: int) -> None:
    x0, y0, x1, y1 = photo.face_box
    assert 0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution


@pytest.fixture
def portraits(tmp_path, astronaut, grace_hopper_path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    a = _save(astronaut, folder / "astronaut.png")
    b = folder / "hopper.jpg"
    shutil.copy(grace_hopper_path, b)
    return [a, b]


# --- accepted photos and their crops ---------------------------------------------------


def test_crops_are_square_at_resolution_with_the_face_in_the_upper_middle(portraits, dlib_backend):
    report = check_photos(portraits, backend=dlib_backend, resolution=256)
    assert [p.path.name for p in report.accepted] == ["astronaut.png", "hopper.jpg"]
    astronaut = report.accepted[0]
    assert astronaut.image.size == (256, 256) and astronaut.image.mode == "RGB"
    assert astronaut.source_size == (512, 512)
    _face_inside(astronaut, 256)
    x0, y0, x1, y1 = astronaut.face_box
    # room enough in the astronaut photo: the full geometry applies
    assert (y1 - y0) / 256 == pytest.approx(FACE_FRACTION, abs=0.01)
    assert (x0 + x1) / 2 / 256 == pytest.approx(0.5, abs=0.01)
    assert (y0 + y1) / 2 / 256 == pytest.approx(FACE_CENTER_Y, abs=0.01)
    # the crop really shows the face: dlib finds it where the face box says
    face = dlib_backend.detect(np.asarray(astronaut.image))[0]
    assert np.allclose(face.box, astronaut.face_box, atol=0.15 * (y1 - y0))
    assert float(np.linalg.norm(face.embedding - astronaut.face.embedding)) < 0.2
    assert astronaut.sha256 == hashlib.sha256(portraits[0].read_bytes()).hexdigest()
    assert report.face_model["name"] == "dlib"


def test_crop_shrinks_to_fit_a_close_portrait(tmp_path, astronaut, dlib_backend):
    # the astronaut's head and shoulders, enlarged: the ideal square (3x the face) does
    # not fit, so the crop is the largest square that does, and still holds the face
    close = Image.fromarray(astronaut).crop((100, 10, 340, 250)).resize((400, 400), Image.Resampling.LANCZOS)
    photo = _only(check_photos(_save(close, tmp_path / "close.png"), backend=dlib_backend, resolution=128))
    side = photo.crop_box[2] - photo.crop_box[0]
    assert side == 400 and photo.image.size == (128, 128)
    _face_inside(photo, 128)
    assert (photo.face_box[3] - photo.face_box[1]) / 128 > FACE_FRACTION


def test_face_crop_box_geometry():
    # plenty of room: side 3x the face height, face centred at (0.5, 0.4)
    assert face_crop_box((450, 400, 550, 500), 1000, 1000) == (350, 330, 650, 630)
    # at the top-left corner: the square is pushed inside the image, face still inside
    x0, y0, x1, y1 = face_crop_box((0, 0, 100, 100), 1000, 1000)
    assert (x0, y0, x1 - x0) == (0, 0, 300)
    # too little room: shrink to the photo, never below 1.4x the face
    assert face_crop_box((100, 100, 300, 300), 400, 450) == (0, 40, 400, 440)
    assert face_crop_box((10, 10, 310, 310), 400, 400) is None


def test_exif_orientation_is_applied(tmp_path, grace_hopper, dlib_backend):
    # stored sideways, with the EXIF tag (6: rotate 90 clockwise to display) that phones write
    sideways = Image.fromarray(grace_hopper).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _save(sideways, tmp_path / "tagged.jpg", exif=exif, quality=95)
    untagged = _save(sideways, tmp_path / "untagged.jpg", quality=95)
    assert open_photo(tagged).size == (512, 600)
    report = check_photos([tagged, untagged], backend=dlib_backend, resolution=256)
    assert [p.path.name for p in report.accepted] == ["tagged.jpg"]
    assert report.accepted[0].source_size == (512, 600)
    # HOG finds only upright faces: without the tag the same pixels show no face
    assert _reasons(report) == {"untagged.jpg": "no face found"}


@pytest.mark.parametrize(
    "mode",
    ["RGBA", "LA", "P", "P-transparent", "L", "I;16", "CMYK", "1"],
)
def test_every_pixel_format_becomes_rgb_and_keeps_the_face(tmp_path, grace_hopper, dlib_backend, mode):
    rgb = Image.fromarray(grace_hopper)
    if mode in ("RGBA", "LA"):
        image = rgb.convert(mode)
        alpha = np.full(grace_hopper.shape[:2], 255, np.uint8)
        alpha[:40] = 0  # a transparent band at the top becomes white
        image.putalpha(Image.fromarray(alpha))
        path = _save(image, tmp_path / "photo.png")
    elif mode.startswith("P"):
        image = rgb.quantize(256)
        kwargs = {"transparency": 0} if mode == "P-transparent" else {}
        path = _save(image, tmp_path / "photo.png", **kwargs)
    elif mode == "I;16":
        grey = np.asarray(rgb.convert("L")).astype(np.uint16) * 257  # full 16-bit range
        path = _save(Image.fromarray(grey), tmp_path / "photo.png")
        with Image.open(path) as reread:
            assert reread.mode.startswith("I")  # really a 16-bit file
    elif mode == "CMYK":
        path = _save(rgb.convert("CMYK"), tmp_path / "photo.jpg", quality=95)
    elif mode == "1":
        path = _save(rgb.convert("1"), tmp_path / "photo.png")
    else:
        path = _save(rgb.convert(mode), tmp_path / "photo.jpg", quality=95)

    decoded = open_photo(path)
    assert decoded.mode == "RGB" and decoded.size == (512, 600)
    pixels = np.asarray(decoded)
    if mode in ("RGBA", "LA"):
        assert np.all(pixels[:40] == 255)
    if mode == "I;16":
        # 16 bits scaled to 8, not clipped at 255
        expected = np.asarray(rgb.convert("L"))
        assert np.abs(pixels[:, :, 0].astype(int) - expected).max() <= 1
    if mode == "1":
        # dithered black and white decodes to pure 0/255 RGB; HOG on dithering is not
        # what this test is about
        assert set(np.unique(pixels)) <= {0, 255}
        return
    photo = _only(check_photos(path, backend=dlib_backend, resolution=128))
    assert photo.image.mode == "RGB" and photo.image.size == (128, 128)


def test_webp_is_read_by_content_whatever_the_extension(tmp_path, astronaut, dlib_backend):
    path = _save(astronaut, tmp_path / "astronaut.jpeg", format="WEBP", quality=90)
    assert _only(check_photos(path, backend=dlib_backend, resolution=128)).image.size == (128, 128)


# --- rejections ------------------------------------------------------------------------


def test_every_rejection_has_its_reason(tmp_path, astronaut, group_photo_path, dlib_backend):
    import skimage.data

    d = tmp_path / "in"
    d.mkdir()
    _save(astronaut, d / "a_good.png")
    (d / "b_empty.jpg").write_bytes(b"")
    (d / "c_text.jpg").write_text("not a photo at all\n")
    full = _save(astronaut, tmp_path / "full.jpg", quality=90).read_bytes()
    (d / "d_truncated.jpg").write_bytes(full[: len(full) // 2])
    _save(Image.fromarray(astronaut).resize((200, 150)), d / "e_tiny.png")
    _save(skimage.data.coffee(), d / "f_coffee.png")
    _save(np.full((400, 400, 3), (90, 140, 200), np.uint8), d / "g_flat.png")
    shutil.copy(group_photo_path, d / "h_group.jpg")
    shutil.copy(d / "a_good.png", d / "i_copy.png")
    _save(astronaut, d / "j_resaved.png", compress_level=1)  # other bytes, same pixels
    frames = [Image.fromarray(astronaut), Image.fromarray(astronaut[:, ::-1].copy())]
    frames[0].save(d / "k_animated.png", save_all=True, append_images=frames[1:])
    _save(astronaut, d / "l_gif.gif")
    small_face = np.full((800, 800, 3), 120, np.uint8)
    small_face[300:556, 300:556] = np.asarray(Image.fromarray(astronaut).resize((256, 256)))
    _save(small_face, d / "m_small_face.png")
    (d / ".hidden.jpg").write_bytes(b"")  # dotfiles are skipped
    (d / "sub").mkdir()
    _save(astronaut, d / "sub" / "nested.png")  # folders are not searched recursively

    report = check_photos(d, backend=dlib_backend, resolution=512)
    assert [p.path.name for p in report.accepted] == ["a_good.png"]
    reasons = _reasons(report)
    assert reasons.pop("b_empty.jpg") == "not an image (empty file)"
    assert reasons.pop("c_text.jpg") == "not an image (JPEG, PNG or WebP expected)"
    assert reasons.pop("d_truncated.jpg").startswith("unreadable: image file is truncated")
    assert reasons.pop("e_tiny.png") == "too small: 200x150 px (minimum 256 px on the short side)"
    assert reasons.pop("f_coffee.png") == "no face found"
    assert reasons.pop("g_flat.png") == "no face found"
    assert reasons.pop("h_group.jpg") == "6 faces found (exactly one person per photo)"
    assert reasons.pop("i_copy.png") == "duplicate of a_good.png"
    assert reasons.pop("j_resaved.png") == "duplicate of a_good.png (same pixels)"
    assert reasons.pop("k_animated.png") == "animated PNG (2 frames): use a still photo"
    assert reasons.pop("l_gif.gif") == "unsupported format GIF (use JPEG, PNG or WebP)"
    assert reasons.pop("m_small_face.png").startswith("face too small: ")
    assert reasons == {}
    assert report.total == 13
    table = report.table()
    assert table.splitlines()[0].split() == ["photo", "status", "detail"]
    assert "h_group.jpg" in table and "13 photos: 1 usable, 12 rejected" in table


def test_face_filling_the_photo_is_rejected(tmp_path, astronaut, dlib_backend):
    # just the face, enlarged: no square around it fits with a margin, and we never pad
    tight = Image.fromarray(astronaut).crop((160, 60, 280, 180)).resize((360, 360), Image.Resampling.LANCZOS)
    report = check_photos(_save(tight, tmp_path / "tight.png"), backend=dlib_backend, resolution=128)
    (reason,) = _reasons(report).values()
    assert reason.startswith("face fills the photo")


def test_decompression_bomb_is_rejected(tmp_path, astronaut, dlib_backend, monkeypatch):
    path = _save(astronaut, tmp_path / "big.png")
    # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; both reject
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    expected = "image too large (0.3 Mpx, limit {} Mpx): downscale it"
    assert _reasons(check_photos(path, backend=dlib_backend)) == {"big.png": expected.format("0.2")}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert _reasons(check_photos(path, backend=dlib_backend)) == {"big.png": expected.format("0.1")}


def test_background_faces_are_ignored_but_counted(tmp_path, astronaut, dlib_backend):
    # a big portrait, and the same face at a third of the size pasted at the side
    canvas = np.asarray(Image.fromarray(astronaut).resize((768, 768), Image.Resampling.LANCZOS)).copy()
    small = np.asarray(Image.fromarray(astronaut).crop((150, 50, 290, 190)).resize((70, 70)))
    canvas[600:670, 20:90] = small
    path = _save(canvas, tmp_path / "with_stranger.png")
    assert len(dlib_backend.detect(canvas)) == 2
    photo = _only(check_photos(path, backend=dlib_backend, resolution=128))
    assert photo.background_faces == 1
    # counted as a second person when background faces are not ignored
    strict = check_photos(path, backend=dlib_backend, resolution=128, background_face_ratio=0.0)
    assert _reasons(strict) == {"with_stranger.png": "2 faces found (exactly one person per photo)"}


def test_require_names_every_rejection_and_the_fix(tmp_path, astronaut, dlib_backend):
    good = _save(astronaut, tmp_path / "a.png")
    (tmp_path / "b.jpg").write_text("text")
    _save(np.zeros((300, 300, 3), np.uint8), tmp_path / "c.png")
    report = check_photos([good, tmp_path / "b.jpg", tmp_path / "c.png"], backend=dlib_backend)
    assert report.require(1) is report
    with pytest.raises(GroupshotError) as caught:
        report.require(3)
    message = str(caught.value)
    assert message == (
        "only 1 of 3 photos are usable (min 3): b.jpg: not an image (JPEG, PNG or WebP expected); "
        "c.png: no face found; add more photos or lower --min-photos"
    )
    with pytest.raises(GroupshotError, match="--min-photos must be at least 1"):
        report.require(0)


def test_bad_arguments_fail_before_any_work(tmp_path, dlib_backend):
    with pytest.raises(FileNotFoundError, match="photo path not found: .*missing.jpg"):
        check_photos([tmp_path / "missing.jpg"], backend=dlib_backend)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GroupshotError, match="no photos found in .*empty"):
        check_photos(tmp_path / "empty", backend=dlib_backend)
    with pytest.raises(GroupshotError, match="resolution must be a multiple of 8"):
        check_photos(tmp_path, backend=dlib_backend, resolution=500)
    with pytest.raises(GroupshotError, match=r"tmp.*nope\.png: not an image"):
        (tmp_path / "nope.png").write_text("x")
        open_photo(tmp_path / "nope.png")
