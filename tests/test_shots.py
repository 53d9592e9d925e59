"""Shot cuts: found exactly on a generated cut, never on normal or fast motion; crossing trajectories invalid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mme.data.synthetic import make_video
from mme.motion.flow import compute_flow
from mme.motion.shots import (
    CutThresholds,
    crosses_cut,
    cut_free_starts,
    cut_signals,
    detect_cuts,
    frame_differences,
    robust_z,
)
from mme.motion.tracking import patch_grid_points, track_points

SIZE, FRAMES, CUT = 64, 40, 17


def two_shots(cut: int = CUT) -> np.ndarray:
    """Frames 0..cut-1 of one generated scene, then frames cut.. of another (a hard cut at `cut`)."""
    first = make_video(0, FRAMES, SIZE, 2, True, seed=0)
    second = make_video(5, FRAMES, SIZE, 2, True, seed=0)
    return np.concatenate([first[:cut], second[cut:]])


@pytest.fixture(scope="module")
def cut_video():
    frames = two_shots()
    return frames, compute_flow(frames, "dis")


def test_the_cut_frame_is_recovered_exactly(cut_video):
    frames, flow = cut_video
    assert detect_cuts(frames, flow) == [CUT]
    assert detect_cuts(frames) == [CUT]  # appearance alone (both signals) finds it too
    signals = cut_signals(frames, flow)
    for name, values in signals.items():  # every signal peaks on pair CUT-1 (frame CUT-1 -> CUT)
        assert int(np.argmax(values)) == CUT - 1, name
    # Another place, another pair of scenes: still exact.
    other = np.concatenate([make_video(3, FRAMES, SIZE, 0, False, seed=4)[:29],
                            make_video(8, FRAMES, SIZE, 0, False, seed=4)[29:]])
    assert detect_cuts(other, compute_flow(other, "dis")) == [29]


@pytest.mark.parametrize("zoom", [1.0, 4.0])
def test_no_cut_on_normal_or_fast_motion(zoom):
    for index in range(0, 12, 3):  # slides, rotations, grow/shrink, bounce ... with camera pan
        frames = make_video(index, 48, 96, 2, True, seed=1, zoom=zoom)
        assert detect_cuts(frames, compute_flow(frames, "dis")) == [], (index, zoom)
        assert detect_cuts(frames) == [], (index, zoom)


def test_each_floor_is_needed():
    # A static clip with one slightly different frame: the robust z is huge, the absolute floor stops it.
    frames = np.full((12, 16, 16, 3), 100, np.uint8)
    frames[6] += 3
    assert np.isinf(robust_z(frame_differences(frames))[5:7]).all()
    assert detect_cuts(frames) == []
    # The same frame turned into another scene passes both floors.
    frames[6:] = 200
    assert detect_cuts(frames) == [6]
    # One vote is not enough when two are asked for.
    assert detect_cuts(frames, thresholds=CutThresholds(histogram=2.0)) == []
    assert detect_cuts(frames, thresholds=CutThresholds(histogram=2.0, votes=1)) == [6]


def test_trajectories_crossing_the_cut_are_invalid_the_others_valid(cut_video):
    frames, flow = cut_video
    cuts = detect_cuts(frames, flow)
    length, step, i0 = 4, 1, 10
    grid = patch_grid_points(SIZE // 16, SIZE // 16, 16, 4)
    starts = torch.arange(0, 16, 2)  # token slots of a clip: offsets 0, 2, ..., 14 from i0
    start = starts.repeat_interleave(len(grid))
    tracks, valid = track_points(torch.from_numpy(flow[i0:]), grid.repeat(len(starts), 1), start, length, step)
    crossing = crosses_cut(cuts, i0, start, length, step)
    # By hand: a trajectory over frames i0+o .. i0+o+4 follows pair CUT-1 iff i0+o < CUT <= i0+o+4.
    expected = torch.tensor([i0 + o < CUT <= i0 + o + length for o in start.tolist()])
    assert torch.equal(crossing, expected)
    assert crossing.any() and (~crossing).any()
    kept = valid & ~crossing
    assert not kept[crossing].any()  # no valid trajectory crosses the cut
    assert torch.equal(kept[~crossing], valid[~crossing])  # the others keep their validity
    # The boundary cases: ending exactly on the cut frame crosses, starting on it does not.
    at = torch.tensor([CUT - length - 1, CUT - length, CUT - 1, CUT])
    assert crosses_cut([CUT], 0, at, length).tolist() == [False, True, True, False]
    # Sparse steps span step*L frames.
    assert crosses_cut([CUT], 0, torch.tensor([CUT - 12]), 4, step=3).tolist() == [True]
    assert crosses_cut([CUT], 0, torch.tensor([CUT - 13]), 4, step=3).tolist() == [False]
    assert not crosses_cut([], 0, at, length).any()


def test_cut_free_starts():
    starts = cut_free_starts([10], num_frames=30, window=5)
    # Windows i0..i0+4 hold the cut when i0 < 10 <= i0 + 4, i.e. i0 in 6..9.
    assert starts.tolist() == [i for i in range(26) if not 6 <= i <= 9]
    assert cut_free_starts([], 8, 8).tolist() == [0]
    assert cut_free_starts([2, 4, 6], 8, 8).tolist() == []
