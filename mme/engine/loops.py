"""Generic training and evaluation loops (one epoch of updates; multi-view prediction).

`train_one_epoch` knows nothing about the task: a stage passes `compute_loss(model, batch) -> (loss,
parts)`. The loop owns the per-update lr schedule, mixed precision, gradient accumulation (DDP gradient
sync only on the last micro-batch), clipping, the non-finite loss guard, throughput and a progress bar.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mme.engine.distributed import DistEnv, all_gather_cat, all_reduce_sum, make_sampler
from mme.engine.optim import current_lr

LossFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss became NaN/inf; the run stops before the bad update, the last checkpoint stays valid.

    A ValueError too, so the command line reports it as one line like other bad-input errors.
    """


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run in hardware on this kind of device. A CPU needs AMX or AVX-512-BF16 (oneDNN's
    check); without them bf16 is emulated: on a 2-core AVX2-only EPYC, 0.85 against 97 GFLOP/s in fp32 for
    1024² matmuls, a ViT-S pre-training step 23x slower than in fp32 (benchmarks/bench_pretrain_step.py)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return device_type != "cpu" or check is None or bool(check())


@functools.cache
def compute_platform() -> dict[str, str]:
    """What this process computes on, for results that name their hardware: bf16 kernels differ between AMX,
    AVX-512-BF16 and GPUs, so a re-run on another kind agrees in distribution, not bit for bit."""
    if torch.cuda.is_available():
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    flags, model = set(), ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and not model:
                model = value.strip()
    bf16 = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else (
        "native" if native_bf16("cpu") else "emulated")
    return {"device": "cpu", "cpu": model or "unknown", "bf16": bf16, "torch": torch.__version__}


def platform_name(platform: dict[str, str] | None) -> str | None:
    """A `compute_platform()` record in words ("AMD EPYC (avx512_bf16 bf16)", or "AMD EPYC (fp32)" when the
    record's `precision` says the part ran without autocast, where the bf16 kind is moot); None for no record."""
    if not platform:
        return None
    if platform.get("precision") == "fp32":
        return f"{platform.get('gpu') or platform.get('cpu', 'unknown')} (fp32)"
    return platform.get("gpu") or f"{platform.get('cpu', 'unknown')} ({platform.get('bf16', '?')} bf16)"


@functools.cache
def _warn_emulated_bf16(device_type: str) -> None:
    # Once per process and device kind: the fix (fp32) changes the results, so it is the user's choice.
    warnings.warn(f"bf16 autocast (pretrain.amp / finetune.amp = bf16) on a {device_type} without native bf16 "
                  "matmuls: they are emulated, and a training step runs ~20x slower than in fp32. Set "
                  "pretrain.amp=off and finetune.amp=off for fp32 (other float rounding, so other results and "
                  "result digests).", stacklevel=3)


