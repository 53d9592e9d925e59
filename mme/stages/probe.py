"""Stage `probe`: the frozen-encoder probes, linear (paper Table 4, after SVT) and attentive (V-JEPA's readout).

The encoder of `models/pretrain/checkpoint.pt` (or `--init PATH`) is frozen. With `--init random` (or
`probe.init=random`) it is instead an untrained encoder built from the seeded initialisation: the
random-init floor, written under its own name (`probe_random`) and never reading or writing
`models/pretrain`. Its TOKEN features (n, N, D) of one centre view per video are computed once for the
train, val and test splits (float16, cached in `models/<name>/features.pt` and reused by `--resume` when
they came from the same source), then `mme.engine.frozen_eval.evaluate_frozen` trains a linear head
(mean-pooled tokens, parameter-free BatchNorm) and an attentive head (learned query cross-attending over
the tokens) over small lr grids with AdamW, chooses each on VAL, and only then predicts TEST.

Writes (`<name>` = `probe`, or `probe_random` for the floor): `models/<name>/{features,checkpoint}.pt`,
`reports/plots/<name>.csv` (the chosen heads' val top-1 per epoch), `reports/metrics/<name>.json`
(`top1` and `attentive_top1` on test, `val_top1`, the chosen hyper-parameters) and the per-clip test
record `reports/metrics/<name>.per_clip.json` (`mme.reports.per_clip`; not a DVC metrics file).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mme.config import Config
from mme.engine.checkpointing import FINAL
from mme.engine.distributed import DistEnv, process_group
from mme.engine.fit import PRETRAIN_RUN_ID, single_view
from mme.engine.frozen_eval import FrozenEval, ProbeGrid, evaluate_frozen
from mme.engine.loops import make_loader, predict
from mme.engine.tracking import log_metrics, log_params, stage_run
from mme.models import VisionTransformer, load_checkpoint, model_args, pretrain_run_id, read_checkpoint
from mme.models.registry import encoder_args
from mme.paths import Paths
from mme.reports import per_clip
from mme.utils import atomic_path, seed_everything, write_json, write_metrics, write_text_atomic

STAGE = "probe"
RANDOM_STAGE = "probe_random"  # the random-init floor's models/, metrics and plots name
RANDOM = "random"  # `--init random`: probe the untrained encoder
SPLITS = ("train", "val", "test")
# The linear grid: lr x probe.lr, epochs x probe.epochs. Its heads cost seconds; measured on mini encoders
# the best val lr sat at the old grid's top (0.1-1 x probe.lr) for trained and untrained encoders alike.
LINEAR_LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
LINEAR_EPOCH_FACTORS = (1, 2)
ATTENTIVE_LR_FACTORS = (1.0,)  # x probe.attentive_lr: one point, each costs minutes on 2 cores (README)
RECIPE = 2  # bumped whenever the grids or heads change: probed numbers of another recipe are not comparable
ATTENTIVE_WEIGHT_DECAY = 0.05  # the attentive head has a block of weights to regularise; the linear one does not
METRIC_KEYS = {"linear": "probe_top1", "attentive": "attentive_top1"}  # per-clip record keys (the trial metrics)


class TokenEncoder(nn.Module):
    """Frozen encoder (with its final norm): (B, 3, T, H, W) -> (B, N, D) tokens."""

    def __init__(self, encoder: VisionTransformer):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video)


def wants_random(cfg: Config, init: str | Path | None) -> bool:
    """`--init random` or `probe.init=random`: probe the untrained encoder."""
    return cfg.probe.init == RANDOM or (init is not None and str(init) == RANDOM)


def stage_name(cfg: Config, init: str | Path | None = None) -> str:
    return RANDOM_STAGE if wants_random(cfg, init) else STAGE


def random_encoder(cfg: Config) -> VisionTransformer:
    """The untrained encoder of `cfg`: built right after seeding with `cfg.seed`, so the same seed gives the
    same weights (and the global RNG state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return VisionTransformer(**encoder_args(model_args(cfg)) | {"drop_path": 0.0})


def weights_digest(module: nn.Module) -> str:
    """sha1 of a module's parameters and buffers (names and values): what "the same weights" means."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_encoder(cfg: Config, path: Path) -> tuple[TokenEncoder, str | None]:
    """The pre-trained encoder (with its final norm) of a checkpoint, and its MLflow run id if recorded."""
    data = read_checkpoint(path)
    args = data.get("model_args") or model_args(cfg)
    encoder = VisionTransformer(**encoder_args(args) | {"drop_path": 0.0})
    load_checkpoint(encoder, path)
    return TokenEncoder(encoder), pretrain_run_id(data)


def compute_features(cfg: Config, paths: Paths, env: DistEnv, encoder: nn.Module) -> dict[str, Any]:
    """Centre-view token features of every split: split -> (features (n, N, D) float16, labels (n,), clip ids)."""
    from mme.datasets import VideoClsDataset

    view_cfg, out = single_view(cfg), {}
    encoder.to(env.device)
    for split in SPLITS:
        dataset = VideoClsDataset(view_cfg, paths.workdir, split, mode="test")
        loader = make_loader(dataset, env, batch_size=cfg.evaluate.batch_size, shuffle=False, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, drop_last=False)
        # The one view per video is squeezed out and the tokens kept in float16 (half the memory).
        flat, labels, indices = predict(encoder, loader, env.device, cfg.pretrain.amp, show_progress=env.is_main,
                                        reduce_views=lambda x: x.mean(dim=1).half())
        tokens = flat.reshape(len(flat), -1, encoder.encoder.embed_dim)
        out[split] = (tokens, labels, [dataset.items[int(i)][0] for i in indices])
        out["num_classes"] = dataset.num_classes
    return out


def _source(cfg: Config, init: Path | None, random: bool) -> str:
    """What the features are a function of: the encoder (a checkpoint, or the seed and model of the untrained
    one) and the data settings; not the probe's own settings, so another probe recipe reuses them."""
    def digest(value: Any) -> str:
        return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]

    data = digest(cfg.to_dict()["data"])
    return f"{RANDOM}:seed={cfg.seed}:model={digest(model_args(cfg))}:data={data}" if random else f"{init}:data={data}"


