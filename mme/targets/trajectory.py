"""MME's motion-trajectory target (docs/targets.md) and its "HOG + Traj. w/o shape" variant.

Every token (slot j, patch) seeds K points on a sqrt(K) x sqrt(K) grid of its patch at offset f_j and
tracks them for L steps: 1 original frame per step with `target.interpolate` (the dense video between the
sparse input frames), s frames per step without it (the sparse frames, s flows chained). Per trajectory:
position features `dp_t = p_{t+1} - p_t` (L x 2) and shape features `HOG(p_t)` (L x 9), the HOG of the 8x8
window centred on the tracked point on the frame it is on at step t (t = 0 .. L-1). A trajectory that leaves
the frame, or runs past the end of the video's flow, is invalid: its columns are 0 and masked out.

Real footage (docs/targets.md): a trajectory whose span (flow pairs f_j .. f_j + L*step - 1, the chained
pairs of sparse steps included) holds a shot-cut pair (`TargetBatch.cut_pairs`) is invalid, always;
`target.fb_check` invalidates trajectories with a forward-backward inconsistent step (occlusion, read from
`TargetBatch.backward`) and `target.prune` those with a sudden jump (`mme.motion.consistency`).

`target.density` reduces the K trajectories of a token: dense keeps all (K*L*(2+9) = 264 for K=4, L=6);
max keeps the most-moving valid one (largest path length sum_t |dp_t|, first on ties); mean averages the
features of the valid ones. Both give L*(2+9), valid when any of the K is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mme.config import HOG_BINS
from mme.motion.consistency import fb_valid, prune_valid
from mme.motion.descriptors import hog_at_points
from mme.motion.tracking import median_filter_flow, patch_grid_points, track_points
from mme.targets.appearance import FrameHogMixin
from mme.targets.base import PartValue, TargetBatch, TargetGeometry, TargetInputs, TargetSpec, register


@dataclass
class Trajectories:
    """Tracked points of every token, with the leading batch dim (B,) of a `TargetBatch` or none for a
    `TargetInputs`: tracks (..., J, Hp, Wp, K, L+1, 2), valid (..., J, Hp, Wp, K), shape HOG
    (..., J, Hp, Wp, K, L, 9) or None."""

    tracks: torch.Tensor
    valid: torch.Tensor
    shape: torch.Tensor | None = None

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """pos (..., N, K, L, 2), shape (..., N, K, L, 9) or None, valid (..., N, K)."""
        *lead, slots, hp, wp, k = self.valid.shape
        tokens = (*lead, slots * hp * wp, k)
        tracks = self.tracks.reshape(*tokens, *self.tracks.shape[-2:])
        pos = tracks[..., 1:, :] - tracks[..., :-1, :]
        shape = None if self.shape is None else self.shape.reshape(*tokens, *self.shape.shape[-2:])
        return pos, shape, self.valid.reshape(tokens)


def trajectory_frames(geo: TargetGeometry) -> set[int]:
    """Offsets of the frames the shape features read: f_j + t*step, t < L."""
    return {f + t * geo.track_step for f in geo.slot_offsets for t in range(geo.length)}


def trajectory_pairs(geo: TargetGeometry) -> int:
    """Flow pairs the tracker reads: up to the last slot's f_j + L*step."""
    return geo.slot_offsets[-1] + geo.length * geo.track_step


def track_tokens(inputs: TargetInputs | TargetBatch, geo: TargetGeometry, with_shape: bool = True) -> Trajectories:
    """Track the K grid points of every token for L steps (see the module docstring): of one clip
    (`TargetInputs`, no batch dim) or of every clip of a `TargetBatch` (leading dim B)."""
    if isinstance(inputs, TargetInputs):
        batched = track_tokens(inputs.batch(), geo, with_shape)
        return Trajectories(batched.tracks[0], batched.valid[0], None if batched.shape is None else batched.shape[0])
    batch, device = len(inputs), inputs.device
    height, width = inputs.size
    hp, wp = height // geo.patch, width // geo.patch
    grid = patch_grid_points(hp, wp, geo.patch, geo.points).to(device)
    per_slot = len(grid)
    flow = inputs.flow if inputs.flow is not None else torch.zeros(batch, 0, height, width, 2, device=device)
    pairs = flow.shape[1]
    # Points ordered (clip, slot, point); clip b's flow window is rows b*S .. b*S + S-1 of the stacked flow.
    first = torch.arange(batch, device=device) * pairs
    slot_start = torch.tensor(geo.slot_offsets, device=device).repeat_interleave(per_slot)
    start = (first[:, None] + slot_start).view(-1)
    end = (first + inputs.pairs).repeat_interleave(geo.slots * per_slot)
    points = grid.repeat(batch * geo.slots, 1)
    tracks, valid = track_points(flow.reshape(-1, height, width, 2), points, start, geo.length, geo.track_step,
                                 geo.median, end=end)
    valid &= trajectory_checks(inputs, geo, tracks, start, end).reshape(-1)
    tracks = tracks.view(batch, geo.slots, per_slot, geo.length + 1, 2)
    shape = None
    if with_shape:
        shape = trajectory_hog(inputs, geo, tracks).reshape(batch, geo.slots, hp, wp, geo.points, geo.length,
                                                            HOG_BINS)
    return Trajectories(tracks.view(batch, geo.slots, hp, wp, geo.points, geo.length + 1, 2),
                        valid.view(batch, geo.slots, hp, wp, geo.points), shape)


