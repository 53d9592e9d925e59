"""HOG / HOF / MBH (mme.motion.descriptors) against scikit-image and independent numpy references.

Pinned definition (module docstring of mme.motion.descriptors): [-1, 0, 1] gradients (0 on the border),
unsigned orientation, 9 bins centred at 10, 30, ..., 170 degrees with linear (soft) interpolation, mean vote
per 8x8 cell, L2 per cell with eps 1e-5. With `soft=False` it is scikit-image's hog(orientations=9,
pixels_per_cell=(8, 8), cells_per_block=(1, 1), block_norm='L2') to within 1e-5 (float32 vs float64).
Every test runs on both backends of `mme.motion.backends` (compiled CPU kernels and the torch path).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

import mme.motion.backends as backends
from mme.motion.descriptors import (
    HOF_BINS,
    bin_position,
    hof_cells,
    hog_at_points,
    hog_cells,
    mbh_cells,
    pool_flow,
    to_gray,
)

TOL = 1e-5


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def backend(request, monkeypatch):
    """Run the test with the compiled CPU kernels on, then with the torch path."""
    monkeypatch.setattr(backends, "COMPILED_KERNELS", request.param == "compiled")
    return request.param


def texture(height: int, width: int, seed: int = 0, blur: float = 1.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.uniform(0, 255, (height, width)).astype(np.float32), (0, 0), blur)


def soft_votes(img: np.ndarray, offset_deg: float = 0.0):
    """Independent float64 per-pixel votes: (lower bin, share of the next bin, magnitude)."""
    img = img.astype(np.float64)
    gx = np.zeros_like(img)
    gy = np.zeros_like(img)
    gx[:, 1:-1] = img[:, 2:] - img[:, :-2]
    gy[1:-1, :] = img[2:, :] - img[:-2, :]
    theta = (np.degrees(np.arctan2(gy, gx)) + offset_deg) % 180.0
    u = theta / 20.0 - 0.5
    lower = np.floor(u)
    return lower.astype(int) % 9, u - lower, np.hypot(gx, gy)


def l2(h: np.ndarray) -> np.ndarray:
    return h / np.sqrt((h ** 2).sum(-1, keepdims=True) + 1e-10)


def reference_soft_hog(img: np.ndarray, offset_deg: float = 0.0) -> np.ndarray:
    """Loop over pixels: each adds m*(1-f) to its lower bin and m*f to the next, per 8x8 cell."""
    lower, share, mag = soft_votes(img, offset_deg)
    rows, cols = img.shape[0] // 8, img.shape[1] // 8
    hist = np.zeros((rows, cols, 9))
    for y in range(rows * 8):
        for x in range(cols * 8):
            hist[y // 8, x // 8, lower[y, x]] += mag[y, x] * (1 - share[y, x])
            hist[y // 8, x // 8, (lower[y, x] + 1) % 9] += mag[y, x] * share[y, x]
    return l2(hist / 64)


def reference_point_hog(img: np.ndarray, x: float, y: float) -> np.ndarray:
    """The window [x-4, x+4] x [y-4, y+4] as interval overlaps with each pixel's [i-0.5, i+0.5] square."""
    lower, share, mag = soft_votes(img)
    px = np.arange(img.shape[1])
    py = np.arange(img.shape[0])
    ox = np.clip(np.minimum(px + 0.5, x + 4) - np.maximum(px - 0.5, x - 4), 0, None)
    oy = np.clip(np.minimum(py + 0.5, y + 4) - np.maximum(py - 0.5, y - 4), 0, None)
    weight = np.outer(oy, ox) * mag
    hist = np.zeros(9)
    np.add.at(hist, lower.ravel(), (weight * (1 - share)).ravel())
    np.add.at(hist, ((lower + 1) % 9).ravel(), (weight * share).ravel())
    return l2(hist / 64)


def as_batch(img: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(img), dtype=torch.float32)[None]


