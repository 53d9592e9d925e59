"""Stage `download`: generate the synthetic set or fetch a real dataset, then write its lists.

Writes `data/raw/<dataset>/...`, `data/lists/<dataset>/{train,val,test}.csv` and `classes.json`,
records skipped (broken or missing) videos in `reports/skipped.txt` and the result, and logs the
counts and the time to MLflow and `reports/metrics/download.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

from mme.config import Config
from mme.data import sources, synthetic
from mme.data.lists import relative_to_workdir, stratified_split, write_classes, write_list
from mme.engine.tracking import log_metrics, stage_run
from mme.paths import Paths
from mme.utils import report_skipped, write_metrics

SPLITS = ("train", "val", "test")


def make_synthetic(cfg: Config, workdir: Path, progress: bool = True) -> tuple[sources.Prepared, int]:
    """Generate the motion dataset; returns its splits (stratified by class; `data.synthetic.val_videos` /
    `test_videos` fix a held-out split's size) and how many videos were written."""
    settings = cfg.data.synthetic
    videos, written = synthetic.generate_counted(Paths(workdir).raw_dir("synthetic"), settings, cfg.seed, progress)
    rows = [(relative_to_workdir(workdir, path), label) for path, label in videos]
    splits = stratified_split(rows, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed,
                              settings.val_videos, settings.test_videos)
    return sources.Prepared(splits, list(synthetic.CLASSES)), written


def write_dataset_lists(workdir: Path, dataset: str, prepared: sources.Prepared) -> None:
    """Write the three list files and classes.json of a dataset."""
    paths = Paths(workdir)
    for split in SPLITS:
        write_list(paths.list_file(dataset, split), prepared.splits.get(split, []))
    write_classes(paths.lists_dir(dataset), prepared.classes)


def run(cfg: Config, workdir: str | Path = ".", *, progress: bool = True) -> dict:
    """Get or generate `cfg.data.dataset`, write its lists; returns the stage metrics (also in download.json)."""
    workdir = Path(workdir).resolve()
    paths = Paths(workdir)
    dataset = cfg.data.dataset
    with stage_run(cfg, workdir, "download", tags={"dataset": dataset}):
        start = time.perf_counter()  # the data work only, not the tracking store's start-up
        written = None
        if dataset == "synthetic":
            prepared, written = make_synthetic(cfg, workdir, progress)
        else:
            prepared = sources.prepare(cfg, workdir, progress)
        write_dataset_lists(workdir, dataset, prepared)
        report_skipped(paths.skipped_file, "download", prepared.skipped)
        counts = {f"videos_{split}": len(prepared.splits.get(split, [])) for split in SPLITS}
        result = {
            "dataset": dataset,
            **counts,
            "num_classes": len(prepared.classes),
            "num_skipped": len(prepared.skipped),
            "skipped": [f"{name}: {reason}" for name, reason in prepared.skipped],
            "seconds": round(time.perf_counter() - start, 3),
        }
        if written is not None:
            result["videos_written"] = written
        log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
        write_metrics(paths.metrics_dir / "download.json", result)
    return result
