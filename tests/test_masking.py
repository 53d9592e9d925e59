"""Token masks: exact counts, tube structure, cube blockiness, seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest

from mme.data.masking import make_mask

GRID = (8, 7, 7)  # 16 frames / tubelet 2, 112 px / patch 16


@pytest.mark.parametrize("kind", ["tube", "cube", "random"])
@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.7, 0.9, 0.95])
def test_exact_counts(kind, ratio):
    rng = np.random.default_rng(0)
    t, h, w = GRID
    expected = t * round(ratio * h * w) if kind == "tube" else round(ratio * t * h * w)
    for _ in range(20):
        mask = make_mask(kind, ratio, GRID, rng)
        assert mask.shape == (t * h * w,) and mask.dtype == bool
        assert mask.sum() == expected


def test_tube_mask_is_identical_in_every_time_slot():
    mask = make_mask("tube", 0.7, GRID, np.random.default_rng(1)).reshape(GRID)
    assert (mask == mask[0]).all()
    assert mask[0].sum() == round(0.7 * 49)


def test_random_and_cube_masks_vary_over_time():
    for kind in ("random", "cube"):
        mask = make_mask(kind, 0.7, GRID, np.random.default_rng(2)).reshape(GRID)
        assert not (mask == mask[0]).all()


def _masked_neighbour_fraction(mask: np.ndarray) -> float:
    """Mean fraction of the 6-connected neighbours of masked tokens that are masked too."""
    padded = np.pad(mask, 1, constant_values=False)
    count = np.zeros(mask.shape)
    valid = np.zeros(mask.shape)
    inside = np.pad(np.ones(mask.shape, bool), 1, constant_values=False)
    core = (slice(1, -1),) * 3
    for axis in range(3):
        for shift in (-1, 1):
            count += np.roll(padded, shift, axis)[core]
            valid += np.roll(inside, shift, axis)[core]
    return float((count / valid)[mask].mean())


def test_cube_masks_are_blockier_than_random():
    rng = np.random.default_rng(3)
    cube = np.mean([_masked_neighbour_fraction(make_mask("cube", 0.5, GRID, rng).reshape(GRID)) for _ in range(30)])
    rand = np.mean([_masked_neighbour_fraction(make_mask("random", 0.5, GRID, rng).reshape(GRID)) for _ in range(30)])
    assert rand == pytest.approx(0.5, abs=0.05)
    assert cube > rand + 0.15


def test_seeded_determinism():
    for kind in ("tube", "cube", "random"):
        a = make_mask(kind, 0.7, GRID, np.random.default_rng(7))
        b = make_mask(kind, 0.7, GRID, np.random.default_rng(7))
        c = make_mask(kind, 0.7, GRID, np.random.default_rng(8))
        assert (a == b).all() and not (a == c).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask.kind"):
        make_mask("block", 0.5, GRID)
    with pytest.raises(ValueError, match="mask.ratio"):
        make_mask("tube", 1.0, GRID)
