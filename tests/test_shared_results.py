"""Shared trial results (mme.stages.chain): a setting several tables share runs once per seed and is
reused by its resolved config; and `--settings`, which runs part of a study's grid (reference and floor
always included) and leaves the rest for a later run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mme.ablation import STUDIES
from mme.ablation.studies import FLOOR, FULL_CHAIN
from mme.config import load_config
from mme.reports import per_clip
from mme.stages import chain
from tests.test_ablate import ABLATE, _load_ablate, fake_runner  # noqa: F401  (fake_runner is a fixture)


@pytest.fixture
def counted_parts(monkeypatch) -> list[tuple[str, int, str]]:
    """Replace the three parts by fakes that log (part, seed, target kind) and return seed-dependent results."""
    calls: list[tuple[str, int, str]] = []

    def fake(part: str):
        def run(cfg, trial_dir):  # noqa: ARG001
            calls.append((part, cfg.seed, cfg.target.kind))
            if part == "pretrain":
                return {"pretrain_seconds": 10.0 + cfg.seed, "pretrain_loss": 0.5}, None
            metric = "ft_top1" if part == "finetune" else "probe_top1"
            right = [float((i + cfg.seed) % 3 == 0) for i in range(6)]
            return {metric: 100 * sum(right) / 6}, per_clip.PerClip(tuple(f"c{i}" for i in range(6)), {metric: right})
        return run

    for part in chain.PARTS:
        monkeypatch.setitem(chain.RUN_PART, part, fake(part))
    return calls


def _trial_dir(workdir: Path, study: str, name: str) -> Path:
    trial = workdir / "trials" / study / name
    trial.mkdir(parents=True)
    (workdir / "data").mkdir(exist_ok=True)
    (trial / "data").symlink_to(workdir / "data", target_is_directory=True)
    return trial


def _cfg(study: str, label: str, seed: int):
    s = STUDIES[study]
    return load_config("mini", [*s.base, *s.setting(label).overrides, f"seed={seed}"])


def test_the_reference_traj_runs_once_per_seed_across_tables(tmp_path, counted_parts):
    first = chain.run_stage_chain(_cfg("length", "L=6", 0), _trial_dir(tmp_path, "length", "l6-s0"), FULL_CHAIN)
    assert [c[0] for c in counted_parts] == ["pretrain", "finetune", "probe"]
    for study, label in (("content", "Traj"), ("norm", "w/ patch norm"), ("shuffle", "MME raw video"),
                         ("masking", "70% tube"), ("decoder", "Joint depth 1")):
        again = chain.run_stage_chain(_cfg(study, label, 0), _trial_dir(tmp_path, study, "ref-s0"), FULL_CHAIN)
        assert again == first, study
    assert len(counted_parts) == 3  # nothing ran again
    chain.run_stage_chain(_cfg("content", "Traj", 1), _trial_dir(tmp_path, "content", "ref-s1"), FULL_CHAIN)
    chain.run_stage_chain(_cfg("length", "L=8", 0), _trial_dir(tmp_path, "length", "l8-s0"), FULL_CHAIN)
    assert len(counted_parts) == 9  # another seed and another setting are other trials
    shared = {"interpolation": "Traj interp", "length": "L=6", "density": "Dense", "stride": "s=3"}
    keys = {chain.part_key(_cfg(study, label, 0), "finetune") for study, label in shared.items()}
    assert len(keys) == 1  # every table's reference traj row resolves to one trial


def test_a_pre_training_stride_keys_every_trained_part_but_not_the_floor():
    """7d's s=4 is its own pre-training, so its fine-tune and probe results are its own too; the floor trains
    nothing, and s=3 (= data.stride) is the reference run, so both keep the keys stored before the key existed."""
    four, three, traj = _cfg("stride", "s=4", 0), _cfg("stride", "s=3", 0), _cfg("content", "Traj", 0)
    for part in chain.PARTS:
        assert chain.part_key(three, part) == chain.part_key(traj, part)
        assert chain.part_key(four, part) != chain.part_key(traj, part)
    assert chain.part_key(_cfg("stride", FLOOR, 0), "probe") == chain.part_key(_cfg("content", FLOOR, 0), "probe")


def test_stored_results_travel_with_the_reports_to_another_checkout(tmp_path, counted_parts):
    """The store lives under reports/results/ (committed): a fresh clone elsewhere, given those files,
    reuses every part instead of re-training, and the files name no directory of the first machine."""
    import json
    import shutil

    first_root, second_root = tmp_path / "first", tmp_path / "second"
    cfg = _cfg("content", "Traj", 0)
    first = chain.run_stage_chain(cfg, _trial_dir(first_root, "content", "ref-s0"), FULL_CHAIN)
    stored = sorted((first_root / "reports" / "results").glob("*.json"))
    assert [p.name.split("-")[0] for p in stored] == ["finetune", "pretrain", "probe"]
    assert all(json.loads(p.read_text())["trial_dir"] == "trials/content/ref-s0" for p in stored)
    from mme.engine.loops import compute_platform, platform_name
    assert all(json.loads(p.read_text())["platform"] == compute_platform() | {"precision": "bf16"} for p in stored)
    assert first["platform"] == platform_name(compute_platform())
    shutil.copytree(first_root / "reports", second_root / "reports")
    again = chain.run_stage_chain(cfg, _trial_dir(second_root, "content", "ref-s0"), FULL_CHAIN)
    assert again == first and len(counted_parts) == 3
    for path in (second_root / "reports" / "results").glob("*.json"):  # files from before platforms were kept
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "platform"}))
    older = chain.run_stage_chain(cfg, _trial_dir(second_root, "content", "ref-s0-again"), FULL_CHAIN)
    assert older["platform"] == "not recorded" and len(counted_parts) == 3
    fp32 = load_config("mini", [*STUDIES["content"].base, "seed=0", "pretrain.amp=off", "finetune.amp=off"])
    plain = chain.run_stage_chain(fp32, _trial_dir(first_root, "content", "fp32-s0"), FULL_CHAIN)
    assert plain["platform"].endswith(" (fp32)") and "bf16" not in plain["platform"]  # the bf16 kind is moot


def test_no_data_is_prepared_when_every_trial_is_stored(tmp_path, counted_parts, monkeypatch):  # noqa: ARG001
    """A fresh clone re-running a study from the committed results needs no dataset; one trial missing
    and the dataset is prepared as before."""
    from mme.stages import download

    prepared = []

    def fake_download(cfg, workdir):  # noqa: ARG001
        prepared.append(workdir)
        raise RuntimeError("stop after download")

    monkeypatch.setattr(download, "run", fake_download)
    trials = [(_cfg("content", label, 0), FULL_CHAIN) for label in ("Traj", FLOOR)]
    for i, (cfg, stages) in enumerate(trials):
        chain.run_stage_chain(cfg, _trial_dir(tmp_path, "content", f"t{i}"), stages)
    chain.prepare_data(trials[0][0], tmp_path, trials)
    assert prepared == []
    with pytest.raises(RuntimeError, match="stop after download"):
        chain.prepare_data(trials[0][0], tmp_path, [*trials, (_cfg("content", "Pixel", 0), FULL_CHAIN)])
    assert prepared == [tmp_path]


def test_a_trial_missing_a_part_runs_every_part(tmp_path, counted_parts):
    """The probe table's trial (pretrain + probe) reuses a full trial; a full trial after a probe-only one
    must pre-train for its fine-tune, so it runs everything again (and replaces the stored parts)."""
    cfg = _cfg("probe", "MME (traj)", 0)
    chain.run_stage_chain(cfg, _trial_dir(tmp_path, "probe", "a"), ("pretrain", "probe"))
    assert [c[0] for c in counted_parts] == ["pretrain", "probe"]
    chain.run_stage_chain(cfg, _trial_dir(tmp_path, "content", "b"), FULL_CHAIN)
    assert [c[0] for c in counted_parts[2:]] == ["pretrain", "finetune", "probe"]
    chain.run_stage_chain(cfg, _trial_dir(tmp_path, "probe", "c"), ("pretrain", "probe"))
    assert len(counted_parts) == 5


def test_floors_skip_pretraining_and_share_parts_across_pretraining_settings(tmp_path, counted_parts):
    floor = chain.run_stage_chain(_cfg("content", FLOOR, 0), _trial_dir(tmp_path, "content", "f0"), FULL_CHAIN)
    assert [c[0] for c in counted_parts] == ["finetune", "probe"] and "pretrain_seconds" not in floor
    for study in ("length", "shuffle", "masking"):
        assert chain.run_stage_chain(_cfg(study, FLOOR, 0), _trial_dir(tmp_path, study, "f0"), FULL_CHAIN) == floor
    assert len(counted_parts) == 2


def test_a_floor_probed_in_fp32_is_not_the_bf16_floor():
    """The untrained encoder's token features are computed under pretrain.amp, so an fp32 floor (measured
    11.33 against 11.50 in bf16 on the appearance-varied set) is another result; the bf16 key stays as stored."""
    base = [*STUDIES["content"].base, *STUDIES["content"].setting(FLOOR).overrides, "seed=0"]
    bf16, fp32 = load_config("mini", base), load_config("mini", [*base, "pretrain.amp=off"])
    assert chain.part_key(bf16, "probe") != chain.part_key(fp32, "probe")
    assert chain.part_key(bf16, "finetune") == chain.part_key(fp32, "finetune")  # fine-tuning reads finetune.amp
    assert chain.part_key(bf16, "probe") == "probe-5a79cdb8d6bc"  # the committed floors keep their digests:
    varied = load_config("mini", [*base, "data.synthetic.appearance=random"])  # reports/results/ and the varied set's
    assert chain.part_key(varied, "probe") == "probe-3c58efef0415"


def test_the_probe_key_changes_with_the_probe_recipe(monkeypatch):
    from mme.stages import probe

    cfg = _cfg("content", "Traj", 0)
    before = {part: chain.part_key(cfg, part) for part in chain.PARTS}
    monkeypatch.setattr(probe, "RECIPE", probe.RECIPE + 1)
    after = {part: chain.part_key(cfg, part) for part in chain.PARTS}
    assert before["probe"] != after["probe"]
    assert before["finetune"] == after["finetune"] and before["pretrain"] == after["pretrain"]
    assert chain.part_key(cfg, "pretrain") == chain.part_key(load_config("mini", [
        "target.kind=traj", "seed=0", "finetune.epochs=3", "probe.lr=0.5"]), "pretrain")
    assert chain.part_key(cfg, "finetune") != chain.part_key(_cfg("content", "Pixel", 0), "finetune")


def test_settings_adds_the_reference_and_floor_and_rejects_unknown_labels(tmp_path):
    ablate = _load_ablate()
    argv = ["--study", "content", "--preset", "smoke", "--workdir", str(tmp_path), "--seeds", "2"]
    plan = ablate.make_plan("content", ablate.parse_args([*argv, "--settings", "HOG,Pixel"]))
    assert [label for label, seed in plan.points() if seed == 0] == ["Pixel", "HOG", "Traj", FLOOR]
    assert len(plan.points()) == 8
    with pytest.raises(KeyError, match="has no setting 'Hog'"):
        ablate.make_plan("content", ablate.parse_args([*argv, "--settings", "Hog"]))
    assert ablate.main([*argv, "--settings", "Hog"]) == 2


def test_stored_only_records_the_stored_points_and_trains_nothing(tmp_path, counted_parts, monkeypatch):
    """A fresh clone rebuilds its tables from the committed results: `--stored-only` records exactly the
    stored grid points (here Traj and the floor at seed 0, Traj at seed 1), trains and downloads nothing,
    and names the points it leaves out."""
    from mme.stages import download

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(download, "run", lambda *_: pytest.fail("--stored-only prepared data"))
    ablate, workdir = _load_ablate(), tmp_path / "work"
    argv = ["--study", "content", "--preset", "smoke", "--workdir", str(workdir), "--seeds", "2"]
    plan = ablate.make_plan("content", ablate.parse_args(argv))
    for label, seed in (("Traj", 0), (FLOOR, 0), ("Traj", 1)):
        chain.run_stage_chain(plan.trial_config(label, seed), _trial_dir(workdir, "first", f"{label}-{seed}"),
                              plan.study.stages)
    ran = len(counted_parts)
    assert ablate.main([*argv, "--stored-only"]) == 0
    assert len(counted_parts) == ran  # every recorded part came from the store
    trials = optuna.load_study(study_name=plan.name, storage=plan.storage).get_trials(deepcopy=False)
    done = sorted((t.params["setting"], t.params["seed"]) for t in trials if t.state == TrialState.COMPLETE)
    assert done == sorted([("Traj", 0), (FLOOR, 0), ("Traj", 1)])
    assert not (workdir / "data" / "lists").exists()
    narrowed, missing = ablate.stored_only(plan, chain.is_stored)
    assert ("Pixel", 0) in missing and (FLOOR, 1) in missing and len(narrowed.points()) == 3
    assert ablate.main(["--study", "length", "--preset", "smoke", "--workdir", str(workdir), "--stored-only"]) == 0


@pytest.mark.slow
def test_settings_runs_part_of_the_grid_and_a_later_run_does_the_rest(tmp_path, fake_runner):  # noqa: F811
    workdir = tmp_path / "work"
    base = [sys.executable, str(ABLATE), "--study", "length", "--preset", "smoke", "--seeds", "1",
            "--runner", "ablate_fake_runner:run", "--workdir", str(workdir)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | fake_runner

    def done() -> list[str]:
        trials = optuna.load_study(study_name="length-smoke-synthetic",
                                   storage=f"sqlite:///{workdir / 'optuna.db'}").get_trials(deepcopy=False)
        return sorted(t.params["setting"] for t in trials if t.state == TrialState.COMPLETE)

    out = subprocess.run([*base, "--settings", "L=4"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert done() == sorted(["L=4", "L=6", FLOOR])
    out = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert done() == sorted(["L=4", "L=6", "L=8", FLOOR])  # the rest, and nothing twice
    assert "4/4 grid points done" in out.stdout


def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_backward_flow_trials_get_their_own_data_and_leave_the_pipelines_alone(tmp_path, extracted_workdir,
                                                                                monkeypatch):
    """The robustness study's fb_check rows need caches with backward flow. The pipeline's `data/` (what
    dvc.lock records) has none and must not be rewritten; the study extracts them once into `data-fb`,
    the fb_check trials read from it, the other rows from `data/`."""
    import shutil

    from mme.datasets.clips import PretrainDataset
    from mme.motion.cache import cache_problem, expected_meta, flow_cache_path
    from mme.stages import extract

    shutil.copytree(extracted_workdir / "data", tmp_path / "data", symlinks=True)
    before = _digests(tmp_path / "data")
    study = STUDIES["robustness"]
    cfgs = {label: load_config("smoke", [*study.base, *study.setting(label).overrides, "seed=0"])
            for label in ("default", "fb_check on", "both", FLOOR)}
    trials = [(cfg, FULL_CHAIN) for cfg in cfgs.values()]
    assert {chain.data_dir_name(c) for c in cfgs.values()} == {"data", chain.BACKWARD_DATA}
    assert chain.data_dir_name(cfgs[FLOOR]) == "data"  # the floor reads no flow

    chain.prepare_data(cfgs["default"], tmp_path, trials)
    assert _digests(tmp_path / "data") == before  # not one byte of the pipeline's data changed
    fb = cfgs["fb_check on"]
    backward = expected_meta(fb.flow.backend, fb.flow.compensate_camera, fb.data.short_side, backward=True)
    fb_data = tmp_path / chain.BACKWARD_DATA
    videos = extract.listed_videos(chain.Paths(tmp_path), fb.data.dataset, extract.FLOW_SPLITS)
    assert videos and (fb_data / "raw").is_symlink() and (fb_data / "lists").is_symlink()
    for rel in videos:
        cache = flow_cache_path(tmp_path, fb.data.dataset, rel)
        assert cache_problem(cache, backward) is not None  # data/ has none
        assert cache_problem(fb_data / cache.relative_to(tmp_path / "data"), backward) is None

    def no_extract(*args, **kwargs):  # noqa: ARG001
        raise AssertionError("every cache is valid: nothing to extract")

    monkeypatch.setattr(extract, "run", no_extract)
    chain.prepare_data(cfgs["default"], tmp_path, trials)  # a second run finds both sets valid

    trial_dir = _trial_dir(tmp_path, "robustness", "fb-s0")
    chain.link_trial_data(fb, trial_dir)
    assert (trial_dir / "data").resolve() == fb_data.resolve()
    assert chain.shared_workdir(trial_dir) == tmp_path.resolve()  # the results store stays the study's
    assert len(PretrainDataset(fb, trial_dir, "train")) == len(videos)  # every video has its backward flow
    chain.link_trial_data(cfgs["default"], trial_dir)
    assert (trial_dir / "data").resolve() == (tmp_path / "data").resolve()