def emulated_bf16_keys(cfg: Any) -> list[str]:
    """The `<stage>.amp` keys of `cfg` that would autocast to bf16 on a device of this process that emulates it
    (fp16 means bf16 on a CPU): a run that must know before it starts (hours, not minutes) asks here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if native_bf16(device):
        return []
    return [f"{stage}.amp" for stage in ("pretrain", "finetune")
            if getattr(cfg, stage).amp == "bf16" or (getattr(cfg, stage).amp == "fp16" and device == "cpu")]


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """'bf16' | 'fp16' | 'off' -> autocast dtype; fp16 needs CUDA (bf16 is used on CPU instead)."""
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        warnings.warn("fp16 autocast needs CUDA; using bf16 on CPU", stacklevel=2)
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if not native_bf16(device.type):
        _warn_emulated_bf16(device.type)
    return torch.bfloat16


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    dtype = amp_dtype(amp, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 on CUDA (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(amp, device) == torch.float16)


def _worker_init(worker_id: int) -> None:  # noqa: ARG001
    import cv2

    torch.set_num_threads(1)  # workers decode and build targets; one thread each avoids oversubscription
    cv2.setNumThreads(1)


def prefetch_batches(num_workers: int) -> int:
    """DataLoader `prefetch_factor`: about two batches in flight in all (at least one per worker), so that one
    is ready when the step ends and one is being made, without multiplying the memory by the workers."""
    return max(1, math.ceil(2 / max(num_workers, 1)))


def main_threads(num_workers: int, cores: int | None = None, light_workers: bool = False) -> int:
    """Torch threads of the training process beside `num_workers` loader workers on CPU: the cores busy
    workers leave, at least 1; every core when the workers are light. Measured on 2 cores
    (benchmarks/results/pipeline.json): the bare mini step ran 18.5 clips/s on 1 thread and 3.5 on 2 while
    other processes held the cores, because OpenMP threads that wait for a descheduled sibling stall the whole
    step; but fine-tuning's decode-only items cost so little beside its step that 2 threads beside 2 workers
    ran it at 36.9 clips/s against 27.8 on 1 (pre-training, whose workers crop frames and flow: 35.9 vs 42.2;
    inference on decoded val clips: 57 vs 82, so both keep the rule)."""
    cores = cores or host_cores()
    return cores if light_workers else max(1, cores - num_workers)


def host_cores() -> int:
    """The cores this process may use, shared out among the ranks torchrun started on this host."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def make_loader(dataset: Dataset, env: DistEnv, *, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                drop_last: bool, collate_fn: Callable[[list[Any]], Any] | None = None,
                light_workers: bool = False) -> DataLoader:
    """A loader over this rank's share; its order depends only on (seed, epoch) — call `set_epoch`.

    Workers persist across epochs when the dataset shares its epoch with them (`epoch_shared`: the epoch
    lives in shared memory, so `set_epoch` in this process reaches the workers); memory is pinned on cuda.
    On CPU with workers, this process keeps `main_threads(num_workers, light_workers=...)` torch threads
    (the last loader made decides: make the training loader last).
    """
    sampler = make_sampler(dataset, env, shuffle=shuffle, seed=seed, drop_last=drop_last and shuffle)
    workers = {}
    if num_workers > 0:
        if env.device.type == "cpu":
            torch.set_num_threads(main_threads(num_workers, light_workers=light_workers))
        workers = {"persistent_workers": bool(getattr(dataset, "epoch_shared", False)),
                   "prefetch_factor": prefetch_batches(num_workers)}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, worker_init_fn=_worker_init, pin_memory=env.device.type == "cuda",
                      collate_fn=collate_fn, **workers)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Re-seed the sampler's shuffle and the dataset's per-epoch randomness (masks, crops)."""
    for part in (loader.sampler, loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def batch_size(batch: dict[str, Any]) -> int:
    return len(next(v for v in batch.values() if torch.is_tensor(v)))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class MeanMeter:
    """Sample-weighted means of named scalars, summed over ranks at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, values: dict[str, torch.Tensor | float], n: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.count += n

    def summary(self) -> dict[str, float]:
        names = sorted(self.sums)
        totals = all_reduce_sum(torch.tensor([self.sums[k] for k in names] + [self.count], dtype=torch.float64))
        count = max(float(totals[-1]), 1.0)
        return {name: float(total) / count for name, total in zip(names, totals[:-1])} | {"clips": count}


