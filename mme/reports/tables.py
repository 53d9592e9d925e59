"""Paper tables from stored Optuna trials: one row per setting, measured mean ± std beside the paper.

Only COMPLETE trials count; a grid point (setting, seed) that ran twice (GridSampler can repeat a point
when several workers finish together) counts once, its lowest-numbered trial. Measured numbers come only
from trial user attributes; the paper's columns come only from `mme.reports.reference`. A setting
without a finished trial keeps its row with `n_seeds = 0` and empty measured cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mme.ablation.studies import ATTR_BUDGET, ATTR_DATASET, ATTR_PRESET, ATTR_STUDY, METRICS, Study, get_study
from mme.reports.reference import paper_value

COLUMNS = [
    "setting", "n_seeds", "ft_top1_mean", "ft_top1_std", "ft_top5_mean", "ft_top5_std",
    "probe_top1_mean", "probe_top1_std", "pretrain_seconds_mean", "paper_top1", "paper_top5",
    "preset", "dataset", "pretrain_loss_mean", "paper_setting", "optuna_study",
]


@dataclass(frozen=True)
class StudyTable:
    """The rows of one stored Optuna study, and what they were measured on."""

    study: Study
    optuna_study: str
    preset: str
    dataset: str
    rows: pd.DataFrame  # COLUMNS, one row per setting
    trials_counted: int  # COMPLETE trials after de-duplication
    budget: tuple[str, ...] = ()  # the trial-budget overrides the study ran with (TRIAL_BUDGET)


@dataclass(frozen=True)
class Ordering:
    """How the measured ordering of settings compares with the paper's (settings with both numbers).

    `best_measured` / `best_paper` hold every setting tied for the top; `same_best` is None when the
    measured top is a tie (the best setting is then undecided)."""

    metric: str
    settings: tuple[str, ...]
    best_measured: tuple[str, ...]
    best_paper: tuple[str, ...]
    same_best: bool | None
    spearman: float | None
    best_overall: str | None  # unique measured best including rows the paper lacks (e.g. MotionMAE)
    runner_up_within_std: bool | None  # the best and second-best measured means differ by < their std


def trial_records(trials: list[Any]) -> pd.DataFrame:
    """COMPLETE trials -> one record per grid point: number, setting, seed and the METRICS attributes."""
    from optuna.trial import TrialState

    records = []
    for trial in trials:
        if trial.state != TrialState.COMPLETE or "setting" not in trial.params:
            continue
        record = {"number": trial.number, "setting": trial.params["setting"], "seed": trial.params.get("seed", 0)}
        for key in METRICS:
            value = trial.user_attrs.get(key)
            record[key] = float(value) if isinstance(value, (int, float)) else math.nan
        records.append(record)
    frame = pd.DataFrame(records, columns=["number", "setting", "seed", *METRICS])
    return frame.sort_values("number").drop_duplicates(["setting", "seed"], keep="first").reset_index(drop=True)


def summarize(records: pd.DataFrame, study: Study, preset: str, dataset: str, optuna_study: str) -> pd.DataFrame:
    """Per-setting mean and sample std (ddof=1; empty for a single seed) beside the paper's values."""
    labels = list(study.labels) + sorted(set(records["setting"]) - set(study.labels))
    rows = []
    for label in labels:
        group = records[records["setting"] == label]
        paper_label = study.setting(label).paper if label in study.labels else None
        row: dict[str, Any] = {"setting": label, "n_seeds": len(group)}
        for metric in ("ft_top1", "ft_top5", "probe_top1"):
            row[f"{metric}_mean"] = _mean(group[metric])
            row[f"{metric}_std"] = _std(group[metric])
        row["pretrain_seconds_mean"] = _mean(group["pretrain_seconds"])
        row["paper_top1"] = paper_value(study.paper_study, paper_label, "top1")
        row["paper_top5"] = paper_value(study.paper_study, paper_label, "top5")
        row.update(preset=preset, dataset=dataset, pretrain_loss_mean=_mean(group["pretrain_loss"]),
                   paper_setting=paper_label, optuna_study=optuna_study)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def load_tables(storage: Any) -> list[StudyTable]:
    """Every Optuna study in `storage` that ablate.py made and that holds a COMPLETE trial."""
    import optuna

    tables = []
    for name in sorted(optuna.get_all_study_names(storage)):
        study_obj = optuna.load_study(study_name=name, storage=storage)
        attrs = study_obj.user_attrs
        if attrs.get(ATTR_STUDY) is None:
            continue  # not one of ours
        records = trial_records(study_obj.get_trials(deepcopy=False))
        if records.empty:
            continue
        study = get_study(attrs[ATTR_STUDY])
        preset, dataset = attrs.get(ATTR_PRESET, "?"), attrs.get(ATTR_DATASET, "?")
        rows = summarize(records, study, preset, dataset, name)
        budget = tuple(attrs.get(ATTR_BUDGET, ()))
        tables.append(StudyTable(study, name, preset, dataset, rows, len(records), budget))
    return tables


