"""The ablation's trial, made of stages: pretrain -> finetune -> probe on a trial directory, and the
one-time data preparation of a study's dataset (download, extract). `experiments/ablate.py` hands both
to `mme.ablation.runner` (which sits below the stages and never imports them).
"""

from __future__ import annotations

import time
from pathlib import Path

from mme.config import Config
from mme.paths import Paths


def run_stage_chain(cfg: Config, trial_dir: Path, stages: tuple[str, ...]) -> dict[str, float]:
    """The real trial: pretrain -> finetune -> probe (those named in `stages`) on `trial_dir`.

    Pre-training time is the stage's own `seconds` when it reports one, else the wall time of the call.
    """
    from mme.stages import finetune, pretrain, probe

    started = time.perf_counter()
    result = pretrain.run(cfg, trial_dir)
    metrics = {"pretrain_seconds": float(result.get("seconds", time.perf_counter() - started)),
               "pretrain_loss": _pick(result, ("loss",), "pretrain")}
    if "finetune" in stages:
        result = finetune.run(cfg, trial_dir)
        metrics["ft_top1"] = _pick(result, ("top1", "val_top1"), "finetune")
        metrics["ft_top5"] = _pick(result, ("top5", "val_top5"), "finetune")
    if "probe" in stages:
        metrics["probe_top1"] = _pick(probe.run(cfg, trial_dir), ("top1", "val_top1"), "probe")
    return metrics


def _pick(result: dict, keys: tuple[str, ...], stage: str) -> float:
    for key in keys:
        if key in result:
            return float(result[key])
    raise KeyError(f"mme.stages.{stage}.run returned none of {keys} (got {sorted(result)}); the ablation needs it")


def prepare_data(cfg: Config, workdir: Path) -> None:
    """Download and extract the study's dataset once, into the shared workdir, if lists or caches are missing."""
    from mme.stages import download, extract

    paths, dataset = Paths(workdir), cfg.data.dataset
    if not paths.list_file(dataset, "train").exists():
        print(f"ablate: no lists for {dataset} in {workdir}/data; running download once", flush=True)
        download.run(cfg, workdir)
    lists = [paths.list_file(dataset, split) for split in ("train", "val", "test")]
    videos = sum(sum(1 for line in f.read_text().splitlines() if line.strip()) for f in lists if f.exists())
    flow_dir = paths.flow_dir(dataset)
    cached = sum(1 for _ in flow_dir.rglob("*.npz")) if flow_dir.exists() else 0
    if cached < videos:
        print(f"ablate: {cached}/{videos} flow caches for {dataset}; running extract once", flush=True)
        extract.run(cfg, workdir)
