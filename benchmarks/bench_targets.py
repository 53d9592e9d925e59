"""Target-building speed, on one core.

Measures, on generated mini motion videos (16 x 112 x 112 clips, stride 3, K=4, L=6, interpolation on):
- building the per-token target of every registered kind from the decoded, augmented frames and the cached
  flow of one clip (`TargetSpec.build`: tracking, descriptors, patch norm);
- the same clips built in batch (`TargetSpec.build_batch` on a `TargetBatch` of `--batch` clips, as the
  training step does) side by side with one `build` per clip of the same clips, in the same run: ms per
  clip of each path and their ratio, at 112 x 112 for every kind and at 224 x 224 (`--sizes`) for `traj`
  (the stacking into a batch, `TargetBatch.collate`, is timed apart: the DataLoader's collate does it);
  for `traj` also the batched path with the compiled CPU kernels off (`mme.motion.backends`, the torch path)
  and the ratio of the two;
- the compiled kernels' first call in a fresh process: with an empty numba cache (the compile, as on a fresh
  CI machine) and again with the cache it left (every later process);
- the whole `PretrainDataset.__getitem__` (decode + flow-cache read + crop/resize/flip of frames and flow +
  targets + mask + normalisation), with its parts timed separately.

`torch.set_num_threads(1)` and `cv2.setNumThreads(1)` (as a DataLoader worker should run); wall-clock and
process CPU time, medians and minima over repeats. The machine's load average is recorded beside the
figures: on shared cores every number grows with it (the CPU-time minimum is the figure least disturbed by
other processes, and the one checked against the budget).

Prints a table and writes benchmarks/results/targets.json. Usage:
    python benchmarks/bench_targets.py [--videos 6] [--repeats 20] [--kinds traj pixel ...] [--batch 16]
        [--sizes 112 224] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import torch
import torch.nn.functional as F
from bench_device import make_set  # benchmarks/, beside this script

import mme.datasets.clips as datasets_module
import mme.motion.backends as backends
from mme.config import load_config
from mme.datasets import PretrainDataset, item_rng
from mme.targets import TARGETS, TargetBatch, TargetInputs
from mme.utils import write_json

MINI_SIZE = 128
BUDGET_MS = 5.0  # `traj` per clip per core at 16 x 112 x 112, built in batch
# The steps of PretrainDataset.__getitem__ timed separately (functions looked up in mme.datasets.clips).
STEPS = {"decode": "read_frames", "flow_read": "load_flow", "augment_frames": "crop_frames",
         "augment_flow": "crop_flow", "mask": "make_mask", "normalize": "normalize"}


def make_workdir(root: Path, num_videos: int) -> Path:
    """Generated mini videos, a train list and their flow cache (as the mini preset extracts it, DIS)."""
    make_set(root, "mini", num_videos, MINI_SIZE, workers=1)
    return root


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(seconds) * 1e3, 2), "min_ms": round(min(seconds) * 1e3, 2)}


def time_build(workdir: Path, kind: str, repeats: int) -> dict[str, float]:
    """Median/min ms of `build` for one clip: fresh TargetInputs each time (gray images included)."""
    cfg = load_config("mini", [f"target.kind={kind}"])
    dataset = PretrainDataset(cfg, workdir)
    sample = dataset.load(0, item_rng(cfg.seed, 0, 0))
    frames, offsets, flow = sample.inputs.frames, sample.inputs.offsets, sample.inputs.flow
    spec = TARGETS[kind]
    spec.build(TargetInputs(frames, offsets, flow), cfg)  # warm-up
    seconds, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        spec.build(TargetInputs(frames, offsets, flow), cfg)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return summary(seconds) | {"cpu_median_ms": summary(cpu)["median_ms"], "cpu_min_ms": summary(cpu)["min_ms"],
                               "frames": int(len(frames)), "flow_pairs": int(len(flow)) if flow is not None else 0,
                               "width": int(sum(spec.parts(cfg).values()))}


def cpu_times(function, repeats: int) -> list[float]:
    """Process CPU seconds of `function()` per repeat, after one warm-up call."""
    function()
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        seconds.append(time.process_time() - start)
    return seconds


def upscaled(inputs: TargetInputs, size: int) -> TargetInputs:
    """The clip bilinearly resized to size x size (flow vectors scaled with it): the mini videos are 128 px."""
    def resize(x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
        return out.permute(0, 2, 3, 1).contiguous()

    flow = None if inputs.flow is None else resize(inputs.flow) * (size / inputs.flow.shape[1])
    return TargetInputs(resize(inputs.frames), inputs.offsets, flow)


def time_batched(workdir: Path, kind: str, size: int, batch: int, repeats: int) -> dict:
    """ms per clip of `build` on each of `batch` clips against one `build_batch` of them (CPU time).

    Clips of the mini dataset (112 px); other sizes are those clips upscaled (`upscaled`).
    """
    cfg = load_config("mini", [f"target.kind={kind}"])
    dataset = PretrainDataset(cfg, workdir)
    # Distinct clips: every video, several epochs' starts and crops.
    items = [dataset.load(i % len(dataset), item_rng(cfg.seed, i // len(dataset), i % len(dataset))).inputs
             for i in range(batch)]
    if size != cfg.data.input_size:
        cfg = load_config("mini", [f"target.kind={kind}", f"data.input_size={size}", f"data.short_side={size}"])
        items = [upscaled(item, size) for item in items]
    spec = TARGETS[kind]
    stacked = TargetBatch.collate(items)

    def per_clip():
        for item in items:
            spec.build(TargetInputs(item.frames, item.offsets, item.flow), cfg)

    def batched():  # a fresh batch: its gray images are computed inside, as in the training step
        spec.build_batch(TargetBatch(stacked.frames, stacked.offsets, stacked.flow, stacked.flow_pairs), cfg)

    rounds = max(1, repeats // 4)
    alone, together, torch_path = [], [], []
    for _ in range(2):  # interleaved, so that a change of machine load hits both paths
        alone += cpu_times(per_clip, rounds)
        together += cpu_times(batched, rounds)
        if kind == "traj":
            torch_path += torch_path_times(batched, rounds)
    collate = cpu_times(lambda: TargetBatch.collate(items), rounds)
    per_clip_ms = {"min": min(alone) * 1e3 / batch, "median": statistics.median(alone) * 1e3 / batch}
    batch_ms = {"min": min(together) * 1e3 / batch, "median": statistics.median(together) * 1e3 / batch}
    row = {"size": size, "batch": batch, "per_clip_cpu_ms": {k: round(v, 2) for k, v in per_clip_ms.items()},
           "batched_cpu_ms_per_clip": {k: round(v, 2) for k, v in batch_ms.items()},
           "speedup_min": round(per_clip_ms["min"] / batch_ms["min"], 2),
           "collate_cpu_ms_per_clip": round(min(collate) * 1e3 / batch, 2)}
    if torch_path:
        torch_ms = min(torch_path) * 1e3 / batch
        row |= {"batched_torch_path_cpu_ms_per_clip_min": round(torch_ms, 2),
                "kernel_speedup_min": round(torch_ms / batch_ms["min"], 2)}
    return row


def torch_path_times(function, repeats: int) -> list[float]:
    """`cpu_times` with the compiled CPU kernels off (the torch path of `mme.motion`)."""
    backends.COMPILED_KERNELS = False
    try:
        return cpu_times(function, repeats)
    finally:
        backends.COMPILED_KERNELS = True


FIRST_CALL = """
import time, torch
start = time.perf_counter()
from mme.motion import _kernels
from mme.motion.descriptors import hog_at_points
from mme.motion.tracking import track_points
imported = time.perf_counter()
hog_at_points(torch.rand(2, 32, 32), torch.tensor([0, 1]), torch.tensor([[3.5, 4.0], [20.2, 31.0]]))
track_points(torch.rand(2, 32, 32, 2), torch.tensor([[3.5, 4.0]]), torch.tensor([0]), 2)
print(imported - start, time.perf_counter() - imported)
"""


def first_call_seconds() -> dict[str, float]:
    """Seconds to import numba + the kernels and to run their first call, in fresh processes: with an empty
    numba cache (compile) and then with the cache that run wrote."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, MME_COMPILED_KERNELS="1")
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, check=True, capture_output=True,
                                 text=True).stdout.split()
            runs.append([round(float(x), 2) for x in out])
    return {"import_s": runs[0][0], "compile_first_call_s": runs[0][1], "cached_first_call_s": runs[1][1]}


