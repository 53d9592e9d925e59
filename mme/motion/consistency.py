"""Trajectory sanity checks on tracked points: forward-backward flow consistency and dense-trajectory pruning.

Owns the two optional validity tests of a trajectory beyond "stayed in the frame"; pure functions of the
tracks `mme.motion.tracking.track_points` returns (P, L+1, 2), usable by any target kind.

Forward-backward check (`target.fb_check`; the idea of Sundaram, Brox and Keutzer, "Dense point
trajectories by GPU-accelerated large displacement optical flow", ECCV 2010): following the forward flow `f`
from p and then the backward flow `b` from p + f should return to p. Where the point gets covered (or the
flow is wrong) the two disagree. A step is inconsistent when

    |f + b(p + f)|^2 > FB_RELATIVE * (|f|^2 + |b(p + f)|^2) + FB_ABSOLUTE      (0.01 and 0.5 px^2)

the relative term tolerating the larger errors of larger motions. For a recorded step of `s` original
frames (tracking without interpolation) `f` is the step's displacement p_{t+1} - p_t and `b` the backward
flows chained from p_{t+1} over the same s frames. A trajectory with any inconsistent step is invalid (it
ends there: the target has no shorter trajectory, so ending it masks it).

Pruning (`target.prune`; the pruning of dense trajectories, Wang et al., IJCV 2013): a trajectory whose
longest step exceeds `SUDDEN_FRACTION` = 70 % of its path length (sum of step lengths) and `SUDDEN_MIN_STEP`
px is a tracking jump, invalid. Optionally (`static=True`) a trajectory whose end-to-end displacement
|p_L - p_0| is below `STATIC_MAX_DISPLACEMENT` px carries no motion and is invalid as well.
"""

from __future__ import annotations

import torch

from mme.motion.tracking import sample_flow

FB_RELATIVE = 0.01  # share of the squared flow magnitudes tolerated as round-trip error
FB_ABSOLUTE = 0.5  # px^2 of round-trip error always tolerated (flow noise)
SUDDEN_FRACTION = 0.7  # a step longer than this share of the path length is a jump
SUDDEN_MIN_STEP = 1.0  # px: shorter steps are flow noise, never jumps
STATIC_MAX_DISPLACEMENT = 1.0  # px end to end over the whole trajectory: static


def round_trip_errors(backward: torch.Tensor, tracks: torch.Tensor, start: torch.Tensor, step: int = 1,
                      end: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per recorded step: the forward displacement, the chained backward displacement and their sum.

    Args:
        backward: (S, H, W, 2) backward flow, pair i maps frame i+1 back to frame i.
        tracks: (P, L+1, 2) positions on frames start + t*step (as `track_points` returns).
        start: long (P,) start frame of every track (an index into the flow).
        step: original frames per recorded step.
        end: long (P,) the end (exclusive) of each point's flow in `backward`, as in `track_points`; None: S.
            Several clips' windows stacked along S give one call.
    Returns:
        forward (P, L, 2), back (P, L, 2), error (P, L, 2) = forward + back. Steps that would read past
        a point's end use its last pair (their trajectories are invalid anyway).
    """
    num_pairs, height, width = backward.shape[:3]
    points, steps = tracks.shape[0], tracks.shape[1] - 1
    device = backward.device
    upper = torch.tensor([width - 1, height - 1], dtype=torch.float32, device=device)
    start = torch.as_tensor(start, dtype=torch.long, device=device).reshape(-1)
    last = torch.full_like(start, num_pairs) if end is None else end.to(device, torch.long).reshape(-1)
    last = ((last - 1).clamp(0, num_pairs - 1)).repeat_interleave(steps)
    forward = tracks[:, 1:] - tracks[:, :-1]
    # All steps at once: (P*L,) points at the step's end, walked back over its `step` frames.
    position = tracks[:, 1:].reshape(-1, 2).float()
    end_frame = (start[:, None] + (torch.arange(steps, device=device) + 1) * step).reshape(-1)  # frame of p_{t+1}
    for u in range(1, step + 1):
        pair = torch.minimum((end_frame - u).clamp(min=0), last)  # backward pair k maps frame k+1 -> k
        position = position + sample_flow(backward.float(), pair, position)
        position = torch.minimum(position.clamp(min=0), upper)
    back = position.view(points, steps, 2) - tracks[:, 1:]
    return forward, back, forward + back


def fb_consistent_steps(backward: torch.Tensor, tracks: torch.Tensor, start: torch.Tensor,
                        step: int = 1, end: torch.Tensor | None = None) -> torch.Tensor:
    """bool (P, L): whether each recorded step passes the forward-backward test (module docstring)."""
    forward, back, error = round_trip_errors(backward, tracks, start, step, end)
    tolerance = FB_RELATIVE * (forward.pow(2).sum(-1) + back.pow(2).sum(-1)) + FB_ABSOLUTE
    return error.pow(2).sum(-1) <= tolerance


def fb_valid(backward: torch.Tensor, tracks: torch.Tensor, start: torch.Tensor, step: int = 1,
             end: torch.Tensor | None = None) -> torch.Tensor:
    """bool (P,): True where every step of the trajectory is forward-backward consistent (`end`: as in
    `round_trip_errors`)."""
    return fb_consistent_steps(backward, tracks, start, step, end).all(1)


def prune_valid(tracks: torch.Tensor, static: bool = False) -> torch.Tensor:
    """bool (P,): False for trajectories with a sudden jump, and with `static` for static ones.

    tracks (P, L+1, 2). A jump (L >= 2): the longest step is longer than SUDDEN_FRACTION of the path
    length and than SUDDEN_MIN_STEP px. Static: |p_L - p_0| < STATIC_MAX_DISPLACEMENT px.
    """
    lengths = (tracks[:, 1:] - tracks[:, :-1]).norm(dim=-1)  # (P, L)
    valid = torch.ones(len(tracks), dtype=torch.bool, device=tracks.device)
    if lengths.shape[1] >= 2:  # a single step is the whole path: no jump to tell apart
        longest = lengths.max(1).values
        valid &= ~((longest > SUDDEN_FRACTION * lengths.sum(1)) & (longest > SUDDEN_MIN_STEP))
    if static:
        valid &= (tracks[:, -1] - tracks[:, 0]).norm(dim=-1) >= STATIC_MAX_DISPLACEMENT
    return valid
