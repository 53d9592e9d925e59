"""Paper tables from a real Optuna SQLite study: statistics, de-duplication, paper join, ordering, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from mme.ablation import STUDIES, get_study, open_storage, study_names
from mme.config import load_config
from mme.reports import tables
from mme.reports.reference import REFERENCE_CSV, paper_table, paper_value
from mme.stages import report

SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "paper" / "reference_tables.csv"
LENGTH = get_study("length")


def _trial(setting: str, seed: int, state: TrialState = TrialState.COMPLETE, **attrs: float):
    distributions = {"setting": CategoricalDistribution(list(LENGTH.labels)), "seed": IntDistribution(0, 2)}
    return create_trial(state=state, value=attrs.get("ft_top1") if state == TrialState.COMPLETE else None,
                        params={"setting": setting, "seed": seed}, distributions=distributions, user_attrs=attrs)


def _metrics(top1: float, top5: float = 90.0, probe: float = 40.0, seconds: float = 10.0) -> dict[str, float]:
    return {"ft_top1": top1, "ft_top5": top5, "probe_top1": probe, "pretrain_seconds": seconds, "pretrain_loss": 0.5}


@pytest.fixture
def length_storage(tmp_path) -> str:
    """A SQLite Optuna study shaped like ablate.py's, with known trial attributes."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="length-smoke-synthetic", direction="maximize")
    for key, value in (("mme_study", "length"), ("preset", "smoke"), ("dataset", "synthetic"),
                       ("trial_budget", ["finetune.epochs=2"])):
        study.set_user_attr(key, value)
    study.add_trials([
        _trial("L=4", 0, **_metrics(60.0, 80.0, 30.0, 10.0)),
        _trial("L=4", 1, **_metrics(62.0, 84.0, 34.0, 14.0)),
        _trial("L=6", 0, **_metrics(65.0)),
        _trial("L=4", 0, **_metrics(99.0, 99.0, 99.0, 99.0)),  # a GridSampler duplicate: must not count
        _trial("L=8", 0, state=TrialState.FAIL, **_metrics(100.0)),  # failed: must not count
        _trial("L=8", 1, **_metrics(58.0)),
    ])
    optuna.create_study(storage=url, study_name="not-ours")  # a foreign study in the same storage is skipped
    return url



def test_a_point_run_again_under_a_new_identity_counts_by_its_new_trial():
    """A trial recorded under an older identity (the setting was redefined) gives way to the point's
    re-run; duplicates under one identity still count by their first trial; trials without an identity
    (recorded before identities) keep counting by their first."""
    trials = [_trial("L=6", 0, identity="old", **_metrics(11.0)), _trial("L=6", 0, identity="new", **_metrics(67.0)),
              _trial("L=6", 0, identity="new", **_metrics(99.0)), _trial("L=4", 0, **_metrics(60.0)),
              _trial("L=4", 0, **_metrics(98.0))]
    for number, trial in enumerate(trials):
        trial.number = number
    records = tables.trial_records(trials).set_index("setting")
    assert records.loc["L=6", "ft_top1"] == 67.0 and records.loc["L=4", "ft_top1"] == 60.0
    assert list(records["number"]) == [1, 3]

def test_reference_copy_matches_shared_csv_and_covers_every_study():
    if SHARED_CSV.exists():
        assert REFERENCE_CSV == SHARED_CSV.read_text()
    for table in ("4", "5", "6", "7a", "7b", "7c", "7d", "7e", "7f", "fig3"):
        assert any(line.startswith(f"{table},") for line in REFERENCE_CSV.splitlines()), table
    for study in STUDIES.values():  # every paper label a study uses exists in the paper's table
        for setting in study.settings:
            if setting.paper is not None:
                assert paper_value(study.paper_study, setting.paper, "top1") is not None, (study.name, setting)
    assert paper_table("length")["L=6"] == {"top1": 64.1, "top5": 88.4}


def test_every_setting_builds_a_config_with_its_swept_value():
    for study in STUDIES.values():
        for setting in study.settings:
            cfg = load_config("smoke", [*study.base, *setting.overrides, "seed=3"]).flat()
            assert cfg["seed"] == 3
            for item in setting.overrides:
                key, value = item.split("=", 1)
                assert str(cfg[key]).lower() == value.lower(), (study.name, item)
    assert study_names("all") == list(STUDIES)
    with pytest.raises(KeyError, match="choose one of: content, interpolation"):
        get_study("lenght")


