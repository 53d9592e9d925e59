"""Engine: lr scales of layer decay, no-decay groups, the schedule, mixup/cutmix on video, view averaging,
the NaN guard, gradient accumulation."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.data import Mixup

from mme.engine.distributed import DistEnv
from mme.engine.loops import (
    NonFiniteLossError,
    average_views,
    make_loader,
    predict,
    train_one_epoch,
    unique_by_index,
)
from mme.engine.optim import build_optimizer, build_scheduler, scaled_lr
from mme.engine.tracking import EpochRecorder
from mme.models import MaskedMotionPretrainer, VideoClassifier
from mme.stages.finetune import VideoMixup

SMALL = dict(img_size=32, num_frames=4, embed_dim=32, depth=2, num_heads=2)


def group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_layer_decay_scales_reach_the_actual_lrs():
    model = VideoClassifier(4, **SMALL)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scheduler = build_scheduler(optimizer, total_updates=10, warmup_updates=0, min_lr=0.0)
    scheduler.step_update(5)
    base = 1e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 10))
    expected = {model.patch_embed.proj.weight: 0.5 ** 3, model.blocks[0].attn.qkv.weight: 0.5 ** 2,
                model.blocks[1].mlp.fc1.weight: 0.5, model.head.weight: 1.0, model.fc_norm.weight: 1.0}
    for param, scale in expected.items():
        assert math.isclose(group_of(optimizer, param)["lr"], base * scale, rel_tol=1e-9)
    assert group_of(optimizer, model.blocks[0].attn.q_bias)["weight_decay"] == 0.0
    assert group_of(optimizer, model.blocks[0].norm1.weight)["weight_decay"] == 0.0
    assert group_of(optimizer, model.blocks[0].attn.qkv.weight)["weight_decay"] == 0.05


def test_pretrainer_no_decay_groups_and_warmup_cosine_schedule():
    model = MaskedMotionPretrainer({"t": 4}, **SMALL, decoder_dim=16, decoder_num_heads=2)
    optimizer = build_optimizer(model, lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert group_of(optimizer, model.mask_token)["weight_decay"] == 0.0
    assert group_of(optimizer, model.decoder.head.bias)["weight_decay"] == 0.0
    assert group_of(optimizer, model.decoder.head.weight)["weight_decay"] == 0.05
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    scheduler = build_scheduler(optimizer, total_updates=20, warmup_updates=4, min_lr=1e-5)
    lrs = []
    for step in range(21):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and math.isclose(lrs[2], 1e-3) and math.isclose(lrs[4], 2e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and math.isclose(lrs[20], 1e-5)
    assert scaled_lr(1.5e-4, 512) == pytest.approx(3e-4)


def test_mixup_targets_sum_to_one_and_cutmix_box_spans_h_w_of_every_frame():
    np.random.seed(0)
    video = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1, 1).expand(4, 3, 4, 16, 16).clone()
    labels = torch.tensor([0, 1, 2, 3])
    mixed, target = VideoMixup(Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=5, label_smoothing=0.1))(
        video, labels)
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    cutmix = VideoMixup(Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=5, label_smoothing=0.0))
    for _ in range(5):
        mixed, target = cutmix(video, labels)
        torch.testing.assert_close(target.sum(1), torch.ones(4))
        pasted = mixed[0] != video[0]  # clip 0 receives clip 3 inside the box
        assert (pasted == pasted[:1, :1]).all(), "the box must be the same on every channel and frame"
        rows, cols = pasted[0, 0].any(1), pasted[0, 0].any(0)
        box = pasted[0, 0][rows][:, cols]
        assert box.all(), "the pasted region is one H x W rectangle"
        lam = 1 - float(pasted[0, 0].float().mean())
        torch.testing.assert_close(target[0, 0], torch.tensor(lam))  # label weight = unpasted area


def test_view_averaging_is_over_the_views_of_each_video():
    logits = torch.tensor([[[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]], [[0.0, 5.0], [0.0, 5.0], [5.0, 0.0]]])
    probs = average_views(logits)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert probs.argmax(1).tolist() == [0, 1]

    class ViewClass(nn.Module):  # logits = one-hot of the clip's constant pixel value
        def forward(self, x):
            return 10.0 * nn.functional.one_hot(x.flatten(1)[:, 0].long(), 4).float()

    # video b: views of class b, b, b+1 (so only averaging within a video predicts b)
    videos = torch.stack([torch.stack([torch.full((3, 2, 4, 4), float(c)) for c in (b, b, b + 1)]) for b in range(3)])
    batches = [{"video": videos[:2], "label": torch.tensor([0, 1]), "index": torch.tensor([0, 1])},
               {"video": videos[2:], "label": torch.tensor([2]), "index": torch.tensor([2])}]
    probs, labels, index = predict(ViewClass(), batches, torch.device("cpu"), show_progress=False)
    assert probs.argmax(1).tolist() == [0, 1, 2] and index.tolist() == [0, 1, 2]
    torch.testing.assert_close(probs[0, :2], torch.tensor([2 / 3, 1 / 3]), atol=1e-3, rtol=0)
    out, _, idx = unique_by_index(torch.arange(5.0)[:, None], torch.zeros(5), torch.tensor([3, 1, 3, 0, 1]))
    assert idx.tolist() == [0, 1, 3] and out.flatten().tolist() == [3.0, 1.0, 0.0]


class Regression(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"video": self.x[i], "label": self.y[i]}


def mse(model, batch):
    return nn.functional.mse_loss(model(batch["video"]), batch["label"]), {}


def one_epoch(batch_size, accum, loss_fn=mse, updates=1):
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    loader = make_loader(Regression(), DistEnv(), batch_size=batch_size, shuffle=False, seed=0, num_workers=0,
                         drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, 10, 0, 0.1)
    stats = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, epoch=0, updates_per_epoch=updates,
                            device=torch.device("cpu"), accum_steps=accum, show_progress=False)
    return model, stats


def test_gradient_accumulation_equals_the_big_batch():
    big, stats = one_epoch(batch_size=4, accum=1)
    small, _ = one_epoch(batch_size=2, accum=2)
    torch.testing.assert_close(big.weight, small.weight)
    assert stats["clips"] == 4 and stats["clips_per_s"] > 0


def test_nan_guard_stops_before_the_bad_update():
    calls = []

    def nan_on_second(model, batch):
        loss, parts = mse(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), parts

    reference, _ = one_epoch(batch_size=2, accum=1, updates=1)
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*last good checkpoint"):
        one_epoch(batch_size=2, accum=1, loss_fn=nan_on_second, updates=3)
    assert len(calls) == 2


def test_epoch_recorder_rewrites_csv_with_history(tmp_path):
    recorder = EpochRecorder(tmp_path / "plots" / "x.csv", rows=[{"epoch": 0, "loss": 2.0}])
    recorder.record(1, {"loss": 1.0, "val_top1": 50.0})
    rows = list(csv.DictReader((tmp_path / "plots" / "x.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[1]["val_top1"] == "50.0" and rows[0]["val_top1"] == ""


def test_per_clip_top1_agrees_with_top1_accuracy_under_ties():
    """bf16 logits can tie: the class a per-clip record counts must be the one `topk_accuracy` counts, so a
    record's mean equals the reported top-1 (argmax and topk may break a tie differently)."""
    from mme.engine.loops import topk_accuracy
    from mme.reports import per_clip
    from mme.stages.evaluate import confusion_matrix, top1_predictions

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(400, 6, generator=g).to(torch.bfloat16).float()
    probs[:200, 3] = probs[:200, 1] = probs[:200].max(dim=1).values + 0.1  # classes 1 and 3 tie on half
    labels = torch.randint(0, 6, (400,), generator=g)
    labels[:100], labels[100:200] = 1, 3
    record = per_clip.from_predictions([str(i) for i in range(400)], labels.tolist(),
                                       {"ft_top1": top1_predictions(probs).tolist()})
    top1 = topk_accuracy(probs, labels)["top1"]
    assert 100.0 * record.correct["ft_top1"].mean() == pytest.approx(top1)
    assert 100.0 * float(confusion_matrix(probs, labels, 6).diagonal().sum()) / 400 == pytest.approx(top1)


