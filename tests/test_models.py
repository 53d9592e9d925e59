"""Models: the encoder sees only visible tokens, exact masked counts, the masked loss, every size trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mme.config import load_config
from mme.models import MaskedMotionPretrainer, VideoClassifier, build_classifier, list_sizes, model_args
from mme.models.registry import classifier_from_args, pretrainer_from_args
from mme.models.vit import sinusoid_table

GEOMETRY = dict(img_size=32, num_frames=4, patch_size=16, tubelet_size=2)  # 2 x 2 x 2 = 8 tokens
SMALL = GEOMETRY | dict(embed_dim=32, depth=2, num_heads=2)
PARTS = {"pos": 6, "shape": 10}


def tiny_pretrainer(**kw) -> MaskedMotionPretrainer:
    torch.manual_seed(0)
    return MaskedMotionPretrainer(PARTS, **SMALL, decoder_dim=16, decoder_num_heads=2, **kw).eval()


def random_mask(batch: int, tokens: int, masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(tokens, generator=g) for _ in range(batch)])
    return order < masked  # exactly `masked` True per row, at random positions


def test_sinusoid_table_matches_videomae_formula():
    n, d = 7, 10
    angles = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    angles[:, 0::2], angles[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    np.testing.assert_allclose(sinusoid_table(n, d)[0].numpy(), angles, atol=1e-6)


def test_encoder_ignores_masked_pixels_and_gets_only_visible_tokens():
    model = tiny_pretrainer()
    video = torch.randn(2, 3, 4, 32, 32)
    mask = random_mask(2, 8, 5)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda _mod, inp, _out: seen.append(inp[0].shape))
    before = model.encoder(video, mask)
    # Overwrite the pixels of every masked tubelet (token (t, h, w) covers frames 2t..2t+1, a 16x16 patch).
    changed = video.clone()
    for b, token in mask.nonzero().tolist():
        t, h, w = token // 4, (token // 2) % 2, token % 2
        changed[b, :, 2 * t:2 * t + 2, 16 * h:16 * h + 16, 16 * w:16 * w + 16] = 100.0
    after = model.encoder(changed, mask)
    assert seen[0] == (2, 3, 32)  # 8 tokens - 5 masked
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert not torch.allclose(model.encoder(changed, None), model.encoder(video, None))


def test_predictions_cover_exactly_the_masked_tokens():
    model = tiny_pretrainer()
    pred = model(torch.randn(3, 3, 4, 32, 32), random_mask(3, 8, 6))
    assert list(pred) == ["pos", "shape"]
    assert pred["pos"].shape == (3, 6, 6) and pred["shape"].shape == (3, 6, 10)
    with pytest.raises(ValueError, match="same number of masked tokens"):
        uneven = random_mask(3, 8, 6)
        uneven[0, uneven[0].nonzero()[0]] = False
        model(torch.randn(3, 3, 4, 32, 32), uneven)


def test_tube_mask_from_data_gives_exact_counts():
    masking = pytest.importorskip("mme.data.masking")
    grid = (2, 7, 7)
    mask = masking.make_mask("tube", 0.7, grid, np.random.default_rng(0))
    assert mask.sum() == 2 * round(0.7 * 49)
    model = MaskedMotionPretrainer(PARTS, img_size=112, num_frames=4, embed_dim=32, depth=1, num_heads=2,
                                   decoder_dim=16, decoder_num_heads=2).eval()
    pred = model(torch.randn(1, 3, 4, 112, 112), torch.from_numpy(mask)[None])
    assert pred["pos"].shape[1] == 2 * round(0.7 * 49)


def test_masked_loss_uses_only_masked_tokens_and_valid_elements():
    model = tiny_pretrainer()
    mask = random_mask(2, 8, 5)
    pred = {"pos": torch.randn(2, 5, 6), "shape": torch.randn(2, 5, 10)}
    target, valid = torch.randn(2, 8, 16), torch.rand(2, 8, 16) > 0.3
    total, parts = model.forward_loss(pred, target, valid, mask)
    t, v = target[mask].reshape(2, 5, 16), valid[mask].reshape(2, 5, 16)
    for name, sl in (("pos", slice(0, 6)), ("shape", slice(6, 16))):
        err = (pred[name] - t[..., sl])[v[..., sl]]
        assert math.isclose(float(parts[name]), float(err.pow(2).mean()), rel_tol=1e-5)
    assert math.isclose(float(total), float(parts["pos"] + parts["shape"]), rel_tol=1e-6)
    # Visible tokens and invalid elements (even NaN ones) change nothing, gradients stay finite.
    target2 = target.clone()
    target2[~mask] = 1e6
    target2[mask.unsqueeze(-1).expand_as(valid) & ~valid] = float("nan")
    pred = {k: p.requires_grad_() for k, p in pred.items()}
    total2, _ = model.forward_loss(pred, target2, valid, mask)
    total2.backward()
    assert math.isclose(total2.item(), total.item(), rel_tol=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in pred.values())


def test_separate_decoders_one_per_part():
    model = tiny_pretrainer(decoder_mode="separate")
    keys = model.state_dict().keys()
    assert "decoder.pos.head.weight" in keys and "decoder.shape.head.weight" in keys
    assert model.decoder["shape"].head.out_features == 10
    pred = model(torch.randn(2, 3, 4, 32, 32), random_mask(2, 8, 4))
    assert pred["shape"].shape == (2, 4, 10)


def test_classifier_layout_matches_videomae():
    model = VideoClassifier(5, **SMALL)
    keys = set(model.state_dict())
    expected = {"patch_embed.proj.weight", "blocks.1.attn.q_bias", "blocks.1.attn.v_bias", "blocks.1.attn.qkv.weight",
                "blocks.1.attn.proj.bias", "blocks.1.mlp.fc2.weight", "fc_norm.weight", "head.bias"}
    assert expected <= keys
    assert "blocks.0.attn.qkv.bias" not in keys and "pos_embed" not in keys and "norm.weight" not in keys
    assert isinstance(model.norm, torch.nn.Identity) and model.blocks[0].norm1.eps == 1e-6
    assert model(torch.randn(2, 3, 4, 32, 32)).shape == (2, 5)


def test_classifier_with_dropped_tokens_pools_only_the_kept_ones():
    """finetune.token_drop: dropped tubelets' pixels cannot change the logits; kept ones do."""
    torch.manual_seed(0)
    model = VideoClassifier(5, init_scale=1.0, **SMALL).eval()
    video, mask = torch.randn(2, 3, 4, 32, 32), random_mask(2, 8, 4)
    before = model(video, mask)
    changed = video.clone()
    for b, token in mask.nonzero().tolist():
        t, h, w = token // 4, (token // 2) % 2, token % 2
        changed[b, :, 2 * t:2 * t + 2, 16 * h:16 * h + 16, 16 * w:16 * w + 16] = 100.0
    torch.testing.assert_close(model(changed, mask), before, rtol=0, atol=0)
    assert not torch.allclose(model(changed), model(video))
    assert not torch.allclose(before, model(video))  # dropping tokens changes what is pooled


