"""Video ViT building blocks in the official VideoMAE/MME parameter layout.

Owns the tubelet patch embedding, the fixed sinusoidal position table, the attention block with the
VideoMAE qkv-bias layout (`qkv.weight` without bias + `q_bias`, `v_bias`; the k bias is zero) and the
encoder trunk shared by the pre-trainer and the classifier. Parameter names match the released
checkpoints (`patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`),
so their weights load unchanged and give the same outputs.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

# VideoMAE's LayerNorm epsilon (timm's default 1e-5 would change the outputs of official weights).
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed 1-D table over the flattened token index.

    Channel j uses the frequency 10000^(-2*(j//2)/dim): sine on even j, cosine on odd j (interleaved).

    Returns:
        (1, num_positions, dim) float32.
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table[None].float()


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Tokens where `keep` is True, in token order.

    Args:
        x: (B, N, C); keep: (B, N) bool with the same count of True in every row.
    Returns:
        (B, K, C).
    """
    counts = keep.sum(1)
    # A compiled step skips the check (reading it back would split the graph); the masks come from
    # `make_mask`, whose counts are exact, and the eager path keeps checking.
    if not torch.compiler.is_compiling() and bool((counts != counts[0]).any()):
        raise ValueError(f"every clip of a batch needs the same number of masked tokens, got {counts.tolist()}")
    return x[keep].reshape(x.shape[0], -1, x.shape[-1])


class PatchEmbed3d(nn.Module):
    """Tubelet embedding with a Conv3d's parameters (kernel = stride = tubelet × patch × patch).

    Computed as patchify + one matmul, so the masked tubelets can be dropped *before* the projection:
    the same result as VideoMAE's conv-then-gather for 30% of the work at 70% masking, and it avoids
    the slow bf16 Conv3d backward on CPU.
    """

    def __init__(self, patch_size: int = 16, tubelet_size: int = 2, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.size, stride=self.size)

    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, C·t·p·p) tubelets in (t, h, w) t-major order, values in (c, t, y, x) order."""
        b, c, t, h, w = video.shape
        kt, kh, kw = self.size
        x = video.reshape(b, c, t // kt, kt, h // kh, kh, w // kw, kw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * kt * kh * kw)

    def forward(self, video: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, N, D), or (B, K, D) of the tokens where `keep` (B, N) is True."""
        patches = self.patchify(video)
        if keep is not None:
            patches = gather_tokens(patches, keep)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, (B, heads, N, d) each -> (B, heads, N, d).

    The fused `scaled_dot_product_attention` kernel, except for bf16 on CPU: there torch's CPU flash
    kernel is 3-5x slower (forward + backward, in isolation) than two AMX matmuls and a softmax at ViT
    sequence lengths, 1.3-1.6x on a whole pre-training step (benchmarks/bench_pretrain_step.py).
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return weights.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's bias layout (maths in `attention`).

    Args:
        dim: token width.
        num_heads: heads; dim must divide by it.
        qkv_bias: learn `q_bias` and `v_bias` (the k bias stays zero, as in VideoMAE/BEiT).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        batch, tokens, dim = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block (timm/VideoMAE layout: norm1, attn, norm2, mlp; exact GELU).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of dim.
        qkv_bias: see `Attention`.
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """VideoMAE init: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """The video encoder trunk: tubelet embedding + fixed positions + blocks + final norm.

    Args:
        img_size: square input side (pixels).
        num_frames: input frames T.
        patch_size, tubelet_size: the tubelet (tubelet × patch × patch).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer.
        drop_path: largest stochastic-depth rate (linearly increasing over the blocks).
        final_norm: LayerNorm after the blocks (pre-training); Identity for mean-pooled classifiers.
    """

    def __init__(self, img_size: int = 224, num_frames: int = 16, patch_size: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0, final_norm: bool = True):
        super().__init__()
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_tokens = math.prod(self.grid)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed3d(patch_size, tubelet_size, 3, embed_dim)
        self.register_buffer("pos_embed", sinusoid_table(self.num_tokens, embed_dim), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates)
        self.norm = LayerNorm(embed_dim) if final_norm else nn.Identity()
        self.apply(init_weights)

    def forward_features(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the visible tokens only.

        Args:
            video: (B, 3, T, H, W); mask: (B, N) bool, True = masked (dropped before the blocks), or None.
        Returns:
            (B, N_visible, D) after the final norm.
        """
        keep = None if mask is None else ~mask
        x = self.patch_embed(video, keep)
        pos = self.pos_embed.to(x.dtype).expand(video.shape[0], -1, -1)
        x = x + (pos if keep is None else gather_tokens(pos, keep))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(video, mask)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:  # noqa: ARG002
        """timm layer-decay groups: embedding = layer 0, block i = layer i+1, everything else last."""
        return {"stem": r"^pos_embed|patch_embed", "blocks": [(r"^blocks\.(\d+)", None)]}
