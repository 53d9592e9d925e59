"""Ablation command line: one Optuna study per paper table, a grid over the study's settings x seeds.

    python experiments/ablate.py --study length [--preset mini] [--seeds 2] [--n-jobs 2]
        [--storage URL] [--workdir DIR] [--set key=value ...]

A trial pre-trains with its setting's overrides, then fine-tunes and linear-probes (the same stage
functions as `dvc repro`) in `<workdir>/trials/<study>/<setting>-seed<k>/`, whose `data` links to the
shared `<workdir>/data` (flow caches are computed once). Every metric becomes a trial attribute and an
MLflow metric; `mme report` builds the tables from them (this script calls it when a study ends).

The runner, its policy (resume, retries, duplicates) and the Optuna bookkeeping live in `mme.ablation`;
this script parses the command line and wires in the stage chain (`mme.stages.chain`) and `mme report`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mme.ablation import (
    STUDIES,
    Hooks,
    Plan,
    load_runner,
    make_plan,
    open_storage,
    points_text,
    run_study,
    run_worker,
    stored_only,
    study_names,
)
from mme.config import PRESETS, Config, ConfigError
from mme.engine.loops import compute_platform, emulated_bf16_keys, platform_name
from mme.stages.chain import is_stored, prepare_data, run_stage_chain, trial_identity

__all__ = ["main", "make_plan", "open_storage", "parse_args", "stored_only"]


def report(cfg: Config, workdir: Path, storage: str) -> None:
    from mme.stages import report as report_stage

    report_stage.run(cfg, workdir, storage=storage)


HOOKS = Hooks(Path(__file__).resolve(), run_stage_chain, prepare_data, report, trial_identity)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Optuna ablation studies for the paper's tables "
                                     "(see experiments/README.md)")
    parser.add_argument("--study", required=True, help=f"one of: {', '.join(STUDIES)}, or all")
    parser.add_argument("--preset", default="mini", choices=tuple(PRESETS))
    parser.add_argument("--settings", default=None, metavar="LABEL,LABEL",
                        help="run only these rows (comma-separated labels; the reference and 'Random init' rows "
                        "are always added); a later run without it does the rest")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per setting (default 1)")
    parser.add_argument("--storage", default=None, help="Optuna storage: sqlite:///…, postgresql://…, mysql://…, "
                        "journal:///path.log or a path ending .journal/.log (default sqlite:///<workdir>/optuna.db)")
    parser.add_argument("--n-jobs", type=int, default=1, help="worker processes sharing the grid (default 1)")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="root of data/, trials/, mlflow.db, optuna.db")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override shared by every trial (repeatable)")
    parser.add_argument("--runner", default=None, metavar="MODULE:FUNCTION",
                        help="testing/extension hook: call FUNCTION(cfg, trial_workdir, stages) -> metrics dict "
                        "instead of pretrain -> finetune -> probe (no data preparation then)")
    parser.add_argument("--stored-only", action="store_true",
                        help="train nothing: record only the grid points whose results are stored (reports/results/, "
                        "committed), then rebuild the tables; the points left out are named")
    parser.add_argument("--allow-emulated-bf16", action="store_true",
                        help="train bf16 trials even on a CPU that emulates bf16 (refused by default outside the "
                        "smoke preset: hours a trial)")
    parser.add_argument("--requeue-running", action="store_true",
                        help="mark RUNNING trials failed and retry them (after a killed worker; journal storage)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.n_jobs < 1:
        parser.error(f"--seeds ({args.seeds}) and --n-jobs ({args.n_jobs}) must be at least 1")
    return args


def narrowed(plans: list[Plan], quiet: bool) -> list[Plan]:
    """--stored-only: each study's plan limited to its stored points (a study with none is left out)."""
    kept = []
    for plan in plans:
        plan, missing = stored_only(plan, is_stored)
        if not quiet:
            left = points_text(missing) or "none"
            print(f"ablate: --stored-only: {plan.study.name}: {len(plan.points())} stored point(s) recorded; "
                  f"not stored, so left out: {left}", flush=True)
        kept += [plan] if plan.points() else []
    return kept


def emulated_bf16_refusal(plans: list[Plan]) -> str | None:
    """Why this run must not start, if one of its trials would train in bf16 on a device that emulates it
    (~20x slower than fp32, hours a trial): the first such point, the keys and the ways out. Points whose
    results are stored train nothing and never count; nor do `--runner` hooks, nor the smoke preset (seconds a
    trial even emulated)."""
    for plan in plans:
        for label, seed in plan.points() if plan.runner is None and plan.preset != "smoke" else ():
            cfg = plan.trial_config(label, seed)
            keys = emulated_bf16_keys(cfg)
            if keys and not is_stored(cfg, plan.study.stages, plan.workdir):
                return (f"{plan.study.name}: {label} seed {seed} would train with {', '.join(keys)} = bf16 on "
                        f"{platform_name(compute_platform())}, which emulates bf16: hours a trial. Run it on a CPU "
                        "with AMX or AVX-512-BF16 or on a GPU, or add --set pretrain.amp=off --set finetune.amp=off "
                        "(fp32: other float rounding, so another study with its own results), or pass "
                        "--allow-emulated-bf16")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plans = [make_plan(name, args) for name in study_names(args.study)]
        plans = narrowed(plans, quiet=args.worker) if args.stored_only else plans
        load_runner(args.runner, run_stage_chain)
        refusal = None if args.worker or args.allow_emulated_bf16 else emulated_bf16_refusal(plans)
        if refusal:
            raise ValueError(refusal)
    except KeyError as exc:
        print(f"ablate.py: {exc.args[0]}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError) as exc:
        print(f"ablate.py: {exc}", file=sys.stderr)
        return 2
    try:
        if args.worker:
            run_worker(plans[0], HOOKS)  # a worker has nothing to report: the launcher reads the grid
            return 0
        return max((run_study(plan, args, HOOKS) for plan in plans), default=0)
    except KeyboardInterrupt:
        print("ablate.py: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
