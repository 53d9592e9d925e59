"""The masked-motion pre-training model: encoder on visible tokens, decoder predicting masked targets.

Layout follows VideoMAE's `PretrainVisionTransformer` (`encoder.*`, `encoder_to_decoder`, `mask_token`,
`decoder.{blocks,norm,head}`), so official pre-training checkpoints load as they are. The decoder head is
sized by the target registry: `joint` mode has one decoder whose head is the concatenation of all target
parts; `separate` mode (paper Table 7f) has one full decoder per part under `decoder.<part>.*`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mme.models.vit import Block, LayerNorm, VisionTransformer, gather_tokens, init_weights, sinusoid_table


class Decoder(nn.Module):
    """Decoder blocks + norm + linear head, applied to the trailing (masked) tokens.

    Args:
        dim: decoder width.
        depth: number of blocks.
        num_heads: attention heads.
        out_dim: width of the predicted target per token.
        mlp_ratio, qkv_bias: as in `Block`.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, out_dim: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, num_masked: int) -> torch.Tensor:
        """(B, N_visible + M, dim) -> (B, M, out_dim) predictions for the last M tokens."""
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -num_masked:]))


class MaskedMotionPretrainer(nn.Module):
    """Encoder + decoder that predicts one target vector per masked token.

    Args:
        target_parts: ordered part name -> width (e.g. {'pos': 48, 'shape': 216}).
        img_size, num_frames, patch_size, tubelet_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
            drop_path: the encoder (see `VisionTransformer`).
        decoder_dim, decoder_depth, decoder_num_heads: the decoder(s).
        decoder_mode: 'joint' (one decoder, one head for all parts) or 'separate' (one decoder per part).
    """

    def __init__(self, target_parts: dict[str, int], img_size: int = 224, num_frames: int = 16,
                 patch_size: int = 16, tubelet_size: int = 2, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 decoder_dim: int = 384, decoder_depth: int = 1, decoder_num_heads: int = 6,
                 decoder_mode: str = "joint"):
        super().__init__()
        if decoder_mode not in ("joint", "separate"):
            raise ValueError(f"decoder_mode must be 'joint' or 'separate', got {decoder_mode!r}")
        self.target_parts = dict(target_parts)
        self.decoder_mode = decoder_mode
        self.encoder = VisionTransformer(img_size, num_frames, patch_size, tubelet_size, embed_dim, depth,
                                         num_heads, mlp_ratio, qkv_bias, drop_path, final_norm=True)
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sinusoid_table(self.encoder.num_tokens, decoder_dim),
                             persistent=False)
        make = lambda width: Decoder(decoder_dim, decoder_depth, decoder_num_heads, width, mlp_ratio, qkv_bias)  # noqa: E731
        if decoder_mode == "joint":
            self.decoder = make(sum(self.target_parts.values()))
        else:
            self.decoder = nn.ModuleDict({part: make(width) for part, width in self.target_parts.items()})
        self.encoder_to_decoder.apply(init_weights)
        self.decoder.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict the target of every masked token.

        Args:
            video: (B, 3, T, H, W); mask: (B, N) bool, True = masked (same count in every clip).
        Returns:
            part -> (B, M, width), masked tokens in token order.
        """
        latent = self.encoder_to_decoder(self.encoder(video, mask))  # (B, N_visible, Dd)
        pos = self.decoder_pos_embed.to(latent.dtype).expand(video.shape[0], -1, -1)
        visible = latent + gather_tokens(pos, ~mask)
        masked = self.mask_token.to(latent.dtype) + gather_tokens(pos, mask)
        # Visible first, masked last: the decoder returns its trailing M tokens.
        tokens = torch.cat([visible, masked], dim=1)
        return self.decode(tokens, masked.shape[1])

    def decode(self, tokens: torch.Tensor, num_masked: int) -> dict[str, torch.Tensor]:
        """(B, N, Dd) decoder input -> part -> (B, M, width)."""
        if self.decoder_mode == "separate":
            return {part: decoder(tokens, num_masked) for part, decoder in self.decoder.items()}
        pred = self.decoder(tokens, num_masked)
        return dict(zip(self.target_parts, pred.split(list(self.target_parts.values()), dim=-1)))

    def forward_loss(self, pred: dict[str, torch.Tensor], target: torch.Tensor, target_valid: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked MSE per part (mean over valid target elements of masked tokens), parts summed.

        Args:
            pred: part -> (B, M, width) from `forward`.
            target, target_valid: (B, N, D) for all tokens; D = sum of part widths.
            mask: (B, N) bool, True = masked.
        Returns:
            total loss (scalar, float32) and part -> loss.
        """
        target = gather_tokens(target, mask).float()
        valid = gather_tokens(target_valid, mask).bool()
        parts = {}
        for (part, p), t, v in zip(pred.items(), self._split(target), self._split(valid)):
            # where() rather than a product: an invalid target may hold NaN/inf and must not leak.
            error = torch.where(v, p.float() - t, 0.0)
            parts[part] = error.pow(2).sum() / v.sum().clamp(min=1)
        return sum(parts.values()), parts

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(list(self.target_parts.values()), dim=-1)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}
