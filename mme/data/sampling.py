"""Which original frames a clip takes: training starts, test-time clips, TSN/SSv2 segments.

A clip of `num_frames` frames at stride `s` starting at original frame `start` takes the frames
`start + k*s`, k = 0 .. num_frames-1. Its *span* is the number of original frames it covers,
`(num_frames-1)*s + 1`, plus `extra` dense frames after the last sampled one that the motion targets
read: MME tracks every token-time slot for L steps from its first frame, so the last slot (starting
at `(num_frames-2)*s`) needs frames up to `(num_frames-2)*s + L` (see `target_extra`).

Training: the start is uniform over every position where the whole span fits in the video.

Short-video rule: when a video has fewer frames than the span, the clip starts at frame 0 and every
index past the end is clamped to the last frame (`clip_indices`). The clip then repeats its last
frame; the target code marks trajectory steps that run past the video's end as invalid, so no loss is
taken on made-up motion.

Test time: `num_clips` starts spread uniformly over the video (one clip = the centre clip).
Segment sampling (`data.sampling = "segment"`, TSN/SSv2 style): split the video into `num_frames`
equal segments and take one frame from each (random in training, the middle at test time).
"""

from __future__ import annotations

import numpy as np


def clip_span(num_frames: int, stride: int, extra: int = 0) -> int:
    """Original frames a clip covers: `(num_frames-1)*stride + 1 + extra`."""
    if num_frames < 1 or stride < 1 or extra < 0:
        raise ValueError(f"clip_span needs num_frames >= 1, stride >= 1, extra >= 0; got {num_frames}, {stride}, "
                         f"{extra}")
    return (num_frames - 1) * stride + 1 + extra


def target_extra(stride: int, length: int, tubelet_size: int = 2, interpolate: bool = True) -> int:
    """Dense frames past a clip's last sampled frame that trajectory targets of `length` steps read.

    The last token-time slot starts at sampled frame `num_frames - tubelet_size`, i.e. `(tubelet_size-1)*stride`
    original frames before the clip's last frame, and walks `length` steps of 1 frame (interpolate) or
    `stride` frames (no interpolation).
    """
    step = 1 if interpolate else stride
    return max(0, length * step - (tubelet_size - 1) * stride)


def train_clip_start(num_video_frames: int, span: int, rng: np.random.Generator) -> int:
    """A uniform random start such that `[start, start+span)` lies in the video; 0 for short videos."""
    if num_video_frames <= span:
        return 0
    return int(rng.integers(0, num_video_frames - span + 1))


def test_clip_starts(num_video_frames: int, span: int, num_clips: int) -> list[int]:
    """`num_clips` starts spread uniformly from the first to the last position (centre for one clip)."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    last = max(num_video_frames - span, 0)
    if num_clips == 1:
        return [last // 2]
    return [int(round(x)) for x in np.linspace(0, last, num_clips)]


test_clip_starts.__test__ = False  # a library function, not a pytest test (its name starts with `test_`)


def clip_indices(start: int, num_frames: int, stride: int, num_video_frames: int) -> np.ndarray:
    """int64 (num_frames,) original frame indices `start + k*stride`, clamped to `[0, num_video_frames-1]`."""
    if num_video_frames < 1:
        raise ValueError(f"a video with {num_video_frames} frames has no clip")
    indices = start + np.arange(num_frames, dtype=np.int64) * stride
    return np.clip(indices, 0, num_video_frames - 1)


def segment_indices(num_video_frames: int, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """int64 (num_frames,) one frame per equal segment: random within it (rng) or its middle (rng=None).

    Works for videos shorter than `num_frames` (segments shorter than a frame repeat frames).
    """
    if num_video_frames < 1:
        raise ValueError(f"a video with {num_video_frames} frames has no clip")
    size = num_video_frames / num_frames
    offsets = rng.random(num_frames) if rng is not None else np.full(num_frames, 0.5)
    indices = np.floor((np.arange(num_frames) + offsets) * size).astype(np.int64)
    return np.clip(indices, 0, num_video_frames - 1)