def cached_features(cfg: Config, paths: Paths, env: DistEnv, name: str, init: Path | None, random: bool,
                    resume: bool) -> dict[str, Any]:
    """Features computed once per encoder: reused on resume when they came from the same source."""
    cache, source = paths.models_dir(name) / "features.pt", _source(cfg, init, random)
    if resume and cache.is_file():
        data = torch.load(cache, map_location="cpu", weights_only=False)
        if data.get("source") == source and all(split in data for split in SPLITS):
            return data
    if random:
        encoder, run_id = TokenEncoder(random_encoder(cfg)), None
    else:
        encoder, run_id = frozen_encoder(cfg, init)
    data = compute_features(cfg, paths, env, encoder) | {"source": source, PRETRAIN_RUN_ID: run_id,
                                                         "encoder_sha1": weights_digest(encoder.encoder)}
    if env.is_main:
        with atomic_path(cache) as tmp:
            torch.save(data, tmp)
    return data


def grids(cfg: Config, num_tokens: int) -> dict[str, ProbeGrid]:
    """The (lr, epochs) grids of the two heads (see LINEAR_LR_FACTORS, ATTENTIVE_LR_FACTORS); the attentive
    head standardises each of the `num_tokens` token positions."""
    probe = cfg.probe
    out = {"linear": ProbeGrid(lrs=tuple(f * probe.lr for f in LINEAR_LR_FACTORS),
                               epochs=tuple(f * probe.epochs for f in LINEAR_EPOCH_FACTORS),
                               weight_decay=probe.weight_decay, batch_size=probe.batch_size)}
    if probe.attentive_epochs > 0:
        out["attentive"] = ProbeGrid(lrs=tuple(f * probe.attentive_lr for f in ATTENTIVE_LR_FACTORS),
                                     epochs=(probe.attentive_epochs,), weight_decay=ATTENTIVE_WEIGHT_DECAY,
                                     batch_size=probe.batch_size, val_every=probe.attentive_epochs,
                                     head_args={"num_tokens": num_tokens})
    return out


def fit_heads(cfg: Config, data: dict[str, Any]) -> dict[str, FrozenEval]:
    """Both heads trained on train, chosen on val, scored on test; the linear one on mean-pooled tokens."""
    results = {}
    for kind, grid in grids(cfg, data["train"][0].shape[1]).items():
        splits = []
        for split in SPLITS:
            tokens, labels = data[split][0], data[split][1]
            splits.append((tokens.mean(dim=1, dtype=torch.float32) if kind == "linear" else tokens, labels))
        results[kind] = evaluate_frozen(kind, *splits, grid, cfg.seed, data["num_classes"])
    return results


