"""Stage `finetune`: supervised fine-tuning of a pre-trained encoder (VideoMAE recipe).

Starts from `models/pretrain/checkpoint.pt` (or `--init`: this project's or an official VideoMAE/MME
checkpoint), trains `build_classifier(cfg, num_classes)` on the train split with layer-wise lr decay,
drop path, mixup/cutmix + label smoothing (timm) and reports the single-view val top-1 every epoch.
Writes `models/finetune/{last,checkpoint}.pt`, `reports/plots/finetune.csv`, `reports/metrics/finetune.json`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from mme.config import Config
from mme.engine.checkpointing import LAST, load_training_state, save_checkpoint
from mme.engine.distributed import init_distributed, unwrap, wrap_ddp
from mme.engine.loops import evaluate, make_loader, make_scaler, set_epoch, train_one_epoch
from mme.engine.tracking import EpochRecorder, log_params, stage_run
from mme.models import build_classifier, load_checkpoint, model_args, read_checkpoint
from mme.paths import Paths
from mme.stages.pretrain import finish_stage, optimization, updates_per_epoch
from mme.utils import seed_everything

STAGE = "finetune"


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


def single_view(cfg: Config) -> Config:
    """A copy of cfg whose test mode yields one centre view (per-epoch validation, probe features)."""
    view = copy.deepcopy(cfg)
    view.evaluate.num_clips, view.evaluate.num_crops = 1, 1
    return view


def init_from(model: nn.Module, path: Path, allow_partial: bool = False) -> str | None:
    """Load the starting weights; returns the pre-training MLflow run id the file records, if any."""
    load_checkpoint(model, path, allow_partial=allow_partial)
    data = read_checkpoint(path)
    return data.get("pretrain_run_id") or (data.get("mlflow_run_id") if data.get("stage") == "pretrain" else None)


def run(cfg: Config, workdir: str | Path, resume: bool = False, init: str | Path | None = None,
        allow_partial: bool = False, **_: Any) -> dict[str, Any]:
    """Fine-tune; with `resume`, continue from `models/finetune/last.pt` at its epoch and step; `allow_partial`
    accepts an `init` whose encoder covers the model only in part."""
    from mme.data.datasets import VideoClsDataset

    env, paths, train = init_distributed(), Paths(workdir), cfg.finetune
    seed_everything(cfg.seed)
    train_set = VideoClsDataset(cfg, paths.workdir, "train", mode="train")
    val_set = VideoClsDataset(single_view(cfg), paths.workdir, "val", mode="test")
    # Mixup pairs clip i with clip B-1-i: batches must be full (drop_last).
    loader = make_loader(train_set, env, batch_size=train.batch_size, shuffle=True, seed=cfg.seed,
                         num_workers=cfg.data.num_workers, drop_last=True)
    val_loader = make_loader(val_set, env, batch_size=cfg.evaluate.batch_size, shuffle=False, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, drop_last=False)
    updates = updates_per_epoch(len(loader), train.accum_steps, f"finetune on {len(train_set)} clips")
    model = build_classifier(cfg, train_set.num_classes).to(env.device)
    optimizer, scheduler, total_batch = optimization(train, model, updates, env.world_size, train.layer_decay)
    scaler = make_scaler(env.device, train.amp)
    init = Path(init) if init else paths.models_dir("pretrain") / "checkpoint.pt"
    if resume:
        state = load_training_state(paths.models_dir(STAGE) / LAST, model=model, optimizer=optimizer,
                                    scheduler=scheduler, scaler=scaler, config=cfg.to_dict(), stage=STAGE)
    else:
        state = {"epoch": 0, "history": [], "pretrain_run_id": init_from(model, init, allow_partial)}
    keep = dict(config=cfg.to_dict(), model_args=model_args(cfg), num_classes=train_set.num_classes,
                pretrain_run_id=state.get("pretrain_run_id"))
    loss_fn = ClassificationLoss(train_set.num_classes, train.mixup, train.cutmix, train.label_smoothing)
    ddp_model = wrap_ddp(model, env)
    recorder = EpochRecorder(paths.plots_dir / f"{STAGE}.csv", env.is_main, state["history"])
    tags = {"pretrain_run_id": keep["pretrain_run_id"] or "none", "init": str(init)}
    with stage_run(cfg, paths.workdir, STAGE, enabled=env.is_main, tags=tags) as mlrun:
        keep["mlflow_run_id"] = mlrun.info.run_id if mlrun else None
        log_params({"pretrain_run_id": tags["pretrain_run_id"], "derived.total_batch": total_batch})
        for epoch in range(state["epoch"], train.epochs):
            set_epoch(loader, epoch)
            stats = train_one_epoch(ddp_model, loader, optimizer, scheduler, loss_fn, epoch=epoch,
                                    updates_per_epoch=updates, device=env.device, accum_steps=train.accum_steps,
                                    clip_grad=train.clip_grad, amp=train.amp, scaler=scaler,
                                    show_progress=env.is_main)
            val = evaluate(unwrap(ddp_model), val_loader, env.device, train.amp, show_progress=env.is_main)
            recorder.record(epoch, stats | {f"val_{k}": v for k, v in val.items()})
            if env.is_main:
                save_checkpoint(paths.models_dir(STAGE) / LAST, model=model, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, epoch=epoch + 1, step=(epoch + 1) * updates,
                                history=recorder.rows, stage=STAGE, **keep)
        return finish_stage(STAGE, paths, env, model, recorder.rows, ("loss", "val_top1", "val_top5", "clips_per_s"),
                            epoch=train.epochs, step=train.epochs * updates, **keep)
