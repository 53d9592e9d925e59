"""Bootstrap statistics of a table: per setting a mean with its 95 % CI, the paired difference to the
table's reference row with its CI, and a verdict that is given only when the evidence allows one.

Inputs are per-clip scores (1 = the clip was classified correctly) of every (setting, seed) trial. A
resample draws the test clips with replacement and, when there are two or more seeds, the seeds with
replacement; the statistic is the mean score over the drawn (seed, clip) cells, in percent. The paired
difference of a setting to the reference resamples the SAME clips and the SAME seeds for both (seeds are
paired by seed number, clips by clip id), so what the two share — hard clips, a lucky seed's data
order — cancels. The CI is the percentile interval of the resampled statistic.

Verdicts, in order of precedence: a table without its floor row ("Random init") -> "no floor"; a
setting or reference with fewer than MIN_SEEDS common seeds -> "insufficient seeds"; the reference row
itself -> "reference"; otherwise "ahead" / "behind" when the CI of the difference excludes 0, else
"not separated". All randomness comes from one seeded numpy generator: the same inputs give the same
intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FLOOR = "Random init"  # the row label of a table's untrained-encoder floor
MIN_SEEDS = 2
RESAMPLES = 10_000
LEVEL = 0.95

AHEAD, BEHIND, NOT_SEPARATED = "ahead", "behind", "not separated"
INSUFFICIENT_SEEDS, NO_FLOOR, REFERENCE = "insufficient seeds", "no floor", "reference"
NO_PER_CLIP, NO_REFERENCE = "no per-clip data", "no reference"  # set by the table builder

# Resamples drawn per block: bounds the temporary index matrix at BLOCK x clips integers.
BLOCK = 2_000


@dataclass(frozen=True)
class Interval:
    """A point estimate (percent, on the data as given) and its bootstrap CI [low, high]."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class SettingStats:
    """One row's statistics: its mean and CI over its own seeds and the common clips, and the paired
    difference to the reference (None for the reference itself) over the seeds both have."""

    setting: str
    n_seeds: int
    n_clips: int
    mean: Interval
    delta: Interval | None
    verdict: str


def bootstrap_means(scores: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Resampled means (percent) of `scores` (S seeds, C clips): clips, and seeds when S >= 2, with replacement.

    A resample's mean is sum_s sum_c w_s v_c x[s, c] / (S C), with v the clip counts and w the seed counts
    of the draw: one matrix product instead of gathering S x C values per resample. The draws depend only
    on (size, resamples, seed), so every setting of a table is resampled on the same clips and seeds.

    Returns:
        (resamples,) float64.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty (seeds, clips) array, got shape {scores.shape}")
    n_seeds, n_clips = scores.shape
    # float32 halves the product's time and is exact for 0/1 (integer) scores, whose sums stay below 2^24;
    # other scores go through float64, so their CI does not depend on the BLAS's summation order.
    exact = bool(np.all(scores == np.round(scores))) and float(np.abs(scores).max()) * n_clips < 2 ** 24
    dtype = np.float32 if exact else np.float64
    counts = draw_counts(n_clips, resamples, seed, stream=0).astype(dtype, copy=False)
    per_seed = counts @ scores.T.astype(dtype)  # (resamples, S)
    seed_counts = draw_counts(n_seeds, resamples, seed, stream=1) if n_seeds >= MIN_SEEDS else 1.0
    return 100.0 * (per_seed.astype(np.float64) * seed_counts).sum(axis=1) / (n_seeds * n_clips)


@lru_cache(maxsize=4)
def draw_counts(n: int, resamples: int, seed: int, stream: int) -> np.ndarray:
    """(resamples, n) counts of n draws with replacement from n items (read-only; cached: a table reuses it).

    `stream` separates the clip draws (0) from the seed draws (1) of one generator seed.
    """
    rng = np.random.default_rng([seed, stream, n])
    counts = np.empty((resamples, n), dtype=np.float32)
    for start in range(0, resamples, BLOCK):
        size = min(BLOCK, resamples - start)
        draws = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts[start:start + size] = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)
    counts.flags.writeable = False
    return counts


