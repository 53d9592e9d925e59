"""What one run of a study works on: the study, its Optuna name, the storage, the workdir and the grid
points (settings x seeds, narrowed by `--settings` and by `--stored-only`), and the config of each point.
The runner (`mme.ablation.runner`) runs a `Plan`; the command line builds it with `make_plan`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mme.ablation.grid import Point
from mme.ablation.studies import Study, get_study, optuna_study_name, selected_labels, trial_budget
from mme.config import Config, load_config
from mme.paths import Paths


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
    only: tuple[str, ...] = ()  # --settings: the labels this run works on (empty: all); see selected_labels
    keep: frozenset[Point] | None = None  # --stored-only: the points whose results are stored (None: all)

    def search_space(self) -> dict[str, list[Any]]:
        return {"setting": list(self.study.labels), "seed": list(range(self.seeds))}

    def points(self) -> list[Point]:
        """The grid points this run works on: the selected settings x seeds 0..N-1."""
        points = [(label, seed) for label in selected_labels(self.study, self.only) for seed in range(self.seeds)]
        return points if self.keep is None else [point for point in points if point in self.keep]

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
    only = tuple(label.strip() for label in (getattr(args, "settings", None) or "").split(",") if label.strip())
    selected_labels(study, only)
    return Plan(study, optuna_study_name(name, args.preset, dataset, overrides, budget), args.preset, dataset,
                overrides, args.seeds, args.storage or Paths(workdir).optuna_uri, workdir, args.runner, only)


def stored_only(plan: Plan, is_stored: Callable[[Config, tuple[str, ...], Path], bool]) -> tuple[Plan, list[Point]]:
    """`plan` narrowed to the points whose results `is_stored` (cfg, stages, workdir) finds, so the run
    records them and trains nothing; and the points left out."""
    points = plan.points()
    kept = [point for point in points if is_stored(plan.trial_config(*point), plan.study.stages, plan.workdir)]
    return replace(plan, keep=frozenset(kept)), [point for point in points if point not in kept]
