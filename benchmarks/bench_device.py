"""Pre-training on an accelerator: targets built on the device, and the stage's loop against the bare step.

For a GPU machine (`--device cuda`); on CPU, `--smoke` runs every part at toy sizes as a check of the script.
In one run, on videos generated and flow extracted here by the project's own code (real MP4s, real caches):

1. targets, every registered kind (`--kinds`): a batch of `--batch` clips as `PretrainDataset(targets=False)`
   delivers them (crops, flips), built by `build_targets` on the device and on the CPU: the largest |difference|
   and the validity mismatches; then ms per clip on the device (synchronised; median and minimum of repeats) at
   the `mini` geometry (16x112x112 from 128 px videos) and, for `traj`, at the `paper` geometry (16x224x224
   from 256 px videos, Farneback flow as that preset extracts it).
2. the stage (`--preset`, default `paper`: ViT-B/16, 16x224x224, batch 32, bf16, 90 % tube): the stage's own
   loader (`pretrain_loader`: targets on the device, `data.num_workers` workers, pinned memory, persistent
   workers) and loop (`train_one_epoch`), clips/s per epoch; the same loop over one batch resident on the
   device, (a) with its targets given (the bare step: the ceiling) and (b) with its targets built in the step
   (what device targets cost); and the loader alone (iterated, no model): the data path's ceiling.
   ratio = stage / bare.

The flow is made by `mme.stages.extract.process_video` without the stage's MLflow run: a GPU image need not
carry MLflow, and nothing here is a result to track. Writes benchmarks/results/device.json.

    python benchmarks/bench_device.py --device cuda [--workers 10 15] [--out benchmarks/results/device.json]
    python benchmarks/bench_device.py --smoke            # CPU, minutes: the script itself
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import torch

from mme.config import SyntheticConfig, load_config
from mme.data.lists import relative_to_workdir, write_list
from mme.data.synthetic import generate
from mme.datasets import PretrainDataset
from mme.datasets.batching import build_targets, collate_inputs
from mme.engine.distributed import DistEnv
from mme.engine.loops import make_scaler, set_epoch, to_device, train_one_epoch
from mme.engine.optim import optimization
from mme.models import build_pretrainer
from mme.paths import Paths
from mme.stages import extract
from mme.stages.pretrain import batch_target_loss, pretrain_loader
from mme.targets import TARGETS, get_target
from mme.utils import write_json


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock reads what was computed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_set(root: Path, preset: str, videos: int, size: int, workers: int) -> dict:
    """`videos` generated videos of `size` px in a train list, and their flow caches as `preset` extracts them."""
    start = time.perf_counter()
    synthetic = SyntheticConfig(num_videos=videos, num_frames=64, size=size, workers=workers)
    rows = generate(Paths(root).raw_dir("synthetic"), synthetic, seed=0, progress=False)
    write_list(Paths(root).list_file("synthetic", "train"), [(relative_to_workdir(root, p), y) for p, y in rows])
    cfg = load_config(preset)
    settings = extract.FlowSettings.of(cfg)  # the preset leaves target.fb_check off: forward flow only
    jobs, _ = extract._plan(root, "synthetic", extract.listed_videos(Paths(root), "synthetic", ("train",)))
    records = list(extract._outcomes(jobs, settings, workers))
    failed = [r for r in records if r["status"] == "skipped"]
    if failed:
        raise RuntimeError(f"flow failed for {failed[:3]}")
    return {"videos": videos, "size": size, "flow": cfg.flow.backend, "seconds": round(time.perf_counter() - start, 1)}


def timed(function, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after one warm-up, synchronised on `device`."""
    function()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def target_check(root: Path, preset: str, kind: str, batch: int, device: torch.device, repeats: int) -> dict:
    """One batch's targets on the device against the CPU, and the device's ms per clip."""
    cfg = load_config(preset, [f"target.kind={kind}", "data.flip=on"])
    spec, inputs = get_target(cfg), PretrainDataset(cfg, root, targets=False)
    stacked = collate_inputs([inputs[i % len(inputs)] for i in range(batch)])
    on_cpu = build_targets(spec, cfg, stacked)
    on_device = to_device(stacked, device)
    got = build_targets(spec, cfg, on_device)
    valid_cpu, valid_dev = on_cpu["target_valid"], got["target_valid"].cpu()
    both = valid_cpu & valid_dev
    diff = (got["target"].cpu() - on_cpu["target"]).abs()[both]
    seconds = timed(lambda: build_targets(spec, cfg, on_device), device, repeats)
    return {"kind": kind, "preset": preset, "batch": batch, "size": cfg.data.input_size,
            "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
            "entries_over_1e-5": int((diff > 1e-5).sum()), "entries": int(both.sum()),
            "valid_mismatches": int((valid_cpu != valid_dev).sum()),
            "ms_per_clip_median": round(statistics.median(seconds) * 1e3 / batch, 3),
            "ms_per_clip_min": round(min(seconds) * 1e3 / batch, 3)}


