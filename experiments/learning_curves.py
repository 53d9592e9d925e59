"""Learning curves: linear and attentive probe test top-1 vs pre-training epochs, beside the untrained encoder.

    python experiments/learning_curves.py --data . [--kinds traj pixel] [--epochs 24] [--snapshots 3 6 12]
        [--seeds 0] [--preset mini] [--root runs/curves] [--set key=value ...] [--out reports/curves/...csv]

`--data` is a workdir whose `data/` holds the prepared videos, lists and train flow caches (e.g. the repo
root after `dvc repro extract`). What a point means and how to read it: mme.stages.curves and
experiments/README.md. Interrupted runs resume where they stopped; the points' results are kept beside the CSV
(`<out stem>/<kind>-s<seed>.json`, committed), so re-running a finished curve trains nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from mme.config import PRESETS
from mme.stages.curves import curve, curve_rows
from mme.utils import write_text_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="workdir with the prepared data/")
    parser.add_argument("--kinds", nargs="+", default=["traj", "pixel"])
    parser.add_argument("--epochs", type=int, default=24, help="length of the pre-training schedule")
    parser.add_argument("--snapshots", type=int, nargs="*", default=[3, 6, 12], help="epochs probed on the way")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    parser.add_argument("--root", type=Path, default=Path("runs/curves"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune every point (the cfg's finetune.* "
                        "schedule; the untrained point from scratch) and test it")
    parser.add_argument("--out", type=Path, default=Path("reports/curves/learning_curves.csv"))
    args = parser.parse_args(argv)
    if any(s < 1 or s > args.epochs for s in args.snapshots):
        parser.error(f"--snapshots must lie in 1..--epochs ({args.epochs}); got {args.snapshots}")
    return args


def points_file(out: Path, kind: str, seed: int) -> Path:
    """Where a curve's point results are kept: beside the CSV (`<out stem>/<kind>-s<seed>.json`), committed with
    it, so a fresh clone rebuilds the CSV without training anything."""
    return out.parent / out.stem / f"{kind}-s{seed}.json"


def write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows: list[dict] = []
    for kind in args.kinds:
        for seed in args.seeds:
            done = curve(args.preset, args.overrides, kind, seed, args.epochs, args.snapshots, args.root, args.data,
                         args.finetune, store=points_file(args.out, kind, seed))
            new = curve_rows(kind, seed, done)
            rows += new
            write_rows(args.out, rows)  # each finished curve is on disk at once
            for row in new:
                print(f"{kind} seed {seed} epoch {row['epoch']:>3}: probe {row['probe_top1']:.1f} "
                      f"[{row['probe_top1_low']:.1f}, {row['probe_top1_high']:.1f}], vs random "
                      f"{row['probe_top1_vs_random']:+.1f}; attentive {row['attentive_top1']:.1f}"
                      + (f"; fine-tune {row['ft_top1']:.1f} vs scratch {row['ft_top1_vs_random']:+.1f}"
                         if "ft_top1" in row else ""), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
