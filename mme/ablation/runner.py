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
- Failure: a trial that raises ends FAIL and its point is re-queued once (MAX_RETRY); if it fails again the
  point is given up and the command exits 1. A trial stopped by Ctrl-C/SIGTERM is marked `interrupted`
  and re-queued on the next run without using up the retry. A worker killed outright: on an RDB storage
  (SQLite included) its trial goes stale after HEARTBEAT_GRACE_S and RetryHeartbeatStaleTrialCallback
  re-queues it; a journal has no heartbeat, so use `--requeue-running` once no worker is alive.
- Duplicates: before running, a trial yields (PRUNED) when its point is COMPLETE, is RUNNING in a trial
  that started earlier, has used up its retries, or its trial directory is locked by another process.
  Tables de-duplicate by (setting, seed) anyway.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mme.ablation.grid import MAX_RETRY, GridState, Point, blocking_reason, requeue
from mme.ablation.storage import open_storage
from mme.ablation.studies import (
    ATTR_BUDGET,
    ATTR_DATASET,
    ATTR_OVERRIDES,
    ATTR_PARENT_RUN,
    ATTR_PRESET,
    ATTR_STUDY,
    METRICS,
    RECORDS,
    Study,
    get_study,
    optuna_study_name,
    trial_budget,
)
from mme.config import Config, load_config
from mme.engine.tracking import setup_experiment, tracking_uri
from mme.paths import Paths

Runner = Callable[[Config, Path, tuple[str, ...]], dict[str, float]]


@dataclass(frozen=True)
class Hooks:
    """What the ablation needs from the layers above it; the command line wires them.

    Attributes:
        script: the command line a worker process runs (`python script --worker ...`).
        default_runner: a trial when no `--runner` is given: (cfg, trial dir, stages) -> metrics.
        prepare: download/extract the study's dataset once before the workers start: (cfg, workdir).
        report: rebuild the tables when the study ends: (cfg, workdir, storage URL).
    """

    script: Path
    default_runner: Runner
    prepare: Callable[[Config, Path], None]
    report: Callable[[Config, Path, str], Any]


@dataclass(frozen=True)
class Plan:
    """Everything a process needs to run one study: definition, naming, storage, places."""

    study: Study
    name: str  # the Optuna study name
    preset: str
    dataset: str
    overrides: tuple[str, ...]  # the user's --set, shared by every trial
    seeds: int
    storage: str
    workdir: Path
    runner: str | None

    def search_space(self) -> dict[str, list[Any]]:
        return {"setting": list(self.study.labels), "seed": list(range(self.seeds))}

    def points(self) -> list[Point]:
        return [(label, seed) for label in self.study.labels for seed in range(self.seeds)]

    def base_config(self) -> Config:
        return load_config(self.preset, [*trial_budget(self.preset), *self.study.base, *self.overrides])

    def trial_config(self, label: str, seed: int) -> Config:
        setting = self.study.setting(label)
        return load_config(self.preset, [*trial_budget(self.preset), *self.study.base, *self.overrides,
                                         *setting.overrides, f"seed={seed}"])

    def trial_dir(self, label: str, seed: int) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        return self.workdir / "trials" / self.name / f"{slug}-seed{seed}"


def make_plan(name: str, args: argparse.Namespace) -> Plan:
    study = get_study(name)
    swept = {o.split("=", 1)[0] for s in study.settings for o in s.overrides}
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if key == "seed":
            raise ValueError(f"--set {item}: seeds come from --seeds N (seeds 0..N-1)")
        if key in swept:
            raise ValueError(f"--set {item}: study {name!r} sweeps {key}; drop it or ablate another study")
    overrides, budget = tuple(args.overrides), trial_budget(args.preset)
    dataset = load_config(args.preset, [*budget, *study.base, *overrides]).data.dataset
    workdir = args.workdir.resolve()
    return Plan(study, optuna_study_name(name, args.preset, dataset, overrides, budget), args.preset, dataset,
                overrides, args.seeds, args.storage or Paths(workdir).optuna_uri, workdir, args.runner)


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
    """Create (or load) the study and its MLflow parent run before any worker starts."""
    import optuna
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    study = optuna.create_study(storage=open_storage(plan.storage), study_name=plan.name, direction="maximize",
                                sampler=optuna.samplers.GridSampler(plan.search_space(), seed=0), load_if_exists=True)
    if study.user_attrs.get(ATTR_STUDY) is None:
        for key, value in ((ATTR_STUDY, plan.study.name), (ATTR_PRESET, plan.preset),
                           (ATTR_DATASET, plan.dataset), (ATTR_OVERRIDES, list(plan.overrides)),
                           (ATTR_BUDGET, list(trial_budget(plan.preset)))):
            study.set_user_attr(key, value)
    experiment_id = setup_experiment(cfg, plan.workdir)
    client = MlflowClient()
    run_id = study.user_attrs.get(ATTR_PARENT_RUN)
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            return study
        except MlflowException:
            print(f"ablate: MLflow parent run {run_id} is gone from {tracking_uri(plan.workdir)}; making a new one")
    tags = {"stage": "ablate", "optuna_study": plan.name, "mme_study": plan.study.name,
            "paper_table": plan.study.table, "preset": plan.preset, "dataset": plan.dataset}
    run = client.create_run(experiment_id, run_name=f"ablate {plan.name}", tags=tags)
    for key, value in (("study", plan.study.name), ("preset", plan.preset), ("dataset", plan.dataset),
                       ("overrides", "; ".join(plan.overrides) or "-"), ("settings", " | ".join(plan.study.labels))):
        client.log_param(run.info.run_id, key, value)
    study.set_user_attr(ATTR_PARENT_RUN, run.info.run_id)
    return study


