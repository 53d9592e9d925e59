"""Whole-stage speed: the `mini` pre-training and fine-tuning stages' clips/s against the model's bare step.

In one run: a small `mini`-geometry set is generated and its flow extracted into a temp workdir (real MP4s,
real flow caches); then the real `pretrain` stage trains `--epochs` epochs per loader setting
(`data.targets_on` device|loader, `data.num_workers`, the main process's torch threads); its clips/s is the
mean of the epochs after the first (warm workers); the same model's bare training step (forward + masked loss
+ backward + AdamW, bf16, in-memory random input, the stage's batch) gives the ceiling; ratio = stage / bare.
The same for `finetune` (the decode-only path; classifier step, cross-entropy). A profile splits one clip's
loader work on one thread into decode, flow read, resize+crop of frames and flow, luma and padding, and the
targets (per clip of a batch built in one `build_batch` call), three ways: decoding the video and inflating the
`.npz` flow (`data.decoded_cache=false`), reading the on-disk decoded cache that extract wrote
(`data.decoded_cache=true`, memory-mapped `.npy` files, warm page cache), and a reference where every video's
frames and float flow are held in memory. `--profile-only` runs just the profile (no training).

    python benchmarks/bench_pipeline.py [--videos 128] [--epochs 3] [--out benchmarks/results/pipeline.json]
    python benchmarks/bench_pipeline.py --profile-only --videos 48 --out benchmarks/results/pipeline_profile.json
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mme.config import load_config
from mme.data.masking import make_mask
from mme.engine.loops import autocast
from mme.engine.optim import build_optimizer
from mme.models import build_classifier, build_pretrainer
from mme.targets import TargetGeometry, target_parts
from mme.utils import write_json

# (targets_on, num_workers, main-process torch threads)
PRETRAIN_SETTINGS = [("device", 1, 1), ("device", 2, 1), ("loader", 2, 1), ("loader", 1, 1), ("loader", 2, 2),
                     ("device", 1, 2)]
FINETUNE_SETTINGS = [(None, 1, 1), (None, 2, 1), (None, 2, 2)]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def make_set(workdir: Path, videos: int) -> dict:
    from mme.stages import download, extract

    held_out = max(videos // 8, 1)  # small val/test splits: the bench times the train split only
    cfg = load_config("mini", [f"data.synthetic.num_videos={videos}", f"data.synthetic.val_videos={held_out}",
                               f"data.synthetic.test_videos={held_out}"])
    start = time.perf_counter()
    download.run(cfg, workdir)
    extract.run(cfg, workdir)  # mini: with the decoded cache
    return {"videos": videos, "prepare_s": round(time.perf_counter() - start, 1)}


def ensure_decoded(workdir: Path) -> None:
    """A set made before the decoded cache existed gets its entries (the flow caches are reused)."""
    from mme.stages import extract

    if not any((workdir / "data" / "decoded" / "synthetic").glob("*/*/meta.json")):
        extract.run(load_config("mini", ["data.decoded_cache=true"]), workdir)


def stage_speed(stage: str, workdir: Path, overrides: list[str], threads: int) -> dict:
    """clips/s of each epoch of the real stage (its plots CSV), warm = mean after the first epoch."""
    import mme.engine.loops as loops
    from mme.stages import finetune, pretrain

    torch.set_num_threads(threads)
    rule, loops.main_threads = loops.main_threads, lambda *_, **__: threads  # the setting overrides the rule
    cfg = load_config("mini", overrides)
    start, before = time.perf_counter(), load()
    try:
        (pretrain if stage == "pretrain" else finetune).run(cfg, workdir)
    finally:
        loops.main_threads = rule
    rows = list(csv.DictReader((workdir / "reports" / "plots" / f"{stage}.csv").open()))
    speeds = [float(r["clips_per_s"]) for r in rows]
    return {"clips_per_s_epochs": [round(s, 2) for s in speeds], "clips_per_s": round(float(np.mean(speeds[1:])), 2),
            "wall_s": round(time.perf_counter() - start, 1), "load_before": before, "load_after": load()}


def bare_pretrain_step(cfg, batch: int, steps: int) -> float:
    """clips/s of the model's training step on in-memory input (no loader)."""
    from mme.stages.pretrain import masked_motion_loss

    torch.manual_seed(0)
    model = build_pretrainer(cfg)
    geo = TargetGeometry.from_cfg(cfg)
    width = sum(target_parts(cfg).values())
    rng = np.random.default_rng(0)
    data = {"video": torch.randn(batch, 3, geo.num_frames, geo.input_size, geo.input_size),
            "mask": torch.from_numpy(np.stack([make_mask(cfg.mask.kind, cfg.mask.ratio, geo.grid, rng)
                                               for _ in range(batch)])),
            "target": torch.randn(batch, geo.num_tokens, width),
            "target_valid": torch.ones(batch, geo.num_tokens, width, dtype=torch.bool)}
    return _time_steps(model, lambda m: masked_motion_loss(m, data)[0], cfg.pretrain, batch, steps)


