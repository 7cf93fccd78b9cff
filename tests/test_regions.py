"""compose.regions: mask properties (hypothesis), overlap splitting, latent sizes, head boxes, overlay."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from compose.poses import HEAD_KEYPOINTS, Pose, draw_pose, list_templates, template_pose
from compose.regions import MIN_PEAK, Regions, head_boxes, regions_from_pose
from personas import GroupshotError

LATENT_SIZES = (64, 32, 16, 8)  # what the UNet sees for a 512 px image
# One standing figure, normalised to a head height of 1 with the neck at the origin.
_FIGURE = template_pose("one_standing", size=(1000, 1000)).people[0]
_FIGURE = np.where(_FIGURE[:, 2:] > 0, (_FIGURE - [_FIGURE[1, 0], _FIGURE[1, 1], 0]) / [115, 115, 1], 0)


@st.composite
def poses(draw, max_people: int = 4):
    """Random people: a figure moved, scaled, jittered, with random keypoints missing (never
    the whole head), clipped to a small canvas."""
    width, height = draw(st.integers(48, 160)), draw(st.integers(48, 160))
    n = draw(st.integers(1, max_people))
    people = []
    for i in range(n):
        unit = draw(st.floats(0.06, 0.3)) * min(width, height)
        x = (i + draw(st.floats(0.0, 1.0))) / n * width  # each in their own slot, may still overlap
        y = draw(st.floats(0.1, 0.7)) * height
        jitter = np.array(draw(st.lists(st.floats(-0.3, 0.3), min_size=36, max_size=36))).reshape(18, 2)
        keep = np.array(draw(st.lists(st.booleans(), min_size=18, max_size=18)))
        person = np.zeros((18, 3), np.float32)
        person[:, :2] = (_FIGURE[:, :2] + jitter) * unit + [x, y]
        person[:, 2] = keep | (np.arange(18) == draw(st.sampled_from(HEAD_KEYPOINTS)))
        inside = (person[:, 0] >= 0) & (person[:, 0] <= width) & (person[:, 1] >= 0) & (person[:, 1] <= height)
        person[~inside] = 0
        if not (person[list(HEAD_KEYPOINTS), 2] > 0).any():
            person[1] = (np.clip(x, 0, width), np.clip(y, 0, height), 1)
        people.append(person)
    return Pose(width, height, people)


def check_partition(regions: Regions, n: int) -> None:
    assert regions.people.shape[0] == n and regions.people.dtype == np.float32
    assert regions.people.min() >= 0 and regions.people.max() <= 1 + 1e-6
    assert regions.background.min() >= 0 and regions.background.max() <= 1 + 1e-6
    assert np.abs(regions.people.sum(0) + regions.background - 1).max() < 1e-5


@settings(max_examples=40, deadline=None)
@given(poses())
def test_masks_partition_every_pixel_at_every_size(pose):
    regions = regions_from_pose(pose)
    check_partition(regions, len(pose.people))
    for person in regions.people:
        assert person.max() > 0  # everyone has some area at full size
    for size in LATENT_SIZES:
        small = regions.resized(size, size)
        check_partition(small, len(pose.people))
        assert small.size == (size, size)
        for person in small.people:
            assert person.max() >= MIN_PEAK - 1e-6  # every adapter acts somewhere, even at 8x8


@settings(max_examples=25, deadline=None)
@given(poses(), st.randoms(use_true_random=False))
def test_permuting_people_permutes_masks(pose, random):
    order = list(range(len(pose.people)))
    random.shuffle(order)
    regions = regions_from_pose(pose)
    shuffled = regions_from_pose(Pose(pose.width, pose.height, [pose.people[i] for i in order]))
    assert np.allclose(shuffled.people, regions.people[order], atol=1e-5)
    assert np.allclose(shuffled.background, regions.background, atol=1e-5)
    assert shuffled.heads == [regions.heads[i] for i in order]
    for size in (16, 8):
        assert np.allclose(shuffled.resized(size, size).people, regions.resized(size, size).people[order], atol=1e-5)


@pytest.mark.parametrize("name", [name for name, _, _ in list_templates()])
def test_template_regions(name):
    pose = template_pose(name, size=(512, 512))
    regions = regions_from_pose(pose)
    check_partition(regions, len(pose.people))
    assert regions.heads == head_boxes(pose)
    assert regions.background[0, 0] == 1.0 or name == "one_portrait"  # empty corner
    for i, (person, (x0, y0, x1, y1)) in enumerate(zip(pose.people, regions.heads)):
        # The whole face belongs to its person alone.
        for k in (0, 14, 15):
            x, y = person[k, :2].astype(int)
            assert regions.people[i, y, x] > 0.99
        face = regions.people[i, int(y0 + 0.25 * (y1 - y0)):int(y1), int(x0 + 0.2 * (x1 - x0)):int(x1 - 0.2 * (x1 - x0))]
        assert face.min() > 0.95


def test_overlapping_people_are_split_by_nearest_skeleton():
    base = template_pose("one_standing", size=(256, 256)).people[0]
    left, right = base.copy(), base.copy()
    left[:, 0] -= 20 * (left[:, 2] > 0)
    right[:, 0] += 20 * (right[:, 2] > 0)  # shoulders, arms and hips overlap
    regions = regions_from_pose(Pose(256, 256, [left, right]))
    check_partition(regions, 2)
    # Along each spine, the overlap goes to that person; halfway between, it is shared.
    neck_y, hip_y = int(base[1, 1]), int(base[8, 1])
    for y in range(neck_y + 10, hip_y, 7):
        assert regions.people[0, y, int(left[1, 0])] == 1.0
        assert regions.people[1, y, int(right[1, 0])] == 1.0
    assert regions.people[:, (neck_y + hip_y) // 2, int(base[1, 0])] == pytest.approx([0.5, 0.5], abs=1e-3)
    # The hand-over is a seam along the midway lines, not a blend across the bodies.
    body = regions.people.sum(0) > 0.9
    clear = regions.people.max(0) >= 0.95
    assert (clear & body).sum() >= 0.8 * body.sum()


def test_dilate_and_feather_grow_the_masks():
    pose = template_pose("two_standing", size=(256, 256))
    tight = regions_from_pose(pose, dilate=0.0, feather=0.05)
    loose = regions_from_pose(pose, dilate=0.4, feather=0.8)
    assert (loose.people.sum(0) > 0).sum() > 1.3 * (tight.people.sum(0) > 0).sum()
    # Feathered: values between 0 and 1 at the edges, none for the tight mask.
    assert ((loose.people.sum(0) > 0.05) & (loose.people.sum(0) < 0.95)).sum() > ((tight.people.sum(0) > 0.05) & (tight.people.sum(0) < 0.95)).sum()


def test_resized_keeps_a_tiny_person():
    # A far-away person (head ~6 px at 256 px) beside a large one: area averaging alone would
    # leave them below MIN_PEAK at 8x8 (each cell is 32x32 px).
    big = template_pose("one_portrait", size=(256, 256)).people[0]
    tiny = template_pose("one_standing", size=(256, 256)).people[0] * [0.2, 0.2, 1] + [200, 10, 0]
    regions = regions_from_pose(Pose(256, 256, [big, np.where(tiny[:, 2:] > 0, tiny, 0)]))
    plain = regions.people[1].reshape(8, 32, 8, 32).mean((1, 3))
    assert plain.max() < MIN_PEAK
    small = regions.resized(8, 8)
    check_partition(small, 2)
    assert small.people[1].max() == pytest.approx(MIN_PEAK)
    row, col = np.unravel_index(small.people[1].argmax(), (8, 8))
    assert plain[row, col] == plain.max()  # raised where they already were strongest
    # Away from that cell, area interpolation is untouched.
    assert np.allclose(np.delete(small.people[0].ravel(), row * 8 + col), np.delete(regions.people[0].reshape(8, 32, 8, 32).mean((1, 3)).ravel(), row * 8 + col), atol=1e-5)


def test_head_boxes_hold_the_face_and_scale_with_resize():
    pose = template_pose("three_row", size=(512, 384))
    boxes = head_boxes(pose)
    for person, (x0, y0, x1, y1) in zip(pose.people, boxes):
        assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 384
        for k in (0, 14, 15, 16, 17):
            assert x0 <= person[k, 0] <= x1 and y0 <= person[k, 1] <= y1
        assert not (y0 <= person[1, 1] <= y1 - 0.1 * (y1 - y0))  # the neck is below the face
    assert boxes == sorted(boxes)  # left to right, like the people
    small = regions_from_pose(pose).resized(48, 64)
    assert small.heads[0] == pytest.approx(tuple(v / 8 for v in boxes[0]))


def test_overlay():
    pose = template_pose("two_hugging", size=(256, 256))
    regions = regions_from_pose(pose)
    skeleton = draw_pose(pose)
    image = regions.overlay(skeleton, ["leo", "brad"])
    assert image.size == (256, 256) and image.mode == "RGB"
    assert np.asarray(image).astype(int).sum() > np.asarray(skeleton).astype(int).sum()
    # On a render of another size, and on nothing.
    assert regions.overlay(Image.new("RGB", (512, 512), "gray"), ["leo", "brad"]).size == (512, 512)
    blank = np.asarray(regions.overlay(None))
    assert blank[0, 0].sum() == 0 and blank.shape == (256, 256, 3)
    with pytest.raises(ValueError):
        regions.overlay(None, ["only one"])


def test_regions_validate_inputs():
    with pytest.raises(ValueError):
        Regions(np.zeros((2, 8, 8)), np.zeros((8, 9)))
    with pytest.raises(GroupshotError):
        regions_from_pose(template_pose("two_standing", size=(64, 64)), dilate=-1)
    empty = regions_from_pose(Pose(32, 32, []))
    assert empty.people.shape == (0, 32, 32) and (empty.background == 1).all()
    assert empty.resized(8, 8).people.shape == (0, 8, 8)
