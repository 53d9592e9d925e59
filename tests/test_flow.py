"""Optical flow backends and camera compensation recover known motion.

Frame 2 is made from frame 1 with `cv2.warpAffine`, so the true flow is known to sub-pixel precision.
Tolerances (median end-point error on interior pixels, 16 px from the border): 0.1 px for every backend
on a pure translation; 0.15 px for the compensated background and the square's relative motion.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mme.motion import camera
from mme.motion.flow import BACKENDS, FlowEstimator, compute_flow

SHIFT = (1.3, -0.7)  # (dx, dy) px: content moves right and up
MARGIN = 16


def smooth_texture(height: int, width: int, seed: int, sigma: float = 2.0) -> np.ndarray:
    """A random texture low-passed so sub-pixel motion is well defined, uint8 (H, W)."""
    noise = np.random.default_rng(seed).random((height, width)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigma)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def translate(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Content moved by (dx, dy): output(x + dx, y + dy) = input(x, y)."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def as_rgb_clip(*images: np.ndarray) -> np.ndarray:
    return np.stack([cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) for image in images])


def interior(flow: np.ndarray) -> np.ndarray:
    """The pixels at least MARGIN px from the border of a (..., H, W, 2) flow."""
    return flow[..., MARGIN:-MARGIN, MARGIN:-MARGIN, :]


def median_error(vectors: np.ndarray, truth) -> float:
    """Median end-point error of (..., 2) flow vectors against one true (dx, dy)."""
    return float(np.median(np.linalg.norm(vectors - np.float32(truth), axis=-1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_recovers_subpixel_translation(backend):
    size = 64 if backend == "tvl1" else 96  # TV-L1 is slow; 64 px keeps this test well under a second
    first = smooth_texture(size, size + 16, seed=1)
    clip = as_rgb_clip(first, translate(first, *SHIFT))
    flow = compute_flow(clip, backend)
    assert flow.shape == (1, size, size + 16, 2) and flow.dtype == np.float32
    assert median_error(interior(flow), SHIFT) < 0.1
    # Sign convention: (dx, dy), positive x to the right, positive y downwards.
    median = np.median(interior(flow[0]), axis=(0, 1))
    assert median[0] > 1.0 and median[1] < -0.5


def test_flow_of_each_pair_and_reversed_motion():
    first = smooth_texture(80, 80, seed=2)
    second = translate(first, *SHIFT)
    third = translate(second, -2.0, 0.5)
    flow = compute_flow(as_rgb_clip(first, second, third), "dis")
    assert flow.shape == (2, 80, 80, 2)
    assert median_error(interior(flow[0]), SHIFT) < 0.1
    assert median_error(interior(flow[1]), (-2.0, 0.5)) < 0.1
    backwards = compute_flow(as_rgb_clip(second, first), "dis")
    assert median_error(interior(backwards), (-SHIFT[0], -SHIFT[1])) < 0.1


def test_gray_and_rgb_input_agree():
    first = smooth_texture(64, 64, seed=3)
    second = translate(first, *SHIFT)
    gray = compute_flow(np.stack([first, second]), "farneback")
    rgb = compute_flow(as_rgb_clip(first, second), "farneback")
    np.testing.assert_array_equal(gray, rgb)


def test_estimator_reuses_its_backend_object():
    estimator = FlowEstimator("dis")
    engine = estimator._engine
    first = smooth_texture(64, 64, seed=4)
    clip = as_rgb_clip(first, translate(first, *SHIFT), translate(first, 2 * SHIFT[0], 2 * SHIFT[1]))
    estimator(clip)
    estimator(clip)
    assert estimator._engine is engine


def test_bad_inputs_fail_clearly(monkeypatch):
    clip = as_rgb_clip(smooth_texture(32, 32, seed=5), smooth_texture(32, 32, seed=6))
    with pytest.raises(ValueError, match="farneback, dis, tvl1"):
        compute_flow(clip, "raft")
    with pytest.raises(ValueError, match="uint8"):
        compute_flow(clip.astype(np.float32), "dis")
    with pytest.raises(ValueError, match="at least 2 frames"):
        compute_flow(clip[:1], "dis")
    monkeypatch.delattr(cv2, "optflow", raising=False)
    with pytest.raises(RuntimeError, match="opencv-contrib-python-headless"):
        compute_flow(clip, "tvl1")


def test_homography_flow_is_removed_exactly():
    """A flow field that is exactly a camera zoom + rotation + pan compensates to zero."""
    height, width = 96, 128
    angle, zoom = np.deg2rad(1.5), 1.03
    homography = np.array([[zoom * np.cos(angle), -zoom * np.sin(angle), 2.5],
                           [zoom * np.sin(angle), zoom * np.cos(angle), -1.25],
                           [1e-5, 0.0, 1.0]])
    flow = camera.homography_flow(homography, height, width)
    # Spot check of the definition H(p) - p at one pixel.
    x, y = 40, 30
    mapped = homography @ np.array([x, y, 1.0])
    np.testing.assert_allclose(flow[y, x], mapped[:2] / mapped[2] - (x, y), atol=1e-4)
    residual = camera.compensate_camera_motion(flow)
    assert np.abs(residual).max() < 1e-2


def test_camera_pan_removed_and_foreground_motion_kept():
    """The background pans by PAN; a textured square moves by PAN + OWN. After compensation the background
    is still and the square moves by OWN, its motion relative to the background."""
    pan, own = (1.6, 0.8), (-2.0, 1.0)
    height, width, side, top, left = 112, 144, 40, 36, 52
    background = smooth_texture(height, width, seed=7).astype(np.float32)
    foreground = smooth_texture(height, width, seed=8, sigma=1.5).astype(np.float32)
    square = np.zeros((height, width), np.float32)
    square[top:top + side, left:left + side] = 1.0

    def scene(background_shift, square_shift):
        alpha = translate(square, *square_shift)
        image = (1 - alpha) * translate(background, *background_shift) + alpha * translate(foreground, *square_shift)
        return image.round().astype(np.uint8)

    clip = as_rgb_clip(scene((0, 0), (0, 0)), scene(pan, (pan[0] + own[0], pan[1] + own[1])))
    raw = compute_flow(clip, "farneback")[0]
    compensated = compute_flow(clip, "farneback", compensate_camera=True)[0]

    background_mask = np.zeros((height, width), bool)
    background_mask[MARGIN:-MARGIN, MARGIN:-MARGIN] = True
    background_mask[top - 16:top + side + 16, left - 16:left + side + 16] = False
    square_core = (slice(top + 10, top + side - 10), slice(left + 10, left + side - 10))

    assert median_error(raw[background_mask], pan) < 0.15  # the raw flow does see the pan
    assert median_error(compensated[background_mask], (0.0, 0.0)) < 0.15
    assert median_error(compensated[square_core], own) < 0.15
    assert median_error(raw[square_core], (pan[0] + own[0], pan[1] + own[1])) < 0.15


def test_compensation_leaves_flow_alone_without_a_trusted_fit():
    """Random flow has no homography with enough inliers: the flow is returned unchanged."""
    flow = np.random.default_rng(9).normal(0, 5, (64, 64, 2)).astype(np.float32)
    assert camera.fit_camera_homography(flow) is None
    assert camera.compensate_camera_motion(flow) is flow
