"""Loading model weights from this project's checkpoints and from official VideoMAE/MME releases.

Accepted files: a dict holding the weights under `model` or `module` (official releases, this project's
`models/<stage>/*.pt`), or a bare state dict. Key adaptation, in order: DDP/compile prefixes are
removed; pre-training keys (`encoder.*`) are stripped for an encoder or classifier and the decoder keys
dropped; a bare encoder is given the `encoder.` prefix when loaded into a pre-trainer; position tables
are dropped (ours are fixed sinusoid buffers); tensors whose shape differs from the model's (a head for
another number of classes) are skipped. Everything not loaded is reported. A file that loads no
encoder weight at all is an error, and so is one whose encoder layout differs from the model's (encoder
weights missing or left over: another depth or size) unless `allow_partial` is given. A file that is not
a checkpoint (text, empty, truncated) fails with a `CheckpointError` naming it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PRETRAIN_ONLY = ("decoder.", "encoder_to_decoder.", "mask_token", "decoder_pos_embed")
ENCODER_PARTS = ("patch_embed.", "blocks.")
# What a non-checkpoint file makes torch.load raise (text: KeyError/UnpicklingError, truncated: EOFError,
# RuntimeError from the zip reader, ...).
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError, OSError, AttributeError,
               ImportError, IndexError, TypeError)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as asked; the message names the file and the fix."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did: keys the model kept at their init, keys of the file it ignored."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # dropped on purpose: pos tables, shape mismatches
    loaded: int = 0


def read_checkpoint(path: str | Path, full: bool = False) -> dict[str, Any]:
    """torch.load on CPU; official files pickle an argparse namespace, so fall back to full unpickling.

    Args:
        full: unpickle everything at once (this project's training states hold RNG states and numpy arrays).

    Raises:
        FileNotFoundError: no such file. CheckpointError: the file is empty or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train the stage first or pass --init)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted copy?); pass a .pt/.pth checkpoint")
    try:
        if full:
            data = torch.load(path, map_location="cpu", weights_only=False)
        else:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                data = torch.load(path, map_location="cpu", weights_only=False)
    except LOAD_ERRORS as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:120]
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({reason}); pass a .pt/.pth file saved "
                              "by this project or an official VideoMAE/MME release") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict of weights")
    return data


def extract_state_dict(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict (under `model`, `module`, `model_state` or `state_dict`, else the dict)."""
    for key in ("model", "module", "model_state", "state_dict"):
        if isinstance(data.get(key), dict):
            data = data[key]
            break
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    for prefix in WRAPPER_PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def adapt_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map checkpoint keys onto the model's layout; returns (state, keys dropped on purpose)."""
    model_is_pretrainer = any(k.startswith("encoder.") for k in model_keys)
    file_is_pretrainer = any(k.startswith("encoder.") for k in state)
    skipped = []
    if file_is_pretrainer and not model_is_pretrainer:
        skipped += [k for k in state if k.startswith(PRETRAIN_ONLY)]
        state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(PRETRAIN_ONLY)}
    elif model_is_pretrainer and not file_is_pretrainer:
        state = {f"encoder.{k}": v for k, v in state.items()}
    skipped += [k for k in state if k.split(".")[-1] in ("pos_embed", "decoder_pos_embed")]
    state = {k: v for k, v in state.items() if k.split(".")[-1] not in ("pos_embed", "decoder_pos_embed")}
    return state, skipped


def _encoder_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k.removeprefix("encoder.").startswith(ENCODER_PARTS)]


def _depth(keys: Any) -> int:
    """Number of transformer blocks a state dict holds (0 for none)."""
    indices = [int(k.removeprefix("encoder.").split(".")[1]) for k in keys
               if k.removeprefix("encoder.").startswith("blocks.") and k.split("blocks.")[1].split(".")[0].isdigit()]
    return max(indices, default=-1) + 1


def check_layout(report: LoadReport, path: Path, model: nn.Module, file_keys: list[str], allow_partial: bool) -> None:
    """Refuse a file whose encoder weights do not cover the model's exactly (another depth or size).

    Raises:
        CheckpointError: encoder weights missing or left over, and not `allow_partial`.
    """
    missing, unexpected = _encoder_keys(report.missing), _encoder_keys(report.unexpected)
    if allow_partial or not (missing or unexpected):
        return
    model_depth = _depth(model.state_dict())
    raise CheckpointError(
        f"checkpoint {path} does not fit the {type(model).__name__} ({len(missing)} encoder weights missing, "
        f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]}; the file has {_depth(file_keys)} "
        f"blocks, the model {model_depth}): set the model the file was trained with (--set model.depth=... "
        "or model.name=...), or pass --allow-partial to start the missing weights from random init")


def load_checkpoint(model: nn.Module, path: str | Path, verbose: bool = True,
                    allow_partial: bool = False) -> LoadReport:
    """Load weights from `path` into `model` (non-strict) and report what did not match.

    Args:
        allow_partial: accept a file whose encoder covers the model's only in part (warned, not refused).

    Raises:
        ValueError: no encoder weight (patch embedding or block) was loaded.
        CheckpointError: not a checkpoint, or encoder weights missing/unexpected without `allow_partial`.
    """
    model = getattr(model, "module", model)  # a DDP wrapper
    own = model.state_dict()
    file_state = extract_state_dict(read_checkpoint(path))
    state, skipped = adapt_keys(file_state, set(own))
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    skipped += [f"{k} (shape {tuple(state[k].shape)} vs model {tuple(own[k].shape)})" for k in mismatched]
    state = {k: v for k, v in state.items() if k not in mismatched}
    loaded = [k for k in state if k in own]
    if not any(k.removeprefix("encoder.").startswith(ENCODER_PARTS) for k in loaded):
        example = ", ".join(sorted(file_state)[:5]) or "no tensors"
        raise ValueError(f"checkpoint {path}: no encoder weights loaded into {type(model).__name__} "
                         f"(expected keys like 'blocks.0.attn.qkv.weight' or 'encoder.blocks.0...'; "
                         f"file has {example}); is it a VideoMAE/MME checkpoint of the same size?")
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(state) - set(own))
    report = LoadReport(missing, unexpected, skipped, len(loaded))
    check_layout(report, Path(path), model, list(file_state), allow_partial)
    model.load_state_dict(state, strict=False)
    if verbose:
        print(f"loaded {path}: {report.loaded} tensors; missing {report.missing}; unexpected {report.unexpected}; "
              f"skipped {len(report.skipped)} ({', '.join(report.skipped[:3])}{', ...' if len(skipped) > 3 else ''})")
    return report


def pretrain_run_id(data: dict[str, Any]) -> str | None:
    """The pre-training MLflow run a checkpoint descends from: recorded by later stages, or its own run."""
    return data.get("pretrain_run_id") or (data.get("mlflow_run_id") if data.get("stage") == "pretrain" else None)


def init_from(model: nn.Module, path: str | Path, allow_partial: bool = False) -> str | None:
    """Load the starting weights; returns the pre-training MLflow run id the file records, if any."""
    load_checkpoint(model, path, allow_partial=allow_partial)
    return pretrain_run_id(read_checkpoint(path))
