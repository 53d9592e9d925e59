"""Video list files (VideoMAE/MME format) and the names derived from their rows.

A list is one line per video, `path label`, separated by a single space (the label an int). Paths
are relative to the workdir (`data/raw/synthetic/videos/000123.mp4 7`), or absolute for videos that
live outside it (the `folder` dataset). Paths may contain spaces: the label is the last field.
`classes.json` beside the lists holds the class names in label order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import numpy as np

from mme.utils import write_json, write_text_atomic

CLASSES_FILE = "classes.json"
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp")
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


def read_list(path: str | Path) -> list[tuple[str, int]]:
    """Rows `(path, label)` of a list file; blank lines are ignored.

    Raises:
        FileNotFoundError: the list does not exist (run `mme download` first).
        ValueError: a line is not `path label`; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video list {path} does not exist; run `mme download --dataset NAME` first")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        video, _, label = line.rpartition(" ")
        if not video or not label.lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected `path label` (label an int), got {line!r}")
        rows.append((video.strip(), int(label)))
    return rows


def write_list(path: str | Path, rows) -> None:
    """Write `(path, label)` rows atomically, one `path label` line each."""
    lines = []
    for video, label in rows:
        video = str(video)
        if "\n" in video or not video.strip():
            raise ValueError(f"cannot write video path {video!r} to {path}: empty or contains a newline")
        lines.append(f"{video} {int(label)}")
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def resolve_video(workdir: str | Path, rel: str | Path) -> Path:
    """The file a list row points to: absolute paths as they are, relative ones under the workdir."""
    rel = Path(rel)
    return rel if rel.is_absolute() else Path(workdir) / rel


def _sanitize(key: str) -> str:
    parts = [p for p in _UNSAFE.sub("_", key).split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "video"


def video_key(rel_path: str | Path, dataset: str, root: str | Path | None = None) -> str:
    """Stable name of a video inside its dataset, without suffix (the flow cache file name).

    `data/raw/<dataset>/videos/000123.mp4` -> `videos/000123`. For a path outside `data/raw/<dataset>/`
    (the `folder` dataset's absolute paths): the path relative to `root` (data.folder) when given and
    the file lies under it, else its last two components (`<class>/<video>` in a folder tree). The
    result is sanitized to `[A-Za-z0-9._/-]`.
    """
    path = PurePosixPath(str(rel_path).replace("\\", "/"))
    parts = path.parts
    marker = ("data", "raw", dataset)
    for i in range(len(parts) - len(marker)):
        if parts[i:i + len(marker)] == marker:
            inner = PurePosixPath(*parts[i + len(marker):])
            return _sanitize(str(inner.with_suffix("")))
    if root is not None:
        root_path = PurePosixPath(str(root).replace("\\", "/"))
        try:
            return _sanitize(str(path.relative_to(root_path).with_suffix("")))
        except ValueError:
            pass
    tail = PurePosixPath(*parts[-2:]) if len(parts) >= 2 else path
    return _sanitize(str(tail.with_suffix("")))


def read_classes(lists_dir: str | Path) -> list[str]:
    """Class names in label order, from `<lists_dir>/classes.json`."""
    path = Path(lists_dir) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"class file {path} does not exist; run `mme download --dataset NAME` first")
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path} must hold a JSON list of class names in label order")
    return names


def write_classes(lists_dir: str | Path, names: list[str]) -> None:
    """Write `classes.json` (names in label order) atomically."""
    write_json(Path(lists_dir) / CLASSES_FILE, list(names))


def relative_to_workdir(workdir: str | Path, video: str | Path) -> str:
    """The list-file form of a video path: relative to the workdir when inside it, else absolute."""
    video = Path(video).resolve()
    try:
        return video.relative_to(Path(workdir).resolve()).as_posix()
    except ValueError:
        return video.as_posix()


def _share(fraction: float, total: int, left: int) -> int:
    """`round(fraction*total)` rows; at least 1 for a non-zero fraction while `left` rows keep one for train."""
    count = int(round(fraction * total))
    if fraction > 0 and count == 0 and left >= 2:
        count = 1
    return count


def stratified_split(rows, val_fraction: float, test_fraction: float, seed: int, val_count: int = 0,
                     test_count: int = 0) -> dict[str, list]:
    """Split `(path, label)` rows into train/val/test with every class spread as evenly as possible.

    Videos of each class are shuffled (seeded); classes are interleaved rank by rank (in a seeded class
    order), and the first `round(test_fraction*N)` of that sequence go to test, the next
    `round(val_fraction*N)` to val, the rest to train. On a tiny set where that rounds to 0, a split with
    a non-zero fraction still gets one video while train keeps at least one (3 videos: one each), so the
    stages that read val and test have something to read. A non-zero `val_count` / `test_count` gives
    that split exactly so many videos instead of its fraction. Each split keeps the input order.
    """
    rng = np.random.default_rng([int(seed), 20230])
    rows = list(rows)
    by_class: dict[int, list[int]] = {}
    for position, (_, label) in enumerate(rows):
        by_class.setdefault(int(label), []).append(position)
    labels = [int(c) for c in rng.permutation(sorted(by_class))]
    queues = {c: [by_class[c][i] for i in rng.permutation(len(by_class[c]))] for c in labels}
    interleaved = []
    for rank in range(max((len(q) for q in queues.values()), default=0)):
        interleaved += [queues[c][rank] for c in labels if rank < len(queues[c])]
    if val_count + test_count >= max(len(rows), 1) and (val_count or test_count):
        raise ValueError(f"split counts val {val_count} + test {test_count} leave no training video of {len(rows)}")
    n_test = test_count or _share(test_fraction, len(rows), len(rows))
    n_val = val_count or _share(val_fraction, len(rows), len(rows) - n_test)
    chosen = {"test": set(interleaved[:n_test]), "val": set(interleaved[n_test:n_test + n_val])}
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for position, row in enumerate(rows):
        name = "test" if position in chosen["test"] else "val" if position in chosen["val"] else "train"
        splits[name].append(row)
    return splits
