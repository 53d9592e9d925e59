"""Ablation study definitions (paper Tables 4-7, Fig. 3): settings, objectives, trial budgets, naming.

A study is one ablation axis: a list of settings, each a row label plus the config overrides that make
it (`key=value` strings, exactly as `--set` takes them). Every setting sets the swept keys explicitly, so
the preset's defaults never decide which row a run belongs to. `experiments/ablate.py` runs a study as an
Optuna grid over settings x seeds (`mme.ablation.runner`); `mme report` turns the stored trials into
the paper's tables.

Choices made here (the paper leaves them implicit):
- Table 5's appearance and short-term motion baselines (HOG, HOG+Flow/HOF/MBH) are the paper's
  non-interpolated versions (MaskFeat: HOG of the tube's middle frame, `target.interpolate=false`);
  the trajectory rows keep interpolation on, the paper's default. Table 6 toggles it explicitly.
- Tables 7a-7f pin `target.kind=traj` (they ablate MME itself).
- The `probe` study (Table 4) pre-trains and linear-probes only (no fine-tuning); its objective is the
  probe top-1. Its labels name the method; `paper` points at the paper's SSv2 rows.
- `robustness` (no paper table) toggles the real-footage trajectory checks; the content study carries an
  extra `traj_official` row (the released code's target).
- Every study has a `reference` row (the paper's default setting, e.g. L=6 for the length) and a floor
  row, FLOOR ("Random init"): the reference's settings with `probe.init=random` and
  `finetune.init=scratch`, i.e. the probe of an untrained encoder and fine-tuning from scratch, with the
  same schedule, seeds and splits. The trial chain (mme/stages/chain.py) skips pre-training for it and
  reuses the floor of any table with the same resolved (classification-relevant) config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

# Optuna study user attributes written by experiments/ablate.py and read by the report.
ATTR_STUDY = "mme_study"
ATTR_PRESET = "preset"
ATTR_DATASET = "dataset"
ATTR_OVERRIDES = "overrides"
ATTR_BUDGET = "trial_budget"
ATTR_PARENT_RUN = "mlflow_parent_run_id"

# Trial user attributes holding the measured metrics (the runner's result keys).
METRICS = ("ft_top1", "ft_top5", "probe_top1", "attentive_top1", "pretrain_seconds", "pretrain_loss")
# Trial user attributes holding JSON records, stored as the runner returns them: the per-clip test record
# (mme.reports.per_clip: which test clips each metric got right; tables bootstrap over them).
RECORDS = ("per_clip",)
# Trial user attribute naming the hardware the trial's parts were computed on (`mme.engine.loops.platform_name`);
# trials from before 2026-12-02 lack it (NOT_RECORDED: Intel AMX machines, experiments/README.md).
PLATFORM_ATTR = "platform"
NOT_RECORDED = "not recorded"
# Trial user attribute: what the trial's results are keyed by (its part keys) when it ran; a COMPLETE trial
# under another identity than its point's current one is stale (mme.ablation.grid).
ATTR_IDENTITY = "identity"
FULL_CHAIN = ("pretrain", "finetune", "probe")
FLOOR = "Random init"  # the floor row's label (the tables' statistics look for it by this name)
FLOOR_OVERRIDES = ("probe.init=random", "finetune.init=scratch")

# Per-preset trial budget, applied before a study's own overrides and the user's --set (which win): like
# the paper's ablations, a trial is cheaper than the default pipeline (why these values and what they
# measure: experiments/README.md). The budget is part of the Optuna study name, so changing it starts new
# studies instead of resuming old ones.
TRIAL_BUDGET: dict[str, tuple[str, ...]] = {
    "smoke": (),
    "mini": ("pretrain.epochs=12", "pretrain.warmup_epochs=1", "finetune.epochs=6", "finetune.warmup_epochs=1",
             "finetune.token_drop=0.5", "finetune.val_every=6"),
    "paper": (),
}


def trial_budget(preset: str) -> tuple[str, ...]:
    """The overrides that size an ablation trial for `preset` (see TRIAL_BUDGET)."""
    return TRIAL_BUDGET.get(preset, ())


@dataclass(frozen=True)
class Setting:
    """One row of a table: `label` (the table's row name), the config `overrides` that make it, and
    `paper`, the matching row label of the reference csv (None: the paper has no such row)."""

    label: str
    overrides: tuple[str, ...]
    paper: str | None = None


AHEAD_OF, COMPETITIVE = "ahead of", "competitive with"


@dataclass(frozen=True)
class Claim:
    """A statement of the paper that a table can test on its rows: `a` is AHEAD_OF `b` (the paper shows a
    gain), or `a` is COMPETITIVE with `b` (the paper calls them equal). `why`: the paper's numbers or words."""

    a: str
    relation: str
    b: str
    why: str


@dataclass(frozen=True)
class Study:
    """One ablation axis. `table`: the paper's table id; `file`: the stem of reports/tables/<file>.csv;
    `paper_study`: the reference csv's study column; `base`: overrides shared by every setting;
    `objective`: the trial metric Optuna maximises; `stages`: what a trial runs after pre-training;
    `reference`: the label of the paper's default setting, the row every other one is compared with.
    The floor row FLOOR (the reference's overrides + FLOOR_OVERRIDES) is appended to `settings`."""

    name: str
    table: str
    file: str
    title: str
    paper_study: str
    settings: tuple[Setting, ...]
    base: tuple[str, ...] = ()
    objective: str = "ft_top1"
    stages: tuple[str, ...] = FULL_CHAIN
    notes: str = ""
    reference: str = ""
    claims: tuple[Claim, ...] = ()  # the paper's statements about this table's rows (mme.reports.claims)
    labels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        labels = [s.label for s in self.settings]
        if self.reference not in labels:
            raise ValueError(f"study {self.name!r}: reference {self.reference!r} is not one of its settings")
        if FLOOR not in labels:
            floor = Setting(FLOOR, (*self.setting(self.reference).overrides, *FLOOR_OVERRIDES))
            object.__setattr__(self, "settings", (*self.settings, floor))
        object.__setattr__(self, "labels", tuple(s.label for s in self.settings))
        for claim in self.claims:
            if {claim.a, claim.b} - set(self.labels) or claim.relation not in (AHEAD_OF, COMPETITIVE):
                raise ValueError(f"study {self.name!r}: claim {claim} names an unknown row or relation")

    def setting(self, label: str) -> Setting:
        for item in self.settings:
            if item.label == label:
                return item
        raise KeyError(f"study {self.name!r} has no setting {label!r}; settings: {', '.join(self.labels)}")


def _same(label: str, *overrides: str) -> Setting:
    """A setting whose label is also the paper's row label."""
    return Setting(label, tuple(overrides), paper=label)


_TRAJ = ("target.kind=traj",)

STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("content", "5", "table5_content", "Reconstruction content", "content", (
        _same("Pixel", "target.kind=pixel"),
        _same("HOG", "target.kind=hog", "target.interpolate=false"),
        _same("HOG+Flow", "target.kind=hog+flow", "target.interpolate=false"),
        _same("HOG+HOF", "target.kind=hog+hof", "target.interpolate=false"),
        _same("HOG+MBH", "target.kind=hog+mbh", "target.interpolate=false"),
        _same("HOG+Traj w/o shape", "target.kind=hog+traj_pos", "target.interpolate=true"),
        _same("Traj", "target.kind=traj", "target.interpolate=true"),
        Setting("MotionMAE", ("target.kind=motionmae",), paper=None),
    ), notes="MotionMAE (arXiv 2210.04154) is an extra row; the paper does not compare with it.", reference="Traj",
        claims=(Claim("Traj", AHEAD_OF, "Pixel", "64.1 vs 61.1: motion trajectories beat pixels"),
                Claim("Traj", AHEAD_OF, "HOG", "64.1 vs 61.1: motion trajectories beat appearance (HOG)"),
                Claim("HOG+Traj w/o shape", AHEAD_OF, "HOG", "63.5 vs 61.1: long-term position changes add to HOG"),
                Claim("Traj", AHEAD_OF, "HOG+Traj w/o shape", "64.1 vs 63.5: the trajectory's shape adds to it"),
                Claim("HOG+MBH", COMPETITIVE, "HOG", "61.4 vs 61.1: short-term motion adds little"),
                Claim("HOG+Flow", COMPETITIVE, "HOG", "60.9 vs 61.1: predicting the dense flow map adds nothing"),
                Claim("HOG+Traj w/o shape", AHEAD_OF, "HOG+MBH", "63.5 vs 61.4: long-term motion beats short-term"),
                Claim("HOG+Traj w/o shape", AHEAD_OF, "HOG+HOF", "63.5 vs 61.3: long-term motion beats HOF"),
                Claim("HOG+Traj w/o shape", AHEAD_OF, "HOG+Flow", "63.5 vs 60.9: and the flow map"))),
    Study("interpolation", "6", "table6_interpolation", "Trajectory interpolation", "interpolation", (
        _same("HOG no-interp", "target.kind=hog", "target.interpolate=false"),
        _same("HOG interp", "target.kind=hog", "target.interpolate=true"),
        _same("HOG+MBH no-interp", "target.kind=hog+mbh", "target.interpolate=false"),
        _same("HOG+MBH interp", "target.kind=hog+mbh", "target.interpolate=true"),
        _same("Traj no-interp", "target.kind=traj", "target.interpolate=false"),
        _same("Traj interp", "target.kind=traj", "target.interpolate=true"),
    ), reference="Traj interp",
        claims=(Claim("Traj interp", AHEAD_OF, "Traj no-interp", "64.1 vs 62.2: trajectories gain from interpolation"),
                Claim("HOG interp", COMPETITIVE, "HOG no-interp", "60.9 vs 61.1: HOG does not"),
                Claim("HOG+MBH interp", COMPETITIVE, "HOG+MBH no-interp", "61.4 vs 61.3: nor does HOG+MBH"))),
    Study("length", "7a", "table7a_length", "Trajectory length L", "length", tuple(
        _same(f"L={n}", f"target.length={n}") for n in (4, 6, 8)), base=_TRAJ, reference="L=6",
        claims=(Claim("L=6", AHEAD_OF, "L=4", "64.1 vs 63.2: longer trajectories help"),
                Claim("L=6", AHEAD_OF, "L=8", "64.1 vs 63.3: up to a point"))),
    Study("norm", "7b", "table7b_norm", "Trajectory patch normalisation", "norm", (
        _same("w/o patch norm", "target.patch_norm=false"),
        _same("w/ patch norm", "target.patch_norm=true"),
    ), base=_TRAJ, reference="w/ patch norm",
        claims=(Claim("w/ patch norm", AHEAD_OF, "w/o patch norm", "64.1 vs 62.1: normalising per patch helps"),)),
    Study("density", "7c", "table7c_density", "Trajectory density", "density", (
        _same("Dense", "target.density=dense"),
        _same("Sparse (Max)", "target.density=max"),
        _same("Sparse (Mean)", "target.density=mean"),
    ), base=_TRAJ, reference="Dense",
        claims=(Claim("Dense", AHEAD_OF, "Sparse (Max)", "64.1 vs 60.2: every trajectory of a patch helps"),
                Claim("Dense", AHEAD_OF, "Sparse (Mean)", "64.1 vs 61.8: more than their mean"))),
    Study("stride", "7d", "table7d_stride", "Sampling stride s", "stride", tuple(
        _same(f"s={s}", f"pretrain.stride={s}") for s in (4, 3, 2, 1)), base=_TRAJ, reference="s=3",
        notes="s is the pre-training stride; fine-tuning and the probes keep data.stride=3, as the paper's SSv2 "
              "fine-tuning samples segments whatever the pre-training stride. The paper's text calls s=2 best; its "
              "Table 7d has s=3 ahead (64.1 vs 63.5). The claims follow the table.",
        claims=(Claim("s=3", AHEAD_OF, "s=4", "64.1 vs 62.9"), Claim("s=3", AHEAD_OF, "s=1", "64.1 vs 62.7"))),
    Study("masking", "7e", "table7e_masking", "Spatial masking", "masking", (
        _same("90% tube", "mask.kind=tube", "mask.ratio=0.9"),
        _same("70% tube", "mask.kind=tube", "mask.ratio=0.7"),
        _same("40% tube", "mask.kind=tube", "mask.ratio=0.4"),
        _same("40% cube", "mask.kind=cube", "mask.ratio=0.4"),
    ), base=_TRAJ, reference="70% tube",
        claims=(Claim("70% tube", AHEAD_OF, "90% tube", "64.1 vs 62.7: a lower ratio than VideoMAE's 90 %"),
                Claim("70% tube", AHEAD_OF, "40% tube", "64.1 vs 61.3: but not too low"),
                Claim("40% tube", COMPETITIVE, "40% cube", "61.3 vs 61.2: tube and cube masks alike"))),
    Study("decoder", "7f", "table7f_decoder", "Decoder", "decoder", tuple(
        _same(f"{mode.capitalize()} depth {depth}", f"model.decoder_mode={mode}", f"model.decoder_depth={depth}")
        for mode in ("joint", "separate") for depth in (1, 2)), base=_TRAJ, reference="Joint depth 1",
        claims=(Claim("Joint depth 1", AHEAD_OF, "Separate depth 1", "64.1 vs 63.4: one decoder for both parts"),
                Claim("Joint depth 1", AHEAD_OF, "Joint depth 2", "64.1 vs 63.4: a light one"),
                Claim("Joint depth 1", AHEAD_OF, "Separate depth 2", "64.1 vs 63.3: deeper separate ones no better"))),
    Study("shuffle", "fig3", "fig3_shuffle", "Pre-training on frame-shuffled video", "shuffle", tuple(
        _same(f"{method} {video} video", f"target.kind={kind}", f"data.shuffle_frames={shuffled}")
        for method, kind in (("VideoMAE", "pixel"), ("MME", "traj"))
        for video, shuffled in (("raw", "false"), ("shuffled", "true"))), reference="MME raw video",
        claims=(Claim("VideoMAE raw video", COMPETITIVE, "VideoMAE shuffled video",
                      "60.9 vs 60.9: pixel reconstruction barely uses temporal information"),
                Claim("MME raw video", AHEAD_OF, "VideoMAE raw video", "64.1 vs 60.9: MME uses time"),
                Claim("MME raw video", AHEAD_OF, "MME shuffled video", "64.1 vs 60.7: shuffling frames costs MME"),
                Claim("MME shuffled video", COMPETITIVE, "VideoMAE shuffled video",
                      "60.7 vs 60.9: without temporal information MME is no better than VideoMAE"))),
    Study("probe", "4", "table4_probe", "Linear probing", "linear_probe", (
        Setting("VideoMAE (pixel)", ("target.kind=pixel",), paper="VideoMAE SSv2"),
        Setting("MME (traj)", ("target.kind=traj",), paper="MME SSv2"),
    ), objective="probe_top1", stages=("pretrain", "probe"),
        notes="The paper's TimeSformer and SVT rows are other backbones; they are not re-run.",
        reference="MME (traj)", claims=(Claim("MME (traj)", AHEAD_OF, "VideoMAE (pixel)",
                                              "29.2 vs 24.3, linear probe on SSv2"),)),
)}

