"""The real ablation chain: `experiments/ablate.py --study length --preset smoke` (pretrain -> finetune ->
evaluate -> probe per trial, and the Random init floor: finetune from scratch -> evaluate -> probe of the
untrained encoder) on the smoke dataset, within the CI budget of 3 minutes, with every stage run nested
under its trial's MLflow run and the table rebuilt from the trials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from mme.data.lists import read_list
from mme.reports import per_clip

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 180

pytestmark = pytest.mark.slow


def test_length_study_on_smoke_runs_the_real_stages(tmp_path, extracted_workdir):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "data").symlink_to(extracted_workdir / "data")  # lists and flow caches exist: no re-extraction
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = time.time()
    out = subprocess.run([sys.executable, str(REPO / "experiments/ablate.py"), "--study", "length", "--preset",
                          "smoke", "--workdir", str(workdir)], env=env, capture_output=True, text=True,
                         timeout=2 * BUDGET_S)
    seconds = time.time() - started
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert seconds < BUDGET_S, f"--study length --preset smoke took {seconds:.0f} s (budget {BUDGET_S} s)"
    assert "running extract" not in out.stdout

    study = optuna.load_study(study_name="length-smoke-synthetic", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.params["setting"] for t in trials) == ["L=4", "L=6", "L=8", "Random init"]
    test_ids = [rel for rel, _ in read_list(extracted_workdir / "data/lists/synthetic/test.csv")]
    for trial in trials:
        assert 0.0 <= trial.user_attrs["ft_top1"] <= 100.0 and trial.value == trial.user_attrs["ft_top1"]
        record = per_clip.from_trial(trial)  # the test clips each metric got right, in test-list order
        assert list(record.clip_ids) == test_ids and set(record.correct) == {"ft_top1", "probe_top1", "attentive_top1"}
        assert 100 * record.correct["ft_top1"].mean() == pytest.approx(trial.user_attrs["ft_top1"])
        assert 100 * record.correct["probe_top1"].mean() == pytest.approx(trial.user_attrs["probe_top1"])
        pretrained = (Path(trial.user_attrs["trial_workdir"]) / "models/pretrain/checkpoint.pt").exists()
        if trial.params["setting"] == "Random init":  # the floor never pre-trains
            assert not pretrained and "pretrain_seconds" not in trial.user_attrs
        else:
            assert pretrained and trial.user_attrs["pretrain_seconds"] > 0 and trial.user_attrs["pretrain_loss"] > 0

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]
        stages = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        expected = (["evaluate_scratch", "finetune_scratch", "probe_random"] if trial.params["setting"] == "Random init"
                    else ["evaluate", "finetune", "pretrain", "probe"])
        assert sorted(r.data.tags["stage"] for r in stages) == expected

    table = pd.read_csv(workdir / "reports/tables/table7a_length.csv")
    assert list(table["setting"]) == ["L=4", "L=6", "L=8", "Random init"] and list(table["n_seeds"]) == [1, 1, 1, 1]
    print(f"ablate --study length --preset smoke: {seconds:.1f} s")
