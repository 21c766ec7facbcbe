"""Losses that are not a plain batch mean of per-sample losses: measured exactly, or refused.

CrossEntropyLoss/NLLLoss with ignore_index targets, class weights or reduction="sum" are decomposed into
per-sample losses (capture/losses.py); the reference here is an independent float64 batch-of-one loop on
the per-sample loss ℓ_i = Σ_t w[y_it]·l_it, samples with every target ignored dropped, scaled by n/W for a
weighted mean.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import per_sample_gradients, reference_stats, stats_of_gradients
from torch import nn
from torch.nn import functional as F

from gsnr_diag import gradient_stats
from gsnr_diag.errors import DataError, LossError

RTOL = 1e-9  # float64 throughout


def _close(a, b, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.nanmax(np.abs(b))) if np.isfinite(b).any() else 0.0, 1e-300)
    assert np.array_equal(np.isnan(a), np.isnan(b)), what
    err = float(np.nanmax(np.abs(a - b))) if np.isfinite(a).any() else 0.0
    assert err <= RTOL * scale, f"{what}: {err:.3e} > {RTOL} x {scale:.3e}"


def _mlp(classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, classes)).double()


class Tagger(nn.Module):
    """Per-position logits [B, C, T] for sequence targets [B, T]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x))).transpose(1, 2)


def _data(n=21, classes=4, ignored=(2, 5, 11)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    y[list(ignored)] = -100
    return x, y


def _reference(model, x, y, loss_fn, weights_of):
    """ℓ_i by a batch-of-one loop of loss_fn's reduction='sum' twin; drop ignored samples; scale by n/W (mean)."""
    twin = type(loss_fn)(**{**_kwargs(loss_fn), "reduction": "sum"})
    w = weights_of(y)
    keep = np.flatnonzero((y != loss_fn.ignore_index).reshape(y.shape[0], -1).any(1).numpy())
    G = per_sample_gradients(model, x[keep], y[keep], twin)
    if loss_fn.reduction == "mean":
        G = {k: g * (len(keep) / w[keep].sum()) for k, g in G.items()}
    return stats_of_gradients(G, model), len(keep)


def _kwargs(loss_fn):
    weight = None if loss_fn.weight is None else loss_fn.weight.double()  # the reference runs in float64
    out = {"weight": weight, "ignore_index": loss_fn.ignore_index}
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        out["label_smoothing"] = loss_fn.label_smoothing
    return out


def _class_weights(loss_fn):
    def weights_of(y):
        counted = (y != loss_fn.ignore_index).double()
        if loss_fn.weight is not None:
            counted = counted * loss_fn.weight.double()[y.clamp(0)]
        return counted.reshape(y.shape[0], -1).sum(1).numpy()

    return weights_of


def _check(got, ref, n):
    assert got.n == n
    for k in ref["mean"]:
        for stat in ("mean", "var", "gsnr", "same_sign"):
            _close(getattr(got, stat)[k], ref[stat][k], f"{stat}[{k}]")
    assert got.undefined == ref["undefined"]
    assert got.mean_gsnr == pytest.approx(ref["mean_gsnr"], rel=1e-9)
    assert got.osgr == pytest.approx(ref["osgr"], rel=1e-9)


LOSSES = {
    "ignore_index": lambda: nn.CrossEntropyLoss(),
    "sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "class_weight": lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)),
    "weight_ignore_smoothing": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 2.0, 0.0, 3.0], dtype=torch.float64), ignore_index=1, label_smoothing=0.1
    ),
    "nll_weight_sum": lambda: nn.NLLLoss(
        weight=torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=torch.float64), reduction="sum"
    ),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_class_losses_match_reference_and_do_not_depend_on_batch_size(name):
    loss_fn = LOSSES[name]()
    model = nn.Sequential(_mlp(), nn.LogSoftmax(1)) if isinstance(loss_fn, nn.NLLLoss) else _mlp()
    x, y = _data()
    y[y == -100] = loss_fn.ignore_index
    ref, n = _reference(model, x, y, loss_fn, _class_weights(loss_fn))
    results = [gradient_stats(model, (x, y), loss_fn, batch_size=b) for b in (4, 7, None)]
    for got in results:
        _check(got, ref, n)
    if loss_fn.reduction == "mean":  # ḡ is the gradient of loss_fn on the whole data set at once
        full = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        for (k, _), g in zip(model.named_parameters(), full):
            _close(results[0].mean[k], g.numpy(), f"full-batch gradient {k}")


