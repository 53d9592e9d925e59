"""Loading model weights from this project's checkpoints and from official VideoMAE/MME releases.

Accepted files: a dict holding the weights under `model` or `module` (official releases, this project's
`models/<stage>/*.pt`), or a bare state dict. Key adaptation, in order: DDP/compile prefixes are
removed; pre-training keys (`encoder.*`) are stripped for an encoder or classifier and the decoder keys
dropped; a bare encoder is given the `encoder.` prefix when loaded into a pre-trainer; position tables
are dropped (ours are fixed sinusoid buffers); tensors whose shape differs from the model's (a head for
another number of classes) are skipped. Everything not loaded is reported, and a file that loads no
encoder weight at all is an error.
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


@dataclass
class LoadReport:
    """What `load_checkpoint` did: keys the model kept at their init, keys of the file it ignored."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # dropped on purpose: pos tables, shape mismatches
    loaded: int = 0


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load on CPU; official files pickle an argparse namespace, so fall back to full unpickling."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train the stage first or pass --init)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict of weights")
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


def load_checkpoint(model: nn.Module, path: str | Path, verbose: bool = True) -> LoadReport:
    """Load weights from `path` into `model` (non-strict) and report what did not match.

    Raises:
        ValueError: no encoder weight (patch embedding or block) was loaded.
    """
    model = getattr(model, "module", model)  # a DDP wrapper
    own = model.state_dict()
    state, skipped = adapt_keys(extract_state_dict(read_checkpoint(path)), set(own))
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    skipped += [f"{k} (shape {tuple(state[k].shape)} vs model {tuple(own[k].shape)})" for k in mismatched]
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    loaded = [k for k in state if k in own]
    report = LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys), skipped, len(loaded))
    if not any(k.removeprefix("encoder.").startswith(ENCODER_PARTS) for k in loaded):
        example = ", ".join(sorted(extract_state_dict(read_checkpoint(path)))[:5]) or "no tensors"
        raise ValueError(f"checkpoint {path}: no encoder weights loaded into {type(model).__name__} "
                         f"(expected keys like 'blocks.0.attn.qkv.weight' or 'encoder.blocks.0...'; "
                         f"file has {example}); is it a VideoMAE/MME checkpoint of the same size?")
    if verbose:
        print(f"loaded {path}: {report.loaded} tensors; missing {report.missing}; unexpected {report.unexpected}; "
              f"skipped {len(report.skipped)} ({', '.join(report.skipped[:3])}{', ...' if len(skipped) > 3 else ''})")
    return report


def pretrain_run_id(data: dict[str, Any]) -> str | None:
    """The pre-training MLflow run a checkpoint descends from: recorded by later stages, or its own run."""
    return data.get("pretrain_run_id") or (data.get("mlflow_run_id") if data.get("stage") == "pretrain" else None)


def init_from(model: nn.Module, path: str | Path) -> str | None:
    """Load the starting weights; returns the pre-training MLflow run id the file records, if any."""
    load_checkpoint(model, path)
    return pretrain_run_id(read_checkpoint(path))
