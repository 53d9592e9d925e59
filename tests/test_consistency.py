"""Forward-backward check ends tracks that get covered by a sliding object; pruning drops jumps and statics."""

from __future__ import annotations

import torch

from mme.motion.consistency import fb_consistent_steps, fb_valid, prune_valid, round_trip_errors
from mme.motion.tracking import track_points

H, W, SPEED, STEPS = 48, 96, 2.0, 6
TOP, BOTTOM, LEFT0, SIDE = 16, 31, 10, 16  # a 16 px textured square at x 10..25 sliding right 2 px/frame


def object_mask(frame: int) -> torch.Tensor:
    """bool (H, W): pixels the object covers on `frame`."""
    x = torch.arange(W)
    left = LEFT0 + SPEED * frame
    rows = (torch.arange(H) >= TOP) & (torch.arange(H) <= BOTTOM)
    return rows[:, None] & ((x >= left) & (x < left + SIDE))[None, :]


def analytic_flows(pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact flows of the textured object over a static textured background.

    forward[i]: the object's pixels on frame i move (SPEED, 0), the background stays. backward[i] (frame
    i+1 -> i): the object's pixels on frame i+1 move (-SPEED, 0), the background (visible there) stays.
    """
    forward = torch.zeros(pairs, H, W, 2)
    backward = torch.zeros(pairs, H, W, 2)
    for i in range(pairs):
        forward[i][object_mask(i)] = torch.tensor([SPEED, 0.0])
        backward[i][object_mask(i + 1)] = torch.tensor([-SPEED, 0.0])
    return forward, backward


def test_points_covered_by_the_object_are_invalid_the_rest_kept():
    forward, backward = analytic_flows(STEPS)
    ahead = [(x, 24.0) for x in (30.0, 34.0, 36.0)]  # background the object reaches within 6 steps (x <= 37)
    far = [(x, 24.0) for x in (44.0, 60.0, 80.0)] + [(30.0, 5.0), (30.0, 40.0)]  # beyond its reach / path
    on_object = [(14.0, 20.0), (20.0, 24.0), (12.0, 28.0)]
    behind = [(4.0, 24.0)]  # background the object moves away from
    points = torch.tensor(ahead + far + on_object + behind)
    start = torch.zeros(len(points), dtype=torch.long)
    tracks, inside = track_points(forward, points, start, STEPS)
    assert inside.all()
    n_ahead, n_far = len(ahead), len(far)
    # The object's points move with it; background points stay.
    moved = tracks[:, -1, 0] - tracks[:, 0, 0]
    objects = slice(n_ahead + n_far, n_ahead + n_far + len(on_object))
    torch.testing.assert_close(moved[objects], torch.full((len(on_object),), SPEED * STEPS))
    assert (moved[n_ahead:n_ahead + n_far] == 0).all()
    assert (moved[:n_ahead] > 0).any()  # one-way tracking drifts onto the occluder: what the check catches
    valid = fb_valid(backward, tracks, start)
    assert not valid[:n_ahead].any()
    assert valid[n_ahead:].all()
    # A background point ends on the step the object covers it: x=30 is covered on frame 3 (10+2*3+16 > 30).
    steps = fb_consistent_steps(backward, tracks, start)
    assert steps[0].tolist() == [True, True, False, True, True, True]
    first_bad = torch.tensor([(~row).nonzero()[0].item() for row in steps[:n_ahead]])
    covered_on = torch.tensor([min(f for f in range(1, STEPS + 1) if object_mask(f)[24, int(x)]) for x, _ in ahead])
    assert torch.equal(first_bad + 1, covered_on)
    # The round-trip error there is the object's motion: |f + b|^2 = SPEED^2 = 4 > 0.01*(0 + 4) + 0.5.
    _, _, error = round_trip_errors(backward, tracks, start)
    torch.testing.assert_close(error[0, 2], torch.tensor([-SPEED, 0.0]))


def test_sparse_steps_chain_the_backward_flow():
    forward, backward = analytic_flows(12)
    points = torch.tensor([[34.0, 24.0], [60.0, 24.0], [16.0, 24.0]])
    start = torch.zeros(3, dtype=torch.long)
    tracks, _ = track_points(forward, points, start, 4, step=3)
    assert fb_valid(backward, tracks, start, step=3).tolist() == [False, True, True]
    # A wrong stride (reading one pair per step) would see the object's point as inconsistent.
    assert fb_valid(backward, tracks, start, step=1).tolist()[2] is False


def test_prune_sudden_jumps_and_static_tracks():
    smooth = torch.cumsum(torch.full((7, 2), 1.0), 0) - 1.0  # 6 equal steps of (1, 1)
    jump = torch.zeros(7, 2)
    jump[4:, 0] = 10.0  # one 10 px step among zeros: 100 % of the path
    small_jitter = torch.zeros(7, 2)
    small_jitter[3, 1] = 0.5  # a sub-pixel wobble: not a jump (below SUDDEN_MIN_STEP)
    near_jump = torch.tensor([[0.0, 0], [6, 0], [9, 0], [12, 0], [15, 0], [18, 0], [21, 0]])  # 6 of 21: 29 %
    big_first = torch.tensor([[0.0, 0], [16, 0], [17, 0], [18, 0], [19, 0], [20, 0], [21, 0]])  # 16/21 = 76 %
    tracks = torch.stack([smooth, jump, small_jitter, near_jump, big_first])
    assert prune_valid(tracks).tolist() == [True, False, True, True, False]
    assert prune_valid(tracks, static=True).tolist() == [True, False, False, True, False]
    assert prune_valid(tracks[:, :2]).all()  # L = 1: a single step is never a jump