def test_training_threads_beside_loader_workers(monkeypatch):
    """Busy workers (pre-training's crops and flow, inference's decoding) leave the training process the
    cores they do not take, at least one; light workers (fine-tuning's decode-only items) leave it every core;
    the loader made sets the process's torch threads."""
    from torch.utils.data import TensorDataset

    import mme.engine.loops as loops

    assert [loops.main_threads(w, cores=2) for w in (0, 1, 2, 4)] == [2, 1, 1, 1]
    assert [loops.main_threads(w, cores=2, light_workers=True) for w in (1, 2)] == [2, 2]
    assert loops.main_threads(2, cores=16) == 14
    monkeypatch.setattr(loops.os, "sched_getaffinity", lambda pid: {0, 1, 2})  # noqa: ARG005
    before = torch.get_num_threads()
    try:
        data = TensorDataset(torch.zeros(4, 1))
        loops.make_loader(data, DistEnv(), batch_size=2, shuffle=False, seed=0, num_workers=2, drop_last=False)
        assert torch.get_num_threads() == 1
        loops.make_loader(data, DistEnv(), batch_size=2, shuffle=False, seed=0, num_workers=2, drop_last=False,
                          light_workers=True)
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on this host share its cores
        assert loops.main_threads(2, light_workers=True) == 1 and loops.main_threads(0) == 1
    finally:
        torch.set_num_threads(before)


