"""The floors and the test split: held-out split sizes, flow for train only, the random-init probe (an
untrained encoder, never models/pretrain), from-scratch fine-tuning, per-clip test records, baselines.json,
the studies' Random init row, and the new dvc stages run through the CLI on the smoke preset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mme.ablation.studies import FLOOR, FLOOR_OVERRIDES, STUDIES
from mme.config import ConfigError, load_config
from mme.data.lists import read_list, stratified_split
from mme.paths import Paths
from mme.reports import per_clip, stats
from mme.stages import baselines, chain, probe


def test_split_counts_are_exact_and_stratified():
    rows = [(f"v{i}.mp4", i % 12) for i in range(3072)]
    splits = stratified_split(rows, 0.15, 0.15, seed=0, val_count=1200, test_count=1200)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [672, 1200, 1200]
    for split in ("val", "test"):  # 1200 over 12 classes of 256: exactly 100 each
        assert set(Counter(label for _, label in splits[split]).values()) == {100}
    assert not {r for r, _ in splits["val"]} & {r for r, _ in splits["test"]}
    assert splits == stratified_split(rows, 0.15, 0.15, seed=0, val_count=1200, test_count=1200)
    with pytest.raises(ValueError, match="no training video"):
        stratified_split(rows[:100], 0.15, 0.15, 0, val_count=60, test_count=40)


def test_mini_has_large_held_out_splits_and_smoke_stays_tiny():
    mini, smoke = load_config("mini").data.synthetic, load_config("smoke").data.synthetic
    assert mini.val_videos >= 1200 and mini.test_videos >= 1200
    assert mini.num_videos - mini.val_videos - mini.test_videos == 672  # the training split as before
    assert smoke.num_videos <= 24 and smoke.val_videos == smoke.test_videos == 0
    with pytest.raises(ConfigError, match="no training video"):
        load_config("smoke", ["data.synthetic.val_videos=12", "data.synthetic.test_videos=12"])


def test_extract_makes_flow_for_the_training_split_only(tmp_path, synthetic_workdir):
    from mme.stages import extract

    shutil.copytree(synthetic_workdir / "data", tmp_path / "data")
    result = extract.run(load_config("smoke"), tmp_path, workers=1)
    paths = Paths(tmp_path)
    train = [rel for rel, _ in read_list(paths.list_file("synthetic", "train"))]
    cached = sorted(p for p in paths.flow_dir("synthetic").rglob("*.npz") if not p.name.startswith("."))
    assert result["videos"] == len(train) == len(cached) and result["splits"] == ["train"]
    from mme.motion.cache import flow_cache_path

    assert cached == sorted(flow_cache_path(tmp_path, "synthetic", rel) for rel in train)


def test_random_encoder_is_the_seeded_initialisation():
    cfg = load_config("smoke")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = probe.random_encoder(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is left alone
    torch.manual_seed(cfg.seed)
    from mme.models import VisionTransformer, model_args
    from mme.models.registry import encoder_args

    fresh = VisionTransformer(**encoder_args(model_args(cfg)) | {"drop_path": 0.0})
    assert probe.weights_digest(first) == probe.weights_digest(fresh) == probe.weights_digest(probe.random_encoder(cfg))
    other = probe.random_encoder(load_config("smoke", ["seed=1"]))
    assert probe.weights_digest(other) != probe.weights_digest(first)


def _records(rng: np.random.Generator, n: int = 300) -> dict[str, per_clip.PerClip]:
    ids = tuple(f"clip{i:04d}" for i in range(n))
    draw = {p: (rng.random(n) < p).astype(float) for p in (0.3, 0.5, 0.7, 0.8)}
    return {"probe": per_clip.PerClip(ids, {"probe_top1": draw[0.7], "attentive_top1": draw[0.8]}),
            "probe_random": per_clip.PerClip(ids[::-1], {"probe_top1": draw[0.5][::-1],
                                                          "attentive_top1": draw[0.5][::-1]}),
            "evaluate": per_clip.PerClip(ids, {"ft_top1": draw[0.8]}),
            "evaluate_scratch": per_clip.PerClip(ids, {"ft_top1": draw[0.3]})}


def test_baselines_keys_and_deltas_equal_the_statistics_of_the_records():
    records = _records(np.random.default_rng(0))
    out = baselines.baselines(records, resamples=2000)
    assert tuple(out) == baselines.KEYS
    assert set(out) >= {"probe_top1", "random_init_probe_top1", "finetune_top1", "scratch_finetune_top1"}
    assert out["probe_top1"] == pytest.approx(100 * records["probe"].correct["probe_top1"].mean())
    # the random-init record lists the clips in reverse: the pairing is by clip id, not by position
    mine = records["probe"].correct["probe_top1"][None]
    floor = records["probe_random"].correct["probe_top1"][::-1][None]
    expected = stats.paired_difference(mine, floor, resamples=2000)
    assert (out["probe_delta"], out["probe_delta_low"], out["probe_delta_high"]) == pytest.approx(
        (expected.estimate, expected.low, expected.high))
    ft = stats.paired_difference(records["evaluate"].correct["ft_top1"][None],
                                 records["evaluate_scratch"].correct["ft_top1"][None], resamples=2000)
    assert out["finetune_delta"] == pytest.approx(out["finetune_top1"] - out["scratch_finetune_top1"])
    assert (out["finetune_delta_low"], out["finetune_delta_high"]) == pytest.approx((ft.low, ft.high))
    assert out["finetune_delta_low"] > 0  # 80 % vs 30 % on 300 clips: clearly separated
    records["probe"] = per_clip.PerClip(records["probe"].clip_ids, {"probe_top1": mine[0]})  # no attentive head
    out = baselines.baselines(records, resamples=200)
    assert out["attentive_probe_top1"] is None and out["attentive_probe_delta"] is None


def test_every_study_has_a_reference_and_a_floor_row_made_of_the_reference():
    assert FLOOR == stats.FLOOR
    for study in STUDIES.values():
        assert study.reference in study.labels and study.labels[-1] == FLOOR
        floor = study.setting(FLOOR)
        assert floor.overrides == (*study.setting(study.reference).overrides, *FLOOR_OVERRIDES)
        assert chain.is_floor(load_config("smoke", [*study.base, *floor.overrides]))
        assert not chain.is_floor(load_config("smoke", [*study.base, *study.setting(study.reference).overrides]))


def test_the_floor_is_one_config_across_tables():
    """Every table's floor resolves to the same classification config, so one trial per seed serves all."""
    keys = {part: set() for part in ("probe", "finetune")}
    for study in STUDIES.values():
        cfg = load_config("mini", [*study.base, *study.setting(FLOOR).overrides, "seed=0"])
        for part in keys:
            keys[part].add(chain.part_key(cfg, part))
    assert all(len(found) == 1 for found in keys.values()), keys
    base = load_config("mini", list(FLOOR_OVERRIDES))
    assert chain.part_key(base, "probe") != chain.part_key(load_config("mini", [*FLOOR_OVERRIDES, "seed=1"]), "probe")
    assert chain.part_key(base, "probe") != chain.part_key(load_config("mini", [*FLOOR_OVERRIDES, "data.stride=2"]),
                                                             "probe")
    assert chain.part_key(base, "probe") == chain.part_key(load_config("mini", [*FLOOR_OVERRIDES,
                                                                                  "finetune.epochs=3"]), "probe")


