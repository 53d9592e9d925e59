"""The ablation's trial, made of stages: pretrain -> finetune -> evaluate (test) and probe on a trial
directory, and the one-time data preparation of a study's dataset (download, extract).
`experiments/ablate.py` hands both to `mme.ablation.runner` (which sits below the stages and never imports
them).

A trial reports TEST numbers (hyper-parameters are chosen on val inside the stages): `ft_top1`/`ft_top5`
of the multi-view test of the fine-tuned classifier, `probe_top1` and `attentive_top1` of the frozen
probes, and `per_clip`, the encoded per-clip test record of those metrics (`mme.reports.per_clip`).

The floor trial (`probe.init=random` and `finetune.init=scratch`, the tables' "Random init" row) runs no
pre-training: it probes the untrained encoder and fine-tunes from scratch.

Shared results: a trial's parts (`pretrain`, `finetune`, `probe`) are stored under
`<workdir>/reports/results/<part>-<digest>.json` (committed with the tables, so a fresh clone resumes a study
from them instead of re-training), keyed by what the part reads from the resolved config
(`part_key`), and reused by any later trial, of any table, that resolves to the same key. So the reference
`traj` setting, which eight tables share, is pre-trained once per seed, and the floor once per
classification-relevant config (its key drops the pre-training-only sections). A trained trial reuses its
parts only when all of them are stored: a part missing means pre-training anyway, and then every part runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mme.ablation.studies import NOT_RECORDED, PLATFORM_ATTR
from mme.config import Config, result_tree
from mme.engine.loops import compute_platform, platform_name
from mme.motion.cache import flow_cache_path
from mme.paths import Paths
from mme.reports import per_clip
from mme.targets import TargetGeometry, get_target
from mme.utils import write_json

PARTS = ("pretrain", "finetune", "probe")  # in running order; a trial runs those named in its stages
# Config sections and keys that only pre-training reads: a floor trial's results do not depend on them.
PRETRAIN_ONLY = ("target", "mask", "pretrain", "flow")
PRETRAIN_ONLY_KEYS = {"data": ("shuffle_frames",), "model": ("decoder_dim", "decoder_depth", "decoder_num_heads",
                                                             "decoder_mode")}
BACKWARD_DATA = "data-fb"  # the trials' data with backward flow (data_dir_name)
UNREAD_SECTIONS = {"pretrain": ("finetune", "probe", "evaluate"), "finetune": ("probe",), "probe": ("finetune",)}
# Speed-only keys that the digests hold, because stored results were keyed with them before the rule that a
# digest leaves speed-only keys out (over-careful, never wrong); every later speed-only key is left out.
DIGESTED_SPEED_ONLY = frozenset({"data.num_workers", "data.synthetic.workers", "flow.workers", "data.targets_on"})


def is_floor(cfg: Config) -> bool:
    """The trial of the random-init floor: an untrained probe and a from-scratch fine-tune."""
    return cfg.probe.init == "random" and cfg.finetune.init == "scratch"


def part_key(cfg: Config, part: str) -> str:
    """Digest of what the trial's `part` (one of PARTS) reads from the resolved config; the probe's also
    holds the probe recipe's version, so a new recipe is not answered by an old result."""
    from mme.stages import probe

    tree = result_tree(cfg, keep=DIGESTED_SPEED_ONLY)
    for section in UNREAD_SECTIONS[part] + (PRETRAIN_ONLY if is_floor(cfg) else ()):
        tree.pop(section, None)
    if is_floor(cfg):
        for section, keys in PRETRAIN_ONLY_KEYS.items():
            for key in keys:
                tree[section].pop(key, None)
    if part == "probe":
        tree["probe_recipe"] = probe.RECIPE
        if is_floor(cfg) and cfg.pretrain.amp != "bf16":  # the floor's features are computed under it too;
            tree["features_amp"] = cfg.pretrain.amp      # every floor stored before 2026-12-03 was bf16
    if cfg.data.shuffle_frames and not is_floor(cfg) and get_target(cfg).follows_shuffle(TargetGeometry.from_cfg(cfg)):
        tree["targets_follow_shuffle"] = True  # since 2026-12-02; results from before kept the real order
    text = json.dumps(tree, sort_keys=True, default=str)
    return f"{part}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def run_stage_chain(cfg: Config, trial_dir: Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """The real trial on `trial_dir`: pretrain (not for a floor) -> finetune + evaluate -> probe (those
    named in `stages`), each part reused from the shared results when stored."""
    keys = trial_keys(cfg, stages)
    link_trial_data(cfg, trial_dir)
    workdir = shared_workdir(trial_dir)
    store = Paths(workdir).results_dir
    saved = {part: _load_part(store / f"{key}.json") for part, key in keys.items()}
    if not is_floor(cfg) and not all(found is not None for found in saved.values()):
        saved = {}  # a trained part needs this trial's own pre-training: run every part
    metrics: dict[str, Any] = {}
    records, platforms = [], []
    for part, key in keys.items():
        if saved.get(part) is not None:
            found, record, platform = saved[part]
            print(f"ablate: {part} reused from {store / key}.json", flush=True)
        else:
            (found, record), platform = RUN_PART[part](cfg, trial_dir), compute_platform() | precision(cfg, part)
            write_json(store / f"{key}.json",
                       {"metrics": found, "per_clip": per_clip.encode(record) if record else None,
                        "trial_dir": _relative(trial_dir, workdir), "platform": platform})
        metrics |= found
        records += [record] if record else []
        platforms.append(platform_name(platform) or NOT_RECORDED)
    if records:
        metrics[per_clip.PER_CLIP_ATTR] = per_clip.encode(merge_records(records))
    metrics[PLATFORM_ATTR] = " + ".join(dict.fromkeys(platforms))
    return metrics


def precision(cfg: Config, part: str) -> dict[str, str]:
    """The autocast the part ran under (`fp32` for `amp=off`), stored beside its platform. The probe computes
    its token features under `pretrain.amp`."""
    amp = (cfg.finetune if part == "finetune" else cfg.pretrain).amp
    return {"precision": "fp32" if amp == "off" else amp}


def trial_parts(cfg: Config, stages: tuple[str, ...]) -> list[str]:
    """The parts a trial runs, in order: pre-training (not for a floor), then those of `stages`."""
    return [p for p in PARTS if (p == "pretrain" and not is_floor(cfg)) or (p != "pretrain" and p in stages)]


def trial_keys(cfg: Config, stages: tuple[str, ...]) -> dict[str, str]:
    """part -> its key, for the parts the trial runs, in running order: what its results are stored under."""
    return {part: part_key(cfg, part) for part in trial_parts(cfg, stages)}


def trial_identity(cfg: Config, stages: tuple[str, ...]) -> str:
    """The trial's part keys as one text (the ablation grid's identity of a point)."""
    return " ".join(trial_keys(cfg, stages).values())


def is_stored(cfg: Config, stages: tuple[str, ...], workdir: Path) -> bool:
    """Every part of the trial is in `workdir`'s shared results: running it reads no data."""
    store = Paths(workdir).results_dir
    return all((store / f"{key}.json").is_file() for key in trial_keys(cfg, stages).values())


