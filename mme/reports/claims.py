"""The paper's claims about a table's rows (`Study.claims`), tested on the trials' per-clip test results.

For each claim and metric: the paired difference `a - b` over the seeds both rows have and the clips every
trial of the two rows shares, with its 95 % bootstrap CI (`mme.reports.stats`). The words:
- `a` AHEAD_OF `b`: HOLDS when the CI lies above 0, REVERSED when below, NOT_SEPARATED otherwise.
- `a` COMPETITIVE with `b`: CONSISTENT when the CI covers 0 (no evidence against the paper, which is not
  proof that the two are equal: the CI's width says how large a gap could hide), SEPARATED when it excludes 0.
- Fewer than `stats.MIN_SEEDS` common seeds: INSUFFICIENT (the difference is still shown); a row without
  per-clip results: NOT_MEASURED; a table without its floor row: `stats.NO_FLOOR`, as for the verdicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mme.ablation.studies import AHEAD_OF, Claim, Study
from mme.reports import per_clip, stats

HOLDS, REVERSED, CONSISTENT, SEPARATED = "holds", "reversed", "consistent (not separated)", "does not hold (separated)"
NOT_SEPARATED, INSUFFICIENT, NOT_MEASURED = stats.NOT_SEPARATED, stats.INSUFFICIENT_SEEDS, "not measured"
METRIC_NAMES = {"ft_top1": "fine-tune", "probe_top1": "linear probe", "attentive_top1": "attentive probe"}

Records = Mapping[str, Mapping[int, per_clip.PerClip]]  # setting -> seed -> record


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    metric: str
    n_seeds: int
    delta: stats.Interval | None
    word: str


def check(claim: Claim, records: Records, metric: str, resamples: int = stats.RESAMPLES) -> ClaimResult:
    """One claim on one metric (see the module docstring for the words)."""
    rows = {label: {s: (r.clip_ids, r.correct[metric]) for s, r in records.get(label, {}).items()
                    if metric in r.correct} for label in (claim.a, claim.b)}
    seeds = sorted(set(rows[claim.a]) & set(rows[claim.b]))
    if not seeds:
        return ClaimResult(claim, metric, 0, None, NOT_MEASURED)
    clips = stats.common_clips(rows)
    delta = stats.paired_difference(stats.aligned(rows[claim.a], clips, seeds),
                                    stats.aligned(rows[claim.b], clips, seeds), resamples)
    word = stats.verdict(delta, len(seeds), stats.FLOOR in records)  # the tables' rule, in the claim's words
    if claim.relation == AHEAD_OF:
        word = {stats.AHEAD: HOLDS, stats.BEHIND: REVERSED}.get(word, word)
    else:
        word = {stats.AHEAD: SEPARATED, stats.BEHIND: SEPARATED, stats.NOT_SEPARATED: CONSISTENT}.get(word, word)
    return ClaimResult(claim, metric, len(seeds), delta, word)


def claim_lines(study: Study, records: Records, metrics: tuple[str, ...],
                resamples: int = stats.RESAMPLES) -> list[str]:
    """One plain-words line per claim: the paper's statement, then each metric's Δ [CI] and word."""
    lines = []
    for claim in study.claims:
        parts = []
        for metric in metrics:
            result = check(claim, records, metric, resamples)
            if result.delta is None:
                continue
            d = result.delta
            parts.append(f"{METRIC_NAMES.get(metric, metric)} {d.estimate:+.1f} [{d.low:+.1f}, {d.high:+.1f}] "
                         f"({result.n_seeds} seed{'s' * (result.n_seeds != 1)}): **{result.word}**")
        measured = "; ".join(parts) or NOT_MEASURED
        lines.append(f"*{claim.a}* {claim.relation} *{claim.b}* (paper: {claim.why}) — here, Δ = a − b: {measured}.")
    return lines


def floor_lines(study: Study, records: Records, metrics: tuple[str, ...],
                resamples: int = stats.RESAMPLES) -> list[str]:
    """Per metric, every measured row against the table's floor (paired Δ [CI] and whether it learnt
    more than the untrained encoder / the from-scratch fine-tune): a row's lead over another means
    little when neither clears the floor."""
    lines = []
    for metric in metrics:
        parts = []
        for label in study.labels:
            if label == stats.FLOOR:
                continue
            result = check(Claim(label, AHEAD_OF, stats.FLOOR, ""), records, metric, resamples)
            if result.delta is not None:
                d, word = result.delta, {HOLDS: "above", REVERSED: "below"}.get(result.word, result.word)
                parts.append(f"{label} {d.estimate:+.1f} [{d.low:+.1f}, {d.high:+.1f}] {word}")
        if parts:
            lines.append(f"{METRIC_NAMES.get(metric, metric)}: " + "; ".join(parts))
    return lines
