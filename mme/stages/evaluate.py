"""Stage `evaluate`: multi-view testing of a fine-tuned classifier on the TEST split.

The model is `models/finetune/checkpoint.pt`, `--init scratch` (or `none`) for the from-scratch floor
`models/finetune_scratch/checkpoint.pt`, or any checkpoint path; the outputs are named after the stage
that wrote the checkpoint (`finetune` -> `evaluate`, `finetune_scratch` -> `evaluate_scratch`).

Each test video gives `evaluate.num_clips` temporal clips × `evaluate.num_crops` spatial crops; the
softmax of the views is averaged. Reports top-1, top-5, per-class and mean-class accuracy to
`reports/metrics/<name>.json`, which test clips were right (`ft_top1`) to the per-clip record
`reports/metrics/<name>.per_clip.json` (`mme.reports.per_clip`), the confusion matrix to
`reports/figures/confusion.png` (`confusion_scratch.png`, ...), and the same to one MLflow run tagged with
the pre-training run id the fine-tuned checkpoint recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mme.config import Config
from mme.engine.checkpointing import FINAL
from mme.engine.distributed import process_group
from mme.engine.loops import make_loader, predict, topk_accuracy
from mme.engine.tracking import log_artifact, log_metrics, log_params, stage_run
from mme.models import classifier_from_args, load_checkpoint, model_args, read_checkpoint
from mme.paths import Paths
from mme.reports import per_clip
from mme.utils import atomic_path, seed_everything, write_json, write_metrics

STAGE = "evaluate"
SCRATCH_INITS = ("none", "scratch")  # `--init scratch`: the from-scratch floor's checkpoint
PER_CLIP_METRIC = "ft_top1"  # the per-clip record's key (the ablation trial's metric name)


def checkpoint_path(paths: Paths, init: str | Path | None) -> Path:
    """The classifier to test: the fine-tuned one, the from-scratch one (`scratch`/`none`), or a path."""
    if init is None:
        return paths.models_dir("finetune") / FINAL
    if str(init) in SCRATCH_INITS:
        return paths.models_dir("finetune_scratch") / FINAL
    return Path(init)


def output_name(checkpoint: dict[str, Any]) -> str:
    """`evaluate` plus the suffix of the stage that wrote the checkpoint (`finetune_scratch` -> `_scratch`)."""
    stage = str(checkpoint.get("stage") or "finetune")
    return STAGE + (stage.removeprefix("finetune") if stage.startswith("finetune") else "")


def top1_predictions(probs: torch.Tensor) -> torch.Tensor:
    """(n, C) -> (n,) the class `topk_accuracy` counts as top-1: with bf16 logits two classes can tie, and
    `argmax` may break the tie differently from `topk`, so the confusion matrix and the per-clip record
    use this (their top-1 then equals the reported one)."""
    return probs.topk(1, dim=1).indices[:, 0]


def confusion_matrix(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(n, C) probabilities, (n,) labels -> (C, C) counts; row = true class, column = prediction."""
    flat = labels * num_classes + top1_predictions(probs)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Percent correct per true class (NaN for a class absent from the test set)."""
    totals = confusion.sum(dim=1).double()
    return (100.0 * confusion.diag().double() / totals).tolist()


def plot_confusion(confusion: torch.Tensor, class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.4 * len(class_names))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def class_names(cfg: Config, paths: Paths, num_classes: int) -> list[str]:
    try:
        from mme.data.lists import read_classes

        names = read_classes(paths.lists_dir(cfg.data.dataset))
    except (ImportError, OSError, ValueError):
        names = []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def run(cfg: Config, workdir: str | Path, init: str | Path | None = None, **_: Any) -> dict[str, Any]:
    """Test `models/finetune/checkpoint.pt` (or `--init`: `scratch` or a path) on the test split."""
    from mme.datasets import VideoClsDataset

    with process_group() as env:
        paths = Paths(workdir)
        seed_everything(cfg.seed)
        ckpt = checkpoint_path(paths, init)
        data = read_checkpoint(ckpt)
        name = output_name(data)
        figure = paths.figures_dir / f"confusion{name.removeprefix(STAGE)}.png"
        dataset = VideoClsDataset(cfg, paths.workdir, "test", mode="test")
        model = classifier_from_args(data.get("model_args") or model_args(cfg), dataset.num_classes)
        load_checkpoint(model.to(env.device), ckpt)
        loader = make_loader(dataset, env, batch_size=cfg.evaluate.batch_size, shuffle=False, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, drop_last=False)
        pretrain_run_id = data.get("pretrain_run_id")
        with stage_run(cfg, paths.workdir, name, enabled=env.is_main,
                       tags={"pretrain_run_id": pretrain_run_id or "none", "checkpoint": str(ckpt)}) as mlrun:
            probs, labels, indices = predict(model, loader, env.device, cfg.finetune.amp, show_progress=env.is_main)
            confusion = confusion_matrix(probs, labels, dataset.num_classes)
            per_class = per_class_accuracy(confusion)
            present = [a for a in per_class if a == a]  # NaN for classes without test videos
            metrics = topk_accuracy(probs, labels) | {"mean_class_accuracy": sum(present) / max(len(present), 1)}
            names = class_names(cfg, paths, dataset.num_classes)
            result = metrics | {
                "num_videos": len(labels), "views": cfg.evaluate.num_clips * cfg.evaluate.num_crops,
                "per_class_accuracy": {n: (a if a == a else None) for n, a in zip(names, per_class)},
                "confusion": confusion.tolist(),
                "pretrain_run_id": pretrain_run_id, "mlflow_run_id": mlrun.info.run_id if mlrun else None,
                "checkpoint": str(ckpt),
            }
            if env.is_main:
                log_params({"pretrain_run_id": pretrain_run_id or "none"})
                log_metrics(metrics)
                write_metrics(paths.metrics_dir / f"{name}.json", result, details=("per_class_accuracy",))
                clips = [dataset.items[int(i)][0] for i in indices]
                write_json(paths.metrics_dir / f"{name}.per_clip.json", per_clip.encode(per_clip.from_predictions(
                    clips, labels.tolist(), {PER_CLIP_METRIC: top1_predictions(probs).tolist()})))
                plot_confusion(confusion, names, figure)
                log_artifact(figure, "figures")
                log_artifact(paths.metrics_dir / f"{name}.json", "metrics")
        return result
