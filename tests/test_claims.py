"""The paper's claims tested on constructed per-clip results with known answers (mme.reports.claims)."""

from __future__ import annotations

import numpy as np
import pytest

from mme.ablation import STUDIES
from mme.ablation.studies import AHEAD_OF, COMPETITIVE, FLOOR, Claim, Setting, Study
from mme.reports import claims, stats
from mme.reports.per_clip import PerClip

CLIPS = tuple(f"c{i:03d}" for i in range(400))


def _record(accuracy: float, seed: int, metric: str = "ft_top1") -> PerClip:
    rng = np.random.default_rng(seed)
    return PerClip(CLIPS, {metric: (rng.random(len(CLIPS)) < accuracy).astype(float)})


def _records(a: float, b: float, seeds: int = 3, floor: bool = True) -> dict:
    out = {"A": {s: _record(a, 10 + s) for s in range(seeds)}, "B": {s: _record(b, 20 + s) for s in range(seeds)}}
    if floor:
        out[FLOOR] = {s: _record(0.2, 30 + s) for s in range(seeds)}
    return out


AHEAD = Claim("A", AHEAD_OF, "B", "paper: A > B")
SAME = Claim("A", COMPETITIVE, "B", "paper: A = B")


@pytest.mark.parametrize(("a", "b", "claim", "word"), [
    (0.7, 0.4, AHEAD, claims.HOLDS), (0.4, 0.7, AHEAD, claims.REVERSED),
    (0.7, 0.4, SAME, claims.SEPARATED)])
def test_clear_gaps_give_clear_words(a, b, claim, word):
    result = claims.check(claim, _records(a, b), "ft_top1", resamples=2000)
    assert result.word == word and result.n_seeds == 3
    assert result.delta.estimate == pytest.approx(100 * (a - b), abs=6)  # 1 200 Bernoulli draws per row


def test_the_same_row_twice_is_never_separated():
    same = _records(0.6, 0.6)
    same["B"] = same["A"]
    for claim, word in ((AHEAD, claims.NOT_SEPARATED), (SAME, claims.CONSISTENT)):
        result = claims.check(claim, same, "ft_top1", resamples=2000)
        assert result.word == word and result.delta.estimate == 0.0 and result.delta.low == result.delta.high == 0.0


def test_no_verdict_without_seeds_floor_or_measurements():
    assert claims.check(AHEAD, _records(0.7, 0.4, seeds=1), "ft_top1", resamples=500).word == claims.INSUFFICIENT
    assert claims.check(AHEAD, _records(0.7, 0.4, floor=False), "ft_top1", resamples=500).word == stats.NO_FLOOR
    missing = _records(0.7, 0.4)
    del missing["B"]
    assert claims.check(AHEAD, missing, "ft_top1").word == claims.NOT_MEASURED
    assert claims.check(AHEAD, _records(0.7, 0.4), "probe_top1").word == claims.NOT_MEASURED  # no such metric


def test_the_difference_pairs_the_seeds_both_rows_have():
    records = _records(0.7, 0.4)
    records["A"] = {0: records["A"][0], 5: _record(0.1, 99)}  # seed 5 has no partner in B: left out
    result = claims.check(AHEAD, records, "ft_top1", resamples=500)
    assert result.n_seeds == 1 and result.word == claims.INSUFFICIENT
    mine = records["A"][0].correct["ft_top1"].mean() - records["B"][0].correct["ft_top1"].mean()
    assert result.delta.estimate == pytest.approx(100 * mine)


def test_claims_name_real_rows_and_the_lines_read_plainly():
    with pytest.raises(ValueError, match="unknown row"):
        Study("x", "1", "x", "x", "x", (Setting("A", ()),), reference="A", claims=(Claim("A", AHEAD_OF, "Z", ""),))
    assert {c.a for c in STUDIES["shuffle"].claims} == {"VideoMAE raw video", "MME raw video", "MME shuffled video"}
    assert len(STUDIES["content"].claims) == 9  # kept through the content study's extra row
    study = Study("x", "1", "x", "x", "x", (Setting("A", ()), Setting("B", ())), reference="A", claims=(AHEAD,))
    line, = claims.claim_lines(study, _records(0.7, 0.4), ("ft_top1", "probe_top1"), resamples=500)
    assert line.startswith("*A* ahead of *B* (paper: paper: A > B)") and "fine-tune +" in line and "**holds**" in line
    assert "linear probe" not in line  # not measured: left out


def test_every_row_is_read_against_the_floor():
    study = Study("x", "1", "x", "x", "x", (Setting("A", ()), Setting("B", ())), reference="A")
    records = _records(0.7, 0.2)  # B is drawn like the floor (0.2): not separated from it
    line, = claims.floor_lines(study, records, ("ft_top1", "probe_top1"), resamples=1000)
    assert line.startswith("fine-tune: A +") and "above" in line.split(";")[0]
    assert line.split(";")[1].strip().startswith("B ") and "not separated" in line.split(";")[1]
    assert claims.floor_lines(study, _records(0.7, 0.2, floor=False), ("ft_top1",), resamples=200) == []  # no floor


def test_every_claim_quotes_the_papers_own_numbers_for_its_two_rows():
    import re

    from mme.reports.reference import paper_value

    quoted = 0
    for study in STUDIES.values():
        for claim in study.claims:
            numbers = re.match(r"(\d+\.\d) vs (\d+\.\d)", claim.why)
            assert numbers, f"{study.name}: claim {claim} should start 'A vs B' with the paper's numbers"
            for label, text in zip((claim.a, claim.b), numbers.groups(), strict=True):
                value = paper_value(study.paper_study, study.setting(label).paper, "top1")
                assert value == float(text), f"{study.name}: {label} is {value} in the paper, the claim says {text}"
                quoted += 1
    assert quoted >= 2 * 20