def test_tables_from_sqlite_study(length_storage):
    (table,) = tables.load_tables(open_storage(length_storage))
    assert table.optuna_study == "length-smoke-synthetic" and table.trials_counted == 4
    rows = table.rows.set_index("setting")
    assert list(rows.index) == ["L=4", "L=6", "L=8", "Random init"]  # every study keeps its floor row
    assert rows.loc["Random init", "n_seeds"] == 0  # no floor trial stored: listed, never measured
    l4 = rows.loc["L=4"]
    assert l4["n_seeds"] == 2
    assert l4["ft_top1_mean"] == pytest.approx(61.0) and l4["ft_top1_std"] == pytest.approx(math.sqrt(2))
    assert l4["ft_top5_mean"] == pytest.approx(82.0) and l4["ft_top5_std"] == pytest.approx(math.sqrt(8))
    assert l4["probe_top1_mean"] == pytest.approx(32.0) and l4["pretrain_seconds_mean"] == pytest.approx(12.0)
    assert rows.loc["L=6", "n_seeds"] == 1 and math.isnan(rows.loc["L=6", "ft_top1_std"])  # one seed: no std
    assert rows.loc["L=8", "ft_top1_mean"] == pytest.approx(58.0)  # the failed trial's 100 is ignored
    assert rows.loc["L=4", "paper_top1"] == 63.2 and rows.loc["L=6", "paper_top5"] == 88.4
    assert set(rows["preset"]) == {"smoke"} and set(rows["dataset"]) == {"synthetic"}

    result = tables.ordering(table)
    assert result.best_measured == ("L=6",) and result.best_paper == ("L=6",) and result.same_best
    # measured ranks (L=4, L=6, L=8) = (2, 3, 1); paper (63.2, 64.1, 63.3) -> (1, 3, 2): rho = 1 - 6*2/24
    assert result.spearman == pytest.approx(0.5)
    text = tables.agreement_text(table, result)
    assert "**L=6**, the same as the paper's best" in text and "+0.50" in text and "by `ft_top1`" in text
    by_probe = tables.ordering(table, "probe_top1")  # the same question asked of the linear probe
    assert by_probe.metric == "probe_top1_mean"  # probe means: L=4 32, L=6 40, L=8 40 -> a tie at the top
    assert by_probe.best_measured == ("L=6", "L=8") and by_probe.same_best is None
    assert "by `probe_top1`" in tables.agreement_text(table, by_probe)


def test_ordering_reports_ties_and_disagreement():
    study = get_study("norm")
    rows = pd.DataFrame({"setting": ["w/o patch norm", "w/ patch norm"], "n_seeds": [2, 2],
                         "ft_top1_mean": [70.0, 60.0], "ft_top1_std": [1.0, 1.0], "paper_top1": [62.1, 64.1]})
    table = tables.StudyTable(study, "norm-mini-synthetic", "mini", "synthetic", rows, 4)
    result = tables.ordering(table)
    assert result.same_best is False and result.spearman == pytest.approx(-1.0)
    assert "the best setting differs" in tables.agreement_text(table, result)
    tied = tables.StudyTable(study, "n", "mini", "synthetic", rows.assign(ft_top1_mean=[0.0, 0.0]), 4)
    result = tables.ordering(tied)
    assert result.same_best is None and result.spearman is None
    assert "tie for best" in tables.agreement_text(tied, result)
    alone = tables.StudyTable(study, "n", "mini", "synthetic",  # only the reference row measured so far
                              rows.assign(ft_top1_mean=[float("nan"), 60.0]), 2)
    text = tables.agreement_text(alone, tables.ordering(alone))
    assert "Only **w/ patch norm** of the paper's settings is measured" in text and "same as the paper" not in text