def bare_finetune_step(cfg, batch: int, steps: int, classes: int) -> float:
    torch.manual_seed(0)
    model = build_classifier(cfg, classes)
    video = torch.randn(batch, 3, cfg.data.num_frames, cfg.data.input_size, cfg.data.input_size)
    label = torch.arange(batch) % classes
    loss = torch.nn.CrossEntropyLoss(label_smoothing=cfg.finetune.label_smoothing)
    return _time_steps(model, lambda m: loss(m(video).float(), label), cfg.finetune, batch, steps)


def bare_steps(steps: int) -> dict:
    """The bare steps with 1 and with all threads; the faster is the ceiling (threads fight on a busy host)."""
    cfg = load_config("mini")
    out: dict = {"load_before": load()}
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        out[f"pretrain_{threads}_threads"] = round(bare_pretrain_step(cfg, cfg.pretrain.batch_size, steps), 2)
        out[f"finetune_{threads}_threads"] = round(bare_finetune_step(cfg, cfg.finetune.batch_size, steps, 12), 2)
    for stage in ("pretrain", "finetune"):
        out[f"{stage}_clips_per_s"] = max(v for k, v in out.items() if k.startswith(f"{stage}_") and "threads" in k)
    return out | {"load_after": load()}


def _time_steps(model, loss_fn, train, batch: int, steps: int) -> float:
    model.train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=train.weight_decay)
    device = torch.device("cpu")
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with autocast(device, train.amp):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[2:]))


def profile_loader(workdir: Path, clips: int = 32, cached: bool = False, disk: bool = False) -> dict:
    """ms of one thread per clip in each step of the pre-training item, and the batched targets per clip.

    cached: measure a cache of decoded videos and flow reused across epochs: every video's frames (all of
    them, at the short side) and flow (all pairs) are read once into memory (untimed), then each item slices
    its frames and window from there (timed): what such a cache would leave of the item's time.
    disk: the real on-disk decoded cache (`data.decoded_cache=true`); one untimed pass first opens the entries
    and warms the page cache, as the first epoch does for the later ones.
    """
    import mme.datasets.clips as clips_module
    from mme.datasets import PretrainDataset
    from mme.datasets.batching import build_targets, collate_inputs
    from mme.motion.cache import FlowCache
    from mme.motion.decoded import DecodedEntry

    torch.set_num_threads(1)
    cfg = load_config("mini", [f"data.decoded_cache={str(disk).lower()}"])
    spent: dict[str, float] = {}
    originals = {}

    def timed(owner, name, label, replacement=None):
        original = getattr(owner, name)
        originals[(owner, name)] = original
        call = replacement or original

        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.thread_time() - start
        setattr(owner, name, wrapper)

    memory: dict = {}
    decode, window = _in_memory(memory, FlowCache.window) if cached else (None, None)
    timed(clips_module, "read_clip", "decode", decode)
    for name in ("resize_flow", "crop_flow", "crop_frames"):
        timed(clips_module, name, "crop")
    timed(FlowCache, "window", "flow_read", window)
    if disk:
        timed(DecodedEntry, "frames", "decode")
        timed(DecodedEntry, "window", "flow_read")
    try:
        dataset = PretrainDataset(cfg, workdir, targets=False)
        if cached or disk:  # fill the cache untimed
            [dataset[i % len(dataset)] for i in range(clips)]
            spent.clear()
        start = time.thread_time()
        items = [dataset[i % len(dataset)] for i in range(clips)]
        item_total = time.thread_time() - start
        batch = cfg.pretrain.batch_size
        start = time.thread_time()
        for first in range(0, clips, batch):
            build_targets(dataset.spec, cfg, collate_inputs(items[first:first + batch]))
        targets = time.thread_time() - start
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    return _summary(spent, item_total, targets, clips, memory if cached else None, dataset if disk else None,
                    workdir)


