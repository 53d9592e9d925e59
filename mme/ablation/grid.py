"""Grid bookkeeping shared by the ablation workers: the study's grid as queued trials, which (setting,
seed) points are done, running, queued or failed; whether a trial may run its point; re-queueing a point;
reclaiming the points of workers that died.

Only Optuna's public API is used: the grid is enumerated here and queued with `Study.enqueue_trial`,
each queued trial carrying its point as user attributes (`setting`, `seed`), so a point is known from
the moment its trial exists, before any parameter is suggested.

A trial also records its point's *identity* (what its results are keyed by, from the layer above): a
COMPLETE trial counts only while that identity is still the point's. When a study's setting is redefined,
or the code changes what a setting computes, its old trials are stale and the point runs again (a trial
recorded before identities existed is stale too; re-running a point whose results are stored trains
nothing).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from mme.ablation.studies import ATTR_IDENTITY

MAX_RETRY = 1  # a point that fails (not merely interrupted) is run once more, then given up
Point = tuple[str, int]  # (setting label, seed)


def point_params(point: Point) -> dict[str, Any]:
    return {"setting": point[0], "seed": int(point[1])}


def points_text(points: list[Point]) -> str:
    """Points for a message, one entry per setting in first-seen order: "Traj seeds 0, 1; HOG seed 2"."""
    seeds: dict[str, list[int]] = {}
    for label, seed in points:
        seeds.setdefault(label, []).append(seed)
    return "; ".join(f"{label} seed{'s' * (len(got) > 1)} {', '.join(map(str, got))}" for label, got in seeds.items())


def point_of(trial: Any) -> Point | None:
    """The (setting, seed) a trial runs: its params, else the point it was queued with."""
    for source in (trial.params, trial.user_attrs):
        if "setting" in source and "seed" in source:
            return source["setting"], int(source["seed"])
    return None


def is_current(trial: Any, identity: str | None) -> bool:
    """The trial ran its point as the point is now (`identity` None: not checked)."""
    return identity is None or trial.user_attrs.get(ATTR_IDENTITY) == identity


def counts_as_failure(trial: Any) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted", False)


def blocking_reason(trials: list[Any], me: Any, point: Point, identity: str | None = None) -> str | None:
    """Why trial `me` must not run `point` (None: it may): the point is COMPLETE under `identity`, or
    RUNNING in a trial that started earlier (two workers may each have queued it), or it has failed more
    than MAX_RETRY times. `trials` are the study's FrozenTrials, `me` included."""
    from optuna.trial import TrialState

    failures = 0
    for other in trials:
        if other.number == me.number or point_of(other) != point:
            continue
        if other.state == TrialState.COMPLETE and is_current(other, identity):
            return f"grid point {point} already finished in trial {other.number}"
        if other.state == TrialState.RUNNING and (other.datetime_start, other.number) < (me.datetime_start, me.number):
            return f"grid point {point} is already running in trial {other.number}"
        failures += counts_as_failure(other)
    if failures > MAX_RETRY:
        return f"grid point {point} failed {failures} times; given up"
    return None


@dataclass
class GridState:
    """Where each (setting, seed) point of a study stands, read from its trials."""

    done: set[Point]
    stale: set[Point]  # COMPLETE only under another identity: to run again
    active: set[Point]  # RUNNING or WAITING somewhere
    waiting: int
    failures: dict[Point, int]
    last_tried: dict[Point, Any]  # latest FAIL (else first PRUNED) trial, per point
    running: dict[Point, Any]  # a RUNNING trial per point (who holds it)

    @classmethod
    def read(cls, study: Any, identities: dict[Point, str] | None = None) -> GridState:
        """`identities`: each point's identity now (None: every COMPLETE trial counts)."""
        from optuna.trial import TrialState

        state = cls(set(), set(), set(), 0, {}, {}, {})
        for trial in study.get_trials(deepcopy=False):
            point = point_of(trial)
            state.waiting += trial.state == TrialState.WAITING
            if point is None:
                continue
            if trial.state == TrialState.COMPLETE:
                current = is_current(trial, None if identities is None else identities.get(point))
                (state.done if current else state.stale).add(point)
            elif trial.state in (TrialState.RUNNING, TrialState.WAITING):
                state.active.add(point)
                if trial.state == TrialState.RUNNING:
                    state.running.setdefault(point, trial)
            else:
                if trial.state == TrialState.FAIL or point not in state.last_tried:  # prefer a failed attempt
                    state.last_tried[point] = trial
                state.failures[point] = state.failures.get(point, 0) + counts_as_failure(trial)
        return state

    def todo(self, points: list[Point]) -> list[Point]:
        return [p for p in points if p not in self.done and p not in self.active
                and self.failures.get(p, 0) <= MAX_RETRY]

    def given_up(self, points: list[Point]) -> list[Point]:
        return [p for p in points if p not in self.done and self.failures.get(p, 0) > MAX_RETRY]

    def elsewhere(self, points: list[Point]) -> list[Point]:
        """Points not done whose trial is RUNNING (in another worker, as seen by one that has finished)."""
        return [p for p in points if p not in self.done and p in self.running]


def enqueue_grid(study: Any, points: list[Point]) -> None:
    """Queue every point of the grid once (a point that already has a trial is skipped)."""
    for point in points:
        study.enqueue_trial(point_params(point), user_attrs=point_params(point), skip_if_exists=True)


def requeue(study: Any, point: Point, retry_of: int | None = None) -> None:
    """Queue `point` again as a WAITING trial (`retry_of`: the trial it retries)."""
    attrs = point_params(point) | ({"retry_of": retry_of} if retry_of is not None else {})
    study.enqueue_trial(point_params(point), user_attrs=attrs)


def owner(trial: Any) -> str:
    """`pid P on HOST` of the worker that runs `trial` (as it recorded itself), for messages."""
    return f"pid {trial.user_attrs.get('worker_pid', '?')} on {trial.user_attrs.get('worker_host', '?')}"


def owner_is_dead(trial: Any) -> bool:
    """The trial's worker ran on this host and its process is gone (a worker elsewhere: unknown, False)."""
    pid, host = trial.user_attrs.get("worker_pid"), trial.user_attrs.get("worker_host")
    if pid is None or host != socket.gethostname() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def reclaim_dead(study: Any) -> list[Any]:
    """Fail the RUNNING trials whose worker process died on this host (killed outright), so their points
    are re-queued at once instead of after the heartbeat grace period; returns those trials."""
    from optuna.trial import TrialState

    reclaimed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_is_dead(trial):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            reclaimed.append(trial)
    return reclaimed