def test_ignored_samples_are_excluded_from_n():
    x, y = _data()
    got = gradient_stats(_mlp(), (x, y), nn.CrossEntropyLoss(), batch_size=5)
    kept = y != -100
    plain = gradient_stats(_mlp(), (x[kept], y[kept]), nn.CrossEntropyLoss(), batch_size=5)
    assert got.n == plain.n == 18
    for k in got.mean:
        _close(got.var[k], plain.var[k].numpy(), k)


def test_sum_reduction_gives_the_statistics_of_the_mean():
    x, y = _data(ignored=())
    mean = gradient_stats(_mlp(), (x, y), nn.CrossEntropyLoss(), batch_size=6)
    total = gradient_stats(_mlp(), (x, y), nn.CrossEntropyLoss(reduction="sum"), batch_size=6)
    assert total.osgr == pytest.approx(mean.osgr, rel=1e-12)
    for k in mean.mean:
        _close(total.mean[k], mean.mean[k].numpy(), k)
    reg = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    t = torch.randn(21, 2, dtype=torch.float64)
    a = gradient_stats(reg, (x, t), nn.MSELoss(reduction="sum"), batch_size=4)
    b = gradient_stats(reg, (x, t), nn.MSELoss(), batch_size=4)
    ref = reference_stats(reg, x, t, nn.MSELoss(reduction="sum"))  # the loss of one sample alone
    for k in ref["mean"]:
        _close(a.mean[k], ref["mean"][k], k)
        _close(a.var[k], ref["var"][k], k)
        _close(b.var[k], ref["var"][k] / 4, k)  # MSE's mean also divides by the 2 outputs


def test_sequence_targets_with_ignored_positions():
    torch.manual_seed(0)
    model = Tagger().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 9, (15, 6), generator=g)
    y = torch.randint(0, 4, (15, 6), generator=g)
    y[:, 4:] = -100  # padding
    y[3] = -100  # a sample with every position ignored: excluded
    y[7, 1:] = -100
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64))
    ref, n = _reference(model, x, y, loss_fn, _class_weights(loss_fn))
    for b in (4, None):
        got = gradient_stats(model, (x, y), loss_fn, batch_size=b)
        _check(got, ref, n)
    assert n == 14
    full = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    for (k, _), gr in zip(model.named_parameters(), full):
        _close(got.mean[k], gr.numpy(), k)


def test_probability_targets_with_class_weights():
    x, _ = _data(ignored=())
    p = torch.softmax(torch.randn(21, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 1)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64))
    ref = reference_stats(_mlp(), x, p, loss_fn)  # divided by B, not by the weights: a plain batch mean
    got = gradient_stats(_mlp(), (x, p), loss_fn, batch_size=6)
    _check(got, ref, 21)


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (lambda o, y: F.cross_entropy(o, y, reduction="sum"), "not the batch mean"),
        (lambda o, y: F.cross_entropy(o, y, weight=torch.tensor([0.5, 2.0, 1.0, 3.0]).double()), "not the batch mean"),
        (lambda o, y: F.cross_entropy(o, y) * o.shape[0] ** 0.5, "not the batch mean"),
    ],
    ids=["functional_sum", "functional_weight", "batch_size_dependent"],
)
def test_other_losses_that_are_not_a_batch_mean_are_refused(loss_fn, match):
    x, y = _data(ignored=())
    with pytest.raises(LossError, match=match):
        gradient_stats(_mlp(), (x, y), loss_fn, batch_size=8)


def test_functional_loss_with_ignored_targets_is_refused_with_what_to_pass():
    x, y = _data(ignored=(19,))  # outside the first chunk: the target check runs on every chunk
    with pytest.raises(LossError, match=r"-100.*Pass nn.CrossEntropyLoss\(\)"):
        gradient_stats(_mlp(), (x, y), F.cross_entropy, batch_size=8)


def test_every_target_ignored_is_a_data_error():
    x, y = _data()
    y[:] = -100
    with pytest.raises(DataError, match="21 excluded"):
        gradient_stats(_mlp(), (x, y), nn.CrossEntropyLoss())


def test_plain_losses_pass_the_probe():
    x, y = _data(ignored=())
    for loss_fn in (nn.CrossEntropyLoss(), F.cross_entropy, lambda o, t: F.nll_loss(F.log_softmax(o, 1), t)):
        assert gradient_stats(_mlp(), (x, y), loss_fn, batch_size=8).n == 21
    reg = _mlp(classes=2)
    t = torch.randn(21, 2, dtype=torch.float64)
    for loss_fn in (F.mse_loss, nn.L1Loss(), nn.SmoothL1Loss(), nn.KLDivLoss(reduction="batchmean", log_target=True)):
        assert gradient_stats(reg, (x, t), loss_fn, batch_size=8).n == 21