def span_has_cut(cut_pairs: torch.Tensor, first: torch.Tensor, span: int) -> torch.Tensor:
    """bool (B, J): whether flow pairs `first[j] .. first[j] + span - 1` of clip b hold a cut pair.

    cut_pairs bool (B, S); first long (J,) the first pair of each span. Pairs past S count as no cut (a
    trajectory that needs them is invalid for running past the flow already).
    """
    pairs = cut_pairs.shape[1]
    before = F.pad(cut_pairs.long().cumsum(1), (1, 0))  # (B, S+1): cut pairs among pairs < k
    return before[:, (first + span).clamp(max=pairs)] > before[:, first.clamp(max=pairs)]


def trajectory_checks(inputs: TargetBatch, geo: TargetGeometry, tracks: torch.Tensor, start: torch.Tensor,
                      end: torch.Tensor) -> torch.Tensor:
    """bool (B, J, Q): the real-footage validity of every tracked point (module docstring).

    tracks (B*J*Q, L+1, 2) as `track_points` returns them for the stacked flow; start / end (B*J*Q,) their
    first pair and flow end in that stack.
    """
    batch, device = len(inputs), inputs.device
    valid = torch.ones(len(tracks), dtype=torch.bool, device=device)
    if inputs.cut_pairs is not None:
        cut_pairs = inputs.cut_pairs.to(device, torch.bool)
        if inputs.flow is not None and cut_pairs.shape != inputs.flow.shape[:2]:
            raise ValueError(f"TargetBatch.cut_pairs is {tuple(cut_pairs.shape)}, its flow has "
                             f"{tuple(inputs.flow.shape[:2])} (clips, pairs); deliver one flag per flow pair")
        first = torch.tensor(geo.slot_offsets, device=device)
        crossing = span_has_cut(cut_pairs, first, geo.length * geo.track_step)  # (B, J)
        valid &= ~crossing.repeat_interleave(len(tracks) // (batch * geo.slots), dim=1).reshape(-1)
    if geo.fb_check:
        if inputs.backward is None:
            raise ValueError("target.fb_check needs backward flow (TargetBatch.backward); re-run `mme extract` "
                             "with target.fb_check=true, or set target.fb_check=false")
        if inputs.flow is not None and inputs.backward.shape != inputs.flow.shape:
            raise ValueError(f"TargetBatch.backward is {tuple(inputs.backward.shape)}, its flow "
                             f"{tuple(inputs.flow.shape)}; deliver the backward window of the same pairs")
        backward = inputs.backward.reshape(-1, *inputs.backward.shape[2:]).float()
        if geo.median and len(backward):
            backward = median_filter_flow(backward)
        valid &= fb_valid(backward, tracks, start, geo.track_step, end)
    if geo.prune:
        valid &= prune_valid(tracks)
    return valid.view(batch, geo.slots, -1)


def trajectory_hog(inputs: TargetBatch, geo: TargetGeometry, tracks: torch.Tensor) -> torch.Tensor:
    """The shape features: tracks (B, J, Q, L+1, 2) -> HOG (B, J, Q, L, 9) of the window around p_t on the
    frame of step t."""
    batch, slots, per_slot = tracks.shape[:3]
    # Queries ordered (clip, slot, step, point), i.e. by frame, so that `hog_at_points` needs no sort.
    steps = torch.tensor(geo.slot_offsets)[:, None] + torch.arange(geo.length) * geo.track_step  # (J, L)
    rows = inputs.rows(steps).repeat_interleave(per_slot, dim=1)  # (J, L * Q)
    num_frames = inputs.gray.shape[1]
    frames = torch.arange(batch, device=inputs.device)[:, None, None] * num_frames + rows
    positions = tracks[:, :, :, :-1].transpose(2, 3)  # (B, J, L, Q, 2)
    gray = inputs.gray.reshape(-1, *inputs.gray.shape[2:])
    hog = hog_at_points(gray, frames.reshape(-1), positions.reshape(-1, 2))
    return hog.view(batch, slots, geo.length, per_slot, HOG_BINS).transpose(2, 3)


def _dense(features: list[torch.Tensor], valid: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    return features, valid


def _most_moving(features: list[torch.Tensor], valid: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Keep the valid trajectory with the largest path length (features[0] are the displacements).

    features (..., K, L, C), valid (..., K) -> features (..., 1, L, C), valid (..., 1).
    """
    length = features[0].norm(dim=-1).sum(-1).masked_fill(~valid, -1.0)
    best = length.argmax(-1, keepdim=True)  # first of equal maxima
    return ([torch.take_along_dim(f, best[..., None, None], dim=-3) for f in features],
            valid.any(-1, keepdim=True))


def _mean(features: list[torch.Tensor], valid: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Average the features of the valid trajectories (shapes as `_most_moving`)."""
    weight = valid.float().view(*valid.shape, 1, 1)
    count = weight.sum(-3, keepdim=True).clamp(min=1)
    return [(f * weight).sum(-3, keepdim=True) / count for f in features], valid.any(-1, keepdim=True)


@dataclass(frozen=True)
class Density:
    """A `target.density` entry: how the K trajectories of a token are reduced, and how many remain."""

    reduce: Callable[[list[torch.Tensor], torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]
    keeps_all: bool


DENSITY = {"dense": Density(_dense, True), "max": Density(_most_moving, False), "mean": Density(_mean, False)}


def trajectories_kept(geo: TargetGeometry) -> int:
    """Trajectories per token after the density reduction."""
    return geo.points if DENSITY[geo.density].keeps_all else 1


def trajectory_parts(trajectories: Trajectories, geo: TargetGeometry, names: tuple[str, ...]) -> list[PartValue]:
    """The `pos` and/or `shape` parts of every token after the density reduction."""
    pos, shape, valid = trajectories.per_token()
    available = {"pos": pos, "shape": shape}
    features, kept_valid = DENSITY[geo.density].reduce([available[n] for n in names], valid)
    parts = []
    for name, feature in zip(names, features):
        columns = kept_valid.view(*kept_valid.shape, 1, 1).expand_as(feature)
        tokens = feature.shape[:-3]
        parts.append(PartValue(name, feature.reshape(*tokens, -1), columns.reshape(*tokens, -1)))
    return parts


@register
class TrajectoryTarget(TargetSpec):
    """`traj` (MME): position + trajectory-aligned HOG, parts `pos` (K*L*2) then `shape` (K*L*9)."""

    name = "traj"
    needs_flow = True

    def parts(self, cfg) -> dict[str, int]:
        geo = TargetGeometry.from_cfg(cfg)
        kept = trajectories_kept(geo)
        return {"pos": kept * geo.length * 2, "shape": kept * geo.length * HOG_BINS}

    def frame_offsets(self, geo: TargetGeometry) -> set[int]:
        return trajectory_frames(geo)

    def flow_pairs(self, geo: TargetGeometry) -> int:
        return trajectory_pairs(geo)

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        return trajectory_parts(track_tokens(inputs, geo, with_shape=True), geo, ("pos", "shape"))


@register
class HogTrajectoryPositionTarget(FrameHogMixin, TargetSpec):
    """`hog+traj_pos` ("HOG + Traj. w/o shape"): the tube's middle-frame HOG (never interpolated; MaskFeat's
    appearance part) and the trajectory position features (interpolation and density as for `traj`)."""

    name = "hog+traj_pos"
    needs_flow = True

    def parts(self, cfg) -> dict[str, int]:
        geo = TargetGeometry.from_cfg(cfg)
        return {"hog": self.hog_width(geo, dense=False), "pos": trajectories_kept(geo) * geo.length * 2}

    def flow_pairs(self, geo: TargetGeometry) -> int:
        return trajectory_pairs(geo)

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        hog = self.hog_part(inputs, geo, dense=False)
        return [hog, *trajectory_parts(track_tokens(inputs, geo, with_shape=False), geo, ("pos",))]

