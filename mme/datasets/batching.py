"""Pre-training targets built per batch: the item inputs a worker delivers, their collate, one build per batch.

A `PretrainDataset(..., targets=False)` item carries what its targets are built from instead of the targets
(`pretrain_inputs`): the normalised `video` and the `mask` as always, plus the augmented frames (`luma` only
when the kind reads no colour, `frames` otherwise), the flow window zero-padded to the kind's
`flow_pairs(geo)` with its real pair count `flow_pairs`, and, where known, `cut_pairs` and `backward`.
Those fixed shapes stack with the default collate. `build_targets` then makes `target` / `target_valid` for
the whole batch with ONE `TargetSpec.build_batch` call, on the batch's device; it is the same function
wherever it runs: in the training step (`targets_on = device`) or in the loader's `collate_fn` in the worker
processes (`targets_on = loader`, `TargetCollate`). The numbers equal the per-item path (`build` of each
clip) within 1e-5: `tests/test_batch_targets.py`.

Where (`data.targets_on`): `device` on cuda (a GPU builds a batch's targets in milliseconds, and the
workers then only decode); on CPU `auto` takes `CPU_TARGETS_ON`, the measured winner on the 2-core machine
(`benchmarks/bench_pipeline.py`, README "Speed").
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from mme.targets import TargetBatch, TargetGeometry, TargetSpec

# The keys of an inputs item besides `video` and `mask` (absent keys: not delivered).
INPUT_KEYS = ("frames", "luma", "flow", "flow_pairs", "cut_pairs", "backward")
CPU_TARGETS_ON = "device"  # measured winner on 2 cores: benchmarks/results/pipeline.json


def targets_on(cfg, device: torch.device) -> str:
    """`data.targets_on` resolved: `device` on cuda under auto, `CPU_TARGETS_ON` on CPU."""
    choice = cfg.data.targets_on
    if choice != "auto":
        return choice
    return "device" if device.type == "cuda" else CPU_TARGETS_ON


def batch_offsets(spec: TargetSpec, geo: TargetGeometry) -> torch.Tensor:
    """long (F,) the sorted frame offsets every clip of the kind decodes (shared by a batch)."""
    return torch.tensor(sorted(set(geo.input_offsets) | spec.frame_offsets(geo)), dtype=torch.long)


def collate_inputs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack inputs items; a clip whose cuts are unknown gets no cut where others know theirs."""
    if any("cut_pairs" in item for item in items) and not all("cut_pairs" in item for item in items):
        length = next(item["cut_pairs"] for item in items if "cut_pairs" in item).shape
        items = [item if "cut_pairs" in item else item | {"cut_pairs": torch.zeros(length, dtype=torch.bool)}
                 for item in items]
    return default_collate(items)


def target_batch(spec: TargetSpec, cfg, batch: dict[str, Any]) -> TargetBatch:
    """The `TargetBatch` of a collated inputs batch (on the batch's device)."""
    geo = TargetGeometry.from_cfg(cfg)
    images = batch.get("frames", batch.get("luma"))
    offsets = batch_offsets(spec, geo).to(images.device)
    return TargetBatch(batch.get("frames"), offsets, batch.get("flow"), batch.get("flow_pairs"), batch.get("luma"),
                       cut_pairs=batch.get("cut_pairs"), backward=batch.get("backward"))


def build_targets(spec: TargetSpec, cfg, batch: dict[str, Any]) -> dict[str, Any]:
    """A collated inputs batch -> `video`, `mask`, `target`, `target_valid` (one `build_batch` call).

    Runs without autograd and in float32 even inside the training step's autocast, so the targets are the
    same numbers wherever they are built.
    """
    if "target" in batch:
        return batch
    inputs = target_batch(spec, cfg, batch)
    with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
        target, target_valid = spec.build_batch(inputs, cfg)
    rest = {key: value for key, value in batch.items() if key not in INPUT_KEYS}
    return rest | {"target": target, "target_valid": target_valid}


class TargetCollate:
    """`collate_fn` that builds the batch's targets in the loader's worker (`targets_on = loader`)."""

    def __init__(self, spec: TargetSpec, cfg):
        self.spec, self.cfg = spec, cfg

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return build_targets(self.spec, self.cfg, collate_inputs(items))
