"""Ablation studies: their definitions (`studies`), where trials are stored (`storage`), the grid
bookkeeping the workers share (`grid`), what one run works on (`plan`) and the Optuna runner (`runner`).
Nothing here imports a stage: the command line (experiments/ablate.py) hands the runner what a trial runs.
"""

from mme.ablation.grid import MAX_RETRY, GridState, Point, blocking_reason, point_of, points_text, requeue
from mme.ablation.plan import Plan, make_plan, stored_only
from mme.ablation.runner import Hooks, Runner, load_runner, run_study, run_worker
from mme.ablation.storage import open_storage, storage_exists
from mme.ablation.studies import (
    ALL,
    METRICS,
    STUDIES,
    TRIAL_BUDGET,
    Setting,
    Study,
    get_study,
    optuna_study_name,
    study_names,
    trial_budget,
)

__all__ = ["ALL", "MAX_RETRY", "METRICS", "STUDIES", "TRIAL_BUDGET", "GridState", "Hooks", "Plan", "Point",
           "Runner", "Setting", "Study", "blocking_reason", "get_study", "load_runner", "make_plan",
           "open_storage", "optuna_study_name", "point_of", "points_text", "requeue", "run_study", "run_worker",
           "storage_exists", "stored_only", "study_names", "trial_budget"]
