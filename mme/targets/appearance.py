"""Baseline target kinds: pixels (VideoMAE), MotionMAE, HOG (MaskFeat) and HOG + a short-term motion descriptor.

Frame-wise descriptors are read per token-time slot on the tube's middle input frame (offset
`f_j + (tubelet//2)*s`), or, with `target.interpolate`, on every original frame of the slot's span
`f_j .. f_j + tubelet*s - 1` (Table 6's "dense HOG / MBH"), concatenated frame by frame. Flow descriptors use
the flow pair leaving the same frame. Per frame and patch (16 px, 8 px cells):

| part  | values per frame                                        | patch norm |
|-------|---------------------------------------------------------|------------|
| hog   | 2x2 cells x 9 bins = 36                                 | no (L2 per cell, as MaskFeat) |
| flow  | the patch's flow averaged over 4x4 px: 4x4 x 2 = 32     | yes        |
| hof   | 2x2 cells x (9 direction bins + zero bin) = 40          | no (L2 per cell) |
| mbh   | 2x2 cells x (9 bins of flow-x + 9 of flow-y) = 72       | no (L2 per cell) |
| pixel | the tube's 2x16x16x3 pixels in [0, 1], (t, y, x, c) order | yes, per colour channel (VideoMAE) |
| diff  | MotionMAE's motion target: I(o+1) - I(o) for each input frame o of the tube (the | yes, per colour channel |
|       | difference with the next original frame), in [-1, 1], 2x16x16x3 |  |

"patch norm" = `target.patch_norm` standardises the part per token (mean 0, std 1, eps 1e-6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mme.config import HOG_BINS, HOG_CELL
from mme.motion.descriptors import HOF_BINS, hof_cells, hog_cells, mbh_cells, pool_flow
from mme.targets.base import PartValue, TargetBatch, TargetGeometry, TargetSpec, cells_to_tokens, register

FLOW_POOL = 4  # px: `hog+flow` averages the patch's flow over 4x4 px squares (16x16x2 -> 4x4x2 per frame)
PIXEL_SCALE = 255.0  # decoded frames are 0..255; pixel targets are in [0, 1] as VideoMAE's


def tube_pixels(frames: torch.Tensor, geo: TargetGeometry) -> torch.Tensor:
    """(B, T, H, W, 3) input-aligned frames -> (B, N, tubelet*P*P*3) per token, (t, y, x, c) order."""
    batch, frames_in = frames.shape[:2]
    cells = frames.reshape(batch, frames_in // geo.tubelet, geo.tubelet, *frames.shape[2:])
    return cells_to_tokens(cells, geo.patch)


class FrameHogMixin:
    """The MaskFeat HOG part of a tube (middle frame, or every frame of the slot when dense)."""

    @staticmethod
    def hog_width(geo: TargetGeometry, dense: bool) -> int:
        return geo.frames_per_tube(dense) * (geo.patch // HOG_CELL) ** 2 * HOG_BINS

    @staticmethod
    def hog_part(inputs: TargetBatch, geo: TargetGeometry, dense: bool) -> PartValue:
        offsets = geo.tube_frames(dense)
        gray = inputs.gray[:, inputs.rows(offsets.reshape(-1))]
        cells = hog_cells(gray.reshape(-1, *gray.shape[2:]))
        cells = cells.view(len(inputs), *offsets.shape, *cells.shape[1:])
        return PartValue("hog", cells_to_tokens(cells, geo.patch // HOG_CELL), standardize=False)


@register
class PixelTarget(TargetSpec):
    """`pixel` (VideoMAE): the tube's pixels, patch-normalised per colour channel."""

    name = "pixel"
    needs_rgb = True

    def parts(self, cfg) -> dict[str, int]:
        geo = TargetGeometry.from_cfg(cfg)
        return {"pixel": geo.tubelet * geo.patch ** 2 * 3}

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        clip = inputs.rgb[:, inputs.rows(geo.input_offsets)] / PIXEL_SCALE
        pixels = tube_pixels(clip, geo)
        return [PartValue("pixel", pixels, channels=3)]


