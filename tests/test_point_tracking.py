"""Point tracking (mme.motion.tracking): known motion gives known trajectories.

(tests/test_tracking.py holds the MLflow tracking tests; this file is the point tracker's.)
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from mme.data.transforms import CropParams, crop_flow, crop_points
from mme.motion.tracking import median_filter_flow, patch_grid_points, resize_flow, sample_flow, track_points


def affine_flow(num_pairs: int, height: int, width: int, matrix, shift=(0.0, 0.0)) -> torch.Tensor:
    """flow(p) = A p' + b - p' with p' = p - centre: the flow of the map p' -> A p' + b, same for every frame."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    cx, cy = (width - 1) / 2, (height - 1) / 2
    px, py = xs - cx, ys - cy
    a = torch.tensor(matrix, dtype=torch.float64)
    dx = a[0, 0] * px + a[0, 1] * py + shift[0] - px
    dy = a[1, 0] * px + a[1, 1] * py + shift[1] - py
    return torch.stack([dx, dy], -1).float().expand(num_pairs, height, width, 2).contiguous()


def interior_points(height: int, width: int, margin: int, count: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    xs = rng.uniform(margin, width - 1 - margin, count)
    ys = rng.uniform(margin, height - 1 - margin, count)
    return torch.tensor(np.stack([xs, ys], 1), dtype=torch.float32)


def textured_image(height: int, width: int, seed: int = 0, blur: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (height, width)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), blur)


def test_patch_grid_points_sit_at_sub_cell_centres():
    points = patch_grid_points(2, 3, 16, 4).view(2, 3, 4, 2)
    assert points[0, 0].tolist() == [[3.5, 3.5], [11.5, 3.5], [3.5, 11.5], [11.5, 11.5]]
    assert points[1, 2, 0].tolist() == [32 + 3.5, 16 + 3.5]  # (x, y) of patch row 1, column 2
    assert patch_grid_points(1, 1, 16, 1).tolist() == [[7.5, 7.5]]
    nine = patch_grid_points(1, 1, 15, 9)
    assert sorted(set(nine[:, 0].tolist())) == pytest.approx([2.0, 7.0, 12.0])
    with pytest.raises(ValueError):
        patch_grid_points(1, 1, 16, 3)


def test_bilinear_sampling_is_exact_on_a_linear_field():
    flow = affine_flow(2, 20, 30, [[1.1, 0.2], [-0.1, 0.95]], shift=(0.3, -0.7))
    points = interior_points(20, 30, 0, 200)
    frame = torch.randint(0, 2, (200,))
    got = sample_flow(flow, frame, points)
    cx, cy = 14.5, 9.5
    px, py = points[:, 0] - cx, points[:, 1] - cy
    want = torch.stack([1.1 * px + 0.2 * py + 0.3 - px, -0.1 * px + 0.95 * py - 0.7 - py], 1)
    assert torch.allclose(got, want, atol=1e-4)


def test_constant_subpixel_translation_is_tracked_exactly():
    flow = torch.zeros(6, 40, 50, 2)
    flow[..., 0], flow[..., 1] = 0.37, -0.21
    points = interior_points(40, 50, 5, 50)
    tracks, valid = track_points(flow, points, torch.zeros(50, dtype=torch.long), steps=6)
    assert valid.all()
    expected = points[:, None] + torch.arange(7)[None, :, None] * torch.tensor([0.37, -0.21])
    assert torch.allclose(tracks, expected, atol=1e-5)


