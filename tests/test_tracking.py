"""MLflow wiring: default SQLite store in the workdir, standard tags, params, nesting, killed runs."""

import subprocess
import sys
import textwrap
import time

import mlflow
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
