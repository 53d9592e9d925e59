"""Pre-training step throughput: clips/s and achieved model FLOP/s against this machine's bf16 matmul peak.

One step = forward + masked loss + backward + AdamW at ViT-S/16, 16×112×112 clips, 70% tube mask,
1-block decoder (width 192), 264-wide MME target (48 position + 216 shape), batch 8. Variants, timed in
the same process and interleaved round by round (the CPU may be shared; the best round is reported):

    videomae-fp32   plain VideoMAE-style: Conv3d over all tubelets then gather, hand-written softmax
                    attention, per-tensor AdamW, fp32
    videomae-bf16   the same under bf16 autocast
    ours-bf16       the project's model and optimizer under bf16 autocast (default on CPU)
    ours-fp32       the same in fp32
    ablations of ours-bf16, one change undone each: `-conv` (Conv3d over all tubelets), `-sdpa` (torch's
    fused SDPA kernel forced on CPU bf16), `-loopadam` (per-tensor AdamW instead of the fused one)
    ours-bf16-compile  ours-bf16 through torch.compile (`pretrain.compile`); its compile time (the warm-up
                    step) is reported, and depends on inductor's on-disk cache (a second run reuses it)

Model FLOPs are counted analytically (matmuls and attention; the tubelet embedding of the visible tokens
only, the work the model needs) × 3 for forward + backward, and divided by the step time; the peak is the
best of large square bf16 or fp32 matmuls measured in the same run (fp32 wins on a CPU without native bf16,
where bf16 is emulated; there use --peak-sizes 1024 and --variants ours-fp32,ours-bf16 to keep the run short).

On a GPU (`--device cuda`) each step is synchronised before its clock stops, and `--setup paper` times the
`paper` preset's model instead (ViT-B/16, 16×224×224, 90% tube, batch 32; decoder width 384):

    python benchmarks/bench_pretrain_step.py [--rounds 6] [--steps 1] [--out benchmarks/results/pretrain_step.json]
    python benchmarks/bench_pretrain_step.py --device cuda --setup paper --peak-sizes 8192 --steps 5 \
        --variants videomae-bf16,ours-bf16 --out benchmarks/results/gpu/step_paper.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import bench_device  # benchmarks/, beside this script
import numpy as np
import torch
import torch.nn.functional as F

from mme.data.masking import make_mask
from mme.engine.loops import autocast, native_bf16
from mme.engine.optim import build_optimizer
from mme.models import MaskedMotionPretrainer
from mme.models.vit import Attention, VisionTransformer, gather_tokens
from mme.utils import write_json

SETUPS = {
    "vit-s": dict(img_size=112, num_frames=16, patch_size=16, tubelet_size=2, embed_dim=384, depth=12, num_heads=6,
                  decoder_dim=192, decoder_depth=1, decoder_num_heads=3, batch=8, mask_ratio=0.7,
                  target_parts={"pos": 48, "shape": 216}),
    "paper": dict(img_size=224, num_frames=16, patch_size=16, tubelet_size=2, embed_dim=768, depth=12, num_heads=12,
                  decoder_dim=384, decoder_depth=1, decoder_num_heads=6, batch=32, mask_ratio=0.9,
                  target_parts={"pos": 48, "shape": 216}),
}
SETUP = dict(SETUPS["vit-s"])  # the setup being timed (main() replaces it with --setup's)
DEVICE = torch.device("cpu")   # likewise --device

# name -> (tubelet embedding, attention, AdamW, autocast)
VARIANTS = {
    "videomae-fp32": ("conv", "manual", "loop", "off"),
    "videomae-bf16": ("conv", "manual", "loop", "bf16"),
    "ours-bf16": ("visible", "auto", "fused", "bf16"),
    "ours-fp32": ("visible", "auto", "fused", "off"),
    "ours-bf16-conv": ("conv", "auto", "fused", "bf16"),
    "ours-bf16-sdpa": ("visible", "sdpa", "fused", "bf16"),
    "ours-bf16-loopadam": ("visible", "auto", "loop", "bf16"),
    "ours-bf16-compile": ("visible", "auto", "fused", "bf16"),
}
COMPILED = {"ours-bf16-compile"}


class ManualAttention(Attention):
    """VideoMAE's attention as written there: explicit (q·scale)kᵀ, softmax, ·v."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // self.num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))


