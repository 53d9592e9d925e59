"""Extract stage: dense optical flow of every listed video into the flow cache (`mme extract`).

For each video of the lists that a stage reads flow from (`FLOW_SPLITS`: pre-training reads train; the
classification stages read no flow, so the large held-out val/test splits cost no extraction; each video
once): decode every frame with
`read_frames(path, range(n), short_side=cfg.data.short_side)` -- the call the datasets make, so flow and
clips share their geometry -- compute the flow of every consecutive pair (`cfg.flow.backend`, optional
camera compensation) and save it to `data/flow/<dataset>/<video_key>.npz`, with the video's shot cuts
(`mme.motion.shots.detect_cuts` on the frames and the flow) in its metadata, and with `target.fb_check` the
backward flow of every pair as well (the forward-backward occlusion check reads it).

The stage is resumable: a video whose cache is complete and was made with the same settings is reused; a
missing, truncated, corrupt or stale one is (re)done; so is one written before cut detection, or without
backward flow when `target.fb_check` needs it. `--shard i/N` takes every N-th video starting at the
i-th, so N machines can share a dataset.

With `data.decoded_cache` the stage also writes each of those videos' entry of the decoded cache,
`data/decoded/<dataset>/<video_key>/` (`mme.motion.decoded`: its frames as decoded above and its flow
cache's codes, uncompressed, for memory-mapped reads by the training datasets), reusing a complete one made
from the same video and flow cache. The directory `data/decoded/<dataset>` always exists afterwards (DVC
requires a declared output), and with the key off the stage writes nothing into it.

A video that cannot be read is named, skipped, and listed in
`reports/skipped.txt` and the metrics; the stage fails only when no video at all has a flow cache.
Metrics go to `reports/metrics/extract.json` (`extract-shard-<i>-of-<N>.json` for a shard) and MLflow.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
from tqdm import tqdm

from mme.config import Config
from mme.data.lists import read_list, resolve_video
from mme.data.video import VideoError, read_frames, video_info
from mme.engine.tracking import log_metrics, stage_run
from mme.motion.cache import FlowCache, cache_problem, expected_meta, flow_cache_path, load_flow, save_flow
from mme.motion.decoded import decoded_entry_path, entry_problem, remove_stale_temps, write_entry
from mme.motion.flow import FlowEstimator
from mme.motion.shots import SHOT_DETECTOR, detect_cuts
from mme.paths import Paths
from mme.utils import report_skipped, write_metrics

SPLITS = ("train", "val", "test")
FLOW_SPLITS = ("train",)  # the splits whose datasets read flow caches (PretrainDataset: train)
FLOAT32_BYTES = 4
# Per-video failures that skip the video instead of stopping the stage.
VIDEO_FAILURES = (VideoError, ValueError, OSError, MemoryError, cv2.error)


class ExtractError(ValueError):
    """No video could be extracted (the CLI prints it as one line and exits non-zero)."""


@dataclass(frozen=True)
class FlowSettings:
    """What a flow cache depends on; a cache made with other settings is redone."""

    backend: str
    compensate_camera: bool
    short_side: int
    backward: bool = False

    @classmethod
    def of(cls, cfg: Config) -> FlowSettings:
        """The settings a config's caches need (backward flow only with `target.fb_check`)."""
        return cls(cfg.flow.backend, cfg.flow.compensate_camera, cfg.data.short_side, cfg.target.fb_check)

    def expected_meta(self) -> dict[str, Any]:
        return expected_meta(self.backend, self.compensate_camera, self.short_side, backward=self.backward,
                             shot_detector=SHOT_DETECTOR)


@dataclass(frozen=True)
class VideoJob:
    rel: str  # the video as written in the list
    video: Path  # the file it resolves to
    cache: Path  # its flow cache
    decoded: Path | None = None  # its decoded-cache entry (None: data.decoded_cache is off)


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N; None -> (0, 1), the whole list."""
    if shard is None:
        return 0, 1
    index, sep, count = str(shard).partition("/")
    if sep and index.strip().isdigit() and count.strip().isdigit():
        i, n = int(index), int(count)
        if n >= 1 and i < n:
            return i, n
    raise ValueError(f"--shard must be i/N with 0 <= i < N (e.g. 0/4 ... 3/4), got {shard!r}")


def listed_videos(paths: Paths, dataset: str, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Every video of the dataset's lists of `splits`, in that order, each once (first occurrence)."""
    files = [paths.list_file(dataset, split) for split in splits if paths.list_file(dataset, split).is_file()]
    if not files:
        raise FileNotFoundError(f"no video lists for {dataset!r} in {paths.lists_dir(dataset)}; "
                                f"run `mme download --dataset {dataset}` first")
    return list(dict.fromkeys(rel for file in files for rel, _ in read_list(file)))


def parse_splits(splits: tuple[str, ...] | str) -> tuple[str, ...]:
    """'train,val' or a tuple -> the split names, each checked against SPLITS."""
    names = tuple(s.strip() for s in splits.split(",")) if isinstance(splits, str) else tuple(splits)
    unknown = [name for name in names if name not in SPLITS]
    if unknown or not names:
        raise ValueError(f"--splits must name some of {', '.join(SPLITS)} separated by commas, got {splits!r}")
    return names


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would only compete


