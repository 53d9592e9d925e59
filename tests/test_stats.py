"""Bootstrap statistics on constructed inputs with known answers, and the per-clip record codec."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from mme.reports import per_clip, stats

CLIPS = tuple(f"clip_{i:04d}" for i in range(1200))


def _bernoulli(p: float, seeds: int, rng: np.random.Generator, clips: int = len(CLIPS)) -> np.ndarray:
    return (rng.random((seeds, clips)) < p).astype(float)


def _results(arrays: dict[str, np.ndarray], clips: tuple[str, ...] = CLIPS) -> dict[str, stats.SeedScores]:
    return {name: {s: (clips, row) for s, row in enumerate(array)} for name, array in arrays.items()}


def test_a_constant_per_clip_difference_collapses_the_ci_to_it():
    rng = np.random.default_rng(0)
    reference = rng.random((3, 1200)) * 0.8  # fractional scores: every clip gains exactly 0.2
    delta = stats.paired_difference(reference + 0.2, reference, resamples=2000)
    assert delta.estimate == pytest.approx(20.0) and delta.low == pytest.approx(20.0)
    assert delta.high == pytest.approx(20.0)


def test_resampled_means_of_hit_or_miss_scores_are_exact():
    """The float32 product used for 0/1 scores gives the float64 means of the same draws, bit for bit."""
    rng = np.random.default_rng(1)
    scores = _bernoulli(0.6, 3, rng)
    fast = stats.bootstrap_means(scores, resamples=500)
    clip_counts = stats.draw_counts(scores.shape[1], 500, 0, stream=0).astype(np.float64)
    seed_counts = stats.draw_counts(scores.shape[0], 500, 0, stream=1).astype(np.float64)
    slow = 100.0 * ((clip_counts @ scores.T) * seed_counts).sum(axis=1) / scores.size
    assert np.array_equal(fast, slow)


def test_binomial_ci_matches_the_normal_approximation():
    """One seed of 1 200 Bernoulli clips: the bootstrap CI is p ± 1.96 sqrt(p(1-p)/n) (within 0.3 points)."""
    scores = _bernoulli(0.6, 1, np.random.default_rng(1))
    p = scores.mean()
    half = 100 * 1.96 * math.sqrt(p * (1 - p) / scores.size)
    ci = stats.interval(scores)
    assert ci.estimate == pytest.approx(100 * p)
    assert ci.low == pytest.approx(100 * p - half, abs=0.3) and ci.high == pytest.approx(100 * p + half, abs=0.3)
    # identical seeds: drawing seeds changes nothing, the CI is the clip-only one
    same = stats.interval(np.repeat(scores, 3, axis=0))
    assert same.low == pytest.approx(ci.low, abs=0.3) and same.high == pytest.approx(ci.high, abs=0.3)


def test_paired_ci_matches_the_normal_approximation_of_the_differences():
    rng = np.random.default_rng(2)
    a, b = _bernoulli(0.6, 1, rng), _bernoulli(0.55, 1, rng)
    diff = (a - b).ravel()
    half = 100 * 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    ci = stats.paired_difference(a, b)
    assert ci.estimate == pytest.approx(100 * diff.mean())
    assert ci.low == pytest.approx(ci.estimate - half, abs=0.3)
    assert ci.high == pytest.approx(ci.estimate + half, abs=0.3)


def test_seed_resampling_widens_the_ci_when_seeds_disagree():
    """Three seeds at 40 / 60 / 80 %: the spread between seeds must show in the CI (clip-only would be ±1.6)."""
    rng = np.random.default_rng(3)
    scores = np.stack([_bernoulli(p, 1, rng)[0] for p in (0.4, 0.6, 0.8)])
    ci = stats.interval(scores)
    assert ci.high - ci.low > 20.0


def test_identical_settings_are_never_separated_and_a_20_point_shift_is_ahead():
    rng = np.random.default_rng(4)
    reference = _bernoulli(0.5, 3, rng)
    table = stats.table_statistics(_results({
        "Traj": reference, "Same": reference.copy(), "Better": _bernoulli(0.7, 3, rng),
        "Worse": _bernoulli(0.3, 3, rng), stats.FLOOR: _bernoulli(0.1, 3, rng)}), reference="Traj")
    assert table["Traj"].verdict == stats.REFERENCE and table["Traj"].delta is None
    same = table["Same"]
    assert same.verdict == stats.NOT_SEPARATED and (same.delta.low, same.delta.high) == (0.0, 0.0)
    assert table["Better"].verdict == stats.AHEAD and table["Better"].delta.estimate == pytest.approx(20, abs=3)
    assert table["Worse"].verdict == stats.BEHIND and table[stats.FLOOR].verdict == stats.BEHIND
    assert table["Better"].n_seeds == 3 and table["Better"].n_clips == 1200
    for row in table.values():  # the mean's CI brackets its estimate
        assert row.mean.low <= row.mean.estimate <= row.mean.high


def test_identical_noisy_settings_are_not_separated_over_many_draws():
    """Two settings with the same accuracy (independent draws): at 95 % about 1 in 20 may separate, never most."""
    rng = np.random.default_rng(5)
    words = [stats.table_statistics(_results({"A": _bernoulli(0.6, 3, rng), "B": _bernoulli(0.6, 3, rng),
                                              stats.FLOOR: _bernoulli(0.1, 3, rng)}), "A",
                                    resamples=1000, seed=k)["B"].verdict for k in range(20)]
    assert words.count(stats.NOT_SEPARATED) >= 16


def test_one_seed_or_no_floor_never_gets_a_verdict():
    rng = np.random.default_rng(6)
    one_seed = stats.table_statistics(_results({"Traj": _bernoulli(0.5, 1, rng), "Better": _bernoulli(0.9, 1, rng),
                                                stats.FLOOR: _bernoulli(0.1, 1, rng)}), "Traj")
    assert {row.verdict for row in one_seed.values()} == {stats.INSUFFICIENT_SEEDS}
    assert one_seed["Better"].delta.excludes_zero()  # the CI exists, but one seed says nothing of seeds
    mixed = stats.table_statistics(_results({"Traj": _bernoulli(0.5, 3, rng), "Better": _bernoulli(0.9, 1, rng),
                                             stats.FLOOR: _bernoulli(0.1, 3, rng)}), "Traj")
    assert mixed["Better"].verdict == stats.INSUFFICIENT_SEEDS and mixed["Traj"].verdict == stats.REFERENCE
    no_floor = stats.table_statistics(_results({"Traj": _bernoulli(0.5, 3, rng),
                                                "Better": _bernoulli(0.9, 3, rng)}), "Traj")
    assert {row.verdict for row in no_floor.values()} == {stats.NO_FLOOR}


def test_clips_align_by_id_and_seeds_pair_by_number():
    """The same scores listed in another clip order, and seeds given in another order, change nothing."""
    rng = np.random.default_rng(7)
    ref, other = _bernoulli(0.5, 2, rng), _bernoulli(0.6, 2, rng)
    order = rng.permutation(len(CLIPS))
    shuffled = tuple(CLIPS[i] for i in order)
    straight = stats.table_statistics(_results({"R": ref, "X": other, stats.FLOOR: ref}), "R")
    moved = {"R": {0: (CLIPS, ref[0]), 1: (CLIPS, ref[1])}, stats.FLOOR: {0: (CLIPS, ref[0]), 1: (CLIPS, ref[1])},
             "X": {1: (shuffled, other[1][order]), 0: (shuffled, other[0][order])}}
    assert stats.table_statistics(moved, "R")["X"] == straight["X"]
    # a trial that misses clips: every setting is compared on the clips all trials have
    partial = moved | {"X": {0: (CLIPS[:600], other[0][:600]), 1: (CLIPS[:600], other[1][:600])}}
    result = stats.table_statistics(partial, "R")
    assert result["X"].n_clips == 600 and result["R"].mean.estimate == pytest.approx(100 * ref[:, :600].mean())


def test_deterministic_and_fast():
    rng = np.random.default_rng(8)
    arrays = {"R": _bernoulli(0.5, 3, rng), "X": _bernoulli(0.55, 3, rng), stats.FLOOR: _bernoulli(0.1, 3, rng)}
    start = time.perf_counter()
    first = stats.table_statistics(_results(arrays), "R")
    elapsed = time.perf_counter() - start
    assert stats.table_statistics(_results(arrays), "R") == first
    assert stats.table_statistics(_results(arrays), "R", seed=1)["X"].delta != first["X"].delta
    assert elapsed < 10.0  # 5 bootstraps of 10k resamples over 3 seeds x 1 200 clips (about 1 s on 2 cores)


def test_errors_name_the_input():
    with pytest.raises(KeyError, match="reference row 'Traj'"):
        stats.table_statistics(_results({"Pixel": np.ones((2, 3))}, CLIPS[:3]), "Traj")
    with pytest.raises(ValueError, match="equal shapes"):
        stats.paired_difference(np.ones((2, 3)), np.ones((1, 3)))


def test_per_clip_record_round_trip():
    record = per_clip.from_predictions(CLIPS[:5], [0, 1, 2, 3, 4], {"ft_top1": [0, 1, 0, 3, 0],
                                                                    "probe_top1": [0, 1, 2, 3, 4]})
    assert record.correct["ft_top1"].tolist() == [1, 1, 0, 1, 0]
    encoded = per_clip.encode(record)
    assert isinstance(encoded["correct"]["ft_top1"], str)  # packed bits
    back = per_clip.decode(encoded)
    assert back.clip_ids == record.clip_ids
    assert all(np.array_equal(back.correct[m], record.correct[m]) for m in record.correct)
    fractional = per_clip.PerClip(CLIPS[:2], {"ft_top1": [0.5, 1.0]})
    assert per_clip.decode(per_clip.encode(fractional)).correct["ft_top1"].tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="shape"):
        per_clip.PerClip(CLIPS[:2], {"ft_top1": [1.0]})
    with pytest.raises(ValueError, match="format"):
        per_clip.decode({"format": "other", "clip_ids": [], "correct": {}})
