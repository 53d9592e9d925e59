"""The target registry's machinery: clip geometry, the inputs every target reads, part assembly, patch norm.

A target kind is one `TargetSpec` subclass registered with `@register`. It declares its ordered parts and
their widths (`parts(cfg)`; the model builds one head, or one decoder, per part), whether it reads flow,
which dense frames and how many flow pairs past the clip start it needs, and computes its parts from a
`TargetBatch` (B clips at once, on any device). `TargetSpec.build_batch` checks the widths, applies the patch
norm and concatenates; `TargetSpec.build` is its batch of one (`TargetInputs.batch()`).

Time: offsets are counted in original frames from the clip's first frame `i0`. Input frame k sits at
offset `k*s`; token-time slot j covers input frames `j*tubelet .. j*tubelet + tubelet-1` and starts at
`f_j = j*tubelet*s`. Flow pair i of `TargetInputs.flow` / `TargetBatch.flow` maps offset i to offset i+1.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass

import torch

from mme.motion.descriptors import to_gray

PATCH_NORM_EPS = 1e-6  # docs/targets.md
CPU_GROUP_BYTES = 8_000_000  # image bytes of the clips built together on CPU (see `TargetSpec.build_batch`)


@dataclass(frozen=True)
class TargetGeometry:
    """The config values the targets read, gathered once (derived values are properties)."""

    num_frames: int
    stride: int
    tubelet: int
    patch: int
    input_size: int
    points: int
    length: int
    interpolate: bool
    density: str
    patch_norm: bool
    median: bool
    fb_check: bool = False
    prune: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> TargetGeometry:
        """Pre-training's geometry: its clips are sampled with `pretrain.stride` when set (Table 7d varies
        the pre-training stride only), else with `data.stride` like fine-tuning's (`Config.value`)."""
        return cls(num_frames=cfg.data.num_frames, stride=cfg.value("pretrain.stride"),
                   tubelet=cfg.model.tubelet_size, patch=cfg.model.patch_size, input_size=cfg.data.input_size,
                   points=cfg.target.points_per_patch, length=cfg.target.length,
                   interpolate=cfg.target.interpolate, density=cfg.target.density,
                   patch_norm=cfg.target.patch_norm, median=cfg.target.median_filter,
                   fb_check=cfg.target.fb_check, prune=cfg.target.prune)

    @property
    def slots(self) -> int:
        return self.num_frames // self.tubelet

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.input_size // self.patch
        return self.slots, side, side

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def track_step(self) -> int:
        """Original frames per trajectory step: 1 with interpolation (dense video), s without."""
        return 1 if self.interpolate else self.stride

    @property
    def input_offsets(self) -> list[int]:
        return [k * self.stride for k in range(self.num_frames)]

    @property
    def slot_offsets(self) -> list[int]:
        return [j * self.tubelet * self.stride for j in range(self.slots)]

    def tube_frames(self, dense: bool) -> torch.Tensor:
        """long (slots, F_t) offsets a frame-wise descriptor reads per slot.

        dense: every original frame of the slot's span `f_j .. f_j + tubelet*s - 1` (F_t = tubelet*s);
        else the tube's middle input frame `2j + tubelet//2`, i.e. offset `f_j + (tubelet//2)*s` (F_t = 1).
        """
        starts = torch.tensor(self.slot_offsets).unsqueeze(1)
        if dense:
            return starts + torch.arange(self.tubelet * self.stride)
        return starts + (self.tubelet // 2) * self.stride

    def frames_per_tube(self, dense: bool) -> int:
        return self.tubelet * self.stride if dense else 1


@dataclass
class TargetInputs:
    """What one clip's target is built from, all in the pixel units of the augmented clip.

    Attributes:
        frames: float32 (F, H, W, 3), 0..255, the decoded and augmented frames at `offsets`.
        offsets: long (F,), sorted distinct offsets from the clip start (the input frames among them).
        flow: float32 (S, H, W, 2) augmented flow, pair i from offset i to i+1; None for kinds without flow.
            S may fall short of what the kind asked for at the end of a video.
        cut_pairs: bool (S,), True where flow pair i spans a shot cut; None: no cut information (old cache).
        backward: float32 (S, H, W, 2) backward flow, pair i maps offset i+1 back to offset i, augmented like
            `flow`; only with `target.fb_check`, else None.
    """

    frames: torch.Tensor
    offsets: torch.Tensor
    flow: torch.Tensor | None = None
    cut_pairs: torch.Tensor | None = None
    backward: torch.Tensor | None = None

    def rows(self, offsets) -> torch.Tensor:
        """Positions in `frames` of the given offsets (any shape); every offset must have been decoded."""
        return frame_rows(self.offsets, offsets)

    @functools.cached_property
    def gray(self) -> torch.Tensor:
        """(F, H, W) luma of `frames`."""
        return to_gray(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    def batch(self) -> TargetBatch:
        """This clip as a batch of one (its flow pairs all real)."""
        flow = None if self.flow is None else self.flow.unsqueeze(0)
        pairs = None if flow is None else torch.tensor([len(self.flow)], device=self.flow.device)
        cut_pairs = None if self.cut_pairs is None else self.cut_pairs.unsqueeze(0)
        backward = None if self.backward is None else self.backward.unsqueeze(0)
        return TargetBatch(self.frames.unsqueeze(0), self.offsets, flow, pairs, cut_pairs=cut_pairs,
                           backward=backward)


def frame_rows(decoded: torch.Tensor, offsets) -> torch.Tensor:
    """Positions in the sorted `decoded` offsets of the given offsets (any shape); all must be there."""
    decoded = decoded.cpu()
    offsets = torch.as_tensor(offsets, dtype=torch.long).cpu()
    rows = torch.searchsorted(decoded, offsets).clamp(max=len(decoded) - 1)
    if not torch.equal(decoded[rows], offsets):
        missing = sorted(set(offsets.reshape(-1).tolist()) - set(decoded.tolist()))
        raise ValueError(f"target needs frame offsets {missing[:8]} that were not decoded")
    return rows


@dataclass
class TargetBatch:
    """What the targets of a batch of B clips are built from (one clip: `TargetInputs.batch()`).

    Every tensor is on the device the targets are built on (cpu or cuda); the clips share their geometry.

    Attributes:
        frames: float32 (B, F, H, W, 3), 0..255, each clip's decoded and augmented frames at `offsets`; may be
            None when `luma` is given and the kind reads no colour (`TargetSpec.needs_rgb` False).
        offsets: long (F,), the sorted distinct offsets from the clip start, shared by the batch.
        flow: float32 (B, S, H, W, 2) augmented flow, pair i from offset i to i+1, zero after a clip's real
            pairs; None for kinds without flow.
        flow_pairs: long (B,), the real pairs of each clip (fewer than S at the end of a video: trajectories
            and flow descriptors that need a later pair are invalid); None: all S.
        luma: float32 (B, F, H, W), the frames' luma (`to_gray`), when delivered instead of computed here: a
            third of the frames' bytes for the kinds that read no colour.
        cut_pairs: bool (B, S), True where flow pair i of a clip spans a shot cut (False on padding); None: no
            cut information.
        backward: float32 (B, S, H, W, 2) backward flow, pair i maps offset i+1 back to offset i, zero after a
            clip's real pairs; only with `target.fb_check`, else None.
    """

    frames: torch.Tensor | None
    offsets: torch.Tensor
    flow: torch.Tensor | None = None
    flow_pairs: torch.Tensor | None = None
    luma: torch.Tensor | None = None
    cut_pairs: torch.Tensor | None = None
    backward: torch.Tensor | None = None

    def __post_init__(self):
        if self.frames is None and self.luma is None:
            raise ValueError("TargetBatch needs frames or luma")

    @classmethod
    def collate(cls, items: list[TargetInputs], luma_only: bool = False) -> TargetBatch:
        """Stack clips of one geometry; their flow windows are zero-padded to the longest.

        luma_only: stack the clips' luma (`TargetInputs.gray`) instead of their frames.
        """
        frames = None if luma_only else torch.stack([item.frames for item in items])
        luma = torch.stack([item.gray for item in items]) if luma_only else None
        if any(item.flow is None for item in items):
            return cls(frames, items[0].offsets, luma=luma)
        longest = max(len(i.flow) for i in items)
        flows, pairs = zip(*(pad_flow(item.flow, longest) for item in items))
        device = items[0].flow.device
        cut_pairs = backward = None
        if any(item.cut_pairs is not None for item in items):  # a clip without cut information: no cut pair
            cut_pairs = torch.stack([pad_flow(item.flow.new_zeros(len(item.flow), dtype=torch.bool)
                                              if item.cut_pairs is None else item.cut_pairs.bool(), longest)[0]
                                     for item in items])
        if all(item.backward is not None for item in items):
            backward = torch.stack([pad_flow(item.backward, longest)[0] for item in items])
        return cls(frames, items[0].offsets, torch.stack(flows), torch.tensor(pairs, device=device), luma,
                   cut_pairs, backward)

    def split(self, size: int) -> list[TargetBatch]:
        """Consecutive groups of `size` clips (views)."""
        def part(x, start):
            return None if x is None else x[start:start + size]
        return [TargetBatch(part(self.frames, i), self.offsets, part(self.flow, i), part(self.flow_pairs, i),
                            part(self.luma, i), part(self.cut_pairs, i), part(self.backward, i))
                for i in range(0, len(self), size)]

    def rows(self, offsets) -> torch.Tensor:
        """Positions along dim 1 of `frames` of the given offsets (any shape), on the batch's device."""
        return frame_rows(self.offsets, offsets).to(self.device)

    @functools.cached_property
    def gray(self) -> torch.Tensor:
        """(B, F, H, W) luma of `frames` (`luma` when given)."""
        return self.luma if self.luma is not None else to_gray(self.frames)

    @property
    def rgb(self) -> torch.Tensor:
        """`frames`, which a kind that reads colour needs."""
        if self.frames is None:
            raise ValueError("this target kind reads colour frames; deliver TargetBatch.frames, not only luma")
        return self.frames

    @property
    def device(self) -> torch.device:
        return (self.frames if self.frames is not None else self.luma).device

    @property
    def size(self) -> tuple[int, int]:
        images = self.frames if self.frames is not None else self.luma
        return int(images.shape[2]), int(images.shape[3])

    def __len__(self) -> int:
        return len(self.frames if self.frames is not None else self.luma)

    @property
    def pairs(self) -> torch.Tensor:
        """long (B,) real flow pairs per clip (0 without flow)."""
        if self.flow is None:
            return torch.zeros(len(self), dtype=torch.long, device=self.device)
        if self.flow_pairs is None:
            return torch.full((len(self),), self.flow.shape[1], dtype=torch.long, device=self.device)
        return self.flow_pairs.to(self.device, torch.long)


def pad_flow(flow: torch.Tensor, pairs: int) -> tuple[torch.Tensor, int]:
    """(S, H, W, 2) -> ((pairs, H, W, 2) zero-padded or cut to `pairs`, the real pairs min(S, pairs)).

    What a data worker delivers for a kind that reads `pairs` flow pairs, so that clips stack.
    """
    real = min(len(flow), pairs)
    if len(flow) == pairs:
        return flow, real
    out = flow.new_zeros((pairs, *flow.shape[1:]))
    out[:real] = flow[:real]
    return out, real


@dataclass
class PartValue:
    """One computed part: values (B, N, width) and validity (B, N, width) bool, None when every value is valid.

    `standardize`: the patch norm applies to it (when `target.patch_norm`); `channels`: that many interleaved
    groups (the last axis of a (..., channels) layout, e.g. RGB) are normalised apart.
    """

    name: str
    values: torch.Tensor
    valid: torch.Tensor | None = None
    standardize: bool = True
    channels: int = 1


def standardize(values: torch.Tensor, valid: torch.Tensor | None = None, channels: int = 1,
                eps: float = PATCH_NORM_EPS) -> torch.Tensor:
    """Patch norm: per token (row, any leading dims) and channel group, (x - mean) / sqrt(var + eps) over the
    valid values.

    Statistics use only valid entries (population variance); invalid entries come out 0. valid=None: all.
    """
    *tokens, width = values.shape
    x = values.reshape(*tokens, width // channels, channels)
    if valid is None:  # sums over the middle axis, not var_mean: much faster on a strided reduction
        count = x.shape[-2]
        centred = x - x.sum(-2, keepdim=True) / count
    else:
        weight = valid.reshape(x.shape).to(x.dtype)
        count = weight.sum(-2, keepdim=True).clamp(min=1)
        centred = (x - (x * weight).sum(-2, keepdim=True) / count) * weight
    var = centred.pow(2).sum(-2, keepdim=True) / count
    return (centred * torch.rsqrt(var + eps)).reshape(*tokens, width)


def cells_to_tokens(cells: torch.Tensor, per_patch: int) -> torch.Tensor:
    """(B, J, F_t, Hc, Wc, C) per-frame cells -> (B, J*Hp*Wp, F_t*per_patch*per_patch*C) per token, t-major.

    A token's row is ordered (frame, cell row, cell column, channel); per_patch cells make one patch side.
    """
    batch, slots, frames, rows, cols, channels = cells.shape
    hp, wp = rows // per_patch, cols // per_patch
    x = cells.reshape(batch, slots, frames, hp, per_patch, wp, per_patch, channels)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(batch, slots * hp * wp, frames * per_patch * per_patch * channels)


class TargetSpec(abc.ABC):
    """One target kind. Subclasses set `name`, `needs_flow` and implement `parts` and `compute`."""

    name: str = ""
    needs_flow: bool = False
    needs_rgb: bool = False  # reads `TargetBatch.frames` (colour), not only its luma

    @abc.abstractmethod
    def parts(self, cfg) -> dict[str, int]:
        """Ordered part name -> width per token."""

    def frame_offsets(self, geo: TargetGeometry) -> set[int]:  # noqa: ARG002  (kinds override)
        """Offsets of the frames the kind reads besides the input frames."""
        return set()

    def follows_shuffle(self, geo: TargetGeometry) -> bool:
        """Under `data.shuffle_frames`: True when the kind reads only the input frames, so its targets are built
        from the shuffled clip, as on a video whose frames were shuffled (VideoMAE's pixels in the paper's
        Fig. 3); False when it reads flow or frames between the inputs, which a shuffled video does not have:
        its targets keep the real order (docs/targets.md, Shuffled frames)."""
        return not self.needs_flow and self.frame_offsets(geo) <= set(geo.input_offsets)

    def flow_pairs(self, geo: TargetGeometry) -> int:  # noqa: ARG002  (kinds override)
        """Flow pairs from the clip start the kind reads (0: none)."""
        return 0

    @abc.abstractmethod
    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        """The kind's parts for every token of every clip of the batch, in `parts` order."""

    def window(self, geo: TargetGeometry) -> int:
        """Original frames from the clip start that the clip and its targets read."""
        frames = set(geo.input_offsets) | self.frame_offsets(geo)
        pairs = self.flow_pairs(geo)
        return max(max(frames) + 1, pairs + 1 if pairs else 0)

    def build(self, inputs: TargetInputs, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip: per-token target float32 (N, D) and target_valid bool (N, D); invalid entries are 0.

        The batch of one of `build_batch` (the same numbers as that clip inside any batch).
        """
        target, target_valid = self.build_batch(inputs.batch(), cfg)
        return target[0], target_valid[0]

    def build_batch(self, inputs: TargetBatch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token targets float32 (B, N, D) and target_valid bool (B, N, D) of a batch, on its device;
        invalid entries are 0.

        On CPU the batch is built in groups of clips whose images hold about `CPU_GROUP_BYTES` (each group in
        one vectorised pass): the whole batch at once streams every intermediate through main memory, measured
        up to 3x slower per clip than cache-sized groups; other devices take the batch in one pass.
        """
        if self.needs_flow and inputs.flow is None:
            raise ValueError(f"target kind {self.name!r} needs flow; run `mme extract` first")
        if inputs.device.type == "cpu" and len(inputs) > 1:
            num_frames, (height, width) = len(inputs.offsets), inputs.size
            image_bytes = num_frames * height * width * (3 if self.needs_rgb else 1) * 4
            group = max(1, CPU_GROUP_BYTES // image_bytes)
            if group < len(inputs):
                built = [self._build(part, cfg) for part in inputs.split(group)]
                return torch.cat([t for t, _ in built]), torch.cat([v for _, v in built])
        return self._build(inputs, cfg)

    def _build(self, inputs: TargetBatch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        geo = TargetGeometry.from_cfg(cfg)
        declared = self.parts(cfg)
        computed = self.compute(inputs, geo)
        widths = {p.name: p.values.shape[-1] for p in computed}
        if widths != declared:
            raise RuntimeError(f"target {self.name!r} built parts {widths}, declared {declared}")
        batch, tokens = computed[0].values.shape[:2]
        target = torch.empty(batch, tokens, sum(widths.values()), device=inputs.device)
        target_valid = torch.ones(batch, tokens, target.shape[-1], dtype=torch.bool, device=inputs.device)
        column = 0
        for part in computed:
            columns = slice(column, column + part.values.shape[-1])
            x = part.values.float()
            if part.valid is not None:
                x = x * part.valid
                target_valid[..., columns] = part.valid
            if geo.patch_norm and part.standardize:
                x = standardize(x, part.valid, part.channels)
            target[..., columns] = x
            column = columns.stop
        return target, target_valid


TARGETS: dict[str, TargetSpec] = {}


def register(cls: type[TargetSpec]) -> type[TargetSpec]:
    """Class decorator: add one instance of the kind to `TARGETS` under its `name`."""
    if cls.name in TARGETS:
        raise ValueError(f"target kind {cls.name!r} registered twice")
    TARGETS[cls.name] = cls()
    return cls


def get_target(cfg_or_kind) -> TargetSpec:
    """The registered spec for `cfg.target.kind` (or a kind name)."""
    kind = cfg_or_kind if isinstance(cfg_or_kind, str) else cfg_or_kind.target.kind
    if kind not in TARGETS:
        raise ValueError(f"unknown target kind {kind!r} (target.kind); choose one of {', '.join(TARGETS)}")
    return TARGETS[kind]


def target_parts(cfg) -> dict[str, int]:
    """Ordered part widths of the configured kind (their sum is the per-token target width)."""
    return get_target(cfg).parts(cfg)
