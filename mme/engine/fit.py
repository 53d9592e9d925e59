"""The training driver every training stage shares: resume, epoch loop, per-epoch records, checkpoints.

A stage builds what is its own (datasets, model, loss, optimizer, validation) into a `TrainingPlan`
and calls `train_stage`. The driver then restores `models/<stage>/last.pt` on resume (weights,
optimizer, scheduler, scaler, RNG: a resumed run is bit-identical to a straight one), opens the
stage's MLflow run, trains `plan.epochs` epochs (each one recorded to MLflow and
`reports/plots/<stage>.csv` and saved as `last.pt`), and finishes with the final checkpoint
(`FINAL`, weights without optimizer state) and `reports/metrics/<stage>.json`. Under DDP only rank 0
writes files or logs.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from mme.config import Config
from mme.engine.checkpointing import FINAL, LAST, auto_resume_refusal, load_training_state, save_checkpoint
from mme.engine.distributed import DistEnv, wrap_ddp
from mme.engine.loops import LossFn, set_epoch, train_one_epoch
from mme.engine.tracking import (
    EpochRecorder,
    log_artifact,
    log_dataset_lists,
    log_params,
    log_stage_model,
    stage_run,
)
from mme.paths import Paths
from mme.utils import write_metrics

# Checkpoint extras that name the pre-training run a stage descends from: also an MLflow tag and param.
PRETRAIN_RUN_ID = "pretrain_run_id"


@dataclass
class TrainingPlan:
    """What a stage hands the driver.

    Attributes:
        keys: the last epoch's metrics (besides `loss_*`) that go into the metrics JSON.
        keep: extras saved in every checkpoint (config, model args, `pretrain_run_id`, ...).
        carry: keys of `keep` taken from `last.pt` on resume and from `start()` otherwise.
        start: called on a fresh (not resumed) run before training; returns values for `carry`.
        validate: called with the (unwrapped) model after every `validate_every`-th epoch and after the last;
            its metrics are recorded as `val_*` (empty in the CSV for the epochs in between).
        metrics: extra values for the metrics JSON (e.g. the inputs the stage dropped, `report_skipped`).
        ddp: wrap the model in DistributedDataParallel when the process group has several ranks.
        snapshots: epochs (counted from 1) after which the weights are also kept as `epoch_NNN.pt`, in the
            final checkpoint's format (what learning curves probe: experiments/learning_curves.py).
        compile: train through `torch.compile` of the (DDP-wrapped) model; the plan's own model stays eager
            and is what validation, checkpoints and the MLflow model see (same parameters).
    """

    stage: str
    model: nn.Module
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: LossFn
    epochs: int
    updates: int
    keys: tuple[str, ...]
    scaler: torch.amp.GradScaler | None = None
    accum_steps: int = 1
    clip_grad: float | None = None
    amp: str = "off"
    device: torch.device | None = None
    ddp: bool = True
    show_progress: bool = True
    keep: dict[str, Any] = field(default_factory=dict)
    carry: tuple[str, ...] = ()
    start: Callable[[], dict[str, Any]] | None = None
    validate: Callable[[nn.Module], dict[str, float]] | None = None
    validate_every: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    snapshots: tuple[int, ...] = ()
    compile: bool = False


def single_view(cfg: Config) -> Config:
    """A copy of cfg whose test mode yields one centre view (per-epoch validation, probe features)."""
    view = copy.deepcopy(cfg)
    view.evaluate.num_clips, view.evaluate.num_crops = 1, 1
    return view


def initial_state(cfg: Config, plan: TrainingPlan, paths: Paths, resume: bool | None,
                  announce: bool = True) -> dict[str, Any]:
    """`last.pt` restored into the plan's model/optimizer/scheduler/scaler, or a fresh start.

    Args:
        resume: True must resume (refused for a `last.pt` of another model or batch geometry:
            `load_training_state`); False starts fresh; None (the command line's default, so that an
            interrupted `dvc repro` continues) resumes when `auto_resume_refusal` finds nothing against it,
            else starts fresh and says why in one line (`announce`: on stderr).
    """
    last = paths.models_dir(plan.stage) / LAST

    def restore() -> dict[str, Any]:
        return load_training_state(last, model=plan.model, optimizer=plan.optimizer, scheduler=plan.scheduler,
                                   scaler=plan.scaler, config=cfg.to_dict(), stage=plan.stage) | {"resumed": True}

    if resume:
        return restore()
    fresh = {"epoch": 0, "history": []} | (plan.start() if plan.start is not None else {})
    if resume is None and last.is_file():
        lineage = {k: (plan.keep | fresh).get(k) for k in (PRETRAIN_RUN_ID,) if k in plan.keep or k in plan.carry}
        reason = auto_resume_refusal(last, cfg.to_dict(), lineage, plan.epochs)
        state = restore() if reason is None else fresh
        if announce:
            print(f"mme {plan.stage}: resuming from {last} at epoch {state['epoch']} of {plan.epochs} (same "
                  "parameters; --no-resume starts over)" if reason is None else
                  f"mme {plan.stage}: starting fresh, not resuming from {last}: {reason}", file=sys.stderr)
        return state
    return fresh


def run_tags(plan: TrainingPlan, keep: dict[str, Any], state: dict[str, Any], resume: bool) -> dict[str, Any]:
    tags = {PRETRAIN_RUN_ID: keep[PRETRAIN_RUN_ID] or "none"} if PRETRAIN_RUN_ID in keep else {}
    if resume and state.get("mlflow_run_id"):
        tags["resumed_from"] = state["mlflow_run_id"]
    return tags | plan.tags


def train_stage(cfg: Config, paths: Paths, env: DistEnv, plan: TrainingPlan, resume: bool | None = False
                ) -> dict[str, Any]:
    """Train a stage to `plan.epochs` (from `last.pt` as `initial_state` decides); returns `finish_stage`'s
    metrics."""
    state = initial_state(cfg, plan, paths, resume, announce=env.is_main)
    keep = plan.keep | {key: state.get(key) for key in plan.carry}
    model = wrap_ddp(plan.model, env) if plan.ddp else plan.model
    model = torch.compile(model) if plan.compile else model  # compiles at the first step (README: its cost)
    device = plan.device or env.device
    recorder = EpochRecorder(paths.plots_dir / f"{plan.stage}.csv", env.is_main, state["history"])
    resumed = bool(state.get("resumed"))
    tags = run_tags(plan, keep, state, resumed)
    with stage_run(cfg, paths.workdir, plan.stage, enabled=env.is_main, tags=tags, system_metrics=True,
                   resume_run_id=state.get("mlflow_run_id") if resumed else None) as mlrun:
        keep["mlflow_run_id"] = mlrun.info.run_id if mlrun else None
        log_params(({PRETRAIN_RUN_ID: tags[PRETRAIN_RUN_ID]} if PRETRAIN_RUN_ID in keep else {}) | plan.params)
        log_dataset_lists(cfg, paths, ("train",) if plan.validate is None else ("train", "val"))
        for epoch in range(state["epoch"], plan.epochs):
            set_epoch(plan.loader, epoch)
            stats = train_one_epoch(model, plan.loader, plan.optimizer, plan.scheduler, plan.loss_fn, epoch=epoch,
                                    updates_per_epoch=plan.updates, device=device, accum_steps=plan.accum_steps,
                                    clip_grad=plan.clip_grad, amp=plan.amp, scaler=plan.scaler,
                                    show_progress=plan.show_progress and env.is_main)
            if plan.validate is not None and ((epoch + 1) % plan.validate_every == 0 or epoch + 1 == plan.epochs):
                stats |= {f"val_{k}": v for k, v in plan.validate(plan.model).items()}
            recorder.record(epoch, stats)
            if env.is_main:
                save_checkpoint(paths.models_dir(plan.stage) / LAST, model=plan.model, optimizer=plan.optimizer,
                                scheduler=plan.scheduler, scaler=plan.scaler, epoch=epoch + 1,
                                step=(epoch + 1) * plan.updates, history=recorder.rows, stage=plan.stage, **keep)
                if epoch + 1 in plan.snapshots:
                    save_checkpoint(snapshot_path(paths, plan.stage, epoch + 1), model=plan.model,
                                    history=recorder.rows, stage=plan.stage, epoch=epoch + 1,
                                    step=(epoch + 1) * plan.updates, **keep)
        result = finish_stage(plan.stage, paths, env, plan.model, recorder.rows, plan.keys, epoch=plan.epochs,
                              step=plan.epochs * plan.updates, extra=plan.metrics, **keep)
        log_stage_model(cfg, plan.stage, plan.model)
        return result


def snapshot_path(paths: Paths, stage: str, epoch: int) -> Path:
    """Where `TrainingPlan.snapshots` keeps the weights after `epoch` epochs."""
    return paths.models_dir(stage) / f"epoch_{epoch:03d}.pt"


def finish_stage(stage: str, paths: Paths, env: DistEnv, model: nn.Module, rows: list[dict[str, float]],
                 keys: tuple[str, ...], extra: dict[str, Any] | None = None, **checkpoint: Any) -> dict[str, Any]:
    """Final checkpoint (weights + args + config, no optimizer), metrics JSON and MLflow artifact.

    Returns:
        the last epoch's `keys` and `loss_*`, the training `seconds`, the run ids and the checkpoint path.
    """
    last = rows[-1] if rows else {}
    metrics = {k: v for k, v in last.items() if k in keys or k.startswith("loss_")}
    metrics |= {k: checkpoint.get(k) for k in ("mlflow_run_id", PRETRAIN_RUN_ID) if k in checkpoint}
    metrics["seconds"] = sum(row.get("epoch_time", 0.0) for row in rows)  # training time over all epochs
    metrics |= extra or {}
    final = paths.models_dir(stage) / FINAL
    if env.is_main:
        save_checkpoint(final, model=model, history=rows, stage=stage, **checkpoint)
        write_metrics(paths.metrics_dir / f"{stage}.json", metrics | {"epochs": len(rows)})
        log_artifact(final, "checkpoints")
    return metrics | {"epochs": len(rows), "checkpoint": str(final)}
