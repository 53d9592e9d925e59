"""MLflow wiring shared by every stage: tracking URI, experiment, run names and tags, params, logged
models and dataset inputs, system metrics, clean shutdown and resumed runs.

Default store: `sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts`; a tracking
server is used instead when the user sets `MLFLOW_TRACKING_URI`. One experiment per dataset
(`mme-<dataset>`). The fine-tuned classifier is registered as `mme-<dataset>-<target kind>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mme.config import Config
from mme.paths import Paths

# `mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI for subprocesses, so the variable alone cannot
# tell a user's server from the workdir store an earlier run of this process pointed MLflow at. The
# URIs this process derived from a workdir are remembered here and never read back as the user's.
_DERIVED_URIS: set[str] = set()

# Trial tags a stage run copies from its parent (the ablation trial run), so every run of a trial says
# which study and trial it belongs to.
TRIAL_TAGS = ("optuna_study", "optuna_trial", "setting")

# Seconds between two system-metric samples: short enough that a smoke run (often under a second) gets some,
# long enough that a multi-day run does not flood the store. MLflow's own environment variable wins.
SYSTEM_METRICS_INTERVAL_S = {"smoke": 0.1}
SYSTEM_METRICS_DEFAULT_S = 10.0

_HELD: set[str] = set()  # lock files this process holds (`file_lock`)


def user_tracking_uri() -> str | None:
    """The tracking URI the user chose through MLFLOW_TRACKING_URI (None: use the workdir store)."""
    value = os.environ.get("MLFLOW_TRACKING_URI")
    return value if value and value not in _DERIVED_URIS else None


def tracking_uri(workdir: str | Path) -> str:
    """The user's MLFLOW_TRACKING_URI, else the workdir's SQLite store."""
    user = user_tracking_uri()
    if user:
        return user
    uri = Paths(workdir).mlflow_uri
    _DERIVED_URIS.add(uri)
    return uri


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive, blocking lock on `path` (created if missing) held for the block: serialises the
    first creation of a SQLite store by concurrent processes, whose schema migrations would collide."""
    key = str(Path(path).resolve())
    if key in _HELD:  # re-entrant: a second flock from this process on a new descriptor would deadlock
        yield
        return
    Path(key).parent.mkdir(parents=True, exist_ok=True)
    with open(key, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///…` URI (None for servers and other stores)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


# Not `.lock`: Optuna's journal storage locks `<file>.lock` itself (a symlink, removed by force after 30 s
# when it finds a file there), so a lock of ours under that name stalls every journal write by 30 s and is
# then deleted under us.
LOCK_SUFFIX = ".mme-lock"


def lock_beside(path: Path) -> contextlib.AbstractContextManager[None]:
    """`file_lock` on `<path>.mme-lock`, the lock of the store at `path`."""
    return file_lock(path.with_name(path.name + LOCK_SUFFIX))


def store_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """`lock_beside` a SQLite store; a no-op for servers."""
    db = sqlite_file(uri)
    return lock_beside(db) if db is not None else contextlib.nullcontext()


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def pipeline_tag(cfg: Config, trial: dict[str, str] | None = None) -> str:
    """Tag shared by the runs of one pipeline: git commit + hash of params.yaml (or of the config).

    Ablation trials all read the same params.yaml, so a trial's tag names its study and trial instead;
    a `dvc exp run` variant adds the experiment name DVC exports (`DVC_EXP_NAME`).
    """
    override = os.environ.get("MME_PIPELINE_TAG")
    if override:
        return override
    if trial and trial.get("optuna_study"):
        return f"{git_commit()}-{trial['optuna_study']}-trial{trial.get('optuna_trial', '?')}"
    params = Path("params.yaml")
    digest = hashlib.sha1(params.read_bytes()).hexdigest()[:10] if params.exists() else cfg.digest()
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{git_commit()}-{digest}" + (f"-{experiment}" if experiment else "")


def point_mlflow_at(uri: str) -> None:
    """`mlflow.set_tracking_uri(uri)` without leaving a workdir store in MLFLOW_TRACKING_URI, where a
    child process (or a later run in another workdir) would take it for the user's choice."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if uri in _DERIVED_URIS:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def setup_experiment(cfg: Config, workdir: str | Path, name: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    The first creation of a SQLite store is serialised across processes (`store_lock`)."""
    import mlflow

    uri = tracking_uri(workdir)
    point_mlflow_at(uri)
    name = name or f"mme-{cfg.data.dataset}"
    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifact_location = None
            if uri.startswith("sqlite:"):
                artifact_location = (Paths(workdir).mlflow_artifacts / name).as_uri()
            try:
                mlflow.create_experiment(name, artifact_location=artifact_location)
            except Exception:  # another process (on another host: no shared lock) created it first
                pass
    return mlflow.set_experiment(name).experiment_id


def run_name(cfg: Config, stage: str, trial: dict[str, str] | None = None) -> str:
    """`pretrain traj L=6 s=3 seed0` (target kind, trajectory length, frame stride, seed), with the
    study and trial appended inside an ablation trial."""
    name = f"{stage} {cfg.target.kind} L={cfg.target.length} s={cfg.data.stride} seed{cfg.seed}"
    if trial and trial.get("optuna_study"):
        name += f" [{trial['optuna_study']} #{trial.get('optuna_trial', '?')}]"
    return name


def run_tags(cfg: Config, stage: str, trial: dict[str, str] | None = None) -> dict[str, str]:
    tags = {
        "stage": stage,
        "preset": cfg.preset,
        "dataset": cfg.data.dataset,
        "target_kind": cfg.target.kind,
        "git_commit": git_commit(),
        "pipeline": pipeline_tag(cfg, trial),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    return tags | dict(trial or {})


def parent_trial_tags() -> dict[str, str]:
    """The TRIAL_TAGS of the active run (an ablation trial), for the stage run nested under it."""
    import mlflow

    active = mlflow.active_run()
    if active is None:
        return {}
    tags = mlflow.MlflowClient().get_run(active.info.run_id).data.tags
    return {key: tags[key] for key in TRIAL_TAGS if key in tags}


def _existing_run(run_id: str | None) -> Any:
    """The run `run_id` in the current store, or None (no id, or the run lives in another store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None


def _start(cfg: Config, stage: str, nested: bool, name: str | None, tags: dict[str, str], system_metrics: bool,
           resume_run_id: str | None) -> Any:
    """Start the stage's run: continue `resume_run_id` when the store has it, else a new run."""
    import mlflow

    if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S.get(cfg.preset,
                                                                                 SYSTEM_METRICS_DEFAULT_S))
    previous = _existing_run(resume_run_id)
    params = {k: str(v) for k, v in cfg.flat().items()}
    if previous is None:
        run = mlflow.start_run(run_name=name or run_name(cfg, stage, tags), nested=nested, tags=tags,
                               log_system_metrics=system_metrics or None)
        mlflow.log_params(params)
        return run
    run = mlflow.start_run(run_id=resume_run_id, nested=nested, log_system_metrics=system_metrics or None)
    resumes = int(previous.data.tags.get("resumes", "0")) + 1
    mlflow.set_tags({k: v for k, v in tags.items() if k != "resumed_from"} | {"resumes": str(resumes)})
    logged = previous.data.params  # a param cannot change value: keys the resumed run changed become tags
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    changed = {f"resume{resumes}.{k}": v for k, v in params.items() if k in logged and logged[k] != v}
    if changed:
        mlflow.set_tags(changed)
    return run


@contextlib.contextmanager
def stage_run(cfg: Config, workdir: str | Path, stage: str, *, enabled: bool = True, nested: bool = False,
              run_name: str | None = None, tags: dict[str, Any] | None = None,
              experiment: str | None = None, system_metrics: bool = False,
              resume_run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage with the resolved config as params; yields the active run or None.

    `enabled=False` (non-zero DDP ranks) yields None and logs nothing. `system_metrics` samples CPU,
    memory (and GPU where MLflow can read it) as `system/*` metrics. `resume_run_id` (the run id a
    `last.pt` carries) continues that run when the store has it. Ctrl-C or SIGTERM while the run is
    open marks it KILLED instead of leaving it RUNNING.
    """
    if not enabled:
        yield None
        return
    import mlflow

    nested = nested or mlflow.active_run() is not None  # inside an ablation trial: a child run
    if not nested:
        setup_experiment(cfg, workdir, experiment)
    trial = parent_trial_tags() if nested else {}
    all_tags = run_tags(cfg, stage, trial) | {k: str(v) for k, v in (tags or {}).items()}
    run = _start(cfg, stage, nested, run_name, all_tags, system_metrics, resume_run_id)
    previous = signal.getsignal(signal.SIGTERM)

    def _killed(signum, frame):  # noqa: ARG001
        mlflow.end_run(status="KILLED")
        raise SystemExit(128 + signum)

    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _killed)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
            mlflow.end_run(status=status)


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


# --- training-stage helpers -------------------------------------------------------------------------


def log_params(params: dict[str, Any]) -> None:
    """Log extra params to the active run, if any (e.g. `pretrain_run_id`); a value already logged
    (a resumed run) is kept."""
    import mlflow

    active = mlflow.active_run()
    if active is None:
        return
    logged = mlflow.MlflowClient().get_run(active.info.run_id).data.params
    mlflow.log_params({k: str(v) for k, v in params.items() if k not in logged})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a file (e.g. the final checkpoint) into the active run's artifacts, if any."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def registered_name(cfg: Config) -> str:
    """The model registry name of a fine-tuned classifier: `mme-<dataset>-<target kind>`."""
    return f"mme-{cfg.data.dataset}-{cfg.target.kind}"


def log_stage_model(cfg: Config, stage: str, model: Any) -> str | None:
    """Log a stage's trained module with `mlflow.pytorch` (pickle format: it loads back as our class):
    the pre-trained encoder (`encoder`) and the fine-tuned classifier (`classifier`, registered as
    `registered_name(cfg)`). Other stages log none. Returns the model URI, or None."""
    import copy
    import logging

    import mlflow
    import mlflow.pytorch

    if mlflow.active_run() is None or stage not in ("pretrain", "finetune"):
        return None
    module = model.encoder if stage == "pretrain" else model
    module = copy.deepcopy(module).cpu().eval()  # loads on a machine without the training GPU
    quiet = logging.getLogger("mlflow.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the pickle-format warning: loading our own class is the point here
    try:
        info = mlflow.pytorch.log_model(
            module, name="encoder" if stage == "pretrain" else "classifier", serialization_format="pickle",
            pip_requirements=_requirements(), registered_model_name=registered_name(cfg) if stage == "finetune"
            else None, await_registration_for=0)
    finally:
        quiet.setLevel(level)
    return info.model_uri


def _requirements() -> list[str]:
    """The logged model's requirements, given explicitly (MLflow's inference imports and times the code)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_dataset_lists(cfg: Config, paths: Paths, splits: tuple[str, ...]) -> None:
    """`mlflow.log_input` for each split's video list, with the list file's SHA-1 as digest (context:
    `training` for train, else the split name)."""
    import mlflow
    import mlflow.data
    import pandas as pd

    if mlflow.active_run() is None:
        return
    for split in splits:
        path = paths.list_file(cfg.data.dataset, split)
        if not path.is_file():
            continue
        rows = [line.rsplit(" ", 1) for line in path.read_text().splitlines() if line.strip()]
        frame = pd.DataFrame(rows, columns=["video", "label"]).astype({"label": int})
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        with warnings.catch_warnings():  # schema hints about int columns (inferred here and when logged);
            warnings.simplefilter("ignore", UserWarning)  # the list has no missing labels
            dataset = mlflow.data.from_pandas(frame, source=path.resolve().as_uri(), targets="label",
                                              name=f"{cfg.data.dataset}-{split}", digest=digest)
            mlflow.log_input(dataset, context="training" if split == "train" else split)


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
