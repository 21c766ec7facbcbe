"""Round-off is not signal: gradients that are zero in exact arithmetic but come out as rounding noise
are undefined (core/roundoff.py), counted per layer, and everything else agrees with the float64 loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_stats
from torch import nn

from gsnr_diag import GradientStats, gradient_stats
from gsnr_diag.report import build_view, new_run, render_html

N, E, T, C = 24, 8, 6, 3


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(E, 2, batch_first=True)
        self.out = nn.Linear(E, C)

    def forward(self, x):
        return self.out(self.att(x, x, x, need_weights=False)[0].mean(1))


class KeyProjection(nn.Module):
    """Single-head attention with its own q/k/v Linear layers (each on the moment-rule path)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, C)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / E**0.5, -1)
        return self.out(torch.tanh(a @ self.v(x)).mean(1))


class ConvInstanceNorm(nn.Module):
    def __init__(self, norm=True):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.n = nn.InstanceNorm2d(4) if norm else nn.Identity()
        self.out = nn.Linear(4, C)

    def forward(self, x):
        return self.out(torch.relu(self.n(self.c(x))).mean((2, 3)))


class LayerNormThenInstanceNorm(nn.Module):
    """β of the LayerNorm is constant over tokens; InstanceNorm1d over the tokens removes it."""

    def __init__(self):
        super().__init__()
        self.fc, self.n1, self.n2, self.out = nn.Linear(5, E), nn.LayerNorm(E), nn.InstanceNorm1d(E), nn.Linear(E, C)
        self.n1.weight.requires_grad_(False)  # γ too is removed, but only up to InstanceNorm's ε: tiny, not zero

    def forward(self, x):
        h = self.n2(self.n1(self.fc(x)).transpose(1, 2))  # [B, E, T], normalized over T
        return self.out(torch.tanh(h).mean(2))


def _measure(model, x, dtype, batch_size=10):
    torch.manual_seed(0)
    y = torch.randint(0, C, (N,))
    model = model.to(dtype)
    got = gradient_stats(model, (x.to(dtype), y), batch_size=batch_size)
    ref = reference_stats(model, x.to(dtype), y, nn.CrossEntropyLoss())
    return got, ref


def _agrees_elsewhere(got, ref, rtol):
    """Every element not marked round-off agrees with the float64 loop; round-off ones are NaN."""
    for k, want in ref["gsnr"].items():
        mask = np.zeros(want.shape, bool)
        if k in got.layer_roundoff and got.layer_roundoff[k]:
            mask = np.isnan(got.gsnr[k].numpy()) & ~np.isnan(want)
        assert int(mask.sum()) == got.layer_roundoff.get(k, 0), k
        for key in ("mean", "var"):  # round-off elements hold rounding noise, different in float32 and float64
            a, b = getattr(got, key)[k].numpy()[~mask], ref[key][k][~mask]
            if b.size:
                assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-300), (key, k)
        a, b = got.gsnr[k].numpy()[~mask], want[~mask]
        assert np.array_equal(np.isnan(a), np.isnan(b)), k
        ok = ~np.isnan(b)
        np.testing.assert_allclose(a[ok], b[ok], rtol=rtol * 100, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_key_bias_is_roundoff(dtype):
    x = torch.randn(N, T, E)
    torch.manual_seed(1)
    got, ref = _measure(MHA(), x, dtype)
    r = got.gsnr["att.in_proj_bias"]
    assert torch.isnan(r[E : 2 * E]).all()  # key bias: softmax(q·(k + b)) does not depend on b
    assert not torch.isnan(r[:E]).any() and not torch.isnan(r[2 * E :]).any()
    assert got.layer_roundoff == {k: (E if k == "att.in_proj_bias" else 0) for k in got.gsnr}
    assert got.roundoff == E and got.undefined == ref["undefined"] + E
    assert got.layer_undefined["att.in_proj_bias"] == E
    _agrees_elsewhere(got, ref, 1e-5 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_key_projection_bias_on_the_rule_path_is_roundoff(dtype):
    x = torch.randn(N, T, E)
    torch.manual_seed(2)
    got, ref = _measure(KeyProjection(), x, dtype)
    assert got.capture_paths["k"] == "moment-rule"
    assert torch.isnan(got.gsnr["k.bias"]).all() and got.layer_roundoff["k.bias"] == E
    assert got.roundoff == E
    _agrees_elsewhere(got, ref, 1e-5 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [6, 32])
def test_conv_bias_before_instance_norm_is_roundoff(dtype, size):
    x = torch.randn(N, 2, size, size) * 2 + 1
    torch.manual_seed(3)
    got, ref = _measure(ConvInstanceNorm(), x, dtype)
    assert got.capture_paths["c"] == "moment-rule"
    assert torch.isnan(got.gsnr["c.bias"]).all()
    assert got.layer_roundoff == {"c.weight": 0, "c.bias": 4, "out.weight": 0, "out.bias": 0}
    assert "round-off" in got.summary()
    _agrees_elsewhere(got, ref, 1e-5 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm_beta_before_instance_norm_is_roundoff(dtype):
    x = torch.randn(N, T, 5)
    torch.manual_seed(4)
    got, ref = _measure(LayerNormThenInstanceNorm(), x, dtype)
    assert torch.isnan(got.gsnr["n1.bias"]).all() and got.layer_roundoff["n1.bias"] == E
    assert got.roundoff == E
    _agrees_elsewhere(got, ref, 1e-5 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: ConvInstanceNorm(norm=False), (N, 2, 8, 8)),
        (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, C)), (N, 6)),
        (lambda: nn.Sequential(nn.Linear(5, E), nn.LayerNorm(E), nn.Flatten(), nn.Linear(T * E, C)), (N, T, 5)),
    ],
)
def test_ordinary_layers_have_no_roundoff(make, shape, dtype):
    torch.manual_seed(5)
    got, ref = _measure(make(), torch.randn(*shape), dtype)
    assert got.roundoff == 0 and got.undefined == ref["undefined"]
    assert set(got.layer_roundoff.values()) == {0}


def test_roundoff_counts_survive_json_and_reach_the_report():
    torch.manual_seed(6)
    got, _ = _measure(ConvInstanceNorm(), torch.randn(N, 2, 6, 6), torch.float64)
    back = GradientStats.from_dict(got.to_dict())
    assert back.roundoff == got.roundoff == 4 and back.layer_roundoff == got.layer_roundoff
    assert back.layer_undefined == got.layer_undefined
    run = new_run(None, final_stats=got)
    rows = {r.name: r.undefined for r in build_view(run).layers}
    assert rows["c.bias"] == "4 (4 round-off)" and rows["c.weight"] == "0"
    assert "4 (4 round-off)" in render_html(run)
