"""The two datasets: pre-training clips with their motion targets, and labelled clips for classification.

`PretrainDataset` item (docs/architecture.md): a random start such that the clip and the dense frames its
targets read fit the video (with `data.avoid_cuts`, among the windows without a shot cut when the flow cache
knows the cuts); one open and decode of the video for the input frames and those dense frames; the flow window
from the cache (and the backward one with `target.fb_check`); one random resized crop (+ flip where the labels
allow it) applied to frames AND flow; the targets of `target.kind` built from those augmented frames and flow
(or, with `targets=False`, what they are built from, for one build per batch: `mme.datasets.batching`); the
mask; optionally the input frames shuffled (`data.shuffle_frames`, the paper's Fig. 3; a kind that reads only the
input frames builds its targets from the shuffled clip, any other from the real order: `TargetSpec.follows_shuffle`).

Where the decoded cache fits (`data.decoded_cache`, `mme.motion.decoded`): with it on, the pre-training items
and the classification items of the train split take their frames, and the pre-training items their flow
windows, from the video's memory-mapped entry instead of decoding the video and inflating the `.npz`; the
sampling, crop and everything after it are the same code on the same numbers, so the items are equal. A
missing, stale or damaged entry is not used: that video is decoded as without the cache (one warning).

Randomness: every item draws from `np.random.default_rng([seed, epoch, index])` (start, crop, flip, mask,
shuffle, in that order), so an item depends only on (seed, epoch, index): a resumed run, another worker
count or another process sees the same data. Call `set_epoch` each epoch (the training loop does).

No file is opened in `__init__` beyond the list and the cache metadata check, so the datasets are safe to
fork into DataLoader workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mme.data.lists import read_classes, read_list, resolve_video
from mme.data.masking import make_mask
from mme.data.sampling import (
    clip_indices,
    clip_span,
    segment_indices,
    test_clip_starts,
    train_clip_start,
)
from mme.data.transforms import CropParams, crop_flow, crop_frames, flip_allowed, normalize, sample_crop, spatial_crops
from mme.data.video import read_clip
from mme.motion.cache import FlowCache, cache_problem, expected_meta, flow_cache_path, load_flow
from mme.motion.decoded import DecodedEntries
from mme.motion.shots import cut_free_starts, cut_pair_flags
from mme.motion.tracking import resize_flow
from mme.paths import Paths
from mme.targets import TargetGeometry, TargetInputs, TargetSpec, get_target, pad_flow

FLIP_PROB = 0.5  # horizontal flip probability where flips are allowed

FlowWindow = Callable[[int, int], np.ndarray]  # (first pair, stop pair) -> float32 (S, H, W, 2)
FrameReader = Callable[[np.ndarray], np.ndarray]  # frame indices -> uint8 (T, H, W, 3), as `read_clip` gives them


def item_rng(seed: int, epoch: int, index: int, *extra: int) -> np.random.Generator:
    """The generator of one item: a function of (seed, epoch, index) only."""
    return np.random.default_rng([seed, epoch, index, *extra])


def crop_scale(cfg) -> tuple[float, float]:
    return cfg.data.crop_scale_min, 1.0


def flip_prob(cfg) -> float:
    return FLIP_PROB if flip_allowed(cfg) else 0.0


class SharedEpoch:
    """The epoch of a dataset, in shared memory: `set_epoch` in the main process reaches persistent loader
    workers (which hold their own copy of the dataset), so the workers live across epochs."""

    epoch_shared = True

    def _init_epoch(self) -> None:
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))


@dataclass
class ClipSample:
    """One decoded, augmented clip with everything its targets read (see `load_clip`)."""

    inputs: TargetInputs
    input_rows: torch.Tensor  # rows of inputs.frames that are the T input frames, in order
    start: int
    crop: CropParams
    num_video_frames: int

    @property
    def clip(self) -> torch.Tensor:
        """float32 (T, S, S, 3) 0..255 input frames, in their real order unless `shuffled`."""
        return self.inputs.frames[self.input_rows]

    def shuffled(self, order: torch.Tensor) -> ClipSample:
        """This sample with input frame k replaced by input frame `order[k]` (the other frames and flow kept)."""
        frames = self.inputs.frames.clone()
        frames[self.input_rows] = self.inputs.frames[self.input_rows[order]]
        return dataclasses.replace(self, inputs=dataclasses.replace(self.inputs, frames=frames))


def clip_start(num_video_frames: int, span: int, cuts: list[int] | None, rng: np.random.Generator) -> int:
    """A training start (`train_clip_start`), among the cut-free windows of `span` frames when `cuts` has any
    (`cut_free_starts`); any start when every window holds a cut (the crossing trajectories are masked)."""
    if cuts and num_video_frames > span:
        starts = cut_free_starts(cuts, num_video_frames, span)
        if len(starts):
            return int(starts[rng.integers(0, len(starts))])
    return train_clip_start(num_video_frames, span, rng)


def load_clip(cfg, spec: TargetSpec, video: Path, num_video_frames: int | None, flow_window: FlowWindow | None,
              rng: np.random.Generator, cuts: list[int] | None = None,
              backward_window: FlowWindow | None = None, frames_of: FrameReader | None = None) -> ClipSample:
    """Sample a start and a crop, decode the clip + the dense frames the target reads, augment frames and flow.

    Args:
        cfg: resolved config; spec: the target kind; video: the file; num_video_frames: its frame count
            (None: counted while the file is open for the frames, `read_clip`).
        flow_window: reads flow pairs [a, b) of the video in the decoded frames' resolution or any other
            (resized to the frames); None for kinds without flow.
        cuts: the video's shot cuts (`FlowCache.cuts`), None when unknown: `cut_pairs` of the inputs, and with
            `data.avoid_cuts` the start is drawn among the cut-free windows.
        backward_window: the backward flow reader (`target.fb_check`), augmented exactly like the flow.
        frames_of: reads the decoded frames instead of the video (the decoded cache); needs num_video_frames.
    """
    geo = TargetGeometry.from_cfg(cfg)
    base_span = clip_span(geo.num_frames, geo.stride)
    span = clip_span(geo.num_frames, geo.stride, extra=max(0, spec.window(geo) - base_span))
    offsets = sorted(set(geo.input_offsets) | spec.frame_offsets(geo))
    drawn: dict[str, int] = {}

    def indices(count: int) -> np.ndarray:
        drawn["start"], drawn["count"] = clip_start(count, span, cuts if cfg.data.avoid_cuts else None, rng), count
        return np.clip(drawn["start"] + np.asarray(offsets), 0, count - 1)

    if frames_of is not None:
        frames = frames_of(indices(num_video_frames))
    else:
        _, frames = read_clip(video, indices, short_side=cfg.data.short_side, num_frames=num_video_frames)
    start, count = drawn["start"], drawn["count"]
    height, width = frames.shape[1:3]
    crop = sample_crop(height, width, cfg.data.input_size, crop_scale(cfg), flip_prob=flip_prob(cfg), rng=rng)
    flow = cut_pairs = backward = None
    if flow_window is not None and spec.needs_flow:
        stop = max(min(start + spec.flow_pairs(geo), count - 1), start)

        def augmented(window: FlowWindow) -> torch.Tensor:
            raw = torch.from_numpy(np.ascontiguousarray(window(start, stop)))
            return crop_flow(resize_flow(raw, height, width), crop)

        flow = augmented(flow_window)
        cut_pairs = cut_pair_flags(cuts, start, len(flow))
        backward = augmented(backward_window) if backward_window is not None else None
    offsets_t = torch.tensor(offsets, dtype=torch.long)
    inputs = TargetInputs(crop_frames(frames, crop), offsets_t, flow, cut_pairs, backward)
    return ClipSample(inputs, inputs.rows(geo.input_offsets), start, crop, count)


def _video_and_mask(cfg, spec: TargetSpec, sample: ClipSample, rng: np.random.Generator
                    ) -> tuple[dict[str, torch.Tensor], ClipSample]:
    """The normalised input clip and the mask (drawn after the crop; the shuffle last), and the sample the
    targets are built from: the shuffled one for a kind that `follows_shuffle`, else the real order."""
    geo = TargetGeometry.from_cfg(cfg)
    mask = make_mask(cfg.mask.kind, cfg.mask.ratio, geo.grid, rng)
    clip = sample.clip
    if cfg.data.shuffle_frames:
        order = torch.from_numpy(rng.permutation(len(sample.input_rows)))
        if spec.follows_shuffle(geo):  # only then the frames are copied: the targets read them shuffled
            sample = sample.shuffled(order)
            clip = sample.clip
        else:
            clip = clip[order]
    return {"video": normalize(clip), "mask": torch.from_numpy(mask)}, sample


def pretrain_item(cfg, spec: TargetSpec, sample: ClipSample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """video (3,T,H,W) normalised, mask (N,) bool, target (N,D) float32, target_valid (N,D) bool."""
    item, source = _video_and_mask(cfg, spec, sample, rng)
    target, target_valid = spec.build(source.inputs, cfg)
    return item | {"target": target, "target_valid": target_valid}


def pretrain_inputs(cfg, spec: TargetSpec, sample: ClipSample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """What the batch's targets are built from (`mme.datasets.batching`): video, mask, `luma` (F,H,W) for
    kinds without colour or `frames` (F,H,W,3), and for flow kinds `flow` (P,H,W,2) zero-padded to the kind's
    `flow_pairs` P, its real pairs `flow_pairs`, `cut_pairs` (P,) when the cuts are known, `backward`."""
    item, source = _video_and_mask(cfg, spec, sample, rng)
    inputs = source.inputs
    item |= {"frames": inputs.frames} if spec.needs_rgb else {"luma": inputs.gray}
    if inputs.flow is not None:
        pairs = spec.flow_pairs(TargetGeometry.from_cfg(cfg))
        item["flow"], real = pad_flow(inputs.flow, pairs)
        item["flow_pairs"] = torch.tensor(real)
        if inputs.cut_pairs is not None:
            item["cut_pairs"] = torch.cat([inputs.cut_pairs, torch.zeros(pairs - real, dtype=torch.bool)])
        if inputs.backward is not None:
            item["backward"] = pad_flow(inputs.backward, pairs)[0]
    return item


def _num_classes(lists_dir: Path, rows: list[tuple[str, int]]) -> int:
    try:
        return len(read_classes(lists_dir))
    except (FileNotFoundError, ValueError, KeyError):
        return max((label for _, label in rows), default=-1) + 1


class PretrainDataset(SharedEpoch, Dataset):
    """Pre-training clips of one split with their targets (docs/interfaces.md); `.skipped` lists dropped videos
    as (video, reason), which the stage names, lists and counts (`mme.utils.report_skipped`).

    targets=False: items carry what the targets are built from instead (`pretrain_inputs`); the batch's
    targets are then built at once by `mme.datasets.batching.build_targets` (the training stage's path).
    A worker keeps the flow caches' metadata and the frame counts it has read (they do not change).
    """

    def __init__(self, cfg, workdir: str | Path, split: str = "train", targets: bool = True):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.spec = get_target(cfg)
        self.targets = targets
        self._init_epoch()
        paths = Paths(workdir)
        dataset = cfg.data.dataset
        rows = read_list(paths.list_file(dataset, split))
        self.num_classes = _num_classes(paths.lists_dir(dataset), rows)
        self.skipped: list[tuple[str, str]] = []
        self.items: list[tuple[str, int, Path | None]] = []
        self._caches: dict[Path, FlowCache] = {}
        self._counts: dict[str, int] = {}
        self.decoded = DecodedEntries(workdir, dataset, cfg.data.short_side) if cfg.data.decoded_cache else None
        expected = expected_meta(cfg.flow.backend, cfg.flow.compensate_camera, cfg.data.short_side,
                                 backward=self.fb_check)
        for rel, label in rows:
            cache = None
            if self.spec.needs_flow:
                cache = flow_cache_path(workdir, dataset, rel)
                problem = cache_problem(cache, expected, deep=False)
                if problem is not None:
                    self.skipped.append((rel, f"flow cache {cache}: {problem}"))
                    continue
            self.items.append((rel, label, cache))
        if not self.items:
            raise FileNotFoundError(
                f"no video of {paths.list_file(dataset, split)} has a valid flow cache for target.kind="
                f"{cfg.target.kind} under {paths.flow_dir(dataset)} (backend {cfg.flow.backend}"
                f"{', with backward flow for target.fb_check' if self.fb_check else ''}); "
                f"run `mme extract --dataset {dataset}` first")

    @property
    def fb_check(self) -> bool:
        return bool(self.spec.needs_flow and self.cfg.target.fb_check)

    def __len__(self) -> int:
        return len(self.items)

    def flow_cache(self, path: Path) -> FlowCache:
        if path not in self._caches:
            self._caches[path] = load_flow(path)
        return self._caches[path]

    def load(self, index: int, rng: np.random.Generator) -> ClipSample:
        """The decoded, augmented clip of item `index` (for `__getitem__` and inspection)."""
        rel, _, cache_path = self.items[index]
        video = resolve_video(self.workdir, rel)
        if cache_path is not None:
            cache = self.flow_cache(cache_path)
            entry = self.decoded.get(rel, video, cache.meta, self.fb_check) if self.decoded else None
            source = entry or cache  # the same windows, from the mapped codes or the .npz
            backward = (lambda a, b: source.window(a, b, backward=True)) if self.fb_check else None
            return load_clip(self.cfg, self.spec, video, cache.num_pairs + 1, source.window, rng, cuts=cache.cuts,
                             backward_window=backward, frames_of=entry.frames if entry else None)
        entry = self.decoded.get(rel, video) if self.decoded else None
        if entry is not None:
            return load_clip(self.cfg, self.spec, video, entry.num_frames, None, rng, frames_of=entry.frames)
        sample = load_clip(self.cfg, self.spec, video, self._counts.get(rel), None, rng)
        self._counts[rel] = sample.num_video_frames
        return sample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = item_rng(self.cfg.seed, self.epoch, index)
        build = pretrain_item if self.targets else pretrain_inputs
        return build(self.cfg, self.spec, self.load(index, rng), rng)


def _dense_train(cfg, num_video_frames: int, rng: np.random.Generator) -> np.ndarray:
    span = clip_span(cfg.data.num_frames, cfg.data.stride)
    start = train_clip_start(num_video_frames, span, rng)
    return clip_indices(start, cfg.data.num_frames, cfg.data.stride, num_video_frames)


def _segment_train(cfg, num_video_frames: int, rng: np.random.Generator) -> np.ndarray:
    return segment_indices(num_video_frames, cfg.data.num_frames, rng)


def _dense_test(cfg, num_video_frames: int, index: int) -> list[np.ndarray]:  # noqa: ARG001  (same signature)
    span = clip_span(cfg.data.num_frames, cfg.data.stride)
    starts = test_clip_starts(num_video_frames, span, cfg.evaluate.num_clips)
    return [clip_indices(s, cfg.data.num_frames, cfg.data.stride, num_video_frames) for s in starts]


def _segment_test(cfg, num_video_frames: int, index: int) -> list[np.ndarray]:
    """The segment middles for the first clip; further clips draw a fixed random frame per segment."""
    clips = [segment_indices(num_video_frames, cfg.data.num_frames)]
    for c in range(1, cfg.evaluate.num_clips):
        clips.append(segment_indices(num_video_frames, cfg.data.num_frames, item_rng(cfg.seed, 0, index, c)))
    return clips


TRAIN_SAMPLING = {"dense": _dense_train, "segment": _segment_train}
TEST_SAMPLING = {"dense": _dense_test, "segment": _segment_test}


class VideoClsDataset(SharedEpoch, Dataset):
    """Labelled clips: `mode="train"` one random clip/crop; `mode="test"` num_clips x num_crops views (V,3,T,H,W).

    In train mode with `finetune.token_drop > 0` an item also has `mask` (N,) bool, True = token dropped:
    a tube mask of that ratio from the item's rng (reproducible per seed, epoch and index).
    It drops no listed video (download already left out the broken ones): one that cannot be read fails.
    """

    def __init__(self, cfg, workdir: str | Path, split: str, mode: str = "train"):
        if mode not in ("train", "test"):
            raise ValueError(f"VideoClsDataset mode must be 'train' or 'test', got {mode!r}")
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.mode = mode
        self._init_epoch()
        paths = Paths(workdir)
        self.items = read_list(paths.list_file(cfg.data.dataset, split))
        if not self.items:
            raise FileNotFoundError(f"video list {paths.list_file(cfg.data.dataset, split)} is empty; "
                                    f"run `mme download --dataset {cfg.data.dataset}`")
        self.num_classes = _num_classes(paths.lists_dir(cfg.data.dataset), self.items)
        self._counts: dict[str, int] = {}  # verified frame counts this process has read
        # The decoded cache holds the train split (what extract decodes); test views always decode.
        use_decoded = mode == "train" and split == "train" and cfg.data.decoded_cache
        self.decoded = DecodedEntries(workdir, cfg.data.dataset, cfg.data.short_side) if use_decoded else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        rel, label = self.items[index]
        video = resolve_video(self.workdir, rel)
        cfg = self.cfg
        if self.mode == "train":
            rng = item_rng(cfg.seed, self.epoch, index)
            entry = self.decoded.get(rel, video) if self.decoded else None
            if entry is not None:
                frames = entry.frames(TRAIN_SAMPLING[cfg.data.sampling](cfg, entry.num_frames, rng))
            else:
                info, frames = read_clip(video, lambda count: TRAIN_SAMPLING[cfg.data.sampling](cfg, count, rng),
                                         short_side=cfg.data.short_side, num_frames=self._counts.get(rel))
                self._counts[rel] = info.num_frames
            crop = sample_crop(*frames.shape[1:3], cfg.data.input_size, crop_scale(cfg), flip_prob=flip_prob(cfg),
                               rng=rng)
            clip = normalize(crop_frames(frames, crop))
            if cfg.finetune.token_drop > 0:  # drawn last: the clip itself does not depend on it
                mask = make_mask("tube", cfg.finetune.token_drop, TargetGeometry.from_cfg(cfg).grid, rng)
                return {"video": clip, "label": int(label), "index": int(index), "mask": torch.from_numpy(mask)}
        else:
            clips: list[np.ndarray] = []

            def indices(count: int) -> np.ndarray:  # every test clip's frames in one read
                clips.extend(TEST_SAMPLING[cfg.data.sampling](cfg, count, index))
                return np.concatenate(clips)

            _, frames = read_clip(video, indices, short_side=cfg.data.short_side, num_frames=self._counts.get(rel))
            views = []
            for part in np.split(frames, np.cumsum([len(c) for c in clips])[:-1]):
                for crop in spatial_crops(*part.shape[1:3], cfg.data.input_size, cfg.evaluate.num_crops):
                    views.append(normalize(crop_frames(part, crop)))
            clip = torch.stack(views)
        return {"video": clip, "label": int(label), "index": int(index)}
