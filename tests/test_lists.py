"""List files, video keys and the stratified split."""

from __future__ import annotations

from collections import Counter

import pytest

from mme.data.lists import (
    read_classes,
    read_list,
    relative_to_workdir,
    resolve_video,
    stratified_split,
    video_key,
    write_classes,
    write_list,
)


def test_round_trip_keeps_paths_with_spaces(tmp_path):
    rows = [("data/raw/synthetic/videos/000001.mp4", 3), ("/abs/my class/clip one.avi", 0)]
    write_list(tmp_path / "train.csv", rows)
    assert (tmp_path / "train.csv").read_text().splitlines()[0] == "data/raw/synthetic/videos/000001.mp4 3"
    assert read_list(tmp_path / "train.csv") == rows


def test_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("a.mp4 1\nb.mp4 x\n")
    with pytest.raises(ValueError, match=r"bad.csv:2"):
        read_list(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="mme download"):
        read_list(tmp_path / "missing.csv")


def test_resolve_and_relative(tmp_path):
    assert resolve_video(tmp_path, "data/x.mp4") == tmp_path / "data/x.mp4"
    assert resolve_video(tmp_path, "/elsewhere/x.mp4").as_posix() == "/elsewhere/x.mp4"
    (tmp_path / "data").mkdir()
    assert relative_to_workdir(tmp_path, tmp_path / "data" / "x.mp4") == "data/x.mp4"
    assert relative_to_workdir(tmp_path / "data", "/elsewhere/x.mp4") == "/elsewhere/x.mp4"


def test_video_key():
    assert video_key("data/raw/synthetic/videos/000123.mp4", "synthetic") == "videos/000123"
    assert video_key("/w/data/raw/ucf101/UCF-101/Archery/v_a.avi", "ucf101") == "UCF-101/Archery/v_a"
    assert video_key("/media/clips/run/fast one.mp4", "folder", root="/media/clips") == "run/fast_one"
    assert video_key("/media/clips/run/fast one.mp4", "folder") == "run/fast_one"
    assert video_key("/media/x/../../etc/v.mp4", "folder", root="/media/x") == "etc/v"


def test_classes_round_trip(tmp_path):
    write_classes(tmp_path, ["b", "a", "c"])
    assert read_classes(tmp_path) == ["b", "a", "c"]  # label order, not sorted


def test_stratified_split_is_balanced_disjoint_and_seeded():
    rows = [(f"v{i}.mp4", i % 12) for i in range(120)]
    splits = stratified_split(rows, 0.15, 0.15, seed=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [84, 18, 18]
    names = [r[0] for s in splits.values() for r in s]
    assert sorted(names) == sorted(r[0] for r in rows)
    for split in ("val", "test"):
        per_class = Counter(label for _, label in splits[split])
        assert max(per_class.values()) - min(per_class.values()) <= 1 and len(per_class) == 12
    assert stratified_split(rows, 0.15, 0.15, seed=3) == splits
    assert stratified_split(rows, 0.15, 0.15, seed=4) != splits


def test_stratified_split_tiny_set_keeps_every_class_in_train():
    rows = [(f"v{i}.mp4", i % 12) for i in range(24)]
    splits = stratified_split(rows, 0.15, 0.15, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 4, 4]
    assert {label for _, label in splits["train"]} == set(range(12))
