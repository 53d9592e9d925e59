"""Do two machines agree? Compare the shared results of two workdirs, part by part.

    python experiments/compare_stores.py reports/results /other/workdir/reports/results [--csv out.csv]

Every trial part (`<part>-<digest>.json`, see experiments/README.md) present in both stores was computed from
the same resolved config, so the two differ only by the platform each names (bf16 kernels round differently
on AMX, AVX-512-BF16 and GPUs; the training then drifts apart). For each common part this prints both
platforms, the metrics side by side, and for each per-clip test metric the paired difference b - a in points
with its 95 % bootstrap CI over the test clips, and the share of clips on which both are right or both wrong.
A difference whose CI holds 0 is the size of the platform noise a table's rows carry when mixed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from mme.ablation.studies import NOT_RECORDED
from mme.engine import loops
from mme.reports import per_clip, stats


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    data["record"] = per_clip.decode(data["per_clip"]) if data.get("per_clip") else None
    return data


def platform_name(data: dict) -> str:
    return loops.platform_name(data.get("platform")) or NOT_RECORDED


def compare_records(a: per_clip.PerClip, b: per_clip.PerClip) -> list[dict]:
    """Per metric of both records: paired difference b - a over their common clips, and agreement."""
    common = [c for c in a.clip_ids if c in set(b.clip_ids)]
    index_a, index_b = ({c: i for i, c in enumerate(r.clip_ids)} for r in (a, b))
    rows = []
    for metric in sorted(set(a.correct) & set(b.correct)):
        first = np.array([a.correct[metric][index_a[c]] for c in common])[None]
        second = np.array([b.correct[metric][index_b[c]] for c in common])[None]
        delta = stats.paired_difference(second, first)
        rows.append({"metric": metric, "clips": len(common), "a": 100 * first.mean(), "b": 100 * second.mean(),
                     "delta": delta.estimate, "low": delta.low, "high": delta.high,
                     "agree": 100 * float((first == second).mean())})
    return rows


def compare(store_a: Path, store_b: Path) -> list[dict]:
    common = sorted({p.name for p in store_a.glob("*.json")} & {p.name for p in store_b.glob("*.json")})
    rows = []
    for name in common:
        a, b = load(store_a / name), load(store_b / name)
        print(f"{name}: a = {platform_name(a)}, b = {platform_name(b)}")
        for key in sorted(set(a["metrics"]) & set(b["metrics"])):
            print(f"  {key}: a {a['metrics'][key]:.4g}  b {b['metrics'][key]:.4g}")
        if a["record"] is not None and b["record"] is not None:
            for row in compare_records(a["record"], b["record"]):
                print(f"  per clip {row['metric']} ({row['clips']} clips): a {row['a']:.1f}  b {row['b']:.1f}  "
                      f"b - a {row['delta']:+.1f} [{row['low']:+.1f}, {row['high']:+.1f}]  same answer on "
                      f"{row['agree']:.1f} % of clips")
                rows.append({"part": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}})
    if not common:
        print("no part is in both stores")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store_a", type=Path)
    parser.add_argument("store_b", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="write the per-clip comparisons here")
    args = parser.parse_args(argv)
    for store in (args.store_a, args.store_b):
        if not store.is_dir():
            print(f"compare_stores.py: {store} is not a directory of stored results", file=sys.stderr)
            return 2
    rows = compare(args.store_a, args.store_b)
    if args.csv and rows:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
