"""Flow extraction speed and cache size (issue 3, "Speed"; README, Speed).

Measures, on generated motion videos (mme.data.synthetic):
- flow-only throughput in frame pairs/s of every backend at the mini resolution (128 px), in one process
  and in a pool of 2 processes (one OpenCV thread each), frames decoded beforehand, plus pairs per
  CPU-second (what a dedicated core gives: the 2 cores are often shared, so the load average is recorded);
- the DIS presets side by side (speed and median error on a known sub-pixel translation), which is how
  the `dis` backend's preset was chosen;
- the whole extract stage (decode + flow + quantise + compressed save) with workers=1 and 2;
- cache size per mini video (64 frames, 128 px) and for a 10 s 320x240 video (250 frames), against raw
  float32 flow, and the worst quantisation error of the cached flow.

Prints a table and writes benchmarks/results/extract.json. Usage:
    python benchmarks/bench_extract.py [--videos 8] [--tvl1-pairs 16] [--out benchmarks/results/extract.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from mme.config import SyntheticConfig, load_config
from mme.data.lists import relative_to_workdir, write_list
from mme.data.synthetic import generate
from mme.data.video import read_frames, video_info
from mme.motion.cache import load_flow, save_flow
from mme.motion.flow import BACKENDS, FlowEstimator
from mme.paths import Paths
from mme.stages import extract

MINI_SIZE, MINI_FRAMES = 128, 64
LONG_SIZE, LONG_FRAMES = (240, 320), 250  # a 10 s video at 25 fps, 320x240
DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def _single_thread() -> None:
    cv2.setNumThreads(1)


def _flow_of(task: tuple[np.ndarray, str]) -> int:
    frames, backend = task
    FlowEstimator(backend)(frames)
    return len(frames) - 1


def cpu_rate(clips: list[np.ndarray], backend: str) -> float:
    """Frame pairs per CPU-second of one OpenCV thread in this process.

    On a machine whose cores are shared with other work, wall-clock rates fall with the load; CPU time
    does much less, so this is the rate one dedicated core would give.
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    start = time.process_time()
    pairs = sum(map(_flow_of, [(clip, backend) for clip in clips]))
    seconds = time.process_time() - start
    cv2.setNumThreads(previous)
    return pairs / seconds


def flow_throughput(clips: list[np.ndarray], backend: str, workers: int) -> float:
    """Wall-clock frame pairs/s of `backend` over `clips` with `workers` single-threaded processes."""
    tasks = [(clip, backend) for clip in clips]
    if workers == 1:
        previous = cv2.getNumThreads()
        cv2.setNumThreads(1)
        start = time.perf_counter()
        pairs = sum(map(_flow_of, tasks))
        seconds = time.perf_counter() - start
        cv2.setNumThreads(previous)
        return pairs / seconds
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_single_thread) as pool:
        pool.map(_flow_of, [(clip[:2], backend) for clip in clips[:workers]])  # start-up, outside the clock
        start = time.perf_counter()
        pairs = sum(pool.imap_unordered(_flow_of, tasks, chunksize=1))
        return pairs / (time.perf_counter() - start)


