"""Frozen-feature heads and their trainer on synthetic features whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch

from mme.engine.frozen_eval import ProbeGrid, evaluate_frozen, fit_probe, predict
from mme.models.attentive import HEADS, AttentiveProbe, build_head

CLASSES, DIM = 4, 16
GRID = ProbeGrid(lrs=(1e-3, 1e-2), epochs=(30,), batch_size=64)


@pytest.fixture(autouse=True)
def one_thread():
    """These heads are tiny: on a shared 2-core machine a second thread costs ~10x in synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token = noise + 3 x the unit vector of the clip's class: linearly separable after pooling."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    tokens = torch.randn(n, 6, DIM, generator=g)
    tokens[torch.arange(n), :, labels] += 3.0
    return tokens, labels


def one_token(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N = 4 tokens, one per class vector, in a random order; a marker (channel 0) flags the token of the
    clip's class. The mean over tokens is the same for every class, so only a content-weighted readout
    can tell the class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(99)) * 2
    centres[:, 0] = 0
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    order = torch.stack([torch.randperm(CLASSES, generator=g) for _ in range(n)])  # token i carries order[i]
    tokens = centres[order] + 0.3 * torch.randn(n, CLASSES, DIM, generator=g)
    position = (order == labels[:, None]).float().argmax(dim=1)  # varies from clip to clip
    tokens[torch.arange(n), position, 0] += 4.0
    return tokens, labels


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_trains_and_batches_like_single_items(kind):
    head = build_head(kind, DIM, CLASSES)
    tokens = torch.randn(8, 5, DIM)
    logits = head(tokens)
    assert logits.shape == (8, CLASSES)
    logits.sum().backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    head.eval()
    single = torch.cat([head(tokens[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(head(tokens), single, rtol=1e-5, atol=1e-5)


def test_attentive_probe_ignores_token_order_and_takes_several_queries():
    head = AttentiveProbe(DIM, CLASSES, num_queries=3).eval()
    tokens = torch.randn(2, 7, DIM)
    torch.testing.assert_close(head(tokens), head(tokens[:, torch.randperm(7)]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divide into 5 heads"):
        AttentiveProbe(DIM, CLASSES, num_heads=5)
    with pytest.raises(KeyError, match="choose one of: linear, attentive"):
        build_head("mlp", DIM, CLASSES)


def test_linear_probe_separates_a_linear_direction():
    head, chosen, curves = fit_probe("linear", *linear_tokens(512, 1), *linear_tokens(256, 2), GRID, seed=0)
    assert chosen["val_top1"] >= 98.0
    assert set(curves) == {(1e-3, 30), (1e-2, 30)} and all(len(c) == 30 for c in curves.values())
    assert (predict(head, linear_tokens(256, 3)[0]) == linear_tokens(256, 3)[1]).float().mean() >= 0.98


def test_one_informative_token_needs_the_attentive_probe():
    train, val = one_token(512, 1), one_token(256, 2)
    _, linear, _ = fit_probe("linear", *train, *val, GRID, seed=0)
    _, attentive, _ = fit_probe("attentive", *train, *val, GRID, seed=0)
    assert linear["val_top1"] < 40.0  # chance is 25 %: the mean carries no class
    assert attentive["val_top1"] > 90.0


def test_fit_is_deterministic_and_chooses_on_val():
    train, val = one_token(512, 1), one_token(256, 2)
    first = fit_probe("attentive", *train, *val, GRID, seed=0)
    again = fit_probe("attentive", *train, *val, GRID, seed=0)
    assert first[1] == again[1] and first[2] == again[2]
    for (name, a), b in zip(first[0].state_dict().items(), again[0].state_dict().values()):
        assert torch.equal(a, b), name
    best = max(first[2], key=lambda point: first[2][point][-1])
    assert (first[1]["lr"], first[1]["epochs"]) == best and first[1]["val_top1"] == first[2][best][-1]


def test_test_labels_never_enter_the_choice():
    """Flipping every test label changes the test score, not the chosen grid point nor the predictions."""
    train, val, test = one_token(512, 1), one_token(256, 2), one_token(256, 3)
    flipped = (test[0], (test[1] + 1) % CLASSES)
    right = evaluate_frozen("attentive", train, val, test, GRID, seed=0)
    wrong = evaluate_frozen("attentive", train, val, flipped, GRID, seed=0)
    assert right.chosen == wrong.chosen and right.curves == wrong.curves
    assert torch.equal(right.test_predictions, wrong.test_predictions)
    assert right.test_top1 > 90.0 and wrong.test_top1 < 10.0
    assert right.test_correct.shape == (256,) and right.test_top1 == pytest.approx(100 * right.test_correct.mean())


def small_signal_on_a_common_pattern(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`one_token` scaled down 100x and put on a large fixed per-(position, channel) pattern shared by every
    clip (like tokens of one shared background): the class lives in a tiny between-clip difference."""
    tokens, labels = one_token(n, seed)
    common = 50.0 * torch.randn(1, CLASSES, DIM, generator=torch.Generator().manual_seed(7))
    return common + 0.01 * tokens, labels


def test_standardised_attentive_probe_reads_a_small_signal_on_a_common_pattern():
    train, val = small_signal_on_a_common_pattern(512, 1), small_signal_on_a_common_pattern(256, 2)
    grid = ProbeGrid(lrs=GRID.lrs, epochs=GRID.epochs, batch_size=64, head_args={"num_tokens": CLASSES})
    head, standardised, _ = fit_probe("attentive", *train, *val, grid, seed=0)
    _, plain, _ = fit_probe("attentive", *train, *val, GRID, seed=0)
    assert standardised["val_top1"] > 90.0 and plain["val_top1"] < 60.0
    assert torch.allclose(head.token_mean, train[0].mean(dim=0), atol=1e-4)
    # Standardised by its training statistics, the head sees the same inputs after any per-(position,
    # channel) affine change of the features: fitted on changed features, it predicts the same classes.
    scale = 0.5 + torch.rand(1, CLASSES, DIM, generator=torch.Generator().manual_seed(3))
    shift = torch.randn(1, CLASSES, DIM, generator=torch.Generator().manual_seed(4))
    changed = [(x * scale + shift, y) for x, y in (train, val)]
    again, _, _ = fit_probe("attentive", *changed[0], *changed[1], grid, seed=0)
    agree = (predict(again, changed[1][0]) == predict(head, val[0])).float().mean()
    assert agree > 0.98
