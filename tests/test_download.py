"""The download stage: the generated set end to end, and a `folder` tree with broken files (via the CLI)."""

from __future__ import annotations

import json
import re

import numpy as np

from mme import cli
from mme.data.lists import read_classes, read_list, resolve_video
from mme.data.synthetic import CLASSES, label_of, make_video, write_mp4
from mme.data.video import read_frames, video_info
from mme.paths import Paths


def test_synthetic_stage_writes_lists_metrics_and_decodable_videos(synthetic_workdir):
    paths = Paths(synthetic_workdir)
    assert read_classes(paths.lists_dir("synthetic")) == list(CLASSES)
    rows = {split: read_list(paths.list_file("synthetic", split)) for split in ("train", "val", "test")}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [16, 4, 4]
    assert {label for _, label in rows["train"]} == set(range(12))
    for split_rows in rows.values():
        for rel, label in split_rows:
            assert re.fullmatch(r"data/raw/synthetic/videos/\d{6}\.mp4", rel)
            assert label == label_of(int(rel[-10:-4]))
            video = resolve_video(synthetic_workdir, rel)
            assert video_info(video).num_frames == 32 and read_frames(video, [31]).shape == (1, 64, 64, 3)
    metrics = json.loads((paths.metrics_dir / "download.json").read_text())
    assert metrics["videos_train"] == 16 and metrics["num_classes"] == 12 and metrics["num_skipped"] == 0
    assert metrics["seconds"] > 0


def test_cli_synthetic_download_is_deterministic(tmp_path, synthetic_workdir, capsys):
    code = cli.main(["download", "--dataset", "synthetic", "--preset", "smoke", "--workdir", str(tmp_path)])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["videos_written"] == 24
    for name in ("000000.mp4", "000013.mp4"):
        mine = tmp_path / "data/raw/synthetic/videos" / name
        assert mine.read_bytes() == (synthetic_workdir / "data/raw/synthetic/videos" / name).read_bytes()
    for split in ("train", "val", "test"):
        assert (Paths(tmp_path).list_file("synthetic", split).read_text() ==
                Paths(synthetic_workdir).list_file("synthetic", split).read_text())


def test_folder_dataset_names_and_skips_broken_files(tmp_path, capsys):
    media = tmp_path / "media"
    for label, name in enumerate(["walk", "jump", "clap"]):
        (media / name).mkdir(parents=True)
        for k in range(4):
            write_mp4(media / name / f"{name}{k}.mp4", make_video(label * 4 + k, 6, 32, 1, False, 0), 25)
    good = media / "jump" / "jump0.mp4"
    (media / "walk" / "truncated.mp4").write_bytes(good.read_bytes()[:500])
    (media / "walk" / "empty.mp4").write_bytes(b"")
    (media / "clap" / "notes.txt").write_text("not a video")
    (media / "clap" / ".hidden.mp4").write_text("ignored")
    work = tmp_path / "work"
    code = cli.main(["download", "--dataset", "folder", "--preset", "smoke", "--workdir", str(work),
                     "--set", f"data.folder={media}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_skipped"] == 3 and result["num_classes"] == 3
    skipped_names = sorted(entry.split(":")[0].rsplit("/", 1)[1] for entry in result["skipped"])
    assert skipped_names == ["empty.mp4", "notes.txt", "truncated.mp4"]
    assert all("corrupt" in e or "empty" in e for e in result["skipped"])
    lines = Paths(work).skipped_file.read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("download\t") for line in lines)
    assert read_classes(Paths(work).lists_dir("folder")) == ["clap", "jump", "walk"]  # ids by sorted name
    rows = [row for split in ("train", "val", "test") for row in read_list(Paths(work).list_file("folder", split))]
    assert len(rows) == 12 and result["videos_train"] + result["videos_val"] + result["videos_test"] == 12
    for rel, label in rows:
        assert rel.startswith(str(media)) and ["clap", "jump", "walk"][label] == rel.split("/")[-2]
    counts = np.bincount([label for _, label in read_list(Paths(work).list_file("folder", "train"))], minlength=3)
    assert counts.min() >= 2
