"""The zoo's extra cases in float32 and float64: models whose forward changes them, losses that are not a
plain batch mean, and a forward that mixes samples (the float64-only tests are in their own files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_stats
from test_losses import LOSSES, _class_weights, _mlp, _reference
from test_mixing import MeanMixing
from test_untouched_forward import CASES as CHANGING
from torch import nn
from untouched import assert_same_rng, assert_same_state, model_state, rng_state
from zoo_cases import TOLERANCE, compare, force_path

from gsnr_diag import gradient_stats
from gsnr_diag.errors import ModelError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _assert_close(got, ref, dtype):
    err = compare(got, ref, dtype)
    assert err["undefined"] == 0, err
    for stat, limit in TOLERANCE[dtype].items():
        assert err[stat] <= limit, f"{stat}: {err[stat]:.3e} > {limit:.1e} ({err})"


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(CHANGING))
def test_models_changed_by_their_forward(name, dtype_name):
    dtype = DTYPES[dtype_name]
    build, make_x, mode = CHANGING[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    x = make_x()
    x = x.to(dtype) if x.is_floating_point() else x
    y = torch.randint(0, 2, (x.shape[0],), generator=torch.Generator().manual_seed(4))
    model.train(mode == "train")
    ref = reference_stats(model, x, y, nn.CrossEntropyLoss(), mode=mode) if mode == "eval" else None
    before, rng = model_state(model), rng_state()
    got = gradient_stats(model, (x, y), batch_size=4, mode=mode)
    assert_same_state(before, model_state(model))
    assert_same_rng(rng)
    if ref is not None:  # train mode: the reference loop would advance spectral norm / running stats per sample
        _assert_close(got, ref, dtype)


@pytest.mark.parametrize("path", ["moment-rule", "grad-sampler", "functorch", "loop"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_that_are_not_a_batch_mean(name, dtype_name, path):
    dtype = DTYPES[dtype_name]
    loss_fn = LOSSES[name]()
    if loss_fn.weight is not None:
        loss_fn.weight = loss_fn.weight.to(dtype)
    model = nn.Sequential(_mlp(), nn.LogSoftmax(1)) if isinstance(loss_fn, nn.NLLLoss) else _mlp()
    model = model.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(21, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (21,), generator=g)
    y[[2, 5, 11]] = loss_fn.ignore_index
    ref, n = _reference(model, x, y, loss_fn, _class_weights(loss_fn))
    for batch_size in (4, None):
        with force_path(path):
            got = gradient_stats(model, (x, y), loss_fn, batch_size=batch_size)
        assert got.n == n
        assert set(got.capture_paths.values()) == {path}
        _assert_close(got, ref, dtype)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_mixing_refused(dtype_name):
    x = torch.randn(12, 4, dtype=DTYPES[dtype_name])
    with pytest.raises(ModelError, match="mixes samples"):
        gradient_stats(MeanMixing().to(DTYPES[dtype_name]), (x, torch.randint(0, 3, (12,))), batch_size=6)


class WithLinearCrossEntropy(nn.Module):
    """nn.LinearCrossEntropyLoss held by the model and used as its loss (its parameters live in the loss)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.lce = nn.LinearCrossEntropyLoss(6, 3, bias=True)

    def forward(self, x):
        return torch.tanh(self.body(x))


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_loss_that_uses_parameters_of_the_model(dtype_name):
    from reference import stats_of_gradients

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = WithLinearCrossEntropy().to(dtype)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(14, 4, generator=g, dtype=dtype), torch.randint(0, 3, (14,), generator=g)
    double = WithLinearCrossEntropy()
    double.load_state_dict(model.state_dict())
    double = double.double()
    rows = {k: [] for k, _ in double.named_parameters()}
    for i in range(14):  # the float64 batch-of-one loop, by hand: the loss belongs to the model
        grads = torch.autograd.grad(double.lce(double(x[i : i + 1].double()), y[i : i + 1]), list(double.parameters()))
        for k, gr in zip(rows, grads):
            rows[k].append(gr.numpy())
    ref = stats_of_gradients({k: np.stack(v) for k, v in rows.items()}, double)
    before = model_state(model)
    got = gradient_stats(model, (x, y), lambda h, t: model.lce(h, t), batch_size=4)
    assert_same_state(before, model_state(model))
    assert got.capture_paths["lce.linear"] in ("functorch", "loop")
    _assert_close(got, ref, dtype)
