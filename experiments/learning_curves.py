"""Learning curves: linear and attentive probe test top-1 vs pre-training epochs, beside the untrained encoder.

    python experiments/learning_curves.py --data . [--kinds traj pixel] [--epochs 24] [--snapshots 3 6 12]
        [--seeds 0] [--preset mini] [--root runs/curves] [--set key=value ...] [--finetune | --trial-finetune]
        [--out reports/curves/...csv]

`--data` is a workdir whose `data/` holds the prepared videos, lists and train flow caches (e.g. the repo
root after `dvc repro extract`). What a point means and how to read it: mme.stages.curves and
experiments/README.md. Interrupted runs resume where they stopped; the points' results are kept beside the CSV
(`<out stem>/<kind>-s<seed>.json`, committed), so re-running a finished curve trains nothing. The CSV holds
every curve kept there, not only those of this command, so running one kind never drops another's rows.
A store holds one config's curve: asking it for another (other `--set` keys) fails, naming the keys.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from mme.ablation.studies import TRIAL_BUDGET
from mme.config import PRESETS
from mme.stages.curves import RANDOM_EPOCH, curve, curve_rows
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
    parser.add_argument("--trial-finetune", action="store_true", help="--finetune with the ablation trial's "
                        "fine-tune recipe (the preset's finetune.* keys of mme.ablation.studies.TRIAL_BUDGET)")
    parser.add_argument("--out", type=Path, default=Path("reports/curves/learning_curves.csv"))
    args = parser.parse_args(argv)
    if args.trial_finetune:
        args.finetune = True
        args.overrides = [*(k for k in TRIAL_BUDGET[args.preset] if k.startswith("finetune.")), *args.overrides]
    if any(s < 1 or s > args.epochs for s in args.snapshots):
        parser.error(f"--snapshots must lie in 1..--epochs ({args.epochs}); got {args.snapshots}")
    return args


def points_file(out: Path, kind: str, seed: int) -> Path:
    """Where a curve's point results are kept: beside the CSV (`<out stem>/<kind>-s<seed>.json`), committed with
    it, so a fresh clone rebuilds the CSV without training anything."""
    return out.parent / out.stem / f"{kind}-s{seed}.json"


def kept_rows(out: Path) -> list[dict]:
    """The rows of every curve kept beside `out` (`<out stem>/<kind>-s<seed>.json`), by kind and seed, after
    the rows already in `out` of curves that have no kept file (measured before curves kept them)."""
    rows, kept = [], set()
    for path in sorted(out.parent.joinpath(out.stem).glob("*-s*.json")):
        kind, _, seed = path.stem.rpartition("-s")
        done = json.loads(path.read_text())
        if str(RANDOM_EPOCH) in done:  # an interrupted curve may not have probed its floor yet: no rows
            rows += curve_rows(kind, int(seed), done)
            kept.add((kind, seed))
    earlier = list(csv.DictReader(out.open())) if out.is_file() else []
    return [row for row in earlier if (row["kind"], row["seed"]) not in kept] + rows


def write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))  # probe-only
    # curves have no fine-tune columns: their cells stay empty
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for kind in args.kinds:
        for seed in args.seeds:
            done = curve(args.preset, args.overrides, kind, seed, args.epochs, args.snapshots, args.root, args.data,
                         args.finetune, store=points_file(args.out, kind, seed))
            write_rows(args.out, kept_rows(args.out))  # each finished curve is on disk at once
            for row in curve_rows(kind, seed, done):
                print(f"{kind} seed {seed} epoch {row['epoch']:>3}: probe {row['probe_top1']:.1f} "
                      f"[{row['probe_top1_low']:.1f}, {row['probe_top1_high']:.1f}], vs random "
                      f"{row['probe_top1_vs_random']:+.1f}; attentive {row['attentive_top1']:.1f}"
                      + (f"; fine-tune {row['ft_top1']:.1f} vs scratch {row['ft_top1_vs_random']:+.1f}"
                         if "ft_top1" in row else ""), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
