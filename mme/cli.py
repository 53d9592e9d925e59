"""Command line: argument parsing and wiring only (one sub-command per stage).

Every stage command takes `--preset`, `--set key=value` (repeatable), `--workdir` and `--params`,
builds the resolved config, checks that the folders it writes are writable, and calls
`mme.stages.<stage>.run(cfg, workdir, **options)`. `main` is the one place that turns the project's
errors into one line on stderr and an exit code: 2 for a bad config, 1 for other bad input (a file,
a video, a checkpoint, a permission), 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

from mme import __version__
from mme.config import PRESETS, SPEED_ONLY, ConfigError, load_config

# command -> (stage module, help)
STAGES = {
    "download": ("download", "get or generate a dataset and write its lists"),
    "extract": ("extract", "cache dense optical flow for every listed video"),
    "pretrain": ("pretrain", "masked motion pre-training"),
    "finetune": ("finetune", "supervised fine-tuning of a pre-trained encoder"),
    "probe": ("probe", "linear probe on the frozen encoder"),
    "evaluate": ("evaluate", "multi-view testing of the fine-tuned model"),
    "baselines": ("baselines", "pre-trained vs random-init / from-scratch floors on test (baselines.json)"),
    "report": ("report", "build reports/tables and figures from what has been measured"),
    "inspect-targets": ("inspect", "one clip through the whole target path, saved as .npz"),
}

# command -> the config keys its result depends on (dvc.yaml `params:`, checked by tests/test_dvc_yaml.py);
# `mme STAGE --help` lists them with their values.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "download": ("data.dataset", "data.folder", "data.split", "data.synthetic.appearance",
        "data.synthetic.camera_pan", "data.synthetic.distractors", "data.synthetic.fps",
        "data.synthetic.num_frames", "data.synthetic.num_videos", "data.synthetic.size",
        "data.synthetic.test_videos", "data.synthetic.val_videos", "data.synthetic.zoom",
        "data.test_fraction", "data.val_fraction", "seed"),
    "extract": ("data.dataset", "data.decoded_cache", "data.short_side", "flow.backend", "flow.compensate_camera",
        "target.fb_check"),
    "pretrain": ("data.avoid_cuts", "data.crop_scale_min", "data.dataset", "data.decoded_cache", "data.flip",
        "data.input_size", "data.num_frames", "data.short_side", "data.shuffle_frames", "data.stride", "flow.backend",
        "flow.compensate_camera", "mask.kind", "mask.ratio", "model.decoder_depth", "model.decoder_dim",
        "model.decoder_mode", "model.decoder_num_heads", "model.depth", "model.drop_path", "model.embed_dim",
        "model.mlp_ratio", "model.name", "model.num_heads", "model.patch_size", "model.tubelet_size",
        "pretrain.accum_steps", "pretrain.amp", "pretrain.base_lr", "pretrain.batch_size", "pretrain.betas",
        "pretrain.clip_grad", "pretrain.epochs", "pretrain.min_lr", "pretrain.stride", "pretrain.warmup_epochs",
        "pretrain.weight_decay", "seed", "target.density", "target.fb_check", "target.interpolate",
        "target.kind", "target.length", "target.median_filter", "target.patch_norm",
        "target.points_per_patch", "target.prune"),
    "finetune": ("data.crop_scale_min", "data.dataset", "data.decoded_cache", "data.flip", "data.input_size",
        "data.num_frames", "data.sampling", "data.short_side", "data.stride", "evaluate.batch_size",
        "finetune.accum_steps", "finetune.amp", "finetune.base_lr", "finetune.batch_size", "finetune.clip_grad",
        "finetune.cutmix", "finetune.epochs", "finetune.init", "finetune.label_smoothing", "finetune.layer_decay",
        "finetune.min_lr", "finetune.mixup", "finetune.token_drop", "finetune.val_every", "finetune.warmup_epochs",
        "finetune.weight_decay", "model.decoder_depth", "model.decoder_dim", "model.decoder_mode",
        "model.decoder_num_heads", "model.depth", "model.drop_path", "model.embed_dim", "model.mlp_ratio",
        "model.name", "model.num_heads", "model.patch_size", "model.tubelet_size", "seed"),
    "probe": ("data.dataset", "data.input_size", "data.num_frames", "data.sampling", "data.short_side",
        "data.stride", "evaluate.batch_size", "pretrain.amp", "probe.attentive_epochs", "probe.attentive_lr",
        "probe.batch_size", "probe.epochs", "probe.init", "probe.lr", "probe.weight_decay", "seed"),
    "evaluate": ("data.dataset", "data.input_size", "data.num_frames", "data.sampling", "data.short_side",
        "data.stride", "evaluate.batch_size", "evaluate.num_clips", "evaluate.num_crops", "finetune.amp",
        "seed"),
    "report": ("data.dataset", "preset"),
}


def stage_keys(command: str) -> tuple[str, ...]:
    """The config keys a stage command's result depends on (empty for commands that are not DVC stages)."""
    return STAGE_KEYS.get(command, ())


