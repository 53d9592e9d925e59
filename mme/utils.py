"""Small shared helpers: atomic file writes, writable output folders, seeding, skip lists, JSON metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask (0644 for umask 022)."""
    try:  # read, not set: setting the umask to probe it would race with other threads creating files
        status = Path("/proc/self/status").read_text()
        mask = next(int(line.split()[1], 8) for line in status.splitlines() if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def is_special_target(path: str | Path) -> bool:
    """True when `path` (its symlinks followed) exists and is neither a regular file nor a directory (a
    device, a pipe, a socket), or is a file-descriptor link (`/dev/stdout`, `/dev/fd/1`) even to a file:
    replacing the file would leave the descriptor's owner writing to an unlinked inode."""
    if _through_fd_link(Path(path)):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _through_fd_link(path: Path) -> bool:
    """True when following `path`'s symlinks passes through a /proc/<pid>/fd entry."""
    path = path.absolute()
    for _ in range(40):  # the kernel's own symlink-hop limit
        if os.path.realpath(path.parent).startswith("/proc/"):
            return True
        if not path.is_symlink():
            return False
        path = path.parent / os.readlink(path)
    return False


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a path to write `final` through; a regular file or a new path is replaced only if the block succeeds.

    An interrupted writer leaves at most a `.<name>.*tmp*` file beside the target, which no reader takes
    for a valid output. A symlink is written through: its target is replaced, the link stays. A device,
    pipe or socket (`/dev/stdout`, a FIFO) cannot be replaced, so the block writes to it directly. A
    directory is refused. The written file gets the umask-derived mode of a new file, not the 0600 of a
    temporary one, so a group can share caches and checkpoints.
    """
    final = Path(final)
    if final.is_dir():
        raise IsADirectoryError(f"output {final} is a directory; pass a file path")
    if is_special_target(final):
        yield final
        return
    if final.is_symlink():
        final = Path(os.path.realpath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix or f".tmp{final.suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via `atomic_path`; `-` writes it to stdout."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def ensure_writable(*folders: str | Path) -> None:
    """Create each folder and check a file can be made in it, before long work starts.

    Raises:
        PermissionError: naming the first folder that cannot be written.
    """
    for folder in map(Path, folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PermissionError(f"cannot write to {folder} ({exc.strerror or exc}); make it writable "
                                  "or pass another --workdir") from exc


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def info_path(path: str | Path) -> Path:
    """Where `write_metrics` puts the non-numeric values of `path`: `evaluate.json` -> `evaluate.info.json`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.info.json")


def split_numeric(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(finite numbers, everything else) of a nested mapping, keeping its nesting; booleans, strings,
    None, lists and NaN go to the second."""
    numbers: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            inner, rest = split_numeric(value)
            numbers |= {key: inner} if inner else {}
            other |= {key: rest} if rest else {}
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            numbers[key] = value
        else:
            other[key] = value
    return numbers, other


def write_metrics(path: str | Path, data: dict[str, Any], details: tuple[str, ...] = ()) -> None:
    """A stage's metrics: numbers only in `path` (what `dvc metrics show/diff` reads), the rest (run ids,
    paths, lists, the confusion matrix) and the `details` keys (per-class values: one per class is no
    summary) in `info_path(path)`, which is always written."""
    numbers, other = split_numeric({k: v for k, v in data.items() if k not in details})
    write_json(path, numbers)
    write_json(info_path(path), other | {k: data[k] for k in details if k in data})


def read_metrics(path: str | Path) -> dict[str, Any]:
    """What `write_metrics` split, merged back (the info file may be missing: an older run)."""

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return a | {k: merge(a[k], v) if isinstance(a.get(k), dict) and isinstance(v, dict) else v
                    for k, v in b.items()}

    extra = info_path(path)
    return merge(json.loads(Path(path).read_text()), json.loads(extra.read_text()) if extra.exists() else {})


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def record_skipped(path: str | Path, stage: str, skipped: list[tuple[str, str]]) -> None:
    """Replace this stage's block in the skip list (`stage<TAB>file<TAB>reason` lines)."""
    path = Path(path)
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and not line.startswith(f"{stage}\t")]
    lines = kept + [f"{stage}\t{name}\t{reason}" for name, reason in skipped]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def report_skipped(path: str | Path, stage: str, skipped: list[tuple[str, str]], enabled: bool = True,
                   log: bool = True) -> dict[str, Any]:
    """Name every input a stage dropped (one stderr line each), list them in the skip file (`record_skipped`).

    Returns:
        the metrics entries of the drops: `num_skipped` and `skipped` (`{"video", "reason"}` records).
    """
    if enabled:
        if log:
            for name, reason in skipped:
                print(f"{stage}: skipped {name}: {reason}", file=sys.stderr)
        record_skipped(path, stage, skipped)
    return {"num_skipped": len(skipped), "skipped": [{"video": name, "reason": reason} for name, reason in skipped]}
