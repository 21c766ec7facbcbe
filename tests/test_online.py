"""OnlineGSNR: moments of the training mini-batches, exact against the float64 loop, and the model untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import per_sample_gradients
from torch import nn
from torch.nn import functional as F

from gsnr_diag import gradient_stats
from gsnr_diag.dynamics.online import OnlineGSNR
from gsnr_diag.errors import DataError, ModelError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(3 * 4 * 4), nn.Linear(3 * 4 * 4, 3))


def _batches(shape, k=4, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(k)]


def _train(model, batches, lr, online=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    weights = []
    for x, y in batches:
        weights.append(copy.deepcopy(model))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return weights


def _pooled_reference(weights, batches):
    """float64 per-sample gradients of each batch at its own step's weights, pooled."""
    per = [per_sample_gradients(w, x, y, nn.CrossEntropyLoss()) for w, (x, y) in zip(weights, batches)]
    return {k: np.concatenate([p[k] for p in per]) for k in per[0]}


@pytest.mark.parametrize("build,shape", [(_mlp, (5,)), (_cnn, (1, 6, 6))])
@pytest.mark.parametrize("signs", [False, True])
def test_window_pools_each_step_at_its_own_weights(build, shape, signs):
    batches = _batches(shape)
    model = build()
    with OnlineGSNR(model, window=3, signs=signs) as online:
        weights = _train(model, batches, lr=0.5)
        stats = online.stats()
    assert online.steps == 4 and stats.n == 24 and online.unmeasured == {}
    G = _pooled_reference(weights[1:], batches[1:])  # the last 3 mini-batches
    for k, g in G.items():
        mean, var = g.mean(0), g.var(0, ddof=1)
        np.testing.assert_allclose(stats.mean[k].numpy(), mean, rtol=1e-5, atol=1e-6 * np.abs(mean).max())
        np.testing.assert_allclose(stats.var[k].numpy(), var, rtol=1e-4, atol=1e-6 * var.max())
        if signs:
            pos, neg = (g > 0).sum(0), (g < 0).sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                same = np.where((mean != 0) & (pos + neg > 0), np.where(mean > 0, pos, neg) / (pos + neg), np.nan)
            np.testing.assert_allclose(stats.same_sign[k].numpy(), same, atol=1e-12)


def test_fixed_weights_equal_the_full_data_statistics():
    """With lr = 0 the window is one data set at one θ: the exact gradient_stats of the union."""
    batches = _batches((5,), k=3)
    model = _mlp()
    with OnlineGSNR(model, window=3, signs=True) as online:
        _train(model, batches, lr=0.0)
    X = torch.cat([x for x, _ in batches])
    Y = torch.cat([y for _, y in batches])
    exact = gradient_stats(model, (X, Y))
    stats = online.stats()
    assert stats.mean_gsnr == pytest.approx(exact.mean_gsnr, rel=1e-5)
    assert stats.osgr == pytest.approx(exact.osgr, rel=1e-5)
    assert stats.mean_same_sign == pytest.approx(exact.mean_same_sign, rel=1e-9)


def test_training_and_grad_are_bitwise_untouched_and_hooks_removed():
    batches = _batches((1, 6, 6))
    plain, watched = _cnn(), _cnn()
    grads_plain, grads_watched = [], []
    for model, grads, online in ((plain, grads_plain, None), (watched, grads_watched, OnlineGSNR(watched, 2))):
        hooks = (dict(model._forward_hooks), dict(model._forward_pre_hooks))
        if online is not None:
            online.attach()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        if online is not None:
            online.snapshot()
            online.detach()
            assert online.stats().n == 16  # still readable after detach
        assert (dict(model._forward_hooks), dict(model._forward_pre_hooks)) == hooks
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for a, b in zip(grads_plain, grads_watched):
        for ga, gb in zip(a, b):
            assert torch.equal(ga, gb)
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)


def test_unmeasured_parameters_are_named_not_guessed():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), Scale())
    with OnlineGSNR(model, window=2) as online:
        _train(model, _batches((5,), k=2), lr=0.1)
    assert set(online.unmeasured) == {"1.s"}
    assert set(online.stats().mean) == {"0.weight", "0.bias"}


