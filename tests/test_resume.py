"""Resume equivalence: N epochs straight == k epochs, a stop, and `--resume` (same weights, same losses).

Runs the real `pretrain` and `finetune` stages on small in-memory datasets (patched in for
`mme.datasets`), with drop path and mixup switched on so the restored RNG states matter.
"""

from __future__ import annotations

import csv
import sys
import types

import numpy as np
import pytest
import torch

import mme.datasets.batching  # noqa: F401  (the stage imports it while the fake `mme.datasets` is in place)
import mme.targets
from mme.config import load_config
from mme.engine import fit
from mme.engine.checkpointing import save_checkpoint
from mme.models import read_checkpoint
from mme.utils import read_metrics

PARTS = {"pos": 8, "shape": 12}


class MemoryPretrainSet(torch.utils.data.Dataset):
    """Fixed clips and targets; the mask depends on (seed, epoch, index) like the real dataset's."""

    num_classes = 3
    nan_epoch = -1  # targets become NaN in this epoch (the NaN-guard test)

    def __init__(self, cfg, workdir, split="train", size=8, targets=True):  # noqa: ARG002
        self.cfg, self.epoch = cfg, 0
        g = torch.Generator().manual_seed(1)
        frames, side = cfg.data.num_frames, cfg.data.input_size
        self.grid = (frames // 2, side // 16, side // 16)
        tokens = int(np.prod(self.grid))
        self.video = torch.randn(size, 3, frames, side, side, generator=g)
        self.target = torch.randn(size, tokens, sum(PARTS.values()), generator=g)
        self.valid = torch.rand(size, tokens, sum(PARTS.values()), generator=g) > 0.1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.video)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.cfg.seed, self.epoch, i])
        tokens = int(np.prod(self.grid))
        mask = np.zeros(tokens, dtype=bool)
        mask[rng.choice(tokens, round(self.cfg.mask.ratio * tokens), replace=False)] = True
        target = self.target[i] * (float("nan") if self.epoch == self.nan_epoch else 1.0)
        return {"video": self.video[i], "mask": torch.from_numpy(mask), "target": target,
                "target_valid": self.valid[i]}


class MemoryClsSet(torch.utils.data.Dataset):
    num_classes = 3

    def __init__(self, cfg, workdir, split, mode="train", size=8):  # noqa: ARG002
        g = torch.Generator().manual_seed(2 + len(split))
        self.views = cfg.evaluate.num_clips * cfg.evaluate.num_crops if mode == "test" else 0
        shape = (size, 3, cfg.data.num_frames, cfg.data.input_size, cfg.data.input_size)
        self.video, self.label = torch.randn(*shape, generator=g), torch.arange(size) % 3

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        video = self.video[i] if not self.views else self.video[i].expand(self.views, *self.video[i].shape)
        return {"video": video, "label": int(self.label[i]), "index": i}


@pytest.fixture
def memory_data(monkeypatch, tmp_path):
    fake = types.ModuleType("mme.datasets")
    fake.PretrainDataset, fake.VideoClsDataset = MemoryPretrainSet, MemoryClsSet
    monkeypatch.setitem(sys.modules, "mme.datasets", fake)
    monkeypatch.setattr(mme.targets, "target_parts", lambda _cfg: dict(PARTS), raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def stop_after(monkeypatch, module, epoch):
    """Make the stage die right after it saved `last.pt` for `epoch` completed epochs (the driver saves)."""
    def save_then_die(path, **kw):
        save_checkpoint(path, **kw)
        if path.name == "last.pt" and kw["epoch"] == epoch:
            raise KeyboardInterrupt("simulated kill")
    monkeypatch.setattr(module, "save_checkpoint", save_then_die)


def loss_columns(csv_path):
    rows = list(csv.DictReader(csv_path.open()))
    return [(r["epoch"], r["loss"], r["loss_pos"], r["lr"]) for r in rows]


def assert_same_models(a, b):
    sa, sb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.usefixtures("memory_data")
def test_pretrain_resume_equals_straight_run(tmp_path, monkeypatch):
    from mme.stages import pretrain

    cfg = load_config("smoke", ["pretrain.epochs=3", "pretrain.batch_size=2", "pretrain.warmup_epochs=1",
                                "model.drop_path=0.2", "pretrain.accum_steps=2"])
    straight = pretrain.run(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        stop_after(patch, fit, epoch=2)
        with pytest.raises(KeyboardInterrupt):
            pretrain.run(cfg, tmp_path / "resumed")
    assert read_checkpoint(tmp_path / "resumed/models/pretrain/last.pt")["step"] == 2 * 2  # 8 clips / (2 x 2)
    resumed = pretrain.run(cfg, tmp_path / "resumed", resume=True)
    assert_same_models(tmp_path / "straight/models/pretrain/checkpoint.pt",
                       tmp_path / "resumed/models/pretrain/checkpoint.pt")
    assert resumed["loss"] == straight["loss"] and resumed["loss_pos"] == straight["loss_pos"]
    losses = [loss_columns(tmp_path / run / "reports/plots/pretrain.csv") for run in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    metrics = read_metrics(tmp_path / "straight/reports/metrics/pretrain.json")
    assert set(metrics) >= {"loss", "loss_pos", "loss_shape", "mlflow_run_id"}


@pytest.mark.slow
@pytest.mark.usefixtures("memory_data")
def test_finetune_resume_equals_straight_run(tmp_path, monkeypatch):
    from mme.stages import finetune, pretrain

    cfg = load_config("smoke", ["pretrain.batch_size=4", "finetune.epochs=3", "finetune.batch_size=4",
                                "finetune.mixup=0.8", "finetune.cutmix=1.0", "model.drop_path=0.2"])
    pretrain.run(cfg, tmp_path / "pre")
    init = tmp_path / "pre/models/pretrain/checkpoint.pt"
    straight = finetune.run(cfg, tmp_path / "straight", init=init)
    with monkeypatch.context() as patch:
        stop_after(patch, fit, epoch=1)
        with pytest.raises(KeyboardInterrupt):
            finetune.run(cfg, tmp_path / "resumed", init=init)
    resumed = finetune.run(cfg, tmp_path / "resumed", resume=True)
    assert_same_models(tmp_path / "straight/models/finetune/checkpoint.pt",
                       tmp_path / "resumed/models/finetune/checkpoint.pt")
    assert resumed["loss"] == straight["loss"] and resumed["val_top1"] == straight["val_top1"]
    assert straight["pretrain_run_id"] == read_checkpoint(init)["mlflow_run_id"] == resumed["pretrain_run_id"]


@pytest.mark.usefixtures("memory_data")
def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from mme.engine.loops import NonFiniteLossError
    from mme.stages import pretrain

    monkeypatch.setattr(MemoryPretrainSet, "nan_epoch", 1)
    cfg = load_config("smoke", ["pretrain.epochs=3", "pretrain.batch_size=4"])
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* epoch 1"):
        pretrain.run(cfg, tmp_path)
    last = read_checkpoint(tmp_path / "models/pretrain/last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (tmp_path / "models/pretrain/checkpoint.pt").exists()
