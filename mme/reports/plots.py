"""Bar charts of the regenerated tables: measured mean ± std per setting, the paper's value as a marker.

The paper's numbers (SSv2, ViT-B) and ours (a small preset, another dataset) live on different scales,
so the paper's value is drawn on a secondary y-axis with its own label; only the orderings compare.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mme.utils import atomic_path

PAPER_MARKER = {"marker": "D", "color": "tab:red", "linestyle": "none", "markersize": 7}


def bar_chart(rows: pd.DataFrame, metric: str, title: str, path: str | Path) -> Path:
    """Write a PNG of `<metric>_mean` with `<metric>_std` error bars per setting and per study.

    `rows` may hold several Optuna studies (presets/datasets) of one table: they become grouped bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(rows["setting"]))
    groups = list(dict.fromkeys(rows["optuna_study"]))
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2))
    for g, group in enumerate(groups):
        part = rows[rows["optuna_study"] == group].set_index("setting").reindex(labels)
        means = part[f"{metric}_mean"].astype(float)
        stds = part[f"{metric}_std"].astype(float).fillna(0.0)
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(labels))]
        ax.bar(xs, means.fillna(0.0), width, yerr=stds, capsize=3, alpha=0.85, label=f"measured: {group}")
        for x, mean, std, n in zip(xs, means, stds, part["n_seeds"].fillna(0)):
            text, y = ("n/a", 0.0) if math.isnan(mean) else (f"n={int(n)}", mean + std)
            ax.text(x, y, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"measured {metric.replace('_', ' ')} (mean ± std)")
    ax.set_title(title)
    paper = rows.drop_duplicates("setting").set_index("setting").reindex(labels)["paper_top1"].astype(float)
    handles, names = ax.get_legend_handles_labels()
    if paper.notna().any():
        twin = ax.twinx()
        (line,) = twin.plot(range(len(labels)), paper.values, **PAPER_MARKER)
        twin.set_ylabel("paper top-1 (%, SSv2 ViT-B)", color=PAPER_MARKER["color"])
        low, high = paper.min(), paper.max()
        pad = max(1.0, 0.5 * (high - low))
        twin.set_ylim(low - pad, high + pad)
        handles.append(line)
        names.append("paper (right axis)")
    ax.legend(handles, names, fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
