"""Training checkpoints: atomic save of everything a run needs to continue, and exact resume.

A checkpoint (`models/<stage>/last.pt` after every epoch, `checkpoint.pt` at the end) holds the model
weights, the optimizer, scheduler and grad-scaler states, the epoch and update step, the RNG states of
python, numpy and torch, the resolved config and the model arguments (so the model can be rebuilt from
the file alone), plus stage extras (MLflow run ids). It is written to a temporary file and renamed, so a
killed run leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mme.engine.distributed import unwrap
from mme.utils import atomic_path

LAST = "last.pt"
FINAL = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, model: nn.Module, epoch: int, step: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    scaler: torch.amp.GradScaler | None = None, config: dict[str, Any] | None = None,
                    model_args: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Write a checkpoint atomically.

    Args:
        epoch: number of completed epochs (a resume starts at this epoch index).
        step: number of completed optimizer updates.
        extra: stage data (e.g. `mlflow_run_id`, `pretrain_run_id`, `num_classes`, `history`).
    """
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rng_state(),
        "config": config,
        "model_args": model_args,
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_training_state(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None, scaler: torch.amp.GradScaler | None = None,
                        restore_rng: bool = True) -> dict[str, Any]:
    """Restore a run from `path` (strict weights, optimizer, scheduler, scaler, RNG); returns the file's dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (run the stage without --resume first)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
