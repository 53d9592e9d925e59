"""Typed configuration tree: defaults, named presets, params.yaml and `--set` overrides.

One `Config` dataclass tree holds every setting of every stage. It is built in this order:
defaults (the dataclass fields) -> preset overlay (`PRESETS[name]`) -> params.yaml sections ->
`key=value` overrides. Unknown keys and invalid values fail at once with a `ConfigError` that
names the key and what is allowed. Derived values (token grid, target width, ...) are computed
by the code that needs them and are never written back here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from mme.presets import PRESETS


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the fix."""


# Closed sets the config owns: a field typed with one of these takes exactly its values (`CHOICES` is
# read from the annotations). "Off" has one spelling: `off` for an enumerated option, 0 for a number.
DatasetName = Literal["synthetic", "ucf101", "hmdb51", "k400", "ssv2", "folder"]
Flip = Literal["auto", "on", "off"]
Sampling = Literal["dense", "segment"]
Appearance = Literal["random", "shared"]
Split = Literal[1, 2, 3]
FlowBackend = Literal["farneback", "dis", "tvl1"]
Density = Literal["dense", "max", "mean"]
MaskKind = Literal["tube", "cube", "random"]
DecoderMode = Literal["joint", "separate"]
Amp = Literal["bf16", "fp16", "off"]
TargetsOn = Literal["auto", "device", "loader"]

# Paper constants (Sun et al., CVPR 2023, section 4 and Table 7 defaults).
PAPER_TRAJ_LENGTH = 6
PAPER_POINTS_PER_PATCH = 4
PAPER_MASK_RATIO = 0.7
HOG_BINS = 9
HOG_CELL = 8


@dataclass
class SyntheticConfig:
    """Size of the generated motion dataset (mme/data/synthetic.py; why `mini` shapes it: docs/deviations.md)."""

    num_videos: int = 960
    num_frames: int = 64
    size: int = 128
    fps: int = 25
    distractors: int = 2
    camera_pan: bool = True
    zoom: float = 1.0          # magnifies objects and their motions (mme/data/synthetic.py `actor_tracks`)
    appearance: Appearance = "random"  # random: every video draws its own look; shared: one look, only motion differs
    workers: int = 2
    val_videos: int = 0   # > 0: exactly this many of num_videos in val (else data.val_fraction); held-out
    test_videos: int = 0  # splits cost generation and decoding only: extract makes flow for train alone


@dataclass
class DataConfig:
    dataset: DatasetName = "synthetic"
    folder: str = ""
    split: Split = 1
    short_side: int = 128
    input_size: int = 112
    num_frames: int = 16
    stride: int = 3
    shuffle_frames: bool = False
    flip: Flip = "auto"
    sampling: Sampling = "dense"
    crop_scale_min: float = 0.5
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    num_workers: int = 2
    avoid_cuts: bool = True  # prefer training clips whose window holds no shot cut (mme/motion/shots.py)
    # Where the pre-training targets of a batch are built (mme/datasets/batching.py): in the training step on
    # its device, or in the loader's workers; auto = device on cuda, the measured CPU winner on CPU.
    targets_on: TargetsOn = "auto"
    decoded_cache: bool = False  # extract writes, training datasets mmap decoded frames + flow (mme/motion/decoded.py)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class FlowConfig:
    backend: FlowBackend = "dis"
    compensate_camera: bool = False
    workers: int = 2


@dataclass
class TargetConfig:
    kind: str = "traj"
    length: int = PAPER_TRAJ_LENGTH
    points_per_patch: int = PAPER_POINTS_PER_PATCH
    interpolate: bool = True
    patch_norm: bool = True
    density: Density = "dense"
    median_filter: bool = False
    fb_check: bool = False  # forward-backward flow consistency ends occluded tracks (mme/motion/consistency.py)
    prune: bool = False  # dense-trajectory pruning of sudden jumps (mme/motion/consistency.py)


@dataclass
class MaskConfig:
    kind: MaskKind = "tube"
    ratio: float = PAPER_MASK_RATIO