# ----------------------------------------------------------------------------------------------------
# Workers


def run_worker(plan: Plan, hooks: Hooks) -> None:
    """Run grid points until none is left to this worker (done, running elsewhere, or given up)."""
    import optuna
    from optuna.storages import fail_stale_trials

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(plan.workdir)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sampler = optuna.samplers.GridSampler(plan.search_space(), seed=0)
    study = optuna.load_study(study_name=plan.name, storage=open_storage(plan.storage, heartbeat=True,
                                                                         max_retry=MAX_RETRY), sampler=sampler)
    runner, parent = load_runner(plan.runner, hooks.default_runner), study.user_attrs.get(ATTR_PARENT_RUN)
    points = plan.points()
    while True:
        with warnings.catch_warnings():  # experimental API; Optuna calls it the same way before each trial
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)  # RDB: trials of killed workers -> FAIL, re-queued by the heartbeat callback
        state = GridState.read(study)
        todo = state.todo(points)
        for point in todo:
            if point in state.last_tried:  # failed, interrupted or pruned before: queue it again
                requeue(study, state.last_tried[point])
        fresh = [p for p in todo if p not in state.last_tried]
        if fresh and not state.waiting and sampler.is_exhausted(study):
            for label, seed in fresh:  # the sampler counts these as visited (e.g. failed before suggesting)
                study.enqueue_trial({"setting": label, "seed": seed})
        if not todo and not state.waiting:
            return
        study.optimize(lambda trial: objective(trial, study, plan, runner, parent), n_trials=1, catch=(Exception,))


def _stop_on_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001
    """SIGTERM stops a worker like Ctrl-C: the running trial is marked interrupted, not failed."""
    raise KeyboardInterrupt(f"signal {signum}")


def objective(trial: Any, study: Any, plan: Plan, runner: Runner, parent_run: str | None) -> float:
    import optuna

    label = trial.suggest_categorical("setting", list(plan.study.labels))
    seed = trial.suggest_int("seed", 0, plan.seeds - 1)
    trials = study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    reason = blocking_reason(trials, me, (label, seed))
    if reason:
        raise optuna.TrialPruned(reason)
    trial_dir = plan.trial_dir(label, seed)
    with trial_lock(trial_dir) as held:
        if not held:
            raise optuna.TrialPruned(f"{trial_dir} is locked by another worker")
        _fresh_trial_dir(trial_dir, plan.workdir)
        cfg = plan.trial_config(label, seed)
        for key, value in (("setting", label), ("seed", seed), ("trial_workdir", str(trial_dir)),
                           ("worker_pid", os.getpid()), ("preset", plan.preset), ("dataset", plan.dataset)):
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
    for key in RECORDS:  # JSON records (the per-clip test results), stored as they are
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
    """One MLflow run per trial, nested under the study's parent run; the stage runs nest under it."""
    import mlflow

    label, seed = point
    experiment_id = setup_experiment(cfg, plan.workdir)
    tags = {"stage": "ablate-trial", "optuna_study": plan.name, "optuna_trial": str(trial.number),
            "setting": label, "seed": str(seed), "preset": plan.preset, "dataset": plan.dataset}
    with mlflow.start_run(run_name=f"{label} seed{seed}", experiment_id=experiment_id, parent_run_id=parent_run,
                          tags=tags) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        mlflow.log_params({"optuna_study": plan.name, "optuna_trial_number": trial.number, "setting": label,
                           "seed": seed, "overrides": "; ".join(plan.study.setting(label).overrides)})
        metrics = runner(cfg, trial_dir, plan.study.stages)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def launch_workers(plan: Plan, n_jobs: int, script: Path) -> int:
    """Start `n_jobs` processes of the command line `script` in worker mode; returns the worst exit code."""
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
        return max(proc.wait() for proc in procs)
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        raise


def run_study(plan: Plan, args: argparse.Namespace, hooks: Hooks) -> int:
    """Prepare once, run the workers, close the MLflow parent run, rebuild the tables; 0 if all points are done."""
    from mlflow import MlflowClient

    started = time.time()
    cfg = plan.base_config()
    if plan.runner is None:
        hooks.prepare(cfg, plan.workdir)
    study = create_study_once(plan, cfg)
    if args.requeue_running:
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            print(f"ablate: trial {trial.number} was RUNNING; marked FAIL so its point is retried")
    parent, client, status = study.user_attrs[ATTR_PARENT_RUN], MlflowClient(), "FAILED"
    try:
        if args.n_jobs > 1:
            worst = launch_workers(plan, args.n_jobs, hooks.script)
        else:
            worst = 0
            run_worker(plan, hooks)
        _close_dead_trial_runs(study, client)
        state = GridState.read(study)
        points = plan.points()
        done, given_up = [p for p in points if p in state.done], state.given_up(points)
        status = "FINISHED" if len(done) == len(points) else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)
    client.log_metric(parent, "grid_points_done", len(done))
    client.log_metric(parent, "grid_points_given_up", len(given_up))
    print(f"ablate: study {plan.name}: {len(done)}/{len(points)} grid points done, {len(given_up)} given up"
          f"{' ' + str(given_up) if given_up else ''}, {time.time() - started:.1f} s; storage {plan.storage}",
          flush=True)
    hooks.report(cfg, plan.workdir, plan.storage)
    if worst:
        print(f"ablate: a worker exited with code {worst}; see its output above", file=sys.stderr)
    return 0 if status == "FINISHED" and not worst else 1


def _close_dead_trial_runs(study: Any, client: Any) -> None:
    """MLflow runs of trials whose worker was killed stay RUNNING; mark them KILLED (their trial is FAIL)."""
    from mlflow.exceptions import MlflowException
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        try:
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
        except MlflowException:
            continue
