"""A training stage resumes by itself (what an interrupted `dvc repro` needs) only when that is safe.

Without `--resume`/`--no-resume` (`resume=None`, the command line's default) a stage continues from
`models/<stage>/last.pt` when the file is an unfinished run written under the same resolved parameters,
and then ends equal to a straight run; a changed result key, or a finished run, starts over with a
one-line reason. Uses test_resume.py's in-memory datasets and its simulated kill.
"""

from __future__ import annotations

import csv

import pytest
from test_resume import assert_same_models, loss_columns, memory_data, stop_after  # noqa: F401

from mme.cli import build_parser, stage_options
from mme.config import load_config
from mme.engine import fit
from mme.engine.checkpointing import result_mismatches
from mme.models import read_checkpoint

CFG = ["pretrain.epochs=3", "pretrain.batch_size=2", "pretrain.warmup_epochs=1", "model.drop_path=0.2"]


def interrupted_pretrain(cfg, workdir, monkeypatch, after=1):
    from mme.stages import pretrain

    with monkeypatch.context() as patch:
        stop_after(patch, fit, epoch=after)
        with pytest.raises(KeyboardInterrupt):
            pretrain.run(cfg, workdir)
    assert read_checkpoint(workdir / "models/pretrain/last.pt")["epoch"] == after


@pytest.mark.slow
@pytest.mark.usefixtures("memory_data")
def test_an_interrupted_run_continues_by_itself_and_equals_a_straight_run(tmp_path, monkeypatch, capsys):
    from mme.stages import pretrain

    cfg = load_config("smoke", CFG)
    pretrain.run(cfg, tmp_path / "straight")
    interrupted_pretrain(cfg, tmp_path / "resumed", monkeypatch)
    first = read_checkpoint(tmp_path / "resumed/models/pretrain/last.pt")["history"][0]
    capsys.readouterr()
    # Another worker count is the same run: it still resumes.
    pretrain.run(load_config("smoke", [*CFG, "flow.workers=3"]), tmp_path / "resumed", resume=None)
    assert "resuming from" in capsys.readouterr().err
    assert_same_models(tmp_path / "straight/models/pretrain/checkpoint.pt",
                       tmp_path / "resumed/models/pretrain/checkpoint.pt")
    runs = [loss_columns(tmp_path / run / "reports/plots/pretrain.csv") for run in ("straight", "resumed")]
    assert runs[0] == runs[1] and len(runs[0]) == 3
    # Continued, not retrained: epoch 0's row (with its measured time) is the interrupted run's.
    rows = list(csv.DictReader((tmp_path / "resumed/reports/plots/pretrain.csv").open()))
    assert float(rows[0]["epoch_time"]) == first["epoch_time"]


@pytest.mark.slow
@pytest.mark.usefixtures("memory_data")
def test_a_changed_result_key_or_a_finished_run_starts_fresh(tmp_path, monkeypatch, capsys):
    from mme.stages import pretrain

    cfg = load_config("smoke", CFG)
    changed = load_config("smoke", [*CFG, "pretrain.base_lr=0.01"])
    pretrain.run(changed, tmp_path / "straight")
    interrupted_pretrain(cfg, tmp_path / "work", monkeypatch)
    capsys.readouterr()
    pretrain.run(changed, tmp_path / "work", resume=None)
    err = capsys.readouterr().err.strip().splitlines()
    assert any("starting fresh" in line and "pretrain.base_lr: 0.00015 -> 0.01" in line for line in err), err
    assert_same_models(tmp_path / "straight/models/pretrain/checkpoint.pt",
                       tmp_path / "work/models/pretrain/checkpoint.pt")
    # Finished under the same parameters: a re-run means code or data changed, so it trains again.
    pretrain.run(changed, tmp_path / "work", resume=None)
    assert "finished run" in capsys.readouterr().err
    assert len(loss_columns(tmp_path / "work/reports/plots/pretrain.csv")) == 3


def test_only_speed_keys_are_ignored():
    a, b = load_config("smoke").to_dict(), load_config("smoke", ["data.num_workers=4", "flow.workers=5"]).to_dict()
    assert result_mismatches(a, b) == []
    c = load_config("smoke", ["data.stride=3"]).to_dict()
    assert result_mismatches(a, c) == [("data.stride", 2, 3)]
    del a["seed"]
    assert result_mismatches(a, b) == [("seed", "<missing>", 0)]


def test_command_line_resume_is_three_way():
    parser = build_parser()
    assert [stage_options(parser.parse_args(["pretrain", *flag]))["resume"]
            for flag in ([], ["--resume"], ["--no-resume"])] == [None, True, False]
