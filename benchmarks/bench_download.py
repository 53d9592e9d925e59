"""Benchmark: generate the synthetic dataset through the real `download` stage and time it.

    python benchmarks/bench_download.py                 # mini preset (960 videos x 64 frames x 128 px)
    python benchmarks/bench_download.py --preset smoke --set data.synthetic.workers=1

Runs in a fresh temporary workdir (or --workdir), then checks that every listed video decodes with
decord and has the configured frame count and size. Prints one JSON line: preset, videos, workers,
stage seconds (data work), wall seconds (incl. MLflow start-up), videos/s, frames/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import decord

from mme.config import load_config
from mme.data.lists import read_list, resolve_video
from mme.paths import Paths
from mme.stages import download


def check_decord(workdir: Path, dataset: str, num_frames: int, size: int) -> int:
    """Open every listed video with decord; returns how many were checked (raises on the first bad one)."""
    checked = 0
    for split in ("train", "val", "test"):
        for rel, _ in read_list(Paths(workdir).list_file(dataset, split)):
            reader = decord.VideoReader(str(resolve_video(workdir, rel)), num_threads=1)
            frame = reader.get_batch([len(reader) - 1]).asnumpy()
            if len(reader) != num_frames or frame.shape[1:3] != (size, size):
                raise AssertionError(f"{rel}: {len(reader)} frames of {frame.shape[1:3]}, expected "
                                     f"{num_frames} x {size}")
            checked += 1
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary directory")
    args = parser.parse_args()
    cfg = load_config(args.preset, ["data.dataset=synthetic", *args.overrides])
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        workdir = args.workdir or Path(tmp)
        start = time.perf_counter()
        result = download.run(cfg, workdir, progress=False)
        wall = time.perf_counter() - start
        synthetic = cfg.data.synthetic
        checked = check_decord(workdir, "synthetic", synthetic.num_frames, synthetic.size)
    frames = synthetic.num_videos * synthetic.num_frames
    print(json.dumps({
        "preset": args.preset, "videos": synthetic.num_videos, "frames_per_video": synthetic.num_frames,
        "size": synthetic.size, "workers": synthetic.workers, "stage_seconds": result["seconds"],
        "wall_seconds": round(wall, 2), "videos_per_s": round(synthetic.num_videos / result["seconds"], 1),
        "frames_per_s": round(frames / result["seconds"], 1), "decord_checked": checked,
    }))


if __name__ == "__main__":
    main()