def test_bf16_on_a_device_without_native_bf16_warns_once_and_names_the_fix(monkeypatch):
    import warnings

    from mme.engine import loops

    cpu = torch.device("cpu")
    monkeypatch.setattr(loops, "native_bf16", lambda _type: False)
    loops._warn_emulated_bf16.cache_clear()
    with pytest.warns(UserWarning, match="pretrain.amp=off and finetune.amp=off") as caught:
        assert loops.amp_dtype("bf16", cpu) is torch.bfloat16  # still the requested precision
        loops.amp_dtype("bf16", cpu)
    assert len([w for w in caught if "native bf16" in str(w.message)]) == 1
    monkeypatch.setattr(loops, "native_bf16", lambda _type: True)
    loops._warn_emulated_bf16.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loops.amp_dtype("bf16", cpu) is torch.bfloat16 and loops.amp_dtype("off", cpu) is None
    loops._warn_emulated_bf16.cache_clear()


def test_the_platform_names_the_bf16_kind_from_the_cpu_flags(monkeypatch, tmp_path):
    """Stored results name their hardware: the bf16 kind is read from the CPU's flags (AMX first)."""
    import builtins

    from mme.engine import loops

    real_open = builtins.open
    for flags, kind in (("avx2 amx_bf16 avx512_bf16", "amx"), ("avx2 avx512_bf16", "avx512_bf16"),
                        ("avx2 fma", "emulated")):
        info = tmp_path / "cpuinfo"
        info.write_text(f"model name\t: Test CPU\nflags\t\t: {flags}\n\nflags\t\t: amx_bf16\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, _i=info, **k: real_open(
            _i if p == "/proc/cpuinfo" else p, *a, **k))
        monkeypatch.setattr(loops.torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(loops, "native_bf16", lambda _dev: False)
        loops.compute_platform.cache_clear()
        assert loops.compute_platform() == {"device": "cpu", "cpu": "Test CPU", "bf16": kind,
                                            "torch": loops.torch.__version__}
    loops.compute_platform.cache_clear()