def ordering(table: StudyTable, metric: str | None = None) -> Ordering:
    """Best setting and Spearman rank correlation of measured means vs the paper's top-1.

    `metric`: a METRICS name (`probe_top1`, ...); default the study's objective.
    """
    metric = f"{metric or table.study.objective}_mean"
    measured = table.rows.dropna(subset=[metric])
    both = measured.dropna(subset=["paper_top1"])
    overall = _top(measured, metric)
    best_overall = overall[0] if len(overall) == 1 else None
    if both.empty:
        return Ordering(metric, (), (), (), None, None, best_overall, None)
    best_measured, best_paper = _top(both, metric), _top(both, "paper_top1")
    same_best = best_measured[0] in best_paper if len(best_measured) == 1 else None
    spearman = None
    if len(both) >= 2 and both[metric].nunique() > 1 and both["paper_top1"].nunique() > 1:
        spearman = float(both[metric].rank().corr(both["paper_top1"].rank()))
    return Ordering(metric, tuple(both["setting"]), best_measured, best_paper, same_best, spearman, best_overall,
                    _runner_up_within_std(measured, metric))


def _top(rows: pd.DataFrame, column: str) -> tuple[str, ...]:
    """Every setting tied for the largest value of `column`."""
    if rows.empty:
        return ()
    return tuple(rows.loc[rows[column] == rows[column].max(), "setting"])


def _runner_up_within_std(measured: pd.DataFrame, metric: str) -> bool | None:
    if len(measured) < 2:
        return None
    ranked = measured.sort_values(metric, ascending=False).head(2)
    stds = ranked[metric.replace("_mean", "_std")].dropna()
    if len(stds) < 2:
        return None
    gap = ranked[metric].iloc[0] - ranked[metric].iloc[1]
    return bool(gap < stds.max())


def to_markdown(rows: pd.DataFrame, objective: str) -> str:
    """A compact markdown table: measured mean ± std (n seeds) beside the paper's numbers."""
    header = ["setting", "n", "ft top-1", "ft top-5", "probe top-1", "pretrain s", "paper top-1", "paper top-5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in rows.iterrows():
        cells = [str(row["setting"]), str(row["n_seeds"]),
                 _pm(row["ft_top1_mean"], row["ft_top1_std"]), _pm(row["ft_top5_mean"], row["ft_top5_std"]),
                 _pm(row["probe_top1_mean"], row["probe_top1_std"]), _num(row["pretrain_seconds_mean"], 0),
                 _num(row["paper_top1"]), _num(row["paper_top5"])]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows.iloc[0]
    lines.append("")
    lines.append(f"Measured on preset `{first['preset']}`, dataset `{first['dataset']}` (Optuna study "
                 f"`{first['optuna_study']}`); objective `{objective}`. Paper: SSv2, ViT-B. \"–\" = not measured "
                 "or not in the paper; ± is the sample std over seeds.")
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


# A top-1 mean this close to chance (percentage points) says nothing about the ordering of settings.
CHANCE_MARGIN = 2.0


def agreement_text(table: StudyTable, result: Ordering, chance: float | None = None) -> str:
    """Plain-words statement of whether the measured ordering agrees with the paper's.

    `chance`: top-1 of guessing (100 / number of classes), if known; a top-1 metric whose every setting
    is within CHANCE_MARGIN points of it is called out as not ranking anything.
    """
    seeds = sorted(set(table.rows["n_seeds"]) - {0})
    where = (f"Study `{table.optuna_study}` (preset `{table.preset}`, dataset `{table.dataset}`, "
             f"{'/'.join(map(str, seeds)) or '0'} seed(s) per setting, {table.trials_counted} trials), by "
             f"`{result.metric.removesuffix('_mean')}`.")
    if not result.best_measured:
        return f"{where} No measured setting has a paper value, so the ordering cannot be compared."
    paper_best = " / ".join(result.best_paper)
    if result.same_best is None:
        best = (f"Several measured settings tie for best ({' / '.join(result.best_measured)}), so whether the best "
                f"setting matches the paper's ({paper_best}) is undecided.")
    elif result.same_best:
        best = (f"The best measured setting is **{result.best_measured[0]}**, the same as the paper's best "
                f"({paper_best}).")
    else:
        best = (f"The best measured setting is **{result.best_measured[0]}**, while the paper's best is "
                f"**{paper_best}**: the best setting differs.")
    if result.spearman is None:
        rank = (f"No rank correlation over {len(result.settings)} setting(s): it needs two or more settings "
                "and distinct values on both sides.")
    else:
        rank = (f"Spearman rank correlation with the paper over {len(result.settings)} settings: "
                f"{result.spearman:+.2f} ({_words(result.spearman)}).")
    extra = []
    if result.runner_up_within_std:
        extra.append("The two best measured settings differ by less than one standard deviation, so the "
                     "measured winner is not clearly separated.")
    if result.best_overall and result.best_overall not in result.settings:
        extra.append(f"Including rows the paper lacks, the measured best is {result.best_overall}.")
    values = table.rows[result.metric].dropna()
    if chance is not None and result.metric.endswith("top1_mean") and len(values) and \
            (values - chance).abs().max() <= CHANCE_MARGIN:
        extra.append(f"**Every setting is within {CHANCE_MARGIN:g} points of chance ({chance:.1f} %)**: at this "
                     "budget this metric does not rank the settings, so the statements above carry no evidence "
                     "for or against the paper.")
    return " ".join([where, best, rank, *extra])


def _words(rho: float) -> str:
    if rho >= 0.8:
        return "the orderings agree"
    if rho >= 0.3:
        return "the orderings partly agree"
    if rho > -0.3:
        return "no consistent relation between the orderings"
    return "the orderings disagree"