def model_and_optimizer(cfg, device: torch.device, updates: int):
    torch.manual_seed(0)
    model = build_pretrainer(cfg).to(device)
    optimizer, scheduler, _ = optimization(cfg.pretrain, model, updates, 1, betas=cfg.pretrain.betas)
    return model, optimizer, scheduler


def run_loop(cfg, model, optimizer, scheduler, loader, device: torch.device, epochs: int) -> list[float]:
    """clips/s of each epoch of the stage's `train_one_epoch` over `loader`."""
    loss = batch_target_loss(cfg)
    speeds = []
    for epoch in range(epochs):
        if hasattr(loader, "sampler"):
            set_epoch(loader, epoch)
        stats = train_one_epoch(model, loader, optimizer, scheduler, loss, epoch=epoch, updates_per_epoch=len(loader),
                                device=device, amp=cfg.pretrain.amp, scaler=make_scaler(device, cfg.pretrain.amp),
                                show_progress=False)
        speeds.append(round(stats["clips_per_s"], 2))
    return speeds


def loader_alone(loader, epochs: int) -> list[float]:
    """clips/s of iterating the loader (workers decode, crop; the main process only receives)."""
    speeds = []
    for epoch in range(epochs):
        set_epoch(loader, epoch)
        start, clips = time.perf_counter(), 0
        for batch in loader:
            clips += len(batch["video"])
        speeds.append(round(clips / (time.perf_counter() - start), 2))
    return speeds


def stage_speed(root: Path, preset: str, workers: int, device: torch.device, epochs: int, steps: int,
                overrides: list[str]) -> dict:
    cfg = load_config(preset, [f"data.num_workers={workers}", "data.targets_on=device", *overrides])
    env = DistEnv(device=device)
    dataset = PretrainDataset(cfg, root, "train", targets=False)
    loader = pretrain_loader(cfg, dataset, env)
    out = {"preset": preset, "workers": workers, "batch": cfg.pretrain.batch_size, "clips": len(dataset),
           "steps_per_epoch": len(loader), "loader_alone_clips_per_s": loader_alone(loader, epochs)}
    model, optimizer, scheduler = model_and_optimizer(cfg, device, len(loader))
    out["stage_clips_per_s"] = run_loop(cfg, model, optimizer, scheduler, loader, device, epochs)
    inputs = to_device(next(iter(loader)), device)
    with_targets = build_targets(get_target(cfg), cfg, inputs)
    for name, batch in (("bare_clips_per_s", with_targets), ("device_targets_in_step_clips_per_s", inputs)):
        out[name] = run_loop(cfg, model, optimizer, scheduler, [batch] * steps, device, 2)[-1]
    warm = out["stage_clips_per_s"][1:] or out["stage_clips_per_s"]
    out["stage_warm_clips_per_s"] = round(statistics.mean(warm), 2)
    out["ratio_stage_to_bare"] = round(out["stage_warm_clips_per_s"] / out["bare_clips_per_s"], 3)
    return out


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="paper", help="the stage's preset (part 2)")
    parser.add_argument("--kinds", nargs="*", default=sorted(TARGETS))
    parser.add_argument("--batch", type=int, default=16, help="clips per target batch (part 1)")
    parser.add_argument("--videos", type=int, default=384, help="videos of the stage's set (part 2)")
    parser.add_argument("--workers", nargs="*", type=int, default=[10], help="loader workers to try (part 2)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: check the script on CPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "device.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    # This process forks the loader's workers after building targets and flow with OpenCV: a worker forked
    # while OpenCV's thread pool is busy can block for ever in its first OpenCV call (seen here).
    cv2.setNumThreads(1)
    # smoke: the `smoke` preset's tiny model on 32 px crops of the paper set's videos and flow caches
    smoke = ["flow.backend=farneback", "data.short_side=256", "data.input_size=32"]
    stage_preset, overrides = ("smoke", smoke) if args.smoke else (args.preset, [])
    report = {"environment": environment(device), "args": {k: str(v) for k, v in vars(args).items()}}
    pool = max(1, min(16, (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        mini, big = Path(tmp, "mini"), Path(tmp, "paper")
        report["sets"] = [make_set(mini, "mini", 4 if args.smoke else 32, 128, pool),
                          make_set(big, "paper", 8 if args.smoke else args.videos, 256, pool)]
        print(report["sets"], flush=True)
        report["targets"] = [target_check(mini, "mini", kind, args.batch, device, args.repeats) for kind in args.kinds]
        report["targets"].append(target_check(big, "paper", "traj", args.batch, device, args.repeats))
        for row in report["targets"]:
            print(row, flush=True)
        report["stage"] = []
        for workers in args.workers:
            report["stage"].append(stage_speed(big, stage_preset, workers, device, args.epochs,
                                               4 if args.smoke else 20, overrides))
            print(report["stage"][-1], flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
