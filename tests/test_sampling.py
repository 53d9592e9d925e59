"""Clip sampling: spans, random training starts, the short-video rule, test clips, segments."""

from __future__ import annotations

import numpy as np
import pytest

from mme.data import sampling
from mme.data.sampling import clip_indices, clip_span, segment_indices, target_extra, train_clip_start


def test_clip_span():
    assert clip_span(16, 3) == 46
    assert clip_span(16, 3, extra=3) == 49
    with pytest.raises(ValueError):
        clip_span(0, 3)


@pytest.mark.parametrize("num_frames,stride,length,interpolate", [
    (16, 3, 6, True), (16, 4, 6, True), (8, 2, 4, True), (16, 3, 6, False), (16, 1, 6, True), (16, 8, 2, True)])
def test_target_extra_covers_the_last_frame_tracks_read(num_frames, stride, length, interpolate):
    """Brute force: every token-time slot j starts at 2*j*stride and walks `length` steps."""
    step = 1 if interpolate else stride
    last_read = max(2 * j * stride + length * step for j in range(num_frames // 2))
    last_read = max(last_read, (num_frames - 1) * stride)
    span = clip_span(num_frames, stride, target_extra(stride, length, 2, interpolate))
    assert span == last_read + 1


def test_train_start_keeps_the_whole_span_inside_and_covers_all_starts():
    rng = np.random.default_rng(0)
    starts = [train_clip_start(100, 46, rng) for _ in range(3000)]
    assert min(starts) == 0 and max(starts) == 100 - 46
    assert len(set(starts)) == 55
    assert train_clip_start(100, 46, np.random.default_rng(5)) == train_clip_start(100, 46, np.random.default_rng(5))


def test_short_video_starts_at_zero_and_clamps_to_last_frame():
    assert train_clip_start(30, 46, np.random.default_rng(0)) == 0
    indices = clip_indices(0, 16, 3, 30)
    assert indices[0] == 0 and indices.max() == 29
    np.testing.assert_array_equal(indices[:10], np.arange(10) * 3)
    assert (indices[10:] == 29).all()


def test_test_clip_starts():
    assert sampling.test_clip_starts(100, 46, 1) == [27]
    assert sampling.test_clip_starts(100, 46, 3) == [0, 27, 54]
    assert sampling.test_clip_starts(20, 46, 2) == [0, 0]


def test_segment_indices_one_per_segment():
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = segment_indices(80, 8, rng)
        assert (np.diff(idx) >= 0).all()
        np.testing.assert_array_equal(idx // 10, np.arange(8))  # index k lies in segment k
    np.testing.assert_array_equal(segment_indices(80, 8), np.arange(8) * 10 + 5)
    short = segment_indices(5, 8)
    assert short.min() >= 0 and short.max() <= 4 and (np.diff(short) >= 0).all()
