"""`mme inspect-targets VIDEO --out FILE.npz`: one clip of one video through the whole target path.

The clip goes through exactly the pre-training item path (`mme.datasets.load_clip` + `pretrain_item`,
epoch 0, index 0 of `seed`): start, crop/flip, flow window (from the flow cache when a valid one exists,
else computed here with `flow.backend` on the clip's frames), targets of `target.kind`, mask. The
trajectories of the MME tracker are always computed too, for the arrays and the figure.

Real footage: the cache's shot cuts become the clip's `cut_pairs` and, with `target.fb_check`, its backward
flow window (augmented like the forward one) the clip's `backward`, so trajectories crossing a cut or
failing the forward-backward check come out invalid exactly as in training. Computed flow has no cut
information (the detector needs the whole video): its cuts are reported as unknown.

Writes FILE.npz with `frames` uint8 (T, H, W, 3) input clip; `tracks` float32
(T/2, H/16, W/16, K, L+1, 2) tracked (x, y) in clip pixels; `valid` bool (T/2, H/16, W/16, K); `targets`
float32 (tokens, D); plus `mask` bool (tokens,) and `target_valid` bool (tokens, D). And a figure like the
paper's Fig. 4 (input frames, masked patches, trajectories; invalid ones dotted red) at
reports/figures/trajectories.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mme.data.lists import resolve_video
from mme.data.transforms import crop_flow
from mme.data.video import read_frames, resized_shape, video_info
from mme.datasets import item_rng, load_clip, pretrain_item
from mme.motion.cache import FlowCache, cache_problem, expected_meta, flow_cache_path, load_flow
from mme.motion.flow import compute_flow
from mme.motion.shots import cut_pair_flags
from mme.motion.tracking import resize_flow
from mme.paths import Paths
from mme.targets import PartValue, TargetGeometry, TargetInputs, TargetSpec, get_target, track_tokens
from mme.utils import atomic_path

FIGURE_NAME = "trajectories.png"
MASK_SHADE = 0.35  # brightness kept on masked patches in the figure


class _Needs(TargetSpec):
    """The frames and flow that several kinds read together (the configured kind + the trajectories)."""

    needs_flow = True

    def __init__(self, *specs: TargetSpec):
        self.specs = specs
        self.name = "+".join(s.name for s in specs)

    def parts(self, cfg) -> dict[str, int]:
        return {name: width for spec in self.specs for name, width in spec.parts(cfg).items()}

    def compute(self, inputs: TargetInputs, geo: TargetGeometry) -> list[PartValue]:
        return [value for spec in self.specs for value in spec.compute(inputs, geo)]

    def frame_offsets(self, geo: TargetGeometry) -> set[int]:
        return set().union(*(s.frame_offsets(geo) for s in self.specs))

    def flow_pairs(self, geo: TargetGeometry) -> int:
        return max(s.flow_pairs(geo) for s in self.specs)


def _flow_source(cfg, workdir: Path, video: Path, rel: str):
    """(reader of flow pairs [a, b) with a `backward` switch, the cache or None, where the flow comes from):
    the cache when valid (with backward flow when `target.fb_check` needs it), else computed now."""
    path = flow_cache_path(workdir, cfg.data.dataset, rel)
    expected = expected_meta(cfg.flow.backend, cfg.flow.compensate_camera, cfg.data.short_side,
                             backward=cfg.target.fb_check)
    if cache_problem(path, expected, deep=False) is None:
        cache = load_flow(path)
        return cache.window, cache, f"cache {path}"

    def compute(first: int, stop: int, backward: bool = False) -> np.ndarray:
        frames = read_frames(video, range(first, stop + 1), short_side=cfg.data.short_side)
        if backward:  # backward pair i maps frame i+1 to i: the forward flow of the reversed frames, reversed
            return compute_flow(frames[::-1].copy(), cfg.flow.backend, cfg.flow.compensate_camera)[::-1].copy()
        return compute_flow(frames, cfg.flow.backend, cfg.flow.compensate_camera)

    return compute, None, f"computed ({cfg.flow.backend})"


def _add_real_footage(cfg, sample, cache: FlowCache | None, flow_window, video: Path) -> list[int] | None:
    """Give the clip its cut flags (from the cache) and, with `target.fb_check`, its augmented backward flow
    window, unless the item path delivered them already; returns the video's cuts (None: unknown)."""
    inputs = sample.inputs
    cuts = None if cache is None else cache.cuts
    if inputs.flow is None:
        return cuts
    pairs = len(inputs.flow)
    if inputs.cut_pairs is None and cuts is not None:
        inputs.cut_pairs = cut_pair_flags(cuts, sample.start, pairs)
    if cfg.target.fb_check and inputs.backward is None:
        info = video_info(video)
        height, width = resized_shape(info.height, info.width, cfg.data.short_side)
        raw = torch.from_numpy(np.ascontiguousarray(flow_window(sample.start, sample.start + pairs, backward=True)))
        inputs.backward = crop_flow(resize_flow(raw, height, width), sample.crop)
    return cuts


