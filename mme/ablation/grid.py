"""Grid bookkeeping shared by the ablation workers: which (setting, seed) points are done, running,
queued or failed; whether a trial may run its point; re-queueing a point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