def test_a_metric_at_chance_is_called_out():
    """Fine-tune top-1 of 8.3-9.0 % on 12 classes ranks nothing; 70 vs 60 % does."""
    study = get_study("norm")
    rows = pd.DataFrame({"setting": ["w/o patch norm", "w/ patch norm"], "n_seeds": [2, 2],
                         "ft_top1_mean": [9.0, 8.33], "ft_top1_std": [0.5, 0.0], "paper_top1": [62.1, 64.1]})
    at_chance = tables.StudyTable(study, "n", "mini", "synthetic", rows, 4)
    assert "within 2 points of chance (8.3 %)" in tables.agreement_text(at_chance, tables.ordering(at_chance), 100 / 12)
    assert "chance" not in tables.agreement_text(at_chance, tables.ordering(at_chance))  # class count unknown
    learnt = tables.StudyTable(study, "n", "mini", "synthetic", rows.assign(ft_top1_mean=[70.0, 60.0]), 4)
    assert "chance" not in tables.agreement_text(learnt, tables.ordering(learnt), 100 / 12)


def test_report_stage_writes_tables_figures_readme(tmp_path, length_storage, smoke_cfg):
    workdir = tmp_path / "work"
    result = report.run(smoke_cfg, workdir, storage=length_storage)
    assert result["tables"] == ["tables/table7a_length.csv"] and result["trials_total"] == 4
    csv = pd.read_csv(workdir / "reports/tables/table7a_length.csv")
    assert list(csv.columns[:13]) == tables.COLUMNS[:13]
    assert csv.loc[csv["setting"] == "L=4", "ft_top1_mean"].item() == pytest.approx(61.0)
    assert (workdir / "reports/figures/table7a_length.png").stat().st_size > 1000
    assert (workdir / "reports/figures/table7a_length_probe.png").stat().st_size > 1000
    assert "| L=4 | 2 | 61.00 ± 1.41 |" in (workdir / "reports/tables/table7a_length.md").read_text()
    readme = (workdir / "reports/README.md").read_text()
    assert "Table 7a" in readme and "Spearman" in readme and "+0.50" in readme
    assert "Trial budget of `length-smoke-synthetic`: `finetune.epochs=2`." in readme
    assert "chance" not in readme  # no class list in this workdir: chance unknown, nothing claimed
    assert json.loads((workdir / "reports/metrics/report.json").read_text())["trials"] == {"table7a_length": 4}
    trials = pd.read_csv(workdir / "reports/tables/optuna_trials.csv")  # the storage's summary, one row per trial
    done = trials[trials["state"] == "COMPLETE"]
    assert set(trials["optuna_study"]) == {"length-smoke-synthetic"} and len(done) >= 4
    stored = optuna.load_study(study_name="length-smoke-synthetic", storage=length_storage).get_trials()
    assert sorted(done["number"]) == sorted(t.number for t in stored if t.state.name == "COMPLETE")
    for trial in stored:
        if trial.state.name == "COMPLETE":
            row = trials[trials["number"] == trial.number].iloc[0]
            assert row["user_attrs_ft_top1"] == pytest.approx(trial.user_attrs["ft_top1"], abs=1e-4)
    assert not any("per_clip" in column for column in trials.columns)


def test_committed_report_files_name_a_store_in_the_workdir_relative_to_it(tmp_path, length_storage, smoke_cfg):
    """reports/ is committed: the default SQLite store's absolute path is this machine's, not the reader's."""
    workdir = tmp_path  # length_storage lives at tmp_path/optuna.db, the workdir's default store
    report.run(smoke_cfg, workdir, storage=length_storage)
    readme = (workdir / "reports/README.md").read_text()
    assert "`sqlite:///<workdir>/optuna.db`" in readme and str(tmp_path) not in readme
    elsewhere = f"postgresql://mme:secret@db.example:5432/{tmp_path.name}"
    assert report.shown_storage(elsewhere, workdir) == f"postgresql://mme:***@db.example:5432/{tmp_path.name}"


def test_report_without_trials_writes_no_table(tmp_path, smoke_cfg, capsys):
    result = report.run(smoke_cfg, tmp_path)
    assert result["tables"] == [] and "no finished ablation trial" in result["message"]
    assert "ablate.py" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()  # reading must not create an empty store
    assert not (tmp_path / "reports/tables").exists()
    readme = (tmp_path / "reports/README.md").read_text()  # replaced, so no stale table outlives its storage
    assert "## Ablation tables\n\nNone: no finished ablation trial" in readme and "Table 7a" not in readme
    assert (tmp_path / "reports/metrics/report.json").exists()  # the DVC stage declares this metrics file


