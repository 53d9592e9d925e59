"""`traj_official` computes the target as the released official code does; each documented difference from
`traj` (docs/official_target.md) is pinned by one assertion."""

from __future__ import annotations

import math

import pytest
import torch

from mme.config import load_config
from mme.motion.tracking import patch_grid_points
from mme.targets import TargetGeometry, TargetInputs, get_target
from mme.targets.official import IMAGENET_STD, official_grid, official_hog, official_position, track_integer

SIZE = 64


def config(*overrides: str):
    return load_config("smoke", ["target.kind=traj_official", *overrides])


def inputs_for(cfg, flow_xy=(1.6, -0.7), seed=0) -> TargetInputs:
    """Every frame of the window (random texture) and a constant flow field."""
    window = max(get_target(cfg).window(TargetGeometry.from_cfg(cfg)), get_target("traj").window(
        TargetGeometry.from_cfg(cfg)))
    frames = torch.rand(window, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed)) * 255
    flow = torch.zeros(window - 1, SIZE, SIZE, 2)
    flow[..., 0], flow[..., 1] = flow_xy
    return TargetInputs(frames, torch.arange(window), flow)


def pos_columns(cfg, target: torch.Tensor, kind: str) -> torch.Tensor:
    parts = get_target(kind).parts(cfg)
    names = list(parts)
    first = sum(parts[n] for n in names[:names.index("pos")])
    return target[:, first:first + parts["pos"]]


def test_translation_makes_the_position_part_zero_where_traj_is_not():
    cfg = config()
    inputs = inputs_for(cfg)
    official, official_valid = get_target(cfg).build(inputs, cfg)
    traj, traj_valid = get_target("traj").build(inputs, cfg)
    assert official_valid.all()
    assert (pos_columns(cfg, official, "traj_official") == 0).all()
    # traj standardises over all K*L*2 values of the token: (1.6, -0.7) become +-1 on every valid column.
    valid = pos_columns(cfg, traj_valid, "traj")
    assert valid.float().mean() > 0.8
    torch.testing.assert_close(pos_columns(cfg, traj, "traj")[valid].abs(), torch.ones(int(valid.sum())))


def test_displacements_are_the_truncated_integer_flow():
    flow = torch.randn(5, 20, 20, 2) * 6
    points = torch.tensor([[4, 4], [12, 12], [9, 3]])
    start = torch.tensor([0, 1, 0])
    tracks, displacement, _ = track_integer(flow, points, start, 3)
    assert torch.equal(displacement, displacement.round())  # integers
    x, y = tracks[:, 0, 0], tracks[:, 0, 1]
    torch.testing.assert_close(displacement[:, 0], flow[start, y, x].trunc().clamp(-20, 20))
    # Truncation towards zero, not rounding or flooring: -1.6 -> -1, 1.6 -> 1, 0.7 -> 0.
    signs = torch.zeros(1, 4, 4, 2)
    signs[0, :, :2] = torch.tensor([-1.6, 0.7])  # left half
    signs[0, :, 2:] = torch.tensor([1.6, -0.7])  # right half
    _, moved, _ = track_integer(signs, torch.tensor([[0, 0], [3, 0]]), torch.zeros(2), 1)
    assert moved[:, 0].tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    # Displacements are clamped to +-20 px.
    _, big, _ = track_integer(torch.full((1, 40, 40, 2), 33.0), torch.tensor([[4, 4]]), torch.zeros(1), 1)
    assert big.tolist() == [[[20.0, 20.0]]]


def test_grid_offsets_are_4_and_12():
    assert official_grid(1, 1, 16, 4).tolist() == [[4, 4], [12, 4], [4, 12], [12, 12]]
    assert patch_grid_points(1, 1, 16, 4).tolist() == [[3.5, 3.5], [11.5, 3.5], [3.5, 11.5], [11.5, 11.5]]


