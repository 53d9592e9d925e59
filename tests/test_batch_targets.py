"""The pre-training data path with targets built per batch (`mme.datasets.batching`) equals the per-item path.

A batch of `PretrainDataset(..., targets=False)` items, collated and built with one `build_batch` call (in this
process, as the training step does, or in the DataLoader's collate in worker processes), holds the same
video, mask, target and target_valid as the per-item `PretrainDataset` items of the same (seed, epoch, index),
on the generated smoke set (real decoding, real flow caches), with crops, flips and a video shorter than the
clip. Also: the shot-cut flags and the backward flow window delivered per item.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mme.config import load_config
from mme.data.transforms import crop_flow
from mme.datasets import PretrainDataset, item_rng
from mme.datasets.batching import TargetCollate, build_targets, collate_inputs
from mme.motion.cache import flow_cache_path, load_flow, save_flow
from mme.motion.shots import cut_free_starts
from mme.motion.tracking import resize_flow
from mme.targets import TargetGeometry

TOL = 1e-5
INDICES = [0, 3, 5, 6, 9, 12]


def assert_same_batch(got: dict, items: list[dict], what: str) -> None:
    assert set(got) == {"video", "mask", "target", "target_valid"}, what
    for b, item in enumerate(items):
        assert torch.equal(got["video"][b], item["video"]) and torch.equal(got["mask"][b], item["mask"]), what
        assert torch.equal(got["target_valid"][b], item["target_valid"]), (what, b)
        assert got["target"][b].dtype == torch.float32
        assert (got["target"][b] - item["target"]).abs().max() <= TOL, (what, b)


def batched(cfg, workdir, epoch: int, indices: list[int]) -> dict:
    inputs = PretrainDataset(cfg, workdir, targets=False)
    inputs.set_epoch(epoch)
    return build_targets(inputs.spec, cfg, collate_inputs([inputs[i] for i in indices]))


def per_item(cfg, workdir, epoch: int, indices: list[int]) -> list[dict]:
    dataset = PretrainDataset(cfg, workdir)
    dataset.set_epoch(epoch)
    return [dataset[i] for i in indices]


@pytest.mark.parametrize("kind, shuffled", [("traj", False), ("hog+traj_pos", False), ("pixel", False),
                                             ("traj_official", False), ("pixel", True), ("traj", True)])
def test_a_batch_equals_the_per_item_targets(extracted_workdir, kind, shuffled):
    cfg = load_config("smoke", [f"target.kind={kind}", "data.flip=on", f"data.shuffle_frames={str(shuffled).lower()}"])
    dataset = PretrainDataset(cfg, extracted_workdir)
    flips = [dataset.load(i, item_rng(cfg.seed, 1, i)).crop.flip for i in INDICES]
    assert any(flips) and not all(flips)  # the batch mixes flipped and plain crops
    for epoch in (0, 1):
        got = batched(cfg, extracted_workdir, epoch, INDICES)
        assert_same_batch(got, per_item(cfg, extracted_workdir, epoch, INDICES), f"{kind} epoch {epoch}")
    inputs = PretrainDataset(cfg, extracted_workdir, targets=False)[0]
    assert ("luma" in inputs) != ("frames" in inputs) and ("luma" in inputs) == (not dataset.spec.needs_rgb)


def test_a_clip_longer_than_the_video_batches_like_its_items(extracted_workdir):
    """stride 4 without interpolation: the last slot reads past the 32-frame video (padded flow, pair count)."""
    cfg = load_config("smoke", ["data.stride=4", "target.interpolate=false"])
    item = PretrainDataset(cfg, extracted_workdir, targets=False)[0]
    geo = TargetGeometry.from_cfg(cfg)
    assert int(item["flow_pairs"]) < len(item["flow"]) == PretrainDataset(cfg, extracted_workdir).spec.flow_pairs(geo)
    assert (item["flow"][int(item["flow_pairs"]):] == 0).all()
    got = batched(cfg, extracted_workdir, 0, [0, 1, 2])
    want = per_item(cfg, extracted_workdir, 0, [0, 1, 2])
    assert_same_batch(got, want, "short video")
    assert not got["target_valid"].view(3, 4, 16, -1)[:, -1].any()


def test_targets_built_in_loader_workers_equal_the_items_and_follow_the_epoch(extracted_workdir, smoke_cfg):
    """The collate in 2 persistent worker processes; `set_epoch` in this process reaches them."""
    dataset = PretrainDataset(smoke_cfg, extracted_workdir, targets=False)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True,
                        collate_fn=TargetCollate(dataset.spec, smoke_cfg))
    for epoch in (0, 2):
        dataset.set_epoch(epoch)
        first = next(iter(loader))
        assert_same_batch(first, per_item(smoke_cfg, extracted_workdir, epoch, [0, 1, 2, 3]), f"epoch {epoch}")


def rewrite_cache(workdir, rel: str, cuts: list[int] | None, backward: tuple[float, float] | None) -> np.ndarray:
    """Re-save one video's flow cache with the given cuts (None: no cut information) and a constant backward
    flow field; returns the forward flow."""
    path = flow_cache_path(workdir, "synthetic", rel)
    cache = load_flow(path)
    flow = cache.window(0, cache.num_pairs)
    layout = {"format_version", "num_pairs", "num_frames", "height", "width", "scale", "chunk_pairs", "clamped",
              "backward"}
    meta = {k: v for k, v in cache.meta.items() if k not in layout | {"cuts"}}
    if cuts is not None:
        meta["cuts"] = cuts
    back = None if backward is None else np.broadcast_to(np.float32(backward), flow.shape).copy()
    save_flow(path, flow, meta, backward=back)
    return flow


@pytest.fixture
def cut_workdir(tmp_path, extracted_workdir):
    shutil.copytree(extracted_workdir / "data", tmp_path / "data")
    return tmp_path


def test_cut_pairs_mark_the_pair_across_a_cut_and_avoid_cuts_samples_around_it(cut_workdir):
    cfg = load_config("smoke", ["data.avoid_cuts=false"])
    dataset = PretrainDataset(cfg, cut_workdir)
    rel, cut = dataset.items[0][0], 20
    rewrite_cache(cut_workdir, rel, [cut], None)
    rewrite_cache(cut_workdir, dataset.items[1][0], None, None)
    geo = TargetGeometry.from_cfg(cfg)
    pairs = dataset.spec.flow_pairs(geo)
    seen = 0
    for epoch in range(12):
        dataset.set_epoch(epoch)
        sample = dataset.load(0, item_rng(cfg.seed, epoch, 0))
        flags = sample.inputs.cut_pairs
        assert flags.shape == (len(sample.inputs.flow),) and flags.dtype == torch.bool
        want = torch.zeros_like(flags)
        if 0 <= cut - 1 - sample.start < len(flags):
            want[cut - 1 - sample.start] = True
            seen += 1
        assert torch.equal(flags, want), (epoch, sample.start)
    assert seen > 0  # some sampled windows span the cut
    unknown = dataset.load(1, item_rng(cfg.seed, 0, 1))
    assert unknown.inputs.cut_pairs is None
    items = [PretrainDataset(cfg, cut_workdir, targets=False)[i] for i in (0, 1)]
    assert "cut_pairs" not in items[1] and items[0]["cut_pairs"].shape == (pairs,)
    batch = collate_inputs(items)
    assert batch["cut_pairs"].shape == (2, pairs) and not batch["cut_pairs"][1].any()
    assert torch.equal(batch["cut_pairs"][0], items[0]["cut_pairs"])

    avoiding = PretrainDataset(load_config("smoke"), cut_workdir)
    span = dataset.spec.window(geo)
    free = set(cut_free_starts([cut], load_flow(avoiding.items[0][2]).num_pairs + 1, span).tolist())
    assert free
    for epoch in range(12):
        sample = avoiding.load(0, item_rng(cfg.seed, epoch, 0))
        assert sample.start in free and not sample.inputs.cut_pairs.any(), epoch


def test_backward_flow_is_delivered_and_augmented_like_the_flow(cut_workdir):
    cfg = load_config("smoke", ["target.fb_check=true", "data.flip=on"])
    plain = PretrainDataset(load_config("smoke"), cut_workdir)
    rel = plain.items[0][0]
    rewrite_cache(cut_workdir, rel, [], (2.0, 1.0))
    dataset = PretrainDataset(cfg, cut_workdir)
    assert [r for r, _, _ in dataset.items] == [rel] and len(dataset.skipped) == len(plain) - 1
    assert "backward" in dataset.skipped[0][1]
    flipped = []
    for epoch in range(8):
        sample = dataset.load(0, item_rng(cfg.seed, epoch, 0))
        back, flow = sample.inputs.backward, sample.inputs.flow
        assert back.shape == flow.shape
        raw = torch.full((len(back), *load_flow(dataset.items[0][2]).shape[1:3], 2), 1.0)
        raw[..., 0] = 2.0
        frames_hw = (cfg.data.short_side, cfg.data.short_side)  # the generated videos are square
        want = crop_flow(resize_flow(raw, *frames_hw), sample.crop)
        assert torch.allclose(back, want, atol=1e-5), epoch
        assert (back[..., 1] > 0).all()
        assert ((back[..., 0] < 0).all() if sample.crop.flip else (back[..., 0] > 0).all()), epoch
        flipped.append(sample.crop.flip)
    assert any(flipped) and not all(flipped)
    item = PretrainDataset(cfg, cut_workdir, targets=False)[0]
    assert item["backward"].shape == item["flow"].shape
