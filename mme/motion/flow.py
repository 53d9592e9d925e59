"""Dense optical flow between consecutive frames, with three OpenCV backends.

Convention (docs/interfaces.md): `flow[i, y, x] = (dx, dy)` means the pixel centred at (x, y) in frame `i`
moves to (x + dx, y + dy) in frame `i + 1`. Flow is computed on grayscale images in the pixel units of the
frames it is given.

Backends (which preset uses which: docs/deviations.md):
- `farneback`: `cv2.calcOpticalFlowFarneback` (the method the paper cites) with the parameters of OpenCV's
  own dense-flow sample: pyramid scale 0.5, 3 levels, 15 px box window, 3 iterations, polynomial
  neighbourhood 5 with sigma 1.2.
- `dis`: `cv2.DISOpticalFlow` with the MEDIUM preset. Measured at 128 px (benchmarks/bench_extract.py):
  ULTRAFAST and FAST are 5-13x faster but estimate on a 4x coarser finest scale and miss a sub-pixel
  translation by 0.11-0.14 px (median); MEDIUM misses it by 0.04 px at about 300-350 pairs per CPU-second,
  so two worker processes reach the issue's 300 pairs/s on 2 cores.
- `tvl1`: `cv2.optflow.DualTVL1OpticalFlow` with its default parameters (needs opencv-contrib); accurate,
  and by far the slowest.

One `FlowEstimator` owns one OpenCV object and reuses it for every pair it is given.
"""

from __future__ import annotations

import cv2
import numpy as np

from mme.motion.camera import compensate_camera_motion

BACKENDS = ("farneback", "dis", "tvl1")

# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma,
# flags): the values of OpenCV's dense-flow sample (samples/python/opt_flow.py).
FARNEBACK_PARAMS = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}
DIS_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM
CONTRIB_PACKAGE = "opencv-contrib-python-headless"


def _dis() -> cv2.DISOpticalFlow:
    return cv2.DISOpticalFlow_create(DIS_PRESET)


def _tvl1():
    optflow = getattr(cv2, "optflow", None)
    if optflow is None or not hasattr(optflow, "DualTVL1OpticalFlow_create"):
        raise RuntimeError(
            "flow backend 'tvl1' needs OpenCV's contrib module cv2.optflow, which this OpenCV build lacks: "
            f"pip install {CONTRIB_PACKAGE} (uninstall opencv-python-headless first; the two wheels conflict), "
            "or choose flow.backend=dis or farneback")
    return optflow.DualTVL1OpticalFlow_create()


class FlowEstimator:
    """Dense flow of consecutive frame pairs with one backend object, built once and reused.

    Args:
        backend: one of `BACKENDS`.
        compensate_camera: subtract the camera-induced flow (a RANSAC homography per pair, see
            `mme.motion.camera`).
    """

    def __init__(self, backend: str = "dis", compensate_camera: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"unknown flow backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.compensate_camera = compensate_camera
        # Farneback is a plain function; the other two are stateful objects we keep across pairs.
        self._engine = {"dis": _dis, "tvl1": _tvl1}.get(backend, lambda: None)()

    def pair(self, prev_gray: np.ndarray, next_gray: np.ndarray) -> np.ndarray:
        """Flow (H, W, 2) float32 from one uint8 grayscale image to the next."""
        if self.backend == "farneback":
            flow = cv2.calcOpticalFlowFarneback(prev_gray, next_gray, None, **FARNEBACK_PARAMS)
        else:
            flow = self._engine.calc(prev_gray, next_gray, None)
        if self.compensate_camera:
            flow = compensate_camera_motion(flow)
        return flow.astype(np.float32, copy=False)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Flow of every consecutive pair: frames uint8 (T, H, W, 3) RGB or (T, H, W) -> (T-1, H, W, 2)."""
        gray = to_gray(frames)
        flow = np.empty((len(gray) - 1, *gray.shape[1:], 2), np.float32)
        for i in range(len(flow)):
            flow[i] = self.pair(gray[i], gray[i + 1])
        return flow


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB or (T, H, W) gray -> uint8 (T, H, W) gray; checks the input."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim == 3:
        gray = frames
    elif frames.ndim == 4 and frames.shape[-1] == 3:
        gray = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames])
    else:
        raise ValueError(f"frames must have shape (T, H, W, 3) or (T, H, W), got {frames.shape}")
    if len(gray) < 2:
        raise ValueError(f"need at least 2 frames to compute flow, got {len(gray)}")
    return np.ascontiguousarray(gray)


def compute_flow(frames: np.ndarray, backend: str = "dis", compensate_camera: bool = False) -> np.ndarray:
    """Dense flow between consecutive frames.

    Args:
        frames: uint8 (T, H, W, 3) RGB (or (T, H, W) gray), T >= 2.
        backend: `farneback`, `dis` or `tvl1`.
        compensate_camera: subtract the flow of the homography fitted between each pair.

    Returns:
        float32 (T-1, H, W, 2): `flow[i, y, x] = (dx, dy)` from frame i to frame i+1, in pixels.
    """
    return FlowEstimator(backend, compensate_camera)(frames)