def _relative(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it: the stored results name no machine's directories."""
    resolved, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return str(resolved.relative_to(base)) if resolved.is_relative_to(base) else str(path)


def _load_part(path: Path) -> tuple[dict[str, float], per_clip.PerClip | None, dict | None] | None:
    """A stored part's metrics, per-clip record and platform (None in files from before 2026-12-02)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    record = per_clip.decode(saved["per_clip"]) if saved["per_clip"] else None
    return saved["metrics"], record, saved.get("platform")


def _pretrain(cfg: Config, trial_dir: Path) -> tuple[dict[str, float], None]:
    """Pre-train; its time is the stage's own `seconds` when it reports one, else the wall time of the call."""
    from mme.stages import pretrain

    started = time.perf_counter()
    result = pretrain.run(cfg, trial_dir)
    return {"pretrain_seconds": float(result.get("seconds", time.perf_counter() - started)),
            "pretrain_loss": _pick(result, ("loss",), "pretrain")}, None


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


RUN_PART = {"pretrain": _pretrain, "finetune": _finetune, "probe": _probe}


def _read_record(trial_dir: Path, stem: str) -> per_clip.PerClip:
    return per_clip.decode(json.loads((Paths(trial_dir).metrics_dir / f"{stem}.per_clip.json").read_text()))


def shared_workdir(trial_dir: Path) -> Path:
    """The study's workdir: where the trial's `data` link points (the trial directory itself without one)."""
    link = Path(trial_dir) / "data"
    return Path(os.path.realpath(link)).parent if link.is_symlink() else Path(trial_dir)


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


def data_dir_name(cfg: Config) -> str:
    """The folder under the workdir whose data the trial reads: `data`, the DVC pipeline's, or `data-fb` for a
    pre-training that needs backward flow (`target.fb_check`). Extracting that flow into `data/` would rewrite
    the flow and decoded caches `dvc.lock` records; `data-fb` links `data`'s videos and lists and holds its own
    caches (a cache with backward flow also serves a reader without the need)."""
    if not is_floor(cfg) and get_target(cfg).needs_flow and cfg.target.fb_check:
        return BACKWARD_DATA
    return "data"


def link_trial_data(cfg: Config, trial_dir: Path) -> None:
    """Point the trial directory's `data` link (the runner makes it to `data`) at the data its config reads."""
    link, workdir = Path(trial_dir) / "data", shared_workdir(trial_dir)
    target = workdir / data_dir_name(cfg)
    if link.is_symlink() and Path(os.path.realpath(link)) != Path(os.path.realpath(target)):
        link.unlink()
        link.symlink_to(target, target_is_directory=True)


def prepare_data(cfg: Config, workdir: Path, trials: Sequence[tuple[Config, tuple[str, ...]]] = ()) -> None:
    """Download the study's dataset and extract its flow once, into the shared workdir, where lists or valid
    caches are missing (into `data-fb` too when a trial needs backward flow: `data_dir_name`); nothing when
    every one of `trials` ((config, stages) pairs) is stored already (a fresh clone rebuilding the tables
    from the committed results)."""
    from mme.stages import download

    pending = [trial for trial, stages in trials if not is_stored(trial, stages, workdir)]
    if trials and not pending:
        print(f"ablate: all {len(trials)} trials are in {Paths(workdir).results_dir}; no data needed", flush=True)
        return
    paths, dataset = Paths(workdir), cfg.data.dataset
    if not paths.list_file(dataset, "train").exists():
        print(f"ablate: no lists for {dataset} in {workdir}/data; running download once", flush=True)
        download.run(cfg, workdir)
    needs: dict[str, Config] = {}
    for trial in pending or [cfg]:
        needs.setdefault(data_dir_name(trial), trial)
    for name, trial in sorted(needs.items()):
        _extract_missing(trial, Path(workdir), name)


def _extract_missing(cfg: Config, workdir: Path, name: str) -> None:
    """Run `mme extract` on the workdir's folder `name` unless every listed video has a cache valid for `cfg`."""
    import mlflow

    from mme.engine.tracking import setup_experiment
    from mme.motion.cache import cache_problem
    from mme.stages import extract

    root = workdir if name == "data" else _data_root(workdir, name)
    paths, dataset = Paths(root), cfg.data.dataset
    settings = extract.FlowSettings.of(cfg).expected_meta()
    videos = extract.listed_videos(paths, dataset, extract.FLOW_SPLITS)
    valid = sum(cache_problem(flow_cache_path(root, dataset, rel), settings, deep=False) is None for rel in videos)
    if valid == len(videos):
        return
    print(f"ablate: {valid}/{len(videos)} valid flow caches for {dataset} in {workdir / name}"
          f"{' (with backward flow)' if cfg.target.fb_check else ''}; running extract once", flush=True)
    if root == workdir:
        extract.run(cfg, workdir)
        return
    with mlflow.start_run(run_name=f"ablate data: {name}", experiment_id=setup_experiment(cfg, workdir),
                          tags={"stage": "ablate-data"}):
        extract.run(cfg, root)  # nested in the workdir's store, not one of its own under `root`


def _data_root(workdir: Path, name: str) -> Path:
    """A directory whose `data` is `<workdir>/<name>`: videos and lists linked from `<workdir>/data`, caches
    its own. It is a workdir for `mme extract` (its metrics land there) under the git-ignored `trials/`."""
    data = workdir / name
    for shared in ("raw", "lists"):
        (data / shared).parent.mkdir(parents=True, exist_ok=True)
        if not (data / shared).is_symlink():
            (data / shared).symlink_to(Path("..") / "data" / shared, target_is_directory=True)
    root = workdir / "trials" / f".{name}"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").is_symlink():
        (root / "data").symlink_to(data, target_is_directory=True)
    return root
