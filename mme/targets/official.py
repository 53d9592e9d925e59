"""`traj_official`: the MME target as the released official code computes it, so its deviations from the
paper's definition (`traj`, mme/targets/trajectory.py) can be measured as a row of the content study.

Every difference is listed, with what is and is not reproduced, in docs/official_target.md. In short:
- grid: the K points of a patch sit on integer pixels at offsets `sub//2 + i*sub` (4 and 12 for a 16 px
  patch and K = 4), not at the sub-cell centres 3.5 / 11.5;
- tracking: the flow is truncated towards zero to integers (`int` cast) and read at the integer position
  (no interpolation); a step's displacement is that integer flow, clamped to +-`DISPLACEMENT_LIMIT` px,
  and the point is clamped into the frame before every read;
- validity: a point is out when one of p_1 .. p_{L-1} lies outside the frame (the last position is never
  checked); a token is valid when any of its K points is (one flag for all its position columns);
- position part: displacements / `DISPLACEMENT_SCALE`, then with `target.patch_norm` standardised per
  coordinate and step across the K points (mean and unbiased std, `(x - mean) / (std + STD_EPS)`), so a
  translation common to the patch becomes exactly 0; columns ordered (coordinate, step, point);
- appearance part: a static HOG of the tube's middle input frame, per RGB channel of the ImageNet-normalised
  frame: Sobel gradients (replicated border), 9 unsigned bins centred at 0, 20, ..., 160 degrees with linear
  votes between the two neighbouring bin centres, mean over the
  8x8 cell, no normalisation; columns ordered (channel, bin, cell row, cell column), not patch-normalised.

The official code has one tracking mode and one density: `target.interpolate` and `target.density` do not
apply to this kind (it always tracks the dense video and keeps all K points).

The computation is `official_parts(frames, middle, flow, geometry)`, a function of tensors; the spec adapts it to
`TargetBatch`. It tracks on the augmented clip's flow like every kind here (see the docs for why).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mme.config import HOG_BINS, HOG_CELL
from mme.targets.base import PartValue, TargetBatch, TargetGeometry, TargetSpec, register

DISPLACEMENT_LIMIT = 20.0  # px: recorded displacements are clamped to +-this
DISPLACEMENT_SCALE = 20.0  # displacements are divided by this before the patch norm
STD_EPS = 1e-6  # added to the (unbiased) standard deviation, not to the variance
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Cross-correlation kernels of the gradient: both the negated Sobel derivative (x then y); the sign does
# not matter for unsigned orientation.
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


def official_grid(grid_h: int, grid_w: int, patch: int, points: int) -> torch.Tensor:
    """long (grid_h*grid_w*K, 2) (x, y) start pixels, ordered (patch row, patch column, point row, point column)."""
    side = math.isqrt(points)
    sub = patch // side
    offsets = torch.arange(side) * sub + sub // 2
    ys = torch.arange(grid_h)[:, None] * patch + offsets
    xs = torch.arange(grid_w)[:, None] * patch + offsets
    y = ys[:, None, :, None].expand(grid_h, grid_w, side, side)
    x = xs[None, :, None, :].expand(grid_h, grid_w, side, side)
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


def track_integer(flow: torch.Tensor, points: torch.Tensor, start: torch.Tensor, steps: int,
                  end: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer tracking on truncated flow, one original frame per step.

    Args:
        flow: (S, H, W, 2) float (several clips' windows may be stacked along S); points: long (P, 2) (x, y);
        start: long (P,) first pair of every point; end: long (P,) where each point's flow stops (default S).
    Returns:
        tracks long (P, steps+1, 2): the (clamped) positions read at each step, then the last one clamped;
        displacement float (P, steps, 2): integer flow read at p_t, clamped to +-DISPLACEMENT_LIMIT;
        valid bool (P,): p_1 .. p_{steps-1} in the frame, and every pair read within the flow.
    """
    num_pairs, height, width = flow.shape[:3]
    device = flow.device
    table = flow.float().trunc().reshape(-1, 2)  # truncation towards zero, as an int cast
    start = torch.as_tensor(start, dtype=torch.long, device=device).reshape(-1)
    end = torch.full_like(start, num_pairs) if end is None else torch.as_tensor(end, device=device).long()
    upper = torch.tensor([width - 1, height - 1], device=device)
    position = points.long().to(device).clone()
    valid = start + steps <= end
    tracks, moves = [], []
    for t in range(steps):
        if t > 0:
            valid &= ((position >= 0) & (position <= upper)).all(1)
        position = torch.minimum(position.clamp(min=0), upper)
        tracks.append(position)
        frame = torch.minimum(start + t, (end - 1).clamp(min=0))
        move = table[(frame * height + position[:, 1]) * width + position[:, 0]] if num_pairs else \
            torch.zeros(len(position), 2, device=device)
        moves.append(move)
        position = position + move.long()
    tracks.append(torch.minimum(position.clamp(min=0), upper))
    displacement = torch.stack(moves, 1).clamp(-DISPLACEMENT_LIMIT, DISPLACEMENT_LIMIT)
    return torch.stack(tracks, 1), displacement, valid


