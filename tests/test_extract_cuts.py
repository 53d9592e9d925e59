"""`mme extract` records shot cuts (and with target.fb_check the backward flow) in the flow cache; a cache
written without cuts reads as unknown, warns once, and is redone by the stage."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mme.data.synthetic import make_video, write_mp4
from mme.data.video import read_frames
from mme.motion import cache
from mme.motion.cache import CacheError, cache_problem, expected_meta, load_flow, save_flow
from mme.motion.flow import compute_flow
from mme.motion.shots import SHOT_DETECTOR
from mme.stages.extract import FlowSettings, VideoJob, process_video

CUT = 13


@pytest.fixture(scope="module")
def cut_mp4(tmp_path_factory):
    first, second = make_video(0, 24, 64, 2, True, seed=0), make_video(5, 24, 64, 2, True, seed=0)
    frames = np.concatenate([first[:CUT], second[CUT:]])
    path = tmp_path_factory.mktemp("raw") / "cut.mp4"
    write_mp4(path, frames, 25)
    return path


def test_extract_stores_the_cut_and_backward_flow(cut_mp4, tmp_path):
    job = VideoJob("raw/cut.mp4", cut_mp4, tmp_path / "cut.npz")
    record = process_video(job, FlowSettings("dis", False, 64, backward=True))
    assert record["status"] == "extracted" and record["cuts"] == 1
    stored = load_flow(job.cache)
    assert stored.cuts == [CUT] and stored.meta["shot_detector"] == SHOT_DETECTOR
    assert stored.has_backward
    forward, backward = stored.window(0, stored.num_pairs), stored.window(0, stored.num_pairs, backward=True)
    assert forward.shape == backward.shape
    # Backward pair i is the flow from frame i+1 to frame i.
    frames = read_frames(cut_mp4, range(24), short_side=64)
    expected_back = compute_flow(np.ascontiguousarray(frames[[4, 3]]), "dis")[0]
    np.testing.assert_allclose(backward[3], expected_back, atol=0.5 / cache.FLOW_SCALE + 1e-6)
    # The same settings reuse it; without the backward need it is reused too; forward-only is redone for fb.
    assert process_video(job, FlowSettings("dis", False, 64, backward=True))["status"] == "reused"
    assert process_video(job, FlowSettings("dis", False, 64))["status"] == "reused"
    plain = VideoJob("raw/cut.mp4", cut_mp4, tmp_path / "plain.npz")
    assert process_video(plain, FlowSettings("dis", False, 64))["status"] == "extracted"
    assert not load_flow(plain.cache).has_backward
    with pytest.raises(CacheError, match="fb_check"):
        load_flow(plain.cache).window(0, 2, backward=True)
    redone = process_video(plain, FlowSettings("dis", False, 64, backward=True))
    assert redone["status"] == "extracted" and "backward" in redone["reason"]


def test_old_cache_without_cuts_is_unknown_warned_once_and_redone(cut_mp4, tmp_path, monkeypatch):
    old = tmp_path / "old.npz"
    save_flow(old, np.zeros((23, 64, 64, 2), np.float32), expected_meta("dis", False, 64))
    # The datasets' check (no detector asked) still takes it ...
    assert cache_problem(old, expected_meta("dis", False, 64)) is None
    monkeypatch.setattr(cache, "_WARNED_NO_CUTS", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_flow(old).cuts is None
        assert load_flow(old).cuts is None
    assert len(caught) == 1 and str(old) in str(caught[0].message) and "mme extract" in str(caught[0].message)
    # ... the stage redoes it.
    record = process_video(VideoJob("raw/cut.mp4", cut_mp4, old), FlowSettings("dis", False, 64))
    assert record["status"] == "extracted" and "shot_detector" in record["reason"]
    assert load_flow(old).cuts == [CUT]


def test_backward_flow_round_trip_and_deep_check(tmp_path):
    rng = np.random.default_rng(0)
    forward = rng.uniform(-5, 5, (20, 8, 8, 2)).astype(np.float32)
    backward = rng.uniform(-5, 5, (20, 8, 8, 2)).astype(np.float32)
    save_flow(tmp_path / "fb.npz", forward, {}, backward=backward)
    stored = load_flow(tmp_path / "fb.npz")
    assert np.abs(stored.window(3, 19, backward=True) - backward[3:19]).max() <= 0.5 / cache.FLOW_SCALE + 1e-6
    assert np.abs(stored.window(3, 19) - forward[3:19]).max() <= 0.5 / cache.FLOW_SCALE + 1e-6
    assert cache_problem(tmp_path / "fb.npz", {"backward": True}) is None
    save_flow(tmp_path / "f.npz", forward, {})
    assert cache_problem(tmp_path / "f.npz", {"backward": True}) == "backward is False, expected True"
    with pytest.raises(ValueError, match="backward flow"):
        save_flow(tmp_path / "bad.npz", forward, {}, backward=backward[:3])