_ESTIMATORS: dict[FlowSettings, FlowEstimator] = {}


def _estimator(settings: FlowSettings) -> FlowEstimator:
    """One estimator per process and settings, reused for every video the process handles."""
    if settings not in _ESTIMATORS:
        _ESTIMATORS[settings] = FlowEstimator(settings.backend, settings.compensate_camera)
    return _ESTIMATORS[settings]


def _remove_stale_temps(cache: Path) -> None:
    """Temp files of a writer killed before its rename (`.name.*`; see utils.atomic_path)."""
    for stale in cache.parent.glob(f".{cache.name}.*"):
        stale.unlink(missing_ok=True)


def _decoded_record(job: VideoJob, settings: FlowSettings, frames, stored: FlowCache) -> dict[str, Any]:
    """Reuse or (re)write the video's decoded-cache entry; `frames`: the frames just decoded, or None."""
    if job.decoded is None:
        return {}
    # Flow just made: the entry is rewritten from the frames at hand, whatever an old one holds.
    if frames is not None or entry_problem(job.decoded, job.video, settings.short_side, stored) is not None:
        if frames is None:
            frames = read_frames(job.video, range(stored.num_pairs + 1), short_side=settings.short_side)
        remove_stale_temps(job.decoded)
        write_entry(job.decoded, job.video, frames, stored, settings.short_side)
        status = "written"
    else:
        status = "reused"
    size = sum(f.stat().st_size for f in job.decoded.iterdir())
    return {"decoded": status, "decoded_bytes": size}


def process_video(job: VideoJob, settings: FlowSettings) -> dict[str, Any]:
    """Reuse or (re)make one video's flow cache, and its decoded-cache entry when `job.decoded` is set.

    Returns a record with `video`, `status` (`reused`, `extracted` or `skipped`), and for a cache that
    exists afterwards `pairs`, `cuts` (shot cuts found), `bytes`, `float32_bytes`, with the decoded cache
    `decoded` (`reused` or `written`) and `decoded_bytes`; `reason` for a skip or a redo, `seconds` of work.
    """
    frames = None
    start = time.perf_counter()
    record: dict[str, Any] = {"video": job.rel}
    problem = cache_problem(job.cache, settings.expected_meta())
    if problem is None:
        record["status"] = "reused"
    else:
        if problem != "missing":
            record["reason"] = f"redone: {problem}"
        try:
            num_frames = video_info(job.video).num_frames
            if num_frames < 2:
                raise VideoError(f"video {job.video} has only {num_frames} frame; flow needs at least 2")
            frames = read_frames(job.video, range(num_frames), short_side=settings.short_side)
            flow = _estimator(settings)(frames)
            # Backward pair i (frame i+1 -> i) is pair T-2-i of the reversed video.
            backward = _estimator(settings)(frames[::-1].copy())[::-1] if settings.backward else None
            cuts = detect_cuts(frames, flow)
            _remove_stale_temps(job.cache)
            save_flow(job.cache, flow, {**settings.expected_meta(), "source": job.rel, "cuts": cuts,
                                        "source_bytes": job.video.stat().st_size}, backward=backward)
        except VIDEO_FAILURES as exc:
            # A stale cache of a video that can no longer be read must not pass for its flow.
            job.cache.unlink(missing_ok=True)
            if job.decoded is not None:
                shutil.rmtree(job.decoded, ignore_errors=True)
            return record | {"status": "skipped", "reason": str(exc) or type(exc).__name__,
                             "seconds": time.perf_counter() - start}
        record["status"] = "extracted"
    stored = load_flow(job.cache)
    try:
        record |= _decoded_record(job, settings, frames, stored)
    except VIDEO_FAILURES as exc:  # the flow cache stands; only the optional entry is missing
        record["decoded_failure"] = str(exc) or type(exc).__name__
    num_pairs, height, width, _ = stored.shape
    return record | {"pairs": num_pairs, "cuts": len(stored.meta.get("cuts", [])), "bytes": job.cache.stat().st_size,
                     "float32_bytes": num_pairs * height * width * 2 * FLOAT32_BYTES,
                     "seconds": time.perf_counter() - start}


def _outcomes(jobs: list[VideoJob], settings: FlowSettings, workers: int):
    """Records of `process_video` for every job, in completion order (a process pool when workers > 1)."""
    work = partial(process_video, settings=settings)
    if workers <= 1 or len(jobs) <= 1:
        yield from map(work, jobs)
        return
    # spawn: the parent may hold MLflow's database connection and threads, which fork would copy.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        yield from pool.imap_unordered(work, jobs, chunksize=1)


