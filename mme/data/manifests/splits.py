"""Readers of the official split files: each returns class names and `(file name, label)` entries.

The names are as the split files write them; `mme.data.sources.resolve_rows` finds the files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"official split file {path} is missing; delete {path.parent} and download again")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def ucf101_split(lists_dir: Path, split: int) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """UCF101 `ucfTrainTestlist`: classInd.txt (`1 ApplyEyeMakeup`), trainlist0K (`Class/v_x.avi 1`),
    testlist0K (`Class/v_x.avi`, label from the folder). Labels are 0-based."""
    lists_dir = Path(lists_dir)
    classes = [line.split()[1] for line in sorted(_lines(lists_dir / "classInd.txt"), key=lambda s: int(s.split()[0]))]
    ids = {name.lower(): i for i, name in enumerate(classes)}
    train = [(line.split()[0], int(line.split()[1]) - 1) for line in _lines(lists_dir / f"trainlist0{split}.txt")]
    test = []
    for line in _lines(lists_dir / f"testlist0{split}.txt"):
        name = line.split()[0]
        folder = name.replace("\\", "/").split("/")[0].lower()
        if folder not in ids:
            raise ValueError(f"{lists_dir / f'testlist0{split}.txt'}: class folder of {name!r} is not in classInd.txt")
        test.append((name, ids[folder]))
    return classes, train, test


def hmdb51_split(split_dir: Path, split: int) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """HMDB51 `testTrainMulti_7030_splits/<class>_test_splitK.txt`: `video.avi 1|2|0` = train|test|unused.
    Classes sorted by name; entries are `<class>/<video>`."""
    suffix = f"_test_split{split}.txt"
    files = sorted(Path(split_dir).glob(f"*{suffix}"))
    if not files:
        raise FileNotFoundError(f"no *{suffix} files in {split_dir}; delete it and download again")
    classes = sorted(f.name[: -len(suffix)] for f in files)
    train, test = [], []
    for label, name in enumerate(classes):
        for line in _lines(Path(split_dir) / f"{name}{suffix}"):
            video, tag = line.split()[:2]
            if tag == "1":
                train.append((f"{name}/{video}", label))
            elif tag == "2":
                test.append((f"{name}/{video}", label))
    return classes, train, test


def k400_entries(csv_path: Path) -> list[tuple[str, str]]:
    """Kinetics csv (`label,youtube_id,time_start,time_end,split`) -> `(label, <id>_<start:06d>_<end:06d>.mp4)`."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"label", "youtube_id", "time_start", "time_end"} <= set(rows[0]):
        raise ValueError(f"{csv_path} lacks the Kinetics columns label,youtube_id,time_start,time_end")
    return [(row["label"], f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_"
                           f"{int(float(row['time_end'])):06d}.mp4") for row in rows if row.get("label")]


def ssv2_split(labels_json: Path, train_json: Path, validation_json: Path
               ) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Something-Something v2: labels `{template: "id"}`; train/validation `[{id, template, ...}]`, the
    template's `[something]` brackets removed to match. Entries are the video ids (`<id>.webm`)."""
    labels = {name: int(i) for name, i in json.loads(Path(labels_json).read_text()).items()}
    classes = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]

    def entries(path: Path) -> list[tuple[str, int]]:
        out = []
        for item in json.loads(Path(path).read_text()):
            template = item["template"].replace("[", "").replace("]", "")
            if template not in labels:
                raise ValueError(f"{path}: template {template!r} of video {item['id']} is not in {labels_json}")
            out.append((str(item["id"]), labels[template]))
        return out

    return classes, entries(train_json), entries(validation_json)
