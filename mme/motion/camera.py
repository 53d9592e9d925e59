"""Camera-motion compensation in the style of improved dense trajectories (Wang & Schmid, ICCV 2013).

Between two frames the background moves by a homography when the camera pans, tilts or zooms. We fit that
homography to the flow itself: points on a regular grid `p` and where the flow sends them `p + flow(p)`,
matched with `cv2.findHomography` and RANSAC so the moving foreground is rejected as outliers. The flow the
camera alone would cause, `H(p) - p`, is then subtracted at every pixel, leaving the motion relative to the
background. A fit with too few inliers (mostly foreground, textureless frames) is not trusted: the flow is
returned unchanged, as if the camera had not moved.
"""

from __future__ import annotations

import cv2
import numpy as np

GRID_STEP = 8  # px between flow samples (one per 8x8 cell, the HOG cell size)
RANSAC_THRESHOLD = 1.0  # px: reprojection error under which a sample counts as background (inlier)
MIN_INLIERS = 16  # absolute floor on background samples for a fit to be trusted ...
MIN_INLIER_FRACTION = 0.25  # ... and the fraction of all samples


def grid_points(height: int, width: int, step: int = GRID_STEP) -> np.ndarray:
    """Pixel centres of a regular grid, (N, 2) float32 (x, y), the first at (step//2, step//2)."""
    ys, xs = np.mgrid[step // 2:height:step, step // 2:width:step]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def fit_camera_homography(flow: np.ndarray, step: int = GRID_STEP,
                          threshold: float = RANSAC_THRESHOLD) -> np.ndarray | None:
    """The homography (3, 3) mapping frame-i pixels to frame-i+1 pixels for the background, or None.

    Args:
        flow: (H, W, 2) float32, `flow[y, x] = (dx, dy)`.
        step: grid spacing of the flow samples in pixels.
        threshold: RANSAC inlier threshold in pixels.
    """
    height, width = flow.shape[:2]
    src = grid_points(height, width, step)
    dst = src + flow[src[:, 1].astype(int), src[:, 0].astype(int)]
    # Samples that leave the frame carry no evidence about where the background went.
    inside = (dst[:, 0] >= 0) & (dst[:, 0] <= width - 1) & (dst[:, 1] >= 0) & (dst[:, 1] <= height - 1)
    src, dst = src[inside], dst[inside]
    needed = max(MIN_INLIERS, int(np.ceil(MIN_INLIER_FRACTION * len(inside))))
    if len(src) < needed:
        return None
    homography, inliers = cv2.findHomography(src, dst, cv2.RANSAC, threshold)
    if homography is None or int(inliers.sum()) < needed or not np.all(np.isfinite(homography)):
        return None
    return homography


def homography_flow(homography: np.ndarray, height: int, width: int) -> np.ndarray:
    """The flow (H, W, 2) float32 a homography induces: `H(p) - p` at every pixel centre p."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    points = np.stack([xs, ys], axis=-1).reshape(-1, 1, 2)
    moved = cv2.perspectiveTransform(points, homography)
    return (moved - points).reshape(height, width, 2).astype(np.float32)


def compensate_camera_motion(flow: np.ndarray, step: int = GRID_STEP,
                             threshold: float = RANSAC_THRESHOLD) -> np.ndarray:
    """Flow (H, W, 2) minus the camera-induced flow; unchanged when no homography can be trusted."""
    homography = fit_camera_homography(flow, step, threshold)
    if homography is None:
        return flow
    camera = homography_flow(homography, *flow.shape[:2])
    if not np.all(np.isfinite(camera)):  # a degenerate homography sends some pixel to infinity
        return flow
    return flow - camera
