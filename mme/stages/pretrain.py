"""Stage `pretrain`: masked motion pre-training of the encoder (target definition: docs/targets.md).

Reads the train split through `PretrainDataset` (clip, mask and what the targets are built from), builds
each batch's targets with one `build_batch` call (`mme.datasets.batching`: in the training step on its
device, or in the loader's workers, `data.targets_on`), trains `build_pretrainer(cfg)` with the masked
per-part MSE through the shared driver (`mme.engine.fit`):
`models/pretrain/last.pt` every epoch, `models/pretrain/checkpoint.pt` at the end,
`reports/plots/pretrain.csv` and `reports/metrics/pretrain.json`; one MLflow run holds the config,
per-epoch metrics and the checkpoint. Runs the same under `torchrun` (DDP) as in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from mme.config import Config
from mme.engine.distributed import DistEnv, process_group, unwrap
from mme.engine.fit import TrainingPlan, train_stage
from mme.engine.loops import LossFn, make_loader, make_scaler
from mme.engine.optim import optimization, updates_per_epoch
from mme.models import build_pretrainer, model_args
from mme.paths import Paths
from mme.targets import get_target
from mme.utils import report_skipped, seed_everything

STAGE = "pretrain"


def masked_motion_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Predict the masked tokens' targets and score them (through the DDP wrapper for gradient sync)."""
    pred = model(batch["video"], batch["mask"])
    return unwrap(model).forward_loss(pred, batch["target"], batch["target_valid"], batch["mask"])


def batch_target_loss(cfg: Config) -> LossFn:
    """The stage's loss fn: first builds the batch's targets (one `build_batch` call on the batch's device)
    when the loader delivered their inputs (`data.targets_on = device`), then `masked_motion_loss`."""
    from mme.datasets.batching import build_targets

    spec = get_target(cfg)

    def loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return masked_motion_loss(model, build_targets(spec, cfg, batch))

    return loss


def pretrain_loader(cfg: Config, dataset: Any, env: DistEnv) -> DataLoader:
    """The train loader; its `collate_fn` builds the batch's targets in the workers when `data.targets_on`
    resolves to `loader` (`mme.datasets.batching.targets_on`), else only stacks the items' inputs."""
    from mme.datasets.batching import TargetCollate, collate_inputs, targets_on

    collate = TargetCollate(get_target(cfg), cfg) if targets_on(cfg, env.device) == "loader" else collate_inputs
    return make_loader(dataset, env, batch_size=cfg.pretrain.batch_size, shuffle=True, seed=cfg.seed,
                       num_workers=cfg.data.num_workers, drop_last=True, collate_fn=collate)


def run(cfg: Config, workdir: str | Path, resume: bool = False, snapshots: tuple[int, ...] = (),
        **_: Any) -> dict[str, Any]:
    """Pre-train; with `resume`, continue from `models/pretrain/last.pt` at its epoch and step; `snapshots`:
    epochs after which the weights are also kept (`TrainingPlan.snapshots`)."""
    from mme.datasets import PretrainDataset

    with process_group() as env:
        paths, train = Paths(workdir), cfg.pretrain
        seed_everything(cfg.seed)
        dataset = PretrainDataset(cfg, paths.workdir, "train", targets=False)
        loader = pretrain_loader(cfg, dataset, env)
        skipped = report_skipped(paths.skipped_file, STAGE, getattr(dataset, "skipped", []), enabled=env.is_main)
        updates = updates_per_epoch(len(loader), train.accum_steps, f"pretrain on {len(dataset)} clips")
        model = build_pretrainer(cfg).to(env.device)
        args = model_args(cfg) | {"target_parts": dict(model.target_parts)}
        optimizer, scheduler, total_batch = optimization(train, model, updates, env.world_size, betas=train.betas)
        plan = TrainingPlan(
            STAGE, model, loader, optimizer, scheduler, batch_target_loss(cfg), train.epochs, updates,
            keys=("loss", "clips_per_s"), scaler=make_scaler(env.device, train.amp), accum_steps=train.accum_steps,
            clip_grad=train.clip_grad, amp=train.amp, keep={"config": cfg.to_dict(), "model_args": args},
            params={"derived.total_batch": total_batch, "derived.updates_per_epoch": updates,
                    "derived.num_params": sum(p.numel() for p in model.parameters())}, metrics=skipped,
            snapshots=tuple(snapshots), compile=train.compile)
        return train_stage(cfg, paths, env, plan, resume)
