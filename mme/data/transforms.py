"""Spatial augmentation with explicit parameters, applied identically to frames, flow and points.

Geometry (docs/interfaces.md): a point (x, y) is in pixels, integer values at pixel centres. A crop
`CropParams(top, left, height, width, out_size, flip)` maps the crop window onto an `out_size` square
with `F.interpolate(..., align_corners=False)`, so

    x' = (x - left + 0.5) * out_size / width  - 0.5        y' = (y - top + 0.5) * out_size / height - 0.5
    on flip:  x' <- out_size - 1 - x'

Flow vectors are differences of such points: dx' = dx * out_size / width, dy' = dy * out_size / height,
and dx' <- -dx' on flip. `crop_frames`, `crop_flow` and `crop_points` all apply this one map, so a point
moved by the flow before the crop lands where the cropped flow moves the cropped point.
Resizing is plain bilinear (no antialias), the same kernel for frames and flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Aspect-ratio range of the random resized crop (torchvision / VideoMAE default).
CROP_RATIO = (3 / 4, 4 / 3)
# Datasets whose labels carry a direction (left vs right): flipping would change the class.
DIRECTIONAL_DATASETS = ("synthetic", "ssv2")


@dataclass(frozen=True)
class CropParams:
    """A crop window (top, left, height, width) in input pixels, resized to out_size², then maybe flipped."""

    top: int
    left: int
    height: int
    width: int
    out_size: int
    flip: bool = False

    @property
    def scale_x(self) -> float:
        return self.out_size / self.width

    @property
    def scale_y(self) -> float:
        return self.out_size / self.height


def sample_crop(h: int, w: int, out_size: int, scale: tuple[float, float] = (0.5, 1.0),
                ratio: tuple[float, float] = CROP_RATIO, flip_prob: float = 0.0,
                rng: np.random.Generator | None = None) -> CropParams:
    """Random resized crop: area fraction in `scale`, aspect (w/h) log-uniform in `ratio`, then a flip coin.

    Falls back to the largest centred crop with a clamped aspect after 10 failed draws (torchvision's rule).
    """
    rng = rng if rng is not None else np.random.default_rng()
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return CropParams(top, left, ch, cw, out_size, bool(rng.random() < flip_prob))
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return CropParams((h - ch) // 2, (w - cw) // 2, ch, cw, out_size, bool(rng.random() < flip_prob))


def center_crop(h: int, w: int, out_size: int) -> CropParams:
    """A centred `out_size` square (no resize); a centred min(h, w) square resized up when the frame is smaller."""
    return spatial_crops(h, w, out_size, 1)[0]


def spatial_crops(h: int, w: int, out_size: int, num_crops: int) -> list[CropParams]:
    """`num_crops` squares spread evenly along the long side (VideoMAE's 3-crop test); centred for one.

    The square side is `out_size` (no resize) when it fits, else the short side (resized to out_size).
    """
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    side = min(out_size, h, w)
    top_c, left_c = (h - side) // 2, (w - side) // 2
    if num_crops == 1:
        return [CropParams(top_c, left_c, side, side, out_size)]
    along_h = h > w
    last = (h if along_h else w) - side
    positions = [int(round(x)) for x in np.linspace(0, last, num_crops)]
    if along_h:
        return [CropParams(p, left_c, side, side, out_size) for p in positions]
    return [CropParams(top_c, p, side, side, out_size) for p in positions]


def _as_tensor(x) -> torch.Tensor:
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return tensor.float()


def _crop_resize(x: torch.Tensor, p: CropParams) -> torch.Tensor:
    """(N, H, W, C) -> (N, out, out, C): crop the window, bilinear resize (align_corners=False)."""
    window = x[:, p.top:p.top + p.height, p.left:p.left + p.width, :]
    if window.shape[1] != p.height or window.shape[2] != p.width:
        raise ValueError(f"crop {p} does not fit an input of size {tuple(x.shape[1:3])}")
    if (p.height, p.width) != (p.out_size, p.out_size):
        window = window.permute(0, 3, 1, 2)
        window = F.interpolate(window, size=(p.out_size, p.out_size), mode="bilinear", align_corners=False)
        window = window.permute(0, 2, 3, 1)
    return window.flip(2) if p.flip else window


def crop_frames(frames, p: CropParams) -> torch.Tensor:
    """frames (T, H, W, C) uint8/float array or tensor -> torch.float32 (T, out, out, C), values unscaled."""
    return _crop_resize(_as_tensor(frames), p).contiguous()


def crop_flow(flow, p: CropParams) -> torch.Tensor:
    """flow (S, H, W, 2) (dx, dy) in input pixels -> torch.float32 (S, out, out, 2) in output pixels.

    Vectors are scaled by out/crop per axis; a flip mirrors the field and negates dx.
    """
    out = _crop_resize(_as_tensor(flow), p)
    sign_x = -p.scale_x if p.flip else p.scale_x
    scale = torch.tensor([sign_x, p.scale_y], dtype=out.dtype)
    return (out * scale).contiguous()


def crop_points(points, p: CropParams):
    """points (..., 2) (x, y) in input pixels -> the same points in output pixels (same type as the input)."""
    is_tensor = isinstance(points, torch.Tensor)
    pts = points.clone().float() if is_tensor else np.asarray(points, dtype=np.float64).copy()
    x = (pts[..., 0] - p.left + 0.5) * p.scale_x - 0.5
    y = (pts[..., 1] - p.top + 0.5) * p.scale_y - 0.5
    if p.flip:
        x = p.out_size - 1 - x
    pts[..., 0] = x
    pts[..., 1] = y
    return pts


def normalize(clip) -> torch.Tensor:
    """(T, H, W, 3) float/uint8 in 0..255 -> float32 (3, T, H, W), ImageNet mean/std normalised."""
    clip = _as_tensor(clip) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=clip.dtype)
    std = torch.tensor(IMAGENET_STD, dtype=clip.dtype)
    return ((clip - mean) / std).permute(3, 0, 1, 2).contiguous()


def flip_allowed(cfg) -> bool:
    """data.flip 'on'/'off' as given; 'auto' = off for direction-labelled datasets (synthetic, ssv2)."""
    if cfg.data.flip == "on":
        return True
    if cfg.data.flip == "off":
        return False
    return cfg.data.dataset not in DIRECTIONAL_DATASETS