def dis_preset_table(size: int = MINI_SIZE, shift=(1.3, -0.7), repeats: int = 200) -> dict[str, dict]:
    """Speed (one thread) and median end-point error on a sub-pixel translation, per DIS preset."""
    noise = np.random.default_rng(0).random((size, size)).astype(np.float32)
    first = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 2.0), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    second = cv2.warpAffine(first, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (size, size),
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    table = {}
    for name, preset in DIS_PRESETS.items():
        dis = cv2.DISOpticalFlow_create(preset)
        flow = dis.calc(first, second, None)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            dis.calc(first, second, None)
        seconds = (time.perf_counter() - start) / repeats
        cpu_seconds = (time.process_time() - cpu_start) / repeats
        error = np.linalg.norm(flow[16:-16, 16:-16] - np.float32(shift), axis=-1)
        table[name] = {"pairs_per_s_1_thread": round(1 / seconds, 1), "per_cpu_second": round(1 / cpu_seconds, 1),
                       "median_error_px": round(float(np.median(error)), 4)}
    cv2.setNumThreads(previous)
    return table


def make_mini_workdir(root: Path, num_videos: int, seed: int = 0) -> list[str]:
    """A workdir with `num_videos` generated mini videos and a train list; returns the list paths."""
    cfg = SyntheticConfig(num_videos=num_videos, num_frames=MINI_FRAMES, size=MINI_SIZE, workers=1)
    rows = generate(Paths(root).raw_dir("synthetic"), cfg, seed, progress=False)
    listed = [(relative_to_workdir(root, path), label) for path, label in rows]
    write_list(Paths(root).list_file("synthetic", "train"), listed)
    return [rel for rel, _ in listed]


def stage_throughput(source: Path, workers: int) -> dict:
    """The extract stage in a fresh workdir beside `source` that reads its videos and lists (nothing reused).

    The workdir outlives the call: MLflow keeps its SQLite store open for the rest of the process.
    """
    workdir = source / f"stage-workers-{workers}"
    lists = Paths(workdir).lists_dir("synthetic")
    lists.parent.mkdir(parents=True)
    (workdir / "data" / "raw").symlink_to(source / "data" / "raw")
    lists.symlink_to(Paths(source).lists_dir("synthetic"))
    return extract.run(load_config("mini", ["flow.backend=dis"]), workdir, workers=workers)


def long_video_cache(root: Path) -> dict:
    """Cache size and extraction speed of a 10 s 320x240 video (DIS), against float32."""
    cfg = SyntheticConfig(num_videos=1, num_frames=LONG_FRAMES, size=LONG_SIZE[1], workers=1)
    (path, _), = generate(root / "long", cfg, seed=1, progress=False)
    frames = read_frames(path, range(video_info(path).num_frames))
    top = (LONG_SIZE[1] - LONG_SIZE[0]) // 2
    frames = np.ascontiguousarray(frames[:, top:top + LONG_SIZE[0]])  # 320x320 -> 320x240
    start = time.perf_counter()
    flow = FlowEstimator("dis")(frames)
    seconds = time.perf_counter() - start
    cache = root / "long.npz"
    save_flow(cache, flow, {"backend": "dis"})
    error = float(np.abs(load_flow(cache).window(0, len(flow)) - flow).max())
    return {"frames": len(frames), "height": LONG_SIZE[0], "width": LONG_SIZE[1], "cache_bytes": cache.stat().st_size,
            "float32_bytes": flow.nbytes, "ratio": round(flow.nbytes / cache.stat().st_size, 2),
            "dis_pairs_per_s_default_threads": round(len(flow) / seconds, 1), "max_quantisation_error_px": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8, help="generated mini videos (64 frames, 128 px)")
    parser.add_argument("--tvl1-pairs", type=int, default=16, help="pairs per video for the slow TV-L1 backend")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "extract.json")
    args = parser.parse_args()

    results: dict = {"machine": {"cpus": os.cpu_count(), "opencv": cv2.__version__, "python": platform.python_version(),
                                 "processor": platform.processor() or platform.machine(),
                                 "load_average_at_start": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        root = Path(tmp)
        videos = make_mini_workdir(root, args.videos)
        clips = [read_frames(root / rel, range(video_info(root / rel).num_frames), short_side=MINI_SIZE)
                 for rel in videos]

        flow_rows = {}
        for backend in BACKENDS:
            subset = [clip[:args.tvl1_pairs + 1] for clip in clips[:4]] if backend == "tvl1" else clips
            flow_rows[backend] = {f"workers_{w}": round(flow_throughput(subset, backend, w), 1) for w in (1, 2)}
            flow_rows[backend]["per_cpu_second"] = round(cpu_rate(subset, backend), 1)
            flow_rows[backend]["pairs_measured"] = sum(len(c) - 1 for c in subset)
        results["flow_pairs_per_s_128px"] = flow_rows
        results["dis_presets_128px"] = dis_preset_table()

        stage = {f"workers_{w}": stage_throughput(root, w) for w in (1, 2)}
        results["stage_dis_128px"] = {k: {m: v[m] for m in ("pairs_per_s", "extracted_pairs", "seconds")}
                                      for k, v in stage.items()}
        mini = stage["workers_1"]
        per_video = mini["bytes_on_disk"] / max(mini["extracted"] + mini["reused"], 1)
        results["cache_mini_video"] = {"frames": MINI_FRAMES, "size": MINI_SIZE, "cache_bytes": round(per_video),
                                       "float32_bytes": mini["float32_bytes"] // max(mini["extracted"], 1),
                                       "ratio": mini["compression"]}
        errors = []
        for rel, clip in zip(videos[:2], clips[:2]):
            flow = FlowEstimator("dis")(clip)
            path = root / "check" / f"{Path(rel).stem}.npz"
            save_flow(path, flow, {})
            errors.append(float(np.abs(load_flow(path).window(0, len(flow)) - flow).max()))
        results["cache_mini_video"]["max_quantisation_error_px"] = max(errors)
        results["cache_10s_320px_video"] = long_video_cache(root)

    results["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)  # other work sharing the cores
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def print_table(results: dict) -> None:
    machine = results["machine"]
    print(f"\nflow extraction at {MINI_SIZE} px ({machine['cpus']} CPUs, OpenCV {machine['opencv']}, load average "
          f"{machine['load_average_at_start']} at start, {machine['load_average_at_end']} at end)")
    print(f"{'backend':<12}{'pairs/s, 1 worker':>20}{'pairs/s, 2 workers':>20}{'pairs per CPU-s':>18}")
    for backend, row in results["flow_pairs_per_s_128px"].items():
        print(f"{backend:<12}{row['workers_1']:>20.1f}{row['workers_2']:>20.1f}{row['per_cpu_second']:>18.1f}")
    print(f"\n{'DIS preset':<12}{'pairs/s, 1 thread':>20}{'pairs per CPU-s':>18}{'median error px':>18}")
    for name, row in results["dis_presets_128px"].items():
        print(f"{name:<12}{row['pairs_per_s_1_thread']:>20.1f}{row['per_cpu_second']:>18.1f}"
              f"{row['median_error_px']:>18.4f}")
    stage = results["stage_dis_128px"]
    print("\nextract stage (decode + DIS + save):",
          ", ".join(f"{k.replace('_', '=')}: {v['pairs_per_s']:.0f} pairs/s" for k, v in stage.items()))
    for name in ("cache_mini_video", "cache_10s_320px_video"):
        row = results[name]
        print(f"{name}: {row['cache_bytes'] / 1e6:.2f} MB on disk vs {row['float32_bytes'] / 1e6:.2f} MB float32 "
              f"(x{row['ratio']}), max quantisation error {row['max_quantisation_error_px']:.5f} px")


if __name__ == "__main__":
    main()