def test_translation_from_warped_frames_and_computed_flow_within_0p1_px_per_step():
    """Frames warped with cv2.warpAffine by a sub-pixel shift; flow from the project's extractor.

    Farneback (the paper's backend): mean error 0.04 px, max 0.09 px per step here; DIS medium gives
    0.06 / 0.13 px on the same frames -- the residual is the flow estimate's, the tracker adds none.
    """
    from mme.motion.flow import compute_flow

    shift = np.array([0.6, -0.35])
    base = textured_image(96, 96, seed=3, blur=1.0)
    base = (base - base.min()) / (base.max() - base.min()) * 255
    frames = []
    for k in range(5):
        matrix = np.float32([[1, 0, shift[0] * k], [0, 1, shift[1] * k]])
        warped = cv2.warpAffine(base, matrix, (96, 96), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        frames.append(np.repeat(np.clip(warped, 0, 255).round().astype(np.uint8)[..., None], 3, -1))
    flow = torch.from_numpy(compute_flow(np.stack(frames), backend="farneback"))
    points = patch_grid_points(6, 6, 16, 4)
    interior = ((points >= 24) & (points <= 72)).all(1)
    tracks, valid = track_points(flow, points[interior], torch.zeros(int(interior.sum()), dtype=torch.long), 4)
    assert valid.all()
    steps = tracks[:, 1:] - tracks[:, :-1]
    error = (steps - torch.tensor(shift, dtype=torch.float32)).abs()
    assert error.mean() < 0.05
    assert error.max() < 0.1


@pytest.mark.parametrize("kind", ["rotation", "zoom"])
def test_rotation_and_zoom_fields_are_followed_over_l_steps(kind):
    """Analytic rotation (2 deg/frame) / zoom (3 %/frame) about the centre: after L=6 steps the points sit
    where the composed map puts them (bilinear sampling of a linear field is exact: within 1e-3 px)."""
    angle, zoom = math.radians(2.0), 1.03
    matrix = ([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]] if kind == "rotation"
              else [[zoom, 0.0], [0.0, zoom]])
    height = width = 64
    flow = affine_flow(6, height, width, matrix)
    points = interior_points(height, width, 20, 100)
    tracks, valid = track_points(flow, points, torch.zeros(100, dtype=torch.long), steps=6)
    assert valid.all()
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2])
    a = torch.tensor(matrix, dtype=torch.float32)
    expected = points - centre
    for t in range(1, 7):
        expected = expected @ a.T
        assert torch.allclose(tracks[:, t], expected + centre, atol=1e-3), f"step {t}"


def test_points_leaving_the_frame_are_clamped_and_invalid():
    flow = torch.zeros(4, 20, 32, 2)
    flow[..., 0] = 3.0
    points = torch.tensor([[2.0, 5.0], [20.0, 5.0], [29.5, 10.0]])
    tracks, valid = track_points(flow, points, torch.zeros(3, dtype=torch.long), steps=4)
    assert valid.tolist() == [True, False, False]  # 2 + 12 = 14 stays; 20 + 12 = 32 > 31 leaves
    assert tracks[1, -1, 0] == 31 and tracks[2, 1, 0] == 31
    assert (tracks[..., 0] <= 31).all() and (tracks >= 0).all()


def test_steps_past_the_end_of_the_flow_are_invalid():
    flow = torch.zeros(5, 16, 16, 2)
    flow[..., 0] = 0.5
    points = torch.tensor([[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]])
    start = torch.tensor([0, 2, 3])
    tracks, valid = track_points(flow, points, start, steps=3)
    assert valid.tolist() == [True, True, False]  # start 3 needs pairs 3, 4, 5; only 0..4 exist
    assert tracks[2, -1, 0] == pytest.approx(5.0)  # moved by pairs 3, 4 then stopped
    _, none = track_points(torch.zeros(0, 16, 16, 2), points, start, steps=2)
    assert not none.any()


def test_step_chains_the_flows_of_the_sparse_frames():
    """flow[f] moves every pixel by f+1 in x: dense steps add 1, 2, 3, ...; steps of s=3 add 1+2+3, 4+5+6."""
    flow = torch.zeros(12, 8, 200, 2)
    flow[..., 0] = (torch.arange(12, dtype=torch.float32) + 1).view(12, 1, 1)
    points = torch.tensor([[10.0, 4.0], [10.0, 4.0]])
    start = torch.tensor([0, 2])
    dense, _ = track_points(flow, points, start, steps=2)
    sparse, valid = track_points(flow, points, start, steps=2, step=3)
    assert valid.all()
    assert dense[0, :, 0].tolist() == [10, 11, 13]
    assert sparse[0, :, 0].tolist() == [10, 16, 31]
    assert sparse[1, :, 0].tolist() == [10, 22, 43]  # from frame 2: 3+4+5, then 6+7+8


