"""Stage `pretrain`: masked motion pre-training of the encoder (target definition: docs/targets.md).

Reads the train split through `PretrainDataset` (clip, mask, per-token target and validity), trains
`build_pretrainer(cfg)` with the masked per-part MSE through the shared driver (`mme.engine.fit`):
`models/pretrain/last.pt` every epoch, `models/pretrain/checkpoint.pt` at the end,
`reports/plots/pretrain.csv` and `reports/metrics/pretrain.json`; one MLflow run holds the config,
per-epoch metrics and the checkpoint. Runs the same under `torchrun` (DDP) as in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mme.config import Config
from mme.engine.distributed import process_group, unwrap
from mme.engine.fit import TrainingPlan, train_stage
from mme.engine.loops import make_loader, make_scaler
from mme.engine.optim import optimization, updates_per_epoch
from mme.models import build_pretrainer, model_args
from mme.paths import Paths
from mme.utils import report_skipped, seed_everything

STAGE = "pretrain"


def masked_motion_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Predict the masked tokens' targets and score them (through the DDP wrapper for gradient sync)."""
    pred = model(batch["video"], batch["mask"])
    return unwrap(model).forward_loss(pred, batch["target"], batch["target_valid"], batch["mask"])


def run(cfg: Config, workdir: str | Path, resume: bool = False, **_: Any) -> dict[str, Any]:
    """Pre-train; with `resume`, continue from `models/pretrain/last.pt` at its epoch and step."""
    from mme.datasets import PretrainDataset

    with process_group() as env:
        paths, train = Paths(workdir), cfg.pretrain
        seed_everything(cfg.seed)
        dataset = PretrainDataset(cfg, paths.workdir, "train")
        skipped = report_skipped(paths.skipped_file, STAGE, getattr(dataset, "skipped", []), enabled=env.is_main)
        loader = make_loader(dataset, env, batch_size=train.batch_size, shuffle=True, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, drop_last=True)
        updates = updates_per_epoch(len(loader), train.accum_steps, f"pretrain on {len(dataset)} clips")
        model = build_pretrainer(cfg).to(env.device)
        args = model_args(cfg) | {"target_parts": dict(model.target_parts)}
        optimizer, scheduler, total_batch = optimization(train, model, updates, env.world_size, betas=train.betas)
        plan = TrainingPlan(
            STAGE, model, loader, optimizer, scheduler, masked_motion_loss, train.epochs, updates,
            keys=("loss", "clips_per_s"), scaler=make_scaler(env.device, train.amp), accum_steps=train.accum_steps,
            clip_grad=train.clip_grad, amp=train.amp, keep={"config": cfg.to_dict(), "model_args": args},
            params={"derived.total_batch": total_batch, "derived.updates_per_epoch": updates,
                    "derived.num_params": sum(p.numel() for p in model.parameters())}, metrics=skipped)
        return train_stage(cfg, paths, env, plan, resume)