def run(cfg, workdir: str | Path, video: str | Path, out: str | Path, **_) -> dict:
    """Inspect one clip of `video`; returns a summary (paths, shapes, valid fraction, flow source)."""
    paths = Paths(workdir)
    # A relative path names a file under the workdir when there is one (list rows are workdir-relative),
    # else a file relative to the current directory.
    in_workdir = resolve_video(paths.workdir, video)
    video_path = in_workdir if in_workdir.is_file() else Path(video)
    if not video_path.is_file():
        raise FileNotFoundError(f"video {video} does not exist (give a file path or a path under the workdir)")
    try:
        rel = str(video_path.resolve().relative_to(paths.workdir))
    except ValueError:
        rel = str(video_path.resolve())
    spec = get_target(cfg)
    geo = TargetGeometry.from_cfg(cfg)
    flow_window, cache, flow_from = _flow_source(cfg, paths.workdir, video_path, rel)
    rng = item_rng(cfg.seed, 0, 0)
    sample = load_clip(cfg, _Needs(spec, get_target("traj")), video_path, video_info(video_path).num_frames,
                       flow_window, rng)
    cuts = _add_real_footage(cfg, sample, cache, flow_window, video_path)
    item = pretrain_item(cfg, spec, sample, rng)
    trajectories = track_tokens(sample.inputs, geo, with_shape=False)
    arrays = {
        "frames": sample.clip.round().clamp(0, 255).to(torch.uint8).numpy(),
        "tracks": trajectories.tracks.numpy().astype(np.float32),
        "valid": trajectories.valid.numpy(),
        "targets": item["target"].numpy(),
        "mask": item["mask"].numpy(),
        "target_valid": item["target_valid"].numpy(),
    }
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    figure = paths.figures_dir / FIGURE_NAME
    plot_trajectories(arrays, geo, figure)
    return {"out": str(out), "figure": str(figure), "video": str(video_path), "flow": flow_from,
            "kind": spec.name, "targets": list(arrays["targets"].shape),
            "valid_trajectories": round(float(arrays["valid"].mean()), 4), "start_frame": sample.start,
            "cuts": cuts, "fb_check": cfg.target.fb_check, "prune": cfg.target.prune}


def plot_trajectories(arrays: dict[str, np.ndarray], geo: TargetGeometry, path: Path) -> None:
    """Fig. 4 style: per token-time slot, its first input frame, the masked patches, the trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, tracks, valid, mask = arrays["frames"], arrays["tracks"], arrays["valid"], arrays["mask"]
    slots, grid_h, grid_w = tracks.shape[:3]
    mask = mask.reshape(slots, grid_h, grid_w)
    fig, axes = plt.subplots(3, slots, figsize=(1.9 * slots, 6.0), squeeze=False)
    for j in range(slots):
        frame = frames[j * geo.tubelet]
        shaded = frame.astype(np.float32)
        patch_mask = np.kron(mask[j], np.ones((geo.patch, geo.patch)))[..., None].astype(bool)
        shaded = np.where(patch_mask, shaded * MASK_SHADE, shaded).astype(np.uint8)
        axes[0, j].imshow(frame)
        axes[0, j].set_title(f"slot {j} (frame {j * geo.tubelet})", fontsize=7)
        axes[1, j].imshow(shaded)
        axes[2, j].imshow(frame)
        lines = tracks[j].reshape(-1, tracks.shape[-2], 2)
        ok = valid[j].reshape(-1)
        for line, good in zip(lines, ok):
            style = {"color": "yellow", "lw": 0.6} if good else {"color": "red", "lw": 0.4, "ls": ":"}
            axes[2, j].plot(line[:, 0], line[:, 1], **style)
            axes[2, j].plot(line[-1, 0], line[-1, 1], ".", ms=1.5, color=style["color"])
        for row in range(3):
            axes[row, j].set_axis_off()
    axes[1, 0].set_title("masked patches", fontsize=7, loc="left")
    axes[2, 0].set_title(f"trajectories (L={geo.length}, K={geo.points})", fontsize=7, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
