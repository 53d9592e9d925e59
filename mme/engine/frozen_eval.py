"""Training and evaluation of a head on frozen features held in memory: a small (lr, epochs) grid is
trained on the train split, the grid point is chosen on VAL, and only then is the test split predicted.

Features are computed once per encoder (token features (n, N, D), or pooled (n, D) for the linear
probe) and handed in as tensors (any dtype, e.g. float16 to halve the memory; the head trains in
float32 on the features' device). Every grid point starts from the same seeded initialisation and sees
the same seeded batch order, so a fit is reproducible and grid points differ only by their
hyper-parameters. AdamW (no decay on biases, norms, queries) with a per-update cosine schedule and a
linear warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mme.engine.optim import build_optimizer, build_scheduler
from mme.models.attentive import build_head


@dataclass(frozen=True)
class ProbeGrid:
    """The hyper-parameters tried (`lrs` x `epochs`) and those held fixed."""

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    epochs: tuple[int, ...] = (20, 50)
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_epochs: int = 1
    min_lr: float = 0.0
    head_args: dict = field(default_factory=dict)  # e.g. {"num_heads": 4} for the attentive probe
    val_every: int = 1  # val top-1 after every val_every-th epoch and the last (a val pass can cost an epoch)


@torch.no_grad()
def predict(head: nn.Module, feats: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per clip: (n, ...) features -> (n,) int64 on the features' device."""
    head.eval()
    device = next(head.parameters()).device
    return torch.cat([head(feats[i:i + batch_size].to(device).float()).argmax(dim=-1).to(feats.device)
                      for i in range(0, len(feats), batch_size)])


def top1(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((predict(head, feats) == labels).float().mean()) if len(labels) else float("nan")


def train_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, lr: float, epochs: int,
               grid: ProbeGrid, seed: int, val: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[float]:
    """Train `head` in place on (feats, labels); returns the val top-1 after every `grid.val_every`-th epoch
    and the last (empty without val)."""
    order = torch.Generator().manual_seed(seed)
    per_epoch = max(len(labels) // grid.batch_size, 1)  # full batches: BatchNorm cannot train on one clip
    optimizer = build_optimizer(head, lr, grid.weight_decay)
    scheduler = build_scheduler(optimizer, epochs * per_epoch, grid.warmup_epochs * per_epoch, grid.min_lr)
    curve, step = [], 0
    for epoch in range(epochs):
        head.train()
        permutation = torch.randperm(len(labels), generator=order)
        for i in range(per_epoch):
            batch = permutation[i * grid.batch_size:(i + 1) * grid.batch_size]
            scheduler.step_update(step)
            loss = F.cross_entropy(head(feats[batch].float()), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if val is not None and ((epoch + 1) % grid.val_every == 0 or epoch + 1 == epochs):
            curve.append(top1(head, *val))
    return curve


Curves = dict[tuple[float, int], list[float]]  # (lr, epochs) -> val top-1 (%) after each epoch


def fit_probe(kind: str, train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
              val_labels: torch.Tensor, grid: ProbeGrid, seed: int,
              num_classes: int | None = None) -> tuple[nn.Module, dict[str, float], Curves]:
    """Train a `kind` head (`linear` | `attentive`) for every (lr, epochs) of `grid`; keep the one with
    the best final val top-1 (ties: the earlier grid point, i.e. the smaller lr, then fewer epochs).

    Args:
        train_feats, val_feats: (n, N, D) token features (the linear probe also takes (n, D)).
        train_labels, val_labels: (n,) class indices.
        num_classes: default 1 + the largest train or val label.
    Returns:
        (head in eval mode, {"lr", "epochs", "val_top1"}, {(lr, epochs): val top-1 per epoch}).
    """
    if len(train_labels) < 2:
        raise ValueError(f"fit_probe: {len(train_labels)} training clips; a probe needs at least 2")
    classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    best: tuple[float, nn.Module, dict[str, float]] | None = None
    curves: Curves = {}
    for lr in grid.lrs:
        for epochs in grid.epochs:
            with torch.random.fork_rng():  # the same initialisation for every grid point
                torch.manual_seed(seed)
                head = build_head(kind, train_feats.shape[-1], classes, **grid.head_args).to(train_feats.device)
            if getattr(head, "standardize", False):
                head.set_standardization(train_feats)
            curve = train_head(head, train_feats, train_labels, lr, epochs, grid, seed, (val_feats, val_labels))
            curves[(lr, epochs)] = curve
            if best is None or curve[-1] > best[0]:
                best = (curve[-1], head, {"lr": lr, "epochs": epochs, "val_top1": curve[-1]})
    return best[1].eval(), best[2], curves


@dataclass
class FrozenEval:
    """What a frozen evaluation reports: the fit (chosen on val) and the test split's per-clip results."""

    kind: str
    chosen: dict[str, float]
    curves: Curves
    test_predictions: torch.Tensor  # (n_test,) predicted class
    test_correct: torch.Tensor  # (n_test,) 1.0 where the prediction is the label
    test_top1: float
    head: nn.Module | None = None  # the chosen head, in eval mode


def evaluate_frozen(kind: str, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor], grid: ProbeGrid, seed: int,
                    num_classes: int | None = None) -> FrozenEval:
    """`fit_probe` on train/val, then predict test: the test labels are read only to score the result."""
    head, chosen, curves = fit_probe(kind, *train, *val, grid, seed, num_classes)
    predictions = predict(head, test[0])
    correct = (predictions == test[1]).float()
    return FrozenEval(kind, chosen, curves, predictions, correct, 100.0 * float(correct.mean()), head)
