"""Compiled CPU kernels (numba) for the per-point loops of `mme.motion`.

Owns the CPU backends of `mme.motion.descriptors.hog_at_points` and `mme.motion.tracking.track_points`: the
definitions of those modules, written as loops over points (and window pixels), so that no per-pixel index
tables are gathered and scattered. Importing this module imports numba (`mme.motion.backends` does it on the
first CPU call); `cache=True` stores the compiled code beside this file, so that only the first process on a
machine compiles.

The orientation is computed here with a float32 arctangent (Cephes' `atanf`: range reduction to
|t| <= tan(pi/8) and a degree-9 odd polynomial, within 2 float32 ulps of atan), not torch's: one pass over
each frame then yields every per-pixel table, and the loop vectorises. Both backends agree to about 1e-6.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_F = np.float32
_TAN_PI_8 = _F(0.41421356237309503)  # tan(pi/8)
_PI_4 = _F(np.pi / 4)
_PI_2 = _F(np.pi / 2)
_TINY = _F(1e-30)  # below any nonzero gradient of float32 images


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _frame_tables(image, bins, gx, gy, lower, lower_vote, upper_vote):
    """Per-pixel soft votes of one (H, W) float32 image into (H, W) tables: the lower bin in [0, bins) and its
    vote, and the vote for the next bin (bin `lower + 1`, where `bins` stands for bin 0). gx, gy: (W,) scratch.

    Gradients [-1, 0, 1], 0 on the outermost rows/columns; unsigned orientation theta in [0, pi]; the soft
    coordinate theta * bins / pi - 1/2 split into its floor (wrapped) and fraction. Written without branches
    in the pixel loop, so that it vectorises.
    """
    height, width = image.shape
    scale = _F(bins / np.pi)
    for y in range(height):
        gx[0] = gx[width - 1] = 0
        for x in range(1, width - 1):
            gx[x] = image[y, x + 1] - image[y, x - 1]
        if 0 < y < height - 1:
            for x in range(width):
                gy[x] = image[y + 1, x] - image[y - 1, x]
        else:
            gy[:] = 0
        for x in range(width):
            ax, ay = abs(gx[x]), abs(gy[x])
            steep = ay > ax
            small = ax if steep else ay
            large = ay if steep else ax
            # Cephes atanf: reduce to |r| <= tan(pi/8), r = small / large or (small - large) / (small + large)
            # (then atan = pi/4 + atan(r)), in one division; 0 / _TINY where there is no gradient.
            big = small > _TAN_PI_8 * large
            r = (small - large if big else small) / (small + large if big else max(large, _TINY))
            z = r * r
            angle = (((_F(8.05374449538e-2) * z - _F(1.38776856032e-1)) * z + _F(1.99777106478e-1)) * z
                     - _F(3.33329491539e-1)) * z * r + r
            angle = angle + (_PI_4 if big else _F(0))  # atan(small / large), in [0, pi/4]
            angle = _PI_2 - angle if steep else angle
            opposite = (gx[x] < _F(0)) != (gy[x] < _F(0))  # second or fourth quadrant: theta = pi - atan
            angle = _F(np.pi) - angle if opposite else angle
            position = angle * scale - _F(0.5)  # in [-1/2, bins - 1/2]
            floor = np.floor(position)
            length = np.sqrt(gx[x] * gx[x] + gy[x] * gy[x])
            upper = (position - floor) * length
            lower[y, x] = np.int32(floor) + (bins if floor < _F(0) else 0)
            upper_vote[y, x] = upper
            lower_vote[y, x] = length - upper


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def hog_at_points(gray, frame, points, cell, bins, eps, out):
    """`mme.motion.descriptors.hog_at_points` of points sorted by frame (the same float32 window geometry).

    Args:
        gray: float32 (N, H, W) images. frame: int64 (P,) sorted; points: float32 (P, 2) (x, y).
        out: float32 (P, bins), overwritten with the L2-normalised histograms.

    Each frame's per-pixel tables are built when its first point comes, so they stay in cache while its
    points read them.
    """
    _, height, width = gray.shape
    lower = np.empty((height, width), np.int32)
    lower_vote = np.empty((height, width), np.float32)
    upper_vote = np.empty((height, width), np.float32)
    gx, gy = np.empty(width, np.float32), np.empty(width, np.float32)
    column_weight, hist = np.empty(cell + 1, np.float32), np.empty(2 * (bins + 1), np.float32)
    # Flat views for `_window_sums` (unsigned flat indices: no negative-index wrap-around in its inner loop).
    lower_flat, lower_flat_vote, upper_flat_vote = lower.ravel(), lower_vote.ravel(), upper_vote.ravel()
    offset, area, eps2 = _F((cell - 1) / 2), _F(cell * cell), _F(eps) * _F(eps)
    current = -1
    for p in range(len(frame)):
        if frame[p] != current:
            current = frame[p]
            _frame_tables(gray[current], bins, gx, gy, lower, lower_vote, upper_vote)
        x, y = points[p, 0] - offset, points[p, 1] - offset  # the window's corner
        x0, y0 = np.floor(x), np.floor(y)
        _window_sums(lower_flat, lower_flat_vote, upper_flat_vote, height, width, int(x0), int(y0), x - x0,
                     y - y0, cell, bins, column_weight, hist, out, p)
        squares = _F(0)
        for b in range(bins):
            out[p, b] = out[p, b] / area
            squares += out[p, b] * out[p, b]
        norm = np.sqrt(squares + eps2)
        for b in range(bins):
            out[p, b] = out[p, b] / norm


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _window_sums(lower, lower_vote, upper_vote, height, width, x0, y0, frac_x, frac_y, cell, bins, column_weight,
                 hist, out, p):
    """The area-weighted vote sums of the (cell + 1)^2 pixels from (x0, y0) of flat (H * W) tables into
    out[p] (bins,): the first column / row has weight 1 - frac, the last frac, the rest 1; pixels outside the
    image count 0. column_weight (cell + 1,), hist (2 (bins + 1),): scratch. Inlined by numba: a call per
    point would cost more than its window (reference counts of every array argument)."""
    span = cell + 1
    column_start, column_stop = max(0, -x0), min(span, width - x0)
    for c in range(column_start, column_stop):  # the weights of the columns inside the image, from the first
        column_weight[c - column_start] = _F(1) - frac_x if c == 0 else (frac_x if c == cell else _F(1))
    # Neighbouring pixels mostly vote for the same bins, so each add would wait on the previous one through
    # memory: even and odd columns add into two histograms. Entry `bins` of each is the next bin of the last
    # one (bin 0).
    stride = np.uintp(bins + 1)
    hist[:] = 0
    for r in range(max(0, -y0), min(span, height - y0)):
        row_weight = _F(1) - frac_y if r == 0 else (frac_y if r == cell else _F(1))
        row = np.uintp((y0 + r) * width + x0 + column_start)
        for k in range(column_stop - column_start):
            i, c = row + np.uintp(k), np.uintp(k)
            weight = row_weight * column_weight[c]
            b = np.uintp(lower[i]) + (c & np.uintp(1)) * stride
            hist[b] += lower_vote[i] * weight
            hist[b + np.uintp(1)] += upper_vote[i] * weight
    out[p, 0] = (hist[0] + hist[bins + 1]) + (hist[bins] + hist[2 * bins + 1])
    for b in range(1, bins):
        out[p, b] = hist[b] + hist[bins + 1 + b]


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def track(flow, points, start, end, steps, step, tracks, valid):
    """`mme.motion.tracking.track_points` after its median filter (the same float32 ops, in the same order).

    Args:
        flow: float32 (S, H, W, 2). points: float32 (P, 2). start, end: int64 (P,) the first flow pair of each
        point and the end (exclusive) of its flow. tracks: float32 (P, steps + 1, 2), valid: bool (P,), outputs.

    Step by step over all points, not point by point: the flow reads of one step are independent, so their
    cache misses overlap instead of waiting on each other.
    """
    num_pairs, height, width, _ = flow.shape
    upper_x, upper_y = _F(width - 1), _F(height - 1)
    for p in range(len(points)):
        x, y = points[p, 0], points[p, 1]
        valid[p] = _inside(x, y, upper_x, upper_y) and start[p] + steps * step - 1 < end[p]
        tracks[p, 0, 0], tracks[p, 0, 1] = min(max(x, _F(0)), upper_x), min(max(y, _F(0)), upper_y)
    for t in range(steps):
        for p in range(len(points)):
            x, y = tracks[p, t, 0], tracks[p, t, 1]
            inside = valid[p]
            for u in range(step):
                frame = start[p] + t * step + u
                if num_pairs and frame < end[p]:
                    dx, dy = _sample(flow[min(frame, num_pairs - 1)], x, y)
                    x, y = x + dx, y + dy
                inside = inside and _inside(x, y, upper_x, upper_y)
                x, y = min(max(x, _F(0)), upper_x), min(max(y, _F(0)), upper_y)
            tracks[p, t + 1, 0], tracks[p, t + 1, 1] = x, y
            valid[p] = inside


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _inside(x, y, upper_x, upper_y):
    return _F(0) <= x <= upper_x and _F(0) <= y <= upper_y


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _sample(field, x, y):
    """The (dx, dy) of a (H, W, 2) field at (x, y), bilinear between pixel centres
    (`mme.motion.tracking.sample_flow`: the first corner clamped to the last full cell; along x, then y)."""
    height, width = field.shape[:2]
    x0 = min(max(np.floor(x), _F(0)), _F(max(width - 2, 0)))
    y0 = min(max(np.floor(y), _F(0)), _F(max(height - 2, 0)))
    fx, fy = x - x0, y - y0
    i, j = int(x0), int(y0)
    ii, jj = i + (1 if width > 1 else 0), j + (1 if height > 1 else 0)
    left, right = _F(1) - fx, fx
    top_x = field[j, i, 0] * left + field[j, ii, 0] * right
    top_y = field[j, i, 1] * left + field[j, ii, 1] * right
    bottom_x = field[jj, i, 0] * left + field[jj, ii, 0] * right
    bottom_y = field[jj, i, 1] * left + field[jj, ii, 1] * right
    return top_x * (_F(1) - fy) + bottom_x * fy, top_y * (_F(1) - fy) + bottom_y * fy
