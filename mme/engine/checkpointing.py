"""Training checkpoints: atomic save of everything a run needs to continue, and exact resume.

A checkpoint (`models/<stage>/last.pt` after every epoch, `checkpoint.pt` at the end) holds the model
weights, the optimizer, scheduler and grad-scaler states, the epoch and update step, the RNG states of
python, numpy and torch, the resolved config and the model arguments (so the model can be rebuilt from
the file alone), plus stage extras (MLflow run ids). It is written to a temporary file and renamed, so a
killed run leaves the previous checkpoint intact.

Two guards keep a trained model from being lost or mixed up: a final checkpoint of a run that made no
update never replaces one that holds a trained model, and a resume is refused when the config stored
in `last.pt` differs from the current one on a key that changes what is trained (`RESUME_KEYS`).
Without `--resume` a stage resumes by itself only from an unfinished `last.pt` written under the same
resolved parameters (`auto_resume_refusal`: every key but the speed-only ones, the same parent run).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from mme.config import SPEED_ONLY
from mme.engine.distributed import unwrap
from mme.models.checkpoint import CheckpointError, read_checkpoint
from mme.utils import atomic_path

LAST = "last.pt"
FINAL = "checkpoint.pt"
# Keys a resume must share with the run it continues: the model, the clip geometry and dataset, and the
# stage's per-rank batch and accumulation (they fix the update size, the schedule length and the data
# order). Epoch counts and learning rates may change (extending a schedule is a resume).
RESUME_PREFIXES = ("model.",)
RESUME_KEYS = ("data.dataset", "data.num_frames", "data.input_size", "data.short_side", "data.stride",
               "data.sampling")
RESUME_STAGE_KEYS = ("batch_size", "accum_steps")


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
    if Path(path).name == FINAL:
        guard_final(path, step)
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


def guard_final(path: str | Path, step: int) -> None:
    """Refuse to replace a trained final checkpoint with the weights of a run that made no update.

    Raises:
        CheckpointError: `step` <= 0 while `path` holds a model trained for at least one update.
    """
    path = Path(path)
    if step > 0 or not path.is_file():
        return
    try:
        trained = int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("step") or 0)
    except Exception:  # noqa: BLE001  an unreadable file holds nothing worth keeping
        return
    if trained > 0:
        raise CheckpointError(f"refusing to replace {path} (trained for {trained} updates) with an untrained model "
                              f"({step} updates in this run); check the stage's epochs, or delete the file first")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any], stage: str) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every `RESUME_*` key whose value changed; keys missing from
    either config (an older file) are not compared."""
    old, new = _flat(saved), _flat(current)
    keys = [k for k in new if k.startswith(RESUME_PREFIXES)]
    keys += [*RESUME_KEYS, *(f"{stage}.{k}" for k in RESUME_STAGE_KEYS)]
    return [(k, old[k], new[k]) for k in dict.fromkeys(keys) if k in old and k in new and old[k] != new[k]]


def result_mismatches(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every config key but `SPEED_ONLY` that differs or that only
    one side has (`<missing>`)."""
    old, new, missing = _flat(saved or {}), _flat(current), "<missing>"
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
            if k not in SPEED_ONLY and old.get(k, missing) != new.get(k, missing)]


def auto_resume_refusal(last: str | Path, config: dict[str, Any], lineage: dict[str, Any], epochs: int) -> str | None:
    """Why `last` must not be resumed without `--resume`; None when it is an unfinished run of the same
    resolved parameters (`result_mismatches`) descending from the same runs (`lineage`, e.g. the
    pre-training run id). A `last.pt` of all `epochs` next to a final checkpoint of the same step is a
    finished run: a stage re-run under the same parameters means its code or data changed, so it starts over."""
    last = Path(last)
    try:
        state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001  an unreadable file is simply not resumed
        return f"it cannot be read ({type(exc).__name__})"
    changed = result_mismatches(state.get("config"), config)
    if changed:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed[:3])
        return f"it was written under other parameters ({shown}{', ...' if len(changed) > 3 else ''})"
    for key, value in lineage.items():
        if state.get(key) != value:
            return f"it descends from another run ({key} {state.get(key)!r}, now {value!r})"
    final = last.with_name(FINAL)
    if int(state.get("epoch") or 0) >= epochs and final.is_file():
        try:
            done = torch.load(final, map_location="cpu", weights_only=False, mmap=True).get("step")
        except Exception:  # noqa: BLE001
            done = None
        if done == state.get("step"):
            return f"it is the last epoch of the finished run in {final}"
    return None


def check_resume(path: str | Path, saved: dict[str, Any] | None, current: dict[str, Any], stage: str) -> None:
    """Raise a `CheckpointError` naming the keys on which `current` differs from the config of `path`."""
    changed = resume_mismatches(saved or {}, current, stage)
    if changed:
        diff = ", ".join(f"{k}={new!r} (the run has {old!r})" for k, old, new in changed)
        sets = " ".join(f"--set {k}={'null' if old is None else old}" for k, old, _ in changed)
        raise CheckpointError(f"cannot resume from {path}: {diff}; resume with the run's values ({sets}) "
                              "or start a new run without --resume")


def load_training_state(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None, scaler: torch.amp.GradScaler | None = None,
                        restore_rng: bool = True, config: dict[str, Any] | None = None,
                        stage: str | None = None) -> dict[str, Any]:
    """Restore a run from `path` (strict weights, optimizer, scheduler, scaler, RNG); returns the file's dict.

    Args:
        config, stage: the current resolved config (`Config.to_dict()`) and stage name; when given, the
            resume is refused if it differs from the file's config on a `RESUME_*` key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (run the stage without --resume first)")
    state = read_checkpoint(path, full=True)
    if config is not None and stage is not None:
        check_resume(path, state.get("config"), config, stage)
    try:
        unwrap(model).load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {path}: its weights do not fit this model "
                              f"({' '.join(str(exc).split())[:160]}); start a new run without --resume") from exc
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
