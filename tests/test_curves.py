"""Learning curves: pre-training snapshots are the weights after that many epochs, the curve probes each one
and the untrained encoder on the same test clips, and an interrupted curve resumes without re-probing."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mme.engine.checkpointing import FINAL
from mme.engine.fit import snapshot_path
from mme.paths import Paths
from mme.stages import curves

EPOCHS = 2
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "learning_curves.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("learning_curves_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_snapshots_and_curve_rows(tmp_path, extracted_workdir, monkeypatch):
    cli = load_cli()
    out = tmp_path / "curve.csv"
    cli.main(["--data", str(extracted_workdir), "--kinds", "traj", "--epochs", str(EPOCHS), "--snapshots", "1",
              "--preset", "smoke", "--root", str(tmp_path / "runs"), "--out", str(out)])
    (workdir,) = (tmp_path / "runs").glob("traj-s0-*")  # one directory per encoder config
    paths = Paths(workdir)
    first, last = (torch.load(snapshot_path(paths, "pretrain", e), weights_only=False) for e in (1, EPOCHS))
    final = torch.load(paths.models_dir("pretrain") / FINAL, weights_only=False)
    assert first["epoch"] == 1 and last["epoch"] == EPOCHS
    for key, value in final["model"].items():  # the last snapshot IS the final model
        assert torch.equal(value, last["model"][key]), key
    assert any(not torch.equal(v, first["model"][k]) for k, v in final["model"].items())  # epoch 2 trained on

    rows = list(csv.DictReader(out.open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, EPOCHS]
    floor = rows[0]
    assert float(floor["probe_top1_vs_random"]) == 0.0  # the untrained encoder against itself
    for row in rows:
        assert float(row["probe_top1_low"]) <= float(row["probe_top1"]) <= float(row["probe_top1_high"])
        assert int(row["test_clips"]) == int(floor["test_clips"]) > 0

    kept = tmp_path / "curve" / "traj-s0.json"  # beside the CSV, for committing with it
    store = json.loads(kept.read_text())
    assert set(store) == {"encoder", "pretrain", "0", "1", str(EPOCHS)}

    def no_probe(*_a, **_k):
        raise AssertionError("a probed point was probed again")

    with monkeypatch.context() as patch:
        patch.setattr(curves, "probe_point", no_probe)
        again = curves.curve("smoke", [], "traj", 0, EPOCHS, [1], tmp_path / "runs", extracted_workdir, store=kept)
    assert again == store
    # A fresh clone holds only the committed file: it rebuilds the curve without pre-training again.
    with monkeypatch.context() as patch:
        from mme.stages import pretrain

        patch.setattr(curves, "probe_point", no_probe)
        patch.setattr(pretrain, "run", no_probe)
        elsewhere = curves.curve("smoke", [], "traj", 0, EPOCHS, [1], tmp_path / "clone", extracted_workdir,
                                 store=kept)
    assert elsewhere == store and not list((tmp_path / "clone").glob("traj-s0-*/models"))

    # Another probe recipe re-fits the heads of every point on the features each point cached.
    from mme.stages import probe

    monkeypatch.setattr(probe, "compute_features", lambda *_a, **_k: no_probe())
    refit = curves.curve("smoke", ["probe.epochs=2"], "traj", 0, EPOCHS, [1], tmp_path / "runs", extracted_workdir,
                         store=kept)
    assert all(refit[k]["recipe"] != store[k]["recipe"] for k in ("0", "1", str(EPOCHS)))
    assert {refit[k]["metrics"]["epochs"] for k in ("0", "1")} <= {2, 4}


def test_finetune_points_start_from_their_snapshot_and_pair_with_scratch(tmp_path, extracted_workdir, monkeypatch):
    cli = load_cli()
    out, root = tmp_path / "curve.csv", tmp_path / "runs"
    argv = ["--data", str(extracted_workdir), "--kinds", "traj", "--epochs", str(EPOCHS), "--snapshots", "1",
            "--preset", "smoke", "--root", str(root), "--out", str(out), "--finetune", "--set", "finetune.epochs=1"]
    from mme.stages import finetune

    inits, real = [], finetune.run
    monkeypatch.setattr(finetune, "run",
                        lambda cfg, workdir, **kw: inits.append(str(kw["init"])) or real(cfg, workdir, **kw))
    cli.main(argv)
    (workdir,) = root.glob("traj-s0-*")
    snapshots = Paths(workdir)
    assert inits == ["none", *(str(snapshot_path(snapshots, "pretrain", e)) for e in (1, EPOCHS))]
    rows = list(csv.DictReader(out.open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, EPOCHS]
    assert float(rows[0]["ft_top1_vs_random"]) == 0.0  # scratch against itself
    for row in rows:
        assert float(row["ft_top1_low"]) <= float(row["ft_top1"]) <= float(row["ft_top1_high"])
        gap = float(row["ft_top1"]) - float(rows[0]["ft_top1"])
        assert abs(float(row["ft_top1_vs_random"]) - gap) < 1e-6  # paired on the same clips
    scratch = Paths(workdir / "points" / "e0").models_dir("finetune_scratch") / FINAL
    tuned = Paths(workdir / "points" / "e1").models_dir("finetune") / FINAL
    assert scratch.is_file() and tuned.is_file()
    def no_finetune(*_a, **_k):
        raise AssertionError("a fine-tuned point was fine-tuned again")

    monkeypatch.setattr(curves, "finetune_point", no_finetune)
    again = curves.curve("smoke", ["finetune.epochs=1"], "traj", 0, EPOCHS, [1], root, extracted_workdir, finetune=True,
                         store=cli.points_file(out, "traj", 0))
    assert set(again["finetune"]) == {"0", "1", str(EPOCHS)}


def test_a_curve_of_another_config_neither_reuses_nor_overwrites_one_kept(tmp_path, extracted_workdir):
    """Other pre-training keys are another curve: they must not be answered by the kept points of the first
    (the old store was keyed by kind and seed only, so `--set pretrain.base_lr=...` returned the old curve),
    nor share its checkpoint, nor drop the rows of the curves kept beside it from the CSV."""
    cli = load_cli()
    out, root = tmp_path / "curve.csv", tmp_path / "runs"
    argv = ["--data", str(extracted_workdir), "--epochs", "1", "--snapshots", "--preset", "smoke", "--root",
            str(root), "--out", str(out)]
    cli.main([*argv, "--kinds", "traj", "pixel"])
    kept = cli.points_file(out, "traj", 0)
    before = kept.read_text()
    with pytest.raises(ValueError, match=r"pretrain\.base_lr \(0\.00\d+ there, 0\.5 here\)"):
        cli.main([*argv, "--kinds", "traj", "--set", "pretrain.base_lr=0.5"])
    # beside a kept pixel curve of the default config, another config's traj is refused too
    kept.unlink()
    with pytest.raises(ValueError, match=r"pixel-s0\.json holds a curve of another config: pretrain\.base_lr"):
        cli.main([*argv, "--kinds", "traj", "--set", "pretrain.base_lr=0.5"])
    kept.write_text(before)
    assert sorted(p.name.rpartition("-")[0] for p in root.iterdir()) == ["pixel-s0", "traj-s0"]

    # the same config into another CSV trains in its own directory; rows of a curve of one kind keep the other
    other = tmp_path / "fast.csv"
    cli.main([*argv[:-1], str(other), "--kinds", "traj", "--set", "pretrain.base_lr=0.5"])
    assert len(list(root.glob("traj-s0-*"))) == 2
    interrupted = cli.points_file(out, "shuffled", 0)  # a curve stopped before its floor was probed
    interrupted.write_text(json.dumps({"encoder": json.loads(kept.read_text())["encoder"], "pretrain": {}}))
    cli.main([*argv, "--kinds", "pixel"])  # all kept: trains nothing, rewrites the CSV from both curves
    assert {r["kind"] for r in csv.DictReader(out.open())} == {"traj", "pixel"}
    assert kept.read_text() == before
