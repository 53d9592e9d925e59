"""Real-looking footage end to end: a `folder` tree of clips written by OpenCV with mixed sizes (1280x720,
640x272, 176x144, 160x120 and portrait 272x480), frame rates (12, 25, 30 fps), lengths (12 frames, shorter
than a smoke clip's span, up to 40), containers (mp4v .mp4, MJPG .avi), one hard shot cut and one corrupt
file, through `mme download -> extract -> pretrain -> finetune -> probe -> evaluate` on the smoke preset.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mme import cli
from mme.config import load_config
from mme.data.lists import read_classes, read_list, stratified_split
from mme.data.synthetic_render import smooth_texture
from mme.data.video import resized_shape, video_info
from mme.datasets import PretrainDataset, VideoClsDataset
from mme.motion.cache import flow_cache_path, load_flow
from mme.paths import Paths
from mme.targets import TargetGeometry
from mme.utils import read_metrics

pytestmark = pytest.mark.slow

SHORT_SIDE = 64  # the smoke preset's data.short_side
CUT = 20  # first frame of the second shot of the cut clip
SHORT = 12  # frames of the 1280x720 clips: fewer than the smoke clip span (15 + 2 target frames)
# class, file, (height, width), frames, fps, fourcc, camera velocity (x, y) in px/frame of the original size
CLIPS = [
    ("pan_right", "street_720p.mp4", (720, 1280), SHORT, 25, "mp4v", (6.0, 0.0)),
    ("pan_right", "letterbox.avi", (272, 640), 40, 30, "MJPG", (3.0, 0.0)),
    ("pan_right", "qcif.mp4", (144, 176), 24, 12, "mp4v", (1.5, 0.0)),
    ("pan_right", "portrait.mp4", (480, 272), 32, 25, "mp4v", (2.0, 0.0)),
    ("pan_right", "small.avi", (120, 160), 30, 25, "MJPG", (1.0, 0.0)),
    ("pan_down", "street_720p.mp4", (720, 1280), SHORT, 25, "mp4v", (0.0, 6.0)),
    ("pan_down", "qcif.avi", (144, 176), 24, 12, "MJPG", (0.0, 1.5)),
    ("pan_down", "portrait.mp4", (480, 272), 32, 30, "mp4v", (0.0, 2.0)),
    ("pan_down", "small.mp4", (120, 160), 30, 25, "mp4v", (0.0, 1.0)),
]
CUT_CLIP = ("pan_down", "cut.avi")
BROKEN = ("pan_right", "broken.mp4")


def _world(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    return np.clip(base + rng.uniform(80, 140) * (smooth_texture(rng, height, width) - 0.5), 0, 255)


def _pan(rng: np.random.Generator, num_frames: int, size: tuple[int, int], velocity) -> np.ndarray:
    """uint8 (F, H, W, 3): a window sliding over a textured world at `velocity` px/frame (sub-pixel)."""
    (height, width), velocity = size, np.asarray(velocity, np.float64)
    pad = int(np.ceil(np.abs(velocity).max() * num_frames)) + 2
    world = _world(rng, height + 2 * pad, width + 2 * pad)
    frames = []
    for t in range(num_frames):
        shift = np.float32([[1, 0, pad + velocity[0] * t], [0, 1, pad + velocity[1] * t]])
        frames.append(cv2.warpAffine(world, shift, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
    return np.stack(frames).astype(np.uint8)


def _write(path: Path, frames: np.ndarray, fps: float, fourcc: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("footage")
    rng = np.random.default_rng(0)
    for label, name, size, num_frames, fps, fourcc, velocity in CLIPS:
        _write(root / label / name, _pan(rng, num_frames, size, velocity), fps, fourcc)
    # Two unrelated shots: another world, panning the other way, in inverted colours.
    first = _pan(np.random.default_rng(1), CUT, (272, 640), (0.0, 2.0))
    second = 255 - _pan(np.random.default_rng(7), 40 - CUT, (272, 640), (0.0, -2.0))
    _write(root.joinpath(*CUT_CLIP), np.concatenate([first, second]), 25, "MJPG")
    good = (root / "pan_right" / "qcif.mp4").read_bytes()
    root.joinpath(*BROKEN).write_bytes(good[: len(good) // 3])  # an interrupted copy: no moov atom
    return root


def _args(stage: str, footage: Path, workdir: Path, *extra: str) -> list[str]:
    return [stage, "--preset", "smoke", "--set", "data.dataset=folder", "--set", f"data.folder={footage}",
            "--workdir", str(workdir), "--set", "flow.workers=1", *extra]


@pytest.fixture(scope="module")
def workdir(footage, tmp_path_factory) -> Path:
    """Every stage through the CLI, in order; each must exit 0."""
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # no params.yaml of the current directory applies
        for stage in ("download", "extract", "pretrain", "finetune", "probe", "evaluate"):
            extra = ("--splits", "train,val,test") if stage == "extract" else ()  # every clip's flow and cuts
            assert cli.main(_args(stage, footage, work, *extra)) == 0, f"mme {stage} failed (see the captured stderr)"
    return work


def _metrics(work: Path, stage: str) -> dict:
    return read_metrics(Paths(work).metrics_dir / f"{stage}.json")


def _rows(work: Path) -> dict[str, list[tuple[str, int]]]:
    return {split: read_list(Paths(work).list_file("folder", split)) for split in ("train", "val", "test")}


def test_download_skips_the_corrupt_file_and_lists_every_other(footage, workdir):
    skipped = Paths(workdir).skipped_file.read_text().splitlines()
    assert len(skipped) == 1
    stage, name, reason = skipped[0].split("\t")
    assert stage == "download" and name == str(footage.joinpath(*BROKEN)) and "corrupt" in reason
    rows = _rows(workdir)
    listed = sorted(rel for split in rows.values() for rel, _ in split)
    expected = sorted(str(footage / c[0] / c[1]) for c in CLIPS) + [str(footage.joinpath(*CUT_CLIP))]
    assert listed == sorted(expected)
    classes = read_classes(Paths(workdir).lists_dir("folder"))
    assert classes == ["pan_down", "pan_right"]
    assert all(classes[label] == Path(rel).parent.name for split in rows.values() for rel, label in split)
    assert [len(rows[s]) for s in ("train", "val", "test")] == [6, 2, 2]


def test_flow_cache_has_every_size_at_the_short_side_and_the_cut(footage, workdir):
    extract = _metrics(workdir, "extract")
    assert extract["extracted"] == 10 and extract["num_skipped"] == 0 and extract["shot_cuts"] == 1
    for rel, _ in (row for split in _rows(workdir).values() for row in split):
        info = video_info(rel)
        cache = load_flow(flow_cache_path(workdir, "folder", rel))
        assert cache.shape == (info.num_frames - 1, *resized_shape(info.height, info.width, SHORT_SIDE), 2), rel
        assert min(cache.shape[1:3]) == SHORT_SIDE
        assert cache.cuts == ([CUT] if rel.endswith("/".join(CUT_CLIP)) else []), rel
    sizes = {(video_info(footage / c[0] / c[1]).height, video_info(footage / c[0] / c[1]).width) for c in CLIPS}
    assert {(720, 1280), (272, 640), (144, 176), (480, 272)} <= sizes  # the decoder saw the sizes written


def test_every_training_stage_made_updates(workdir):
    for stage in ("pretrain", "finetune"):
        checkpoint = torch.load(Paths(workdir).models_dir(stage) / "checkpoint.pt", map_location="cpu",
                                weights_only=False)
        metrics = _metrics(workdir, stage)
        assert checkpoint["step"] >= 1 and metrics["epochs"] >= 1, stage
        assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0, stage
    probe = _metrics(workdir, "probe")  # heads fit in memory on cached features, chosen on val, scored on test
    assert probe["epochs"] >= 1 and probe["num_test"] == 2 and 0.0 <= probe["top1"] <= 100.0
    evaluate = _metrics(workdir, "evaluate")
    assert evaluate["num_videos"] == len(_rows(workdir)["test"]) == 2
    assert 0.0 <= evaluate["top1"] <= 100.0 and len(evaluate["confusion"]) == 2


def test_short_video_repeats_its_last_frame_and_invalidates_steps_past_its_end(workdir):
    cfg = load_config("smoke", ["data.dataset=folder"])
    geo = TargetGeometry.from_cfg(cfg)
    rows = _rows(workdir)
    split, rel = next((s, rel) for s in rows for rel, _ in rows[s] if video_info(rel).num_frames == SHORT)
    pretrain = PretrainDataset(cfg, workdir, split)
    valid = pretrain[[item[0] for item in pretrain.items].index(rel)]["target_valid"].reshape(geo.slots, -1)
    # Slot j tracks flow pairs 4j .. 4j+3 (stride 2, 4 steps); the 12-frame video has pairs 0 .. 10.
    first_missing = (SHORT - 1) // (geo.tubelet * geo.stride)
    assert first_missing == 2 and not valid[first_missing:].any()
    assert valid[:first_missing].float().mean() > 0.9
    classify = VideoClsDataset(cfg, workdir, split, mode="train")
    clip = classify[[r for r, _ in classify.items].index(rel)]["video"]
    # Frames 0, 2, ..., 14 clamped to 11: the last two sampled frames are the video's last frame.
    assert torch.equal(clip[:, 6], clip[:, 7]) and not torch.equal(clip[:, 5], clip[:, 6])


def test_batch_larger_than_the_train_split_is_one_line_error(footage, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    for stage in ("pretrain", "finetune"):
        code = cli.main(_args(stage, footage, workdir, "--set", f"{stage}.batch_size=7"))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mme")]  # not tqdm's
        assert code == 1, stage
        assert len(err) == 1 and err[0].startswith(f"mme {stage}: ") and "Traceback" not in err[0]
        assert "6 clips" in err[0] and "batch size" in err[0], err[0]


def test_tiny_folder_fills_every_split_or_fails_at_download(footage, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [(f"v{i}.mp4", i % 2) for i in range(3)]
    assert [len(stratified_split(rows, 0.15, 0.15, 0)[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    assert len(stratified_split(rows, 0.0, 0.15, 0)["val"]) == 0  # a zero fraction stays empty
    tiny = tmp_path / "tiny"
    for label in ("a", "b"):
        (tiny / label).mkdir(parents=True)
        (tiny / label / "clip.mp4").write_bytes((footage / "pan_right" / "qcif.mp4").read_bytes())
    capsys.readouterr()
    assert cli.main(_args("download", tiny, tmp_path / "work")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mme")]  # not tqdm's
    assert len(err) == 1 and err[0].startswith("mme download: data.folder=")
    assert "val split" in err[0] and "add videos" in err[0]
