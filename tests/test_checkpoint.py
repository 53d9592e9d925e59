"""Checkpoint I/O: official VideoMAE/MME key layouts load and give the official maths; ours round-trip.

The official files are written here by hand (key names of the released VideoMAE/MME checkpoints, random
weights), and a reference forward pass written from VideoMAE's equations (explicit softmax attention,
q/v biases with a zero k bias, LayerNorm eps 1e-6, mean pooling -> fc_norm -> head) gives the logits
the loaded model must reproduce.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mme.engine.checkpointing import save_checkpoint
from mme.models import MaskedMotionPretrainer, VideoClassifier, load_checkpoint
from mme.models.vit import VisionTransformer

D, DEPTH, HEADS, CLASSES, PATCH = 32, 2, 2, 5, 16
GEOMETRY = dict(img_size=32, num_frames=4, patch_size=PATCH, tubelet_size=2)


def official_encoder_weights(g: torch.Generator, prefix: str = "") -> dict[str, torch.Tensor]:
    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {f"{prefix}patch_embed.proj.weight": rnd(D, 3, 2, PATCH, PATCH), f"{prefix}patch_embed.proj.bias": rnd(D)}
    for i in range(DEPTH):
        b = f"{prefix}blocks.{i}."
        sd |= {b + "norm1.weight": 1 + rnd(D), b + "norm1.bias": rnd(D), b + "attn.q_bias": rnd(D),
               b + "attn.v_bias": rnd(D), b + "attn.qkv.weight": rnd(3 * D, D, scale=0.2),
               b + "attn.proj.weight": rnd(D, D, scale=0.2), b + "attn.proj.bias": rnd(D),
               b + "norm2.weight": 1 + rnd(D), b + "norm2.bias": rnd(D),
               b + "mlp.fc1.weight": rnd(4 * D, D, scale=0.2), b + "mlp.fc1.bias": rnd(4 * D),
               b + "mlp.fc2.weight": rnd(D, 4 * D, scale=0.2), b + "mlp.fc2.bias": rnd(D)}
    return sd


def reference_table(n: int, d: int) -> torch.Tensor:
    angles = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    angles[:, 0::2], angles[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return torch.tensor(angles, dtype=torch.float32)


def reference_features(sd: dict[str, torch.Tensor], video: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """VideoMAE encoder, written out: (B, 3, T, H, W) -> (B, N, D) block outputs (before any final norm)."""
    w = lambda name: sd[prefix + name]  # noqa: E731
    x = F.conv3d(video, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=(2, PATCH, PATCH))
    x = x.flatten(2).transpose(1, 2)
    x = x + reference_table(x.shape[1], D)
    ln = lambda t, n: F.layer_norm(t, (D,), w(n + ".weight"), w(n + ".bias"), eps=1e-6)  # noqa: E731
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        bias = torch.cat([w(b + "attn.q_bias"), torch.zeros(D), w(b + "attn.v_bias")])
        q, k, v = (h @ w(b + "attn.qkv.weight").T + bias).reshape(*h.shape[:2], 3, HEADS, D // HEADS).permute(
            2, 0, 3, 1, 4)
        attn = ((q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(*h.shape[:2], D)
        x = x + h @ w(b + "attn.proj.weight").T + w(b + "attn.proj.bias")
        h = ln(x, b + "norm2")
        h = F.gelu(h @ w(b + "mlp.fc1.weight").T + w(b + "mlp.fc1.bias"))
        x = x + h @ w(b + "mlp.fc2.weight").T + w(b + "mlp.fc2.bias")
    return x


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_official_finetuned_checkpoint_gives_reference_logits(tmp_path, gen):
    sd = official_encoder_weights(gen)
    sd |= {"fc_norm.weight": 1 + 0.1 * torch.randn(D, generator=gen),
           "fc_norm.bias": 0.1 * torch.randn(D, generator=gen),
           "head.weight": torch.randn(CLASSES, D, generator=gen), "head.bias": torch.randn(CLASSES, generator=gen)}
    path = tmp_path / "official_ft.pth"
    torch.save({"module": sd, "epoch": 29}, path)
    model = VideoClassifier(CLASSES, embed_dim=D, depth=DEPTH, num_heads=HEADS, **GEOMETRY).eval()
    report = load_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    video = torch.randn(2, 3, 4, 32, 32, generator=gen)
    pooled = F.layer_norm(reference_features(sd, video).mean(1), (D,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
    expected = pooled @ sd["head.weight"].T + sd["head.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(video), expected, rtol=1e-4, atol=1e-4)


def official_pretrain_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd = official_encoder_weights(gen, "encoder.")
    sd |= {"encoder.norm.weight": torch.ones(D), "encoder.norm.bias": torch.zeros(D),
           "mask_token": torch.zeros(1, 1, 16),
           "encoder_to_decoder.weight": torch.randn(16, D, generator=gen)}
    dec = {"norm1.weight": (16,), "norm1.bias": (16,), "attn.q_bias": (16,), "attn.v_bias": (16,),
           "attn.qkv.weight": (48, 16), "attn.proj.weight": (16, 16), "attn.proj.bias": (16,), "norm2.weight": (16,),
           "norm2.bias": (16,), "mlp.fc1.weight": (64, 16), "mlp.fc1.bias": (64,), "mlp.fc2.weight": (16, 64),
           "mlp.fc2.bias": (16,)}
    sd |= {f"decoder.blocks.0.{k}": torch.randn(*s, generator=gen) for k, s in dec.items()}
    sd |= {"decoder.norm.weight": torch.ones(16), "decoder.norm.bias": torch.zeros(16),
           "decoder.head.weight": torch.randn(16, 16, generator=gen), "decoder.head.bias": torch.zeros(16)}
    return sd


def test_official_pretrain_checkpoint_into_classifier_and_pretrainer(tmp_path, gen):
    sd = official_pretrain_weights(gen)
    path = tmp_path / "official_pt.pth"
    torch.save({"model": sd}, path)
    classifier = VideoClassifier(CLASSES, embed_dim=D, depth=DEPTH, num_heads=HEADS, **GEOMETRY).eval()
    report = load_checkpoint(classifier, path)
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == ["norm.bias", "norm.weight"]  # VideoMAE drops the encoder norm too
    assert "decoder.head.weight" in report.skipped and "mask_token" in report.skipped
    video = torch.randn(1, 3, 4, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(classifier.forward_features(video), reference_features(sd, video, "encoder."),
                                   rtol=1e-4, atol=1e-4)
    pretrainer = MaskedMotionPretrainer({"pos": 6, "shape": 10}, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                        decoder_dim=16, decoder_num_heads=2, **GEOMETRY)
    report = load_checkpoint(pretrainer, path)
    assert report.missing == [] and report.unexpected == []
    encoder = VisionTransformer(embed_dim=D, depth=DEPTH, num_heads=HEADS, **GEOMETRY)  # probe: encoder + its norm
    assert load_checkpoint(encoder, path).missing == []
    # The released MME code keeps its decoders in ModuleLists (`decoder.0.head.0.0.weight`, ...), under
    # `model_state` in some files: all of it is skipped for a classifier, the encoder loads the same.
    mme = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    mme |= {"decoder.0.head.0.0.weight": torch.zeros(512, 16), "encoder_to_decoder.0.weight": torch.zeros(16, D)}
    torch.save({"model_state": mme}, tmp_path / "official_mme.pth")
    report = load_checkpoint(classifier, tmp_path / "official_mme.pth")
    assert report.unexpected == ["norm.bias", "norm.weight"] and "decoder.0.head.0.0.weight" in report.skipped


def test_our_checkpoint_round_trips_logits_and_reports_mismatches(tmp_path):
    torch.manual_seed(0)
    model = VideoClassifier(CLASSES, embed_dim=D, depth=DEPTH, num_heads=HEADS, **GEOMETRY).eval()
    torch.nn.init.normal_(model.head.weight)
    path = save_checkpoint(tmp_path / "ours.pt", model=model, epoch=1, step=3, model_args={"embed_dim": D})
    video = torch.randn(2, 3, 4, 32, 32)
    fresh = VideoClassifier(CLASSES, embed_dim=D, depth=DEPTH, num_heads=HEADS, **GEOMETRY).eval()
    load_checkpoint(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(video), model(video), rtol=0, atol=0)
    other = VideoClassifier(CLASSES + 2, embed_dim=D, depth=DEPTH, num_heads=HEADS, **GEOMETRY)
    report = load_checkpoint(other, path)
    assert report.missing == ["head.bias", "head.weight"] and any(s.startswith("head.weight") for s in report.skipped)


def test_checkpoint_without_encoder_weights_fails_clearly(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"model": {"backbone.layer1.weight": torch.zeros(3)}}, path)
    model = VideoClassifier(CLASSES, embed_dim=D, depth=DEPTH, num_heads=HEADS, **GEOMETRY)
    with pytest.raises(ValueError, match="no encoder weights loaded"):
        load_checkpoint(model, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, tmp_path / "missing.pth")
