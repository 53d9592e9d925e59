"""Named model sizes and the factories that turn a config into a model.

Each size is a small function returning its model arguments (as timm registers its variants); one
factory builds any of them. `model_args(cfg)` resolves the arguments once: the named size
(`model.name`), then every `cfg.model.*` dimension that is set (not null: an explicit override),
then the clip geometry and the options that are not part of a size (decoder depth and mode, drop path).
The resolved dict is stored in every checkpoint, so a model can be rebuilt from its file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mme.config import Config
from mme.models.classifier import VideoClassifier
from mme.models.pretrainer import MaskedMotionPretrainer

SIZES: dict[str, Callable[[], dict[str, Any]]] = {}

# Keys a named size defines; a cfg.model value that is not null overrides the size's.
SIZE_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_dim", "decoder_num_heads")
ENCODER_KEYS = ("img_size", "num_frames", "patch_size", "tubelet_size", "embed_dim", "depth", "num_heads",
                "mlp_ratio", "qkv_bias", "drop_path")


def register_size(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    SIZES[fn.__name__] = fn
    return fn


@register_size
def smoke() -> dict[str, Any]:
    return dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, decoder_dim=32, decoder_num_heads=2)


@register_size
def tiny() -> dict[str, Any]:
    return dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, decoder_dim=96, decoder_num_heads=3)


@register_size
def small() -> dict[str, Any]:
    return dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, decoder_dim=192, decoder_num_heads=3)


@register_size
def base() -> dict[str, Any]:
    return dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, decoder_dim=384, decoder_num_heads=6)


def list_sizes() -> list[str]:
    return sorted(SIZES)


def size_args(name: str) -> dict[str, Any]:
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(list_sizes())}")
    return SIZES[name]()


def model_args(cfg: Config) -> dict[str, Any]:
    """Resolved model arguments (without the target parts or the number of classes)."""
    args = size_args(cfg.model.name)
    args |= {k: getattr(cfg.model, k) for k in SIZE_KEYS if getattr(cfg.model, k) is not None}
    args |= dict(img_size=cfg.data.input_size, num_frames=cfg.data.num_frames, patch_size=cfg.model.patch_size,
                 tubelet_size=cfg.model.tubelet_size, qkv_bias=True, drop_path=cfg.model.drop_path,
                 decoder_depth=cfg.model.decoder_depth, decoder_mode=cfg.model.decoder_mode)
    for dim, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_num_heads")):
        if args[dim] % args[heads]:
            raise ValueError(f"model.{dim}={args[dim]} must be divisible by model.{heads}={args[heads]}")
    return args


def encoder_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: args[k] for k in ENCODER_KEYS}


def pretrainer_from_args(args: dict[str, Any]) -> MaskedMotionPretrainer:
    """Build from a resolved args dict that includes `target_parts` (e.g. a checkpoint's `model_args`)."""
    decoder = {k: args[k] for k in ("decoder_dim", "decoder_depth", "decoder_num_heads", "decoder_mode")}
    return MaskedMotionPretrainer(args["target_parts"], **encoder_args(args), **decoder)


def classifier_from_args(args: dict[str, Any], num_classes: int) -> VideoClassifier:
    return VideoClassifier(num_classes, head_drop=args.get("head_drop", 0.0), **encoder_args(args))


def build_pretrainer(cfg: Config) -> MaskedMotionPretrainer:
    """The pre-training model for `cfg`, its heads sized by the target registry."""
    from mme.targets import target_parts

    return pretrainer_from_args(model_args(cfg) | {"target_parts": dict(target_parts(cfg))})


def build_classifier(cfg: Config, num_classes: int) -> VideoClassifier:
    return classifier_from_args(model_args(cfg), num_classes)