class StageParser(argparse.ArgumentParser):
    """A sub-command parser whose help ends with the config keys its stage reads and their values."""

    mme_command = ""

    def format_help(self) -> str:
        keys = stage_keys(self.mme_command)
        if not keys:
            return super().format_help()
        flat = load_config("mini").flat()
        rows = [f"  {key} = {flat[key]!r}" for key in keys]
        return (super().format_help() + "\nconfig keys this stage reads (values of the mini preset; change them in "
                "params.yaml or with --set KEY=VALUE):\n" + "\n".join(rows)
                + f"\nspeed only, never part of a result: {', '.join(sorted(SPEED_ONLY))}\n")


def _shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="named overlay (default: params.yaml `preset`, else mini)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set target.kind=pixel")
    parser.add_argument("--workdir", type=Path, default=Path("."),
                        help="root of data/, models/, reports/, mlflow.db (default: current directory)")
    parser.add_argument("--params", type=Path, default=None,
                        help="params file (default: params.yaml in the current directory, if any)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mme", description="Masked Motion Encoding reproducibility suite")
    parser.add_argument("--version", action="version", version=f"mme {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=StageParser)
    for command, (_, help_text) in STAGES.items():
        p = sub.add_parser(command, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.mme_command = command
        _shared(p)
        if command in ("download", "extract"):
            p.add_argument("--dataset", default=None, help="synthetic, ucf101, hmdb51, k400, ssv2 or folder")
        if command == "extract":
            p.add_argument("--workers", type=int, default=None, help="parallel extraction processes")
            p.add_argument("--shard", default=None, metavar="i/N", help="process only shard i of N (0-based)")
            p.add_argument("--splits", default=None, metavar="train,val,test",
                           help="lists to make flow for (default: train, the only one a stage reads flow from)")
        if command in ("pretrain", "finetune", "probe"):
            p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                           help="--resume: continue from models/<stage>/last.pt (fail if it cannot); --no-resume: "
                                "start over; default: continue when last.pt is an unfinished run of the same "
                                "parameters, else start over and say why")
        if command in ("finetune", "probe", "evaluate"):
            p.add_argument("--init", type=Path, default=None,
                           help="checkpoint to start from (this project's or an official VideoMAE/MME one); "
                                "probe: `random` (untrained encoder), finetune: `none` (from scratch), "
                                "evaluate: `scratch` (models/finetune_scratch)")
        if command == "finetune":
            p.add_argument("--allow-partial", action="store_true", default=None,
                           help="accept an --init whose encoder covers the model only in part (other depth)")
        if command == "inspect-targets":
            p.add_argument("video", type=Path, help="a video file")
            p.add_argument("--out", type=Path, required=True, help="output .npz")
    p = sub.add_parser("params", help="write a complete params.yaml for a preset (what DVC tracks)")
    _shared(p)
    p.add_argument("--out", type=Path, default=Path("params.yaml"),
                   help="output file (default params.yaml; - for stdout)")
    p = sub.add_parser("config", help="print the resolved config (preset, params.yaml, --set applied)")
    _shared(p)
    p.add_argument("--show", action="store_true", required=True, help="print the resolved tree as YAML")
    return parser


def write_params(cfg, out: Path) -> dict:
    """Write the resolved config as a params.yaml (atomic; `-` is stdout); the pipeline then reads it."""
    import yaml

    from mme.config import params_tree
    from mme.utils import write_text_atomic

    header = ("# MME pipeline parameters (tracked by DVC). Generated by `mme params --preset "
              f"{cfg.preset}`; edit values freely or use `dvc exp run -S key=value`.\n")
    write_text_atomic(out, header + yaml.safe_dump(params_tree(cfg), sort_keys=False))
    return {"written": str(out), "preset": cfg.preset}


def resolve_params(args: argparse.Namespace) -> Path | None:
    """params.yaml applies when it is for the requested preset (or no preset was asked for)."""
    if args.params is not None:
        return args.params
    default = Path("params.yaml")
    if args.command == "params" or not default.exists():
        return None
    from mme.config import load_params

    file_preset = params_preset(default) if args.preset else load_params(default).get("preset", "mini")
    if args.preset and args.preset != file_preset:
        print(f"mme: params.yaml is for preset {file_preset!r}; ignoring it for --preset {args.preset} "
              "(pass --params params.yaml to apply it anyway)", file=sys.stderr)
        return None
    return default


def params_preset(path: Path) -> str:
    """The preset a params file is for; a file that is not valid YAML is scanned for its `preset:` line
    only, so that a `--preset` which ignores the file is not stopped by it."""
    from mme.config import load_params

    try:
        return load_params(path).get("preset", "mini")
    except ConfigError:
        found = re.search(r"^preset:[ \t]*['\"]?([\w-]+)", path.read_text(errors="replace"), re.MULTILINE)
        if found is None:
            raise
        return found.group(1)


def check_params_preset(path: Path) -> None:
    """Refuse a params file labelled `preset: P` whose values, on every key where P and another preset
    differ, are all the other preset's: it was written for that one and only its label was edited (the
    values would silently stay the other preset's).

    Raises:
        ConfigError: naming the file, both presets and the command that rewrites it.
    """
    from mme.config import load_params

    tree, name = load_params(path), params_preset(path)
    given = _flat(tree)
    mine = _flat(load_config(name).to_dict())
    for other in sorted(set(PRESETS) - {name}):
        theirs = _flat(load_config(other).to_dict())
        differ = [k for k in mine if k != "preset" and k in given and mine[k] != theirs[k]]
        if differ and all(given[k] == theirs[k] for k in differ):
            raise ConfigError(f"{path} says preset {name!r} but holds the {other!r} preset's values "
                              f"({differ[0]}={given[differ[0]]!r}, ...); rewrite it with `mme params --preset {name}`")


def _flat(tree: dict, prefix: str = "") -> dict:
    """Dotted keys; tuples as lists (as YAML reads them back)."""
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def output_dirs(command: str, workdir: Path) -> list[Path]:
    """The folders a command writes into, checked before its work starts."""
    from mme.paths import Paths

    paths = Paths(workdir)
    dirs = [paths.workdir, paths.metrics_dir]
    if command in ("pretrain", "finetune", "probe", "evaluate"):
        dirs += [paths.plots_dir, paths.models_dir(command)]
    if command in ("download", "extract"):
        dirs.append(paths.workdir / "data")
    if command == "report":
        dirs += [paths.tables_dir, paths.figures_dir]
    return dirs


def stage_options(args: argparse.Namespace) -> dict:
    """The stage-specific options of a parsed command line, as keyword arguments."""
    skip = {"command", "preset", "overrides", "workdir", "params", "dataset", "workers"}
    options = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if args.command == "extract" and args.workers is not None:
        options["workers"] = args.workers
    if "resume" in vars(args):
        options["resume"] = args.resume  # None: the training driver decides (mme.engine.fit.initial_state)
    return options


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (config, files, videos, downloads, diverging loss): one line, no traceback."""
    from mme.data.sources import DownloadError, ExtractError
    from mme.data.video import VideoError

    return (ConfigError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
            DownloadError, ExtractError, VideoError, FloatingPointError)


def _interrupted(command: str) -> str:
    if command in ("pretrain", "finetune", "probe"):
        return (f"interrupted; models/{command}/last.pt keeps the last finished epoch: the same command "
                f"continues from it (or `mme {command} --resume`, same options)")
    return "interrupted; finished outputs are kept, run the command again to complete it"


def run_command(args: argparse.Namespace) -> int:
    """Build the config and run one command (errors propagate to `main`)."""
    overrides = list(args.overrides)
    if getattr(args, "dataset", None):
        overrides.insert(0, f"data.dataset={args.dataset}")
    if args.params is not None and not args.params.exists():
        raise ConfigError(f"params file {args.params} does not exist")
    params = resolve_params(args)
    if params is not None and (args.preset is None or args.preset == params_preset(params)):
        check_params_preset(params)
    cfg = load_config(args.preset, overrides, params=params)
    if args.command == "config":
        import yaml

        from mme.config import params_tree

        print(yaml.safe_dump(params_tree(cfg), sort_keys=False), end="")
        return 0
    if args.command == "params":
        summary = json.dumps(write_params(cfg, args.out))
        from mme.utils import is_special_target  # YAML on stdout/a pipe: the summary goes to stderr

        to_stderr = str(args.out) == "-" or is_special_target(args.out)
        print(summary, file=sys.stderr if to_stderr else sys.stdout)
        return 0
    from mme.utils import ensure_writable

    ensure_writable(*output_dirs(args.command, args.workdir))
    module = importlib.import_module(f"mme.stages.{STAGES[args.command][0]}")
    result = module.run(cfg, args.workdir, **stage_options(args))
    if isinstance(result, dict) and os.environ.get("RANK", "0") == "0":  # torchrun: print once
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        message, code = _interrupted(args.command), 130
    except ConfigError as exc:
        message, code = f"config error: {exc}", 2
    except _user_errors() as exc:
        message, code = str(exc), 1
    prefix = "mme" if code == 2 else f"mme {args.command}"
    print(f"{prefix}: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds
    return code


if __name__ == "__main__":
    sys.exit(main())
