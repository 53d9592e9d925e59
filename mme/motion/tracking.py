"""Dense point tracking through a flow field (DT-style, vectorised torch, float32).

Owns the geometry of the tracked points and their propagation; knows nothing about tokens or targets.

Coordinates (docs/interfaces.md): a point `(x, y)` is in pixels of the frame it lives on, integer values at
pixel centres. `flow[i, y, x] = (dx, dy)` moves the pixel at (x, y) of frame `i` to (x+dx, y+dy) in frame
`i+1`. A point at a sub-pixel position takes the flow bilinearly interpolated from its four neighbouring pixel
centres (the same values as `grid_sample(..., align_corners=True)` on pixel-centre coordinates, written out
as four gathers so that every point may read its own frame).

One step of the tracker: `p <- p + flow[f](p)`, `f <- f + 1`. `track_points(..., step=s)` records every
`s`-th position and chains the `s` single-frame flows along the path in between (interpolation off: the
tracker walks the sparse frames, a step of `s` original frames composed of `s` dense steps).

Validity: a point that leaves the frame `[0, W-1] x [0, H-1]` is clamped to it and its whole trajectory is
invalid; so is a trajectory that needs a flow pair past the end of the given flow (short videos).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mme.motion.backends import compiled_kernels


def patch_grid_points(grid_h: int, grid_w: int, patch_size: int, points_per_patch: int) -> torch.Tensor:
    """Start points: a sqrt(K) x sqrt(K) grid at the centres of equal sub-cells of every patch.

    For a 16 px patch and K = 4 the points sit at the centres of the four 8x8 quarters, offsets 3.5 and 11.5
    from the patch's top-left pixel centre.

    Returns:
        float32 (grid_h * grid_w * K, 2) (x, y), ordered (patch row, patch column, point row, point column).
    """
    side = math.isqrt(points_per_patch)
    if side * side != points_per_patch:
        raise ValueError(f"points_per_patch must be a square (1, 4, 9, ...), got {points_per_patch}")
    sub = patch_size / side
    offsets = (torch.arange(side, dtype=torch.float32) + 0.5) * sub - 0.5
    ys = torch.arange(grid_h, dtype=torch.float32)[:, None] * patch_size + offsets  # (grid_h, side)
    xs = torch.arange(grid_w, dtype=torch.float32)[:, None] * patch_size + offsets  # (grid_w, side)
    y = ys[:, None, :, None].expand(grid_h, grid_w, side, side)
    x = xs[None, :, None, :].expand(grid_h, grid_w, side, side)
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


def median_filter_flow(flow: torch.Tensor) -> torch.Tensor:
    """3x3 median of each flow component per frame (replicated border), as dense trajectories filter flow.

    Exact median of the 9 neighbours via a 19 compare-exchange sorting network (Paeth), much faster on CPU
    than sorting unfolded windows. flow (S, H, W, 2) -> (S, H, W, 2).
    """
    height, width = flow.shape[1:3]
    padded = F.pad(flow.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate")
    v = [padded[..., dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)]
    for a, b in _MEDIAN9_NETWORK:
        v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
    return v[4].permute(0, 2, 3, 1).contiguous()


# Compare-exchange pairs after which element 4 of 9 is the median (Paeth, Graphics Gems 1990).
_MEDIAN9_NETWORK = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8),
                    (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def sample_flow(flow: torch.Tensor, frame: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear flow at sub-pixel points, each on its own frame.

    Args:
        flow: (S, H, W, 2); frame: long (P,) in [0, S); points: (P, 2) (x, y) inside [0, W-1] x [0, H-1].
    Returns:
        (P, 2) displacement (dx, dy).
    """
    _, height, width, _ = flow.shape
    table = flow.reshape(-1, 2)
    x, y = points[:, 0], points[:, 1]
    x0 = x.floor().clamp(0, max(width - 2, 0))
    y0 = y.floor().clamp(0, max(height - 2, 0))
    fx = (x - x0).unsqueeze(1)
    fy = (y - y0).unsqueeze(1)
    step_x = 1 if width > 1 else 0
    step_y = width if height > 1 else 0
    base = (frame * height + y0.long()) * width + x0.long()
    # The four neighbours of every point in one gather: (P, 4 (top-left, top-right, bottom-left, bottom-right), 2).
    corners = torch.tensor([0, step_x, step_y, step_y + step_x], device=flow.device)
    near = table.index_select(0, (base[:, None] + corners).view(-1)).view(len(points), 4, 2)
    top = near[:, 0] * (1 - fx) + near[:, 1] * fx
    bottom = near[:, 2] * (1 - fx) + near[:, 3] * fx
    return top * (1 - fy) + bottom * fy