def test_patch_norm_per_coordinate_and_step_across_the_k_points():
    displacement = torch.randn(3, 4, 5, 2) * 4  # (tokens, K, L, 2)
    out = official_position(displacement, patch_norm=True).view(3, 2, 5, 4)
    x = displacement.permute(0, 3, 2, 1) / 20
    expected = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)  # unbiased, eps on the std
    torch.testing.assert_close(out, expected)
    # Each (coordinate, step) group is standardised on its own: changing step 2 leaves the others alone.
    changed = displacement.clone()
    changed[:, :, 2] *= 7
    again = official_position(changed, patch_norm=True).view(3, 2, 5, 4)
    torch.testing.assert_close(again[:, :, [0, 1, 3, 4]], out[:, :, [0, 1, 3, 4]])
    # Without patch norm the values are the displacements / 20.
    torch.testing.assert_close(official_position(displacement, patch_norm=False).view(3, 2, 5, 4), x)


def test_hog_is_the_static_middle_frame_of_each_tube():
    cfg = config()
    geo = TargetGeometry.from_cfg(cfg)
    inputs = inputs_for(cfg)
    hog, _ = get_target(cfg).build(inputs, cfg)
    middle = [(2 * j + 1) * geo.stride for j in range(geo.slots)]  # input frame 2j+1 of every tube
    others = inputs.frames.clone()
    keep = torch.ones(len(others), dtype=torch.bool)
    keep[middle] = False
    others[keep] = 255 - others[keep]
    same, _ = get_target(cfg).build(TargetInputs(others, inputs.offsets, inputs.flow), cfg)
    assert torch.equal(same[:, :108], hog[:, :108])
    moved = inputs.frames.clone()
    moved[middle[1]] = moved[middle[1]].flip(1)
    changed, _ = get_target(cfg).build(TargetInputs(moved, inputs.offsets, inputs.flow), cfg)
    tokens = (SIZE // 16) ** 2
    assert not torch.equal(changed[tokens:2 * tokens, :108], hog[tokens:2 * tokens, :108])
    assert torch.equal(changed[:tokens, :108], hog[:tokens, :108])


def test_hog_bins_centred_on_multiples_of_20_degrees():
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = (xs + ys).unsqueeze(-1).expand(32, 32, 3).unsqueeze(0) * 2.0  # 45 degrees, 2 grey levels per px
    cells = official_hog(ramp)[0, :, :, 1, 1]  # an interior cell, (3, 9)
    magnitude = 8 * math.sqrt(2) * 2.0 / 255 / torch.tensor(IMAGENET_STD)  # Sobel: 8 x the per-px slope
    # 45 degrees lies between the centres 40 (bin 2) and 60 (bin 3): 3/4 and 1/4 of the vote.
    torch.testing.assert_close(cells[:, 2], 0.75 * magnitude)
    torch.testing.assert_close(cells[:, 3], 0.25 * magnitude)
    assert (cells[:, [0, 1, 4, 5, 6, 7, 8]] == 0).all()


@pytest.mark.parametrize(("flow_x", "left_token_valid"), [(-3.0, True), (-5.0, True), (-13.0, False)])
def test_validity_per_token_and_last_position_unchecked(flow_x, left_token_valid):
    cfg = config("target.length=2")
    inputs = inputs_for(cfg, (flow_x, 0.0))
    _, official_valid = get_target(cfg).build(inputs, cfg)
    _, traj_valid = get_target("traj").build(inputs, cfg)
    pos = pos_columns(cfg, official_valid, "traj_official")
    left = torch.arange(len(pos)) % (SIZE // 16) == 0
    # One flag per token: all its position columns together.
    assert (pos.all(1) == pos.any(1)).all()
    assert pos[left].all().item() is left_token_valid and pos[~left].all()
    # -3: the points at x=4 reach x=-2 only on the last position, never checked (traj: out at -2.5).
    # -5: x=4 leaves at p_1 but x=12 stays, and one valid point keeps the token valid (traj masks it).
    assert not pos_columns(cfg, traj_valid, "traj")[left].all()
