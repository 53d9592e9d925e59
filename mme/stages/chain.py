"""The ablation's trial, made of stages: pretrain -> finetune -> evaluate (test) and probe on a trial
directory, and the one-time data preparation of a study's dataset (download, extract).
`experiments/ablate.py` hands both to `mme.ablation.runner` (which sits below the stages and never imports
them).

A trial reports TEST numbers (hyper-parameters are chosen on val inside the stages): `ft_top1`/`ft_top5`
of the multi-view test of the fine-tuned classifier, `probe_top1` and `attentive_top1` of the frozen
probes, and `per_clip`, the encoded per-clip test record of those metrics (`mme.reports.per_clip`).

The floor trial (`probe.init=random` and `finetune.init=scratch`, the tables' "Random init" row) runs no
pre-training: it probes the untrained encoder and fine-tunes from scratch. Its results depend only on the
classification-relevant part of the resolved config (`floor_key`), so they are stored once per key under
`<workdir>/trials/floors/` and reused by every table whose floor resolves to the same config.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from mme.config import Config
from mme.paths import Paths
from mme.reports import per_clip
from mme.utils import write_json

FLOOR_DIR = "floors"
# Config sections and keys that only pre-training reads: a floor trial's results do not depend on them.
PRETRAIN_ONLY = ("target", "mask", "pretrain", "flow")
PRETRAIN_ONLY_KEYS = {"data": ("shuffle_frames",), "model": ("decoder_dim", "decoder_depth", "decoder_num_heads",
                                                             "decoder_mode")}
PART_SECTIONS = {"probe": ("probe",), "finetune": ("finetune",)}  # the section of the other part is dropped


def is_floor(cfg: Config) -> bool:
    """The trial of the random-init floor: an untrained probe and a from-scratch fine-tune."""
    return cfg.probe.init == "random" and cfg.finetune.init == "scratch"


def floor_key(cfg: Config, part: str) -> str:
    """Digest of what the floor's `part` (`probe` | `finetune`) reads from the resolved config."""
    tree = cfg.to_dict()
    for section in (*PRETRAIN_ONLY, *(s for p, sections in PART_SECTIONS.items() if p != part for s in sections)):
        tree.pop(section, None)
    for section, keys in PRETRAIN_ONLY_KEYS.items():
        for key in keys:
            tree[section].pop(key, None)
    text = json.dumps(tree, sort_keys=True, default=str)
    return f"{part}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def run_stage_chain(cfg: Config, trial_dir: Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """The real trial: pretrain -> finetune + evaluate -> probe (those named in `stages`) on `trial_dir`.

    Pre-training time is the stage's own `seconds` when it reports one, else the wall time of the call.
    """
    from mme.stages import pretrain

    metrics: dict[str, Any] = {}
    if not is_floor(cfg):
        started = time.perf_counter()
        result = pretrain.run(cfg, trial_dir)
        metrics = {"pretrain_seconds": float(result.get("seconds", time.perf_counter() - started)),
                   "pretrain_loss": _pick(result, ("loss",), "pretrain")}
    records = []
    for part, run_part in (("finetune", _finetune), ("probe", _probe)):
        if part in stages:
            found, record = _floor_part(cfg, trial_dir, part, run_part) if is_floor(cfg) else run_part(cfg, trial_dir)
            metrics |= found
            records.append(record)
    if records:
        metrics[per_clip.PER_CLIP_ATTR] = per_clip.encode(merge_records(records))
    return metrics


def _finetune(cfg: Config, trial_dir: Path) -> tuple[dict[str, float], per_clip.PerClip]:
    """Fine-tune (from the trial's pre-training, or from scratch), then the multi-view test."""
    from mme.stages import evaluate, finetune

    finetune.run(cfg, trial_dir)
    scratch = finetune.from_scratch(cfg, None)
    result = evaluate.run(cfg, trial_dir, init="scratch" if scratch else None)
    record = _read_record(trial_dir, "evaluate_scratch" if scratch else "evaluate")
    return {"ft_top1": _pick(result, ("top1",), "evaluate"), "ft_top5": _pick(result, ("top5",), "evaluate")}, record


def _probe(cfg: Config, trial_dir: Path) -> tuple[dict[str, float], per_clip.PerClip]:
    from mme.stages import probe

    result = probe.run(cfg, trial_dir)
    found = {"probe_top1": _pick(result, ("top1",), "probe")}
    if "attentive_top1" in result:
        found["attentive_top1"] = float(result["attentive_top1"])
    return found, _read_record(trial_dir, probe.stage_name(cfg))


def _read_record(trial_dir: Path, stem: str) -> per_clip.PerClip:
    return per_clip.decode(json.loads((Paths(trial_dir).metrics_dir / f"{stem}.per_clip.json").read_text()))


def shared_workdir(trial_dir: Path) -> Path:
    """The study's workdir: where the trial's `data` link points (the trial directory itself without one)."""
    link = Path(trial_dir) / "data"
    return Path(os.path.realpath(link)).parent if link.is_symlink() else Path(trial_dir)


def _floor_part(cfg: Config, trial_dir: Path, part: str, run_part: Any) -> tuple[dict[str, float], per_clip.PerClip]:
    """The floor's `part`, reused from `trials/floors/<key>.json` when a trial of any table already ran it."""
    store = shared_workdir(trial_dir) / "trials" / FLOOR_DIR / f"{floor_key(cfg, part)}.json"
    if store.is_file():
        saved = json.loads(store.read_text())
        print(f"ablate: floor {part} reused from {store}", flush=True)
        return saved["metrics"], per_clip.decode(saved["per_clip"])
    found, record = run_part(cfg, trial_dir)
    write_json(store, {"metrics": found, "per_clip": per_clip.encode(record), "trial_dir": str(trial_dir)})
    return found, record


def merge_records(records: list[per_clip.PerClip]) -> per_clip.PerClip:
    """One record of several stages' records of the same test list (aligned by clip id, first list's order)."""
    ids = records[0].clip_ids
    correct = {}
    for record in records:
        position = {c: i for i, c in enumerate(record.clip_ids)}
        missing = [c for c in ids if c not in position]
        if missing:
            raise ValueError(f"per-clip records of one trial disagree on the test list ({missing[0]!r} missing); "
                             "evaluate every stage on the same test list")
        correct |= {m: v[[position[c] for c in ids]] for m, v in record.correct.items()}
    return per_clip.PerClip(ids, correct)


def _pick(result: dict, keys: tuple[str, ...], stage: str) -> float:
    for key in keys:
        if key in result:
            return float(result[key])
    raise KeyError(f"mme.stages.{stage}.run returned none of {keys} (got {sorted(result)}); the ablation needs it")


def prepare_data(cfg: Config, workdir: Path) -> None:
    """Download and extract the study's dataset once, into the shared workdir, if lists or caches are missing."""
    from mme.stages import download, extract

    paths, dataset = Paths(workdir), cfg.data.dataset
    if not paths.list_file(dataset, "train").exists():
        print(f"ablate: no lists for {dataset} in {workdir}/data; running download once", flush=True)
        download.run(cfg, workdir)
    lists = [paths.list_file(dataset, split) for split in extract.FLOW_SPLITS]
    videos = sum(sum(1 for line in f.read_text().splitlines() if line.strip()) for f in lists if f.exists())
    flow_dir = paths.flow_dir(dataset)
    cached = sum(1 for _ in flow_dir.rglob("*.npz")) if flow_dir.exists() else 0
    if cached < videos:
        print(f"ablate: {cached}/{videos} flow caches for {dataset}; running extract once", flush=True)
        extract.run(cfg, workdir)
