"""Video classifier for fine-tuning and evaluation: encoder → mean pooling → `fc_norm` → `head`.

Same layout as VideoMAE's fine-tuning `VisionTransformer` with mean pooling: the trunk's final `norm` is
an Identity and `fc_norm` normalises the pooled token, so fine-tuned official checkpoints load directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mme.models.vit import LayerNorm, VisionTransformer


class VideoClassifier(VisionTransformer):
    """Mean-pooled ViT classifier.

    Args:
        num_classes: output logits (0 gives an Identity head that returns the pooled features).
        head_drop: dropout before the head.
        init_scale: the head's initial weights and bias are multiplied by this (VideoMAE: 0.001).
        **vit_args: see `VisionTransformer` (`final_norm` is fixed to False).
    """

    def __init__(self, num_classes: int, head_drop: float = 0.0, init_scale: float = 0.001, **vit_args):
        super().__init__(**vit_args, final_norm=False)
        self.num_classes = num_classes
        self.fc_norm = LayerNorm(self.embed_dim)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.zero_()

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, num_classes) logits."""
        return self.head(self.head_drop(self.fc_norm(tokens.mean(dim=1))))

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, num_classes) logits; `mask` (B, N) bool, True = token dropped before the
        blocks (fine-tuning on fewer input patches), the mean is then over the kept tokens."""
        return self.forward_head(self.forward_features(video, mask))
