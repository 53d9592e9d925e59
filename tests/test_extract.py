"""The extract stage: broken videos are named and skipped, caches are reused or redone, runs resume after a
kill, shards split the list exactly, and the cached flow is the flow of the frames the datasets decode."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from mme.config import load_config
from mme.data.lists import write_list
from mme.data.video import read_frames
from mme.motion.cache import FLOW_SCALE, flow_cache_path, is_valid_cache, load_flow
from mme.motion.flow import compute_flow
from mme.paths import Paths
from mme.stages import extract
from mme.utils import read_metrics

DATASET = "synthetic"
RAW = f"data/raw/{DATASET}/videos"


def write_video(path: Path, num_frames: int, seed: int, height: int = 72, width: int = 96) -> None:
    """An mp4v video of a smooth colour texture panning by (2, 1) px per frame."""
    noise = np.random.default_rng(seed).random((height + 2 * num_frames, width + 2 * num_frames, 3))
    texture = cv2.normalize(cv2.GaussianBlur(noise.astype(np.float32), (0, 0), 2.0), None, 0, 255,
                            cv2.NORM_MINMAX).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (width, height))
    for t in range(num_frames):
        writer.write(texture[t:t + height, 2 * t:2 * t + width])
    writer.release()


def make_dataset(workdir: Path, num_good: int, num_frames: int = 16, broken: bool = True, **size) -> list[str]:
    """Good videos v0..v{n-1}, optionally a garbage file and an empty one, all in the training list (the
    split `mme extract` makes flow for), with one listed twice; val and test list some of them again.
    Returns the distinct list paths in list order."""
    good = [f"{RAW}/v{i}.mp4" for i in range(num_good)]
    for i, rel in enumerate(good):
        write_video(workdir / rel, num_frames, seed=i, **size)
    bad = []
    if broken:
        bad = [f"{RAW}/broken.mp4", f"{RAW}/empty.mp4"]
        (workdir / RAW).mkdir(parents=True, exist_ok=True)
        (workdir / bad[0]).write_bytes(np.random.default_rng(0).bytes(5000))
        (workdir / bad[1]).write_bytes(b"")
    videos = good + bad
    lists = Paths(workdir)
    thirds = [videos + videos[:1], videos[1::3], videos[2::3]]  # v0 listed twice: extracted once
    for split, rows in zip(extract.SPLITS, thirds):
        write_list(lists.list_file(DATASET, split), [(rel, 0) for rel in rows])
    return list(videos)


def caches(workdir: Path) -> dict[str, Path]:
    flow_dir = Paths(workdir).flow_dir(DATASET)
    return {p.relative_to(flow_dir).as_posix(): p for p in flow_dir.rglob("*.npz") if not p.name.startswith(".")}


def test_parse_shard():
    assert extract.parse_shard(None) == (0, 1)
    assert extract.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0", "1/2/3"):
        with pytest.raises(ValueError, match="i/N"):
            extract.parse_shard(bad)


def test_broken_videos_named_rest_extracted_then_reused_and_redone(tmp_path):
    videos = make_dataset(tmp_path, num_good=4)
    cfg = load_config("smoke")
    result = extract.run(cfg, tmp_path, workers=1)

    assert result["videos"] == 6 and result["extracted"] == 4 and result["reused"] == 0
    skipped = {item["video"]: item["reason"] for item in result["skipped"]}
    assert set(skipped) == {f"{RAW}/broken.mp4", f"{RAW}/empty.mp4"}
    assert all(Path(video).name in reason for video, reason in skipped.items())
    assert "empty" in skipped[f"{RAW}/empty.mp4"]
    skip_lines = Paths(tmp_path).skipped_file.read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in skip_lines if line.startswith("extract\t")) == sorted(skipped)
    assert result["frame_pairs"] == result["extracted_pairs"] == 4 * 15
    assert result["bytes_on_disk"] == sum(p.stat().st_size for p in caches(tmp_path).values())
    assert result["float32_bytes"] == 4 * 15 * 64 * 85 * 2 * 4  # 72x96 resized to short side 64
    on_disk = read_metrics(Paths(tmp_path).metrics_dir / "extract.json")
    assert on_disk == json.loads(json.dumps(result))

    # The cache holds the flow of exactly the frames the datasets decode (same call, same geometry).
    rel = videos[0]
    frames = read_frames(tmp_path / rel, range(16), short_side=cfg.data.short_side)
    stored = load_flow(flow_cache_path(tmp_path, DATASET, rel))
    assert stored.shape == (15, *frames.shape[1:3], 2)
    assert stored.meta["backend"] == "dis" and stored.meta["short_side"] == 64 and stored.meta["source"] == rel
    expected = compute_flow(frames, "dis")
    assert np.abs(stored.window(0, 15) - expected).max() <= 0.5 / FLOW_SCALE + 1e-6
    assert np.median(stored.window(0, 15)[..., 0]) < -1.0  # texture pans left in the view: the flow says so

    again = extract.run(cfg, tmp_path, workers=1)
    assert (again["extracted"], again["reused"], again["num_skipped"]) == (0, 4, 2)

    victim = flow_cache_path(tmp_path, DATASET, videos[1])
    victim.write_bytes(victim.read_bytes()[:1000])
    repaired = extract.run(cfg, tmp_path, workers=1)
    assert (repaired["extracted"], repaired["reused"], repaired["redone"]) == (1, 3, [videos[1]])
    assert is_valid_cache(victim)

    # Other settings redo every cache; a video that broke meanwhile loses its now-stale cache.
    (tmp_path / videos[2]).write_bytes(b"\x00" * 4096)
    other_backend = extract.run(load_config("smoke", ["flow.backend=farneback"]), tmp_path, workers=1)
    assert other_backend["extracted"] == 3 and len(other_backend["redone"]) == 3
    assert videos[2] in {item["video"] for item in other_backend["skipped"]}
    assert not flow_cache_path(tmp_path, DATASET, videos[2]).exists()
    assert load_flow(victim).meta["backend"] == "farneback"


def test_nothing_extractable_fails_and_lists_why(tmp_path):
    make_dataset(tmp_path, num_good=0)
    with pytest.raises(extract.ExtractError, match="no flow could be extracted"):
        extract.run(load_config("smoke"), tmp_path, workers=1)
    metrics = json.loads((Paths(tmp_path).metrics_dir / "extract.json").read_text())
    assert metrics["num_skipped"] == 2 and metrics["extracted"] == 0
    assert "broken.mp4" in Paths(tmp_path).skipped_file.read_text()


def test_missing_lists_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="mme download --dataset synthetic"):
        extract.run(load_config("smoke"), tmp_path, workers=1)


def test_shards_cover_the_list_exactly_once(tmp_path):
    videos = make_dataset(tmp_path, num_good=5, num_frames=6, broken=False)
    cfg = load_config("smoke")
    first = extract.run(cfg, tmp_path, workers=1, shard="0/2")
    after_first = set(caches(tmp_path))
    second = extract.run(cfg, tmp_path, workers=1, shard="1/2")
    after_second = set(caches(tmp_path))

    assert first["extracted"] + second["extracted"] == len(videos)
    assert second["reused"] == 0  # the second shard touched none of the first shard's videos
    assert after_second == {flow_cache_path(tmp_path, DATASET, rel).relative_to(
        Paths(tmp_path).flow_dir(DATASET)).as_posix() for rel in videos}
    assert len(after_first) == first["extracted"] == 3  # every 2nd video from the 0th of 5
    for i in (0, 1):
        assert (Paths(tmp_path).metrics_dir / f"extract-shard-{i}-of-2.json").is_file()


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    """Kill `mme extract` (SIGKILL) once its first cache exists; a second run finishes the job, and every
    cache equals the one an uninterrupted run (here with a 2-process pool) writes."""
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    videos = make_dataset(killed, num_good=8, num_frames=40, broken=False, height=120, width=160)
    shutil.copytree(killed / "data", uninterrupted / "data")
    overrides = ["data.short_side=120", "flow.backend=farneback"]
    command = [sys.executable, "-m", "mme", "extract", "--preset", "smoke", "--workdir", str(killed),
               "--workers", "1"] + [arg for item in overrides for arg in ("--set", item)]
    process = subprocess.Popen(command, cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not caches(killed) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    still_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert still_running, f"the stage ended before it could be killed:\n{stderr[-2000:]}"
    partial = set(caches(killed))
    assert 1 <= len(partial) < len(videos)

    cfg = load_config("smoke", overrides)
    resumed = extract.run(cfg, killed, workers=1)
    assert resumed["reused"] == len(partial) and resumed["extracted"] == len(videos) - len(partial)
    reference = extract.run(cfg, uninterrupted, workers=2)
    assert reference["extracted"] == len(videos)
    assert set(caches(killed)) == set(caches(uninterrupted)) and len(caches(killed)) == len(videos)
    for name, path in caches(killed).items():
        assert is_valid_cache(path)
        stored, expected = load_flow(path), load_flow(caches(uninterrupted)[name])
        np.testing.assert_array_equal(stored.window(0, stored.num_pairs), expected.window(0, expected.num_pairs))
    leftovers = [p for p in Paths(killed).flow_dir(DATASET).rglob("*") if p.name.startswith(".")]
    assert leftovers == []
