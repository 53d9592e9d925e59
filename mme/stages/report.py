"""Stage `report`: rebuild the paper tables, charts and reports/README.md from the stores, without training.

Reads every ablation study in the Optuna storage (`sqlite:///<workdir>/optuna.db`, or the URL in
`$MME_OPTUNA_STORAGE`, or the `storage` argument) and writes, per paper table:
`reports/tables/<file>.csv` and `.md`, `reports/figures/<file>.png`; then `reports/README.md` (does the
measured ordering agree with the paper's?) and `reports/metrics/report.json` (what was written, trials
counted, and the pipeline's own top-1 numbers when its stages have run). With no finished trial it writes
no table, only report.json saying so (the DVC stage declares that file), and still succeeds.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from mme.ablation import STUDIES, open_storage, storage_exists
from mme.ablation.studies import ATTR_STUDY, RECORDS
from mme.config import Config
from mme.data.lists import read_classes
from mme.paths import Paths
from mme.reports import claims, plots, stats, tables
from mme.utils import atomic_path, write_metrics, write_text_atomic

STORAGE_ENV = "MME_OPTUNA_STORAGE"
PIPELINE_STAGES = ("pretrain", "finetune", "probe", "evaluate", "finetune_scratch", "probe_random", "evaluate_scratch")
FROZEN_METRICS = ("probe_top1", "attentive_top1")  # charted beside a fine-tune objective when measured


def run(cfg: Config, workdir: str | Path, storage: str | None = None) -> dict[str, Any]:
    paths = Paths(workdir)
    url = storage or os.environ.get(STORAGE_ENV) or paths.optuna_uri
    found = tables.load_tables(open_storage(url)) if storage_exists(url) else []
    shown = shown_storage(url, paths.workdir)
    summary: dict[str, Any] = {
        "storage": shown, "preset": cfg.preset, "dataset": cfg.data.dataset,
        "tables": [], "trials": {}, "trials_total": 0, "pipeline": pipeline_metrics(paths),
    }
    if not found:
        summary["message"] = (
            f"no finished ablation trial in {shown}: no table written. Run e.g. "
            f"`python experiments/ablate.py --study length --workdir {paths.workdir}` first.")
        print(f"mme report: {summary['message']}", file=sys.stderr)
        # The README still tells the pipeline's floors, and says that no table stands behind it.
        note = f"## Ablation tables\n\nNone: {summary['message']}\n"
        write_text_atomic(paths.reports / "README.md", _readme(shown, [_baselines_section(paths), note]))
        write_metrics(paths.metrics_dir / "report.json", summary)
        return summary
    sections = []
    for study in STUDIES.values():  # paper order
        group = [t for t in found if t.study.name == study.name]
        if not group:
            continue
        rows = pd.concat([t.rows for t in group], ignore_index=True)
        chance = chance_top1(paths, group[0].dataset)
        _write_table(paths, study.file, rows, study.objective, f"{study.title} (Table {study.table})", chance,
                     group[0].reference)
        sections.append(_readme_section(study, group, paths))
        summary["tables"].append(f"tables/{study.file}.csv")
        summary["trials"][study.file] = sum(t.trials_counted for t in group)
    summary["trials_total"] = sum(summary["trials"].values())
    with atomic_path(paths.tables_dir / TRIALS_CSV) as tmp:
        trials_frame(open_storage(url)).to_csv(tmp, index=False, float_format="%.4f")
    summary["trials_csv"] = f"tables/{TRIALS_CSV}"
    write_text_atomic(paths.reports / "README.md", _readme(shown, [_baselines_section(paths), *sections]))
    write_metrics(paths.metrics_dir / "report.json", summary)
    return summary


TRIALS_CSV = "optuna_trials.csv"
TRIAL_COLUMNS = ("number", "state", "params", "user_attrs", "datetime_start", "duration")


def trials_frame(storage: Any) -> pd.DataFrame:
    """Every trial of every ablation study in `storage` (Optuna's `trials_dataframe`, one row per trial,
    its study in the first column), without the per-clip records: the storage's summary, for committing."""
    import optuna

    frames = []
    for name in sorted(optuna.get_all_study_names(storage)):
        study = optuna.load_study(study_name=name, storage=storage)
        if study.user_attrs.get(ATTR_STUDY) is None:
            continue
        frame = study.trials_dataframe(attrs=TRIAL_COLUMNS)
        frame = frame.drop(columns=[c for c in frame if c.startswith("user_attrs_") and c.removeprefix(
            "user_attrs_") in RECORDS])
        frame.insert(0, "optuna_study", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _write_table(paths: Paths, file: str, rows: pd.DataFrame, objective: str, title: str,
                 chance: float | None = None, reference: str | None = None) -> None:
    """csv, markdown and charts of one table; the charts draw chance, the floor row's line and the CIs."""
    with atomic_path(paths.tables_dir / f"{file}.csv") as tmp:
        rows.to_csv(tmp, index=False, float_format="%.4f")
    markdown = "\n".join(tables.to_markdown(part, objective) for _, part in rows.groupby("optuna_study", sort=False))
    write_text_atomic(paths.tables_dir / f"{file}.md", f"# {title}\n\n{markdown}")
    plots.bar_chart(rows, objective, title, paths.figures_dir / f"{file}.png", chance, reference)
    for metric in _frozen_charts(rows, objective):
        name = "linear probe" if metric == "probe_top1" else "attentive probe"
        suffix = "probe" if metric == "probe_top1" else "attentive"
        plots.bar_chart(rows, metric, f"{title} ({name})", paths.figures_dir / f"{file}_{suffix}.png", chance,
                        reference)


def _frozen_charts(rows: pd.DataFrame, objective: str) -> list[str]:
    """The frozen-probe metrics charted beside the objective: the linear probe always (short trials: it
    often separates settings the fine-tune cannot), the attentive probe where a trial measured it."""
    return [m for m in FROZEN_METRICS if m != objective and (m == "probe_top1" or _measured(rows, m))]


def _measured(rows: pd.DataFrame, metric: str) -> bool:
    """Some row has a mean of `metric` (trials stored it)."""
    column = f"{metric}_mean"
    return column in rows and bool(rows[column].notna().any())


def chance_top1(paths: Paths, dataset: str) -> float | None:
    """100 / number of classes of `dataset` in this workdir's lists, or None if it has no class file."""
    try:
        return 100.0 / len(read_classes(paths.lists_dir(dataset)))
    except (FileNotFoundError, ValueError, ZeroDivisionError):
        return None


def _readme_section(study: Any, group: list[tables.StudyTable], paths: Paths) -> str:
    lines = [f"## Table {study.table}: {study.title}", "",
             f"[csv](tables/{study.file}.csv) · [markdown](tables/{study.file}.md) · "
             f"[chart](figures/{study.file}.png)"
             + ("" if study.objective == "probe_top1" else f" · [probe chart](figures/{study.file}_probe.png)")
             + (f" · [attentive chart](figures/{study.file}_attentive.png)"
                if any(_measured(t.rows, "attentive_top1") for t in group) else ""), ""]
    for table in group:
        for metric in dict.fromkeys((study.objective, *FROZEN_METRICS)):  # the objective, then the probes
            if metric == "attentive_top1" and not _measured(table.rows, metric):
                continue
            chance = chance_top1(paths, table.dataset)
            lines.append(f"- {tables.agreement_text(table, tables.ordering(table, metric), chance)}")
            lines.append(f"- {tables.verdict_text(table, metric)}")
        measured = tuple(m for m in dict.fromkeys((study.objective, *FROZEN_METRICS)) if _measured(table.rows, m))
        beside_floor = claims.floor_lines(study, table.clip_results, measured)
        if beside_floor:
            lines.append(f"- Each row against the floor `{stats.FLOOR}` (paired Δ [95 % CI]; fine-tune: "
                         "from scratch, probes: the untrained encoder):")
            lines += [f"  - {line}" for line in beside_floor]
        if study.claims:
            lines.append("- The paper's claims about these rows, tested here (paired over seeds and test clips):")
            lines += [f"  - {line}" for line in claims.claim_lines(study, table.clip_results, measured)]
        budget = ", ".join(f"`{item}`" for item in table.budget) or f"the `{table.preset}` preset's own epochs"
        lines.append(f"- Trial budget of `{table.optuna_study}`: {budget}.")
    if study.notes:
        lines.append(f"- Note: {study.notes}")
    lines.append("")
    for table in group:
        lines.append(tables.to_markdown(table.rows, study.objective))
    return "\n".join(lines)


def _readme(url: str, sections: list[str]) -> str:
    head = (
        "# Regenerated ablation tables\n\n"
        "Generated by `mme report` (do not edit by hand) from the Optuna storage "
        f"`{url}`: every number below is the mean ± sample std of COMPLETE trials, one per (setting, seed), "
        "read from the trials' attributes. Measured numbers are never edited or filled in from the paper. "
        "The paper's numbers (Sun et al., CVPR 2023: SSv2, ViT-B, hundreds of epochs) sit beside them; our "
        "runs use a small preset on another dataset, so absolute values do not compare, only the orderings "
        "of settings do. For each table: is the best setting the same, and how do the two orderings "
        "rank-correlate (Spearman, over the settings that have both numbers)?\n")
    return head + "\n" + "\n".join(sections)


BASELINE_ROWS = (("linear probe", "probe_top1", "random_init_probe_top1", "probe"),
                 ("attentive probe", "attentive_probe_top1", "random_init_attentive_probe_top1", "attentive_probe"),
                 ("fine-tune (test views: evaluate.*)", "finetune_top1", "scratch_finetune_top1", "finetune"))


def _baselines_section(paths: Paths) -> str:
    """The pipeline's pre-trained numbers beside the floors (reports/metrics/baselines.json), if measured."""
    import json

    path = paths.metrics_dir / "baselines.json"
    if not path.is_file():
        return "## The pipeline beside its floors\n\nNot measured yet: run `dvc repro` (stage `baselines`).\n"
    data = json.loads(path.read_text())
    lines = ["## The pipeline beside its floors (test split, top-1 %)", "",
             "| evaluation | pre-trained | floor (random init / from scratch) | paired Δ [95 % CI] |",
             "|---|---|---|---|"]
    for name, mine, floor, delta in BASELINE_ROWS:
        low, high = data.get(f"{delta}_delta_low"), data.get(f"{delta}_delta_high")
        ci = "–" if data.get(f"{delta}_delta") is None else (f"{data[f'{delta}_delta']:+.1f} "
                                                              f"[{low:+.1f}, {high:+.1f}]")
        lines.append(f"| {name} | {_num(data.get(mine), 1)} | {_num(data.get(floor), 1)} | {ci} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def pipeline_metrics(paths: Paths) -> dict[str, Any]:
    """top-1/top-5 (and pretrain loss) from the pipeline's own metrics files, where they exist."""
    import json

    found: dict[str, Any] = {}
    for stage in PIPELINE_STAGES:
        path = paths.metrics_dir / f"{stage}.json"
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            found[stage] = {"error": f"{path} is not valid JSON; re-run `mme {stage}`"}
            continue
        found[stage] = {k: data[k] for k in ("top1", "top5", "val_top1", "val_top5", "loss") if k in data}
    return found


def redact(url: str) -> str:
    """The storage URL without its password (it goes into files that get committed)."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def shown_storage(url: str, workdir: str | Path) -> str:
    """The storage URL as committed files name it: without its password, and a file inside the workdir
    (the default SQLite store, a journal) as `<workdir>/…`, since an absolute path is one machine's."""
    root = f"{Path(workdir).resolve()}/"
    return redact(url).replace(root, "<workdir>/")