def test_model_args_named_size_and_explicit_override():
    args = model_args(load_config("paper", ["model.name=small"]))
    assert (args["embed_dim"], args["num_heads"], args["decoder_dim"]) == (384, 6, 192)
    args = model_args(load_config("paper", ["model.name=small", "model.embed_dim=256", "model.num_heads=4"]))
    assert (args["embed_dim"], args["num_heads"], args["depth"], args["decoder_dim"]) == (256, 4, 12, 192)
    smoke = load_config("smoke")
    assert build_classifier(smoke, 3).embed_dim == model_args(smoke)["embed_dim"] == 64


@pytest.mark.parametrize("size", list_sizes())
def test_every_registered_size_trains_with_finite_gradients(size):
    cfg = load_config("paper", [f"model.name={size}", "data.input_size=32", "data.short_side=32",
                               "data.num_frames=4", "model.drop_path=0.1"])
    args = model_args(cfg) | {"target_parts": PARTS}
    torch.manual_seed(0)
    for model in (pretrainer_from_args(args), classifier_from_args(args, 4)):
        video = torch.randn(2, 3, 4, 32, 32)
        if isinstance(model, MaskedMotionPretrainer):
            mask = random_mask(2, 8, 6)
            loss, _ = model.forward_loss(model(video, mask), torch.randn(2, 8, 16), torch.ones(2, 8, 16, dtype=bool),
                                         mask)
        else:
            loss = torch.nn.functional.cross_entropy(model(video), torch.tensor([0, 3]))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_patch_embedding_and_attention_paths_match_the_reference_maths():
    from mme.models.vit import PatchEmbed3d, attention

    torch.manual_seed(0)
    embed = PatchEmbed3d(16, 2, 3, 24)
    video = torch.randn(2, 3, 4, 32, 48)
    conv = embed.proj(video).flatten(2).transpose(1, 2)  # VideoMAE: Conv3d, tokens (t, h, w) t-major
    torch.testing.assert_close(embed(video), conv, rtol=1e-5, atol=1e-5)
    keep = random_mask(2, 12, 7)
    torch.testing.assert_close(embed(video, keep), conv[keep].reshape(2, 7, 24), rtol=1e-5, atol=1e-5)
    q, k, v = torch.randn(3, 2, 3, 10, 8).unbind(0)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), exact)
    fast = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # the explicit CPU bf16 path
    torch.testing.assert_close(fast.float(), exact, rtol=0.05, atol=0.03)
