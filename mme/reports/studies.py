"""Ablation study definitions (paper Tables 4-7, Fig. 3) and where their Optuna trials are stored.

A study is one ablation axis: a list of settings, each a row label plus the config overrides that make
it (`key=value` strings, exactly as `--set` takes them). Every setting sets the swept keys explicitly, so
the preset's defaults never decide which row a run belongs to. `experiments/ablate.py` runs a study as an
Optuna grid over settings x seeds; `mme report` turns the stored trials into the paper's tables. This
module also opens the Optuna storages and holds the grid bookkeeping the ablation workers share (which
points are done, running, failed; whether a trial may run its point; re-queueing a point).

Choices made here (the paper leaves them implicit):
- Table 5's appearance and short-term motion baselines (HOG, HOG+Flow/HOF/MBH) are the paper's
  non-interpolated versions (MaskFeat: HOG of the tube's middle frame, `target.interpolate=false`);
  the trajectory rows keep interpolation on, the paper's default. Table 6 toggles it explicitly.
- Tables 7a-7f pin `target.kind=traj` (they ablate MME itself).
- The `probe` study (Table 4) pre-trains and linear-probes only (no fine-tuning); its objective is the
  probe top-1. Its labels name the method; `paper` points at the paper's SSv2 rows.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Optuna study user attributes written by experiments/ablate.py and read by the report.
ATTR_STUDY = "mme_study"
ATTR_PRESET = "preset"
ATTR_DATASET = "dataset"
ATTR_OVERRIDES = "overrides"
ATTR_BUDGET = "trial_budget"
ATTR_PARENT_RUN = "mlflow_parent_run_id"

# Trial user attributes holding the measured metrics (the runner's result keys).
METRICS = ("ft_top1", "ft_top5", "probe_top1", "pretrain_seconds", "pretrain_loss")
FULL_CHAIN = ("pretrain", "finetune", "probe")

# Per-preset trial budget, applied before a study's own overrides and the user's --set (which win).
# Like the paper's ablations ("a smaller pre-training dataset and reduce the input patches of fine-tuning
# to speed up the experiments", section 4), a trial is cheaper than the default pipeline. On `mini`:
# 2 pre-training epochs (the loss makes most of its drop in them), then 2 fine-tuning epochs on half the
# tube positions (finetune.token_drop; 60 s instead of 100 s measured) and the linear probe: about 4 min
# on 2 CPU cores. At this budget the fine-tune stays at chance (on this set it needs 2-3 epochs of a
# 10-epoch schedule to leave it; 3-epoch trials with warm-up 0-1 and peak lr up to 1e-3 were measured at
# chance too): the linear probe is the informative metric on `mini` (README). The budget is part of the
# Optuna study name, so changing it starts new studies instead of resuming old ones.
TRIAL_BUDGET: dict[str, tuple[str, ...]] = {
    "smoke": (),
    "mini": ("pretrain.epochs=2", "pretrain.warmup_epochs=1", "finetune.epochs=2", "finetune.warmup_epochs=1",
             "finetune.token_drop=0.5"),
    "paper": (),
}


def trial_budget(preset: str) -> tuple[str, ...]:
    """The overrides that size an ablation trial for `preset` (see TRIAL_BUDGET)."""
    return TRIAL_BUDGET.get(preset, ())


@dataclass(frozen=True)
class Setting:
    """One row of a table: `label` (the table's row name), the config `overrides` that make it, and
    `paper`, the matching row label of the reference csv (None: the paper has no such row)."""

    label: str
    overrides: tuple[str, ...]
    paper: str | None = None


@dataclass(frozen=True)
class Study:
    """One ablation axis. `table`: the paper's table id; `file`: the stem of reports/tables/<file>.csv;
    `paper_study`: the reference csv's study column; `base`: overrides shared by every setting;
    `objective`: the trial metric Optuna maximises; `stages`: what a trial runs after pre-training."""

    name: str
    table: str
    file: str
    title: str
    paper_study: str
    settings: tuple[Setting, ...]
    base: tuple[str, ...] = ()
    objective: str = "ft_top1"
    stages: tuple[str, ...] = FULL_CHAIN
    notes: str = ""
    labels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(s.label for s in self.settings))

    def setting(self, label: str) -> Setting:
        for item in self.settings:
            if item.label == label:
                return item
        raise KeyError(f"study {self.name!r} has no setting {label!r}; settings: {', '.join(self.labels)}")


def _same(label: str, *overrides: str) -> Setting:
    """A setting whose label is also the paper's row label."""
    return Setting(label, tuple(overrides), paper=label)


_TRAJ = ("target.kind=traj",)

STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("content", "5", "table5_content", "Reconstruction content", "content", (
        _same("Pixel", "target.kind=pixel"),
        _same("HOG", "target.kind=hog", "target.interpolate=false"),
        _same("HOG+Flow", "target.kind=hog+flow", "target.interpolate=false"),
        _same("HOG+HOF", "target.kind=hog+hof", "target.interpolate=false"),
        _same("HOG+MBH", "target.kind=hog+mbh", "target.interpolate=false"),
        _same("HOG+Traj w/o shape", "target.kind=hog+traj_pos", "target.interpolate=true"),
        _same("Traj", "target.kind=traj", "target.interpolate=true"),
        Setting("MotionMAE", ("target.kind=motionmae",), paper=None),
    ), notes="MotionMAE (arXiv 2210.04154) is an extra row; the paper does not compare with it."),
    Study("interpolation", "6", "table6_interpolation", "Trajectory interpolation", "interpolation", (
        _same("HOG no-interp", "target.kind=hog", "target.interpolate=false"),
        _same("HOG interp", "target.kind=hog", "target.interpolate=true"),
        _same("HOG+MBH no-interp", "target.kind=hog+mbh", "target.interpolate=false"),
        _same("HOG+MBH interp", "target.kind=hog+mbh", "target.interpolate=true"),
        _same("Traj no-interp", "target.kind=traj", "target.interpolate=false"),
        _same("Traj interp", "target.kind=traj", "target.interpolate=true"),
    )),
    Study("length", "7a", "table7a_length", "Trajectory length L", "length", tuple(
        _same(f"L={n}", f"target.length={n}") for n in (4, 6, 8)), base=_TRAJ),
    Study("norm", "7b", "table7b_norm", "Trajectory patch normalisation", "norm", (
        _same("w/o patch norm", "target.patch_norm=false"),
        _same("w/ patch norm", "target.patch_norm=true"),
    ), base=_TRAJ),
    Study("density", "7c", "table7c_density", "Trajectory density", "density", (
        _same("Dense", "target.density=dense"),
        _same("Sparse (Max)", "target.density=max"),
        _same("Sparse (Mean)", "target.density=mean"),
    ), base=_TRAJ),
    Study("stride", "7d", "table7d_stride", "Sampling stride s", "stride", tuple(
        _same(f"s={s}", f"data.stride={s}") for s in (4, 3, 2, 1)), base=_TRAJ),
    Study("masking", "7e", "table7e_masking", "Spatial masking", "masking", (
        _same("90% tube", "mask.kind=tube", "mask.ratio=0.9"),
        _same("70% tube", "mask.kind=tube", "mask.ratio=0.7"),
        _same("40% tube", "mask.kind=tube", "mask.ratio=0.4"),
        _same("40% cube", "mask.kind=cube", "mask.ratio=0.4"),
    ), base=_TRAJ),
    Study("decoder", "7f", "table7f_decoder", "Decoder", "decoder", tuple(
        _same(f"{mode.capitalize()} depth {depth}", f"model.decoder_mode={mode}", f"model.decoder_depth={depth}")
        for mode in ("joint", "separate") for depth in (1, 2)), base=_TRAJ),
    Study("shuffle", "fig3", "fig3_shuffle", "Pre-training on frame-shuffled video", "shuffle", tuple(
        _same(f"{method} {video} video", f"target.kind={kind}", f"data.shuffle_frames={shuffled}")
        for method, kind in (("VideoMAE", "pixel"), ("MME", "traj"))
        for video, shuffled in (("raw", "false"), ("shuffled", "true")))),
    Study("probe", "4", "table4_probe", "Linear probing", "linear_probe", (
        Setting("VideoMAE (pixel)", ("target.kind=pixel",), paper="VideoMAE SSv2"),
        Setting("MME (traj)", ("target.kind=traj",), paper="MME SSv2"),
    ), objective="probe_top1", stages=("pretrain", "probe"),
        notes="The paper's TimeSformer and SVT rows are other backbones; they are not re-run."),
)}