# Real footage (docs/targets.md): the released code's target as a row of the content study, so its deviations
# from the paper's `traj` are measured. Not a paper row; the official code has one tracking mode, and
# `target.interpolate=true` only keeps the content study's swept keys explicit.
STUDIES["content"] = replace(STUDIES["content"], settings=(  # the floor row stays last (it is re-appended)
    *(s for s in STUDIES["content"].settings if s.label != FLOOR),
    Setting("Traj (official code)", ("target.kind=traj_official", "target.interpolate=true"), paper=None),
))

# Real footage: the optional trajectory checks (off = the paper's setting), each alone and both. The two
# fb_check rows read flow caches with backward flow, which the data preparation extracts once into
# `<workdir>/data-fb` (`mme.stages.chain.data_dir_name`), leaving the pipeline's `data/` as `dvc.lock` has it.
_ROBUSTNESS = Study("robustness", "extra", "robustness", "Trajectory checks on real footage", "robustness", (
    Setting("default", ("target.fb_check=false", "target.prune=false")),
    Setting("fb_check on", ("target.fb_check=true", "target.prune=false")),
    Setting("prune on", ("target.fb_check=false", "target.prune=true")),
    Setting("both", ("target.fb_check=true", "target.prune=true")),
), base=_TRAJ,
    notes="Not in the paper. Shot-cut invalidation is always on; the fb_check rows read caches with backward "
          "flow, extracted once into `<workdir>/data-fb` (the pipeline's `data/` is left as it is).",
    reference="default")
