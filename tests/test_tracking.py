"""MLflow wiring: default SQLite store in the workdir, standard tags, params, nesting, killed runs."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mme.engine.tracking import log_metrics, stage_run, tracking_uri


def test_stage_run_logs_config_tags_and_nests(tmp_path, smoke_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with stage_run(smoke_cfg, tmp_path, "pretrain") as parent:
        log_metrics({"loss": 1.5, "top1@val": 0.25}, step=0)
        with stage_run(smoke_cfg, tmp_path, "finetune") as child:
            pass
    client = MlflowClient(tracking_uri(tmp_path))
    run = client.get_run(parent.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["target.kind"] == "traj" and run.data.params["model.name"] == "smoke"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["preset"] == "smoke"
    assert run.data.metrics == {"loss": 1.5, "top1_at_val": 0.25}
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_experiment(run.info.experiment_id).name == "mme-synthetic"
    assert (tmp_path / "mlflow.db").exists()


def test_disabled_run_logs_nothing(tmp_path, smoke_cfg):
    with stage_run(smoke_cfg, tmp_path, "pretrain", enabled=False) as run:
        assert run is None
    assert not (tmp_path / "mlflow.db").exists()


def test_sigterm_marks_the_run_killed(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from mme.config import load_config
        from mme.engine.tracking import stage_run
        with stage_run(load_config("smoke"), r"{tmp_path}", "pretrain") as run:
            open(r"{tmp_path}/run_id", "w").write(run.info.run_id)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 90
    while not (tmp_path / "run_id").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.terminate()
    assert proc.wait(timeout=60) != 0
    run_id = (tmp_path / "run_id").read_text()
    mlflow.set_tracking_uri(tracking_uri(tmp_path))
    assert MlflowClient().get_run(run_id).info.status == "KILLED"


def test_second_workdir_in_one_process_logs_to_its_own_store(tmp_path, smoke_cfg, monkeypatch):
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI; the first workdir's store must not be read
    back as the user's choice by a later run in another workdir (tests, in-process trials)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = tmp_path / "a", tmp_path / "b"
    with stage_run(smoke_cfg, first, "pretrain") as run_a:
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ  # children of this process see no stale store either
    with stage_run(smoke_cfg, second, "pretrain") as run_b:
        pass
    assert tracking_uri(second) == f"sqlite:///{second.resolve()}/mlflow.db"
    assert MlflowClient(tracking_uri(second)).get_run(run_b.info.run_id).info.status == "FINISHED"
    first_runs = MlflowClient(tracking_uri(first)).search_runs(
        [MlflowClient(tracking_uri(first)).get_experiment_by_name("mme-synthetic").experiment_id])
    assert [r.info.run_id for r in first_runs] == [run_a.info.run_id]
    server = f"sqlite:///{tmp_path / 'server.db'}"  # the user's own choice still wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    assert tracking_uri(second) == server
    with stage_run(smoke_cfg, second, "probe") as run_c:
        pass
    assert MlflowClient(server).get_run(run_c.info.run_id).data.tags["stage"] == "probe"
    assert os.environ["MLFLOW_TRACKING_URI"] == server


def test_resumed_stage_continues_its_run(tmp_path, smoke_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(KeyboardInterrupt):
        with stage_run(smoke_cfg, tmp_path, "pretrain") as first:
            log_metrics({"loss": 2.0}, step=0)
            raise KeyboardInterrupt
    client = MlflowClient(tracking_uri(tmp_path))
    assert client.get_run(first.info.run_id).info.status == "KILLED"
    smoke_cfg.pretrain.epochs += 1  # a changed param cannot be logged again: it becomes a tag
    with stage_run(smoke_cfg, tmp_path, "pretrain", resume_run_id=first.info.run_id,
                   tags={"resumed_from": first.info.run_id}) as again:
        log_metrics({"loss": 1.0}, step=1)
    assert again.info.run_id == first.info.run_id
    run = client.get_run(first.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert "resumed_from" not in run.data.tags
    assert run.data.tags["resume1.pretrain.epochs"] == str(smoke_cfg.pretrain.epochs)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 2.0), (1, 1.0)]
    with stage_run(smoke_cfg, tmp_path, "pretrain", resume_run_id="0" * 32) as fresh:  # not in this store
        pass
    assert fresh.info.run_id != first.info.run_id


def test_sigint_marks_the_run_killed(tmp_path):
    # A job started in the background (nohup, `&`, some CI runners) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child restores it, as an interactive terminal would have.
    script = textwrap.dedent(f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import time
        from mme.config import load_config
        from mme.engine.tracking import stage_run
        import os
        with stage_run(load_config("smoke"), r"{tmp_path}", "pretrain") as run:
            with open(r"{tmp_path}/run_id.tmp", "w") as f:
                f.write(run.info.run_id)
            os.replace(r"{tmp_path}/run_id.tmp", r"{tmp_path}/run_id")  # whole, or not there
            time.sleep(300)
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 180  # a fresh venv's first MLflow store can take a while on a loaded machine
    while not (tmp_path / "run_id").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (tmp_path / "run_id").exists(), "the child never opened its run; SIGINT would not test the run's end"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    run_id = (tmp_path / "run_id").read_text()
    assert MlflowClient(tracking_uri(tmp_path)).get_run(run_id).info.status == "KILLED"


def test_trial_and_dvc_exp_runs_get_their_own_tags(tmp_path, smoke_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MME_PIPELINE_TAG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("preset: smoke\n")
    with stage_run(smoke_cfg, tmp_path, "pretrain") as plain:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "wide-lr")
    with stage_run(smoke_cfg, tmp_path, "pretrain") as variant:
        pass
    monkeypatch.delenv("DVC_EXP_NAME")
    with stage_run(smoke_cfg, tmp_path, "ablate-trial", run_name="L=4 seed0",
                   tags={"optuna_study": "length-smoke-synthetic", "optuna_trial": "3", "setting": "L=4"}):
        with stage_run(smoke_cfg, tmp_path, "pretrain") as trial_stage:
            pass
    with stage_run(smoke_cfg, tmp_path, "ablate-trial", tags={"optuna_study": "length-smoke-synthetic",
                                                              "optuna_trial": "4", "setting": "L=6"}):
        with stage_run(smoke_cfg, tmp_path, "pretrain") as other_trial:
            pass
    client = MlflowClient(tracking_uri(tmp_path))
    tags = {name: client.get_run(r.info.run_id).data.tags
            for name, r in (("plain", plain), ("variant", variant), ("trial", trial_stage), ("other", other_trial))}
    assert tags["variant"]["dvc_exp"] == "wide-lr" and "dvc_exp" not in tags["plain"]
    assert len({t["pipeline"] for t in tags.values()}) == 4  # no two of them share a pipeline tag
    assert tags["trial"]["optuna_study"] == "length-smoke-synthetic" and tags["trial"]["optuna_trial"] == "3"
    assert "length-smoke-synthetic" in tags["trial"]["pipeline"] and "trial3" in tags["trial"]["pipeline"]
    assert client.get_run(trial_stage.info.run_id).info.run_name == \
        "pretrain traj L=4 s=2 seed0 [length-smoke-synthetic #3]"
    assert client.get_run(plain.info.run_id).info.run_name == "pretrain traj L=4 s=2 seed0"


def test_system_metrics_on_a_short_run(tmp_path, smoke_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with stage_run(smoke_cfg, tmp_path, "pretrain", system_metrics=True) as run:
        time.sleep(2.5)
    metrics = MlflowClient(tracking_uri(tmp_path)).get_run(run.info.run_id).data.metrics
    assert any(key.startswith("system/cpu") for key in metrics), sorted(metrics)
