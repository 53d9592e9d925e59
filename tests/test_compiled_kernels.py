"""The compiled CPU kernels (mme.motion._kernels) equal the torch path of the same operations.

`hog_at_points` and `track_points` have two backends (`mme.motion.backends`): numba loops on CPU, torch
elsewhere. Here both run on the same inputs: random textured frames, many sub-pixel points including the image
borders, corners and half-integer positions, several frames; tracking with chained steps, flow that ends early,
points leaving the frame, one-pixel-wide images. Both paths against the independent area-overlap reference:
tests/test_descriptors.py (parametrised over the backends).
"""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import mme.motion.backends as backends
from mme.motion.backends import compiled_kernels
from mme.motion.descriptors import hog_at_points
from mme.motion.tracking import track_points

TOL = 1e-5


def both_paths(monkeypatch, function, *args, **kwargs):
    """function(*args) with the compiled kernels, then with the torch path."""
    monkeypatch.setattr(backends, "COMPILED_KERNELS", True)
    compiled = function(*args, **kwargs)
    monkeypatch.setattr(backends, "COMPILED_KERNELS", False)
    return compiled, function(*args, **kwargs)


def frames(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (count, height, width)).astype(np.float32)
    return torch.tensor(np.stack([cv2.GaussianBlur(f, (0, 0), 1.0) for f in noise]))


def points_on(rng, count: int, height: int, width: int) -> torch.Tensor:
    """Uniform sub-pixel points, the four corners, points on every border and at half-integer positions
    (windows whose edge columns carry weight 0 or 1)."""
    xy = np.stack([rng.uniform(0, width - 1, count), rng.uniform(0, height - 1, count)], 1)
    corners = [[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]]
    borders = [[0, height / 3], [width - 1, height / 2], [width / 4, 0], [width / 2, height - 1]]
    halves = [[3.5, 3.5], [width - 4.5, height - 4.5], [7.5, height / 2], [0.5, 0.5]]
    return torch.tensor(np.concatenate([xy, corners, borders, halves]), dtype=torch.float32)


def test_the_compiled_kernels_serve_cpu_tensors_only():
    assert compiled_kernels(torch.zeros(1)) is not None, "numba is a dependency: the kernels must import"
    assert compiled_kernels(torch.zeros(1, device="meta")) is None  # other devices: the torch path


@pytest.mark.parametrize("shape", [(112, 112), (37, 53), (9, 14), (5, 6)])
def test_hog_at_points_compiled_equals_torch_path(monkeypatch, shape):
    """Many points on several frames; images down to smaller than a window (every window cut by the border)."""
    height, width = shape
    rng = np.random.default_rng(height)
    gray = frames(5, height, width, seed=width)
    points = points_on(rng, 300, height, width)
    frame = torch.tensor(rng.integers(0, 5, len(points)))
    compiled, torch_path = both_paths(monkeypatch, hog_at_points, gray, frame, points)
    assert compiled.shape == torch_path.shape == (len(points), 9)
    assert (compiled - torch_path).abs().max() <= TOL
    assert torch.allclose(compiled.norm(dim=1), torch.ones(len(points)), atol=1e-4)  # textured: no empty window


def test_hog_at_points_compiled_equals_torch_path_on_edges_flat_regions_and_odd_inputs(monkeypatch):
    """Exact edges at 0, 45, 90, 135 and 180 degrees (bin centres and bin boundaries, both signs), flat
    regions (no gradient), a non-contiguous float64 batch with unsorted frames."""
    ramp = np.add.outer(np.arange(24.0), np.zeros(32))
    images = [ramp, np.add.outer(np.zeros(24), np.arange(32.0)),
              np.add.outer(np.arange(24.0), np.arange(32.0)), np.add.outer(np.arange(24.0), -np.arange(32.0)),
              np.where(np.arange(32) < 16, 0.0, 200.0)[None].repeat(24, 0), np.full((24, 32), 7.0)]
    gray = torch.tensor(np.stack(images))  # float64
    gray = torch.cat([gray, -gray]).transpose(1, 2).contiguous().transpose(1, 2)  # negated: opposite gradients
    assert not gray.is_contiguous()
    rng = np.random.default_rng(3)
    points = points_on(rng, 80, 24, 32)
    frame = torch.tensor(rng.integers(0, len(gray), len(points)))
    compiled, torch_path = both_paths(monkeypatch, hog_at_points, gray, frame, points)
    assert (compiled - torch_path).abs().max() <= TOL
    flat = frame == 5
    assert compiled[flat].abs().max() == 0  # no gradient: an all-zero histogram, not NaN


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("median", [False, True])
def test_track_points_compiled_equals_torch_path(monkeypatch, step, median):
    """Random flow, start points inside and outside the frame, starts on several pairs, flow that ends early
    for some points: identical tracks (the same float32 operations) and validity."""
    rng = np.random.default_rng(step)
    flow = torch.tensor(rng.normal(0, 1.5, (12, 30, 41, 2)).astype(np.float32))
    count = 400
    points = torch.tensor(np.stack([rng.uniform(-2, 42, count), rng.uniform(-2, 31, count)], 1),
                          dtype=torch.float32)
    start = torch.tensor(rng.integers(0, 5, count))
    end = torch.tensor(rng.integers(2, 13, count))
    for stop in (end, None):
        (tracks, valid), (want, want_valid) = both_paths(monkeypatch, track_points, flow, points, start, 3, step,
                                                         median, end=stop)
        assert torch.equal(valid, want_valid) and (tracks - want).abs().max() <= TOL
        assert 0 < int(valid.sum()) < count  # both valid and invalid trajectories are compared


@pytest.mark.parametrize("shape", [(0, 8, 9), (4, 1, 7), (4, 6, 1)])
def test_track_points_compiled_equals_torch_path_on_degenerate_flow(monkeypatch, shape):
    """No flow pairs at all; one-pixel-high and one-pixel-wide frames (no bilinear neighbour)."""
    rng = np.random.default_rng(sum(shape))
    flow = torch.tensor(rng.normal(0, 0.3, (*shape, 2)).astype(np.float32))
    points = torch.tensor(np.stack([rng.uniform(0, shape[2] - 1, 50), rng.uniform(0, shape[1] - 1, 50)], 1),
                          dtype=torch.float32)
    start = torch.zeros(50, dtype=torch.long)
    (tracks, valid), (want, want_valid) = both_paths(monkeypatch, track_points, flow, points, start, 2)
    assert torch.equal(valid, want_valid) and torch.equal(tracks, want)


def test_the_environment_switches_the_kernels_off():
    code = "import mme.motion.backends as b, torch; print(b.compiled_kernels(torch.zeros(1)) is None)"
    for value, off in (("0", "True"), ("1", "False")):
        env = dict(os.environ, MME_COMPILED_KERNELS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == off


def test_hog_at_points_rejects_frames_outside_the_images():
    gray = frames(2, 16, 16, seed=0)
    with pytest.raises(ValueError, match=r"frame indices must lie in \[0, 2\)"):
        hog_at_points(gray, torch.tensor([0, 2]), torch.tensor([[4.0, 4.0], [5.0, 5.0]]))
