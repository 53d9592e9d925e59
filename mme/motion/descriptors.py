"""Local motion and appearance descriptors, batched in torch: HOG, HOF, MBH, pooled flow (`hog_at_points` on CPU
tensors by a compiled kernel of the same definition, see `mme.motion.backends`).

Generic image/flow operations with no knowledge of tokens or targets.

HOG (exact definition, shared by every histogram here):
- gradients: centred differences with the kernel [-1, 0, 1] along x and y, `gx[y, x] = I[y, x+1] - I[y, x-1]`;
  both components are 0 on the outermost rows/columns (scikit-image's convention);
- magnitude `m = sqrt(gx^2 + gy^2)`; unsigned orientation `theta = atan2(gy, gx) mod pi` in [0, pi) (y points down);
- `HOG_BINS` = 9 bins of width pi/9 whose centres are `(b + 0.5) * pi/9` (10, 30, ..., 170 degrees);
- soft binning (default): linear interpolation between the two nearest bin centres, circular
  (a pixel at 5 degrees gives 3/4 of m to bin 0 (10 deg) and 1/4 to bin 8 (170 deg));
  `soft=False` gives scikit-image's hard binning instead (bin b holds [b*20, (b+1)*20) degrees);
- a cell (`HOG_CELL` = 8 px square) holds the mean vote per pixel (sum of votes / 64);
- L2 normalisation per cell: `h / sqrt(sum(h^2) + eps^2)`, eps = `HOG_EPS` = 1e-5 (scikit-image's
  `block_norm='L2'` with 1x1-cell blocks). With `soft=False` `hog_cells` equals
  `skimage.feature.hog(img, 9, (8, 8), (1, 1), 'L2', feature_vector=False)` up to float32 rounding.

`hog_at_points`: the HOG of the 8x8 window centred on a sub-pixel point, i.e. the per-pixel votes integrated
over the square [x-4, x+4] x [y-4, y+4] with area weights (pixels cut by the window's edge count with the
fraction inside it; pixels outside the image count 0). A point at a cell centre (3.5 + 8i, 3.5 + 8j) gives
exactly `hog_cells`' cell (i, j).

HOF: signed flow direction `atan2(dy, dx) mod 2pi`, `HOF_BINS` = 9 bins of 40 degrees (centres at 20, 60, ...),
soft-binned and magnitude-weighted, plus one zero bin (the 10th) that counts, with weight 1 per pixel, the
pixels moving less than `HOF_MIN_FLOW` px (dense trajectories' zero bin); mean per cell, L2 per cell.
MBH: the HOG above of the flow's x image and of its y image (2 x 9 bins per cell).
"""

from __future__ import annotations

import functools
import math
import threading

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mme.config import HOG_BINS, HOG_CELL
from mme.motion.backends import compiled_kernels

HOG_EPS = 1e-5  # L2 normalisation eps (as scikit-image's L2 block norm)
HOF_BINS = 9  # signed flow-direction bins (plus the zero bin)
HOF_MIN_FLOW = 0.4  # px per frame below which a pixel votes for HOF's zero bin
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as OpenCV's RGB2GRAY (used by the flow extractor)
CHUNK_PIXELS = 150_000  # pixels processed together (12 frames of 112 x 112): the per-pixel arrays stay in cache


