"""Charts of the regenerated tables: per setting the measured mean with its 95 % CI, a chance line, the
random-init floor line, and the paper's values as differences on the same axis.

The paper's numbers (SSv2, ViT-B) and ours (a small preset, another dataset) have different absolute
levels, so the paper's value of a setting is drawn as its difference to the paper's reference row, added
to OUR reference row's mean: one y axis, on which a paper marker above our reference says "the paper
found this setting better by that many points". The y axis is fitted to the data, not forced to 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mme.reports.stats import FLOOR
from mme.utils import atomic_path

PAPER_MARKER = {"marker": "D", "color": "tab:red", "linestyle": "none", "markersize": 7}
CHANCE_LINE = {"color": "0.4", "linestyle": ":", "linewidth": 1.2}
FLOOR_LINE = {"linestyle": "--", "linewidth": 1.2}


def error_bars(part: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per row: (below, above) the mean — the 95 % CI where per-clip statistics exist, else ± std, else 0 —
    and which of "ci" / "std" / "" each row uses."""
    means = part[f"{metric}_mean"].astype(float).to_numpy()
    std = part[f"{metric}_std"].astype(float).to_numpy()
    low = part.get(f"{metric}_ci_low", pd.Series(np.nan, index=part.index)).astype(float).to_numpy()
    high = part.get(f"{metric}_ci_high", pd.Series(np.nan, index=part.index)).astype(float).to_numpy()
    has_ci, has_std = ~np.isnan(low), ~np.isnan(std)
    below = np.where(has_ci, means - low, np.where(has_std, std, 0.0))
    above = np.where(has_ci, high - means, np.where(has_std, std, 0.0))
    kinds = ["ci" if c else "std" if s else "" for c, s in zip(has_ci, has_std)]
    return np.nan_to_num(below), np.nan_to_num(above), kinds


def paper_on_our_axis(rows: pd.DataFrame, metric: str, reference: str | None) -> pd.Series:
    """Per setting: our reference's measured mean + (paper top-1 - the paper's top-1 of the reference row).

    NaN everywhere when there is no reference, or it lacks a measured mean or a paper value.
    """
    first = rows.drop_duplicates("setting").set_index("setting")
    paper = first["paper_top1"].astype(float)
    if not reference or reference not in first.index:
        return pd.Series(math.nan, index=first.index)
    ours = float(first.loc[reference, f"{metric}_mean"])
    return ours + paper - float(paper.loc[reference])


def bar_chart(rows: pd.DataFrame, metric: str, title: str, path: str | Path, chance: float | None = None,
              reference: str | None = None) -> Path:
    """Write `chart(...)` as a PNG to `path`."""
    import matplotlib.pyplot as plt

    fig = chart(rows, metric, title, chance, reference)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def chart(rows: pd.DataFrame, metric: str, title: str, chance: float | None = None,
          reference: str | None = None) -> Any:
    """A figure of `<metric>_mean` per setting and per study (grouped), with CI (else std) error bars.

    Args:
        rows: table rows (COLUMNS, optionally the statistics columns); several Optuna studies (presets,
            datasets) of one table become side-by-side points.
        chance: top-1 of guessing, drawn as a dotted line (None: unknown, not drawn).
        reference: the reference row for the paper's differences; default the rows' `reference` column.
    Returns:
        a matplotlib Figure with one Axes (the caller closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if reference is None and "reference" in rows and rows["reference"].astype(str).str.len().gt(0).any():
        reference = str(rows["reference"].iloc[0])
    labels = list(dict.fromkeys(rows["setting"]))
    groups = list(dict.fromkeys(rows["optuna_study"]))
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2))
    kinds: set[str] = set()
    for g, group in enumerate(groups):
        part = rows[rows["optuna_study"] == group].set_index("setting").reindex(labels)
        means = part[f"{metric}_mean"].astype(float)
        below, above, kind = error_bars(part, metric)
        kinds.update(k for k in kind if k)
        xs = np.arange(len(labels)) - 0.4 + width * (g + 0.5)
        (points, *_) = ax.errorbar(xs, means, yerr=[below, above], fmt="o", capsize=3, label=f"measured: {group}")
        for x, mean, top, n in zip(xs, means, above, part["n_seeds"].fillna(0)):
            if not math.isnan(mean):
                ax.text(x, mean + top, f"n={int(n)}", ha="center", va="bottom", fontsize=7)
        if FLOOR in labels and not math.isnan(means[FLOOR]):
            ax.axhline(means[FLOOR], color=points.get_color(), label=f"{FLOOR} ({group})", **FLOOR_LINE)
    if chance is not None:
        ax.axhline(chance, label=f"chance ({chance:.1f} %)", **CHANCE_LINE)
    paper = paper_on_our_axis(rows, metric, reference).reindex(labels)
    if paper.notna().any():
        ax.plot(np.arange(len(labels)), paper.values, label=f"paper: Δ to its {reference}, from ours",
                **PAPER_MARKER)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    spread = "95 % CI" if kinds == {"ci"} else "± std" if kinds == {"std"} else "95 % CI, else ± std"
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%; mean, {spread})")
    ax.set_title(title)
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