def test_refusals():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with OnlineGSNR(model) as online:
        with pytest.raises(ModelError, match="BatchNorm1d in train mode"):
            model(torch.randn(3, 4))
        with pytest.raises(DataError, match="sample"):
            online.stats()
    with pytest.raises(Exception, match="window"):
        OnlineGSNR(_mlp(), window=0)
    with pytest.raises(ModelError, match="loss_reduction"):
        OnlineGSNR(_mlp(), loss_reduction="none")


def test_forward_without_backward_and_no_grad_forwards_are_ignored():
    batches = _batches((5,), k=2)
    model = _mlp()
    with OnlineGSNR(model, window=5) as online:
        model(batches[0][0])  # graph built, never backpropagated: dropped
        with torch.no_grad():
            model(batches[0][0])
        _train(model, batches, lr=0.1)
    assert online.steps == 2 and online.stats().n == 16 and online.capture.dropped == 1


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_kept_between_steps_and_sum_reduction(set_to_none, reduction):
    """Σg from the rule when .grad already holds a value (zero_grad(set_to_none=False)); loss_reduction='sum'."""
    batches = _batches((5,), k=2)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    weights = []
    with OnlineGSNR(model, window=2, loss_reduction=reduction, signs=False) as online:
        for x, y in batches:
            weights.append(copy.deepcopy(model))
            opt.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(model(x), y, reduction=reduction).backward()
            opt.step()
    stats = online.stats()
    G = _pooled_reference(weights, batches)
    for k, g in G.items():
        np.testing.assert_allclose(stats.mean[k].numpy(), g.mean(0), rtol=1e-5, atol=1e-6 * np.abs(g).max())
        np.testing.assert_allclose(stats.var[k].numpy(), g.var(0, ddof=1), rtol=1e-4, atol=1e-7 * np.abs(g).max() ** 2)


def test_every_k_captures_one_mini_batch_in_k():
    batches = _batches((5,), k=6)
    model = _mlp()
    with OnlineGSNR(model, window=10, every=3) as online:
        weights = _train(model, batches, lr=0.1)
    assert online.steps == 2
    G = _pooled_reference([weights[0], weights[3]], [batches[0], batches[3]])
    np.testing.assert_allclose(online.stats().mean["0.weight"].numpy(), G["0.weight"].mean(0), rtol=1e-5, atol=1e-7)


def test_a_deepcopy_made_while_attached_does_not_feed_the_window():
    batches = _batches((5,), k=2)
    model = _mlp()
    with OnlineGSNR(model, window=5) as online:
        copies = _train(model, batches, lr=0.1)  # deep copies of the model, taken with the hooks on
        for c in copies:
            F.cross_entropy(c(batches[0][0]), batches[0][1]).backward()
    assert online.steps == 2 and online.stats().n == 16


def test_steps_end_with_the_backward_even_when_the_models_forward_is_bypassed():
    """As in a LightningModule whose training_step calls a submodule: each backward still ends one mini-batch."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

    batches = _batches((5,), k=3)
    model = Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    weights = []
    with OnlineGSNR(model, window=3) as online:
        for x, y in batches:
            weights.append(copy.deepcopy(model.net))
            opt.zero_grad()
            F.cross_entropy(model.net(x), y).backward()
            opt.step()
    stats = online.stats()
    assert online.steps == 3 and stats.n == 24
    G = _pooled_reference(weights, batches)
    for k, g in G.items():
        np.testing.assert_allclose(stats.var["net." + k].numpy(), g.var(0, ddof=1), rtol=1e-4, atol=1e-9)


def test_full_data_snapshots_while_attached_do_not_enter_the_window():
    batches = _batches((5,), k=2)
    model = _mlp()
    with OnlineGSNR(model, window=5) as online:
        _train(model, batches[:1], lr=0.1)
        gradient_stats(model, batches[1])  # its forward and backward passes are not training steps
        _train(model, batches[1:], lr=0.1)
    assert online.steps == 2 and online.stats().n == 16
