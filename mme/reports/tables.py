"""Paper tables from stored Optuna trials: one row per setting, measured mean ± std beside the paper,
and, where the trials stored per-clip results, bootstrap CIs, the paired difference to the table's
reference row and a verdict (`mme.reports.stats`).

Only COMPLETE trials count; a grid point (setting, seed) that ran twice counts once: by the first trial
under the identity of its latest one (a point runs again when its trial is stale, recorded under an older
definition of its setting, `mme.ablation.grid`; GridSampler can repeat a point when workers finish
together). Measured numbers come only from trial user attributes; the paper's columns come only from
`mme.reports.reference`. A setting without a finished trial keeps its row with `n_seeds = 0` and empty
measured cells.

Statistics columns (STAT_METRICS x STAT_SUFFIXES, plus `n_clips` and `reference`): for a metric `m`,
`m_ci_low` / `m_ci_high` (95 % CI of the mean over test clips and seeds), `m_delta` with
`m_delta_low` / `m_delta_high` (paired difference to the reference row, points) and `m_verdict`. A
trial's per-clip results are its `per_clip` user attribute (format: `mme.reports.per_clip`); where a
setting has them, `m_mean` / `m_std` are recomputed from them on the clips every trial shares, so the
CI belongs to the mean printed beside it. Trials stored without them (older storages) keep their
attribute means and get the verdict "no per-clip data". The row labelled `stats.FLOOR` ("Random init")
is the table's floor; a table without it gets no verdict ("no floor").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mme.ablation.studies import (
    ATTR_BUDGET,
    ATTR_DATASET,
    ATTR_IDENTITY,
    ATTR_PRESET,
    ATTR_STUDY,
    METRICS,
    NOT_RECORDED,
    PLATFORM_ATTR,
    Study,
    get_study,
)
from mme.reports import per_clip, stats
from mme.reports.reference import paper_value

COLUMNS = [
    "setting", "n_seeds", "ft_top1_mean", "ft_top1_std", "ft_top5_mean", "ft_top5_std",
    "probe_top1_mean", "probe_top1_std", "pretrain_seconds_mean", "paper_top1", "paper_top5",
    "preset", "dataset", "pretrain_loss_mean", "paper_setting", "optuna_study",
    "attentive_top1_mean", "attentive_top1_std", "platform",
]

# Metrics that get bootstrap statistics when the trials stored per-clip results for them.
STAT_METRICS = ("ft_top1", "probe_top1", "attentive_top1")
STAT_SUFFIXES = ("ci_low", "ci_high", "delta", "delta_low", "delta_high", "verdict")
STAT_COLUMNS = ["n_clips", "reference", "paper_delta_top1",
                *(f"{m}_{suffix}" for m in STAT_METRICS for suffix in STAT_SUFFIXES)]

# Each study's reference row: the paper's default configuration (the row every other one is compared with).


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
    reference: str | None = None  # the row statistics compare with (`Study.reference`)
    clip_results: Mapping[str, Mapping[int, per_clip.PerClip]] = field(default_factory=dict)  # setting -> seed


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


def _complete(trials: list[Any]) -> list[Any]:
    """COMPLETE trials that ran a setting, one per (setting, seed): the first trial recorded under the
    identity of the point's latest trial (an older identity is a stale definition), in trial order."""
    from optuna.trial import TrialState

    by_point: dict[tuple[str, int], list[Any]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and "setting" in trial.params:
            by_point.setdefault((trial.params["setting"], trial.params.get("seed", 0)), []).append(trial)
    kept = []
    for runs in by_point.values():
        latest = runs[-1].user_attrs.get(ATTR_IDENTITY)
        kept.append(next(t for t in runs if t.user_attrs.get(ATTR_IDENTITY) == latest))
    return sorted(kept, key=lambda t: t.number)


def trial_records(trials: list[Any]) -> pd.DataFrame:
    """COMPLETE trials -> one record per grid point: number, setting, seed and the METRICS attributes."""
    records = []
    for trial in _complete(trials):
        record = {"number": trial.number, "setting": trial.params["setting"], "seed": trial.params.get("seed", 0)}
        for key in METRICS:
            value = trial.user_attrs.get(key)
            record[key] = float(value) if isinstance(value, (int, float)) else math.nan
        record[PLATFORM_ATTR] = trial.user_attrs.get(PLATFORM_ATTR) or NOT_RECORDED
        records.append(record)
    return pd.DataFrame(records, columns=["number", "setting", "seed", *METRICS, PLATFORM_ATTR])


def trial_per_clip(trials: list[Any]) -> dict[str, dict[int, per_clip.PerClip]]:
    """setting -> seed -> per-clip record, for the counted trials that stored one."""
    found: dict[str, dict[int, per_clip.PerClip]] = {}
    for trial in _complete(trials):
        record = per_clip.from_trial(trial)
        if record is not None:
            found.setdefault(trial.params["setting"], {})[int(trial.params.get("seed", 0))] = record
    return found


def summarize(records: pd.DataFrame, study: Study, preset: str, dataset: str, optuna_study: str) -> pd.DataFrame:
    """Per-setting mean and sample std (ddof=1; empty for a single seed) beside the paper's values."""
    labels = list(study.labels) + sorted(set(records["setting"]) - set(study.labels))
    rows = []
    for label in labels:
        group = records[records["setting"] == label]
        paper_label = study.setting(label).paper if label in study.labels else None
        row: dict[str, Any] = {"setting": label, "n_seeds": len(group)}
        for metric in ("ft_top1", "ft_top5", "probe_top1", "attentive_top1"):
            values = group[metric] if metric in group else pd.Series(dtype=float)  # a metric older trials lack
            row[f"{metric}_mean"] = _mean(values)
            row[f"{metric}_std"] = _std(values)
        row["pretrain_seconds_mean"] = _mean(group["pretrain_seconds"])
        row["paper_top1"] = paper_value(study.paper_study, paper_label, "top1")
        row["paper_top5"] = paper_value(study.paper_study, paper_label, "top5")
        row.update(preset=preset, dataset=dataset, pretrain_loss_mean=_mean(group["pretrain_loss"]),
                   paper_setting=paper_label, optuna_study=optuna_study,
                   platform=" | ".join(sorted(set(group.get(PLATFORM_ATTR, ())))) or None)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def add_statistics(rows: pd.DataFrame, records: dict[str, dict[int, per_clip.PerClip]], reference: str | None,
                   metrics: tuple[str, ...] = STAT_METRICS, resamples: int = stats.RESAMPLES,
                   seed: int = 0) -> pd.DataFrame:
    """`rows` (COLUMNS) with STAT_COLUMNS filled in from per-clip `records` (setting -> seed -> record).

    `reference`: the row to compare with (None or a row without per-clip data: CIs only, verdict
    "no reference"). Settings without per-clip data for a metric get the verdict "no per-clip data".
    """
    rows = rows.copy()
    for column in STAT_COLUMNS:
        rows[column] = np.nan
    rows["reference"] = reference or ""
    rows = rows.astype({f"{m}_verdict": object for m in metrics} | {"reference": object})
    rows["paper_delta_top1"] = _paper_delta(rows, reference)
    index = {label: i for i, label in zip(rows.index, rows["setting"])}
    for metric in metrics:
        rows[f"{metric}_verdict"] = stats.NO_PER_CLIP
        results = {setting: {s: (r.clip_ids, r.correct[metric]) for s, r in seeds.items() if metric in r.correct}
                   for setting, seeds in records.items() if setting in index}
        results = {setting: seeds for setting, seeds in results.items() if seeds}
        if not results:
            continue
        clips = stats.common_clips(results)
        for setting, row in _metric_statistics(results, reference, resamples, seed).items():
            scores = stats.aligned(results[setting], clips, sorted(results[setting]))
            _fill(rows, index[setting], metric, row, scores)
    return rows


def _metric_statistics(results: dict[str, stats.SeedScores], reference: str | None, resamples: int,
                       seed: int) -> dict[str, stats.SettingStats]:
    if reference in results:
        return stats.table_statistics(results, reference, resamples=resamples, seed=seed)
    clips = stats.common_clips(results)  # nothing to compare with: each row's CI, no difference
    out = {}
    for setting, seeds in results.items():
        scores = stats.aligned(seeds, clips, sorted(seeds))
        out[setting] = stats.SettingStats(setting, len(seeds), len(clips), stats.interval(scores, resamples, seed),
                                          None, stats.NO_REFERENCE)
    return out


def _fill(rows: pd.DataFrame, i: Any, metric: str, row: stats.SettingStats, scores: np.ndarray) -> None:
    """Write one setting's statistics; `scores` (seeds, common clips) give the std over seeds."""
    rows.loc[i, "n_clips"] = row.n_clips
    rows.loc[i, f"{metric}_mean"] = row.mean.estimate
    rows.loc[i, f"{metric}_std"] = float(np.std(100.0 * scores.mean(axis=1), ddof=1)) if len(scores) > 1 else math.nan
    rows.loc[i, f"{metric}_ci_low"], rows.loc[i, f"{metric}_ci_high"] = row.mean.low, row.mean.high
    if row.delta is not None:
        rows.loc[i, f"{metric}_delta"] = row.delta.estimate
        rows.loc[i, f"{metric}_delta_low"], rows.loc[i, f"{metric}_delta_high"] = row.delta.low, row.delta.high
    rows.loc[i, f"{metric}_verdict"] = row.verdict


def _paper_delta(rows: pd.DataFrame, reference: str | None) -> pd.Series:
    """Each row's paper top-1 minus the paper top-1 of the reference row (NaN where either is missing)."""
    paper = rows.set_index("setting")["paper_top1"].astype(float)
    base = paper.get(reference, math.nan) if reference else math.nan
    return (rows["paper_top1"].astype(float) - base).values


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def load_tables(storage: Any, resamples: int = stats.RESAMPLES, seed: int = 0) -> list[StudyTable]:
    """Every Optuna study in `storage` that ablate.py made and that holds a COMPLETE trial, with the
    statistics columns (`add_statistics`; `resamples` bootstrap draws from generator `seed`)."""
    import optuna

    tables = []
    for name in sorted(optuna.get_all_study_names(storage)):
        study_obj = optuna.load_study(study_name=name, storage=storage)
        attrs = study_obj.user_attrs
        if attrs.get(ATTR_STUDY) is None:
            continue  # not one of ours
        trials = study_obj.get_trials(deepcopy=False)
        records = trial_records(trials)
        if records.empty:
            continue
        study = get_study(attrs[ATTR_STUDY])
        preset, dataset = attrs.get(ATTR_PRESET, "?"), attrs.get(ATTR_DATASET, "?")
        reference = study.reference or None
        found = trial_per_clip(trials)
        rows = add_statistics(summarize(records, study, preset, dataset, name), found, reference,
                              resamples=resamples, seed=seed)
        budget = tuple(attrs.get(ATTR_BUDGET, ()))
        tables.append(StudyTable(study, name, preset, dataset, rows, len(records), budget, reference, found))
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
    """A compact markdown table: measured mean ± std (n seeds) beside the paper's numbers; with statistics
    columns, also the objective's (and the probe's) 95 % CI, paired Δ to the reference and verdict."""
    header = ["setting", "n", "ft top-1", "ft top-5", "probe top-1", "pretrain s", "paper top-1", "paper top-5"]
    with_stats = [m for m in dict.fromkeys((objective, "probe_top1")) if f"{m}_verdict" in rows]
    for metric in with_stats:
        header += [f"{metric} 95% CI", f"{metric} Δ ref [95% CI]", f"{metric} verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in rows.iterrows():
        cells = [str(row["setting"]), str(row["n_seeds"]),
                 _pm(row["ft_top1_mean"], row["ft_top1_std"]), _pm(row["ft_top5_mean"], row["ft_top5_std"]),
                 _pm(row["probe_top1_mean"], row["probe_top1_std"]), _num(row["pretrain_seconds_mean"], 0),
                 _num(row["paper_top1"]), _num(row["paper_top5"])]
        for metric in with_stats:
            cells += [_range(row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]),
                      _delta(row[f"{metric}_delta"], row[f"{metric}_delta_low"], row[f"{metric}_delta_high"]),
                      str(row[f"{metric}_verdict"])]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows.iloc[0]
    lines.append("")
    lines.append(f"Measured on preset `{first['preset']}`, dataset `{first['dataset']}` (Optuna study "
                 f"`{first['optuna_study']}`); objective `{objective}`. Paper: SSv2, ViT-B. \"–\" = not measured "
                 "or not in the paper; ± is the sample std over seeds.")
    lines += [platform_text(rows)] if platform_text(rows) else []
    if with_stats:
        lines.append(f"CIs: bootstrap over test clips and seeds; Δ: paired difference to `{first['reference'] or '–'}` "
                     "(same clips, same seeds), in points; a verdict is ahead/behind only when its CI excludes 0.")
    return "\n".join(lines) + "\n"


def platform_text(rows: pd.DataFrame) -> str:
    """Which rows were computed on which hardware, when it is more than one kind: mixed rows agree in
    distribution, not bit for bit, and their `pretrain s` times do not compare."""
    measured = rows[rows["n_seeds"] > 0] if "platform" in rows else rows.iloc[0:0]
    by_kind: dict[str, list[str]] = {}
    for _, row in measured.iterrows():
        by_kind.setdefault(str(row["platform"]), []).append(str(row["setting"]))
    if len(by_kind) < 2:
        return ""
    kinds = "; ".join(f"{kind}: {', '.join(labels)}" for kind, labels in by_kind.items())
    return (f"Hardware of the rows: {kinds} (\"{NOT_RECORDED}\": before results named it, the 2-core Intel AMX "
            "machines of the earlier studies). "
            "bf16 rounds differently on each, so rows agree in distribution, not bit for bit, and `pretrain s` "
            "times do not compare across them.")


def _range(low: float, high: float) -> str:
    return "–" if math.isnan(low) else f"[{low:.1f}, {high:.1f}]"


def _delta(value: float, low: float, high: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"


def verdict_text(table: StudyTable, metric: str) -> str:
    """Plain words: which settings the paired CIs put ahead of / behind the reference by `metric`, or why
    there is no verdict (no per-clip data, no floor row, fewer than two seeds)."""
    column = f"{metric}_verdict"
    if column not in table.rows:
        return f"By `{metric}`: {stats.NO_PER_CLIP}, so no setting is separated from another."
    words = dict(zip(table.rows["setting"], table.rows[column]))
    reference = table.reference or "–"
    if set(words.values()) == {stats.NO_PER_CLIP}:
        return f"By `{metric}`: the trials stored {stats.NO_PER_CLIP}, so no verdict (only means ± std)."
    if stats.NO_FLOOR in words.values():
        return (f"By `{metric}`: the table has no `{stats.FLOOR}` row ({stats.NO_FLOOR}), so no setting gets a "
                "verdict: without the floor a difference between settings may measure nothing learnt.")
    groups = {word: [s for s, w in words.items() if w == word] for word in dict.fromkeys(words.values())}
    parts = [f"{word}: {', '.join(settings)}" for word, settings in groups.items() if word != stats.REFERENCE]
    return (f"By `{metric}`, paired to the reference **{reference}** (95 % CI of the difference over test "
            f"clips and seeds): " + "; ".join(parts) + ".")


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
    if len(result.settings) < 2:
        best = (f"Only **{result.settings[0]}** of the paper's settings is measured, so no best setting or "
                "ordering can be compared with the paper's.")
    elif result.same_best is None:
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