def test_step_composes_along_the_path_of_a_varying_field():
    """x-zoom flow dx = 0.1 (x - c): a step of 3 frames multiplies (x - c) by 1.1**3 (composition, not 3 x 0.1)."""
    flow = affine_flow(6, 8, 120, [[1.1, 0.0], [0.0, 1.0]])
    points = torch.tensor([[70.0, 3.5]])
    tracks, valid = track_points(flow, points, torch.zeros(1, dtype=torch.long), steps=2, step=3)
    centre = (120 - 1) / 2
    assert valid.all()
    assert tracks[0, 1, 0].item() == pytest.approx(centre + (70 - centre) * 1.1 ** 3, abs=1e-3)
    assert tracks[0, 2, 0].item() == pytest.approx(centre + (70 - centre) * 1.1 ** 6, abs=1e-3)


def smooth_flow(num_pairs: int, height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    frames = []
    for f in range(num_pairs):
        dx = 1.2 * torch.sin(xs / 17.0 + 0.3 * f) + 0.4 * torch.cos(ys / 23.0)
        dy = 0.8 * torch.cos(ys / 19.0 - 0.2 * f) - 0.3 * torch.sin(xs / 29.0)
        frames.append(torch.stack([dx, dy], -1))
    return torch.stack(frames)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_flip_of_the_flow_commutes_with_tracking(flip):
    """Tracking the augmented flow from augmented points == augmenting the original tracks (within 0.03 px
    over 4 steps on a smooth field; the residual is bilinear resampling of a non-linear field)."""
    flow = smooth_flow(4, 72, 90)
    crop = CropParams(top=6, left=11, height=56, width=64, out_size=48, flip=flip)
    points = interior_points(72, 90, 0, 60, seed=5)
    inside = ((points[:, 0] > 11 + 12) & (points[:, 0] < 11 + 64 - 12)
              & (points[:, 1] > 6 + 12) & (points[:, 1] < 6 + 56 - 12))
    points = points[inside]
    start = torch.zeros(len(points), dtype=torch.long)
    tracks, valid = track_points(flow, points, start, steps=4)
    aug_tracks, aug_valid = track_points(crop_flow(flow, crop), crop_points(points, crop), start, steps=4)
    assert valid.all() and aug_valid.all()
    assert (crop_points(tracks, crop) - aug_tracks).abs().max() < 0.03


def test_median_filter_matches_scipy_and_removes_an_outlier():
    from scipy.ndimage import median_filter

    rng = np.random.default_rng(0)
    flow = torch.from_numpy(rng.normal(size=(2, 11, 13, 2)).astype(np.float32))
    want = median_filter(flow.numpy(), size=(1, 3, 3, 1), mode="nearest")
    assert np.allclose(median_filter_flow(flow).numpy(), want)

    spiky = torch.zeros(1, 10, 10, 2)
    spiky[..., 0] = 0.5
    spiky[0, 5, 5] = torch.tensor([9.0, -9.0])
    point = torch.tensor([[5.0, 5.0]])
    raw, _ = track_points(spiky, point, torch.zeros(1, dtype=torch.long), 1)
    filtered, _ = track_points(spiky, point, torch.zeros(1, dtype=torch.long), 1, median=True)
    assert raw[0, 1].tolist() == [9.0, 0.0]  # the spike throws it out of the frame (clamped)
    assert filtered[0, 1].tolist() == [5.5, 5.0]


def test_resize_flow_scales_vectors_per_axis():
    flow = torch.zeros(2, 20, 40, 2)
    flow[..., 0], flow[..., 1] = 2.0, -1.0
    out = resize_flow(flow, 10, 10)
    assert out.shape == (2, 10, 10, 2)
    assert torch.allclose(out[..., 0], torch.tensor(0.5)) and torch.allclose(out[..., 1], torch.tensor(-0.5))
    assert resize_flow(flow, 20, 40) is flow
