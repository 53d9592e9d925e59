"""Models: ViT encoder/decoder in the VideoMAE layout, the MME pre-trainer, the classifier, checkpoint I/O."""

from mme.models.checkpoint import LoadReport, init_from, load_checkpoint, pretrain_run_id, read_checkpoint
from mme.models.classifier import VideoClassifier
from mme.models.pretrainer import MaskedMotionPretrainer
from mme.models.registry import (
    build_classifier,
    build_pretrainer,
    classifier_from_args,
    list_sizes,
    model_args,
    pretrainer_from_args,
)
from mme.models.vit import VisionTransformer

__all__ = [
    "LoadReport",
    "MaskedMotionPretrainer",
    "VideoClassifier",
    "VisionTransformer",
    "build_classifier",
    "build_pretrainer",
    "classifier_from_args",
    "list_sizes",
    "init_from",
    "load_checkpoint",
    "model_args",
    "pretrain_run_id",
    "pretrainer_from_args",
    "read_checkpoint",
]