@contextlib.contextmanager
def step_timers(buckets: dict[str, list[float]]):
    """Wrap the functions `__getitem__` calls (as named in mme.datasets.clips) with timers."""
    originals = {name: getattr(datasets_module, attr) for name, attr in STEPS.items()}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                buckets[name][-1] += time.perf_counter() - start
        return wrapper

    def timed_cache(path):  # the cache's metadata and its window read both count as the flow read
        cache = originals["flow_read"](path)
        cache.window = timed("flow_read", cache.window)
        return cache

    for name, attr in STEPS.items():
        setattr(datasets_module, attr, timed(name, originals[name]))
    datasets_module.load_flow = timed("flow_read", timed_cache)
    try:
        yield
    finally:
        for name, attr in STEPS.items():
            setattr(datasets_module, attr, originals[name])


def time_getitem(workdir: Path, repeats: int) -> dict:
    """The whole `__getitem__` of the default (traj) dataset, over every video, and its steps."""
    cfg = load_config("mini")
    dataset = PretrainDataset(cfg, workdir)
    dataset[0]  # warm-up
    total, cpu, buckets = [], [], defaultdict(list)
    with step_timers(buckets):
        for epoch in range(repeats):
            dataset.set_epoch(epoch)
            for index in range(len(dataset)):
                for name in STEPS:
                    buckets[name].append(0.0)
                start, start_cpu = time.perf_counter(), time.process_time()
                dataset[index]
                total.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    steps = {name: summary(values)["median_ms"] for name, values in buckets.items()}
    steps["targets_and_rest"] = round(summary(total)["median_ms"] - sum(steps.values()), 2)
    return {"kind": cfg.target.kind, "items": len(total), **summary(total), "cpu_median_ms": summary(cpu)["median_ms"],
            "cpu_min_ms": summary(cpu)["min_ms"], "steps_median_ms": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kinds", nargs="*", default=list(TARGETS), help="target kinds to time (default: all)")
    parser.add_argument("--batch", type=int, default=16, help="clips per batch of the batched path")
    parser.add_argument("--sizes", nargs="*", type=int, default=[112, 224],
                        help="input sizes of the batched comparison (every kind at the first, traj at the others)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "targets.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # the data path also calls OpenCV (resize, colour, merge)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = make_workdir(Path(tmp), args.videos)
        load_before = os.getloadavg()
        build = {kind: time_build(workdir, kind, args.repeats) for kind in args.kinds}
        batched = [time_batched(workdir, kind, args.sizes[0], args.batch, args.repeats) | {"kind": kind}
                   for kind in args.kinds]
        batched += [time_batched(workdir, "traj", size, args.batch, args.repeats) | {"kind": "traj"}
                    for size in args.sizes[1:] if "traj" in args.kinds]
        getitem = time_getitem(workdir, max(1, args.repeats // 4))
        load_after = os.getloadavg()
    kernels = first_call_seconds()
    cfg = load_config("mini")
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)]},
        "clip": {"frames": cfg.data.num_frames, "size": cfg.data.input_size, "stride": cfg.data.stride,
                 "points_per_patch": cfg.target.points_per_patch, "length": cfg.target.length,
                 "interpolate": cfg.target.interpolate, "flow_backend": cfg.flow.backend},
        "build_ms": build,
        "batched": batched,
        "compiled_kernels": kernels,
        "budget_ms": BUDGET_MS,
        "traj_batched_within_budget": next((row["batched_cpu_ms_per_clip"]["min"] <= BUDGET_MS for row in batched
                                            if row["kind"] == "traj" and row["size"] == 112), None),
        "getitem_ms": getitem,
    }
    write_json(args.out, results)
    print_table(results)
    print(f"wrote {args.out}")