# ----------------------------------------------------------------------------------------------------
# Statistics columns from per-clip trial records

CLIP_IDS = tuple(f"v{i:04d}" for i in range(1200))


def _clip_trial(setting: str, seed: int, p: float, rng, number_of_clips: int = 1200, scores=None):
    """A COMPLETE trial whose per-clip probe/ft correctness is Bernoulli(p) (or `scores`), attrs = their means."""
    from mme.reports import per_clip

    correct = scores if scores is not None else (rng.random(number_of_clips) < p).astype(float)
    record = per_clip.PerClip(CLIP_IDS[:number_of_clips], {"ft_top1": correct, "probe_top1": correct})
    labels = [*LENGTH.labels, "Random init"]
    distributions = {"setting": CategoricalDistribution(labels), "seed": IntDistribution(0, 2)}
    attrs = _metrics(100 * correct.mean(), probe=100 * correct.mean()) | {"per_clip": per_clip.encode(record)}
    return create_trial(state=TrialState.COMPLETE, value=attrs["ft_top1"], params={"setting": setting, "seed": seed},
                        distributions=distributions, user_attrs=attrs)


def _clip_storage(tmp_path, seeds: int = 3, floor: bool = True) -> str:
    """length study: L=6 (reference) at 50 %, L=4 the same clips as L=6, L=8 at 70 %, Random init at 10 %."""
    rng = np.random.default_rng(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'clips.db'}"
    study = optuna.create_study(storage=url, study_name="length-mini-synthetic", direction="maximize")
    for key, value in (("mme_study", "length"), ("preset", "mini"), ("dataset", "synthetic")):
        study.set_user_attr(key, value)
    trials = []
    for seed in range(seeds):
        reference = (rng.random(1200) < 0.5).astype(float)
        trials += [_clip_trial("L=6", seed, 0.5, rng, scores=reference),
                   _clip_trial("L=4", seed, 0.5, rng, scores=reference.copy()),
                   _clip_trial("L=8", seed, 0.7, rng)]
        if floor:
            trials.append(_clip_trial("Random init", seed, 0.1, rng))
    study.add_trials(trials)
    return url


def test_tables_get_cis_paired_deltas_and_verdicts_from_per_clip_records(tmp_path):
    (table,) = tables.load_tables(open_storage(_clip_storage(tmp_path)), resamples=2000)
    assert table.reference == "L=6"
    rows = table.rows.set_index("setting")
    assert list(rows.index) == ["L=4", "L=6", "L=8", "Random init"]  # the floor row is kept, after the study's
    assert set(tables.STAT_COLUMNS) <= set(table.rows.columns)
    for metric in ("ft_top1", "probe_top1"):
        verdicts = rows[f"{metric}_verdict"].to_dict()
        assert verdicts == {"L=4": "not separated", "L=6": "reference", "L=8": "ahead", "Random init": "behind"}
    l8 = rows.loc["L=8"]
    assert l8["ft_top1_delta"] == pytest.approx(20.0, abs=3.0) and l8["ft_top1_delta_low"] > 10
    assert l8["ft_top1_ci_low"] < l8["ft_top1_mean"] < l8["ft_top1_ci_high"]
    assert rows.loc["L=4", "ft_top1_delta"] == 0.0 and rows.loc["L=4", "ft_top1_delta_high"] == 0.0
    assert rows.loc["L=6", "n_clips"] == 1200 and math.isnan(rows.loc["L=6", "ft_top1_delta"])
    # paper: L=4 63.2, L=6 64.1 -> -0.9 to the reference; the floor has no paper value
    assert rows.loc["L=4", "paper_delta_top1"] == pytest.approx(-0.9) and rows.loc["L=6", "paper_delta_top1"] == 0
    assert math.isnan(rows.loc["Random init", "paper_delta_top1"])
    assert set(rows["attentive_top1_verdict"]) == {"no per-clip data"}  # a metric no trial stored
    text = tables.verdict_text(table, "probe_top1")
    assert "**L=6**" in text and "ahead: L=8" in text and "behind: Random init" in text and "not separated: L=4" in text
    markdown = tables.to_markdown(table.rows, "ft_top1")
    assert "| L=8 | 3 |" in markdown and "| ahead |" in markdown and "paired difference to `L=6`" in markdown