def to_gray(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB -> (...) luma, same scale as the input."""
    frames = frames.float()
    if frames.is_contiguous() and frames.device.type == "cpu" and frames.shape[-1] == 3:
        # One SIMD pass of OpenCV's RGB2GRAY (the same BT.601 weights in float32; ~6x faster than three torch
        # ops). All pixels as one image row: OpenCV splits work by rows, so this stays on the calling thread.
        row = frames.numpy().reshape(1, -1, 3)
        return torch.from_numpy(cv2.cvtColor(row, cv2.COLOR_RGB2GRAY).reshape(frames.shape[:-1]))
    red, green, blue = LUMA_WEIGHTS
    return torch.mul(frames[..., 0], red).add_(frames[..., 1], alpha=green).add_(frames[..., 2], alpha=blue)


def image_gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) -> gx, gy with the centred [-1, 0, 1] kernel; 0 on the border rows/columns."""
    image = image.float()
    gx = torch.empty_like(image)
    gy = torch.empty_like(image)
    torch.sub(image[:, :, 2:], image[:, :, :-2], out=gx[:, :, 1:-1])
    torch.sub(image[:, 2:, :], image[:, :-2, :], out=gy[:, 1:-1, :])
    gx[:, :, 0] = gx[:, :, -1] = 0
    gy[:, 0, :] = gy[:, -1, :] = 0
    return gx, gy


def bin_position(gx: torch.Tensor, gy: torch.Tensor, bins: int = HOG_BINS, signed: bool = False,
                 soft: bool = True) -> torch.Tensor:
    """Orientation of (gx, gy) as a bin coordinate in [0, bins).

    soft: a continuous coordinate whose integer part is the lower of the two nearest bin centres and whose
    fraction is the share of the next one (0 = the centre of bin 0; circular). hard: the integer bin b that
    holds the angle, [b, b+1) bin widths from 0 (scikit-image's binning).
    """
    turns = 1 if signed else 2  # atan2 covers (-pi, pi]: one period signed, two unsigned
    shift = 0.5 if soft else 0.0  # bin centres sit half a bin above the bin edges
    position = torch.atan2(gy, gx).mul_(turns * bins / (2 * math.pi)).add_(turns * bins - shift)
    periods = torch.floor(position * (1 / bins)).mul_(bins)  # wrap into [0, bins) (faster than remainder)
    position = position.sub_(periods).clamp_(0, _below(bins))
    return position if soft else position.floor_()


def magnitude(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """sqrt(gx^2 + gy^2) (no overflow guard needed for image and flow values; faster than hypot)."""
    return torch.addcmul(gx * gx, gy, gy).sqrt_()


def _below(bins: int) -> float:
    """The largest float32 below `bins` (a bin coordinate must stay under it after rounding)."""
    return float(np.nextafter(np.float32(bins), np.float32(0)))


def split_votes(position: torch.Tensor, vote: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft binning: (lower bin as float, vote for it, vote for the next bin) from bin coordinates and votes."""
    lower = position.floor()
    upper_vote = vote * (position - lower)
    return lower, vote - upper_vote, upper_vote


def binned_histograms(lower: torch.Tensor, lower_vote: torch.Tensor, upper_vote: torch.Tensor,
                      bins: int) -> torch.Tensor:
    """Rows of split votes (R, n) -> (R, bins) histograms; the next bin of bins-1 is 0 (circular)."""
    index = lower.long()
    hist = torch.zeros(len(index), bins + 1, device=index.device)  # column `bins`: the wrap-around, folded into 0
    hist.scatter_add_(1, index, lower_vote)
    hist[:, 1:].scatter_add_(1, index, upper_vote)
    hist[:, 0] += hist[:, bins]
    return hist[:, :bins]


def l2_normalize(hist: torch.Tensor, eps: float = HOG_EPS) -> torch.Tensor:
    """Normalise the last dimension: h / sqrt(sum(h^2) + eps^2)."""
    return hist / torch.sqrt(hist.pow(2).sum(-1, keepdim=True) + eps * eps)


def cell_rows(values: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, H, W) -> (B * H//cell * W//cell, cell*cell): the pixels of each cell as one row.

    Pixels of an incomplete last row/column of cells are dropped (as scikit-image does).
    """
    batch, height, width = values.shape
    rows, cols = height // cell, width // cell
    values = values[:, :rows * cell, :cols * cell].reshape(batch, rows, cell, cols, cell)
    return values.permute(0, 1, 3, 2, 4).reshape(batch * rows * cols, cell * cell)


def cell_histograms(position: torch.Tensor, vote: torch.Tensor, bins: int, cell: int = HOG_CELL) -> torch.Tensor:
    """Per-pixel bin coordinates and votes (B, H, W) -> (B, H//cell, W//cell, bins), mean vote per pixel."""
    batch, height, width = position.shape
    votes = split_votes(cell_rows(position, cell), cell_rows(vote, cell))
    hist = binned_histograms(*votes, bins)
    return hist.view(batch, height // cell, width // cell, bins) / (cell * cell)


def hog_cells(gray: torch.Tensor, cell: int = HOG_CELL, bins: int = HOG_BINS, soft: bool = True,
              normalize: bool = True) -> torch.Tensor:
    """HOG per cell of a batch of gray images: (B, H, W) -> (B, H//cell, W//cell, bins)."""
    return in_chunks(functools.partial(_hog_cells, cell=cell, bins=bins, soft=soft, normalize=normalize), gray)


def _hog_cells(gray: torch.Tensor, cell: int, bins: int, soft: bool, normalize: bool) -> torch.Tensor:
    gx, gy = image_gradients(gray)
    hist = cell_histograms(bin_position(gx, gy, bins, soft=soft), magnitude(gx, gy), bins, cell)
    return l2_normalize(hist) if normalize else hist


def in_chunks(function, batch: torch.Tensor) -> torch.Tensor:
    """`function(batch)` computed on chunks of about CHUNK_PIXELS pixels along dim 0 (cache-sized), concatenated."""
    per_chunk = max(1, CHUNK_PIXELS // (batch.shape[1] * batch.shape[2]))
    if len(batch) <= per_chunk:
        return function(batch)
    return torch.cat([function(part) for part in batch.split(per_chunk)])


def hog_at_points(gray: torch.Tensor, frame: torch.Tensor, points: torch.Tensor, cell: int = HOG_CELL,
                  bins: int = HOG_BINS) -> torch.Tensor:
    """HOG of the cell x cell window centred on each sub-pixel point (see the module docstring).

    Args:
        gray: (F, H, W) images; frame: long (P,) index into gray; points: (P, 2) (x, y) inside the image.
    Returns:
        (P, bins), L2-normalised per point, on the device of `gray`.

    The window [c - cell/2, c + cell/2] covers the pixel centres first .. first+cell of each axis, the two edge
    rows and columns only partly (area weights 1 - frac and frac): each pixel's two votes are weighted by its
    area inside the window and summed into its bins. Two backends of this one definition (`mme.motion.backends`):
    on CPU a compiled loop over points and window pixels, elsewhere `_torch_window_sums`. Points already
    ordered by frame (as `track_tokens` asks) skip the sort.
    """
    frame = torch.as_tensor(frame, dtype=torch.long, device=gray.device).reshape(-1)
    points = points.float()
    order = None
    if len(frame) > 1 and not bool((frame[1:] >= frame[:-1]).all()):
        order = torch.argsort(frame, stable=True)
        frame, points = frame[order], points[order]
    if len(frame) and not 0 <= int(frame[0]) <= int(frame[-1]) < len(gray):  # sorted: the ends bound it
        raise ValueError(f"hog_at_points: frame indices must lie in [0, {len(gray)}) (the images given), got "
                         f"{int(frame.min())}..{int(frame.max())}")
    kernels = compiled_kernels(gray)
    if kernels is not None:
        hist = torch.empty(len(frame), bins)
        kernels.hog_at_points(gray.detach().float().contiguous().numpy(), frame.contiguous().numpy(),
                              points.detach().contiguous().numpy(), cell, bins, HOG_EPS, hist.numpy())
    else:
        corner = points - (cell - 1) / 2
        first = corner.floor()
        frac = corner - first  # (P, 2) as (x, y): the share of the window's last column / row
        sums = _torch_window_sums(gray, frame, first.long(), frac, cell, bins)
        hist = l2_normalize(sums / (cell * cell))
    if order is None:
        return hist
    out = torch.empty_like(hist)
    out[order] = hist
    return out


def _torch_window_sums(gray: torch.Tensor, frame: torch.Tensor, first: torch.Tensor, frac: torch.Tensor,
                       cell: int, bins: int) -> torch.Tensor:
    """The window vote sums (P, bins) of points sorted by frame, in torch (any device).

    Gathers each window's pixels from per-pixel tables and scatters their votes: this touches about as many
    pixels as the frames hold (the windows of the tracked points nearly tile each frame), whereas box-filtering
    per-bin vote maps (the same values: the window is a bilinear blend of four integer-position box sums)
    writes and filters `bins` planes per pixel. On CPU the frames asked for are worked through in chunks of
    about `CHUNK_PIXELS` pixels, so that the tables a chunk gathers from stay in cache; elsewhere in one pass.
    """
    periods = torch.zeros(len(frame), 3 * bins + 1, device=gray.device)  # see `_window_votes`
    used = torch.unique_consecutive(frame)
    frames_per_chunk = len(gray)
    if gray.device.type == "cpu":
        frames_per_chunk = max(1, CHUNK_PIXELS // (gray.shape[1] * gray.shape[2]))  # as `in_chunks`
    for chunk in used.split(frames_per_chunk):
        if len(chunk) == len(used):  # one chunk: every point
            start, stop = 0, len(frame)
        else:
            start, stop = torch.searchsorted(frame, torch.stack([chunk[0], chunk[-1] + 1])).tolist()
        low, high = int(chunk[0]), int(chunk[-1]) + 1
        if high - low == len(chunk):  # consecutive frames: a view, local index by subtraction
            images, local = gray[low:high], frame[start:stop] - low
        else:
            images, local = gray[chunk], torch.searchsorted(chunk, frame[start:stop])
        _window_votes(images, local, first[start:stop], frac[start:stop], periods[start:stop], cell, bins)
    sums = periods[:, :bins] + periods[:, bins:2 * bins] + periods[:, 2 * bins:3 * bins]
    sums[:, 0] += periods[:, 3 * bins]
    return sums


def _window_votes(gray: torch.Tensor, frame: torch.Tensor, first: torch.Tensor, frac: torch.Tensor,
                  periods: torch.Tensor, cell: int, bins: int) -> None:
    """Add the area-weighted votes of each point's window on one chunk of frames to `periods` (P, 3 bins + 1).

    Per pixel: the soft bin coordinate before wrapping (`bin_position` without its wrap into [0, bins): it lies
    in (bins - 1/2, 3 bins - 1/2)), split into its integer part k, the scatter index (`periods` column k;
    column b + j*bins is bin b), and the two votes. Three planar tables inside a zero-vote margin, so that every
    window of a point inside the image reads in-range memory; one gather per window row and table. Only the
    window's edge rows and columns carry an area weight below 1, applied to them alone.
    """
    num_frames, height, width = gray.shape
    margin = cell // 2 + 1
    shape = (num_frames, height + 2 * margin, width + 2 * margin)
    inner = (slice(None), slice(margin, margin + height), slice(margin, margin + width))
    lower_bin, lower_vote, upper_vote = (_zero_margin_table(name, shape, gray.device)
                                         for name in ("bin", "lower", "upper"))
    gx, gy = image_gradients(gray)
    position = torch.atan2(gy, gx).mul_(bins / math.pi).add_(2 * bins - 0.5)
    length = magnitude(gx, gy)  # (cv2.magnitude's result depends on the buffer's alignment: not bit-reproducible)
    lower = torch.floor(position, out=lower_bin[inner])
    torch.mul(position.sub_(lower), length, out=upper_vote[inner])
    torch.sub(length, upper_vote[inner], out=lower_vote[inner])

    span = cell + 1
    top_left = (frame * shape[1] + first[:, 1] + margin) * shape[2] + first[:, 0] + margin
    row_index = (top_left[:, None] + torch.arange(span, device=gray.device) * shape[2]).view(-1)

    def gather(table: torch.Tensor) -> torch.Tensor:  # (P, span, span) window pixels
        return table.view(-1).unfold(0, span, 1).index_select(0, row_index).view(len(frame), span, span)

    index = gather(lower_bin).view(len(frame), span * span).long()  # a float table: 4 bytes gathered
    left, top = (1 - frac).unbind(1)
    right, bottom = frac.unbind(1)
    for votes in (gather(lower_vote), gather(upper_vote)):
        votes[:, 0] *= top[:, None]  # the share of each edge row / column inside the window
        votes[:, -1] *= bottom[:, None]
        votes[:, :, 0] *= left[:, None]
        votes[:, :, -1] *= right[:, None]
        periods.scatter_add_(1, index, votes.view(len(frame), span * span))
        periods = periods[:, 1:]  # the upper vote goes to the next column


_SCRATCH = threading.local()


def _zero_margin_table(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float32 table of `shape` (frames, padded height, padded width) whose margin is zero; callers
    overwrite only its inner part.

    On CPU a per-thread table is reused (a cached table of the same padded size with at least that many
    frames serves through its leading frames); on other devices a fresh one.
    """
    if device.type != "cpu":
        return torch.zeros(shape, device=device)
    cached = getattr(_SCRATCH, name, None)
    if cached is None or cached.shape[1:] != shape[1:] or len(cached) < shape[0]:
        cached = torch.zeros(shape)
        setattr(_SCRATCH, name, cached)
    return cached[:shape[0]]


def hof_cells(flow: torch.Tensor, cell: int = HOG_CELL, bins: int = HOF_BINS,
              min_flow: float = HOF_MIN_FLOW) -> torch.Tensor:
    """Histogram of flow orientation: (B, H, W, 2) -> (B, H//cell, W//cell, bins + 1); the last bin is zero motion."""
    return in_chunks(functools.partial(_hof_cells, cell=cell, bins=bins, min_flow=min_flow), flow)


def _hof_cells(flow: torch.Tensor, cell: int, bins: int, min_flow: float) -> torch.Tensor:
    dx, dy = flow.float().permute(3, 0, 1, 2).contiguous()  # contiguous planes: atan2 is vectorised only there
    speed = magnitude(dx, dy)
    still = speed < min_flow
    moving = cell_histograms(bin_position(dx, dy, bins, signed=True), speed.masked_fill(still, 0), bins, cell)
    batch, height, width = still.shape
    zero = cell_rows(still.float(), cell).mean(1).view(batch, height // cell, width // cell, 1)
    return l2_normalize(torch.cat([moving, zero], dim=-1))


def mbh_cells(flow: torch.Tensor, cell: int = HOG_CELL, bins: int = HOG_BINS) -> torch.Tensor:
    """Motion boundary histograms: HOG of flow-x and of flow-y, (B, H, W, 2) -> (B, H//cell, W//cell, 2*bins)."""
    batch = len(flow)
    components = flow.float().permute(3, 0, 1, 2).reshape(2 * batch, *flow.shape[1:3])
    hog = hog_cells(components, cell, bins)
    return torch.cat([hog[:batch], hog[batch:]], dim=-1)


def pool_flow(flow: torch.Tensor, cell: int) -> torch.Tensor:
    """Mean flow per cell x cell square: (B, H, W, 2) -> (B, H//cell, W//cell, 2)."""
    pooled = F.avg_pool2d(flow.float().permute(0, 3, 1, 2), cell)
    return pooled.permute(0, 2, 3, 1).contiguous()