ALL = "all"


def get_study(name: str) -> Study:
    """The study called `name`; an unknown name raises a `KeyError` that lists the studies."""
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)} (or {ALL!r} for every one)")
    return STUDIES[name]


def study_names(name: str) -> list[str]:
    """`all` -> every study in table order; otherwise the one (checked) name."""
    return list(STUDIES) if name == ALL else [get_study(name).name]


def optuna_study_name(study: str, preset: str, dataset: str, overrides: tuple[str, ...] = (),
                      budget: tuple[str, ...] = ()) -> str:
    """`<study>-<preset>-<dataset>`, plus `-b<hash>` of the preset's trial budget and `-<hash>` of any
    extra `--set` overrides, so that runs with different budgets or base settings never share (and mix)
    one Optuna study, and a changed budget starts a new study rather than resuming the old one."""
    name = f"{study}-{preset}-{dataset}"
    if budget:
        name += f"-b{_digest(budget)}"
    if overrides:
        name += f"-{_digest(overrides)}"
    return name


def _digest(overrides: tuple[str, ...]) -> str:
    return hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------------
# Storage


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
        return RDBStorage(url, engine_kwargs=engine_kwargs)
    with warnings.catch_warnings():  # heartbeat_interval is flagged experimental; we rely on it knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                          grace_period=HEARTBEAT_GRACE_S,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry))


