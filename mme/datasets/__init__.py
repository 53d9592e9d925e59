"""Training datasets: the layer above `data/`, `motion/` and `targets/` that joins them into items.

`PretrainDataset` (clip, mask, per-token target and validity) and `VideoClsDataset` (labelled clips,
multi-view in test mode) live in `mme.datasets.clips`; see docs/architecture.md for the data flow.
"""

from mme.datasets.clips import (
    ClipSample,
    PretrainDataset,
    VideoClsDataset,
    item_rng,
    load_clip,
    pretrain_item,
)

__all__ = ["ClipSample", "PretrainDataset", "VideoClsDataset", "item_rng", "load_clip", "pretrain_item"]
