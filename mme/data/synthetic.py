"""The generated motion dataset (docs/deviations.md): real MP4 clips whose class is the actor's motion only.

Each video shows a smooth random texture (optionally under a slow camera pan), one actor object and
`distractors` other objects (static or jittering in place), all with a random shape, colour and
texture. The class is what the actor does: slide left/right/up/down, rotate cw/ccw, grow/shrink,
approach/separate (the actor and a partner object), bounce (hops on a floor) or orbit (circles).

Time-reversed partners: `slide_right`, `slide_down`, `rotate_ccw`, `shrink` and `separate` are made
by drawing a `slide_left`, `slide_up`, `rotate_cw`, `grow` or `approach` scene from the same
distribution and playing it backwards, so a single frame has exactly the same distribution for a
class and its partner. `bounce` and `orbit` are their own reversal (random drift / direction).
Sizes not animated (radius, angle, position) are drawn from the time-marginals of the animated
classes, so object size and placement say little about the class either.

Motion magnitudes are given at 128 px ("unit pixels", scaled by size/128): 0.7-2.5 px/frame for
slides, rotation edges, bounces and orbits, capped so a whole video's trajectory stays in frame;
grow/shrink change the radius by 0.2-0.5 px/frame. Every video is a pure function of (seed, index).

Two difficulty knobs (`data.synthetic.*`): `zoom` magnifies the view (objects, motions and in-frame limits
scale together; 1 = the sizes above), and `appearance`: `random` draws a new background and new sprites
for every video, `shared` draws them once from the seed, so videos differ only in motion, placement and
size. A from-scratch ViT needs far fewer updates to learn the motion classes when the look is shared
(README, "The default run"), which is why the `mini` preset uses it; `random` is the harder set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mme.config import CHOICES
from mme.data.synthetic_render import Scene, SceneObject, make_background, make_sprite, render
from mme.data.video import VideoError, video_info
from mme.utils import atomic_path, write_json

CLASSES = ("slide_left", "slide_right", "slide_up", "slide_down", "rotate_cw", "rotate_ccw",
           "grow", "shrink", "approach", "separate", "bounce", "orbit")
# class -> (class whose scene is drawn, play it backwards?)
SCENE_OF = {name: (name, False) for name in CLASSES} | {
    "slide_right": ("slide_left", True), "slide_down": ("slide_up", True), "rotate_ccw": ("rotate_cw", True),
    "shrink": ("grow", True), "separate": ("approach", True)}

REF_SIZE = 128              # the unit-pixel reference frame size
SPEED = (0.7, 2.5)          # px/frame at REF_SIZE (slides, rotation edge, bounce, orbit)
RADIUS = (7.0, 22.0)        # object radius range at REF_SIZE (grow/shrink span it)
GROW_RATE = (0.2, 0.5)      # radius change, px/frame at REF_SIZE
MAX_SPIN = 0.12             # rad/frame; keeps a stride-3 clip's steps below the shapes' symmetry angles
IN_FRAME = 0.75             # object centres stay at least IN_FRAME * radius inside the frame
BOUNCE_HEIGHT = (12.0, 30.0)  # hop height, px at REF_SIZE
BOUNCE_PERIOD = (12.0, 40.0)  # frames between two floor contacts
BOUNCE_DRIFT = 0.3          # max sideways drift of a bounce, px/frame at REF_SIZE
ORBIT_RING = (12.0, 34.0)   # orbit radius, px at REF_SIZE
MAX_ORBIT_SPIN = 0.15       # rad/frame
PAN_SPEED = (0.05, 0.25)    # camera pan, px/frame at REF_SIZE
JITTER = (0.3, 1.2)         # distractor shake amplitude, px at REF_SIZE
APPEARANCES = CHOICES["data.synthetic.appearance"]  # one list, validated by the config too
# SyntheticConfig fields that do not change any video (video i depends only on the seed, i and the rest).
NOT_IN_META = ("num_videos", "workers", "val_videos", "test_videos")


# ---------------------------------------------------------------- motion (unit pixels; scaled by size/128)

def _box(rng: np.random.Generator, size: float, radius: float) -> float:
    """A coordinate uniform over the positions that keep an object of `radius` in frame."""
    return float(rng.uniform(IN_FRAME * radius, size - IN_FRAME * radius))


def _grow_track(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """(F,) radius growing linearly inside RADIUS at a rate in GROW_RATE (capped to fit the video)."""
    tau = np.arange(num_frames) - (num_frames - 1) / 2
    span = max(num_frames - 1, 1)
    high = min(GROW_RATE[1], (RADIUS[1] - RADIUS[0]) / span)
    rate = rng.uniform(min(GROW_RATE[0], high), high)
    half = rate * span / 2
    middle = rng.uniform(RADIUS[0] + half, RADIUS[1] - half)
    return middle + rate * tau


def _marginal_radius(rng: np.random.Generator, num_frames: int) -> float:
    """A radius drawn from the time-marginal of grow videos (so size alone does not reveal grow/shrink)."""
    return float(_grow_track(rng, num_frames)[rng.integers(num_frames)])


def _speed(rng: np.random.Generator, room: float, num_frames: int, low: float = SPEED[0]) -> float:
    """A speed in [low, SPEED[1]], capped so `num_frames-1` frames travel at most `room`."""
    high = min(SPEED[1], room / max(num_frames - 1, 1))
    return float(rng.uniform(min(low, high), high))


def _slide(rng, num_frames, size, vertical):  # the motion makers work in unit pixels (size = REF_SIZE)
    """Actor moving left (or up) at constant speed across the frame."""
    radius = _marginal_radius(rng, num_frames)
    room = size - 2 * IN_FRAME * radius
    speed = _speed(rng, room, num_frames)
    half = speed * (num_frames - 1) / 2
    along = rng.uniform(IN_FRAME * radius + half, size - IN_FRAME * radius - half)
    tau = np.arange(num_frames) - (num_frames - 1) / 2
    moving = along - speed * tau
    across = np.full(num_frames, _box(rng, size, radius))
    x, y = (across, moving) if vertical else (moving, across)
    return [(x, y, np.full(num_frames, rng.uniform(0, 360)), np.full(num_frames, radius))]


def _rotate(rng, num_frames, size):
    """Actor spinning clockwise in place; its edge moves at SPEED."""
    radius = _marginal_radius(rng, num_frames)
    spin = min(MAX_SPIN, rng.uniform(*SPEED) / radius)
    angle = rng.uniform(0, 360) + np.degrees(spin) * np.arange(num_frames)
    x, y = np.full(num_frames, _box(rng, size, radius)), np.full(num_frames, _box(rng, size, radius))
    return [(x, y, angle, np.full(num_frames, radius))]


def _grow(rng, num_frames, size):
    """Actor growing in place."""
    radius = _grow_track(rng, num_frames)
    x, y = np.full(num_frames, _box(rng, size, radius[-1])), np.full(num_frames, _box(rng, size, radius[-1]))
    return [(x, y, np.full(num_frames, rng.uniform(0, 360)), radius)]


def _approach(rng, num_frames, size):
    """Actor and a partner moving towards each other along a random direction until they nearly touch."""
    r_a, r_b = _marginal_radius(rng, num_frames), _marginal_radius(rng, num_frames)
    near, far = 0.9 * (r_a + r_b), 0.8 * size
    closing = 2 * _speed(rng, (far - near) / 2, num_frames, low=SPEED[0] / 1.4)
    tau = np.arange(num_frames) - (num_frames - 1) / 2
    gap_mid = rng.uniform(near + closing * (num_frames - 1) / 2, max(far - closing * (num_frames - 1) / 2,
                                                                      near + closing * (num_frames - 1) / 2))
    gap = gap_mid - closing * tau
    theta = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(theta), np.sin(theta)])
    reach = np.abs(direction) * gap.max() / 2 + IN_FRAME * max(r_a, r_b)
    centre = np.array([rng.uniform(min(reach[0], size / 2), max(size - reach[0], size / 2)),
                       rng.uniform(min(reach[1], size / 2), max(size - reach[1], size / 2))])
    a = centre[:, None] - direction[:, None] * gap / 2
    b = centre[:, None] + direction[:, None] * gap / 2
    angles = rng.uniform(0, 360, size=2)
    return [(a[0], a[1], np.full(num_frames, angles[0]), np.full(num_frames, r_a)),
            (b[0], b[1], np.full(num_frames, angles[1]), np.full(num_frames, r_b))]


def _bounce(rng, num_frames, size):
    """Actor hopping on a floor (|sin| arcs: sharp reversal at the floor), with a slow random drift.

    The top vertical speed pi*height/period lies in SPEED; the drift direction is random, so a bounce
    played backwards is again a bounce.
    """
    radius = _marginal_radius(rng, num_frames)
    height = rng.uniform(*BOUNCE_HEIGHT)
    fastest, slowest = np.pi * height / SPEED[1], np.pi * height / SPEED[0]
    period = rng.uniform(max(BOUNCE_PERIOD[0], fastest), max(BOUNCE_PERIOD[0], min(BOUNCE_PERIOD[1], slowest)))
    t = np.arange(num_frames)
    floor = rng.uniform(min(IN_FRAME * radius + height, size / 2), size - IN_FRAME * radius)
    y = floor - height * np.abs(np.sin(np.pi * (t + rng.uniform(0, period)) / period))
    drift = rng.uniform(-BOUNCE_DRIFT, BOUNCE_DRIFT)
    reach = IN_FRAME * radius + abs(drift) * num_frames / 2
    x = rng.uniform(min(reach, size / 2), max(size - reach, size / 2)) + drift * (t - (num_frames - 1) / 2)
    return [(x, y, np.full(num_frames, rng.uniform(0, 360)), np.full(num_frames, radius))]


def _orbit(rng, num_frames, size):
    """Actor travelling on a circle at a speed in SPEED, clockwise or counter-clockwise."""
    radius = _marginal_radius(rng, num_frames)
    ring = rng.uniform(*ORBIT_RING)
    spin = min(MAX_ORBIT_SPIN, rng.uniform(*SPEED) / ring) * rng.choice([-1.0, 1.0])
    phase = rng.uniform(0, 2 * np.pi) + spin * np.arange(num_frames)
    reach = ring + IN_FRAME * radius
    cx, cy = (rng.uniform(min(reach, size / 2), max(size - reach, size / 2)) for _ in range(2))
    return [(cx + ring * np.cos(phase), cy + ring * np.sin(phase), np.full(num_frames, rng.uniform(0, 360)),
             np.full(num_frames, radius))]


def actor_tracks(scene_class: str, rng: np.random.Generator, num_frames: int, size: int,
                 zoom: float = 1.0) -> list[tuple]:
    """Per-frame (x, y, angle, radius) arrays of the moving object(s) of a scene class, in frame pixels.

    `zoom` magnifies the view: the frame spans REF_SIZE/zoom unit pixels, so objects, their motions and
    the in-frame constraints all scale together (speeds stay capped so trajectories stay in frame).
    """
    world = REF_SIZE / zoom
    scale = size / world
    makers = {
        "slide_left": lambda: _slide(rng, num_frames, world, vertical=False),
        "slide_up": lambda: _slide(rng, num_frames, world, vertical=True),
        "rotate_cw": lambda: _rotate(rng, num_frames, world),
        "grow": lambda: _grow(rng, num_frames, world),
        "approach": lambda: _approach(rng, num_frames, world),
        "bounce": lambda: _bounce(rng, num_frames, world),
        "orbit": lambda: _orbit(rng, num_frames, world),
    }
    tracks = makers[scene_class]()
    return [(x * scale, y * scale, angle, radius * scale) for x, y, angle, radius in tracks]


def _distractor_track(rng: np.random.Generator, num_frames: int, size: int, zoom: float = 1.0) -> tuple:
    """A static object, or (half the time) one shaking in place with a smooth random jitter."""
    scale = size * zoom / REF_SIZE
    radius = _marginal_radius(rng, num_frames) * scale
    x, y = _box(rng, size, radius), _box(rng, size, radius)
    t = np.arange(num_frames)
    offsets = np.zeros((2, num_frames))
    if rng.random() < 0.5:
        amplitude = rng.uniform(*JITTER) * scale
        for axis in range(2):
            period = rng.uniform(4, 12, size=2)
            phase = rng.uniform(0, 2 * np.pi, size=2)
            offsets[axis] = amplitude / 2 * (np.sin(2 * np.pi * t / period[0] + phase[0]) +
                                             np.sin(2 * np.pi * t / period[1] + phase[1]))
    return x + offsets[0], y + offsets[1], np.full(num_frames, rng.uniform(0, 360)), np.full(num_frames, radius)


def appearance_rng(seed: int, part: int) -> np.random.Generator:
    """The generator of a shared-appearance item (0: background, i >= 1: the i-th object's sprite)."""
    return np.random.default_rng([int(seed), 0x5EED, int(part)])


def build_scene(label: int, rng: np.random.Generator, num_frames: int, size: int, distractors: int,
                camera_pan: bool, zoom: float = 1.0, shared_seed: int | None = None) -> Scene:
    """The full scene of one video of class CLASSES[label] (time-reversed partners already reversed).

    `zoom` magnifies objects and motions (see `actor_tracks`). `shared_seed` None: every video draws its
    own background and sprites; an int: the background and the sprite of each object slot (actor,
    partner/distractors) come from that seed, the same in every video, so videos differ only in motion,
    placement and size (the `appearance: shared` dataset).
    """
    scene_class, backwards = SCENE_OF[CLASSES[label]]
    scale = size * zoom / REF_SIZE
    pan_speed = rng.uniform(*PAN_SPEED) * scale if camera_pan else 0.0
    pan_angle = rng.uniform(0, 2 * np.pi)
    tau = np.arange(num_frames) - (num_frames - 1) / 2
    camera = (pan_speed * tau[:, None] * np.array([np.cos(pan_angle), np.sin(pan_angle)])).astype(np.float32)
    pad = int(math.ceil(np.abs(camera).max())) + 2
    background = make_background(rng if shared_seed is None else appearance_rng(shared_seed, 0), size, pad)
    tracks = actor_tracks(scene_class, rng, num_frames, size, zoom)
    # approach/separate's partner stands in for one distractor, so every class shows as many objects
    extra = max(distractors - (len(tracks) - 1), 0)
    tracks += [_distractor_track(rng, num_frames, size, zoom) for _ in range(extra)]
    objects = []
    for slot, (x, y, angle, radius) in enumerate(tracks, start=1):
        base = float(np.max(radius))
        states = np.stack([x, y, angle, radius], 1).astype(np.float32)
        sprite_rng = rng if shared_seed is None else appearance_rng(shared_seed, slot)
        objects.append(SceneObject(make_sprite(sprite_rng, base), base, states))
    order = rng.permutation(len(objects))  # random depth order: the actor is not always on top
    scene = Scene(background, pad, camera, [objects[i] for i in order])
    return scene.reversed() if backwards else scene


def video_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of video `index`: independent of worker count and order."""
    return np.random.default_rng([int(seed), int(index)])


def label_of(index: int) -> int:
    """Class of video `index` (round robin, so every class has the same count +-1)."""
    return index % len(CLASSES)


def make_video(index: int, num_frames: int, size: int, distractors: int, camera_pan: bool, seed: int,
               zoom: float = 1.0, appearance: str = "random") -> np.ndarray:
    """uint8 (F, S, S, 3) RGB frames of video `index` (class `label_of(index)`).

    appearance 'random': each video draws its own background and sprites; 'shared': all videos of the seed
    share them (see `build_scene`).
    """
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance must be one of {APPEARANCES}, got {appearance!r}")
    rng = video_rng(seed, index)
    scene = build_scene(label_of(index), rng, num_frames, size, distractors, camera_pan, zoom,
                        shared_seed=seed if appearance == "shared" else None)
    return render(scene, size)


# ---------------------------------------------------------------- files

GENERATOR_VERSION = 1  # bump whenever a change to this module or synthetic_render changes a video's pixels
META_FILE = "meta.json"


def write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write RGB frames (F, H, W, 3) as an 'mp4v' MP4, atomically (temp name, then rename)."""
    height, width = frames.shape[1:3]
    with atomic_path(path, suffix=".tmp.mp4") as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write {path} with the mp4v codec (is opencv built with FFmpeg?)")
        try:
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        if tmp.stat().st_size == 0:
            raise OSError(f"OpenCV wrote an empty file for {path}")


def _is_complete(path: Path, num_frames: int, size: int) -> bool:
    """True when `path` is a readable video of the expected length and size."""
    if not path.is_file():
        return False
    try:
        info = video_info(path)
    except VideoError:
        return False
    return (info.num_frames, info.height, info.width) == (num_frames, size, size)


def _make_one(task: tuple) -> tuple[int, bool]:
    """Worker: generate video `index` unless a complete one exists; returns (index, written)."""
    index, path, cfg, seed = task
    if _is_complete(path, cfg.num_frames, cfg.size):
        return index, False
    frames = make_video(index, cfg.num_frames, cfg.size, cfg.distractors, cfg.camera_pan, seed, cfg.zoom,
                        cfg.appearance)
    write_mp4(path, frames, cfg.fps)
    if not _is_complete(path, cfg.num_frames, cfg.size):  # every generated video must decode (decord first)
        path.unlink()
        raise OSError(f"generated video {path} does not read back with {cfg.num_frames} frames of {cfg.size} px")
    return index, True


def _init_worker() -> None:
    cv2.setNumThreads(1)


def video_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "videos" / f"{index:06d}.mp4"


def _clean_stale(out_dir: Path, num_videos: int) -> int:
    """Delete temp files of interrupted runs and videos beyond `num_videos`; returns how many were removed."""
    videos = Path(out_dir) / "videos"
    removed = 0
    for path in videos.glob("*"):
        stale = path.name.startswith(".") or not path.stem.isdigit() or int(path.stem) >= num_videos
        if path.is_file() and stale:
            path.unlink()
            removed += 1
    return removed


def generate(out_dir: str | Path, cfg, seed: int, progress: bool = True) -> list[tuple[Path, int]]:
    """Generate (or complete) the dataset under `out_dir`; returns `(video path, label)` for every video."""
    return generate_counted(out_dir, cfg, seed, progress)[0]


def generate_counted(out_dir: str | Path, cfg, seed: int, progress: bool = True) -> tuple[list[tuple[Path, int]], int]:
    """`generate`, also returning how many videos were written (the rest were complete already).

    Args:
        out_dir: dataset root (`data/raw/synthetic`); videos go to `out_dir/videos/NNNNNN.mp4`.
        cfg: `SyntheticConfig` (num_videos, num_frames, size, fps, distractors, camera_pan, zoom, appearance,
            workers).
        seed: the config seed; video i depends only on (seed, i).
        progress: show a tqdm bar.
    Existing complete videos are kept when `out_dir/meta.json` records the same parameters (the count
    aside: video i does not depend on it), so an interrupted run resumes and a larger set only adds
    videos; when the parameters differ every old video is deleted first.
    """
    out_dir = Path(out_dir)
    videos = out_dir / "videos"
    meta = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "classes": list(CLASSES),
            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_IN_META}}
    meta_path = out_dir / META_FILE
    if not (meta_path.is_file() and json.loads(meta_path.read_text()) == meta):
        shutil.rmtree(videos, ignore_errors=True)  # made with other parameters: none of it may be reused
        write_json(meta_path, meta)
    videos.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir, cfg.num_videos)
    tasks = [(i, video_path(out_dir, i), cfg, seed) for i in range(cfg.num_videos)]
    written = 0
    with tqdm(total=len(tasks), desc="synthetic videos", unit="video", disable=not progress) as bar:
        if cfg.workers > 1 and len(tasks) > 1:
            with mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker) as pool:
                for _, made in pool.imap_unordered(_make_one, tasks, chunksize=4):
                    written += made
                    bar.update()
        else:
            for task in tasks:
                written += _make_one(task)[1]
                bar.update()
    return [(video_path(out_dir, i), label_of(i)) for i in range(cfg.num_videos)], written
