"""Distributed data parallel plumbing: torchrun detection, process group, samplers, DDP wrap, reductions.

Launched by `torchrun --nproc_per_node N -m mme <stage>`, every process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment and joins one process group (gloo on CPU, nccl on CUDA). A plain
`mme <stage>` is world size 1 and uses the same code paths (samplers included), so the data order of a
run depends only on (seed, epoch) however it is launched. Only rank 0 logs and saves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the torchrun process group if launched by torchrun; pick the device.

    Args:
        device: 'cpu' or 'cuda' to force one; None takes CUDA when available.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank, world_size, local_rank, target)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[DistEnv]:
    """`init_distributed` for one stage: a process group it created is destroyed when the stage ends.

    A group that already existed (a caller that manages its own) is left as it was.
    """
    created = dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    env = init_distributed(device)
    try:
        yield env
    finally:
        if created:
            cleanup()


def make_sampler(dataset: Dataset, env: DistEnv, *, shuffle: bool, seed: int, drop_last: bool = False
                 ) -> DistributedSampler:
    """This rank's share of the dataset; call `set_epoch(epoch)` so the order depends on (seed, epoch)."""
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a `torch.compile` and/or DistributedDataParallel wrapper."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity without a process group); the result is on the input's device."""
    if not _active():
        return values
    summed = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(summed)
    return summed.to(values.device)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor (same shape on every rank) along dim 0 in rank order."""
    if not _active():
        return x
    local = x.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(x.device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