def track_points(flow: torch.Tensor, points: torch.Tensor, start: torch.Tensor, steps: int, step: int = 1,
                 median: bool = False, end: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Track points through consecutive flow fields.

    Args:
        flow: (S, H, W, 2) float; `flow[i]` maps frame i to frame i+1.
        points: (P, 2) start positions (x, y) on their start frames.
        start: long (P,) start frame of every point (an index into `flow`).
        steps: number of recorded steps L.
        step: original frames per recorded step (1 = dense; s = the sparse frames, s flows chained).
        median: 3x3 median-filter the flow first.
        end: long (P,) the end (exclusive) of each point's flow in `flow`; None: S for every point. Several
            clips' flow windows stacked along S give one call: clip b's points start at b*S + f and end at
            b*S + its real pairs.
    Returns:
        tracks float32 (P, steps+1, 2): positions on frames start + t*step, t = 0..steps;
        valid bool (P,): False when the point left the frame or ran past the end of its flow.
    """
    if step < 1:
        raise ValueError(f"track_points step must be >= 1, got {step}")
    flow = flow.float()
    if median and len(flow):
        flow = median_filter_flow(flow)
    num_pairs = flow.shape[0]
    start = torch.as_tensor(start, dtype=torch.long, device=flow.device).reshape(-1)
    end = torch.full_like(start, num_pairs) if end is None else end.to(flow.device, torch.long).reshape(-1)
    kernels = compiled_kernels(flow)
    if kernels is not None:  # the same steps point by point, compiled (`mme.motion.backends`)
        tracks = torch.empty(len(points), steps + 1, 2)
        valid = torch.empty(len(points), dtype=torch.bool)
        kernels.track(flow.contiguous().numpy(), points.float().contiguous().numpy(), start.numpy(), end.numpy(),
                      steps, step, tracks.numpy(), valid.numpy())
        return tracks, valid
    return _track_torch(flow, points, start, end, steps, step)


def _track_torch(flow: torch.Tensor, points: torch.Tensor, start: torch.Tensor, end: torch.Tensor, steps: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`track_points` in torch (any device): every point's step at once."""
    num_pairs, height, width = flow.shape[:3]
    position = points.float().clone()
    upper = torch.tensor([width - 1, height - 1], dtype=torch.float32, device=flow.device)
    valid = ((position >= 0) & (position <= upper)).all(1)
    position = torch.minimum(position.clamp(min=0), upper)
    # Points whose last step needs a pair past the end of their flow are invalid; they stop at the end.
    valid &= start + steps * step - 1 < end
    tracks = [position]
    for t in range(steps):
        for u in range(step):
            frame = start + (t * step + u)
            if num_pairs:
                present = (frame < end).unsqueeze(1)
                moved = sample_flow(flow, frame.clamp(max=num_pairs - 1), position)
                position = position + moved * present
            valid &= ((position >= 0) & (position <= upper)).all(1)
            position = torch.minimum(position.clamp(min=0), upper)
        tracks.append(position)
    return torch.stack(tracks, dim=1), valid


def resize_flow(flow: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resample a flow field (S, H, W, 2) to (S, height, width, 2), vectors rescaled per axis.

    Bilinear, align_corners=False: the same pixel-centre map as `mme.data.transforms` (used when a flow cache
    was stored at another resolution than the decoded frames).
    """
    src_h, src_w = flow.shape[1:3]
    if (src_h, src_w) == (height, width):
        return flow
    out = F.interpolate(flow.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False)
    scale = torch.tensor([width / src_w, height / src_h], dtype=out.dtype, device=out.device)
    return (out.permute(0, 2, 3, 1) * scale).contiguous()