def _all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (all ranks must stop together)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0])
    return float(all_reduce_sum(bad)) == 0.0


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    clip_grad: float | None) -> None:
    scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model: nn.Module, loader: Iterable[dict[str, Any]], optimizer: torch.optim.Optimizer,
                    scheduler: Any, compute_loss: LossFn, *, epoch: int, updates_per_epoch: int,
                    device: torch.device, accum_steps: int = 1, clip_grad: float | None = None,
                    amp: str = "off", scaler: torch.amp.GradScaler | None = None,
                    show_progress: bool = True) -> dict[str, float]:
    """Run `updates_per_epoch` optimizer updates of `accum_steps` micro-batches each.

    Returns:
        means over the epoch's clips of `loss` and every `loss_<part>`, plus `lr`, `clips_per_s`,
        `epoch_time`, `clips` (all ranks).
    Raises:
        NonFiniteLossError: a NaN/inf loss, before any update is applied with it.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    meter, start = MeanMeter(), time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    micro_batches = islice(loader, updates_per_epoch * accum_steps)
    bar = tqdm(micro_batches, total=updates_per_epoch * accum_steps, desc=f"epoch {epoch}",
               disable=not show_progress, mininterval=2.0, leave=False)
    for i, batch in enumerate(bar):
        step = epoch * updates_per_epoch + i // accum_steps
        if i % accum_steps == 0:
            scheduler.step_update(step)
        batch = to_device(batch, device)
        syncs = (i + 1) % accum_steps == 0  # DDP reduces gradients on the last micro-batch only
        with (contextlib.nullcontext() if syncs or not hasattr(model, "no_sync") else model.no_sync()):
            with autocast(device, amp):
                loss, parts = compute_loss(model, batch)
            if not _all_finite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at epoch {epoch}, update {step} "
                    f"(parts: { {k: float(v.detach()) for k, v in parts.items()} }); stopped before applying it — "
                    f"the last good checkpoint is kept; lower the lr or use amp=bf16/off")
            scaler.scale(loss / accum_steps).backward()
        if syncs:
            _optimizer_step(model, optimizer, scaler, clip_grad)
        meter.update({"loss": loss.detach()} | {f"loss_{k}": v.detach() for k, v in parts.items()},
                     batch_size(batch))
        if i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", clips_s=f"{meter.count / (time.perf_counter() - start):.1f}")
    elapsed = time.perf_counter() - start
    stats = meter.summary()
    return stats | {"lr": current_lr(optimizer), "epoch_time": elapsed, "clips_per_s": stats["clips"] / elapsed}


def average_views(logits: torch.Tensor) -> torch.Tensor:
    """(B, V, C) logits of V views per video -> (B, C) class probabilities (softmax, mean over views)."""
    return logits.float().softmax(dim=-1).mean(dim=1)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, amp: str = "off",
            show_progress: bool = True, reduce_views: Callable[[torch.Tensor], torch.Tensor] = average_views
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model outputs of every video of the loader, reduced over views (all ranks, each video once).

    Batches hold `video` (B, 3, T, H, W) or (B, V, 3, T, H, W), `label` (B,), `index` (B,).
    Returns:
        outputs (n, C) (`reduce_views` of the (B, V, C) outputs: view-averaged probabilities by default),
        labels (n,), indices (n,), sorted by dataset index.
    """
    model.eval()
    outputs, labels, indices = [], [], []
    for batch in tqdm(loader, desc="predict", disable=not show_progress, mininterval=2.0, leave=False):
        video = batch["video"].to(device, non_blocking=True)
        views = video.unsqueeze(1) if video.ndim == 5 else video  # (B, V, 3, T, H, W)
        with autocast(device, amp):
            out = model(views.flatten(0, 1))
        outputs.append(reduce_views(out.float().reshape(*views.shape[:2], -1)).cpu())
        labels.append(batch["label"].cpu())
        indices.append(batch["index"].cpu())
    return unique_by_index(*(all_gather_cat(torch.cat(x)) for x in (outputs, labels, indices)))


def unique_by_index(outputs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort by dataset index and keep one row per index (DistributedSampler pads ranks by repeating)."""
    order = torch.argsort(indices, stable=True)
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[1:] = indices[order][1:] != indices[order][:-1]
    order = order[keep]
    return outputs[order], labels[order], indices[order]


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...} in percent; k is capped at the number of classes."""
    result = {}
    for k in ks:
        top = probs.topk(min(k, probs.shape[1]), dim=1).indices
        hits = (top == labels[:, None]).any(dim=1).float()
        result[f"top{k}"] = 100.0 * float(hits.mean()) if len(hits) else math.nan
    return result


def evaluate(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, amp: str = "off",
             show_progress: bool = True) -> dict[str, float]:
    """Top-1/top-5 (percent) of the view-averaged predictions."""
    probs, labels, _ = predict(model, loader, device, amp, show_progress)
    return topk_accuracy(probs, labels)
