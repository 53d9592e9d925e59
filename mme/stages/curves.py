"""Learning curves: frozen-probe test top-1 against pre-training epochs, beside the untrained encoder.

For each target kind and seed, one pre-training run of `epochs` epochs keeps snapshots of its weights after
the epochs in `snapshots` (`TrainingPlan.snapshots`); each snapshot and the seeded untrained encoder are
probed by the real `probe` stage (linear + attentive heads, chosen on val, scored on test). Each row gives
the test top-1 with its 95 % bootstrap CI over the test clips, and the paired difference to the untrained
encoder of the same seed (same clips) with its CI (mme.reports.stats).

A snapshot inside a longer cosine schedule is not the end of a shorter schedule (its learning rate has not
decayed), so a curve point is a lower bound on what a schedule of that length reaches; the end of the
curve is a complete schedule. Runs live in `<root>/<kind>-s<seed>-<digest>/` (data symlinked from `data_dir`), each
probed encoder in its own `points/e<epoch>/` with its token features cached, so an interrupted curve
resumes: a finished pre-training is reused, a probed point is read back from `curve.json` unless the probe
recipe changed (`probe.RECIPE`, cfg.probe), and then only its heads are fitted again.

A curve is one encoder config: the store records the resolved config that pre-training reads (`encoder`,
every section but finetune/probe/evaluate), and the run directory's name carries its digest. So a curve
asked for with other pre-training keys (`--set pretrain.base_lr=...`, `pretrain.amp=off`) never reuses
another config's checkpoint or points: it trains in its own directory, and a store that holds another
config's points is refused, naming the keys that differ, instead of being answered or overwritten.

With `finetune`, each point is also fine-tuned (the `finetune` stage from that snapshot, the untrained
point from scratch, with the cfg's `finetune.*` schedule, e.g. the ablation trial's) and tested by the
`evaluate` stage; `ft_top1` then sits beside the probes, paired to the from-scratch floor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mme.config import flatten, load_config, result_tree
from mme.engine.checkpointing import FINAL, LAST
from mme.engine.fit import snapshot_path
from mme.paths import Paths
from mme.reports import per_clip, stats
from mme.utils import write_json

METRICS = ("probe_top1", "attentive_top1")
FINETUNE_METRIC = "ft_top1"
RANDOM_EPOCH = 0  # the untrained encoder's row
DOWNSTREAM = ("finetune", "probe", "evaluate")  # sections with their own per-point recipes


def encoder_config(cfg: Any) -> dict[str, Any]:
    """What a curve's pre-training (and so every point of it) depends on: the resolved config without the
    speed-only keys and the downstream sections, whose recipes each point records."""
    tree = result_tree(cfg)
    for section in DOWNSTREAM:
        tree.pop(section)
    return tree


def curve_workdir(root: Path, cfg: Any) -> Path:
    """`<root>/<kind>-s<seed>-<digest of encoder_config>`: one directory per encoder config."""
    text = json.dumps(encoder_config(cfg), sort_keys=True, default=str)
    return root / f"{cfg.target.kind}-s{cfg.seed}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def check_store(store: Path, encoder: dict[str, Any]) -> dict[str, Any]:
    """The points kept in `store` (none yet: only the config), refused when they or a curve kept beside it
    (one CSV's curves differ only in kind and seed) were measured with another encoder config."""
    done = json.loads(store.read_text()) if store.exists() else {"encoder": encoder}
    if "encoder" not in done:
        raise ValueError(f"{store} does not record the config it was measured with; move it aside or pass "
                         "another --out")
    _refuse_other_config(store, done["encoder"], encoder, ())
    for sibling in sorted(store.parent.glob("*-s*.json")) if store.parent.is_dir() else ():
        if sibling != store:
            _refuse_other_config(sibling, json.loads(sibling.read_text()).get("encoder", {}), encoder,
                                 ("target.kind", "seed"))
    return done


def _refuse_other_config(store: Path, theirs: dict[str, Any], mine: dict[str, Any], free: Sequence[str]) -> None:
    theirs, mine = flatten(theirs), flatten(mine)
    differ = sorted(k for k in (mine.keys() | theirs.keys()) - set(free)
                    if mine.get(k, "<absent>") != theirs.get(k, "<absent>"))
    if differ:
        shown = ", ".join(f"{k} ({theirs.get(k, '<absent>')!r} there, {mine.get(k, '<absent>')!r} here)"
                          for k in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise ValueError(f"{store} holds a curve of another config: {shown}{more}; pass another --out")


def run_dir(workdir: Path, data_dir: Path) -> Path:
    """`workdir`, created, with `data/` linked to the prepared data of `data_dir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    link = workdir / "data"
    if not link.exists():
        link.symlink_to((data_dir / "data").resolve(), target_is_directory=True)
    return workdir


def recipe(cfg: Any) -> str:
    """What a probed point's numbers depend on besides the encoder: the probe config and grid version."""
    from mme.stages import probe

    return json.dumps({"recipe": probe.RECIPE, "probe": cfg.to_dict()["probe"]}, sort_keys=True)


def probe_point(cfg: Any, workdir: Path, init: str | Path) -> dict[str, Any]:
    """The probe stage on one encoder (features reused from `workdir` when it probed the same one before):
    its metrics and per-clip test record (encoded)."""
    from mme.stages import probe

    metrics = probe.run(cfg, workdir, init=init, resume=True)
    name = probe.stage_name(cfg, init)
    record = json.loads((Paths(workdir).metrics_dir / f"{name}.per_clip.json").read_text())
    keep = ("top1", "attentive_top1", "val_top1", "attentive_val_top1", "lr", "epochs", "seconds")
    return {"metrics": {k: metrics.get(k) for k in keep}, "per_clip": record, "recipe": recipe(cfg)}


def finetune_recipe(cfg: Any) -> str:
    """What a fine-tuned point's numbers depend on besides the encoder (speed-only keys left out)."""
    tree = result_tree(cfg)
    return json.dumps({"finetune": tree["finetune"], "evaluate": tree["evaluate"]}, sort_keys=True)


def finetune_point(cfg: Any, workdir: Path, init: str | Path) -> dict[str, Any]:
    """Fine-tune from `init` (a snapshot, or "none": from scratch) in `workdir`, then the test: its metrics
    and per-clip test record (encoded)."""
    from mme.stages import evaluate, finetune

    scratch = str(init) == "none"
    interrupted = (Paths(workdir).models_dir(finetune.stage_name(cfg, init)) / LAST).is_file()
    finetune.run(cfg, workdir, resume=interrupted, init=init)
    metrics = evaluate.run(cfg, workdir, init="scratch" if scratch else None)
    name = "evaluate_scratch" if scratch else "evaluate"
    record = json.loads((Paths(workdir).metrics_dir / f"{name}.per_clip.json").read_text())
    return {"metrics": {k: metrics.get(k) for k in ("top1", "top5")}, "per_clip": record,
            "recipe": finetune_recipe(cfg)}


def curve(preset: str, overrides: Sequence[str], kind: str, seed: int, epochs: int, snapshots: Sequence[int],
          root: Path, data_dir: Path, finetune: bool = False, store: Path | None = None) -> dict[str, Any]:
    """Pre-train `kind` for `epochs` keeping `snapshots`, probe (and with `finetune`, fine-tune) each and
    the untrained encoder. `store` (default `<run>/curve.json`) keeps the points' results: given the stored
    file of a finished curve (committed beside the CSV), nothing is trained again, not even pre-training."""
    from mme.stages import pretrain

    cfg = load_config(preset, [*overrides, f"target.kind={kind}", f"seed={seed}", f"pretrain.epochs={epochs}"])
    workdir = curve_workdir(root, cfg)
    store = store or workdir / "curve.json"
    done = check_store(store, json.loads(json.dumps(encoder_config(cfg), default=str)))  # as JSON holds it
    run_dir(workdir, data_dir)  # only once the store is known to be this curve's
    points = [RANDOM_EPOCH, *sorted({*snapshots, epochs})]
    probes = [e for e in points if done.get(str(e), {}).get("recipe") != recipe(cfg)]
    tunes = [e for e in points if finetune and done.get("finetune", {}).get(str(e), {}).get("recipe")
             != finetune_recipe(cfg)]
    trained = any(e != RANDOM_EPOCH for e in probes + tunes)
    if trained and not (Paths(workdir).models_dir("pretrain") / FINAL).exists():
        done["pretrain"] = pretrain.run(cfg, workdir, snapshots=tuple(points[1:]))
    for epoch in probes:
        init = "random" if epoch == RANDOM_EPOCH else snapshot_path(Paths(workdir), "pretrain", epoch)
        done[str(epoch)] = probe_point(cfg, run_dir(workdir / "points" / f"e{epoch}", data_dir), init)
        write_json(store, done)
    for epoch in tunes:
        init = "none" if epoch == RANDOM_EPOCH else snapshot_path(Paths(workdir), "pretrain", epoch)
        found = finetune_point(cfg, run_dir(workdir / "points" / f"e{epoch}", data_dir), init)
        done.setdefault("finetune", {})[str(epoch)] = found
        write_json(store, done)
    return done


def curve_rows(kind: str, seed: int, done: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per probed encoder: test top-1 + CI per head, and the paired difference to the untrained one."""
    floor = per_clip.decode(done[str(RANDOM_EPOCH)]["per_clip"])
    rows = []
    for key in sorted((k for k in done if k.isdigit()), key=int):
        record = per_clip.decode(done[key]["per_clip"])
        if record.clip_ids != floor.clip_ids:
            raise ValueError(f"{kind} seed {seed}: epoch {key} was probed on other test clips than the floor")
        row: dict[str, Any] = {"kind": kind, "seed": seed, "epoch": int(key), "test_clips": len(record.clip_ids),
                               "val_top1": done[key]["metrics"]["val_top1"]}
        for metric in METRICS:
            row |= _versus(metric, record.correct[metric], floor.correct[metric])
        tuned = done.get("finetune", {})
        if key in tuned and str(RANDOM_EPOCH) in tuned:
            mine, scratch = (per_clip.decode(tuned[k]["per_clip"]) for k in (key, str(RANDOM_EPOCH)))
            order = [mine.clip_ids.index(c) for c in scratch.clip_ids]  # pair on the clips, not positions
            row |= _versus(FINETUNE_METRIC, mine.correct[FINETUNE_METRIC][order], scratch.correct[FINETUNE_METRIC])
        rows.append(row)
    return rows


def _versus(metric: str, scores: Any, floor: Any) -> dict[str, float]:
    """Test top-1 of `metric` with its CI, and the paired difference to the floor's with its CI."""
    mean, delta = stats.interval(scores[None]), stats.paired_difference(scores[None], floor[None])
    return {metric: round(mean.estimate, 2), f"{metric}_low": round(mean.low, 2),
            f"{metric}_high": round(mean.high, 2), f"{metric}_vs_random": round(delta.estimate, 2),
            f"{metric}_vs_random_low": round(delta.low, 2), f"{metric}_vs_random_high": round(delta.high, 2)}
