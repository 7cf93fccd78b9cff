"""eval.metrics: the course's bands at their edges, counts kept apart, size buckets; prompt helpers."""

from __future__ import annotations

import pytest

from eval.metrics import (
    CLIP_SCORE_BANDS,
    FACE_DISTANCE_BANDS,
    FACELESS_BANDS,
    FaceRecord,
    ImageRecord,
    PersonRecord,
    band_for,
    compute_metrics,
    size_bucket,
)


@pytest.mark.parametrize("value, points", [
    (0.0, 10), (0.7999, 10), (0.8, 8), (0.999, 8), (1.0, 6), (1.1999, 6), (1.2, 3), (2.0, 3),
])
def test_face_distance_bands(value, points):
    assert band_for(FACE_DISTANCE_BANDS, value).points == points


@pytest.mark.parametrize("value, points", [
    (0.35, 8), (0.30, 8), (0.2999, 6), (0.25, 6), (0.2499, 4), (0.20, 4), (0.1999, 2), (-0.1, 2),
])
def test_clip_score_bands(value, points):
    assert band_for(CLIP_SCORE_BANDS, value).points == points


@pytest.mark.parametrize("count, points", [(0, 7), (2, 7), (3, 5), (4, 5), (5, 3), (6, 3), (7, 0), (40, 0)])
def test_faceless_bands(count, points):
    assert band_for(FACELESS_BANDS, count).points == points


def test_size_buckets():
    assert [size_bucket(x) for x in (0.05, 0.1, 0.19, 0.2, 0.34, 0.35, 0.9)] == [
        "< 0.10", "0.10-0.20", "0.10-0.20", "0.20-0.35", "0.20-0.35", ">= 0.35", ">= 0.35"]


def _image(key, people, **kw):
    return ImageRecord(key=key, path=f"/x/{key}", source="/x", people=people, **kw)


def test_missing_and_unreadable_are_counted_apart_not_averaged():
    images = [
        _image("a", ["p", "q"], clip_score=0.31, n_faces=2),
        _image("b", ["p", "q"], clip_score=0.21, n_faces=1, faceless=True, missing=["q"]),
        _image("c", ["p", "q"], status="unreadable: truncated"),
    ]
    people = [
        PersonRecord("a", "p", 0, distance=0.2, width_fraction=0.3, match=True),
        PersonRecord("a", "q", 1, distance=0.6, width_fraction=0.05, match=False, swap=True),
        PersonRecord("b", "p", 0, distance=0.4, width_fraction=0.15, match=True),
        PersonRecord("b", "q", None),
    ]
    faces = [
        FaceRecord("a", 0, [0, 0, 30, 30], 1.0, 0.3, {"p": 0.2, "q": 0.9}, person="p"),
        FaceRecord("a", 1, [50, 0, 55, 5], 1.0, 0.05, {"p": 0.5, "q": 0.6}, person="q", swap=True),
        FaceRecord("b", 0, [0, 0, 15, 15], 1.0, 0.15, {"p": 0.4, "q": 0.8}, person="p"),
        FaceRecord("b", 1, [60, 0, 90, 30], 1.0, 0.3, {"p": 0.9, "q": 0.95}),  # extra
    ]
    m = compute_metrics(images, people, faces, match_threshold=0.5)
    # the missing person is not a zero in the mean: (0.2 + 0.6 + 0.4) / 3
    assert m.face_distance.value == pytest.approx(0.4)
    assert (m.face_distance.band, m.face_distance.points, m.face_distance.n) == ("< 0.8", 10, 3)
    assert m.clip_score.value == pytest.approx(0.26)
    assert m.clip_score.points == 6
    assert (m.faceless_images.value, m.faceless_images.points) == (1, 7)
    assert m.total_points == 23 and m.max_points == 25
    c = m.counts
    assert (c["images"], c["readable_images"], c["unreadable_images"]) == (3, 2, 1)
    assert (c["missing_people"], c["missing_rate"]) == (1, 0.25)
    assert (c["extra_faces"], c["extra_face_rate"]) == (1, 0.25)
    assert (c["identity_swaps"], c["swap_rate"]) == (1, pytest.approx(1 / 3))
    assert c["matched_people"] == 2
    assert m.per_person["q"]["missing"] == 1 and m.per_person["q"]["swaps"] == 1
    assert m.per_person["p"]["mean_distance"] == pytest.approx(0.3)
    by = {b["bucket"]: b for b in m.by_face_size}
    assert by["< 0.10"]["assigned"] == 1 and by["< 0.10"]["swaps"] == 1
    assert by[">= 0.35"]["faces"] == 0
    assert by["0.20-0.35"] == {"bucket": "0.20-0.35", "faces": 2, "assigned": 1, "extra": 1, "matched": 1,
                               "match_rate": 1.0, "swaps": 0, "mean_distance": pytest.approx(0.2)}


def test_nothing_to_measure_gives_no_points_not_zero():
    images = [_image("a", ["p"], n_faces=0, faceless=True, missing=["p"])]
    m = compute_metrics(images, [PersonRecord("a", "p", None)], [], match_threshold=0.5)
    assert m.face_distance.value is None and m.face_distance.points is None
    assert m.clip_score.value is None
    assert m.total_points is None
    assert m.faceless_images.value == 1


def test_default_prompts_and_clip_text():
    from personas.library import Persona

    from eval.scoring import clip_text_for, default_prompts, fill_prompt, subject_phrase

    prompts = default_prompts()
    assert len(prompts) >= 20
    assert prompts[0] == "{person} with a beard and a white shirt"
    assert prompts[1] == "{person} wears a tank top and blazer"
    assert all("{person}" in p for p in prompts)
    assert fill_prompt(prompts[0], subject_phrase("man")) == "a man with a beard and a white shirt"
    assert subject_phrase("old man") == "an old man"
    brad = Persona(name="brad", tokens=["<brad>", "<brad>_1"], class_word="man", base_model={"id": "x"},
                   method="pivotal", hyperparameters={}, photos=[], adapter_sha256="a", embeddings_sha256="b",
                   created_at="now", trigger="<brad> <brad>_1 man")
    assert clip_text_for(prompts[1], [brad]) == "a man wears a tank top and blazer"
    assert clip_text_for("a photo of <brad> <brad>_1 man at a beach", [brad]) == "a photo of man at a beach"
    assert clip_text_for("<brad> man and a dog", [brad]) == "man and a dog"