def _in_memory(memory: dict, flow_window):
    """Replacements of the clip decoder and the flow cache's window that read each video once into `memory`
    and slice it from there (the `cached` variant of `profile_loader`)."""
    from mme.data.video import read_clip

    def decode(path, indices_fn, short_side=None, num_frames=None):
        if path not in memory:
            memory[path] = read_clip(path, lambda n: np.arange(n), short_side)
        info, frames = memory[path]
        return info, frames[indices_fn(info.num_frames if num_frames is None else num_frames)]

    def window(self, start, stop, backward=False):
        key = (self.path, backward)
        if key not in memory:
            memory[key] = flow_window(self, 0, self.num_pairs, backward)
        return memory[key][start:stop].copy()

    return decode, window


def _summary(spent: dict, item_total: float, targets: float, clips: int, memory: dict | None, dataset,
             workdir: Path) -> dict:
    """ms per clip of each timed step, the item and the batched targets; MB per video of the in-memory cache
    (`memory`) or of the on-disk one (`dataset`, which read it)."""
    out = {k: round(1000 * v / clips, 2) for k, v in spent.items()}
    out["item_total"] = round(1000 * item_total / clips, 2)
    out["rest_of_item (mask, luma, pad, normalise)"] = round(out["item_total"] - sum(
        out[k] for k in ("decode", "flow_read", "crop")), 2)
    out["targets_batched_collate_included"] = round(1000 * targets / clips, 2)
    if memory is not None:
        arrays = [value[1] if isinstance(value, tuple) else value for value in memory.values()]
        videos = sum(isinstance(value, tuple) for value in memory.values())
        out["cache_mb_per_video"] = round(sum(a.nbytes for a in arrays) / max(videos, 1) / 1e6, 2)
    if dataset is not None:
        if dataset.decoded.problems:
            raise RuntimeError(f"the decoded cache is incomplete: {dataset.decoded.problems[0]}")
        entries = list((workdir / "data" / "decoded" / "synthetic").glob("*/*"))
        out["cache_mb_per_video"] = round(sum(f.stat().st_size for e in entries for f in e.iterdir())
                                          / max(len(entries), 1) / 1e6, 2)
    return out


def profiles(data: Path, results: dict) -> None:
    """The three item profiles (see the module docstring), printed and stored in `results`."""
    ensure_decoded(data)
    for key, options in (("profile_ms_per_clip_one_thread", {}), ("profile_with_disk_decoded_cache", {"disk": True}),
                         ("profile_with_decoded_cache_in_memory", {"cached": True})):
        results[key] = profile_loader(data, **options) | {"load": load()}
        print(key, results[key], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", type=Path, default=None, help="keep the generated set here (reused if there)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline.json"))
    parser.add_argument("--profile-only", action="store_true", help="only the per-item profiles (no training)")
    args = parser.parse_args()
    results: dict = {"cpu_count": os.cpu_count(), "load_start": load()}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        data = args.data or Path(tmp) / "data-only"
        if not (data / "data" / "flow").is_dir():
            results["set"] = make_set(data, args.videos)
        profiles(data, results)
        if args.profile_only:
            results["load_end"] = load()
            write_json(args.out, results)
            print(f"wrote {args.out}")
            return
        results["bare"] = bare_steps(args.steps)
        print("bare", results["bare"], flush=True)
        results["pretrain"], results["finetune"] = [], []
        for stage, settings in (("pretrain", PRETRAIN_SETTINGS), ("finetune", FINETUNE_SETTINGS)):
            bare = results["bare"][f"{stage}_clips_per_s"]
            for where, workers, threads in settings:
                run_dir = Path(tmp) / f"{stage}-{where}-{workers}-{threads}"
                run_dir.mkdir()
                (run_dir / "data").symlink_to(data / "data")
                if stage == "finetune":  # the first pre-training run's checkpoint initialises every fine-tuning
                    first = Path(tmp) / "pretrain-{}-{}-{}".format(*PRETRAIN_SETTINGS[0])
                    (run_dir / "models").mkdir(parents=True)
                    (run_dir / "models" / "pretrain").symlink_to(first / "models" / "pretrain")
                overrides = [f"{stage}.epochs={args.epochs}", f"data.num_workers={workers}"]
                overrides += [f"data.targets_on={where}"] if where else []
                speed = stage_speed(stage, run_dir, overrides, threads)
                row = {"targets_on": where, "num_workers": workers, "main_threads": threads} | speed
                row["ratio_to_bare"] = round(speed["clips_per_s"] / bare, 3)
                results[stage].append(row)
                print(stage, row, flush=True)
    results["load_end"] = load()
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
