"""Stage `baselines`: the pipeline's pre-trained numbers beside their floors, on the TEST split.

Reads the per-clip test records (`mme.reports.per_clip`) of the probe of the pre-trained encoder
(`probe`), of the untrained encoder (`probe_random`), of the fine-tuned classifier (`evaluate`) and of
the classifier fine-tuned from scratch (`evaluate_scratch`), and writes `reports/metrics/baselines.json`
with exactly `KEYS`: each top-1 (percent of the test clips right) and, per pair, the paired difference
pre-trained - floor in points with its 95 % bootstrap CI over the test clips (`mme.reports.stats`), on
the clips both records hold. A head the stage did not train (e.g. `probe.attentive_epochs=0`) gives null.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mme.config import Config
from mme.paths import Paths
from mme.reports import per_clip, stats
from mme.utils import write_json

STAGE = "baselines"
# key -> (record file stem, metric in that record)
TOP1 = {
    "probe_top1": ("probe", "probe_top1"),
    "random_init_probe_top1": ("probe_random", "probe_top1"),
    "finetune_top1": ("evaluate", "ft_top1"),
    "scratch_finetune_top1": ("evaluate_scratch", "ft_top1"),
    "attentive_probe_top1": ("probe", "attentive_top1"),
    "random_init_attentive_probe_top1": ("probe_random", "attentive_top1"),
}
# delta name -> (pre-trained key, floor key)
PAIRS = {
    "probe": ("probe_top1", "random_init_probe_top1"),
    "finetune": ("finetune_top1", "scratch_finetune_top1"),
    "attentive_probe": ("attentive_probe_top1", "random_init_attentive_probe_top1"),
}
KEYS = (*TOP1, *(f"{name}_delta{end}" for name in PAIRS for end in ("", "_low", "_high")))


def record_path(paths: Paths, stem: str) -> Path:
    return paths.metrics_dir / f"{stem}.per_clip.json"


def read_record(paths: Paths, stem: str) -> per_clip.PerClip:
    """The per-clip record a stage wrote; a missing one names the command that writes it."""
    import json

    path = record_path(paths, stem)
    if not path.is_file():
        command = {"probe": "mme probe", "probe_random": "mme probe --init random", "evaluate": "mme evaluate",
                   "evaluate_scratch": "mme evaluate --init scratch"}[stem]
        raise FileNotFoundError(f"per-clip record {path} does not exist; run `{command}` first")
    return per_clip.decode(json.loads(path.read_text()))


def scores(record: per_clip.PerClip, metric: str) -> stats.SeedScores | None:
    """One seed's (clip ids, scores) of `metric`, or None when the record lacks it."""
    return {0: (record.clip_ids, record.correct[metric])} if metric in record.correct else None


def paired(mine: stats.SeedScores, floor: stats.SeedScores, resamples: int, seed: int) -> stats.Interval:
    """Paired difference mine - floor (points) with its CI, on the clips both have."""
    clips = stats.common_clips({"mine": mine, "floor": floor})
    if not clips:
        raise ValueError("the pre-trained and the floor records share no test clip; evaluate both on the same list")
    return stats.paired_difference(stats.aligned(mine, clips, [0]), stats.aligned(floor, clips, [0]),
                                   resamples=resamples, seed=seed)


def baselines(records: dict[str, per_clip.PerClip], resamples: int = stats.RESAMPLES,
              seed: int = 0) -> dict[str, float | None]:
    """`KEYS` from records {file stem: record} (see the module docstring)."""
    found = {key: scores(records[stem], metric) for key, (stem, metric) in TOP1.items()}
    out: dict[str, float | None] = {key: None if s is None else 100.0 * float(np.mean(s[0][1]))
                                    for key, s in found.items()}
    for name, (mine, floor) in PAIRS.items():
        delta = None
        if found[mine] is not None and found[floor] is not None:
            delta = paired(found[mine], found[floor], resamples, seed)
        for end, value in (("", "estimate"), ("_low", "low"), ("_high", "high")):
            number = None if delta is None else float(getattr(delta, value))
            out[f"{name}_delta{end}"] = None if number is None or math.isnan(number) else number
    return {key: out[key] for key in KEYS}


def run(cfg: Config, workdir: str | Path, **_: Any) -> dict[str, Any]:  # noqa: ARG001  (stage signature)
    """Write reports/metrics/baselines.json from the four per-clip records."""
    paths = Paths(workdir)
    records = {stem: read_record(paths, stem) for stem in dict.fromkeys(s for s, _ in TOP1.values())}
    result = baselines(records)
    write_json(paths.metrics_dir / f"{STAGE}.json", result)
    return result