def _mme(workdir: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "mme", *args, "--preset", "smoke", "--workdir", str(workdir)],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"mme {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout[out.stdout.index("{"):])


@pytest.mark.slow
def test_new_dvc_stages_through_the_cli(tmp_path, extracted_workdir):
    """probe --init random, finetune --init none, evaluate --init scratch and baselines, as dvc.yaml runs them,
    beside the pre-trained pipeline; the floor probe never touches models/pretrain."""
    shutil.copytree(extracted_workdir / "data", tmp_path / "data")
    paths = Paths(tmp_path)
    random = _mme(tmp_path, "probe", "--init", "random")
    assert not paths.models_dir("pretrain").exists()  # no pre-training was needed, none was read or written
    assert random["encoder_sha1"] == probe.weights_digest(probe.random_encoder(load_config("smoke")))
    _mme(tmp_path, "pretrain")
    pretrain_files = {p: p.stat().st_mtime_ns for p in paths.models_dir("pretrain").iterdir()}
    pretrained = _mme(tmp_path, "probe")
    assert pretrained["encoder_sha1"] != random["encoder_sha1"]
    again = _mme(tmp_path, "probe", "--init", "random", "--resume")  # reuses its own cached features
    assert again["encoder_sha1"] == random["encoder_sha1"] and again["top1"] == random["top1"]
    assert {p: p.stat().st_mtime_ns for p in paths.models_dir("pretrain").iterdir()} == pretrain_files
    _mme(tmp_path, "finetune")
    scratch = _mme(tmp_path, "finetune", "--init", "none")
    assert scratch["pretrain_run_id"] is None and (paths.models_dir("finetune_scratch") / "checkpoint.pt").is_file()
    _mme(tmp_path, "evaluate")
    scratch_test = _mme(tmp_path, "evaluate", "--init", "scratch")
    assert scratch_test["checkpoint"].endswith("models/finetune_scratch/checkpoint.pt")
    result = _mme(tmp_path, "baselines")

    on_disk = json.loads((paths.metrics_dir / "baselines.json").read_text())
    assert sorted(on_disk) == sorted(baselines.KEYS) and on_disk == result  # exactly these keys
    assert on_disk["random_init_probe_top1"] == pytest.approx(random["top1"])
    assert on_disk["scratch_finetune_top1"] == pytest.approx(scratch_test["top1"])
    test_ids = [rel for rel, _ in read_list(paths.list_file("synthetic", "test"))]
    for stem, metrics in (("probe_random", {"probe_top1", "attentive_top1"}), ("evaluate_scratch", {"ft_top1"})):
        record = per_clip.decode(json.loads((paths.metrics_dir / f"{stem}.per_clip.json").read_text()))
        assert list(record.clip_ids) == test_ids and set(record.correct) == metrics
    for name in ("probe", "probe_random", "finetune_scratch"):
        assert (paths.plots_dir / f"{name}.csv").is_file() and (paths.models_dir(name) / "checkpoint.pt").is_file()