def interval(scores: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean (percent) of `scores` (S, C) and its percentile bootstrap CI."""
    samples = bootstrap_means(scores, resamples, seed)
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(100.0 * float(np.mean(scores)), float(low), float(high))


def paired_difference(scores: np.ndarray, reference: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """Mean of `scores - reference` (both (S, C): the same seeds, the same clips, in the same order) in
    points, with the CI of drawing clips and seeds jointly for both."""
    scores, reference = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if scores.shape != reference.shape:
        raise ValueError(f"paired scores need equal shapes (seeds, clips): {scores.shape} vs {reference.shape}")
    return interval(scores - reference, resamples, seed, level)


def verdict(delta: Interval, n_seeds: int, has_floor: bool = True) -> str:
    """The word for a paired difference over `n_seeds` common seeds (see the module docstring)."""
    if not has_floor:
        return NO_FLOOR
    if n_seeds < MIN_SEEDS:
        return INSUFFICIENT_SEEDS
    if delta.low > 0:
        return AHEAD
    if delta.high < 0:
        return BEHIND
    return NOT_SEPARATED


# A setting's trials: seed -> (clip ids, scores (C,)).
SeedScores = Mapping[int, tuple[tuple[str, ...], np.ndarray]]


def common_clips(results: Mapping[str, SeedScores]) -> tuple[str, ...]:
    """Clip ids every trial of every setting has, in the order of the first trial's list."""
    id_lists = [ids for seeds in results.values() for ids, _ in seeds.values()]
    if not id_lists:
        return ()
    shared = set(id_lists[0]).intersection(*id_lists[1:])
    return tuple(c for c in id_lists[0] if c in shared)


def aligned(seeds: SeedScores, clips: tuple[str, ...], seed_order: list[int]) -> np.ndarray:
    """(len(seed_order), len(clips)) scores of one setting, rows in `seed_order`, columns in `clips`."""
    rows = []
    for s in seed_order:
        ids, values = seeds[s]
        position = {c: i for i, c in enumerate(ids)}
        rows.append(np.asarray(values, dtype=np.float64)[[position[c] for c in clips]])
    return np.stack(rows)


def table_statistics(results: Mapping[str, SeedScores], reference: str, floor: str = FLOOR,
                     resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, SettingStats]:
    """Statistics of every setting of one table and one metric.

    Args:
        results: setting -> seed -> (clip ids, per-clip scores in [0, 1]); settings without per-clip
            data are simply absent (the caller reports them as NO_PER_CLIP).
        reference: the row every setting is compared with; it must be in `results`.
        floor: the floor row's label; without it in `results` no setting gets a verdict.
    Returns:
        setting -> SettingStats, in the order of `results`.
    """
    if reference not in results:
        raise KeyError(f"reference row {reference!r} has no per-clip results; rows with results: "
                       f"{', '.join(results) or 'none'}")
    clips = common_clips(results)
    if not clips:
        raise ValueError("the settings' trials share no clip id: evaluate every trial on the same test list")
    has_floor = floor in results
    ref_seeds = results[reference]
    out = {}
    for setting, seeds in results.items():
        mine = sorted(seeds)
        mean = interval(aligned(seeds, clips, mine), resamples, seed, level)
        if setting == reference:
            word = NO_FLOOR if not has_floor else INSUFFICIENT_SEEDS if len(mine) < MIN_SEEDS else REFERENCE
            out[setting] = SettingStats(setting, len(mine), len(clips), mean, None, word)
            continue
        shared = sorted(set(mine) & set(ref_seeds))
        delta = None
        if shared:
            delta = paired_difference(aligned(seeds, clips, shared), aligned(ref_seeds, clips, shared),
                                      resamples, seed, level)
        word = verdict(delta, len(shared), has_floor) if delta else (NO_FLOOR if not has_floor else INSUFFICIENT_SEEDS)
        out[setting] = SettingStats(setting, len(mine), len(clips), mean, delta, word)
    return out
