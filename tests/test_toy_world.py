"""The toy-world separation benchmark (issue #9): its measuring parts checked against
references computed another way, then a reduced run end to end (base model trained from
scratch, personas by train_persona, renders by GroupComposer) asserting what separation
by construction guarantees: the per-region methods leak less than the merge baseline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import toy_world as tw


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: torch's second thread mostly spin-waits on tiny models.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pooling_vae_is_average_pool_and_nearest_upsampling():
    vae = tw.pooling_vae(scaling_factor=2.5)
    x = torch.rand(2, 3, tw.SIZE, tw.SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.mean).sample
    pooled = torch.nn.functional.avg_pool2d(x, tw.CELL)  # (2, 3, 16, 16)
    assert torch.allclose(posterior.mean[:, :3], pooled, atol=1e-5)
    assert posterior.mean[:, 3].abs().max() == 0
    assert posterior.std.max() < 1e-6  # sampling the posterior is taking its mean
    upsampled = torch.nn.functional.interpolate(pooled, scale_factor=tw.CELL, mode="nearest")
    assert torch.allclose(decoded, upsampled, atol=1e-5)
    assert vae.config.scaling_factor == 2.5


def test_classifier_reads_each_pattern_and_nothing_else():
    rng = np.random.default_rng(0)
    for k, person in enumerate(tw.PEOPLE):
        for _ in range(3):
            assert (tw.classify(tw.person_picture(person, rng)) == k).all()
    for _ in range(40):  # base pictures: muted colours, and vivid ones between the patterns' hues
        picture, _ = tw.base_picture(rng)
        assert (tw.classify(picture) == -1).all()
    # An even blend of two neighbouring patterns' hues (45 degrees from each) shows neither.
    import colorsys

    for a, b in zip(tw.PEOPLE, tw.PEOPLE[1:] + tw.PEOPLE[:1]):
        hue = ((a.hue + ((b.hue - a.hue) % 360) / 2) % 360) / 360
        rgb = np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.9)) * 255
        assert (tw.classify(np.full((2, 2, 3), rgb, np.uint8)) == -1).all()
    # Against colorsys pixel by pixel, on random colours.
    pixels = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    expected = []
    for p in pixels / 255.0:
        h, s, v = colorsys.rgb_to_hsv(*p)
        label = -1
        if s >= tw.MIN_SATURATION and v >= tw.MIN_VALUE:
            for k, person in enumerate(tw.PEOPLE):
                if abs((h * 360 - person.hue + 180) % 360 - 180) <= tw.HUE_TOLERANCE:
                    label = k
        expected.append(label)
    assert tw.classify(pixels[None]).ravel().tolist() == expected


def test_score_render_on_a_made_up_render():
    # Two people side by side on a 4x8 canvas with a background column on each side.
    background = np.zeros((4, 8), np.float32)
    background[:, [0, 7]] = 1
    people = np.zeros((2, 4, 8), np.float32)
    people[0, :, 1:4] = 1
    people[1, :, 4:7] = 1
    labels = np.full((4, 8), -1)
    labels[:, 1:4] = 2          # person 0 (pattern 2) all in their own pattern
    labels[:2, 4:7] = 2         # pattern 2 takes half of person 1's region ...
    labels[2:, 4:7] = 3         # ... person 1 (pattern 3) keeps the other half
    labels[0, 0] = 3            # one background pixel of pattern 3
    labels[1, 7] = 1            # one pixel of pattern 1, who is not in the picture
    s = tw.score_render(labels, people, background, [2, 3])
    assert s["own"] == [1.0, 0.5]
    assert s["correct"] == [True, True]
    assert s["leak_people"] == [0.5, 0.0]  # pattern 2 in region 1, pattern 3 in region 0
    assert s["leak_background"] == pytest.approx(1 / 8)  # the pattern-1 pixel is foreign, not leakage
    assert s["foreign"] == pytest.approx(1 / 32)
    assert s["takeover"] is True  # pattern 2 holds the majority (>= 0.5) of both regions


def test_compositions_put_every_pattern_in_every_slot_once():
    for n, group in ((3, 2), (4, 2), (3, 3), (4, 3)):
        combos = tw.compositions(n, group)
        assert len(combos) == n and all(len(set(c)) == group for c in combos)
        for slot in range(group):
            assert sorted(c[slot] for c in combos) == list(range(n))


def test_replace_section_keeps_the_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## GPU\n\ngpu numbers\n\n## Toy-world separation\n\nold\n\n## Later\n\nkept\n")
    tw.replace_section(path, "Toy-world separation", "## Toy-world separation\n\nnew table\n")
    assert path.read_text() == "# Results\n\n## GPU\n\ngpu numbers\n\n## Toy-world separation\n\nnew table\n\n## Later\n\nkept\n"
    missing = tmp_path / "NEW.md"
    tw.replace_section(missing, "Toy-world separation", "## Toy-world separation\n\nfirst\n")
    assert missing.read_text().endswith("## Toy-world separation\n\nfirst\n")


# -- end to end ---------------------------------------------------------------------------------
#
# Thresholds come from `python -m benchmarks.toy_world --seeds 0 1 2` (benchmarks/RESULTS.md,
# "Toy-world separation"), measured per seed; each sits well inside the worst seed so that
# CPU-to-CPU float differences (which change every trained weight a little) cannot flip it,
# and well outside what a broken separation would give (merge's own numbers).
#
# Measured with the benchmark's SETTINGS, "all" rows (two_standing and three_row together),
# seeds 0 / 1 / 2 (2026-11-25, this 2-core CPU machine):
#   leak into others      composite 0.000 / 0.000 / 0.003   masked 0.004 / 0.004 / 0.031
#                         merge     0.143 / 0.172 / 0.238
#   leak into background  composite 0.044 / 0.039 / 0.086   masked 0.079 / 0.134 / 0.102
#                         merge     0.427 / 0.321 / 0.377
#   merge minus method, smallest over seeds and methods: others 0.139, background 0.187
#   own pattern in own region  composite 0.373 / 0.216 / 0.569   masked 0.330 / 0.412 / 0.377
#   takeover rate          composite 0 / 0 / 0   masked 0 / 0 / 0   merge 0.33 / 0.33 / 0.50
#   foreign patterns (any composite/masked row, two_standing and three_row)  at most 0.017
#   base model alone, share of pixels in some pattern's band  0.0000 / 0.0015 / 0.0010
LEAK_PEOPLE_MAX = {"composite": 0.03, "masked": 0.08}
LEAK_BACKGROUND_MAX = {"composite": 0.17, "masked": 0.22}
LEAK_PEOPLE_MARGIN = 0.06       # merge's leak into others minus the method's, at least
LEAK_BACKGROUND_MARGIN = 0.08   # the same for the background
OWN_MIN = {"composite": 0.1, "masked": 0.1}
TAKEOVER_MAX = 1 / 6            # at most one image in six (none was measured)
MERGE_LEAK_PEOPLE_MIN = 0.07
FOREIGN_MAX = 0.06
BASE_FALSE_POSITIVE_MAX = 0.01


def _check_separation(table: dict) -> None:
    merge = table["merge/all"]
    for method in ("composite", "masked"):
        row = table[f"{method}/all"]
        # Leakage into the other people's regions and into the background: less than merge,
        # by a margin.
        assert row["leak_people"][0] <= LEAK_PEOPLE_MAX[method], (method, row)
        assert row["leak_background"][0] <= LEAK_BACKGROUND_MAX[method], (method, row)
        assert merge["leak_people"][0] - row["leak_people"][0] >= LEAK_PEOPLE_MARGIN, (method, row, merge)
        assert merge["leak_background"][0] - row["leak_background"][0] >= LEAK_BACKGROUND_MARGIN, (method, row, merge)
        # The adapters do act: each person's pattern shows in their own region.
        assert row["own"][0] >= OWN_MIN[method], (method, row)
        assert row["takeover"][0] <= TAKEOVER_MAX, (method, row)
    assert merge["leak_people"][0] >= MERGE_LEAK_PEOPLE_MIN, merge  # the baseline does leak: the test can fail


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory) -> dict:
    """The benchmark for seed 0 alone (the CI size): base model, 3 personas, 18 renders."""
    return tw.run([0], tmp_path_factory.mktemp("toy_world"), tw.SETTINGS)


def test_per_region_methods_keep_patterns_apart_better_than_merge(one_seed):
    _check_separation(one_seed["table"])
    assert one_seed["base_false_positive"][0] <= BASE_FALSE_POSITIVE_MAX
    for key, row in one_seed["table"].items():
        if not key.startswith("merge/"):  # merge blends hues, which may land on a third pattern's
            assert row["foreign"][0] <= FOREIGN_MAX, (key, row)  # patterns of people not in the picture


def test_benchmark_writes_its_table_and_scores(one_seed, tmp_path):
    out = tmp_path / "RESULTS.md"
    tw.replace_section(out, tw.SECTION, tw.results_section(one_seed, "python -m benchmarks.toy_world --out X --seeds 0"))
    text = out.read_text()
    assert "| composite | all |" in text and "| merge | two_standing |" in text
    report = json.loads((Path(one_seed["out"]) / "toy_world.json").read_text())
    assert report["seeds"] == [0] and set(report["table"]) == set(one_seed["table"])
    scores = json.loads((Path(one_seed["out"]) / "seed-0" / "scores.json").read_text())
    assert len(scores["renders"]) == 2 * tw.SETTINGS.people * len(tw.METHODS) * tw.SETTINGS.images
    for render in scores["renders"]:  # every render is a compose run folder with its masks
        run_dir = Path(one_seed["out"]) / "seed-0" / "renders" / os.path.dirname(render["image"])
        assert (run_dir / "render.json").is_file() and (run_dir / "masks.npz").is_file()


@pytest.mark.slow
def test_full_benchmark_three_seeds(tmp_path):
    report = tw.run([0, 1, 2], tmp_path, tw.SETTINGS)
    _check_separation(report["table"])
