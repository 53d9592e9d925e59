"""Small shared helpers: atomic file writes, seeding, skip lists, JSON metrics."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    An interrupted writer leaves at most a `*.tmp*` file that no reader takes for a valid output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix or f".tmp{final.suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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
