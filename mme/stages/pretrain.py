"""Stage `pretrain`: masked motion pre-training of the encoder (DESIGN.md section 4).

Reads the train split through `PretrainDataset` (clip, mask, per-token target and validity), trains
`build_pretrainer(cfg)` with the masked per-part MSE, and writes `models/pretrain/last.pt` every epoch,
`models/pretrain/checkpoint.pt` at the end, `reports/plots/pretrain.csv` and
`reports/metrics/pretrain.json`; one MLflow run holds the config, per-epoch metrics and the checkpoint.
Runs the same under `torchrun` (DDP) as in one process. Also holds the training plumbing the other
training stages share (`optimization`, `finish_stage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mme.config import Config
from mme.engine.checkpointing import FINAL, LAST, load_training_state, save_checkpoint
from mme.engine.distributed import DistEnv, init_distributed, unwrap, wrap_ddp
from mme.engine.loops import make_loader, make_scaler, set_epoch, train_one_epoch
from mme.engine.optim import build_optimizer, build_scheduler, scaled_lr
from mme.engine.tracking import EpochRecorder, log_artifact, log_params, stage_run
from mme.models import build_pretrainer, model_args
from mme.paths import Paths
from mme.utils import report_skipped, seed_everything, write_json

STAGE = "pretrain"


def masked_motion_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Predict the masked tokens' targets and score them (through the DDP wrapper for gradient sync)."""
    pred = model(batch["video"], batch["mask"])
    return unwrap(model).forward_loss(pred, batch["target"], batch["target_valid"], batch["mask"])


def updates_per_epoch(num_batches: int, accum_steps: int, what: str) -> int:
    updates = num_batches // accum_steps
    if updates == 0:
        raise ValueError(f"{what}: {num_batches} batch(es) per epoch cannot make one update of {accum_steps} "
                         f"accumulated batches; lower the batch size or accum_steps, or add videos")
    return updates


def optimization(train: Any, model: nn.Module, updates: int, world_size: int, layer_decay: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999)) -> tuple[torch.optim.Optimizer, Any, int]:
    """AdamW + warm-up/cosine schedule from a stage section (`cfg.pretrain` / `cfg.finetune`).

    Returns:
        optimizer, scheduler (step it per update), total batch (per-rank batch × accumulation × ranks).
    """
    total_batch = train.batch_size * train.accum_steps * world_size
    optimizer = build_optimizer(model, scaled_lr(train.base_lr, total_batch), train.weight_decay, betas, layer_decay)
    scheduler = build_scheduler(optimizer, train.epochs * updates, train.warmup_epochs * updates,
                                scaled_lr(train.min_lr, total_batch))
    return optimizer, scheduler, total_batch


def finish_stage(stage: str, paths: Paths, env: DistEnv, model: nn.Module, rows: list[dict[str, float]],
                 keys: tuple[str, ...], skipped: dict[str, Any] | None = None, **checkpoint: Any) -> dict[str, Any]:
    """Final checkpoint (weights + args + config, no optimizer), metrics JSON and MLflow artifact.

    Returns:
        the last epoch's `keys` and `loss_*`, the training `seconds`, the run ids and the checkpoint path.
    """
    last = rows[-1] if rows else {}
    metrics = {k: v for k, v in last.items() if k in keys or k.startswith("loss_")}
    metrics |= {k: checkpoint.get(k) for k in ("mlflow_run_id", "pretrain_run_id") if k in checkpoint}
    metrics["seconds"] = sum(row.get("epoch_time", 0.0) for row in rows)  # training time over all epochs
    metrics |= skipped or {}  # inputs the stage dropped (`mme.utils.report_skipped`)
    final = paths.models_dir(stage) / FINAL
    if env.is_main:
        save_checkpoint(final, model=model, history=rows, stage=stage, **checkpoint)
        write_json(paths.metrics_dir / f"{stage}.json", metrics | {"epochs": len(rows)})
        log_artifact(final, "checkpoints")
    return metrics | {"epochs": len(rows), "checkpoint": str(final)}


def run(cfg: Config, workdir: str | Path, resume: bool = False, **_: Any) -> dict[str, Any]:
    """Pre-train; with `resume`, continue from `models/pretrain/last.pt` at its epoch and step."""
    from mme.data.datasets import PretrainDataset

    env, paths, train = init_distributed(), Paths(workdir), cfg.pretrain
    seed_everything(cfg.seed)
    dataset = PretrainDataset(cfg, paths.workdir, "train")
    skipped = report_skipped(paths.skipped_file, STAGE, getattr(dataset, "skipped", []), enabled=env.is_main)
    loader = make_loader(dataset, env, batch_size=train.batch_size, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.data.num_workers, drop_last=True)
    updates = updates_per_epoch(len(loader), train.accum_steps, f"pretrain on {len(dataset)} clips")
    model = build_pretrainer(cfg).to(env.device)
    args = model_args(cfg) | {"target_parts": dict(model.target_parts)}
    optimizer, scheduler, total_batch = optimization(train, model, updates, env.world_size, betas=train.betas)
    scaler = make_scaler(env.device, train.amp)
    state = {"epoch": 0, "history": []}
    if resume:
        state = load_training_state(paths.models_dir(STAGE) / LAST, model=model, optimizer=optimizer,
                                    scheduler=scheduler, scaler=scaler, config=cfg.to_dict(), stage=STAGE)
    ddp_model = wrap_ddp(model, env)
    recorder = EpochRecorder(paths.plots_dir / f"{STAGE}.csv", env.is_main, state["history"])
    tags = {"resumed_from": state["mlflow_run_id"]} if resume and state.get("mlflow_run_id") else {}
    with stage_run(cfg, paths.workdir, STAGE, enabled=env.is_main, tags=tags) as mlrun:
        run_id = mlrun.info.run_id if mlrun else None
        log_params({"derived.total_batch": total_batch, "derived.updates_per_epoch": updates,
                    "derived.num_params": sum(p.numel() for p in model.parameters())})
        for epoch in range(state["epoch"], train.epochs):
            set_epoch(loader, epoch)
            stats = train_one_epoch(ddp_model, loader, optimizer, scheduler, masked_motion_loss, epoch=epoch,
                                    updates_per_epoch=updates, device=env.device, accum_steps=train.accum_steps,
                                    clip_grad=train.clip_grad, amp=train.amp, scaler=scaler,
                                    show_progress=env.is_main)
            recorder.record(epoch, stats)
            if env.is_main:
                save_checkpoint(paths.models_dir(STAGE) / LAST, model=model, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, epoch=epoch + 1, step=(epoch + 1) * updates,
                                config=cfg.to_dict(), model_args=args, history=recorder.rows,
                                mlflow_run_id=run_id, stage=STAGE)
        return finish_stage(STAGE, paths, env, model, recorder.rows, ("loss", "clips_per_s"),
                            epoch=train.epochs, step=train.epochs * updates, config=cfg.to_dict(), model_args=args,
                            mlflow_run_id=run_id, skipped=skipped)