def _plan(workdir: Path, dataset: str, videos: list[str],
          decoded: bool = False) -> tuple[list[VideoJob], list[tuple[str, str]]]:
    """Jobs for the videos, and the videos whose cache name another video already takes."""
    jobs, collisions, owners = [], [], {}
    for rel in videos:
        cache = flow_cache_path(workdir, dataset, rel)
        if cache in owners:
            collisions.append((rel, f"its flow cache {cache} is already used by {owners[cache]}"))
            continue
        owners[cache] = rel
        entry = decoded_entry_path(workdir, dataset, rel) if decoded else None
        jobs.append(VideoJob(rel, resolve_video(workdir, rel), cache, entry))
    return jobs, collisions


def _summary(num_videos: int, records: list[dict[str, Any]], skipped: list[tuple[str, str]], seconds: float,
             settings: FlowSettings, shard: tuple[int, int], workers: int) -> dict[str, Any]:
    done = [r for r in records if r["status"] != "skipped"]
    extracted = [r for r in done if r["status"] == "extracted"]
    extracted_pairs = sum(r["pairs"] for r in extracted)
    bytes_on_disk = sum(r["bytes"] for r in done)
    float32_bytes = sum(r["float32_bytes"] for r in done)
    return {
        "videos": num_videos,
        "extracted": len(extracted),
        "reused": len(done) - len(extracted),
        "skipped": [{"video": video, "reason": reason} for video, reason in skipped],
        "num_skipped": len(skipped),
        "redone": sorted(r["video"] for r in extracted if "reason" in r),
        "frame_pairs": sum(r["pairs"] for r in done),
        "shot_cuts": sum(r["cuts"] for r in done),
        "extracted_pairs": extracted_pairs,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(extracted_pairs / seconds, 1) if extracted_pairs else 0.0,
        "bytes_on_disk": bytes_on_disk,
        "float32_bytes": float32_bytes,
        "compression": round(float32_bytes / bytes_on_disk, 2) if bytes_on_disk else 0.0,
        "decoded_written": sum(r.get("decoded") == "written" for r in done),
        "decoded_bytes": sum(r.get("decoded_bytes", 0) for r in done),
        "decoded_failed": sum("decoded_failure" in r for r in done),
        "backend": settings.backend,
        "compensate_camera": settings.compensate_camera,
        "short_side": settings.short_side,
        "workers": workers,
        "shard": f"{shard[0]}/{shard[1]}",
    }


def run(cfg: Config, workdir: str | Path, workers: int | None = None, shard: str | None = None,
        splits: tuple[str, ...] | str = FLOW_SPLITS) -> dict[str, Any]:
    """Cache the flow of every video listed in `splits` (or of shard `i/N` of them); returns the stage metrics.

    Args:
        cfg: resolved config (`data.dataset`, `data.short_side`, `flow.*`).
        workdir: root of `data/` and `reports/`.
        workers: extraction processes (default `cfg.flow.workers`); 1 runs in this process.
        shard: `i/N` to process only every N-th video starting at the i-th (0-based).
        splits: the lists to read (default `FLOW_SPLITS`, what the stages need; `SPLITS` for all), or
            their names separated by commas (`--splits train,val,test`).

    Raises:
        ExtractError: videos were listed but none has a flow cache afterwards.
    """
    paths = Paths(workdir)
    dataset = cfg.data.dataset
    splits = parse_splits(splits)
    shard_index, shard_count = parse_shard(shard)
    workers = cfg.flow.workers if workers is None else workers
    settings = FlowSettings.of(cfg)
    videos = listed_videos(paths, dataset, splits)[shard_index::shard_count]
    jobs, skipped = _plan(paths.workdir, dataset, videos, decoded=cfg.data.decoded_cache)
    paths.decoded_dir(dataset).mkdir(parents=True, exist_ok=True)
    label = "extract" if shard_count == 1 else f"extract-shard-{shard_index}-of-{shard_count}"

    records = []
    with stage_run(cfg, paths.workdir, "extract", tags={"shard": f"{shard_index}/{shard_count}"}):
        start = time.perf_counter()
        extracted_pairs = 0
        with tqdm(total=len(jobs), desc=f"extract {dataset}", unit="video") as bar:
            for record in _outcomes(jobs, settings, workers):
                records.append(record)
                if record["status"] == "skipped":
                    bar.write(f"skipped {record['video']}: {record['reason']}")
                    skipped.append((record["video"], record["reason"]))
                elif record["status"] == "extracted":
                    extracted_pairs += record["pairs"]
                if "decoded_failure" in record:
                    bar.write(f"no decoded-cache entry for {record['video']}: {record['decoded_failure']}")
                bar.set_postfix(pairs_per_s=f"{extracted_pairs / (time.perf_counter() - start):.0f}")
                bar.update()
        skipped.sort()
        metrics = _summary(len(videos), records, skipped, time.perf_counter() - start, settings,
                           (shard_index, shard_count), workers) | {"splits": list(splits)}
        report_skipped(paths.skipped_file, label, skipped, log=False)  # named live above
        write_metrics(paths.metrics_dir / f"{label}.json", metrics)
        log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if metrics["videos"] and not metrics["extracted"] + metrics["reused"]:
            raise ExtractError(f"no flow could be extracted for any of the {metrics['videos']} videos of "
                               f"{dataset!r} (see {paths.skipped_file}); first failure: {skipped[0][1]}")
    return metrics