@dataclass
class ModelConfig:
    """`name` picks a registered size (mme/models/registry.py); a dimension left null takes that size's
    value and an explicit one overrides it."""

    name: str = "tiny"
    patch_size: int = 16
    tubelet_size: int = 2
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    decoder_dim: int | None = None
    decoder_depth: int = 1
    decoder_num_heads: int | None = None
    decoder_mode: DecoderMode = "joint"
    drop_path: float = 0.1


@dataclass
class PretrainConfig:
    epochs: int = 20
    batch_size: int = 16
    base_lr: float = 1.5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 2
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 0.0  # 0 = off (VideoMAE/MME pre-train without clipping)
    accum_steps: int = 1
    amp: Amp = "bf16"
    compile: bool = False  # torch.compile the model of the training step (speed only: README, Speed)
    stride: int = 0  # pre-training clips' sampling stride (Table 7d); 0 = data.stride (docs/targets.md)


@dataclass
class FinetuneConfig:
    init: Literal["pretrained", "scratch"] = "pretrained"  # scratch: the random-init floor, models/finetune_scratch
    epochs: int = 15
    batch_size: int = 16
    base_lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: int = 2
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    clip_grad: float = 5.0
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    token_drop: float = 0.0  # tube positions dropped per training clip, val/test see all (README, Presets)
    val_every: int = 1  # val after every N-th epoch and the last (only watched; 1 200 val clips cost time)
    accum_steps: int = 1
    amp: Amp = "bf16"
    compile: bool = False  # as pretrain.compile


@dataclass
class ProbeConfig:  # the frozen probes' grids (mme/stages/probe.py), chosen on val
    init: Literal["pretrained", "random"] = "pretrained"  # random: the untrained encoder, models/probe_random
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-2  # the linear grid: lr x (0.1 .. 10), epochs x (1, 2) (mme/stages/probe.py)
    weight_decay: float = 0.0
    attentive_epochs: int = 20  # 0 = no attentive probe
    attentive_lr: float = 3e-3  # the attentive head's lr (one grid point: each costs minutes on 2 cores)


@dataclass
class EvaluateConfig:
    num_clips: int = 2
    num_crops: int = 3
    batch_size: int = 8


@dataclass
class Config:
    preset: str = "mini"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (`data.stride` -> 3), as MLflow params and `--set` use."""
        return flatten(self.to_dict())

    def value(self, key: str) -> Any:
        """A dotted key's value as the stages use it: a `FALLBACKS` key left at 0 takes its fallback's value."""
        def get(dotted: str) -> Any:
            return functools.reduce(getattr, dotted.split("."), self)
        value = get(key)
        return get(FALLBACKS[key]) if key in FALLBACKS and value == 0 else value

    def digest(self) -> str:
        """Short stable hash of the resolved config (pipeline tags, cache keys)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


# Numeric ranges: key -> (low, high), inclusive.
RANGES: dict[str, tuple[float, float]] = {
    "mask.ratio": (0.0, 0.99), "finetune.token_drop": (0.0, 0.95), "target.length": (1, 32),
    "target.points_per_patch": (1, 64), "data.stride": (1, 16), "data.num_frames": (2, 128),
    "model.decoder_depth": (1, 16), "data.crop_scale_min": (0.05, 1.0), "data.val_fraction": (0.0, 0.5),
    "data.test_fraction": (0.0, 0.5), "data.synthetic.zoom": (0.25, 4.0), "pretrain.stride": (0, 16),
}

