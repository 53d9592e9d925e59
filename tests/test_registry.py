"""One source of truth for names: a new target kind is one registry entry, nothing else.

A dummy kind (the per-token mean colour of the input tube) is added to `TARGETS` only; the config accepts
it, a pre-training item carries its target and a pre-training step trains on it.
"""

from __future__ import annotations

import pytest
import torch

from mme.config import ConfigError, load_config
from mme.models import build_pretrainer
from mme.targets import TARGETS, PartValue, TargetBatch, TargetGeometry, TargetSpec
from mme.targets.appearance import PIXEL_SCALE, tube_pixels


class MeanColourTarget(TargetSpec):
    name = "dummy_mean_colour"

    def parts(self, cfg) -> dict[str, int]:  # noqa: ARG002
        return {"colour": 3}

    needs_rgb = True

    def compute(self, inputs: TargetBatch, geo: TargetGeometry) -> list[PartValue]:
        clip = inputs.rgb[:, inputs.rows(geo.input_offsets)] / PIXEL_SCALE
        pixels = tube_pixels(clip, geo)  # (B, N, tubelet * patch^2 * 3), channels last
        return [PartValue("colour", pixels.reshape(*pixels.shape[:2], -1, 3).mean(dim=2), standardize=False)]


@pytest.fixture
def dummy_kind(monkeypatch):
    monkeypatch.setitem(TARGETS, MeanColourTarget.name, MeanColourTarget())  # the one and only edit
    return MeanColourTarget.name


def test_unregistered_kind_is_refused_with_the_registry_names():
    with pytest.raises(ConfigError, match=r"target.kind='dummy_mean_colour' is not allowed; choose one of .*traj"):
        load_config("smoke", ["target.kind=dummy_mean_colour"])


def test_a_registered_kind_runs_through_config_dataset_and_a_pretrain_step(dummy_kind, extracted_workdir):
    from mme.datasets import PretrainDataset

    cfg = load_config("smoke", [f"target.kind={dummy_kind}"])
    assert cfg.target.kind == dummy_kind
    dataset = PretrainDataset(cfg, extracted_workdir, "train")
    items = [dataset[i] for i in range(2)]
    tokens = (cfg.data.num_frames // 2) * (cfg.data.input_size // 16) ** 2
    for item in items:
        assert item["target"].shape == (tokens, 3) and item["target_valid"].all()
        assert 0.0 <= item["target"].min() and item["target"].max() <= 1.0  # mean colours of [0, 1] pixels
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    model = build_pretrainer(cfg)
    assert dict(model.target_parts) == {"colour": 3}
    pred = model(batch["video"], batch["mask"])
    assert set(pred) == {"colour"} and pred["colour"].shape[-1] == 3
    loss, parts = model.forward_loss(pred, batch["target"], batch["target_valid"], batch["mask"])
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"colour"}
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