def write_curves(path: Path, results: dict[str, FrozenEval]) -> None:
    """The chosen heads' val top-1 per epoch: columns epoch, val_top1 (linear), attentive_val_top1."""
    curves = {"val_top1" if kind == "linear" else f"{kind}_val_top1": r.curves[(r.chosen["lr"], r.chosen["epochs"])]
              for kind, r in results.items()}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["epoch", *curves])
    for epoch in range(max(len(c) for c in curves.values())):
        writer.writerow([epoch, *(f"{c[epoch]:.4f}" if epoch < len(c) else "" for c in curves.values())])
    write_text_atomic(path, buffer.getvalue())


def summary(results: dict[str, FrozenEval], data: dict[str, Any]) -> dict[str, Any]:
    """The metrics: test top-1 of each head, its val top-1 and the chosen hyper-parameters."""
    linear = results["linear"]
    metrics: dict[str, Any] = {"top1": linear.test_top1, "val_top1": linear.chosen["val_top1"],
                               "lr": linear.chosen["lr"], "epochs": int(linear.chosen["epochs"])}
    if "attentive" in results:
        att = results["attentive"]
        metrics |= {"attentive_top1": att.test_top1, "attentive_val_top1": att.chosen["val_top1"],
                    "attentive_lr": att.chosen["lr"], "attentive_epochs": int(att.chosen["epochs"])}
    counts = {f"num_{split}": len(data[split][1]) for split in SPLITS}
    tokens = data["train"][0]
    return metrics | counts | {"num_tokens": tokens.shape[1], "feature_dim": tokens.shape[2]}


def per_clip_record(results: dict[str, FrozenEval], data: dict[str, Any]) -> per_clip.PerClip:
    return per_clip.PerClip(tuple(data["test"][2]), {METRIC_KEYS[k]: r.test_correct.numpy()
                                                     for k, r in results.items()})


def run(cfg: Config, workdir: str | Path, resume: bool = False, init: str | Path | None = None,
        **_: Any) -> dict[str, Any]:
    """Both probes; `init` a checkpoint path or `random` (the floor); `resume` reuses the cached features."""
    with process_group() as env:
        paths, random = Paths(workdir), wants_random(cfg, init)
        name = stage_name(cfg, init)
        seed_everything(cfg.seed)
        source = None if random else Path(init) if init else paths.models_dir("pretrain") / FINAL
        started = time.perf_counter()
        data = cached_features(cfg, paths, env, name, source, random, resume)
        run_id = data.get(PRETRAIN_RUN_ID)
        tags = {PRETRAIN_RUN_ID: run_id or "none", "init": RANDOM if random else str(source)}
        with stage_run(cfg, paths.workdir, name, enabled=env.is_main, tags=tags) as mlrun:
            results = fit_heads(cfg, data)
            metrics = summary(results, data) | {"init": tags["init"], "encoder_sha1": data["encoder_sha1"],
                                                "seconds": round(time.perf_counter() - started, 2),
                                                PRETRAIN_RUN_ID: run_id,
                                                "mlflow_run_id": mlrun.info.run_id if mlrun else None}
            if env.is_main:
                log_params({PRETRAIN_RUN_ID: tags[PRETRAIN_RUN_ID], "derived.feature_dim": metrics["feature_dim"]})
                log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epochs"})
                save_heads(paths.models_dir(name) / FINAL, results, cfg, metrics)
                write_curves(paths.plots_dir / f"{name}.csv", results)
                write_metrics(paths.metrics_dir / f"{name}.json", metrics)
                write_json(paths.metrics_dir / f"{name}.per_clip.json", per_clip.encode(per_clip_record(results, data)))
        return metrics | {"checkpoint": str(paths.models_dir(name) / FINAL)}


def save_heads(path: Path, results: dict[str, FrozenEval], cfg: Config, metrics: dict[str, Any]) -> None:
    """The chosen heads' weights, what they were chosen by, and the config (no optimizer: nothing resumes it)."""
    heads = {kind: {"state_dict": r.head.state_dict() if r.head is not None else None, "chosen": r.chosen,
                    "test_predictions": r.test_predictions} for kind, r in results.items()}
    with atomic_path(path) as tmp:
        torch.save({"stage": path.parent.name, "heads": heads, "metrics": metrics, "config": cfg.to_dict()}, tmp)
