"""Drawing the generated dataset: the scene types, textures and sprites, and rendering a scene to frames.

`mme.data.synthetic` decides what happens in a video (class, motion, camera); this module only draws it.
Both are one generator: a change here that changes a video's pixels bumps `GENERATOR_VERSION` there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("circle", "ellipse", "triangle", "square", "pentagon", "hexagon", "star", "cross")
PATTERNS = ("stripes", "checker", "dots", "split")


@dataclass
class SceneObject:
    """One sprite and its per-frame state: centre (x, y) in frame pixels, angle (deg, cw), radius (px)."""

    sprite: np.ndarray   # float32 (D, D, 4): RGB in 0..255 and alpha in 0..1, drawn at `base_radius`
    base_radius: float
    states: np.ndarray   # float32 (F, 4): x, y, angle, radius


@dataclass
class Scene:
    background: np.ndarray  # float32 (S+2P, S+2P, 3), the world the camera looks at
    pad: int
    camera: np.ndarray      # float32 (F, 2): camera offset (x, y) from the centred view
    objects: list[SceneObject]

    def reversed(self) -> Scene:
        """The same scene played backwards."""
        objects = [SceneObject(o.sprite, o.base_radius, o.states[::-1].copy()) for o in self.objects]
        return Scene(self.background, self.pad, self.camera[::-1].copy(), objects)


# ---------------------------------------------------------------- appearance

def smooth_texture(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    """float32 (H, W, C) in about 0..1: random noise at three octaves, bicubically upsampled and summed."""
    out = np.zeros((height, width, channels), np.float32)
    for cells, weight in ((3, 0.5), (8, 0.3), (20, 0.2)):
        noise = rng.random((cells, cells, channels)).astype(np.float32)
        out += weight * cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC).reshape(out.shape)
    return np.clip(out, 0.0, 1.0)


def make_background(rng: np.random.Generator, size: int, pad: int) -> np.ndarray:
    """float32 (S+2P, S+2P, 3) textured world: a random base colour modulated by smooth noise."""
    side = size + 2 * pad
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    texture = smooth_texture(rng, side, side) - 0.5
    return np.clip(base + rng.uniform(60, 140) * texture, 0, 255)


def _shape_polygon(kind: str, radius: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) float vertices of a shape of outer radius `radius`, centred at 0."""
    angles = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    if kind in angles:
        theta = np.arange(angles[kind]) * 2 * np.pi / angles[kind]
        return radius * np.stack([np.cos(theta), np.sin(theta)], 1)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    if kind == "circle":
        return radius * np.stack([np.cos(theta), np.sin(theta)], 1)
    if kind == "ellipse":
        return radius * np.stack([np.cos(theta), rng.uniform(0.5, 0.75) * np.sin(theta)], 1)
    if kind == "star":
        theta = np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.4, 0.55))
        return np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    a, b = radius * 0.35, radius * 0.94  # cross: 12-vertex plus sign
    return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                     [-b, -a], [-a, -a]])


def _pattern(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (D, D) in 0..1, a texture that is not rotation-invariant (so spinning is visible)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - (side - 1) / 2
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    period = side * rng.uniform(0.2, 0.4)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        return (np.hypot((u % period) - period / 2, (v % period) - period / 2) < period * 0.3).astype(np.float32)
    return 1.0 / (1.0 + np.exp(-u / (side * 0.05)))  # "split": two colours divided by a soft line


def make_sprite(rng: np.random.Generator, radius: float) -> np.ndarray:
    """float32 (D, D, 4): a random textured shape of outer radius `radius` (RGB 0..255, alpha 0..1)."""
    side = 2 * int(math.ceil(radius)) + 4
    supersample = 4
    polygon = _shape_polygon(SHAPES[rng.integers(len(SHAPES))], radius, rng)
    points = np.round((polygon + side / 2) * supersample).astype(np.int32)
    mask = np.zeros((side * supersample, side * supersample), np.uint8)
    cv2.fillPoly(mask, [points], 255)
    alpha = cv2.resize(mask, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    mix = _pattern(PATTERNS[rng.integers(len(PATTERNS))], side, rng)[..., None].astype(np.float32)
    rgb = colours[0] * (1 - mix) + colours[1] * mix + 40 * (smooth_texture(rng, side, side) - 0.5)
    return np.concatenate([np.clip(rgb, 0, 255), alpha[..., None]], axis=2).astype(np.float32)


# ---------------------------------------------------------------- rendering

def _paste(frame: np.ndarray, obj: SceneObject, state: np.ndarray, shift: np.ndarray) -> None:
    """Alpha-blend one rotated/scaled sprite into `frame` (float32 (S, S, 3)) in place, inside its bounding box."""
    x, y, angle, radius = (float(v) for v in state)
    x, y = x - shift[0], y - shift[1]
    size_h, size_w = frame.shape[:2]
    reach = radius * 1.5 + 2
    x0, y0 = max(int(math.floor(x - reach)), 0), max(int(math.floor(y - reach)), 0)
    x1, y1 = min(int(math.ceil(x + reach)) + 1, size_w), min(int(math.ceil(y + reach)) + 1, size_h)
    if x1 <= x0 or y1 <= y0:
        return
    centre = (obj.sprite.shape[1] - 1) / 2
    # cv2's positive angle turns counter-clockwise on screen; states hold clockwise degrees
    matrix = cv2.getRotationMatrix2D((centre, centre), -angle, radius / obj.base_radius)
    matrix[0, 2] += x - centre - x0
    matrix[1, 2] += y - centre - y0
    patch = cv2.warpAffine(obj.sprite, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.ascontiguousarray(patch[..., 3])
    region = frame[y0:y1, x0:x1]
    region[...] = cv2.blendLinear(cv2.cvtColor(patch, cv2.COLOR_RGBA2RGB), region, alpha, 1.0 - alpha)


def render(scene: Scene, size: int) -> np.ndarray:
    """uint8 (F, S, S, 3) RGB frames of a scene."""
    frames = []
    for t, shift in enumerate(scene.camera):
        view = np.float32([[1, 0, -(scene.pad + shift[0])], [0, 1, -(scene.pad + shift[1])]])
        frame = cv2.warpAffine(scene.background, view, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        for obj in scene.objects:
            _paste(frame, obj, obj.states[t], shift)
        frames.append(cv2.convertScaleAbs(frame))  # round and saturate to uint8 (values are >= 0)
    return np.stack(frames)
