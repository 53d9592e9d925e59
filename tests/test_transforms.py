"""One geometry for frames, flow and points: scaling, consistency, flips, crops, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mme.config import load_config
from mme.data.transforms import (
    CropParams,
    center_crop,
    crop_flow,
    crop_frames,
    crop_points,
    flip_allowed,
    normalize,
    sample_crop,
    spatial_crops,
)


def _sample(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear value of field (H, W, C) at points (P, 2) in pixel-centre coordinates."""
    h, w = field.shape[:2]
    grid = torch.stack([(points[:, 0] + 0.5) / w * 2 - 1, (points[:, 1] + 0.5) / h * 2 - 1], 1)
    out = F.grid_sample(field.permute(2, 0, 1)[None], grid[None, None], align_corners=False)
    return out[0, :, 0].T


def _affine_flow(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([0.8 + 0.02 * xx - 0.01 * yy, -0.5 + 0.015 * yy + 0.01 * xx], -1)[None]


@pytest.mark.parametrize("flip", [False, True])
def test_crop_flow_scales_a_constant_field(flip):
    flow = np.tile(np.float32([2.0, -1.0]), (1, 60, 80, 1))
    p = CropParams(top=10, left=20, height=40, width=50, out_size=32, flip=flip)
    out = crop_flow(flow, p)
    assert out.shape == (1, 32, 32, 2)
    expected_dx = 2.0 * 32 / 50 * (-1 if flip else 1)
    torch.testing.assert_close(out[..., 0], torch.full((1, 32, 32), expected_dx))
    torch.testing.assert_close(out[..., 1], torch.full((1, 32, 32), -1.0 * 32 / 40))


@pytest.mark.parametrize("flip", [False, True])
def test_moved_point_equals_point_plus_cropped_flow(flip):
    """crop_points(p + flow(p)) == crop_points(p) + crop_flow(flow)(crop_points(p)) for interior points."""
    flow = _affine_flow(60, 80)
    p = CropParams(top=8, left=12, height=44, width=56, out_size=40, flip=flip)
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(20, 60, 50), rng.uniform(18, 44, 50)], 1)
    moved = points + _sample(torch.from_numpy(flow[0]), torch.from_numpy(points).float()).numpy()
    mapped = torch.from_numpy(crop_points(points, p)).float()
    predicted = mapped + _sample(crop_flow(flow, p)[0], mapped)
    torch.testing.assert_close(predicted, torch.from_numpy(crop_points(moved, p)).float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_points_agrees_with_crop_frames(flip):
    """An image whose pixel values are their own x coordinate maps pixel x' back to x (interior)."""
    yy, xx = np.mgrid[0:60, 0:80].astype(np.float32)
    image = np.stack([xx, yy, np.zeros_like(xx)], -1)[None]
    p = CropParams(top=5, left=9, height=30, width=40, out_size=48, flip=flip)
    out = crop_frames(image, p)[0]
    source = out[4:-4, 4:-4, :2].reshape(-1, 2)
    oy, ox = np.mgrid[4:44, 4:44].astype(np.float32)
    target = torch.from_numpy(np.stack([ox, oy], -1).reshape(-1, 2))
    torch.testing.assert_close(crop_points(source, p), target, atol=1e-3, rtol=0)


def test_flip_twice_is_identity_and_unscaled_crop_is_a_slice():
    frames = np.random.default_rng(0).integers(0, 255, (3, 40, 50, 3), dtype=np.uint8)
    p = CropParams(4, 6, 32, 32, 32, flip=True)
    once = crop_frames(frames, p)
    torch.testing.assert_close(once.flip(2), torch.from_numpy(frames[:, 4:36, 6:38]).float())
    point = np.array([[7.25, 3.5]])
    back = crop_points(crop_points(point, p), CropParams(0, 0, 32, 32, 32, flip=True))
    np.testing.assert_allclose(back, crop_points(point, CropParams(4, 6, 32, 32, 32)))


def test_sample_crop_respects_scale_ratio_and_is_seeded():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = sample_crop(100, 140, 64, scale=(0.3, 1.0), flip_prob=0.5, rng=rng)
        assert 0 <= p.top and p.top + p.height <= 100 and 0 <= p.left and p.left + p.width <= 140
        assert 0.28 <= p.height * p.width / 14000 <= 1.0
        assert 3 / 4 - 0.05 <= p.width / p.height <= 4 / 3 + 0.05
    flips = [sample_crop(100, 140, 64, flip_prob=1.0, rng=rng).flip for _ in range(5)]
    assert all(flips) and not any(sample_crop(100, 140, 64, rng=rng).flip for _ in range(5))
    a = sample_crop(100, 140, 64, rng=np.random.default_rng(9))
    assert a == sample_crop(100, 140, 64, rng=np.random.default_rng(9))


def test_spatial_crops_along_long_side():
    crops = spatial_crops(128, 171, 112, 3)
    assert [c.left for c in crops] == [0, 30, 59] and {c.top for c in crops} == {8}
    assert {(c.height, c.width) for c in crops} == {(112, 112)}
    assert [c.top for c in spatial_crops(171, 128, 112, 3)] == [0, 30, 59]
    assert spatial_crops(128, 171, 112, 1) == [center_crop(128, 171, 112)]
    small = center_crop(50, 60, 64)
    assert (small.height, small.width, small.out_size) == (50, 50, 64)


def test_normalize():
    mean_pixel = torch.tensor([0.485, 0.456, 0.406]) * 255
    clip = mean_pixel.expand(4, 8, 8, 3)
    out = normalize(clip)
    assert out.shape == (3, 4, 8, 8)
    torch.testing.assert_close(out, torch.zeros(3, 4, 8, 8), atol=1e-5, rtol=0)
    white = normalize(torch.full((1, 2, 2, 3), 255.0))
    torch.testing.assert_close(white[:, 0, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) /
                               torch.tensor([0.229, 0.224, 0.225]))


def test_flip_allowed():
    assert not flip_allowed(load_config("smoke"))
    assert not flip_allowed(load_config("smoke", ["data.dataset=ssv2"]))
    assert flip_allowed(load_config("smoke", ["data.dataset=ucf101"]))
    explicit = load_config("smoke")  # set directly: `--set data.flip=on` is read by YAML as a boolean
    explicit.data.flip = "on"
    assert flip_allowed(explicit)
    explicit.data.dataset, explicit.data.flip = "k400", "off"
    assert not flip_allowed(explicit)


def _bilinear_reference(x: np.ndarray, p: CropParams) -> np.ndarray:
    """float64 crop + resize from the documented map (pixel centres, align_corners=False, edges replicated)."""
    window = x[:, p.top:p.top + p.height, p.left:p.left + p.width].astype(np.float64)

    def taps(size_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.clip((np.arange(p.out_size) + 0.5) * size_in / p.out_size - 0.5, 0, size_in - 1)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, size_in - 1), source - low

    y0, y1, fy = taps(p.height)
    x0, x1, fx = taps(p.width)
    rows = window[:, y0] * (1 - fy)[:, None, None] + window[:, y1] * fy[:, None, None]
    out = rows[:, :, x0] * (1 - fx)[:, None] + rows[:, :, x1] * fx[:, None]
    return out[:, :, ::-1] if p.flip else out


@pytest.mark.parametrize("crop", [CropParams(7, 3, 45, 51, 64, True), CropParams(0, 5, 60, 70, 32, False),
                                  CropParams(10, 20, 40, 40, 40, True), CropParams(2, 1, 30, 64, 48, False)])
def test_crop_frames_and_flow_equal_the_bilinear_formula(crop):
    """Up- and down-scaling, anisotropic, unscaled, flipped: the documented map to float32 precision."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 60, 80, 3), dtype=np.uint8)
    np.testing.assert_allclose(crop_frames(frames, crop).numpy(), _bilinear_reference(frames, crop), atol=2e-3)
    np.testing.assert_allclose(crop_frames(torch.from_numpy(frames).double(), crop).numpy(),
                               _bilinear_reference(frames, crop), atol=2e-3)
    flow = rng.normal(0, 4, (2, 60, 80, 2)).astype(np.float32)
    scale = np.array([-crop.scale_x if crop.flip else crop.scale_x, crop.scale_y])
    got = crop_flow(torch.from_numpy(flow), crop)
    assert got.dtype == torch.float32 and got.is_contiguous()
    np.testing.assert_allclose(got.numpy(), _bilinear_reference(flow, crop) * scale, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_crop_frames_takes_any_channel_count(channels):
    image = np.random.default_rng(2).uniform(0, 255, (2, 30, 40, channels)).astype(np.float32)
    p = CropParams(3, 4, 20, 25, 16, flip=True)
    out = crop_frames(image, p)
    assert out.shape == (2, 16, 16, channels)
    np.testing.assert_allclose(out.numpy(), _bilinear_reference(image, p), atol=1e-3)
    with pytest.raises(ValueError, match="does not fit"):
        crop_frames(image, CropParams(15, 4, 20, 25, 16))