def official_position(displacement: torch.Tensor, patch_norm: bool) -> torch.Tensor:
    """(N, K, L, 2) displacements of each token's K points -> (N, 2*L*K) ordered (coordinate, step, point)."""
    x = displacement.permute(0, 3, 2, 1) / DISPLACEMENT_SCALE  # (N, 2, L, K)
    if patch_norm:  # one point (K = 1) has no spread: its values become 0
        spread = x.std(-1, unbiased=True, keepdim=True) if x.shape[-1] > 1 else torch.zeros_like(x)
        x = (x - x.mean(-1, keepdim=True)) / (spread + STD_EPS)
    return x.reshape(len(x), -1)


def official_hog(frames: torch.Tensor) -> torch.Tensor:
    """float (F, H, W, 3) RGB 0..255 -> (F, 3, 9, H/8, W/8): the official per-channel cell histograms."""
    count, height, width, _ = frames.shape
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=frames.device).view(1, 3, 1, 1)
    image = ((frames.float().permute(0, 3, 1, 2) / 255.0 - mean) / std).reshape(count * 3, 1, height, width)
    kernels = torch.tensor([SOBEL_X, SOBEL_Y], device=frames.device).unsqueeze(1)  # (2, 1, 3, 3)
    gradient = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradient.norm(dim=1)
    position = torch.atan2(gradient[:, 1], gradient[:, 0]) / math.pi * HOG_BINS
    position = torch.where(position < 0, position + HOG_BINS, position)  # [0, 9]
    lower, upper = position.floor(), position.ceil()
    votes = (F.one_hot(upper.long() % HOG_BINS, HOG_BINS) * (magnitude * (position - lower)).unsqueeze(-1)
             + F.one_hot(lower.long() % HOG_BINS, HOG_BINS) * (magnitude * (upper - position)).unsqueeze(-1))
    cells = F.avg_pool2d(votes.permute(0, 3, 1, 2), HOG_CELL)  # (F*3, 9, H/8, W/8)
    return cells.reshape(count, 3, HOG_BINS, height // HOG_CELL, width // HOG_CELL)


def official_parts(frames: torch.Tensor, middle: torch.Tensor, flow: torch.Tensor, geo: TargetGeometry,
                   flow_pairs: torch.Tensor | None = None) -> list[PartValue]:
    """The kind's parts for a batch of clips, from tensors.

    Args:
        frames: float (B, F, H, W, 3) 0..255; middle: long (slots,) rows of `frames` holding each tube's
            middle input frame; flow: (B, S, H, W, 2), pair i from offset i to i+1; flow_pairs: long (B,) real
            pairs of each clip (None: all S).
    Returns:
        parts with values (B, N, width).
    """
    batch, _, height, width = frames.shape[:4]
    hp, wp, per_side = height // geo.patch, width // geo.patch, geo.patch // HOG_CELL
    tokens = geo.slots * hp * wp
    hog = official_hog(frames[:, middle].reshape(batch * geo.slots, height, width, 3))  # (B*J, 3, 9, Hc, Wc)
    hog = hog[..., :hp * per_side, :wp * per_side].reshape(batch, geo.slots, 3, HOG_BINS, hp, per_side, wp, per_side)
    hog = hog.permute(0, 1, 4, 6, 2, 3, 5, 7).reshape(batch, tokens, -1)
    device, pairs = flow.device, flow.shape[1]
    grid = official_grid(hp, wp, geo.patch, geo.points).to(device)
    real = torch.full((batch,), pairs, device=device) if flow_pairs is None else flow_pairs.to(device).long()
    clip_start = torch.arange(batch, device=device) * pairs  # clip b's window starts at pair b*S of the stack
    start = (clip_start[:, None] + torch.tensor(geo.slot_offsets, device=device).repeat_interleave(len(grid)))
    end = (clip_start + real)[:, None].expand_as(start)
    points = grid.repeat(batch * geo.slots, 1)
    _, displacement, valid = track_integer(flow.reshape(-1, *flow.shape[2:]), points, start.reshape(-1),
                                           geo.length, end.reshape(-1))
    pos = official_position(displacement.view(batch * tokens, geo.points, geo.length, 2), geo.patch_norm)
    token_valid = valid.view(batch * tokens, geo.points).any(1, keepdim=True).expand_as(pos)
    return [PartValue("hog", hog, standardize=False),
            PartValue("pos", pos.view(batch, tokens, -1), token_valid.reshape(batch, tokens, -1), standardize=False)]


@register
class OfficialTrajectoryTarget(TargetSpec):
    """`traj_official`: parts `hog` (3*9 per cell: 108 for a 16 px patch) then `pos` (2*L*K)."""

    name = "traj_official"
    needs_flow = True
    needs_rgb = True  # the released code's HOG is per colour channel

    def parts(self, cfg) -> dict[str, int]:
        geo = TargetGeometry.from_cfg(cfg)
        return {"hog": 3 * HOG_BINS * (geo.patch // HOG_CELL) ** 2, "pos": 2 * geo.length * geo.points}

    def flow_pairs(self, geo: TargetGeometry) -> int:
        return geo.slot_offsets[-1] + geo.length

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        middle = inputs.rows(geo.tube_frames(dense=False).reshape(-1))
        return official_parts(inputs.rgb, middle, inputs.flow, geo, inputs.flow_pairs)
