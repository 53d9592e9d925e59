"""Where ablation trials are stored: Optuna RDB storages (SQLite, servers) and journal files, and the
file lock that serialises their first creation (and the grid bookkeeping) across processes, and the closing
of the MLflow runs a killed trial left RUNNING."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from mme.engine.tracking import lock_beside, sqlite_file

# A worker's trial counts as dead after this long without a heartbeat (its process was killed).
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120


def is_journal_url(url: str) -> bool:
    return url.startswith("journal://") or url.endswith((".journal", ".log"))


def journal_path(url: str) -> Path:
    """`journal:///abs/path.log` or a plain path ending .journal/.log -> the file path."""
    return Path(url[len("journal://"):] if url.startswith("journal://") else url)


def storage_exists(url: str) -> bool:
    """False for a SQLite or journal file that is not there yet (nothing stored); True for servers."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).exists()
    if is_journal_url(url):
        return journal_path(url).exists()
    return True


def storage_lock(url: str) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock next to a SQLite or journal store (`<file>.mme-lock`), for the processes of one
    machine or shared filesystem; a no-op for servers (their database serialises schema creation)."""
    path = sqlite_file(url) or (journal_path(url) if is_journal_url(url) else None)
    return lock_beside(path) if path is not None else contextlib.nullcontext()


def serialise_ask(study: Any, url: str) -> Any:
    """Make `study.ask` (and so `study.optimize`, which calls it) pop queued trials one process at a time
    (`storage_lock`). Why: on SQLite, Optuna's claim of a queued trial reads its state before it takes the
    write lock (SELECT ... FOR UPDATE is a no-op there), so two workers can pop the same trial; the second
    to finish it then fails with "Cannot tell a PRUNED trial" and its worker exits. Servers lock the row."""
    ask = study.ask

    def locked_ask(*args: Any, **kwargs: Any) -> Any:
        with storage_lock(url):
            return ask(*args, **kwargs)

    study.ask = locked_ask
    return study


def open_storage(url: str, heartbeat: bool = False, max_retry: int = 1) -> Any:
    """An Optuna storage for `url`: `sqlite:///…`, `postgresql://…`, `mysql://…` (RDB) or a journal file
    (`journal:///path`, or a path ending .journal / .log) for a shared filesystem without a database.

    `heartbeat=True` (workers; RDB only) fails trials whose worker stopped beating and re-queues them
    once through `RetryHeartbeatStaleTrialCallback` — the same policy ablate.py applies to trials that
    raise. A journal has no heartbeat (see experiments/README.md for recovering a killed worker).
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if is_journal_url(url):
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if not url.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
        raise ValueError(f"unsupported Optuna storage {url!r}: use sqlite:///path.db, postgresql://…, "
                         "mysql://…, journal:///path.log or a path ending .journal/.log")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if not heartbeat:
        with storage_lock(url):  # two processes creating one SQLite schema at once collide
            return RDBStorage(url, engine_kwargs=engine_kwargs)
    with storage_lock(url), warnings.catch_warnings():  # heartbeat_interval: experimental, relied on knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                          grace_period=HEARTBEAT_GRACE_S,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry))


def close_dead_trial_runs(study: Any, client: Any) -> None:
    """MLflow runs of trials whose worker was killed stay RUNNING; mark them KILLED (their trial is FAIL)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        kill_trial_runs(client, trial.user_attrs.get("mlflow_run_id"))


def kill_trial_runs(client: Any, run_id: str | None) -> None:
    """Mark a trial's MLflow run, and the stage runs nested under it, KILLED where still RUNNING."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return
    try:
        run = client.get_run(run_id)
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        for item in [run, *children]:
            if item.info.status == "RUNNING":
                client.set_terminated(item.info.run_id, "KILLED")
    except MlflowException:
        return
