"""The target registry (mme.targets): widths, MME trajectories, density, interpolation, patch norm, baselines."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mme.config import load_config
from mme.motion.descriptors import hog_at_points, hog_cells, mbh_cells, to_gray
from mme.targets import TARGETS, TargetGeometry, TargetInputs, get_target, target_parts, track_tokens
from mme.targets.trajectory import DENSITY

SIZE = 32  # 2x2 patches of 16 px


def config(kind="traj", frames=4, stride=2, length=2, points=4, density="dense", interpolate=True,
           patch_norm=False, **extra):
    overrides = [f"target.kind={kind}", f"data.num_frames={frames}", f"data.stride={stride}",
                 f"target.length={length}", f"target.points_per_patch={points}", f"target.density={density}",
                 f"target.interpolate={str(interpolate).lower()}", f"target.patch_norm={str(patch_norm).lower()}",
                 f"data.input_size={SIZE}", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config("smoke", overrides)


def textured_frame(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32), (0, 0), 1.0)
    return noise


def make_inputs(cfg, flow_fn=None, num_pairs=None) -> TargetInputs:
    """Frames textured differently per offset; flow from `flow_fn(offset) -> (H, W, 2)` (default: none)."""
    spec, geo = get_target(cfg), TargetGeometry.from_cfg(cfg)
    offsets = sorted(set(geo.input_offsets) | spec.frame_offsets(geo) | {0})
    frames = torch.tensor(np.stack([textured_frame(o) for o in offsets]))
    flow = None
    pairs = spec.flow_pairs(geo) if num_pairs is None else num_pairs
    if spec.needs_flow or flow_fn is not None:
        fn = flow_fn or (lambda _: field(0.0, 0.0))
        flow = torch.stack([fn(o) for o in range(pairs)]) if pairs else torch.zeros(0, SIZE, SIZE, 2)
    return TargetInputs(frames, torch.tensor(offsets), flow)


Y, X = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")


def field(dx, dy) -> torch.Tensor:
    """A flow field (SIZE, SIZE, 2) from numbers or tensors over the pixel grid X, Y."""
    return torch.stack([dx + 0 * X, dy + 0 * X], -1)


def smooth_flow(offset: int) -> torch.Tensor:
    return field(0.6 * torch.sin(X / 7 + offset) + 0.2, 0.4 * torch.cos(Y / 5 - offset))


SETTINGS = [
    dict(points=4, length=6, density="dense", interpolate=True, stride=3),
    dict(points=1, length=4, density="max", interpolate=False, stride=2),
    dict(points=9, length=3, density="mean", interpolate=True, stride=1),
    dict(points=4, length=2, density="dense", interpolate=False, stride=4),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_every_kind_builds_its_declared_width(kind, setting):
    cfg = config(kind, patch_norm=True, **setting)
    parts = target_parts(cfg)
    assert parts == get_target(kind).parts(cfg) and all(w > 0 for w in parts.values())
    target, valid = get_target(cfg).build(make_inputs(cfg, smooth_flow), cfg)
    geo = TargetGeometry.from_cfg(cfg)
    assert target.shape == valid.shape == (geo.num_tokens, sum(parts.values()))
    assert target.dtype == torch.float32 and valid.dtype == torch.bool
    assert torch.isfinite(target).all() and (target[~valid] == 0).all()


def test_paper_widths():
    cfg = load_config("paper")
    assert target_parts(cfg) == {"pos": 48, "shape": 216}  # K*L*(2+9) = 264 for K=4, L=6
    assert target_parts(load_config("paper", ["target.kind=pixel"])) == {"pixel": 1536}
    assert target_parts(load_config("paper", ["target.kind=hog", "target.interpolate=false"])) == {"hog": 36}
    assert target_parts(load_config("paper", ["target.density=max"])) == {"pos": 12, "shape": 54}


def per_trajectory(target, cfg):
    """Split a dense traj target into pos (N, K, L, 2) and shape (N, K, L, 9)."""
    geo = TargetGeometry.from_cfg(cfg)
    k, length = geo.points, geo.length
    pos, shape = target.split([k * length * 2, k * length * 9], dim=1)
    return pos.view(-1, k, length, 2), shape.view(-1, k, length, 9)


def test_traj_is_displacements_then_trajectory_aligned_hog():
    cfg = config(length=3)
    inputs = make_inputs(cfg, lambda o: field(0.5 + 0.1 * o, -0.25))
    target, valid = get_target(cfg).build(inputs, cfg)
    assert valid.all()
    pos, shape = per_trajectory(target, cfg)
    geo = TargetGeometry.from_cfg(cfg)
    for token in range(geo.num_tokens):
        start = geo.slot_offsets[token // 4]
        assert torch.allclose(pos[token, :, :, 0], 0.5 + 0.1 * (start + torch.arange(3.0)).expand(4, 3), atol=1e-5)
        assert torch.allclose(pos[token, :, :, 1], torch.tensor(-0.25), atol=1e-6)
    # shape feature t of trajectory k = HOG of the window around p_t on frame f_j + t
    tracks = track_tokens(inputs, geo).tracks  # (J, Hp, Wp, K, L+1, 2)
    slot, row, col, k, t = 1, 0, 1, 2, 2
    frame = inputs.rows(torch.tensor([geo.slot_offsets[slot] + t]))
    want = hog_at_points(inputs.gray, frame, tracks[slot, row, col, k, t].view(1, 2))[0]
    token = (slot * 2 + row) * 2 + col
    assert torch.allclose(shape[token, k, t], want, atol=1e-6)


def test_interpolation_off_walks_the_sparse_frames():
    """flow[f] moves everything by 0.1*(f+1) in x. Dense steps read pairs f_j, f_j+1; sparse steps of s=2 read
    (f_j, f_j+1) then (f_j+2, f_j+3); the HOG of step t sits on frame f_j + t (dense) or f_j + 2t (sparse)."""
    flow_fn = lambda o: field(0.1 * (o + 1), 0.0)  # noqa: E731
    results = {}
    for interpolate in (True, False):
        cfg = config(interpolate=interpolate, stride=2, length=2)
        inputs = make_inputs(cfg, flow_fn)
        target, valid = get_target(cfg).build(inputs, cfg)
        assert valid.all()
        results[interpolate] = (cfg, inputs, *per_trajectory(target, cfg))
    for token, start in ((0, 0), (4, 4)):  # slot 0 starts at offset 0, slot 1 at 2*2 = 4
        dense = results[True][2][token, 0, :, 0]
        sparse = results[False][2][token, 0, :, 0]
        assert dense.tolist() == pytest.approx([0.1 * (start + 1), 0.1 * (start + 2)])
        assert sparse.tolist() == pytest.approx([0.1 * ((start + 1) + (start + 2)), 0.1 * ((start + 3) + (start + 4))])
    cfg, inputs, _, shape = results[False]
    tracks = track_tokens(inputs, TargetGeometry.from_cfg(cfg)).tracks
    want = hog_at_points(inputs.gray, inputs.rows(torch.tensor([4 + 2])), tracks[1, 0, 0, 0, 1].view(1, 2))[0]
    assert torch.allclose(shape[4, 0, 1], want, atol=1e-6)
    assert not torch.allclose(results[True][3][4, 0, 1], shape[4, 0, 1])  # another frame, another HOG


def test_max_keeps_the_most_moving_trajectory_and_mean_averages():
    """dx = 0.02x + 0.01y: the bottom-right grid point (k=3) of every patch moves most."""
    flow_fn = lambda _: field(0.02 * X + 0.01 * Y, 0.01 * X)  # noqa: E731
    built = {}
    for density in ("dense", "max", "mean"):
        cfg = config(density=density, length=3)
        target, valid = get_target(cfg).build(make_inputs(cfg, flow_fn), cfg)
        assert valid.all()
        built[density] = target
    cfg = config(length=3)
    pos, shape = per_trajectory(built["dense"], cfg)
    path = pos.norm(dim=-1).sum(-1)
    assert (path.argmax(1) == 3).all()
    assert torch.allclose(built["max"], torch.cat([pos[:, 3].flatten(1), shape[:, 3].flatten(1)], 1))
    assert torch.allclose(built["mean"], torch.cat([pos.mean(1).flatten(1), shape.mean(1).flatten(1)], 1),
                          atol=1e-6)


def test_density_reductions_ignore_invalid_trajectories():
    pos = torch.tensor([[[[1.0, 0]], [[5.0, 0]], [[2.0, 0]]], [[[1.0, 0]], [[1.0, 0]], [[1.0, 0]]]])  # (2, K=3, L=1, 2)
    valid = torch.tensor([[True, False, True], [False, False, False]])
    (kept,), kept_valid = DENSITY["max"].reduce([pos], valid)
    assert kept[0, 0, 0].tolist() == [2.0, 0.0] and kept_valid.tolist() == [[True], [False]]  # 5 is invalid
    (mean,), _ = DENSITY["mean"].reduce([pos], valid)
    assert mean[0, 0, 0].tolist() == [1.5, 0.0]


def test_trajectories_leaving_the_frame_are_invalid_columns():
    """dx = 2.5 for L=4 steps: the grid points at x = 27.5 leave the 32 px frame; x = 19.5 ends at 29.5."""
    cfg = config(length=4, patch_norm=True)
    inputs = make_inputs(cfg, lambda o: field(2.5 + 0.1 * torch.sin(Y + o), 0.0))
    target, valid = get_target(cfg).build(inputs, cfg)
    pos_valid, shape_valid = per_trajectory(valid, cfg)
    right = torch.tensor([1, 3, 5, 7])  # tokens in the right patch column
    left = torch.tensor([0, 2, 4, 6])
    assert pos_valid[left].all() and shape_valid[left].all()
    assert (~pos_valid[right][:, [1, 3]]).all() and (~shape_valid[right][:, [1, 3]]).all()
    assert pos_valid[right][:, [0, 2]].all()
    pos, _ = per_trajectory(target, cfg)
    assert (pos[right][:, [1, 3]] == 0).all()

    everything_out = make_inputs(cfg, lambda _: field(9.0, 0.0))
    target, valid = get_target(cfg).build(everything_out, cfg)
    assert not valid[right].any() and (target[right] == 0).all()


def assert_standardised(values, valid):
    for row, ok in zip(values, valid):
        x = row[ok].double()
        if len(x) > 1:
            assert abs(x.mean().item()) < 1e-4
            assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_patch_norm_gives_zero_mean_unit_std_per_part_per_token_over_valid_values():
    cfg = config(length=4, patch_norm=True)
    inputs = make_inputs(cfg, lambda o: field(2.5 + 0.3 * torch.sin(Y / 3 + o), 0.2 * X / 8))
    target, valid = get_target(cfg).build(inputs, cfg)
    assert not valid.all()  # some trajectories left the frame: statistics must skip them
    width = 4 * 4 * 2
    for part in (slice(0, width), slice(width, None)):
        assert_standardised(target[:, part], valid[:, part])


def test_pixel_target_is_the_tube_in_token_order_and_patch_normalised_per_channel():
    cfg = config("pixel")
    inputs = make_inputs(cfg)
    raw, _ = get_target(cfg).build(inputs, cfg)
    clip = inputs.frames[inputs.rows(TargetGeometry.from_cfg(cfg).input_offsets)] / 255
    token = (1 * 2 + 1) * 2 + 0  # slot 1, patch row 1, column 0
    want = clip[2:4, 16:32, 0:16].reshape(-1)
    assert torch.allclose(raw[token], want)
    cfg_norm = config("pixel", patch_norm=True)
    normed, valid = get_target(cfg_norm).build(inputs, cfg_norm)
    for channel in range(3):
        assert_standardised(normed[:, channel::3], valid[:, channel::3])


def test_motionmae_adds_the_difference_with_the_next_frame():
    cfg = config("motionmae")
    inputs = make_inputs(cfg)
    target, _ = get_target(cfg).build(inputs, cfg)
    pixel, diff = target.split(1536, dim=1)
    stride = cfg.data.stride
    first = inputs.frames[inputs.rows([0])][0, :16, :16] / 255
    nxt = inputs.frames[inputs.rows([1])][0, :16, :16] / 255
    assert torch.allclose(pixel[0, :768], first.reshape(-1))
    assert torch.allclose(diff[0, :768], (nxt - first).reshape(-1), atol=1e-6)
    later = inputs.frames[inputs.rows([stride, stride + 1])][:, :16, :16] / 255
    assert torch.allclose(diff[0, 768:], (later[1] - later[0]).reshape(-1), atol=1e-6)


@pytest.mark.parametrize("interpolate", [False, True])
def test_hog_and_mbh_read_the_middle_frame_or_every_frame_of_the_slot(interpolate):
    cfg = config("hog+mbh", interpolate=interpolate, stride=2)
    inputs = make_inputs(cfg, smooth_flow)
    target, valid = get_target(cfg).build(inputs, cfg)
    assert valid.all()
    geo = TargetGeometry.from_cfg(cfg)
    frames = [geo.slot_offsets[1] + r for r in range(4)] if interpolate else [geo.slot_offsets[1] + 2]
    hog_width = 36 * len(frames)
    token = (1 * 2 + 0) * 2 + 1  # slot 1, patch row 0, column 1: cells (0..1, 2..3)
    hog = hog_cells(to_gray(inputs.frames[inputs.rows(frames)]))[:, 0:2, 2:4]
    mbh = mbh_cells(inputs.flow[frames])[:, 0:2, 2:4]
    assert torch.allclose(target[token, :hog_width], hog.reshape(-1), atol=1e-6)
    assert torch.allclose(target[token, hog_width:], mbh.reshape(-1), atol=1e-6)


def test_flow_descriptors_past_the_end_of_the_video_are_invalid():
    cfg = config("hog+flow", interpolate=True, stride=2)
    inputs = make_inputs(cfg, smooth_flow, num_pairs=6)  # needs 8: slot 1's frames 6, 7 have no flow
    target, valid = get_target(cfg).build(inputs, cfg)
    hog_width = 36 * 4
    flow_part = valid[:, hog_width:].view(2, 4, 4, 4, 4, 2)  # (slot, token, frame, cell y, cell x, xy)
    assert flow_part[0].all() and flow_part[1, :, :2].all() and not flow_part[1, :, 2:].any()
    assert valid[:, :hog_width].all()


def test_missing_frames_are_reported():
    cfg = config()
    inputs = make_inputs(cfg, smooth_flow)
    with pytest.raises(ValueError, match="not decoded"):
        inputs.rows([999])
    with pytest.raises(ValueError, match="needs flow"):
        get_target(cfg).build(TargetInputs(inputs.frames, inputs.offsets, None), cfg)
