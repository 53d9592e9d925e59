"""Token masks for masked pre-training: tube (VideoMAE/MME), cube (MaskFeat) and random.

A mask is a flat bool array over the token grid (t, h, w), flattened t-major like the tokens;
True = masked (the model must predict it). Counts are exact for a given ratio:
tube masks `round(ratio*h*w)` spatial positions, the same ones in every time slot;
random and cube mask `round(ratio*t*h*w)` tokens. Everything is drawn from the `rng` passed in.
"""

from __future__ import annotations

import math

import numpy as np

MASK_KINDS = ("tube", "cube", "random")
# Cube blocks (MaskFeat-style 3-D block masking): a block covers at least this many spatial tokens,
# an aspect ratio (h/w) log-uniform in this range, and 1..t time slots.
CUBE_MIN_TOKENS = 4
CUBE_ASPECT = (0.3, 1 / 0.3)
CUBE_MAX_ATTEMPTS = 1000


def _random_choice_mask(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[rng.permutation(size)[:count]] = True
    return mask


def tube_mask(ratio: float, grid: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """bool (t*h*w,): one random spatial mask of round(ratio*h*w) positions repeated over the t slots."""
    t, h, w = grid
    spatial = _random_choice_mask(h * w, int(round(ratio * h * w)), rng)
    return np.tile(spatial, t)


def random_mask(ratio: float, grid: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """bool (t*h*w,): round(ratio*t*h*w) tokens chosen uniformly."""
    t, h, w = grid
    size = t * h * w
    return _random_choice_mask(size, int(round(ratio * size)), rng)


def _add_block(mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
    """Mask one random spatio-temporal block of at most `budget` new tokens; returns how many it added."""
    t, h, w = mask.shape
    duration = int(rng.integers(1, t + 1))
    max_area = max(CUBE_MIN_TOKENS, budget // duration)
    area = rng.uniform(min(CUBE_MIN_TOKENS, max_area), max_area)
    aspect = math.exp(rng.uniform(math.log(CUBE_ASPECT[0]), math.log(CUBE_ASPECT[1])))
    bh = min(h, max(1, int(round(math.sqrt(area * aspect)))))
    bw = min(w, max(1, int(round(math.sqrt(area / aspect)))))
    t0 = int(rng.integers(0, t - duration + 1))
    y0 = int(rng.integers(0, h - bh + 1))
    x0 = int(rng.integers(0, w - bw + 1))
    block = mask[t0:t0 + duration, y0:y0 + bh, x0:x0 + bw]
    added = int(block.size - block.sum())
    if added == 0 or added > budget + CUBE_MIN_TOKENS:
        return 0
    block[...] = True
    return added


def cube_mask(ratio: float, grid: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """bool (t*h*w,): random spatio-temporal blocks until the target count, then trimmed/filled to it exactly."""
    t, h, w = grid
    size = t * h * w
    count = int(round(ratio * size))
    mask = np.zeros((t, h, w), dtype=bool)
    masked = 0
    for _ in range(CUBE_MAX_ATTEMPTS):
        if masked >= count:
            break
        masked += _add_block(mask, count - masked, rng)
    flat = mask.reshape(-1)
    if masked > count:  # the last block overshot: unmask random masked tokens
        flat[rng.permutation(np.flatnonzero(flat))[:masked - count]] = False
    elif masked < count:  # out of attempts: fill with random unmasked tokens
        flat[rng.permutation(np.flatnonzero(~flat))[:count - masked]] = True
    return flat


def make_mask(kind: str, ratio: float, grid: tuple[int, int, int],
              rng: np.random.Generator | None = None) -> np.ndarray:
    """bool (t*h*w,) token mask, True = masked, t-major order; exact counts (see module docstring)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio} (mask.ratio)")
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"mask grid must be (t, h, w) with positive sizes, got {grid}")
    rng = rng if rng is not None else np.random.default_rng()
    builders = {"tube": tube_mask, "cube": cube_mask, "random": random_mask}
    if kind not in builders:
        raise ValueError(f"unknown mask kind {kind!r} (mask.kind); choose one of {', '.join(MASK_KINDS)}")
    return builders[kind](ratio, tuple(int(g) for g in grid), rng)
