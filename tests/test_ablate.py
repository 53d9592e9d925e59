"""experiments/ablate.py with a cheap deterministic runner (its `--runner module:function` hook):
two worker processes split a grid without duplicates, a failing trial is retried once, a finished study
resumes to nothing, a point that keeps failing is given up, every trial is an MLflow run under the
study's parent run, and bad input fails with a message that names the fix."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from mme.ablation import STUDIES, blocking_reason, optuna_study_name, points_text
from mme.ablation.storage import HEARTBEAT_GRACE_S, open_storage, serialise_ask, storage_lock

REPO = Path(__file__).resolve().parents[1]
ABLATE = REPO / "experiments" / "ablate.py"

# A runner that sleeps a little, returns metrics that depend on the setting and the seed, and can fail on
# demand: FAKE_FAIL_ONCE / FAKE_FAIL_ALWAYS = "key=value,..." matched against the trial's flat config
# (FAKE_KILL_ONCE: the worker SIGKILLs itself the first time).
# FAKE_BARRIER=N makes each worker's first trial wait until N workers have started one (so the test
# proves that the grid is split, independently of how fast each process starts).
FAKE_RUNNER = '''
import os, time
from pathlib import Path

def _matches(cfg, spec):
    flat = cfg.flat()
    return bool(spec) and all(str(flat[k]) == v for k, v in (p.split("=", 1) for p in spec.split(",")))

def run(cfg, trial_dir, stages):
    state = Path(os.environ["FAKE_STATE"])
    barrier = int(os.environ.get("FAKE_BARRIER", "0"))
    mine = state / f"worker-{os.getpid()}"
    if barrier and not mine.exists():
        mine.touch()
        deadline = time.time() + 60
        while len(list(state.glob("worker-*"))) < barrier and time.time() < deadline:
            time.sleep(0.1)
    time.sleep(0.3)
    if _matches(cfg, os.environ.get("FAKE_KILL_ONCE", "")):
        try:
            os.close(os.open(state / "killed-once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.kill(os.getpid(), 9)
        except FileExistsError:
            pass
    if _matches(cfg, os.environ.get("FAKE_FAIL_ALWAYS", "")):
        raise RuntimeError("injected permanent failure")
    if _matches(cfg, os.environ.get("FAKE_FAIL_ONCE", "")):
        try:
            os.close(os.open(state / "failed-once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            raise RuntimeError("injected one-off failure")
        except FileExistsError:
            pass
    assert (trial_dir / "data").is_symlink()
    top1 = 50.0 + cfg.target.length + 0.5 * cfg.seed
    return {"ft_top1": top1, "ft_top5": top1 + 20, "probe_top1": top1 - 20, "pretrain_seconds": 1.0,
            "pretrain_loss": 0.1 * cfg.target.length}
'''


def _load_ablate():
    """The script as a module (it is not part of the package); loaded once per session."""
    if "ablate_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ablate_script", ABLATE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ablate_script"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["ablate_script"]


@pytest.fixture
def fake_runner(tmp_path) -> dict[str, str]:
    """Environment for a subprocess that can import `ablate_fake_runner`."""
    (tmp_path / "ablate_fake_runner.py").write_text(FAKE_RUNNER)
    (tmp_path / "state").mkdir()
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": pythonpath, "FAKE_STATE": str(tmp_path / "state")}


def _trials(storage: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _ablate(workdir: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ABLATE), "--study", "length", "--preset", "smoke", "--seeds", "2",
           "--runner", "ablate_fake_runner:run", "--workdir", str(workdir), *extra]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | env
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_workers_split_grid_retry_failure_and_resume(tmp_path, fake_runner):
    workdir = tmp_path / "work"
    env = fake_runner | {"FAKE_BARRIER": "2", "FAKE_FAIL_ONCE": "target.length=6,seed=1,probe.init=pretrained"}
    out = _ablate(workdir, env, "--n-jobs", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    storage, name = f"sqlite:///{workdir / 'optuna.db'}", "length-smoke-synthetic"
    trials = _trials(storage, name)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    points = sorted((t.params["setting"], t.params["seed"]) for t in complete)
    # every point once, no duplicate; the floor row is a grid point like the others
    assert points == [(label, s) for label in ("L=4", "L=6", "L=8", "Random init") for s in (0, 1)]
    assert len({t.user_attrs["worker_pid"] for t in complete}) == 2  # both workers ran trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [(t.params["setting"], t.params["seed"]) for t in failed] == [("L=6", 1)]
    assert "injected one-off failure" in failed[0].user_attrs["error"]
    retried = next(t for t in complete if t.params == {"setting": "L=6", "seed": 1})
    assert retried.user_attrs["retry_of"] == failed[0].number and retried.value == 56.5
    assert {t.user_attrs["ft_top1"] for t in complete} == {54.0, 54.5, 56.0, 56.5, 58.0, 58.5}

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    parent_id = optuna.load_study(study_name=name, storage=storage).user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["grid_points_done"] == 8
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    ran = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == sorted(t.number for t in ran)
    assert {r.data.params["optuna_trial_number"] for r in children} == {str(t.number) for t in ran}

    table = pd.read_csv(workdir / "reports/tables/table7a_length.csv")  # ablate.py rebuilt the table
    assert list(table["n_seeds"]) == [2, 2, 2, 2] and list(table["ft_top1_mean"]) == [54.25, 56.25, 58.25, 56.25]

    again = _ablate(workdir, fake_runner)  # resume a finished study: nothing new runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_trials(storage, name)) == len(trials)
    assert "8/8 grid points done" in again.stdout



def _finished(plan, label: str, ft_top1: float, **user_attrs) -> optuna.trial.FrozenTrial:
    """A COMPLETE trial of `plan`'s grid point (label, seed 0), as an earlier run would have left it."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    distributions = {"setting": CategoricalDistribution(list(plan.study.labels)),
                     "seed": IntDistribution(0, plan.seeds - 1)}
    return optuna.trial.create_trial(params={"setting": label, "seed": 0}, distributions=distributions,
                                     value=ft_top1, user_attrs={"setting": label, "seed": 0, "ft_top1": ft_top1,
                                                                **user_attrs})