def print_table(results: dict) -> None:
    print(f"target build, one mini clip, 1 thread (load avg {results['machine']['load_average_1min']}):")
    for kind, row in results["build_ms"].items():
        print(f"  {kind:14s} wall {row['median_ms']:7.2f} ms median {row['min_ms']:7.2f} min | cpu "
              f"{row['cpu_median_ms']:7.2f} median {row['cpu_min_ms']:7.2f} min | width {row['width']}")
    print("batched (TargetSpec.build_batch) vs one build per clip, CPU ms per clip, 1 thread:")
    for row in results["batched"]:
        alone, together = row["per_clip_cpu_ms"], row["batched_cpu_ms_per_clip"]
        print(f"  {row['kind']:14s} {row['size']}px B={row['batch']}: per clip {alone['min']:7.2f} min "
              f"{alone['median']:7.2f} median | batched {together['min']:7.2f} min {together['median']:7.2f} "
              f"median | x{row['speedup_min']} | collate {row['collate_cpu_ms_per_clip']}")
        if "kernel_speedup_min" in row:
            print(f"  {'':14s} torch path (kernels off) {row['batched_torch_path_cpu_ms_per_clip_min']:7.2f} min"
                  f" | kernels x{row['kernel_speedup_min']}")
    kernels = results["compiled_kernels"]
    print(f"compiled kernels, fresh process: import {kernels['import_s']} s, first call "
          f"{kernels['compile_first_call_s']} s with an empty numba cache, {kernels['cached_first_call_s']} s cached")
    getitem = results["getitem_ms"]
    print(f"PretrainDataset.__getitem__ ({getitem['kind']}): wall {getitem['median_ms']:.2f} ms median | cpu "
          f"{getitem['cpu_median_ms']:.2f} median {getitem['cpu_min_ms']:.2f} min over {getitem['items']} items; "
          f"steps (wall medians): {getitem['steps_median_ms']}")


if __name__ == "__main__":
    main()