@register
class MotionMaeTarget(PixelTarget):
    """`motionmae`: pixels plus the temporal difference with the next original frame (see the table)."""

    name = "motionmae"

    def parts(self, cfg) -> dict[str, int]:
        width = super().parts(cfg)["pixel"]
        return {"pixel": width, "diff": width}

    def frame_offsets(self, geo: TargetGeometry) -> set[int]:
        return {o + 1 for o in geo.input_offsets}

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        now = torch.tensor(geo.input_offsets)
        diff = (inputs.rgb[:, inputs.rows(now + 1)] - inputs.rgb[:, inputs.rows(now)]) / PIXEL_SCALE
        diff = tube_pixels(diff, geo)
        return [*super().compute(inputs, geo), PartValue("diff", diff, channels=3)]


@register
class HogTarget(FrameHogMixin, TargetSpec):
    """`hog` (MaskFeat): HOG of the tube's middle frame (36), or of every frame of its span (interpolate)."""

    name = "hog"

    def parts(self, cfg) -> dict[str, int]:
        geo = TargetGeometry.from_cfg(cfg)
        return {"hog": self.hog_width(geo, geo.interpolate)}

    def frame_offsets(self, geo: TargetGeometry) -> set[int]:
        return set(geo.tube_frames(geo.interpolate).reshape(-1).tolist())

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        return [self.hog_part(inputs, geo, geo.interpolate)]


@dataclass(frozen=True)
class FlowDescriptor:
    """A per-frame flow descriptor: (B, H, W, 2) -> (B, H/cell, W/cell, channels)."""

    compute: Callable[[torch.Tensor], torch.Tensor]
    cell: int
    channels: int
    standardize: bool


FLOW_DESCRIPTORS = {
    "flow": FlowDescriptor(lambda flow: pool_flow(flow, FLOW_POOL), FLOW_POOL, 2, True),
    "hof": FlowDescriptor(hof_cells, HOG_CELL, HOF_BINS + 1, False),
    "mbh": FlowDescriptor(mbh_cells, HOG_CELL, 2 * HOG_BINS, False),
}


class HogWithFlowDescriptor(FrameHogMixin, TargetSpec):
    """HOG plus one flow descriptor of the same frames (`descriptor` names an entry of FLOW_DESCRIPTORS)."""

    needs_flow = True
    descriptor = ""

    def parts(self, cfg) -> dict[str, int]:
        geo = TargetGeometry.from_cfg(cfg)
        spec = FLOW_DESCRIPTORS[self.descriptor]
        width = geo.frames_per_tube(geo.interpolate) * (geo.patch // spec.cell) ** 2 * spec.channels
        return {"hog": self.hog_width(geo, geo.interpolate), self.descriptor: width}

    def frame_offsets(self, geo: TargetGeometry) -> set[int]:
        return set(geo.tube_frames(geo.interpolate).reshape(-1).tolist())

    def flow_pairs(self, geo: TargetGeometry) -> int:
        return int(geo.tube_frames(geo.interpolate).max()) + 1

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        spec = FLOW_DESCRIPTORS[self.descriptor]
        offsets = geo.tube_frames(geo.interpolate).to(inputs.device)
        flow = inputs.flow
        if flow.shape[1] == 0:  # no pair at all: every value invalid, computed on zero flow
            flow = flow.new_zeros((len(flow), 1, *flow.shape[2:]))
        # Pairs past a clip's real ones read padding (or its last pair): masked out below.
        flow = flow[:, offsets.reshape(-1).clamp(max=flow.shape[1] - 1)]
        cells = spec.compute(flow.reshape(-1, *flow.shape[2:]))
        cells = cells.view(len(inputs), *offsets.shape, *cells.shape[1:])
        present = offsets < inputs.pairs.view(-1, 1, 1)
        present = present.view(*present.shape, 1, 1, 1).expand_as(cells)
        per_patch = geo.patch // spec.cell
        values = cells_to_tokens(cells, per_patch)
        valid = cells_to_tokens(present, per_patch)
        return [self.hog_part(inputs, geo, geo.interpolate),
                PartValue(self.descriptor, values, valid, standardize=spec.standardize)]


@register
class HogFlowTarget(HogWithFlowDescriptor):
    """`hog+flow`: HOG + the patch's dense flow (pooled to 4x4 px)."""

    name = "hog+flow"
    descriptor = "flow"


@register
class HogHofTarget(HogWithFlowDescriptor):
    """`hog+hof`: HOG + histograms of flow orientation per cell."""

    name = "hog+hof"
    descriptor = "hof"


@register
class HogMbhTarget(HogWithFlowDescriptor):
    """`hog+mbh`: HOG + motion boundary histograms per cell."""

    name = "hog+mbh"
    descriptor = "mbh"
