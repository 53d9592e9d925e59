"""The ablation runner: one Optuna study per paper table, a grid over the study's settings x seeds.

A trial runs its setting's config in `<workdir>/trials/<study>/<setting>-seed<k>/`, whose `data` links to
the shared `<workdir>/data` (flow caches are computed once); every metric becomes a trial attribute and
an MLflow metric. What a trial runs, the data preparation and the report come from the layer above
through `Hooks` (experiments/ablate.py passes the stage chain of `mme.stages.chain` and `mme report`),
so this package never imports a stage.

Policy (experiments/README.md says the same for users):
- The launching process creates the Optuna study, the storage schema and the MLflow parent run once,
  then starts `--n-jobs` worker processes (the command line with `--worker`) that share the grid.
- Resume: a grid point with a COMPLETE trial is never run again; re-running a finished study runs nothing.
  A COMPLETE trial counts only under its point's current identity (`Hooks.identity`: what its results are
  keyed by); one recorded under another (a setting redefined, a code change) is stale and runs again.
- Failure: a trial that raises ends FAIL and its point is re-queued once (MAX_RETRY); if it fails again the
  point is given up and the command exits 1. A trial stopped by Ctrl-C/SIGTERM is marked `interrupted`
  and re-queued on the next run without using up the retry. A worker killed outright: on an RDB storage
  (SQLite included) its trial goes stale after HEARTBEAT_GRACE_S and RetryHeartbeatStaleTrialCallback
  re-queues it; a journal has no heartbeat, so use `--requeue-running` once no worker is alive.
  A worker killed on this host is noticed at once (its recorded pid is gone): its trial is failed, its
  MLflow runs marked KILLED and its point re-queued by the next worker or re-run.
- Duplicates: the grid is queued once (`enqueue_trial`), under a file lock next to a SQLite/journal store
  that also serialises the first creation of the stores; before running, a trial yields (PRUNED) when its
  point is COMPLETE, is RUNNING in a trial that started earlier, has used up its retries, or its trial
  directory is locked by another process. Tables de-duplicate by (setting, seed) anyway.
- Several launchers: one that finds the rest of the grid running in other workers exits 0 and says so,
  leaving the study's MLflow parent run RUNNING for the launcher that finishes the last point.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mme.ablation.grid import (
    MAX_RETRY,
    GridState,
    Point,
    blocking_reason,
    enqueue_grid,
    owner,
    point_of,
    points_text,
    reclaim_dead,
    requeue,
)
from mme.ablation.plan import Plan
from mme.ablation.storage import (
    HEARTBEAT_GRACE_S,
    close_dead_trial_runs,
    kill_trial_runs,
    open_storage,
    serialise_ask,
    storage_lock,
)
from mme.ablation.studies import (
    ATTR_BUDGET,
    ATTR_DATASET,
    ATTR_IDENTITY,
    ATTR_OVERRIDES,
    ATTR_PARENT_RUN,
    ATTR_PRESET,
    ATTR_STUDY,
    METRICS,
    PLATFORM_ATTR,
    RECORDS,
    trial_budget,
)
from mme.config import Config
from mme.engine.tracking import pipeline_tag, setup_experiment, tracking_uri

Runner = Callable[[Config, Path, tuple[str, ...]], dict[str, float]]


@dataclass(frozen=True)
class Hooks:
    """What the ablation needs from the layers above it; the command line wires them.

    Attributes:
        script: the command line a worker process runs (`python script --worker ...`).
        default_runner: a trial when no `--runner` is given: (cfg, trial dir, stages) -> metrics.
        prepare: download/extract the study's dataset once before the workers start: (cfg, workdir, trials),
            `trials` the (config, stages) of the points this run works on (a hook may skip what none needs).
        report: rebuild the tables when the study ends: (cfg, workdir, storage URL).
        identity: what a trial's results are keyed by: (cfg, stages) -> text; a COMPLETE trial recorded
            under another identity is stale and its point runs again.
    """

    script: Path
    default_runner: Runner
    prepare: Callable[[Config, Path, list[tuple[Config, tuple[str, ...]]]], None]
    report: Callable[[Config, Path, str], Any]
    identity: Callable[[Config, tuple[str, ...]], str]


def point_identities(plan: Plan, hooks: Hooks) -> dict[Point, str]:
    return {point: hooks.identity(plan.trial_config(*point), plan.study.stages) for point in plan.points()}


# ----------------------------------------------------------------------------------------------------
# What a trial runs


def load_runner(spec: str | None, default: Runner) -> Runner:
    """`--runner module:function` (a testing/extension hook), else `default` (the real stage chain)."""
    if spec is None:
        return default
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise ValueError(f"--runner {spec!r} must look like module:function (e.g. my_pkg.fake:run)")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--runner {spec!r}: {exc} (is the module on PYTHONPATH?)") from exc


# ----------------------------------------------------------------------------------------------------
# Study, MLflow parent run, grid bookkeeping


def create_study_once(plan: Plan, cfg: Config) -> Any:
    """Create (or load) the study, queue its grid and open its MLflow parent run before any worker starts;
    one launcher at a time (`storage_lock`), so concurrent launchers on a fresh workdir share one of each."""
    with storage_lock(plan.storage):
        study = _create_study(plan)
        experiment_id = setup_experiment(cfg, plan.workdir)
        client = _client(plan)
        run_id = study.user_attrs.get(ATTR_PARENT_RUN)
        if run_id:
            from mlflow.exceptions import MlflowException

            try:
                client.update_run(run_id, status="RUNNING")
                return study
            except MlflowException:
                print(f"ablate: MLflow parent run {run_id} is gone from {tracking_uri(plan.workdir)}; making a new one")
        tags = {"stage": "ablate", "optuna_study": plan.name, "mme_study": plan.study.name,
                "paper_table": plan.study.table, "preset": plan.preset, "dataset": plan.dataset}
        run = client.create_run(experiment_id, run_name=f"ablate {plan.name}", tags=tags)
        for k, v in (("study", plan.study.name), ("preset", plan.preset), ("dataset", plan.dataset),
                     ("overrides", "; ".join(plan.overrides) or "-"), ("settings", " | ".join(plan.study.labels))):
            client.log_param(run.info.run_id, k, v)
        study.set_user_attr(ATTR_PARENT_RUN, run.info.run_id)
        return study


def _create_study(plan: Plan) -> Any:
    """The Optuna study with its attributes, objective name and every grid point queued."""
    import optuna

    study = optuna.create_study(storage=open_storage(plan.storage), study_name=plan.name, direction="maximize",
                                sampler=_sampler(), load_if_exists=True)
    if study.user_attrs.get(ATTR_STUDY) is None:
        for key, value in ((ATTR_STUDY, plan.study.name), (ATTR_PRESET, plan.preset),
                           (ATTR_DATASET, plan.dataset), (ATTR_OVERRIDES, list(plan.overrides)),
                           (ATTR_BUDGET, list(trial_budget(plan.preset)))):
            study.set_user_attr(key, value)
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental API, used for its public effect only (dashboard labels)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([plan.study.objective])
    enqueue_grid(study, plan.points())
    return study


def _sampler() -> Any:
    """Never picks a value: every trial runs a queued point (an unqueued one is pruned before suggesting)."""
    import optuna

    return optuna.samplers.RandomSampler(seed=0)


def _client(plan: Plan) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri(plan.workdir))


# ----------------------------------------------------------------------------------------------------
# Workers


def run_worker(plan: Plan, hooks: Hooks) -> GridState:
    """Run grid points until none is left to this worker (done, running elsewhere, or given up); returns
    the grid as this worker left it."""
    import optuna

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    study = serialise_ask(optuna.load_study(study_name=plan.name, storage=open_storage(
        plan.storage, heartbeat=True, max_retry=MAX_RETRY), sampler=_sampler()), plan.storage)
    runner, parent = load_runner(plan.runner, hooks.default_runner), study.user_attrs.get(ATTR_PARENT_RUN)
    points, identities = plan.points(), point_identities(plan, hooks)
    while True:
        state, todo = refresh_grid(plan, study, identities)
        if not todo and not state.waiting:
            elsewhere = state.elsewhere(points)
            if elsewhere:
                print(f"ablate[{os.getpid()}]: nothing left for this worker; {len(elsewhere)} point(s) still "
                      f"running in other workers: {_holders(state, elsewhere)}", flush=True)
            return state
        study.optimize(lambda trial: objective(trial, study, plan, runner, parent, identities), n_trials=1,
                       catch=(Exception,))


def refresh_grid(plan: Plan, study: Any, identities: dict[Point, str]) -> tuple[GridState, list[Point]]:
    """Fail the trials of dead workers (stale heartbeat, or a pid gone on this host; their MLflow runs
    KILLED), then queue again every point left to do (stale ones included); one process at a time
    (`storage_lock`)."""
    import optuna
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():  # experimental API; Optuna calls it the same way before each trial
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)  # RDB: trials of killed workers -> FAIL, re-queued by the heartbeat callback
    for trial in reclaim_dead(study):
        print(f"ablate[{os.getpid()}]: trial {trial.number} {point_of(trial)} lost its worker ({owner(trial)}); "
              "marked failed and queued again", flush=True)
        kill_trial_runs(_client(plan), trial.user_attrs.get("mlflow_run_id"))
    with storage_lock(plan.storage):
        state = GridState.read(study, identities)
        todo = state.todo(plan.points())
        stale = [p for p in todo if p in state.stale]
        if stale:
            print(f"ablate[{os.getpid()}]: {len(stale)} point(s) finished under another definition of their "
                  f"setting (or older code); running them again: {points_text(stale)}",
                  flush=True)
        for point in todo:
            tried = state.last_tried.get(point)
            requeue(study, point, retry_of=tried.number if tried is not None else None)
    return state, todo


def _holders(state: GridState, points: list[Point]) -> str:
    return "; ".join(f"{p[0]} seed {p[1]} in trial {state.running[p].number} ({owner(state.running[p])})"
                     for p in points)


def _stop_on_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001
    """SIGTERM stops a worker like Ctrl-C: the running trial is marked interrupted, not failed."""
    raise KeyboardInterrupt(f"signal {signum}")


def objective(trial: Any, study: Any, plan: Plan, runner: Runner, parent_run: str | None,
              identities: dict[Point, str]) -> float:
    import optuna

    point = point_of(trial)
    if point is None:  # created by optimize() when another worker took the last queued trial
        raise optuna.TrialPruned("no queued grid point left for this trial")
    label = trial.suggest_categorical("setting", list(plan.study.labels))  # the queued values: kept as params
    seed = trial.suggest_int("seed", 0, plan.seeds - 1)
    trials = study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    if (label, seed) not in plan.points():  # queued by a run with other --settings: left for a later run
        raise optuna.TrialPruned(f"{label} seed {seed} is not among this run's --settings")
    reason = blocking_reason(trials, me, (label, seed), identities[(label, seed)])
    if reason:
        raise optuna.TrialPruned(reason)
    trial_dir = plan.trial_dir(label, seed)
    with trial_lock(trial_dir) as held:
        if not held:
            raise optuna.TrialPruned(f"{trial_dir} is locked by another worker")
        _fresh_trial_dir(trial_dir, plan.workdir)
        cfg = plan.trial_config(label, seed)
        for key, value in (("trial_workdir", str(trial_dir)), (ATTR_IDENTITY, identities[(label, seed)]),
                           ("worker_pid", os.getpid()),
                           ("worker_host", socket.gethostname()), ("interrupted", False),
                           ("preset", plan.preset), ("dataset", plan.dataset)):
            trial.set_user_attr(key, value)
        started = time.time()
        try:
            metrics = _tracked_run(trial, plan, cfg, (label, seed), trial_dir, runner, parent_run)
        except (KeyboardInterrupt, SystemExit) as exc:
            trial.set_user_attr("interrupted", True)  # not a failure of the setting: re-queued for free
            raise KeyboardInterrupt(f"trial {trial.number} stopped ({exc!r})") from exc
        except Exception as exc:
            trial.set_user_attr("error", repr(exc)[:1000])
            raise
    if plan.study.objective not in metrics:
        raise KeyError(f"the runner returned no {plan.study.objective!r}, the objective of study {plan.study.name!r}")
    for key in METRICS:
        if key in metrics:
            trial.set_user_attr(key, float(metrics[key]))
    for key in (*RECORDS, PLATFORM_ATTR):  # JSON records (the per-clip test results) and text, as they are
        if key in metrics:
            trial.set_user_attr(key, metrics[key])
    trial.set_user_attr("trial_seconds", round(time.time() - started, 2))
    for last in (trial_dir / "models").glob("*/last.pt"):  # resume-only checkpoints of a finished trial
        last.unlink()
    print(f"ablate[{os.getpid()}]: trial {trial.number} {label} seed {seed}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))), flush=True)
    return float(metrics[plan.study.objective])


@contextmanager
def trial_lock(trial_dir: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on `<trial_dir>/.lock`; yields False if another process holds it."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fresh_trial_dir(trial_dir: Path, workdir: Path) -> None:
    """Link the shared data and drop what an earlier attempt at this point left (every attempt starts clean)."""
    link = trial_dir / "data"
    if link.is_symlink() and link.resolve() != (workdir / "data").resolve():
        link.unlink()
    if not link.is_symlink():
        if link.exists():
            raise FileExistsError(f"{link} exists and is not a link to {workdir / 'data'}; remove it")
        link.symlink_to(workdir / "data", target_is_directory=True)
    for leftover in ("models", "reports"):
        shutil.rmtree(trial_dir / leftover, ignore_errors=True)


def _tracked_run(trial: Any, plan: Plan, cfg: Config, point: Point, trial_dir: Path, runner: Runner,
                 parent_run: str | None) -> dict[str, float]:
    """One MLflow run per trial, nested under the study's parent run; the stage runs nest under it.
    A trial stopped by Ctrl-C/SIGTERM ends KILLED, one that raises FAILED."""
    import mlflow

    label, seed = point
    experiment_id = setup_experiment(cfg, plan.workdir)
    trial_tags = {"optuna_study": plan.name, "optuna_trial": str(trial.number), "setting": label}
    tags = trial_tags | {"stage": "ablate-trial", "seed": str(seed), "preset": plan.preset, "dataset": plan.dataset,
                         "pipeline": pipeline_tag(cfg, trial_tags)}
    run = mlflow.start_run(run_name=f"{label} seed{seed} [{plan.name} #{trial.number}]", experiment_id=experiment_id,
                           parent_run_id=parent_run, tags=tags)
    status = "FAILED"
    try:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        mlflow.log_params({"optuna_study": plan.name, "optuna_trial_number": trial.number, "setting": label,
                           "seed": seed, "overrides": "; ".join(plan.study.setting(label).overrides)})
        metrics = runner(cfg, trial_dir, plan.study.stages)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        if PLATFORM_ATTR in metrics:
            mlflow.set_tag(PLATFORM_ATTR, metrics[PLATFORM_ATTR])
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        while mlflow.active_run() is not None and mlflow.active_run().info.run_id != run.info.run_id:
            mlflow.end_run(status=status)  # a stage run the interruption left open
        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)
    return metrics


def launch_workers(plan: Plan, n_jobs: int, script: Path) -> int:
    """Start `n_jobs` processes of the command line `script` in worker mode; returns 0 if every one
    exited 0, else 1 (each failed worker is named, with its signal when one killed it)."""
    cmd = [sys.executable, str(script), "--worker", "--study", plan.study.name,
           "--preset", plan.preset, "--seeds", str(plan.seeds), "--storage", plan.storage,
           "--workdir", str(plan.workdir)]
    for item in plan.overrides:
        cmd += ["--set", item]
    if plan.runner:
        cmd += ["--runner", plan.runner]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n_jobs)))
    procs = [subprocess.Popen(cmd, env=env) for _ in range(n_jobs)]
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        raise
    for index, (proc, code) in enumerate(zip(procs, codes, strict=True), start=1):
        if code:
            print(f"ablate: worker {index}/{n_jobs} (pid {proc.pid}) {exit_description(code)}; see its output above",
                  file=sys.stderr, flush=True)
    return 1 if any(codes) else 0


def exit_description(code: int) -> str:
    """`exited with code 1` or `was killed by signal 9 (SIGKILL)` for a Popen return code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    return f"was killed by signal {-code} ({name})"


