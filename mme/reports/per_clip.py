"""The per-clip record a trial stores so that tables can bootstrap over test clips: format, codec, reader.

A trial (one setting, one seed) that ran its evaluations on the test split keeps, for every metric it
reports, which test clips it got right:

    PerClip(clip_ids=("clip_0007", "clip_0012", ...),            # the test list's ids, in list order
            correct={"ft_top1": [1, 0, ...], "probe_top1": [...], "attentive_top1": [...]})

`correct[metric][i]` is 1 when clip `clip_ids[i]` was classified correctly (a float in [0, 1] is allowed,
e.g. a fraction of views); the metric keys are the trial's metric names (its user attributes). Clip ids
are what aligns two trials, never positions: settings are compared on the clips both evaluated.

Where it lives: the trial user attribute `PER_CLIP_ATTR` holds `encode(record)`, a JSON object
`{"format": FORMAT, "clip_ids": [...], "correct": {metric: base64 of 0/1 bits}}` — about 20 kB for
1 200 clips, so the Optuna storage stays the single source of a table, and a trial reused by several
studies carries its record with it. Fractional scores are stored as a list of floats instead of bits.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PER_CLIP_ATTR = "per_clip"
FORMAT = "mme.per_clip/1"


@dataclass(frozen=True)
class PerClip:
    """One trial's per-clip correctness: `clip_ids` (n,) and `correct` {metric: (n,) float in [0, 1]}."""

    clip_ids: tuple[str, ...]
    correct: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        if len(set(self.clip_ids)) != len(self.clip_ids):
            raise ValueError("per-clip record: clip_ids repeat an id; give each test clip once")
        arrays = {}
        for metric, values in self.correct.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (len(self.clip_ids),):
                raise ValueError(f"per-clip record: correct[{metric!r}] has shape {values.shape}, expected "
                                 f"({len(self.clip_ids)},), one entry per clip id")
            if values.size and (values.min() < 0 or values.max() > 1):
                raise ValueError(f"per-clip record: correct[{metric!r}] must lie in [0, 1] (1 = right)")
            arrays[metric] = values
        object.__setattr__(self, "clip_ids", tuple(str(c) for c in self.clip_ids))
        object.__setattr__(self, "correct", arrays)


def from_predictions(clip_ids: Sequence[str], labels: Iterable[int],
                     predictions: Mapping[str, Iterable[int]]) -> PerClip:
    """A record from predicted classes: `predictions` {metric: (n,) predicted class} vs `labels` (n,)."""
    labels = np.asarray(list(labels))
    return PerClip(tuple(clip_ids), {m: (np.asarray(list(p)) == labels).astype(np.float64)
                                     for m, p in predictions.items()})


def encode(record: PerClip) -> dict[str, Any]:
    """JSON-able form (0/1 scores as packed bits in base64; fractional scores as floats)."""
    correct: dict[str, Any] = {}
    for metric, values in record.correct.items():
        if np.isin(values, (0.0, 1.0)).all():
            correct[metric] = base64.b64encode(np.packbits(values.astype(np.uint8)).tobytes()).decode("ascii")
        else:
            correct[metric] = [float(v) for v in values]
    return {"format": FORMAT, "clip_ids": list(record.clip_ids), "correct": correct}


def decode(data: Mapping[str, Any]) -> PerClip:
    """Inverse of `encode`; a record of another format raises a ValueError naming it."""
    if data.get("format") != FORMAT:
        raise ValueError(f"per-clip record of format {data.get('format')!r}: this reader knows {FORMAT!r}")
    clip_ids = tuple(data["clip_ids"])
    correct = {}
    for metric, value in data["correct"].items():
        if isinstance(value, str):
            bits = np.unpackbits(np.frombuffer(base64.b64decode(value), dtype=np.uint8))
            correct[metric] = bits[: len(clip_ids)].astype(np.float64)
        else:
            correct[metric] = np.asarray(value, dtype=np.float64)
    return PerClip(clip_ids, correct)


def from_trial(trial: Any) -> PerClip | None:
    """The record of an Optuna (Frozen)Trial, or None for a trial stored without one (older storages)."""
    data = trial.user_attrs.get(PER_CLIP_ATTR)
    return decode(data) if isinstance(data, Mapping) else None