# ----------------------------------------------------------------------------------------------------
# Grid bookkeeping shared by the ablation workers (experiments/ablate.py): which (setting, seed) points
# are done, running, queued, failed; whether a trial may run its point; re-queueing a point.

MAX_RETRY = 1  # a point that fails (not merely interrupted) is run once more, then given up
Point = tuple[str, int]  # (setting label, seed)


def point_of(trial: Any) -> Point | None:
    """The (setting, seed) a trial runs: its params, else the params it was queued with."""
    params = trial.params if "setting" in trial.params else trial.system_attrs.get("fixed_params", {})
    return (params["setting"], int(params["seed"])) if "setting" in params and "seed" in params else None


def counts_as_failure(trial: Any) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted", False)


def blocking_reason(trials: list[Any], me: Any, point: Point) -> str | None:
    """Why trial `me` must not run `point` (None: it may): the point is COMPLETE, or RUNNING in a trial
    that started earlier (GridSampler can hand one point to two workers near the end of a grid), or it
    has failed more than MAX_RETRY times. `trials` are the study's FrozenTrials, `me` included."""
    from optuna.trial import TrialState

    failures = 0
    for other in trials:
        if other.number == me.number:
            continue
        theirs = point_of(other)
        if theirs != point and not (theirs is None and _same_grid_cell(other, me)):
            continue
        if other.state == TrialState.COMPLETE:
            return f"grid point {point} already finished in trial {other.number}"
        if other.state == TrialState.RUNNING and (other.datetime_start, other.number) < (me.datetime_start, me.number):
            return f"grid point {point} is already running in trial {other.number}"
        failures += counts_as_failure(other)
    if failures > MAX_RETRY:
        return f"grid point {point} failed {failures} times; given up"
    return None


def _same_grid_cell(a: Any, b: Any) -> bool:
    """Both trials were given the same GridSampler cell (known before their params are written)."""
    return ("grid_id" in a.system_attrs and a.system_attrs.get("grid_id") == b.system_attrs.get("grid_id")
            and a.system_attrs.get("search_space") == b.system_attrs.get("search_space"))


@dataclass
class GridState:
    """Where each (setting, seed) point of a study stands, read from its trials."""

    done: set[Point]
    active: set[Point]  # RUNNING or WAITING somewhere
    waiting: int
    failures: dict[Point, int]
    last_tried: dict[Point, Any]  # latest FAIL (else first PRUNED) trial with params, per point

    @classmethod
    def read(cls, study: Any) -> GridState:
        from optuna.trial import TrialState

        state = cls(set(), set(), 0, {}, {})
        for trial in study.get_trials(deepcopy=False):
            point = point_of(trial)
            state.waiting += trial.state == TrialState.WAITING
            if point is None:
                continue
            if trial.state == TrialState.COMPLETE:
                state.done.add(point)
            elif trial.state in (TrialState.RUNNING, TrialState.WAITING):
                state.active.add(point)
            elif trial.params:
                if trial.state == TrialState.FAIL or point not in state.last_tried:  # prefer a failed attempt
                    state.last_tried[point] = trial
                state.failures[point] = state.failures.get(point, 0) + counts_as_failure(trial)
        return state

    def todo(self, points: list[Point]) -> list[Point]:
        return [p for p in points if p not in self.done and p not in self.active
                and self.failures.get(p, 0) <= MAX_RETRY]

    def given_up(self, points: list[Point]) -> list[Point]:
        return [p for p in points if p not in self.done and self.failures.get(p, 0) > MAX_RETRY]


def requeue(study: Any, template: Any) -> None:
    """Queue `template`'s point again as a WAITING trial (same params and grid id; `retry_of` noted)."""
    import optuna

    system = {k: template.system_attrs[k] for k in ("grid_id", "search_space") if k in template.system_attrs}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=template.params, distributions=template.distributions,
        system_attrs=system, user_attrs={"retry_of": template.number}))
