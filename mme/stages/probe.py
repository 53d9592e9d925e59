"""Stage `probe`: linear probing of the frozen pre-trained encoder (paper Table 4, after SVT).

The encoder of `models/pretrain/checkpoint.pt` (or `--init`) is frozen; its mean-pooled features of one
centre view per video are computed once for the train and val splits (cached in
`models/probe/features.pt`), then a linear layer (preceded by a parameter-free BatchNorm, as MAE's
linear probe) is trained on them with SGD + cosine schedule for `probe.epochs`. Writes
`models/probe/{last,checkpoint}.pt`, `reports/plots/probe.csv`, `reports/metrics/probe.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from mme.config import Config
from mme.engine.checkpointing import LAST, load_training_state, save_checkpoint
from mme.engine.distributed import DistEnv, init_distributed
from mme.engine.loops import make_loader, predict, set_epoch, topk_accuracy, train_one_epoch
from mme.engine.optim import build_scheduler
from mme.engine.tracking import EpochRecorder, log_params, stage_run
from mme.models import VisionTransformer, load_checkpoint, model_args, read_checkpoint
from mme.models.registry import encoder_args
from mme.paths import Paths
from mme.stages.finetune import single_view
from mme.stages.pretrain import finish_stage
from mme.utils import atomic_path, seed_everything

STAGE = "probe"


class PooledEncoder(nn.Module):
    """Frozen encoder → mean over tokens: (B, 3, T, H, W) -> (B, D)."""

    def __init__(self, encoder: VisionTransformer):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video).mean(dim=1)


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters (feature whitening) + linear classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


class FeatureSet(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "label": self.labels[i]}


def probe_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return nn.functional.cross_entropy(model(batch["features"]), batch["label"]), {}


@torch.no_grad()
def probe_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return topk_accuracy(head.eval()(features).softmax(dim=-1), labels) if len(labels) else {}


def frozen_encoder(cfg: Config, path: Path) -> tuple[PooledEncoder, str | None]:
    """The pre-trained encoder (with its final norm) of a checkpoint, and its MLflow run id if recorded."""
    data = read_checkpoint(path)
    args = data.get("model_args") or model_args(cfg)
    encoder = VisionTransformer(**encoder_args(args) | {"drop_path": 0.0})
    load_checkpoint(encoder, path)
    run_id = data.get("pretrain_run_id") or (data.get("mlflow_run_id") if data.get("stage") == "pretrain" else None)
    return PooledEncoder(encoder), run_id


def compute_features(cfg: Config, paths: Paths, env: DistEnv, encoder: nn.Module) -> dict[str, Any]:
    """Centre-view features of the train and val splits: split -> (features (n, D), labels (n,))."""
    from mme.data.datasets import VideoClsDataset

    view_cfg, out = single_view(cfg), {}
    encoder.to(env.device)
    for split in ("train", "val"):
        dataset = VideoClsDataset(view_cfg, paths.workdir, split, mode="test")
        loader = make_loader(dataset, env, batch_size=cfg.evaluate.batch_size, shuffle=False, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, drop_last=False)
        features, labels, _ = predict(encoder, loader, env.device, cfg.pretrain.amp, show_progress=env.is_main,
                                      reduce_views=lambda x: x.mean(dim=1))
        out[split] = (features, labels)
        out["num_classes"] = dataset.num_classes
    return out


def cached_features(cfg: Config, paths: Paths, env: DistEnv, init: Path, resume: bool) -> dict[str, Any]:
    """Features computed once: reused on resume when they came from the same checkpoint."""
    cache = paths.models_dir(STAGE) / "features.pt"
    if resume and cache.is_file():
        data = torch.load(cache, map_location="cpu", weights_only=False)
        if data.get("source") == str(init):
            return data
    encoder, run_id = frozen_encoder(cfg, init)
    data = compute_features(cfg, paths, env, encoder) | {"source": str(init), "pretrain_run_id": run_id}
    if env.is_main:
        with atomic_path(cache) as tmp:
            torch.save(data, tmp)
    return data


def run(cfg: Config, workdir: str | Path, resume: bool = False, init: str | Path | None = None,
        **_: Any) -> dict[str, Any]:
    """Linear probe; with `resume`, continue from `models/probe/last.pt`."""
    env, paths, probe = init_distributed(), Paths(workdir), cfg.probe
    seed_everything(cfg.seed)
    init = Path(init) if init else paths.models_dir("pretrain") / "checkpoint.pt"
    data = cached_features(cfg, paths, env, init, resume)
    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    # The head is tiny: every rank trains the same one on all features (world size 1 for the loader).
    # Full batches only when there are enough clips: BatchNorm cannot train on a last batch of one.
    loader = make_loader(FeatureSet(train_x, train_y), DistEnv(), batch_size=probe.batch_size, shuffle=True,
                         seed=cfg.seed, num_workers=0, drop_last=len(train_y) > probe.batch_size)
    head = LinearProbe(train_x.shape[1], data["num_classes"])
    optimizer = torch.optim.SGD(head.parameters(), lr=probe.lr, momentum=0.9, weight_decay=probe.weight_decay)
    scheduler = build_scheduler(optimizer, probe.epochs * len(loader), 0, 0.0)
    state = {"epoch": 0, "history": []}
    if resume:
        state = load_training_state(paths.models_dir(STAGE) / LAST, model=head, optimizer=optimizer,
                                    scheduler=scheduler, config=cfg.to_dict(), stage=STAGE)
    pretrain_run_id = data.get("pretrain_run_id")
    recorder = EpochRecorder(paths.plots_dir / f"{STAGE}.csv", env.is_main, state["history"])
    with stage_run(cfg, paths.workdir, STAGE, enabled=env.is_main,
                   tags={"pretrain_run_id": pretrain_run_id or "none"}) as mlrun:
        run_id = mlrun.info.run_id if mlrun else None
        log_params({"pretrain_run_id": pretrain_run_id or "none", "derived.feature_dim": train_x.shape[1]})
        for epoch in range(state["epoch"], probe.epochs):
            set_epoch(loader, epoch)
            stats = train_one_epoch(head, loader, optimizer, scheduler, probe_loss, epoch=epoch,
                                    updates_per_epoch=len(loader), device=torch.device("cpu"),
                                    show_progress=False)
            val = probe_accuracy(head, val_x, val_y)
            recorder.record(epoch, stats | {f"val_{k}": v for k, v in val.items()})
            if env.is_main:
                save_checkpoint(paths.models_dir(STAGE) / LAST, model=head, optimizer=optimizer,
                                scheduler=scheduler, epoch=epoch + 1, step=(epoch + 1) * len(loader),
                                history=recorder.rows, config=cfg.to_dict(), stage=STAGE,
                                pretrain_run_id=pretrain_run_id, mlflow_run_id=run_id)
        return finish_stage(STAGE, paths, env, head, recorder.rows, ("loss", "val_top1", "val_top5"),
                            epoch=probe.epochs, step=probe.epochs * len(loader), config=cfg.to_dict(),
                            pretrain_run_id=pretrain_run_id, mlflow_run_id=run_id)
