"""Streaming moments: Chan's merge equals all-at-once in any chunking (hypothesis property tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gsnr_diag import ChunkMoments, GradientStats, Moments, gradient_stats


@st.composite
def samples_and_cuts(draw):
    n = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.sampled_from([0.0, 1.0, 1e4]))  # large offsets stress cancellation
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=6, unique=True)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, generator=g, dtype=torch.float64) + offset
    x[torch.rand(n, 3, 2, generator=g) < 0.2] = 0.0  # exact zeros, as ReLU makes
    return x, cuts


@given(samples_and_cuts())
@settings(max_examples=60, deadline=None)
def test_merging_chunks_equals_all_at_once(data):
    x, cuts = data
    bounds = [0, *cuts, x.shape[0]]
    streamed = Moments()
    for a, b in zip(bounds[:-1], bounds[1:]):
        streamed.add("p", ChunkMoments.from_samples(x[a:b]))
    whole = ChunkMoments.from_samples(x)
    assert streamed.n == x.shape[0]
    torch.testing.assert_close(streamed.mean["p"], whole.mean, rtol=1e-12, atol=1e-12 * float(x.abs().max()))
    torch.testing.assert_close(streamed.m2["p"], whole.m2, rtol=1e-9, atol=1e-9 * float(whole.m2.max()) + 1e-300)
    assert torch.equal(streamed.pos["p"], whole.pos)
    assert torch.equal(streamed.neg["p"], whole.neg)
    # float64 resolves a variance only down to ~ε·x̄² (two samples 1e4 apart by 1e-4: GSNR 1e16); below
    # that, any two algorithms (ours, torch.var) differ in their rounding
    floor = 1e-15 * float(x.square().max())
    np.testing.assert_allclose(
        (streamed.m2["p"] / (x.shape[0] - 1)).numpy(), x.var(0, unbiased=True).numpy(), rtol=1e-9, atol=floor
    )


@given(samples_and_cuts())
@settings(max_examples=30, deadline=None)
def test_merge_of_accumulators_is_order_independent(data):
    x, cuts = data
    bounds = [0, *cuts, x.shape[0]]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        m = Moments()
        m.add("p", ChunkMoments.from_samples(x[a:b]))
        parts.append(m)
    forward = Moments()
    for m in parts:
        forward.merge(m)
    backward = Moments()
    for m in reversed(parts):
        backward.merge(m)
    torch.testing.assert_close(forward.mean["p"], backward.mean["p"], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(forward.m2["p"], backward.m2["p"], rtol=1e-9, atol=1e-9)


def test_from_sums_matches_from_samples():
    x = torch.randn(17, 5, dtype=torch.float64)
    a = ChunkMoments.from_samples(x)
    b = ChunkMoments.from_sums(17, x.sum(0), x.square().sum(0), (x > 0).sum(0), (x < 0).sum(0))
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.m2, b.m2)


@given(
    scale=st.floats(1e-3, 1e3),
    batch_size=st.integers(2, 25),
    seed=st.integers(0, 1000),
)
@settings(max_examples=15, deadline=None)
def test_gsnr_invariant_to_loss_scale_and_chunking(scale, batch_size, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6, 3)).double()
    X = torch.randn(25, 1, 8, dtype=torch.float64)
    Y = torch.randint(0, 3, (25,))
    ce = nn.CrossEntropyLoss()
    base = gradient_stats(model, (X, Y), ce)
    scaled = gradient_stats(model, (X, Y), lambda o, y: scale * ce(o, y), batch_size=batch_size)
    for k in base.gsnr:
        torch.testing.assert_close(scaled.gsnr[k], base.gsnr[k], rtol=1e-8, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(scaled.mean[k], scale * base.mean[k], rtol=1e-8, atol=1e-14)
    assert scaled.mean_same_sign == pytest.approx(base.mean_same_sign, rel=1e-12)
    assert scaled.osgr == pytest.approx(base.osgr, rel=1e-8)


def test_gradient_stats_round_trips_through_json():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias[0] = -100.0  # a dead unit: NaN entries must survive JSON
    s = gradient_stats(model, (torch.randn(20, 4), torch.randint(0, 2, (20,))))
    text = json.dumps(s.to_dict(), allow_nan=False)
    back = GradientStats.from_dict(json.loads(text))
    assert back.aggregates() == s.aggregates()
    for k in s.gsnr:
        torch.testing.assert_close(back.gsnr[k], s.gsnr[k], equal_nan=True)
        torch.testing.assert_close(back.same_sign[k], s.same_sign[k], equal_nan=True)
    assert "0.weight" in s.summary() and "mean GSNR" in s.summary()


def test_signs_false_skips_same_sign():
    s = gradient_stats(nn.Linear(4, 2), (torch.randn(9, 4), torch.randint(0, 2, (9,))), signs=False)
    assert s.same_sign is None and s.mean_same_sign is None
    assert s.mean_gsnr is not None
