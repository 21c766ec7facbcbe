"""float32 precision of ρ² at high GSNR: the Linear rule against the float64 batch-of-one loop.

Per-sample gradients g_i = 2 r_i x_i with x_i = 1 + s·ε_i and residuals r_i = 1 + s·η_i give an element
GSNR of about 1/(2s²). Σg² − nḡ² in float32 loses every digit of ρ² from GSNR ~10⁵ on; the centred
rule must stay about as close to the float64 loop as a float32 per-sample loop is (its per-sample
gradients carry the same float32 rounding; ~4e-5 at GSNR 10⁷).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_stats
from torch import nn

from gsnr_diag import gradient_stats


def _loss(out, t):
    return ((out - t) ** 2).sum(1).mean()


def _float32_loop_var(model, x, y):
    rows = {k: [] for k, _ in model.named_parameters()}
    for i in range(len(y)):
        gs = torch.autograd.grad(_loss(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        for (k, _), g in zip(model.named_parameters(), gs):
            rows[k].append(g.double())
    return {k: torch.stack(v).var(0).numpy() for k, v in rows.items()}


def _case(gsnr, correlated, n=200, n_in=6, n_out=3, seed=0):
    torch.manual_seed(seed)
    s = (2 * gsnr) ** -0.5
    model = nn.Linear(n_in, n_out)
    eps = torch.randn(n, n_in)
    eta = torch.randn(n, n_out)
    if correlated:  # residuals that covary with the inputs: (ḡ − δ̄ā) is a covariance, not 0
        eta = 0.8 * eps[:, :n_out] + 0.6 * eta
    x = 1 + s * eps
    with torch.no_grad():
        y = model(x) - (1 + s * eta)
    return model, x, y


@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("gsnr", [1e3, 1e4, 1e5, 1e6, 1e7])
@pytest.mark.parametrize("chunks", [None, 64])
def test_float32_variance_at_high_gsnr(gsnr, correlated, chunks):
    model, x, y = _case(gsnr, correlated)
    ref = reference_stats(model, x, y, _loss)
    got = gradient_stats(model, (x, y), _loss, batch_size=chunks)
    loop = _float32_loop_var(model, x, y)
    assert got.capture_paths[""] == "moment-rule"
    for k, want in ref["var"].items():
        assert 0.2 * gsnr < np.median(ref["gsnr"][k]) < 5 * gsnr, k
        rel = np.abs(got.var[k].numpy() - want) / want
        rel_loop = np.abs(loop[k] - want) / want
        # float32 data (δ, a) carry ~ε·√GSNR relative error in ρ², in the loop and here alike
        bound = max(3 * rel_loop.max(), 0.5 * torch.finfo(torch.float32).eps * gsnr**0.5) + 1e-6
        assert rel.max() < bound, f"{k}: ρ² max relative error {rel.max():.2e} > {bound:.1e} at GSNR {gsnr:.0e}"
        rel_m = np.abs(got.mean[k].numpy() - ref["mean"][k]) / np.abs(ref["mean"][k])
        assert rel_m.max() < 1e-5, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_grad", [True, False])
def test_identical_per_sample_gradients_have_zero_variance(dtype, with_grad, monkeypatch):
    """Bitwise-identical per-sample gradients: ρ² = 0 exactly, so every GSNR is undefined."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(dtype)
    x = torch.randn(1, 6, dtype=dtype).repeat(96, 1)
    y = torch.randn(1, 3, dtype=dtype).repeat(96, 1)
    if not with_grad:
        from gsnr_diag.capture import capture

        monkeypatch.setattr(capture._Grads, "get", lambda self, key, default=None: None)
    got = gradient_stats(model, (x, y), _loss, batch_size=32)  # equal chunks: the same float path each
    assert got.undefined == got.num_elements
    for k in got.var:
        assert torch.equal(got.var[k], torch.zeros_like(got.var[k])), k


def test_mlp_float32_close_to_reference():
    """A float32 MLP (rule path for every layer) within float32 resolution of the float64 loop."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(96, 10) + 3.0
    y = torch.randint(0, 4, (96,))
    ref = reference_stats(model, x, y, nn.CrossEntropyLoss())
    got = gradient_stats(model, (x, y), batch_size=40)
    for k, want in ref["var"].items():
        scale = np.abs(want).max()
        assert np.abs(got.var[k].numpy() - want).max() < 1e-5 * scale, k