def _literal_choices(node: type, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    """Dotted key -> allowed values of every `Literal`-typed field under a config dataclass."""
    hints, out = get_type_hints(node), {}
    for item in dataclasses.fields(node):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            out |= _literal_choices(hint, f"{prefix}{item.name}.")
        elif get_origin(hint) is Literal:
            out[f"{prefix}{item.name}"] = get_args(hint)
    return out


# Allowed values of the enumerated keys the config owns; checked after every overlay.
CHOICES: dict[str, tuple[Any, ...]] = {"preset": tuple(PRESETS)} | _literal_choices(Config)

# Keys whose names a registry owns ("module:mapping" keyed by the names): registering one entry there is
# the whole edit for a new name. Looked up only when validating, so the config stays the bottom layer.
REGISTERED: dict[str, str] = {"target.kind": "mme.targets:TARGETS", "model.name": "mme.models.registry:SIZES"}


def allowed_values(key: str) -> tuple[Any, ...]:
    """The allowed values of an enumerated key (config-owned or registry-owned)."""
    if key in REGISTERED:
        module, _, mapping = REGISTERED[key].partition(":")
        return tuple(getattr(importlib.import_module(module), mapping))
    return CHOICES[key]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested tree as dotted keys (`{"data": {"stride": 3}}` -> `{"data.stride": 3}`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def _coerce(key: str, text: Any, current: Any) -> Any:
    """Turn an override value into the type of the field it replaces."""
    if not isinstance(text, str):
        value = text
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"bad value for {key}: {text!r} ({exc})") from exc
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {text!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {text!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, str):  # YAML 1.1 reads 4e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {text!r}")
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise ConfigError(f"{key} must be a list of {len(current)} numbers, got {text!r}")
        return tuple(float(v) for v in value)
    if isinstance(current, str):
        if isinstance(text, str):  # a string field takes the text as written (`--set data.flip=off`)
            return text
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off in params.yaml as a boolean
            return "on" if value else "off"
        return "" if value is None else str(value)
    return value


def _coerce_field(node: Any, name: str, key: str, raw: Any, current: Any) -> Any:
    """Coerce to the field's type; `int | None` fields (model sizes) also take null."""
    field_type = str(next(f.type for f in dataclasses.fields(node) if f.name == name))
    if "None" in field_type:
        value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        if value is None:
            return None
        return _coerce(key, raw, 1.0 if "float" in field_type else 1)
    return _coerce(key, raw, current)


def _set(cfg: Any, dotted: str, raw: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            where = ".".join(parts[:i]) or "the config"
            allowed = sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
            raise ConfigError(f"unknown config key {dotted!r}: {where} has no {part!r} (allowed: {', '.join(allowed)})")
        if i == len(parts) - 1:
            current = getattr(node, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(raw, dict):
                    raise ConfigError(f"{dotted} is a section; set its keys ({dotted}.<key>=...)")
                for sub_key, sub_value in raw.items():
                    _set(cfg, f"{dotted}.{sub_key}", sub_value)
            else:
                setattr(node, part, _coerce_field(node, part, dotted, raw, current))
        else:
            node = getattr(node, part)


def _apply_tree(cfg: Config, tree: dict[str, Any], prefix: str = "") -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _apply_tree(cfg, value, name + ".")
        else:
            _set(cfg, name, value)


# Keys that change how fast a stage runs, never what it computes (torch.compile: the same maths, up to float
# rounding): no DVC stage lists them, no resume checks them.
SPEED_ONLY = frozenset({"data.num_workers", "data.synthetic.workers", "flow.workers", "data.targets_on",
                        "pretrain.compile", "finetune.compile"})
FALLBACKS = {"pretrain.stride": "data.stride"}  # key -> the key whose value it takes when 0
# Counts: key -> smallest allowed value (no upper bound). Zero workers means "in this process"; a
# negative or zero epoch count would make a run that trains nothing and still writes a final checkpoint.
COUNTS: dict[str, int] = {
    "data.short_side": 1, "data.input_size": 1, "data.num_workers": 0,
    "data.synthetic.num_videos": 1, "data.synthetic.num_frames": 2, "data.synthetic.size": 1,
    "data.synthetic.fps": 1, "data.synthetic.distractors": 0, "data.synthetic.workers": 0,
    "data.synthetic.val_videos": 0, "data.synthetic.test_videos": 0, "flow.workers": 0, "model.patch_size": 1,
    "model.tubelet_size": 1, "probe.attentive_epochs": 0,
    "pretrain.epochs": 1, "pretrain.batch_size": 1, "pretrain.warmup_epochs": 0, "pretrain.accum_steps": 1,
    "finetune.epochs": 1, "finetune.batch_size": 1, "finetune.warmup_epochs": 0, "finetune.accum_steps": 1,
    "finetune.val_every": 1, "probe.epochs": 1, "probe.batch_size": 1, "evaluate.num_clips": 1,
    "evaluate.num_crops": 1, "evaluate.batch_size": 1}
NON_NEGATIVE = ("pretrain.clip_grad", "finetune.clip_grad", "finetune.mixup", "finetune.cutmix")  # 0 = off


def validate_counts(flat: dict[str, Any]) -> None:
    """Every count within its range (`COUNTS`, `NON_NEGATIVE`); the error names the key and the range."""
    for key, low in COUNTS.items():
        if flat[key] < low:
            raise ConfigError(f"{key}={flat[key]} is out of range: it must be an integer >= {low}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]} is out of range: it must be >= 0 (0 = off)")
    if flat["data.synthetic.val_videos"] + flat["data.synthetic.test_videos"] >= flat["data.synthetic.num_videos"]:
        raise ConfigError("data.synthetic.val_videos + test_videos leave no training video; raise num_videos")


def validate(cfg: Config) -> None:
    flat = cfg.flat()
    validate_counts(flat)
    for key in (*CHOICES, *REGISTERED):
        allowed = allowed_values(key)
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
    for key, (low, high) in RANGES.items():
        if not low <= flat[key] <= high:
            raise ConfigError(f"{key}={flat[key]} is out of range [{low}, {high}]")
    for size, unit in (("data.num_frames", "model.tubelet_size"), ("data.input_size", "model.patch_size")):
        if flat[size] % flat[unit]:
            raise ConfigError(f"{size}={flat[size]} must be a multiple of {unit}={flat[unit]}")
    if cfg.data.input_size > cfg.data.short_side:
        raise ConfigError(
            f"data.input_size={cfg.data.input_size} must not exceed data.short_side={cfg.data.short_side}")
    if round(cfg.target.points_per_patch ** 0.5) ** 2 != cfg.target.points_per_patch:
        raise ConfigError(f"target.points_per_patch={cfg.target.points_per_patch} must be a square (1, 4, 9, 16, ...)")
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_dim", "decoder_num_heads"):
        if (value := getattr(cfg.model, key)) is not None and value <= 0:
            raise ConfigError(f"model.{key}={value} must be positive (or null for the size's default)")


def load_params(path: str | Path) -> dict[str, Any]:
    """Read a params.yaml file."""
    path = Path(path)
    if not path.exists():  # an empty or missing file gives {}
        return {}
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path} is not valid YAML{where} ({problem}); fix it or regenerate it with "
                          "`mme params --preset NAME`") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    return tree


def load_config(preset: str | None = None, overrides: tuple[str, ...] | list[str] = (),
                params: dict[str, Any] | str | Path | None = None) -> Config:
    """Build the resolved config.

    Args:
        preset: overlay name (`smoke`, `mini`, `paper`); None takes `params['preset']` or `mini`.
        overrides: `key=value` strings, exactly as `--set` takes them (applied last).
        params: a params.yaml path or an already-read mapping (applied after the preset).
    """
    tree = load_params(params) if isinstance(params, (str, Path)) else copy.deepcopy(params or {})
    name = next(name for name in (preset, tree.pop("preset", None), "mini") if name)  # the tree's is popped always
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    _apply_tree(cfg, PRESETS[name])
    _apply_tree(cfg, tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. target.kind=pixel)")
        key, value = item.split("=", 1)
        if key.strip() == "preset":
            raise ConfigError("set the preset with --preset NAME, not --set preset=...")
        _set(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


def params_tree(cfg: Config) -> dict[str, Any]:
    """The resolved config as a params.yaml mapping (tuples as lists, `preset` first)."""
    return json.loads(json.dumps(cfg.to_dict()))


def result_tree(cfg: Config, keep: frozenset[str] = frozenset()) -> dict[str, Any]:
    """What a stored result depends on: `cfg` as a tree without its SPEED_ONLY keys (but those in `keep`) nor a
    FALLBACKS key that changes nothing (0 or its fallback's value: results stored before it keep their keys)."""
    tree, flat = cfg.to_dict(), cfg.flat()
    idle = {key for key, fallback in FALLBACKS.items() if flat[key] in (0, flat[fallback])}
    for key in (SPEED_ONLY - keep) | idle:
        *sections, name = key.split(".")
        functools.reduce(dict.get, sections, tree).pop(name)
    return tree


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved with `Config.to_dict()` (e.g. from a checkpoint)."""
    tree = copy.deepcopy(tree)
    cfg = Config(preset=tree.pop("preset", "mini"))
    _apply_tree(cfg, tree)
    validate(cfg)
    return cfg
