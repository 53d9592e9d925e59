"""MLflow wiring shared by every stage: tracking URI, experiment, run tags, params, clean shutdown.

Default store: `sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts`; a tracking
server is used instead when `MLFLOW_TRACKING_URI` is set. One experiment per dataset (`mme-<dataset>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mme.config import Config
from mme.paths import Paths


def tracking_uri(workdir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or Paths(workdir).mlflow_uri


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def pipeline_tag(cfg: Config) -> str:
    """Tag shared by the runs of one `dvc repro`: git commit + hash of params.yaml (or of the config)."""
    override = os.environ.get("MME_PIPELINE_TAG")
    if override:
        return override
    params = Path("params.yaml")
    digest = hashlib.sha1(params.read_bytes()).hexdigest()[:10] if params.exists() else cfg.digest()
    return f"{git_commit()}-{digest}"


def setup_experiment(cfg: Config, workdir: str | Path, name: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    name = name or f"mme-{cfg.data.dataset}"
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        mlflow.set_experiment(name)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        artifact_location = (Paths(workdir).mlflow_artifacts / name).as_uri()
    try:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first
        experiment_id = mlflow.get_experiment_by_name(name).experiment_id
    mlflow.set_experiment(name)
    return experiment_id


def run_tags(cfg: Config, stage: str) -> dict[str, str]:
    return {
        "stage": stage,
        "preset": cfg.preset,
        "dataset": cfg.data.dataset,
        "target_kind": cfg.target.kind,
        "git_commit": git_commit(),
        "pipeline": pipeline_tag(cfg),
    }


@contextlib.contextmanager
def stage_run(cfg: Config, workdir: str | Path, stage: str, *, enabled: bool = True, nested: bool = False,
              run_name: str | None = None, tags: dict[str, Any] | None = None,
              experiment: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage with the resolved config as params; yields the active run or None.

    `enabled=False` (non-zero DDP ranks) yields None and logs nothing. A SIGTERM while the run is open
    marks it KILLED instead of leaving it RUNNING.
    """
    if not enabled:
        yield None
        return
    import mlflow

    nested = nested or mlflow.active_run() is not None  # inside an ablation trial: a child run
    if not nested:
        setup_experiment(cfg, workdir, experiment)
    all_tags = run_tags(cfg, stage) | {k: str(v) for k, v in (tags or {}).items()}
    with mlflow.start_run(run_name=run_name or stage, nested=nested, tags=all_tags) as run:
        mlflow.log_params({k: str(v) for k, v in cfg.flat().items()})
        previous = signal.getsignal(signal.SIGTERM)

        def _killed(signum, frame):  # noqa: ARG001
            mlflow.end_run(status="KILLED")
            raise SystemExit(128 + signum)

        in_main = _is_main_thread()
        if in_main:
            signal.signal(signal.SIGTERM, _killed)
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run, if any (no-op outside a run)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    mlflow.log_metrics(clean, step=step)


# --- training-stage helpers (models/engine owner) -------------------------------------------------


def log_params(params: dict[str, Any]) -> None:
    """Log extra params to the active run, if any (e.g. `pretrain_run_id`)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_params({k: str(v) for k, v in params.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a file (e.g. the final checkpoint) into the active run's artifacts, if any."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


class EpochRecorder:
    """Per-epoch metrics: MLflow (step = epoch) and `reports/plots/<stage>.csv`, rewritten atomically.

    `rows` restarts from a checkpoint's history on resume, so the CSV never has gaps or duplicates.
    Disabled (non-zero DDP ranks) it only keeps the rows.
    """

    def __init__(self, csv_path: str | Path, enabled: bool = True, rows: list[dict[str, float]] | None = None):
        self.csv_path = Path(csv_path)
        self.enabled = enabled
        self.rows = list(rows or [])

    def record(self, epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch} | {k: float(v) for k, v in metrics.items()}
        self.rows.append(row)
        if not self.enabled:
            return
        log_metrics(metrics, step=epoch)
        import csv
        import io

        from mme.utils import write_text_atomic

        columns = list(dict.fromkeys(key for r in self.rows for key in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.csv_path, text.getvalue())
