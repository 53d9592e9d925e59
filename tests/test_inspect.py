"""`mme inspect-targets`: the saved arrays (docs/interfaces.md), the figure, determinism, cache vs computed flow."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mme.config import load_config
from mme.data.lists import read_list
from mme.motion.tracking import patch_grid_points
from mme.paths import Paths
from mme.stages import inspect
from mme.targets import target_parts


@pytest.fixture
def video_rel(extracted_workdir) -> str:
    return read_list(Paths(extracted_workdir).list_file("synthetic", "train"))[0][0]


def load(path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return dict(archive)


def test_inspect_writes_the_documented_arrays_and_figure(tmp_path, extracted_workdir, video_rel):
    cfg = load_config("smoke")
    workdir = tmp_path / "work"
    shutil.copytree(extracted_workdir / "data", workdir / "data")
    result = inspect.run(cfg, workdir, video_rel, tmp_path / "a.npz")
    assert result["flow"].startswith("cache")
    arrays = load(tmp_path / "a.npz")
    t, size, k, length = cfg.data.num_frames, cfg.data.input_size, cfg.target.points_per_patch, cfg.target.length
    grid = size // cfg.model.patch_size
    assert arrays["frames"].shape == (t, size, size, 3) and arrays["frames"].dtype == np.uint8
    assert arrays["tracks"].shape == (t // 2, grid, grid, k, length + 1, 2) and arrays["tracks"].dtype == np.float32
    assert arrays["valid"].shape == (t // 2, grid, grid, k) and arrays["valid"].dtype == bool
    tokens = (t // 2) * grid * grid
    assert arrays["targets"].shape == (tokens, sum(target_parts(cfg).values()))
    assert arrays["targets"].dtype == np.float32 and arrays["mask"].shape == (tokens,)
    start = patch_grid_points(grid, grid, cfg.model.patch_size, k).view(grid, grid, k, 2).numpy()
    assert np.array_equal(arrays["tracks"][:, :, :, :, 0], np.broadcast_to(start, (t // 2, grid, grid, k, 2)))
    figure = Paths(workdir).figures_dir / "trajectories.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = inspect.run(cfg, workdir, video_rel, tmp_path / "b.npz")
    assert again["start_frame"] == result["start_frame"]
    for key, value in load(tmp_path / "b.npz").items():
        assert np.array_equal(value, arrays[key]), key

    # Without a cache the stage computes the same flow itself (the cache only adds 1/128 px quantisation).
    video = (extracted_workdir / video_rel).resolve()
    computed = inspect.run(cfg, tmp_path / "bare", video, tmp_path / "c.npz")
    assert computed["flow"].startswith("computed")
    recomputed = load(tmp_path / "c.npz")
    assert np.array_equal(recomputed["frames"], arrays["frames"])
    both = recomputed["valid"] & arrays["valid"]
    assert both.mean() > 0.5
    assert np.abs(recomputed["tracks"] - arrays["tracks"])[both].max() < 0.05


def test_inspect_names_a_missing_video(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        inspect.run(load_config("smoke"), tmp_path, "nothing.mp4", tmp_path / "x.npz")


def test_inspect_marks_trajectories_crossing_a_cut_invalid_and_draws_them_red(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from mme.data.synthetic import make_video, write_mp4
    from mme.motion.cache import flow_cache_path, load_flow
    from mme.motion.shots import crosses_cut
    from mme.stages.extract import FlowSettings, VideoJob, process_video
    from mme.targets import TargetGeometry

    cut, rel = 13, "data/raw/synthetic/cut.mp4"  # 24 frames: every clip window (17 frames) holds the cut
    video = tmp_path / rel
    video.parent.mkdir(parents=True)
    write_mp4(video, np.concatenate([make_video(0, 24, 64, 2, True, seed=0)[:cut],
                                     make_video(5, 24, 64, 2, True, seed=0)[cut:]]), 25)
    cache = flow_cache_path(tmp_path, "synthetic", rel)
    process_video(VideoJob(rel, video, cache), FlowSettings("dis", False, 64, backward=True))
    assert load_flow(cache).cuts == [cut]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read what was drawn
    cfg = load_config("smoke", ["data.avoid_cuts=false"])
    geo = TargetGeometry.from_cfg(cfg)
    result = inspect.run(cfg, tmp_path, rel, tmp_path / "cut.npz")
    assert result["cuts"] == [cut] and result["flow"].startswith("cache")
    arrays = load(tmp_path / "cut.npz")
    import torch

    crossing = crosses_cut([cut], result["start_frame"], torch.tensor(geo.slot_offsets), geo.length,
                           geo.track_step).numpy()
    assert crossing.any() and not crossing.all()
    assert not arrays["valid"][crossing].any()
    assert arrays["valid"][~crossing].mean() > 0.5
    tokens = arrays["target_valid"].reshape(geo.slots, -1)
    assert not tokens[crossing].any() and tokens[~crossing].any()
    # The figure: every invalid trajectory is a dotted red line, every valid one yellow.
    (figure,) = figures
    rows = np.array(figure.axes).reshape(3, geo.slots)
    for j in range(geo.slots):
        tracks = [line for line in rows[2, j].lines if line.get_linestyle() != "None"]  # not the end dots
        red = np.array([line.get_color() == "red" and line.get_linestyle() == ":" for line in tracks])
        assert np.array_equal(red, ~arrays["valid"][j].reshape(-1)), j
    assert all(rows[2, j].lines[0].get_color() == "red" for j in np.flatnonzero(crossing))

    # With target.fb_check the same clip also reads the cached backward flow (an error without it): the check
    # can only remove trajectories (on this rendered scene DIS is round-trip consistent almost everywhere).
    checked = inspect.run(load_config("smoke", ["data.avoid_cuts=false", "target.fb_check=true"]), tmp_path, rel,
                          tmp_path / "fb.npz")
    assert checked["start_frame"] == result["start_frame"] and checked["fb_check"]
    fb = load(tmp_path / "fb.npz")
    assert np.array_equal(fb["tracks"], arrays["tracks"])
    assert not (fb["valid"] & ~arrays["valid"]).any() and not fb["valid"][crossing].any()
