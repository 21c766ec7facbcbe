"""Exact same-sign counts for every shape of nn.Linear, including one-unit heads (float64 loop reference).

``torch._int_mm`` returns uninitialized memory for a one-row operand on some CPU builds; the sign
counts must never depend on it: one-unit layers take the float path, and every int8 product is
verified (a kernel that returns garbage is detected and dropped).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_stats
from torch import nn

from gsnr_diag import gradient_stats
from gsnr_diag.capture import blocks


def _exact_counts(d, a):
    g = d.double().unsqueeze(2) * a.double().unsqueeze(1)
    return (g > 0).sum(0).to(torch.int32), (g < 0).sum(0).to(torch.int32)


@pytest.mark.parametrize("out_features", [1, 2, 3])
@pytest.mark.parametrize("in_features", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_sign_of_narrow_linear_layers(out_features, in_features, dtype):
    torch.manual_seed(out_features * 10 + in_features)
    x = torch.rand(64, in_features) * 2 - 1
    y = torch.randn(64, out_features)
    layers = [nn.Linear(in_features, 20), nn.ReLU(), nn.Linear(20, out_features), nn.Linear(out_features, 1)]
    model = nn.Sequential(*layers)
    model = model.to(dtype)
    loss = lambda out, t: ((out - t.sum(1, keepdim=True)) ** 2).mean()
    ref = reference_stats(model, x, y, loss)
    first = gradient_stats(model, (x.to(dtype), y.to(dtype)), loss)
    for _ in range(3):
        again = gradient_stats(model, (x.to(dtype), y.to(dtype)), loss)
        for k in first.same_sign:
            assert torch.equal(first.same_sign[k].nan_to_num(-1.0), again.same_sign[k].nan_to_num(-1.0)), k
    assert set(first.capture_paths.values()) == {"moment-rule"}
    for k, want in ref["same_sign"].items():
        got = first.same_sign[k].numpy()
        assert np.array_equal(np.isnan(got), np.isnan(want)), k
        np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("shape", [(300, 1, 70000), (300, 70000, 1), (300, 2, 40000), (64, 256, 300), (5, 300, 300)])
def test_count_products_exact_for_every_shape(shape):
    k, m, n = shape
    torch.manual_seed(0)
    d, a = torch.randn(k, m), torch.randn(k, n).relu()
    d[d.abs() < 0.3] = 0
    want_pos, want_neg = _exact_counts(d, a) if m * n < 2**22 else (None, None)
    for _ in range(2):
        pos, neg = blocks.sign_counts_outer(d, a)
        s, c = torch.sign(d), torch.sign(a)
        assert torch.equal(blocks._count_mm(s, c), (s.double().t() @ c.double()).to(torch.int32))
        if want_pos is not None:
            assert torch.equal(pos, want_pos) and torch.equal(neg, want_neg)


@pytest.mark.parametrize("zeros", ["none", "one column", "most columns", "a zero column", "zeros in d"])
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("k", [1, 256, 300])
def test_counts_of_mixed_sign_inputs_are_exact(zeros, precision, k):
    """Inputs of both signs: one sign product, the non-zero counts from the zeros of ``a`` (some, most, none)."""
    g = torch.Generator().manual_seed(k)
    d, a = torch.randn(k, 7, generator=g), torch.randn(k, 11, generator=g)
    if zeros == "one column":
        a[::2, 3] = 0
    elif zeros == "most columns":
        a[a.abs() < 0.8] = 0
    elif zeros == "a zero column":
        a[:, 0] = 0
    elif zeros == "zeros in d":
        d[d.abs() < 0.5] = 0
        d[:, 1] = 0
    want_pos, want_neg = _exact_counts(d, a)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        pos, neg = blocks.sign_counts_outer(d, a)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert torch.equal(pos.to(torch.int32), want_pos) and torch.equal(neg.to(torch.int32), want_neg)
    assert not (pos.frac().any() or neg.frac().any())


def test_a_garbage_int8_kernel_is_detected(monkeypatch):
    """A kernel that returns wrong integers (as ``_int_mm`` does for one-row operands) is caught and dropped."""
    saved = dict(blocks._INT8_MM_OK)
    monkeypatch.setitem(blocks._INT8_MM_FASTER, "cpu", True)  # use the kernel even where it is slow
    real = torch._int_mm

    def garbage(x, y, out=None):
        r = real(x, y) if out is None else real(x, y, out=out)
        r[0, 0] += 3
        return r

    try:
        blocks._INT8_MM_OK.clear()
        monkeypatch.setattr(torch, "_int_mm", garbage)
        s = torch.sign(torch.randn(50, 300))
        c = torch.sign(torch.randn(50, 400))
        assert torch.equal(blocks._count_mm(s, c), (s.t() @ c).to(torch.int32))
        assert blocks._INT8_MM_OK["cpu"] is False
    finally:
        blocks._INT8_MM_OK.clear()
        blocks._INT8_MM_OK.update(saved)