def run_study(plan: Plan, args: argparse.Namespace, hooks: Hooks) -> int:
    """Prepare once, run the workers, close the MLflow parent run, rebuild the tables; 0 if all points are
    done, or the rest runs in other workers (the parent run is then left to the last of them)."""
    started = time.time()
    cfg = plan.base_config()
    if plan.runner is None:
        hooks.prepare(cfg, plan.workdir, [(plan.trial_config(*point), plan.study.stages) for point in plan.points()])
    study = create_study_once(plan, cfg)
    if args.requeue_running:
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            print(f"ablate: trial {trial.number} was RUNNING; marked FAIL so its point is retried")
    parent, client, status = study.user_attrs[ATTR_PARENT_RUN], _client(plan), "FAILED"
    try:
        if args.n_jobs > 1:
            worst = launch_workers(plan, args.n_jobs, hooks.script)
        else:
            worst = 0
            run_worker(plan, hooks)
        state, _ = refresh_grid(plan, study, point_identities(plan, hooks))
        close_dead_trial_runs(study, client)
        points = plan.points()
        done, given_up, elsewhere = [p for p in points if p in state.done], state.given_up(points), []
        if len(done) == len(points):
            status = "FINISHED"
        elif not given_up and not worst:
            elsewhere = [p for p in points if p not in state.done]  # running (or queued) in other workers
            status = "RUNNING"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "RUNNING":  # RUNNING: the launcher that finishes the last point closes it
            client.set_terminated(parent, status)
    client.log_metric(parent, "grid_points_done", len(done))
    client.log_metric(parent, "grid_points_given_up", len(given_up))
    print(f"ablate: study {plan.name}: {len(done)}/{len(points)} grid points done, {len(given_up)} given up"
          f"{' ' + str(given_up) if given_up else ''}, {time.time() - started:.1f} s; storage {plan.storage}",
          flush=True)
    if elsewhere:
        print(f"ablate: the other {len(elsewhere)} point(s) are in other workers' hands "
              f"({_holders(state, [p for p in elsewhere if p in state.running]) or 'queued'}); they finish the "
              f"study. If such a worker was killed on another host, run this again after {HEARTBEAT_GRACE_S} s "
              "(heartbeat grace period) or with --requeue-running once no worker is alive.", flush=True)
    hooks.report(cfg, plan.workdir, plan.storage)
    if worst:
        print("ablate: a worker failed (see above); run the same command again to retry its point", file=sys.stderr)
    return 0 if status in ("FINISHED", "RUNNING") and not worst else 1