@pytest.mark.parametrize("shape", [(64, 48), (45, 70)])
def test_hard_binning_equals_scikit_image(shape):
    from skimage.feature import hog

    img = np.round(texture(*shape, seed=1))  # integer intensities: no angle sits on a bin edge
    want = hog(img.astype(np.float64), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1),
               block_norm="L2", feature_vector=False)[:, :, 0, 0, :]
    got = hog_cells(as_batch(img), soft=False)[0].numpy()
    assert got.shape == want.shape == (shape[0] // 8, shape[1] // 8, 9)
    assert np.abs(got - want).max() < TOL


def test_soft_binning_equals_the_reference_and_keeps_the_mass_of_hard_binning():
    img = texture(32, 40, seed=2)
    got = hog_cells(as_batch(img))[0].numpy()
    assert np.abs(got - reference_soft_hog(img)).max() < TOL
    soft = hog_cells(as_batch(img), normalize=False)
    hard = hog_cells(as_batch(img), soft=False, normalize=False)
    assert torch.allclose(soft.sum(-1), hard.sum(-1), rtol=1e-5)  # same votes, only split differently


def test_bin_centres_and_circular_interpolation():
    # 0 deg: halfway between the last (170) and first (10) centres; 90: bin 4; 45: 1/4 bin 1 + 3/4 bin 2.
    gx = torch.tensor([1.0, 0.0, 1.0, -1.0])
    gy = torch.tensor([0.0, 1.0, 1.0, 1e-6])
    assert bin_position(gx, gy).tolist() == pytest.approx([8.5, 4.0, 1.75, 8.5], abs=1e-5)
    vertical_edges = np.tile(np.repeat([0.0, 100.0], 4), (16, 2))  # intensity changes along x only
    h = hog_cells(as_batch(vertical_edges))[0]
    interior = h[:, 1]  # cells whose pixels all see the same gradient direction
    assert torch.allclose(interior[:, 0], interior[:, 8]) and torch.allclose(interior[:, 1:8], torch.tensor(0.0))


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_hog_is_invariant_to_brightness_scale_and_offset(scale):
    img = texture(32, 32, seed=3)
    base = hog_cells(as_batch(img))
    assert (hog_cells(as_batch(img * scale)) - base).abs().max() < TOL
    assert (hog_cells(as_batch(img + 40.0)) - base).abs().max() < TOL


def test_rotating_the_image_by_90_degrees_rotates_the_bins():
    """rot90 turns every gradient by 90 deg: HOG(rot90 I) at the rotated cell = soft histogram of theta+90."""
    img = texture(40, 32, seed=4)
    rotated = hog_cells(as_batch(np.rot90(img)))[0].numpy()
    shifted = reference_soft_hog(img, offset_deg=90.0)  # the bins of I with every angle turned by 90 deg
    assert np.abs(rotated - np.rot90(shifted, axes=(0, 1))).max() < TOL
    # a 45 deg ramp (1/4 bin 1 + 3/4 bin 2) becomes 135 deg (3/4 bin 6 + 1/4 bin 7)
    ramp = np.add.outer(np.arange(24.0), np.arange(24.0))
    before, after = hog_cells(as_batch(ramp))[0, 1, 1], hog_cells(as_batch(np.rot90(ramp)))[0, 1, 1]
    assert torch.allclose(before, torch.tensor([0, 1, 3, 0, 0, 0, 0, 0, 0.0]) / math.sqrt(10), atol=TOL)
    assert torch.allclose(after, torch.tensor([0, 0, 0, 0, 0, 0, 3, 1, 0.0]) / math.sqrt(10), atol=TOL)


def test_mirroring_reverses_the_bins_and_half_turn_keeps_them():
    img = texture(32, 48, seed=5)
    h = hog_cells(as_batch(img))[0]
    mirrored = hog_cells(as_batch(img[:, ::-1]))[0]
    assert (mirrored - h.flip(1).flip(-1)).abs().max() < TOL  # theta -> 180 - theta: bin b -> 8 - b
    half_turn = hog_cells(as_batch(img[::-1, ::-1]))[0]
    assert (half_turn - h.flip(0).flip(1)).abs().max() < TOL  # unsigned: a gradient and its negative agree


def test_hog_at_points_equals_the_cell_at_cell_centres():
    img = texture(32, 40, seed=6)
    cells = hog_cells(as_batch(img))[0]
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    points = torch.stack([xs * 8 + 3.5, ys * 8 + 3.5], -1).reshape(-1, 2)
    got = hog_at_points(as_batch(img), torch.zeros(len(points), dtype=torch.long), points)
    assert (got - cells.reshape(-1, 9)).abs().max() < TOL


def test_hog_at_subpixel_points_integrates_the_window_by_area():
    img = texture(32, 32, seed=7)
    points = torch.tensor([[10.3, 12.85], [0.2, 5.5], [31.0, 30.6], [15.5, 16.0], [4.01, 27.99]])
    got = hog_at_points(as_batch(img), torch.zeros(len(points), dtype=torch.long), points).numpy()
    for p, row in zip(points.tolist(), got):
        assert np.abs(row - reference_point_hog(img, *p)).max() < TOL, p


def test_hog_at_points_reads_each_points_own_frame():
    frames = np.stack([texture(24, 24, seed=s) for s in range(3)])
    points = torch.tensor([[9.25, 11.5], [9.25, 11.5], [14.0, 8.7]])
    for frame in (torch.tensor([2, 0, 1]), torch.tensor([2, 2, 1])):  # every frame used / frame 0 unused
        got = hog_at_points(torch.tensor(frames), frame, points).numpy()
        for (x, y), f, row in zip(points.tolist(), frame.tolist(), got):
            assert np.abs(row - reference_point_hog(frames[f], x, y)).max() < TOL


def test_to_gray_uses_bt601_luma():
    rgb = torch.tensor([[[255.0, 0, 0], [0, 255.0, 0], [0, 0, 255.0]]])
    assert to_gray(rgb)[0].tolist() == pytest.approx([0.299 * 255, 0.587 * 255, 0.114 * 255], rel=1e-6)


def test_hof_bins_signed_directions_and_a_zero_bin():
    flow = torch.zeros(4, 8, 8, 2)
    flow[0, ..., 0] = 2.0  # right: halfway between the 340 and 20 deg centres
    flow[1, ..., 0], flow[1, ..., 1] = math.cos(math.radians(60)), math.sin(math.radians(60))  # 60 deg: bin 1
    flow[2, ..., 0] = -2.0  # left: 180 deg = centre of bin 4
    hof = hof_cells(flow)[:, 0, 0]
    assert hof.shape == (4, HOF_BINS + 1)
    half = 1 / math.sqrt(2)
    assert hof[0, 0] == pytest.approx(half, abs=TOL) and hof[0, 8] == pytest.approx(half, abs=TOL)
    assert hof[1, 1] == pytest.approx(1.0, abs=TOL)
    assert hof[2, 4] == pytest.approx(1.0, abs=TOL)
    assert hof[3, HOF_BINS] == pytest.approx(1.0) and hof[3, :HOF_BINS].abs().max() == 0  # still: zero bin


def test_mbh_sees_motion_boundaries_not_uniform_motion():
    flow = torch.zeros(2, 16, 16, 2)
    flow[0, ..., 0] = 3.0  # uniform translation: no motion boundary
    flow[1, :, 8:, 0] = 2.0  # a vertical boundary between x = 7 and 8, in flow-x only
    mbh = mbh_cells(flow)
    assert mbh.shape == (2, 2, 2, 18)
    assert mbh[0].abs().max() == 0
    boundary = mbh[1, 0, 0]  # the cell left of the boundary (its last column sees the step)
    assert boundary[0] == pytest.approx(1 / math.sqrt(2), abs=TOL) and boundary[8] == pytest.approx(
        1 / math.sqrt(2), abs=TOL)
    assert boundary[9:].abs().max() == 0  # flow-y has no boundary


def test_pool_flow_averages_cells():
    flow = torch.arange(2 * 8 * 8 * 2, dtype=torch.float32).view(2, 8, 8, 2)
    pooled = pool_flow(flow, 4)
    assert pooled.shape == (2, 2, 2, 2)
    assert torch.allclose(pooled[1, 0, 1], flow[1, :4, 4:].reshape(-1, 2).mean(0))


def test_chunked_processing_gives_the_same_descriptors(monkeypatch):
    import mme.motion.descriptors as descriptors

    rng = np.random.default_rng(8)
    gray = torch.tensor(np.stack([texture(24, 32, seed=s) for s in range(7)]))
    flow = torch.tensor(rng.normal(size=(7, 24, 32, 2)).astype(np.float32))
    frame = torch.tensor(rng.integers(0, 7, 40))
    points = torch.tensor(rng.uniform(0, 23, (40, 2)).astype(np.float32))
    whole = [hog_cells(gray), hof_cells(flow), mbh_cells(flow), hog_at_points(gray, frame, points)]
    monkeypatch.setattr(descriptors, "CHUNK_PIXELS", 2 * 24 * 32)  # two frames per chunk
    chunked = [hog_cells(gray), hof_cells(flow), mbh_cells(flow), hog_at_points(gray, frame, points)]
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_hog_at_points_does_not_depend_on_the_order_of_the_points():
    """Points sorted by frame (the fast path, no reordering) and shuffled give the same rows."""
    rng = np.random.default_rng(9)
    gray = torch.tensor(np.stack([texture(24, 32, seed=s) for s in range(6)]))
    frame = torch.tensor(np.sort(rng.choice([0, 2, 3, 5], 60)))  # some frames unused: non-consecutive chunks
    points = torch.tensor(np.stack([rng.uniform(0, 31, 60), rng.uniform(0, 23, 60)], 1).astype(np.float32))
    in_order = hog_at_points(gray, frame, points)
    shuffle = torch.from_numpy(rng.permutation(60))
    assert torch.allclose(hog_at_points(gray, frame[shuffle], points[shuffle]), in_order[shuffle], atol=1e-6)
    for (x, y), f, row in zip(points.tolist()[:12], frame.tolist(), in_order.numpy()):
        assert np.abs(row - reference_point_hog(gray[f].numpy(), x, y)).max() < TOL


def test_hog_at_points_matches_the_area_reference_everywhere_and_a_half_pixel_shift_would_fail():
    """Many sub-pixel points on several frames, borders included, against the independent area-overlap
    reference; the same reference half a pixel off disagrees, so an offset error cannot pass."""
    rng = np.random.default_rng(11)
    frames = np.stack([texture(40, 36, seed=20 + s) for s in range(4)])
    count = 48
    points = np.stack([rng.uniform(0, 35, count), rng.uniform(0, 39, count)], 1).astype(np.float32)
    points[:4] = [[0, 0], [35, 39], [0, 39], [35, 0]]  # the corners: windows half outside the image
    frame = rng.integers(0, 4, count)
    got = hog_at_points(torch.tensor(frames), torch.tensor(frame), torch.tensor(points)).numpy()
    off = []
    for (x, y), f, row in zip(points.tolist(), frame.tolist(), got):
        assert np.abs(row - reference_point_hog(frames[f], x, y)).max() < TOL, (x, y, f)
        off.append(np.abs(row - reference_point_hog(frames[f], x + 0.5, y + 0.5)).max())
    assert np.median(off) > 100 * TOL
