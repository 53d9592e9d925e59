"""Stage `finetune`: supervised fine-tuning of a pre-trained encoder (VideoMAE recipe).

Starts from `models/pretrain/checkpoint.pt` (or `--init`: this project's or an official VideoMAE/MME
checkpoint; `--init none` / `finetune.init=scratch`: no pre-trained weights at all, the seeded random
initialisation, written to `models/finetune_scratch/`: the from-scratch floor with the same schedule),
trains `build_classifier(cfg, num_classes)` on the train split with layer-wise lr decay,
drop path, mixup/cutmix + label smoothing (timm) and reports the single-view val top-1 every epoch,
through the shared driver (`mme.engine.fit`). Writes `models/finetune/{last,checkpoint}.pt`,
`reports/plots/finetune.csv`, `reports/metrics/finetune.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from mme.config import Config
from mme.engine.checkpointing import FINAL
from mme.engine.distributed import process_group
from mme.engine.fit import PRETRAIN_RUN_ID, TrainingPlan, single_view, train_stage
from mme.engine.loops import evaluate, make_loader, make_scaler
from mme.engine.optim import optimization, updates_per_epoch
from mme.models import build_classifier, init_from, model_args
from mme.paths import Paths
from mme.utils import seed_everything

STAGE = "finetune"
SCRATCH_STAGE = "finetune_scratch"  # the from-scratch floor's models/, metrics and plots name
SCRATCH_INITS = ("none", "scratch")  # `--init none`: train from the seeded random initialisation


def from_scratch(cfg: Config, init: str | Path | None) -> bool:
    """`--init none` (or `scratch`) or `finetune.init=scratch`: no pre-trained weights."""
    return cfg.finetune.init == "scratch" or (init is not None and str(init) in SCRATCH_INITS)


def stage_name(cfg: Config, init: str | Path | None = None) -> str:
    return SCRATCH_STAGE if from_scratch(cfg, init) else STAGE


class VideoMixup:
    """timm `Mixup` for (B, 3, T, H, W) clips with the CutMix box over H and W.

    timm indexes the box as `x[:, :, y0:y1, x0:x1]`, i.e. over T and H of a 5-D tensor; folding T into
    the channels gives it the 4-D layout it expects, so one box covers all frames at the same place.
    """

    def __init__(self, mixup: Mixup):
        self.mixup = mixup

    def __call__(self, video: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W), (B,) -> mixed clips, (B, num_classes) soft targets summing to 1."""
        batch, channels, frames, height, width = video.shape
        folded = video.reshape(batch, channels * frames, height, width).clone()
        folded, targets = self.mixup(folded, labels)
        return folded.reshape(batch, channels, frames, height, width), targets


class ClassificationLoss:
    """`compute_loss` for `train_one_epoch`: optional mixup, then (soft-target) cross-entropy; a batch
    `mask` (finetune.token_drop) drops those tokens before the encoder blocks."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, label_smoothing: float):
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = VideoMixup(Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                                          num_classes=num_classes))
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        video, target = batch["video"], batch["label"]
        if self.mixup is not None:
            video, target = self.mixup(video, target)
        return self.criterion(model(video, batch.get("mask")).float(), target), {}


def run(cfg: Config, workdir: str | Path, resume: bool = False, init: str | Path | None = None,
        allow_partial: bool = False, **_: Any) -> dict[str, Any]:
    """Fine-tune; with `resume`, continue from `models/<stage>/last.pt` at its epoch and step; `allow_partial`
    accepts an `init` whose encoder covers the model only in part; `init` none: from scratch."""
    from mme.datasets import VideoClsDataset

    with process_group() as env:
        paths, train = Paths(workdir), cfg.finetune
        seed_everything(cfg.seed)
        train_set = VideoClsDataset(cfg, paths.workdir, "train", mode="train")
        val_set = VideoClsDataset(single_view(cfg), paths.workdir, "val", mode="test")
        val_loader = make_loader(val_set, env, batch_size=cfg.evaluate.batch_size, shuffle=False, seed=cfg.seed,
                                 num_workers=cfg.data.num_workers, drop_last=False)
        # Mixup pairs clip i with clip B-1-i: batches must be full (drop_last). Made last: its light
        # (decode-only) workers leave this process a thread per core for training (`main_threads`).
        loader = make_loader(train_set, env, batch_size=train.batch_size, shuffle=True, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, drop_last=True, light_workers=True)
        updates = updates_per_epoch(len(loader), train.accum_steps, f"finetune on {len(train_set)} clips")
        model = build_classifier(cfg, train_set.num_classes).to(env.device)
        optimizer, scheduler, total_batch = optimization(train, model, updates, env.world_size, train.layer_decay)
        scratch, name = from_scratch(cfg, init), stage_name(cfg, init)
        init = None if scratch else Path(init) if init else paths.models_dir("pretrain") / FINAL
        plan = TrainingPlan(
            name, model, loader, optimizer, scheduler,
            ClassificationLoss(train_set.num_classes, train.mixup, train.cutmix, train.label_smoothing),
            train.epochs, updates, keys=("loss", "val_top1", "val_top5", "clips_per_s"),
            scaler=make_scaler(env.device, train.amp), accum_steps=train.accum_steps, clip_grad=train.clip_grad,
            amp=train.amp, keep={"config": cfg.to_dict(), "model_args": model_args(cfg),
                                 "num_classes": train_set.num_classes},
            carry=(PRETRAIN_RUN_ID,),
            start=lambda: {PRETRAIN_RUN_ID: None if scratch else init_from(model, init, allow_partial)},
            validate=lambda m: evaluate(m, val_loader, env.device, train.amp, show_progress=env.is_main),
            validate_every=train.val_every,
            params={"derived.total_batch": total_batch}, tags={"init": "scratch" if scratch else str(init)},
            compile=train.compile)
        return train_stage(cfg, paths, env, plan, resume)
