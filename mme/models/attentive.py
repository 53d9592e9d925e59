"""Heads that classify frozen token features (B, N, D): the mean-pooled linear probe and the attentive
probe (learned queries cross-attending over the tokens, as V-JEPA evaluates a frozen encoder).

A mean over tokens loses whatever a few tokens carry and the rest do not; the attentive probe can weigh
the tokens by content before pooling, so it reads such features. Both heads take the same cached
features, so their accuracies compare the readout, not the encoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from mme.models.vit import LayerNorm


class LinearProbe(nn.Module):
    """Mean over tokens, a BatchNorm without affine parameters (feature whitening, as MAE's linear probe),
    then a linear classifier.

    Args:
        dim: token width D.
        num_classes: output classes.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens, or (B, D) already pooled -> (B, num_classes) logits."""
        pooled = tokens.mean(dim=1) if tokens.dim() == 3 else tokens
        return self.head(self.norm(pooled))


class CrossAttention(nn.Module):
    """Multi-head attention of a few queries over a token sequence.

    Args:
        dim: token width; dim must divide by num_heads.
        num_heads: attention heads.
        qkv_bias: biases on the query and key/value projections.
    """

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive probe: width {dim} does not divide into {num_heads} heads; pick a divisor")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) queries, (B, N, D) tokens -> (B, Q, D)."""
        b, n, d = tokens.shape
        heads, width = self.num_heads, d // self.num_heads
        q = self.q(queries).reshape(b, -1, heads, width).transpose(1, 2)
        k, v = self.kv(tokens).reshape(b, n, 2, heads, width).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Q, width)
        return self.proj(out.transpose(1, 2).reshape(b, -1, d))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: queries += attn(queries, norm(tokens)); queries += mlp(norm(queries)).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of dim.
    """

    def __init__(self, dim: int, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attn(queries, self.norm1(tokens))
        return queries + self.mlp(self.norm2(queries))


class AttentiveProbe(nn.Module):
    """Learned queries cross-attend over frozen tokens; their mean goes through a LayerNorm and a linear
    classifier: (B, N, D) -> (B, num_classes).

    With `num_tokens`, every (token position, channel) is first standardised by the training features'
    mean and std (`set_standardization`), the attentive counterpart of the linear probe's BatchNorm: where
    most tokens look alike across clips (a shared background), the between-clip differences are a small
    signal on a large common part that a LayerNorm over channels keeps; measured on a 24-epoch `mini`
    encoder, the attentive probe's test top-1 went from 50 % without it to 73 % with it.

    Args:
        dim: token width D.
        num_classes: output classes.
        num_queries: learned query tokens (V-JEPA uses one).
        num_heads: attention heads of the cross-attention.
        mlp_ratio: MLP width of the block as a multiple of dim.
        num_tokens: N, to standardise each token position (None: no standardisation).
    """

    def __init__(self, dim: int, num_classes: int, num_queries: int = 1, num_heads: int = 4,
                 mlp_ratio: float = 4.0, num_tokens: int | None = None):
        super().__init__()
        self.standardize = num_tokens is not None
        if self.standardize:
            self.register_buffer("token_mean", torch.zeros(num_tokens, dim))
            self.register_buffer("token_std", torch.ones(num_tokens, dim))
        self.queries = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.block = CrossAttentionBlock(dim, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.head.weight, std=0.01)

    @torch.no_grad()
    def set_standardization(self, tokens: torch.Tensor, eps: float = 1e-4) -> None:
        """Per-(position, channel) mean and std of training tokens (n, N, D), in float32."""
        values = tokens.float()
        self.token_mean.copy_(values.mean(dim=0))
        self.token_std.copy_(values.std(dim=0) + eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, num_classes) logits."""
        if self.standardize:
            tokens = (tokens - self.token_mean) / self.token_std
        pooled = self.block(self.queries.expand(tokens.shape[0], -1, -1), tokens)
        return self.head(self.norm(pooled.mean(dim=1)))

    def no_weight_decay(self) -> set[str]:
        return {"queries"}


def _init_weights(module: nn.Module) -> None:
    """timm's ViT init: truncated-normal linear weights (std 0.02), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


HEADS = {"linear": LinearProbe, "attentive": AttentiveProbe}


def build_head(kind: str, dim: int, num_classes: int, **kwargs: int | float) -> nn.Module:
    """A frozen-feature head by name (`linear` | `attentive`); kwargs go to its __init__."""
    if kind not in HEADS:
        raise KeyError(f"unknown probe kind {kind!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[kind](dim, num_classes, **kwargs)