def test_a_point_finished_under_another_definition_runs_again(tmp_path, fake_runner):
    """Only a COMPLETE trial recorded under its point's current identity (the trial's part keys) counts as
    done: one from an older definition of the setting, or from before identities were recorded, runs
    again, and the table shows the new result instead of the stale one."""
    from mme.stages.chain import trial_identity

    ablate, workdir = _load_ablate(), tmp_path / "work"
    plan = ablate.make_plan("length", ablate.parse_args(["--study", "length", "--preset", "smoke", "--seeds", "1",
                                                         "--workdir", str(workdir)]))
    workdir.mkdir()
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name=plan.name, direction="maximize")
    current = trial_identity(plan.trial_config("L=4", 0), plan.study.stages)
    assert current != trial_identity(plan.trial_config("L=6", 0), plan.study.stages)
    study.add_trial(_finished(plan, "L=4", 11.0, identity=current))
    study.add_trial(_finished(plan, "L=6", 12.0, identity="pretrain-000000000000 finetune-000000000000"))
    study.add_trial(_finished(plan, "L=8", 13.0))  # recorded before trials carried an identity
    out = _ablate(workdir, fake_runner, "--seeds", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "running them again: L=6 seed 0; L=8 seed 0" in out.stdout
    ran = [t for t in _trials(storage, plan.name)[3:] if t.state == TrialState.COMPLETE]
    assert sorted(t.params["setting"] for t in ran) == ["L=6", "L=8", "Random init"]  # not L=4
    assert all(t.user_attrs["identity"] == trial_identity(plan.trial_config(t.params["setting"], 0),
                                                          plan.study.stages) for t in ran)
    table = pd.read_csv(workdir / "reports/tables/table7a_length.csv").set_index("setting")
    assert list(table.loc[["L=4", "L=6", "L=8"], "ft_top1_mean"]) == [11.0, 56.0, 58.0]
    again = _ablate(workdir, fake_runner, "--seeds", "1")
    assert "4/4 grid points done" in again.stdout and "running them again" not in again.stdout


def test_point_that_keeps_failing_is_given_up_on_a_journal(tmp_path, fake_runner, monkeypatch):
    for key, value in fake_runner.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FAKE_FAIL_ALWAYS", "target.patch_norm=False")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test; main() points it at the workdir
    monkeypatch.syspath_prepend(str(tmp_path))
    journal = tmp_path / "work" / "optuna.journal"
    argv = ["--study", "norm", "--preset", "smoke", "--storage", str(journal), "--workdir", str(tmp_path / "work"),
            "--runner", "ablate_fake_runner:run"]
    ablate = _load_ablate()
    assert ablate.main(argv) == 1  # one point given up
    assert journal.exists()
    storage = ablate.open_storage(str(journal))
    trials = _trials(storage, "norm-smoke-synthetic")
    by_state = {state: [t.params["setting"] for t in trials if t.state == state] for state in TrialState}
    assert sorted(by_state[TrialState.COMPLETE]) == ["Random init", "w/ patch norm"]
    assert by_state[TrialState.FAIL] == ["w/o patch norm", "w/o patch norm"]  # the first try and one retry
    assert ablate.main(argv) == 1 and len(_trials(storage, "norm-smoke-synthetic")) == len(trials)
    table = pd.read_csv(tmp_path / "work/reports/tables/table7b_norm.csv").set_index("setting")
    assert table.loc["w/o patch norm", "n_seeds"] == 0 and pd.isna(table.loc["w/o patch norm", "ft_top1_mean"])


def test_our_store_lock_leaves_optunas_journal_lock_alone(tmp_path):
    """Optuna locks a journal through `<file>.lock` and removes a foreign file there by force after 30 s:
    holding our lock while it writes must neither stall the write nor have our lock file removed under us."""
    url = str(tmp_path / "optuna.journal")
    with storage_lock(url):
        ours = [p for p in tmp_path.iterdir() if p.name != "optuna.journal"]
        optuna.create_study(study_name="s", storage=open_storage(url))
        assert ours and all(p.is_file() for p in ours), ours  # our lock is still there, a plain file
    assert optuna.get_all_study_names(open_storage(url)) == ["s"]
    assert not (tmp_path / "optuna.journal.lock").exists()  # Optuna's own lock was released


def _pop_queued(url: str, pops: int, out) -> None:
    study = serialise_ask(optuna.load_study(study_name="race", storage=open_storage(url)), url)
    out.put([study.ask().number for _ in range(pops)])


def test_workers_popping_one_sqlite_queue_never_take_the_same_trial(tmp_path):
    """Optuna's claim of a queued trial is racy on SQLite: without `serialise_ask`, 4 processes x 30 pops of
    120 queued trials took a trial twice 11-17 times in each of 4 runs (measured); a worker that shares a
    trial dies telling it ("Cannot tell a PRUNED trial")."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for x in range(120):
        study.enqueue_trial({"x": x})
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [context.Process(target=_pop_queued, args=(url, 30, out)) for _ in range(4)]
    for worker in workers:
        worker.start()
    popped = [number for _ in workers for number in out.get(timeout=240)]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(popped) == list(range(120))  # every queued trial once, none twice


def _t(number, state, setting=None, seed=0, minute=0, queued=None, **user_attrs):
    """A FrozenTrial stand-in; `queued=(setting, seed)`: the point it was queued with, params not written yet."""
    params = {"setting": setting, "seed": seed} if setting else {}
    if queued is not None:
        user_attrs |= {"setting": queued[0], "seed": queued[1]}
    return SimpleNamespace(number=number, state=state, params=params, system_attrs={}, user_attrs=user_attrs,
                           datetime_start=datetime(2026, 1, 1) + timedelta(minutes=minute))


def test_blocking_reason_yields_to_finished_earlier_running_and_exhausted_points():
    me = _t(5, TrialState.RUNNING, "a", minute=5, queued=("a", 0))
    assert blocking_reason([me], me, ("a", 0)) is None
    assert "finished in trial 1" in blocking_reason([_t(1, TrialState.COMPLETE, "a"), me], me, ("a", 0))
    assert "running in trial 2" in blocking_reason([_t(2, TrialState.RUNNING, "a", minute=1), me], me, ("a", 0))
    assert blocking_reason([_t(7, TrialState.RUNNING, "a", minute=9), me], me, ("a", 0)) is None  # it yields to me
    no_params_yet = _t(3, TrialState.RUNNING, minute=2, queued=("a", 0))  # same queued point, params not written
    assert "running in trial 3" in blocking_reason([no_params_yet, me], me, ("a", 0))
    other_point = _t(4, TrialState.RUNNING, minute=2, queued=("b", 0))
    assert blocking_reason([other_point, me], me, ("a", 0)) is None
    assert blocking_reason([_t(1, TrialState.COMPLETE, "b"), me], me, ("a", 0)) is None
    now, old = _t(1, TrialState.COMPLETE, "a", identity="k2"), _t(1, TrialState.COMPLETE, "a", identity="k1")
    assert "finished in trial 1" in blocking_reason([now, me], me, ("a", 0), identity="k2")
    assert blocking_reason([old, me], me, ("a", 0), identity="k2") is None  # stale: runs again
    assert blocking_reason([_t(1, TrialState.COMPLETE, "a"), me], me, ("a", 0), identity="k2") is None
    fail, stopped = _t(1, TrialState.FAIL, "a"), _t(2, TrialState.FAIL, "a", interrupted=True)
    assert blocking_reason([fail, stopped, me], me, ("a", 0)) is None  # an interrupted run is no failure
    assert "given up" in blocking_reason([fail, _t(2, TrialState.FAIL, "a"), me], me, ("a", 0))


def test_points_are_listed_once_per_setting():
    points = [("Traj", 0), ("HOG", 2), ("Traj", 1), ("Traj", 2)]
    assert points_text(points) == "Traj seeds 0, 1, 2; HOG seed 2"
    assert points_text([]) == ""


def test_bad_input_names_the_fix(tmp_path, capsys):
    ablate = _load_ablate()
    base = ["--workdir", str(tmp_path), "--preset", "smoke"]
    assert ablate.main(["--study", "lenght", *base]) == 2
    assert "choose one of: content, interpolation, length" in capsys.readouterr().err
    assert ablate.main(["--study", "length", "--set", "target.length=4", *base]) == 2
    assert "sweeps target.length" in capsys.readouterr().err
    assert ablate.main(["--study", "length", "--set", "seed=3", *base]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert ablate.main(["--study", "length", "--runner", "no_such_module:run", *base]) == 2
    assert "PYTHONPATH" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was created


def test_trial_dirs_are_distinct_per_setting(tmp_path):
    ablate = _load_ablate()
    for name in STUDIES:
        args = ablate.parse_args(["--study", name, "--preset", "smoke", "--workdir", str(tmp_path), "--seeds", "2"])
        plan = ablate.make_plan(name, args)
        dirs = {plan.trial_dir(label, seed) for label, seed in plan.points()}
        assert len(dirs) == len(plan.points()), name
        assert all(d.parent == tmp_path / "trials" / plan.name for d in dirs)


def test_study_name_separates_budgets_and_overrides(tmp_path):
    """A trial budget or extra --set is part of the study's identity: a changed budget must start a new
    study (its finished points are not the new budget's), while the budget-free smoke name stays plain."""
    ablate = _load_ablate()

    def name(preset: str, *sets: str) -> str:
        argv = ["--study", "length", "--preset", preset, "--workdir", str(tmp_path)]
        return ablate.make_plan("length", ablate.parse_args(argv + [a for s in sets for a in ("--set", s)])).name

    assert name("smoke") == "length-smoke-synthetic"
    mini = name("mini")
    assert mini.startswith("length-mini-synthetic-b") and mini != "length-mini-synthetic"
    assert name("mini", "mask.ratio=0.8") not in (mini, name("mini", "mask.ratio=0.7"))
    assert name("mini", "mask.ratio=0.8").startswith(mini + "-")
    assert optuna_study_name("length", "mini", "synthetic", budget=("finetune.epochs=3",)) != \
        optuna_study_name("length", "mini", "synthetic", budget=("finetune.epochs=2",))


def _launch(workdir: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ABLATE), "--study", "norm", "--preset", "smoke", "--runner", "ablate_fake_runner:run",
           "--workdir", str(workdir), *extra]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | env
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_launchers_on_a_fresh_workdir_share_the_stores(tmp_path, fake_runner):
    """Two `ablate.py` launchers started together on an empty workdir: both create the stores (a file lock
    serialises that), they split the 3-point grid (2 settings + the Random init floor), both exit 0, and the
    study's parent run ends FINISHED."""
    workdir = tmp_path / "work"
    procs = [_launch(workdir, fake_runner | {"FAKE_BARRIER": "2"}) for _ in range(2)]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    assert not any("Traceback" in out for out in outs), outs
    storage, name = f"sqlite:///{workdir / 'optuna.db'}", "norm-smoke-synthetic"
    complete = [t for t in _trials(storage, name) if t.state == TrialState.COMPLETE]
    assert sorted(t.params["setting"] for t in complete) == ["Random init", "w/ patch norm", "w/o patch norm"]
    assert len({t.user_attrs["worker_pid"] for t in complete}) == 2  # each launcher ran at least one point
    assert any("other workers" in out for out in outs) or all("3/3 grid points done" in out for out in outs)
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.metric_names == ["ft_top1"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    parents = client.search_runs([client.get_experiment_by_name("mme-synthetic").experiment_id],
                                 "tags.stage = 'ablate'")
    assert [p.info.run_id for p in parents] == [study.user_attrs["mlflow_parent_run_id"]]  # one parent run
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_killed_worker_is_reported_and_its_point_reclaimed_at_once(tmp_path, fake_runner):
    """A worker SIGKILLed mid-trial: the launcher names it and the signal and exits 1, the killed trial's
    MLflow run ends KILLED (not RUNNING), and a re-run right away (well within the heartbeat grace period)
    finishes the grid."""
    workdir = tmp_path / "work"
    env = fake_runner | {"FAKE_BARRIER": "2", "FAKE_KILL_ONCE": "target.length=6,seed=1"}
    out = _ablate(workdir, env, "--n-jobs", "2")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "was killed by signal 9 (SIGKILL)" in out.stderr and "worker " in out.stderr
    storage, name = f"sqlite:///{workdir / 'optuna.db'}", "length-smoke-synthetic"
    killed = [t for t in _trials(storage, name) if t.params.get("setting") is not None and t.state == TrialState.FAIL]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert killed and all(client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED" for t in killed)
    assert not [t for t in _trials(storage, name) if t.state == TrialState.RUNNING]
    started = time.time()
    again = _ablate(workdir, fake_runner)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "8/8 grid points done" in again.stdout and time.time() - started < HEARTBEAT_GRACE_S


def test_a_run_that_would_train_in_emulated_bf16_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    """On a CPU without native bf16 a bf16 trial takes hours: the run stops at once, naming the point, the keys
    and the ways out; fp32 overrides, the explicit flag, or a --runner hook let it through."""
    from mme.engine import loops

    monkeypatch.setattr(loops, "native_bf16", lambda _device_type: False)
    monkeypatch.setattr(loops.torch.cuda, "is_available", lambda: False)
    ablate, workdir = _load_ablate(), tmp_path / "work"
    argv = ["--study", "norm", "--preset", "mini", "--workdir", str(workdir)]
    assert ablate.main(argv) == 2
    err = capsys.readouterr().err
    assert "norm: w/o patch norm seed 0 would train with pretrain.amp, finetune.amp = bf16" in err
    assert "--set pretrain.amp=off --set finetune.amp=off" in err and "--allow-emulated-bf16" in err
    assert not workdir.exists()  # no data, no storage, no MLflow run
    plans = [ablate.make_plan("norm", ablate.parse_args([*argv, "--set", "pretrain.amp=off"]))]
    assert "would train with finetune.amp = bf16" in ablate.emulated_bf16_refusal(plans)
    fp32 = ["--set", "pretrain.amp=off", "--set", "finetune.amp=off"]
    assert ablate.emulated_bf16_refusal([ablate.make_plan("norm", ablate.parse_args([*argv, *fp32]))]) is None
    hooked = ablate.parse_args([*argv, "--runner", "ablate_fake_runner:run"])
    assert ablate.emulated_bf16_refusal([ablate.make_plan("norm", hooked)]) is None
    smoke = ablate.parse_args(["--study", "norm", "--preset", "smoke", "--workdir", str(workdir)])
    assert ablate.emulated_bf16_refusal([ablate.make_plan("norm", smoke)]) is None  # seconds a trial, even emulated
    monkeypatch.setattr(loops, "native_bf16", lambda _device_type: True)
    assert ablate.emulated_bf16_refusal([ablate.make_plan("norm", ablate.parse_args(argv))]) is None