def test_one_seed_or_no_floor_gives_no_verdict(tmp_path):
    (one_seed,) = tables.load_tables(open_storage(_clip_storage(tmp_path / "a", seeds=1)), resamples=500)
    assert set(one_seed.rows["ft_top1_verdict"]) == {"insufficient seeds"}
    assert "insufficient seeds: L=4, L=6, L=8, Random init" in tables.verdict_text(one_seed, "ft_top1")
    (no_floor,) = tables.load_tables(open_storage(_clip_storage(tmp_path / "b", floor=False)), resamples=500)
    measured = no_floor.rows["n_seeds"] > 0  # the study lists its floor row, but no trial measured it
    assert set(no_floor.rows[measured]["ft_top1_verdict"]) == {"no floor"}
    assert list(no_floor.rows[~measured]["setting"]) == ["Random init"]
    assert "no `Random init` row" in tables.verdict_text(no_floor, "ft_top1")


def test_trials_without_per_clip_data_keep_their_means_and_get_no_verdict(length_storage):
    (table,) = tables.load_tables(open_storage(length_storage))
    rows = table.rows.set_index("setting")
    assert rows.loc["L=4", "ft_top1_mean"] == pytest.approx(61.0)  # the attribute means, as before
    assert set(rows["ft_top1_verdict"]) == {"no per-clip data"} and rows["ft_top1_ci_low"].isna().all()
    assert "no per-clip data" in tables.verdict_text(table, "ft_top1")


def test_chart_has_one_axis_with_cis_chance_floor_and_paper_deltas(tmp_path):
    from mme.reports import plots

    (table,) = tables.load_tables(open_storage(_clip_storage(tmp_path)), resamples=500)
    rows = table.rows
    paper = plots.paper_on_our_axis(rows, "ft_top1", "L=6")
    ours = rows.set_index("setting").loc["L=6", "ft_top1_mean"]
    assert paper["L=6"] == pytest.approx(ours) and paper["L=4"] == pytest.approx(ours - 0.9)
    assert paper["L=8"] == pytest.approx(ours - 0.8) and math.isnan(paper["Random init"])
    below, above, kinds = plots.error_bars(rows.set_index("setting"), "ft_top1")
    assert kinds == ["ci"] * 4 and (below > 0).all() and (above > 0).all()
    fig = plots.chart(rows, "ft_top1", "Table 7a", chance=100 / 12)
    (ax,) = fig.axes  # no second y axis
    horizontal = {round(line.get_ydata()[0], 3) for line in ax.lines if len(set(line.get_ydata())) == 1}
    floor = rows.set_index("setting").loc["Random init", "ft_top1_mean"]
    assert round(100 / 12, 3) in horizontal and round(floor, 3) in horizontal
    near = plots.chart(rows[rows["setting"] != "Random init"], "ft_top1", "Table 7a")
    assert near.axes[0].get_ylim()[0] > 30  # means at 50-70 %: the axis is fitted to them, not forced to 0
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("paper: Δ to its L=6") for t in legend)
    assert plots.bar_chart(rows, "ft_top1", "t", tmp_path / "c.png").stat().st_size > 1000


def test_rows_name_their_hardware_and_a_mixed_table_says_so(length_storage):
    """Trials store the platform they ran on; a table whose rows come from two kinds names which rows came
    from which, and a table from one kind (or trials that recorded none) adds no such line."""
    (table,) = tables.load_tables(open_storage(length_storage), resamples=200)
    assert set(table.rows["platform"].dropna()) == {"not recorded"}
    assert tables.platform_text(table.rows) == ""
    study = optuna.load_study(study_name="length-smoke-synthetic", storage=length_storage)
    study.add_trial(_trial("L=6", 1, **_metrics(66.0), platform="AMD EPYC (avx512_bf16 bf16)"))
    (table,) = tables.load_tables(open_storage(length_storage), resamples=200)
    rows = table.rows.set_index("setting")
    assert rows.loc["L=6", "platform"] == "AMD EPYC (avx512_bf16 bf16) | not recorded"
    text = tables.platform_text(table.rows)
    assert "AMD EPYC (avx512_bf16 bf16) | not recorded: L=6" in text and "not recorded: L=4, L=8" in text
    assert text in tables.to_markdown(table.rows, "ft_top1")
