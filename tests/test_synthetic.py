"""The generated motion dataset: determinism, time-reversed partners, class motions, files, and
proof that the class needs motion (single frames are near chance, simple motion features are not)."""

from __future__ import annotations

import dataclasses
import hashlib

import cv2
import numpy as np
import pytest

from mme.config import SyntheticConfig
from mme.data import synthetic
from mme.data.synthetic import (
    CLASSES,
    actor_tracks,
    build_scene,
    generate_counted,
    make_video,
    render,
    video_rng,
    write_mp4,
)
from mme.data.video import read_frames, video_info

PAIRS = [("slide_left", "slide_right"), ("slide_up", "slide_down"), ("rotate_cw", "rotate_ccw"),
         ("grow", "shrink"), ("approach", "separate")]


def test_video_is_a_pure_function_of_seed_and_index():
    a = make_video(5, 16, 64, 2, True, seed=1)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, make_video(5, 16, 64, 2, True, seed=1))
    assert not np.array_equal(a, make_video(5, 16, 64, 2, True, seed=2))
    assert a.std() > 10  # textured, not flat


def test_a_mini_video_is_written_and_decoded_to_exactly_the_bytes_the_lock_was_made_with(tmp_path):
    """dvc.lock's dataset hashes and every stored result (reports/results/) were made from these bytes. OpenCV
    5.1.0 writes other mp4v bytes for the same frames, which decode to other pixels in 26 of the first 40
    `mini` videos (mean |Δ| up to 0.06 grey levels): another dataset, so other trained numbers. The pin of
    opencv-contrib-python-headless in pyproject.toml keeps it; this fails when a library changes either."""
    path = tmp_path / "000016.mp4"
    write_mp4(path, make_video(16, 48, 128, 0, False, seed=0, zoom=1.6, appearance="shared"), 25.0)
    assert hashlib.sha1(path.read_bytes()).hexdigest() == "8e2ed4d13e17e5b11490a813b7151a86ca8d1c8d"
    pixels = np.ascontiguousarray(read_frames(path, range(48))).tobytes()
    assert hashlib.sha1(pixels).hexdigest() == "a153e37bbb1ffcb2f35a40b9c093bc3a41657f9d"


@pytest.mark.parametrize("forward,backward", PAIRS)
def test_partner_class_is_the_same_scene_played_backwards(forward, backward):
    for index in range(3):
        fwd = build_scene(CLASSES.index(forward), video_rng(0, index), 20, 64, 2, True)
        bwd = build_scene(CLASSES.index(backward), video_rng(0, index), 20, 64, 2, True)
        np.testing.assert_array_equal(render(bwd, 64), render(fwd, 64)[::-1])


