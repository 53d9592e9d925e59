"""End to end on the smoke preset: pretrain -> finetune -> probe -> evaluate on the generated dataset.

Uses the real datasets and targets on the `extracted_workdir` fixture (videos, lists, flow caches) and
checks the files every stage promises, the MLflow runs and the pre-training run id carried downstream.
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from mme.config import ConfigError, load_config
from mme.models import read_checkpoint
from mme.utils import read_metrics


@pytest.fixture
def workdir(extracted_workdir, tmp_path, monkeypatch):
    pytest.importorskip("mme.datasets", reason="datasets not landed yet")
    targets = pytest.importorskip("mme.targets")
    if not hasattr(targets, "target_parts"):
        pytest.skip("mme.targets.target_parts not landed yet")
    shutil.copytree(extracted_workdir / "data", tmp_path / "data")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.slow
def test_four_stages_on_the_smoke_preset(workdir):
    from mme.stages import evaluate, finetune, pretrain, probe

    cfg = load_config("smoke")
    pre = pretrain.run(cfg, workdir)
    fine = finetune.run(cfg, workdir)
    lin = probe.run(cfg, workdir)
    test = evaluate.run(cfg, workdir)

    assert math.isfinite(pre["loss"]) and set(pre) >= {"loss_pos", "loss_shape"}  # traj: both parts logged
    pre_id = read_checkpoint(workdir / "models/pretrain/checkpoint.pt")["mlflow_run_id"]
    assert pre_id and fine["pretrain_run_id"] == lin["pretrain_run_id"] == test["pretrain_run_id"] == pre_id
    for stage in ("pretrain", "finetune"):
        assert (workdir / f"models/{stage}/last.pt").is_file() and (workdir / f"models/{stage}/checkpoint.pt").is_file()
        rows = list(csv.DictReader((workdir / f"reports/plots/{stage}.csv").open()))
        assert len(rows) == getattr(cfg, stage).epochs and all(math.isfinite(float(r["loss"])) for r in rows)
    assert "val_top1" in rows[0]
    # The probes train in memory on cached features (resume reuses those): the chosen heads' val curves.
    assert (workdir / "models/probe/checkpoint.pt").is_file() and (workdir / "models/probe/features.pt").is_file()
    rows = list(csv.DictReader((workdir / "reports/plots/probe.csv").open()))
    assert len(rows) == lin["epochs"] in (cfg.probe.epochs, 2 * cfg.probe.epochs)  # the chosen linear head
    assert all(math.isfinite(float(r["val_top1"])) for r in rows)
    assert float(rows[0]["attentive_val_top1"]) == lin["attentive_val_top1"]  # one val pass, at its last epoch
    assert {"top1", "val_top1", "attentive_top1", "lr", "attentive_lr"} <= set(lin)
    numbers = json.loads((workdir / "reports/metrics/evaluate.json").read_text())
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values())  # dvc metrics
    metrics = read_metrics(workdir / "reports/metrics/evaluate.json")
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and len(metrics["confusion"]) == len(
        metrics["per_class_accuracy"])
    assert sum(map(sum, metrics["confusion"])) == metrics["num_videos"] > 0
    assert (workdir / "reports/figures/confusion.png").stat().st_size > 1000

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mme-synthetic"], output_format="list")
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) >= {"pretrain", "finetune", "probe", "evaluate"}
    for stage in ("finetune", "probe", "evaluate"):
        assert by_stage[stage].data.tags["pretrain_run_id"] == pre_id
        assert by_stage[stage].data.params["pretrain_run_id"] == pre_id
    assert "loss_pos" in by_stage["pretrain"].data.metrics and "val_top1" in by_stage["finetune"].data.metrics


@pytest.mark.slow
def test_finetune_token_drop_trains_on_fewer_tokens_and_validates_on_all(workdir, monkeypatch):
    """finetune.token_drop (the paper's "reduced input patches of fine-tuning"): training batches reach the
    blocks with that share of the tube positions dropped, validation batches with every token."""
    from mme.stages import finetune, pretrain

    cfg = load_config("smoke", ["finetune.token_drop=0.5"])
    pretrain.run(cfg, workdir)
    seen: list[tuple[bool, int]] = []
    build = finetune.build_classifier

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        model.blocks[0].register_forward_hook(lambda mod, inp, _out: seen.append((mod.training, inp[0].shape[1])))
        return model

    monkeypatch.setattr(finetune, "build_classifier", spy)
    result = finetune.run(cfg, workdir)
    t, h, w = cfg.data.num_frames // 2, cfg.data.input_size // 16, cfg.data.input_size // 16
    assert {n for training, n in seen if training} == {t * round(0.5 * h * w)}
    assert {n for training, n in seen if not training} == {t * h * w}
    assert math.isfinite(result["loss"])


def test_finetune_validates_every_nth_epoch_and_after_the_last(workdir, monkeypatch):
    """finetune.val_every=2 over 3 epochs: val after epochs 2 and 3 (the last), nowhere else; the CSV leaves
    epoch 1's val cells empty and the metrics JSON still carries the last epoch's val top-1."""
    from mme.stages import finetune, pretrain

    cfg = load_config("smoke", ["finetune.epochs=3", "finetune.val_every=2"])
    pretrain.run(cfg, workdir)
    calls: list[int] = []
    evaluate = finetune.evaluate

    def counted(*args, **kwargs):
        calls.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(finetune, "evaluate", counted)
    result = finetune.run(cfg, workdir)
    rows = list(csv.DictReader((workdir / "reports" / "plots" / "finetune.csv").open()))
    assert len(calls) == 2
    assert [bool(r["val_top1"]) for r in rows] == [False, True, True]
    assert result["val_top1"] == float(rows[-1]["val_top1"])
    with pytest.raises(ConfigError, match="finetune.val_every"):
        load_config("smoke", ["finetune.val_every=0"])


@pytest.mark.slow
def test_compiled_pretraining_trains_the_same_model(workdir, tmp_path_factory):
    """`pretrain.compile` (torch.compile of the step's model) changes speed, not the model: in fp32 the
    compiled run's losses and weights equal the eager run's up to float rounding, and its checkpoint has
    the eager model's keys (no compile wrapper in them)."""
    import torch

    from mme.stages import pretrain

    compiled_dir = tmp_path_factory.mktemp("compiled")
    shutil.copytree(workdir / "data", compiled_dir / "data")
    base = ["pretrain.amp=off", "pretrain.epochs=2", "data.num_workers=0"]
    eager = pretrain.run(load_config("smoke", base), workdir)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = pretrain.run(load_config("smoke", [*base, "pretrain.compile=true"]), compiled_dir)
    assert counters["stats"]["unique_graphs"] > 0  # the step really went through torch.compile
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    weights = [read_checkpoint(d / "models/pretrain/checkpoint.pt")["model"] for d in (workdir, compiled_dir)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-4, msg=key)
