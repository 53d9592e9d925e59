"""PretrainDataset / VideoClsDataset on the generated smoke set (real MP4 decoding, real flow cache)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mme.config import load_config
from mme.datasets import PretrainDataset, VideoClsDataset
from mme.motion.cache import flow_cache_path
from mme.targets import TargetGeometry, target_parts


@pytest.fixture
def workdir_copy(tmp_path, extracted_workdir):
    shutil.copytree(extracted_workdir / "data", tmp_path / "data")
    return tmp_path


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_pretrain_item_has_the_documented_shapes_and_is_deterministic(extracted_workdir, smoke_cfg):
    dataset = PretrainDataset(smoke_cfg, extracted_workdir)
    assert len(dataset) == 16 and not dataset.skipped and dataset.num_classes == 12
    item = dataset[1]
    geo = TargetGeometry.from_cfg(smoke_cfg)
    tokens, width = geo.num_tokens, sum(target_parts(smoke_cfg).values())
    assert item.keys() == {"video", "mask", "target", "target_valid"}
    assert item["video"].shape == (3, 8, 64, 64) and item["video"].dtype == torch.float32
    assert item["mask"].shape == (tokens,) and item["mask"].dtype == torch.bool
    t, h, w = geo.grid
    assert int(item["mask"].sum()) == t * round(smoke_cfg.mask.ratio * h * w)  # tube: exact count per slot
    assert (item["mask"].view(t, h * w) == item["mask"].view(t, h * w)[0]).all()
    assert item["target"].shape == item["target_valid"].shape == (tokens, width)
    assert item["target"].dtype == torch.float32 and item["target_valid"].dtype == torch.bool
    assert torch.isfinite(item["target"]).all() and (item["target"][~item["target_valid"]] == 0).all()
    assert item["target_valid"].float().mean() > 0.5
    assert_same(item, dataset[1])
    assert_same(item, PretrainDataset(smoke_cfg, extracted_workdir)[1])  # a fresh instance (another worker)
    dataset.set_epoch(1)
    assert not torch.equal(item["video"], dataset[1]["video"])


def test_items_are_the_same_in_dataloader_workers(extracted_workdir, smoke_cfg):
    dataset = PretrainDataset(smoke_cfg, extracted_workdir)
    dataset.set_epoch(3)
    loaded = next(iter(DataLoader(dataset, batch_size=2, num_workers=2)))
    for i in range(2):
        assert_same({k: v[i] for k, v in loaded.items()}, dataset[i])


def test_shuffle_frames_permutes_only_the_input_order(extracted_workdir):
    """traj reads flow a shuffled video does not have: its targets keep the real order."""
    plain = PretrainDataset(load_config("smoke"), extracted_workdir)[2]
    shuffled = PretrainDataset(load_config("smoke", ["data.shuffle_frames=true"]), extracted_workdir)[2]
    assert torch.equal(plain["target"], shuffled["target"]) and torch.equal(plain["mask"], shuffled["mask"])
    frames_plain = plain["video"].transpose(0, 1).flatten(1)
    frames_shuffled = shuffled["video"].transpose(0, 1).flatten(1)
    order = [int(torch.nonzero((frames_plain == f).all(1))[0]) for f in frames_shuffled]
    assert sorted(order) == list(range(8)) and order != list(range(8))


def test_shuffled_pixel_targets_are_the_shuffled_clips_own(extracted_workdir):
    """VideoMAE on a frame-shuffled video (the paper's Fig. 3) reconstructs the frames as shown: the pixel
    target of a shuffled item is the pixel target of its own (shuffled) input clip, not the real order's."""
    from mme.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from mme.targets import TargetInputs, get_target

    overrides = ["target.kind=pixel", "target.patch_norm=false"]
    plain = PretrainDataset(load_config("smoke", overrides), extracted_workdir)[2]
    cfg = load_config("smoke", [*overrides, "data.shuffle_frames=true"])
    shuffled = PretrainDataset(cfg, extracted_workdir)[2]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    shown = ((shuffled["video"] * std + mean) * 255).permute(1, 2, 3, 0)  # (T, H, W, 3) as shown, 0..255
    offsets = torch.tensor(TargetGeometry.from_cfg(cfg).input_offsets)
    own, _ = get_target(cfg).build(TargetInputs(shown, offsets), cfg)
    assert (shuffled["target"] - own).abs().max() < 1e-4
    assert (shuffled["target"] - plain["target"]).abs().max() > 0.1  # not the real order's target
    assert get_target(cfg).follows_shuffle(TargetGeometry.from_cfg(cfg))
    assert not get_target(load_config("smoke")).follows_shuffle(TargetGeometry.from_cfg(cfg))  # traj: flow


def test_missing_flow_caches_are_skipped_and_named(workdir_copy, smoke_cfg):
    dataset = PretrainDataset(smoke_cfg, workdir_copy)
    rel = dataset.items[0][0]
    flow_cache_path(workdir_copy, "synthetic", rel).unlink()
    reduced = PretrainDataset(smoke_cfg, workdir_copy)
    assert len(reduced) == len(dataset) - 1 and reduced.skipped[0][0] == rel
    assert "missing" in reduced.skipped[0][1]
    assert len(PretrainDataset(load_config("smoke", ["target.kind=pixel"]), workdir_copy)) == len(dataset)
    shutil.rmtree(workdir_copy / "data" / "flow")
    with pytest.raises(FileNotFoundError, match="mme extract --dataset synthetic"):
        PretrainDataset(smoke_cfg, workdir_copy)


def test_a_clip_longer_than_the_video_marks_the_trajectories_past_its_end_invalid(extracted_workdir):
    # stride 4, no interpolation: the last slot needs frames up to 24 + 4*4 = 40 of a 32-frame video
    cfg = load_config("smoke", ["data.stride=4", "target.interpolate=false"])
    item = PretrainDataset(cfg, extracted_workdir)[0]
    valid = item["target_valid"].view(4, 16, -1)
    assert torch.isfinite(item["target"]).all()
    assert valid[0].float().mean() > 0.5 and not valid[-1].any()


def test_pretrain_stride_samples_pre_training_clips_only(extracted_workdir, smoke_cfg):
    """Table 7d: `pretrain.stride=4` pre-trains on exactly the clips and targets of `data.stride=4`, while the
    fine-tuning clips keep `data.stride` (smoke: 2); equal to `data.stride` it is the default run."""
    own = load_config("smoke", ["pretrain.stride=4"])
    item = PretrainDataset(own, extracted_workdir)[0]
    assert_same(item, PretrainDataset(load_config("smoke", ["data.stride=4"]), extracted_workdir)[0])
    default = PretrainDataset(smoke_cfg, extracted_workdir)[0]
    assert not torch.equal(item["video"], default["video"])
    assert_same(PretrainDataset(load_config("smoke", ["pretrain.stride=2"]), extracted_workdir)[0], default)
    ft_own, ft_default = (VideoClsDataset(cfg, extracted_workdir, "train", "train")[0] for cfg in (own, smoke_cfg))
    assert_same(ft_own, ft_default)
    with pytest.raises(ValueError, match=r"pretrain.stride=17 is out of range \[0, 16\]"):
        load_config("smoke", ["pretrain.stride=17"])


@pytest.mark.parametrize("kind", ["pixel", "hog+hof", "motionmae"])
def test_baseline_kinds_load(extracted_workdir, kind):
    cfg = load_config("smoke", [f"target.kind={kind}"])
    item = PretrainDataset(cfg, extracted_workdir)[0]
    assert item["target"].shape == (64, sum(target_parts(cfg).values()))
    assert torch.isfinite(item["target"]).all()


def test_classification_dataset_train_and_test_views(extracted_workdir):
    cfg = load_config("smoke", ["evaluate.num_clips=2", "evaluate.num_crops=3"])
    train = VideoClsDataset(cfg, extracted_workdir, "train", "train")
    item = train[0]
    assert item["video"].shape == (3, 8, 64, 64) and isinstance(item["label"], int) and item["index"] == 0
    assert torch.equal(item["video"], train[0]["video"])
    test = VideoClsDataset(cfg, extracted_workdir, "val", "test")
    views = test[1]["video"]
    assert views.shape == (6, 3, 8, 64, 64) and test.num_classes == 12
    assert not torch.equal(views[0], views[3])  # two clips at different times
    segment = VideoClsDataset(load_config("smoke", ["data.sampling=segment"]), extracted_workdir, "train")
    assert segment[0]["video"].shape == (3, 8, 64, 64)
    with pytest.raises(ValueError):
        VideoClsDataset(cfg, extracted_workdir, "val", "eval")
    assert np.isfinite(views.numpy()).all()


def test_classification_train_items_carry_a_tube_mask_for_token_drop(extracted_workdir):
    cfg = load_config("smoke", ["finetune.token_drop=0.5"])
    train = VideoClsDataset(cfg, extracted_workdir, "train", "train")
    item = train[3]
    t, side = 4, 4  # smoke: 8 frames / tubelet 2, 64 px / patch 16
    mask = item["mask"].numpy().reshape(t, side * side)
    assert mask.dtype == bool and (mask == mask[0]).all() and mask[0].sum() == round(0.5 * side * side)
    assert torch.equal(item["mask"], train[3]["mask"])  # reproducible per (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(item["mask"], train[3]["mask"])
    plain = VideoClsDataset(load_config("smoke"), extracted_workdir, "train", "train")[3]
    assert "mask" not in plain and torch.equal(plain["video"], item["video"])  # drawn after the clip
    assert "mask" not in VideoClsDataset(cfg, extracted_workdir, "val", "test")[0]