def _speeds(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.hypot(np.diff(x), np.diff(y))


@pytest.mark.parametrize("size", [64, 128])
def test_actor_motion_matches_the_class(size):
    scale = size / 128
    low, high = 0.7 * scale - 1e-6, 2.5 * scale + 1e-6
    for seed in range(8):
        rng = np.random.default_rng(seed)
        (x, y, _, r), = actor_tracks("slide_left", rng, 64, size)
        assert (np.diff(x) < 0).all() and np.allclose(np.diff(y), 0) and low <= -np.diff(x)[0] <= high
        (x, y, _, r), = actor_tracks("slide_up", rng, 64, size)
        assert (np.diff(y) < 0).all() and np.allclose(np.diff(x), 0)
        (x, y, angle, r), = actor_tracks("rotate_cw", rng, 64, size)
        assert (np.diff(angle) > 0).all() and np.allclose(np.diff(x), 0)
        assert np.radians(np.diff(angle)[0]) * r[0] <= high
        (x, y, _, r), = actor_tracks("grow", rng, 64, size)
        assert (np.diff(r) > 0).all() and np.allclose(np.diff(x), 0)
        (xa, ya, _, ra), (xb, yb, _, rb) = actor_tracks("approach", rng, 64, size)
        gap = np.hypot(xa - xb, ya - yb)
        assert (np.diff(gap) < 0).all() and gap[-1] >= 0.9 * (ra[0] + rb[0]) - 1e-6
        (x, y, _, r), = actor_tracks("bounce", rng, 64, size)
        vy = np.diff(y)
        assert (vy[:-1] * vy[1:] < 0).any() and _speeds(x, y).max() <= high * 1.01
        (x, y, _, r), = actor_tracks("orbit", rng, 64, size)
        centre = np.array([x.max() + x.min(), y.max() + y.min()]) / 2
        assert np.ptp(_speeds(x, y)) < 1e-6 and _speeds(x, y)[0] <= high
        assert np.hypot(x - centre[0], y - centre[1]).std() < 0.05 * size
        for cls in ("slide_left", "slide_up", "rotate_cw", "grow", "bounce", "orbit"):
            (x, y, _, r), = actor_tracks(cls, rng, 64, size)
            assert (x >= 0).all() and (x <= size).all() and (y >= 0).all() and (y <= size).all(), cls


def test_zoom_magnifies_objects_and_keeps_them_in_frame():
    for seed in range(6):
        (_, _, _, r1), = actor_tracks("grow", np.random.default_rng(seed), 48, 128)
        (x, y, _, r2), = actor_tracks("grow", np.random.default_rng(seed), 48, 128, zoom=2.0)
        np.testing.assert_allclose(r2, 2 * r1, rtol=1e-6)  # same draw, twice the size on screen
        for cls in ("slide_left", "slide_up", "rotate_cw", "grow", "bounce"):
            (x, y, _, r), = actor_tracks(cls, np.random.default_rng(seed), 48, 128, zoom=2.0)
            reach = 0.75 * r - 1e-6  # centres keep IN_FRAME * radius from the border, as at zoom 1
            assert (x >= reach).all() and (x <= 128 - reach).all() and (y >= reach).all() and (y <= 128 - reach).all()
        (x, _, _, _), = actor_tracks("slide_left", np.random.default_rng(seed), 48, 128, zoom=2.0)
        assert (np.diff(x) < 0).all() and -np.diff(x)[0] <= 2 * 2.5 + 1e-6


def test_shared_appearance_gives_every_video_the_same_look():
    def scene(index, appearance):
        seed = 3
        return build_scene(synthetic.label_of(index), video_rng(seed, index), 12, 64, 1, False,
                           shared_seed=seed if appearance == "shared" else None)

    shared = [scene(i, "shared") for i in (0, 5, 9)]
    for other in shared[1:]:
        np.testing.assert_array_equal(other.background, shared[0].background)
    own = [scene(i, "random") for i in (0, 5)]
    assert not np.array_equal(own[0].background, own[1].background)
    # the same seed still gives different motions: the videos are not copies
    assert not np.array_equal(render(shared[0], 64), render(shared[1], 64))
    with pytest.raises(ValueError, match="appearance"):
        make_video(0, 4, 32, 0, False, 0, appearance="fixed")


def _config(**changes) -> SyntheticConfig:
    return dataclasses.replace(SyntheticConfig(num_videos=14, num_frames=12, size=32, workers=1), **changes)


def test_generate_writes_decodable_videos_and_resumes(tmp_path):
    cfg = _config()
    rows, written = generate_counted(tmp_path, cfg, seed=0, progress=False)
    assert written == 14 and [label for _, label in rows] == [i % 12 for i in range(14)]
    for path, _ in rows:
        info = video_info(path)
        assert (info.num_frames, info.height, info.width) == (12, 32, 32)
    frames = read_frames(rows[3][0], range(12))
    assert np.abs(frames.astype(int) - make_video(3, 12, 32, 2, True, 0).astype(int)).mean() < 6  # lossy mp4v
    assert generate_counted(tmp_path, cfg, seed=0, progress=False)[1] == 0
    rows[2][0].write_bytes(rows[2][0].read_bytes()[:300])  # a half-written video is not trusted
    (tmp_path / "videos" / ".000005.mp4.abc.tmp.mp4").write_bytes(b"partial")
    assert generate_counted(tmp_path, cfg, seed=0, progress=False)[1] == 1
    assert not list((tmp_path / "videos").glob(".*"))
    assert generate_counted(tmp_path, _config(num_videos=12), seed=0, progress=False)[1] == 0  # fewer: trimmed
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 12
    assert generate_counted(tmp_path, _config(num_videos=12), seed=1, progress=False)[1] == 12  # new seed: all new
    assert not np.array_equal(read_frames(rows[3][0], [0]), frames[:1])


def test_parallel_generation_gives_the_same_files(tmp_path):
    serial = generate_counted(tmp_path / "a", _config(num_videos=6), seed=4, progress=False)[0]
    parallel = generate_counted(tmp_path / "b", _config(num_videos=6, workers=2), seed=4, progress=False)[0]
    for (a, _), (b, _) in zip(serial, parallel):
        assert a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------- the dataset needs motion

def _frame_features(video: np.ndarray) -> np.ndarray:
    """Middle frame: 8x8 RGB thumbnail + 8-bin colour histograms."""
    frame = video[len(video) // 2].astype(np.float32)
    thumb = cv2.resize(frame, (8, 8), interpolation=cv2.INTER_AREA).reshape(-1) / 255
    hist = np.concatenate([np.histogram(frame[..., c], 8, (0, 256))[0] for c in range(3)]) / frame[..., 0].size
    return np.concatenate([thumb, hist])


def _motion_features(video: np.ndarray) -> np.ndarray:
    """Farneback flow minus its median (camera), then per frame: motion-weighted mean velocity, divergence,
    curl and spread about the moving region's centroid; summarised over time (mean, std, turning)."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video]
    yy, xx = np.mgrid[0:gray[0].shape[0], 0:gray[0].shape[1]].astype(np.float32)
    per_frame = []
    for a, b in zip(gray[:-1:2], gray[1::2]):  # every other frame pair: half the cost, same information
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        flow -= np.median(flow.reshape(-1, 2), 0)
        weight = np.maximum(np.hypot(flow[..., 0], flow[..., 1]) - 0.2, 0)
        total = weight.sum() + 1e-6
        vx, vy = (weight * flow[..., 0]).sum() / total, (weight * flow[..., 1]).sum() / total
        dx, dy = xx - (weight * xx).sum() / total, yy - (weight * yy).sum() / total
        dist = np.hypot(dx, dy) + 1e-3
        div = (weight * (dx * flow[..., 0] + dy * flow[..., 1]) / dist).sum() / total
        curl = (weight * (dx * flow[..., 1] - dy * flow[..., 0]) / dist).sum() / total
        per_frame.append([vx, vy, div, curl, (weight * dist).sum() / total, total / weight.size])
    series = np.array(per_frame)
    v, lag = series[:, :2], 4
    cross = v[:-lag, 0] * v[lag:, 1] - v[:-lag, 1] * v[lag:, 0]
    dot = (v[:-lag] * v[lag:]).sum(1)
    turning = [cross.mean(), dot.mean(), np.abs(cross).mean(), *np.abs(v).mean(0)]
    return np.concatenate([series.mean(0), series.std(0), turning])


def _cross_validated_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5) -> float:
    """Ridge-regularised least-squares linear classifier (one-hot targets), k-fold accuracy."""
    hits = 0
    for fold in range(folds):
        test = np.arange(len(labels)) % folds == fold
        mean, std = features[~test].mean(0), features[~test].std(0) + 1e-6
        design = np.c_[(features[~test] - mean) / std, np.ones((~test).sum())]
        weights = np.linalg.solve(design.T @ design + np.eye(design.shape[1]),
                                  design.T @ np.eye(len(CLASSES))[labels[~test]])
        scores = np.c_[(features[test] - mean) / std, np.ones(test.sum())] @ weights
        hits += (scores.argmax(1) == labels[test]).sum()
    return hits / len(labels)


@pytest.mark.parametrize("appearance,zoom,distractors,pan", [("random", 1.0, 2, True), ("shared", 1.6, 0, False)])
def test_single_frames_are_near_chance_but_motion_classifies(appearance, zoom, distractors, pan):
    """Both looks: the harder default of the generator and the `mini` preset's shared, magnified one."""
    videos = [make_video(i, 32, 64, distractors, pan, 11, zoom, appearance) for i in range(12 * 10)]
    labels = np.array([synthetic.label_of(i) for i in range(len(videos))])
    frame_acc = _cross_validated_accuracy(np.array([_frame_features(v) for v in videos]), labels)
    motion_acc = _cross_validated_accuracy(np.array([_motion_features(v) for v in videos]), labels)
    assert frame_acc < 0.3, f"single-frame features reach {frame_acc:.2f} (chance 0.083)"
    assert motion_acc > 0.6, f"motion features reach only {motion_acc:.2f}"