STUDIES[_ROBUSTNESS.name] = _ROBUSTNESS

ALL = "all"


def get_study(name: str) -> Study:
    """The study called `name`; an unknown name raises a `KeyError` that lists the studies."""
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)} (or {ALL!r} for every one)")
    return STUDIES[name]


def selected_labels(study: Study, only: tuple[str, ...]) -> tuple[str, ...]:
    """`only` (empty: every setting) plus the reference and floor rows, which every table compares with,
    in the study's row order; an unknown label raises a `KeyError` naming the study's settings."""
    if not only:
        return study.labels
    for label in only:
        study.setting(label)
    wanted = {*only, study.reference, FLOOR}
    return tuple(label for label in study.labels if label in wanted)


def study_names(name: str) -> list[str]:
    """`all` -> every study in table order; otherwise the one (checked) name."""
    return list(STUDIES) if name == ALL else [get_study(name).name]


def optuna_study_name(study: str, preset: str, dataset: str, overrides: tuple[str, ...] = (),
                      budget: tuple[str, ...] = ()) -> str:
    """`<study>-<preset>-<dataset>`, plus `-b<hash>` of the preset's trial budget and `-<hash>` of any
    extra `--set` overrides, so that runs with different budgets or base settings never share (and mix)
    one Optuna study, and a changed budget starts a new study rather than resuming the old one."""
    name = f"{study}-{preset}-{dataset}"
    if budget:
        name += f"-b{_digest(budget)}"
    if overrides:
        name += f"-{_digest(overrides)}"
    return name


def _digest(overrides: tuple[str, ...]) -> str:
    return hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