class SdpaAttention(Attention):
    """torch's fused kernel whatever the device and dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))


class ConvFirstEncoder(VisionTransformer):
    """VideoMAE's order: Conv3d over every tubelet, add positions, then drop the masked tokens."""

    def forward_features(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed.proj(video).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.to(x.dtype)
        x = gather_tokens(x, ~mask)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build(embed: str, attention: str) -> MaskedMotionPretrainer:
    torch.manual_seed(0)
    keys = ("img_size", "num_frames", "patch_size", "tubelet_size", "embed_dim", "depth", "num_heads",
            "decoder_dim", "decoder_depth", "decoder_num_heads")
    model = MaskedMotionPretrainer(SETUP["target_parts"], **{k: SETUP[k] for k in keys})
    # Same parameters, other maths: swap the classes of the modules a variant changes.
    if embed == "conv":
        model.encoder.__class__ = ConvFirstEncoder
    swap = {"manual": ManualAttention, "sdpa": SdpaAttention}.get(attention)
    for module in model.modules():
        if swap is not None and isinstance(module, Attention):
            module.__class__ = swap
    return model


def make_batch() -> dict[str, torch.Tensor]:
    grid = (SETUP["num_frames"] // 2, SETUP["img_size"] // 16, SETUP["img_size"] // 16)
    rng = np.random.default_rng(0)
    mask = np.stack([make_mask("tube", SETUP["mask_ratio"], grid, rng) for _ in range(SETUP["batch"])])
    tokens, width = int(np.prod(grid)), sum(SETUP["target_parts"].values())
    batch = {"video": torch.randn(SETUP["batch"], 3, SETUP["num_frames"], SETUP["img_size"], SETUP["img_size"]),
             "mask": torch.from_numpy(mask), "target": torch.randn(SETUP["batch"], tokens, width),
             "target_valid": torch.ones(SETUP["batch"], tokens, width, dtype=torch.bool)}
    return {key: value.to(DEVICE) for key, value in batch.items()}


def model_flops_per_clip(visible: int, tokens: int, masked: int) -> float:
    """Forward matmul + attention FLOPs of one clip, × 3 for forward + backward."""
    d, dd, width = SETUP["embed_dim"], SETUP["decoder_dim"], sum(SETUP["target_parts"].values())
    block = lambda n, dim: 24 * n * dim * dim + 4 * n * n * dim  # noqa: E731  qkv+proj+mlp, QKᵀ and AV
    forward = (2 * visible * 3 * SETUP["tubelet_size"] * SETUP["patch_size"] ** 2 * d  # visible tubelets
               + SETUP["depth"] * block(visible, d) + 2 * visible * d * dd
               + SETUP["decoder_depth"] * block(tokens, dd) + 2 * masked * dd * width)
    return 3.0 * forward


def matmul_peak(sizes=(2048, 3072, 4096), repeats: int = 3, dtype: torch.dtype = torch.bfloat16) -> float:
    """Best FLOP/s of large square matmuls in `dtype` (called between rounds; the best call of the run counts)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
        a @ b
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            a @ b
            synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def synchronize() -> None:
    bench_device.synchronize(DEVICE)


class Variant:
    def __init__(self, name: str, batch: dict[str, torch.Tensor]):
        embed, attention, adamw, self.amp = VARIANTS[name]
        self.name, self.batch = name, batch
        self.model = build(embed, attention).to(DEVICE)
        self.optimizer = build_optimizer(self.model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
        if adamw == "loop":
            for group in self.optimizer.param_groups:
                group["fused"] = False
        if name in COMPILED:
            self.model = torch.compile(self.model)
        self.times: list[float] = []
        self.warmup_s = 0.0

    def step(self) -> float:
        synchronize()
        start = time.perf_counter()
        with autocast(DEVICE, self.amp):
            pred = self.model(self.batch["video"], self.batch["mask"])
            batch = self.batch
            loss, _ = self.model.forward_loss(pred, batch["target"], batch["target_valid"], batch["mask"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_step.json"))
    parser.add_argument("--peak-sizes", default="2048,3072,4096",
                        help="square matmul sizes of the peak (1024 on a CPU that emulates bf16; 8192 on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--setup", default="vit-s", choices=sorted(SETUPS))
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    SETUP.clear()
    SETUP.update(SETUPS[args.setup])
    sizes = tuple(int(n) for n in args.peak_sizes.split(","))

    batch = make_batch()
    masked = int(batch["mask"][0].sum())
    tokens = batch["mask"].shape[1]
    flops_per_step = SETUP["batch"] * model_flops_per_clip(tokens - masked, tokens, masked)
    variants = [Variant(name, batch) for name in args.variants.split(",")]
    for variant in variants:
        variant.warmup_s = variant.step()  # warm-up (oneDNN kernel creation, allocator; compiling)
    peaks = [matmul_peak(sizes)]
    for round_index in range(args.rounds):
        shift = round_index % len(variants)  # rotate the order so no variant always follows the same one
        for variant in variants[shift:] + variants[:shift]:
            variant.times.append(statistics.median(variant.step() for _ in range(args.steps)))
        peaks.append(matmul_peak(sizes))
    # The peak is the faster dtype's: fp32 where bf16 is emulated (a CPU without AMX / AVX-512-BF16).
    fp32_peak = matmul_peak(sizes, dtype=torch.float32)
    peak = max(*peaks, fp32_peak)

    results = summarise(variants, flops_per_step, peak)
    gains = gains_of_changes(results)
    report = {"gain_of_each_change": gains,
              "setup": SETUP | {"masked_tokens": masked, "tokens": tokens}, "model_flops_per_step": flops_per_step,
              "bf16_matmul_peak_flops": max(peaks), "bf16_matmul_peak_per_round": peaks,
              "fp32_matmul_peak_flops": fp32_peak, "native_bf16": native_bf16(DEVICE.type),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device_name(),
              "setup_name": args.setup, "cpu": platform.processor() or platform.machine(), "variants": results,
              "note": "shared CPU: best of interleaved rounds; numbers may be noisy"}
    write_json(args.out, report)
    print(f"matmul peak bf16 {max(peaks) / 1e12:.3f}, fp32 {fp32_peak / 1e12:.3f} TFLOP/s; "
          f"model {flops_per_step / 1e9:.1f} GFLOP/step")
    for change, gain in gains.items():
        print(f"  {change}: x{gain:.2f}")
    for name, r in results.items():
        speedups = "  ".join(f"x{v:.2f} vs {k.removeprefix('speedup_vs_')}" for k, v in r.items()
                             if k.startswith("speedup"))
        print(f"{name:>18}: {r['step_s'] * 1e3:7.1f} ms/step  {r['clips_per_s']:6.2f} clips/s  "
              f"{r['model_flops_per_s'] / 1e12:5.2f} TFLOP/s = {100 * r['fraction_of_peak']:4.1f}% of peak  {speedups}")


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def summarise(variants: list[Variant], flops_per_step: float, peak: float) -> dict[str, dict]:
    """Each variant's best round as step time, clips/s, FLOP/s and fraction of `peak`, plus its speed-ups
    over the VideoMAE-style references that ran."""
    results = {}
    for variant in variants:
        best = min(variant.times)
        results[variant.name] = {"step_s": best, "step_s_rounds": variant.times,
                                 "clips_per_s": SETUP["batch"] / best, "model_flops_per_s": flops_per_step / best,
                                 "fraction_of_peak": flops_per_step / best / peak, "first_step_s": variant.warmup_s}
    for reference in ("videomae-fp32", "videomae-bf16"):
        if reference in results:
            for result in results.values():
                result[f"speedup_vs_{reference}"] = results[reference]["step_s"] / result["step_s"]
    return results


def gains_of_changes(results: dict[str, dict]) -> dict[str, float]:
    """What each change buys: the step time with the change undone over the step time of ours-bf16."""
    changes = {"bf16 autocast (vs fp32)": "ours-fp32", "visible-only matmul embedding (vs Conv3d on all)":
               "ours-bf16-conv", "explicit bf16 attention (vs torch's CPU SDPA kernel)": "ours-bf16-sdpa",
               "fused AdamW (vs per-tensor loop)": "ours-bf16-loopadam"}
    changes_in = {"torch.compile (pretrain.compile)": "ours-bf16-compile"}  # what adding it buys
    gains = {change: results[name]["step_s"] / results["ours-bf16"]["step_s"]
             for change, name in changes.items() if name in results and "ours-bf16" in results}
    gains |= {change: results["ours-bf16"]["step_s"] / results[name]["step_s"]
              for change, name in changes_in.items() if name in results and "ours-bf16" in results}
    return gains


if __name__ == "__main__":
    main()
