"""OSGR experiment: eq. 23 (measured) vs eq. 19/24 (predicted from GSNR), vmap vs loop, pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gsnr_diag.errors import DataError, TrajectoryFormatError
from gsnr_diag.experiments.osgr import OSGRPool, OSGRResult, osgr_experiment, osgr_lhs, osgr_rhs, pool_osgr


def _clusters(N=3000, seed=1, d=10, C=3):
    centers = torch.randn(C, d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    return centers[y] + torch.randn(N, d, generator=g), y


def _build():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def test_osgr_lhs_and_rhs_by_hand():
    # eq. 23: (Σ ΔL') / (Σ ΔL)
    assert osgr_lhs([1.0, 2.0], [0.9, 1.8], [1.1, 2.1], [1.05, 2.0]) == pytest.approx((-0.05 - 0.1) / (-0.1 - 0.2))
    assert osgr_lhs([1.0], [1.0], [1.0], [0.9]) is None
    # eq. 19/24: 1 − Σ_j mean_m ρ² / (n Σ_j mean_m ḡ²)
    means = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}]
    variances = [{"w": torch.tensor([4.0, 4.0])}, {"w": torch.tensor([2.0, 6.0])}]
    signal = ((1 + 4) + (9 + 0)) / 2
    noise = ((4 + 4) + (2 + 6)) / 2
    assert osgr_rhs(means, variances, n=10) == pytest.approx(1 - noise / (10 * signal))
    assert osgr_rhs([{"w": torch.zeros(2)}], [{"w": torch.ones(2)}], n=10) is None


def test_lhs_matches_rhs_at_small_lr_and_pooled_correlation():
    """Sec. 2.4 / Fig. 4. Tiny problem: 3 Gaussian clusters in 10-D, a 10-32-3 MLP, M = 10 sets, 1000 test
    samples, full-batch GD with lr = 0.01, steps t = 0, 1, 2.

    Tolerance 0.03 for clean labels at n = 100: over seeds 0-5 this setting gave |LHS − RHS| ≤ 0.018
    (s.d. 0.009), and the gap did not shrink from lr = 0.01 to 0.001, so it is the sampling noise of M = 10
    training sets and a 1000-sample test set, not the O(λ) term of eq. 19; 0.03 is ≈ 3.5 s.d. With label
    noise the test-loss changes are noisier, so those settings are checked through the pooled correlation.
    """
    data = _clusters()
    results = {}
    for n in (20, 100):
        for noise in (0.0, 0.5):
            results[n, noise] = osgr_experiment(
                _build, data, n=n, M=10, test_size=1000, lr=0.01, epochs=3, record_at=[0, 1, 2], label_noise=noise
            )
    clean = results[100, 0.0]
    # measured: (0.9248, 0.9248), (0.9251, 0.9243), (0.9256, 0.9238)
    for lhs, rhs in zip(clean.lhs, clean.rhs):
        assert abs(lhs - rhs) < 0.03, (clean.lhs, clean.rhs)
    assert clean.epochs == [0, 1, 2] and clean.settings["vectorized"] is True
    assert clean.train_loss[0] > clean.train_loss[2]
    pool = pool_osgr(results.values())
    # measured: c = 0.996 at every step; pairs (n=20) 0.70/0.71, (n=20, p=0.5) 0.33/0.43, (n=100, p=0.5) 0.69/0.75
    assert pool.epochs == [0, 1, 2] and pool.n_points == [4, 4, 4]
    assert all(c > 0.9 for c in pool.pearson), pool.pearson
    # more data → larger OSGR; label noise → smaller (the paper's trends), in both LHS and RHS
    for side in ("lhs", "rhs"):
        get = lambda key: getattr(results[key], side)[0]
        assert get((100, 0.0)) > get((20, 0.0)) and get((100, 0.0)) > get((100, 0.5))


def test_vectorized_equals_sequential():
    data = _clusters(N=800)
    kw = dict(n=50, M=4, test_size=200, lr=0.05, epochs=6, record_at=[0, 5])
    a = osgr_experiment(_build, data, vectorize=True, **kw)
    b = osgr_experiment(_build, data, vectorize=False, **kw)
    assert a.settings["vectorized"] and not b.settings["vectorized"]
    np.testing.assert_allclose(a.lhs, b.lhs, rtol=1e-4)
    np.testing.assert_allclose(a.rhs, b.rhs, rtol=1e-4)
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)


def test_regression_loss_and_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(500, 2, generator=g) * 2 - 1
    y = (x[:, :1] * x[:, 1:]) + 0.1 * torch.randn(500, 1, generator=g)
    r = osgr_experiment(
        lambda: nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)),
        (x, y),
        nn.MSELoss(),
        n=40,
        M=5,
        test_size=200,
        lr=0.01,
        epochs=2,
        record_at=[1],
    )
    assert len(r.lhs) == len(r.rhs) == 1 and math.isfinite(r.rhs[0])
    back = OSGRResult.from_dict(r.to_dict())
    assert back == r
    with pytest.raises(TrajectoryFormatError):
        OSGRResult.from_dict({"epochs": [0], "lhs": [], "rhs": []})
    pool = pool_osgr([r])
    assert OSGRPool.from_dict(pool.to_dict()) == pool and pool.pearson == [None]  # < 3 points


def test_bad_input():
    data = _clusters(N=300)
    with pytest.raises(DataError, match="M·n \\+ test_size"):
        osgr_experiment(_build, data, n=50, M=10, test_size=100, epochs=2, record_at=[0])
    with pytest.raises(DataError, match="record_at"):
        osgr_experiment(_build, data, n=10, M=2, test_size=10, epochs=2, record_at=[2])
    x = torch.randn(100, 10)
    with pytest.raises(DataError, match="classification"):
        osgr_experiment(
            lambda: nn.Linear(10, 1),
            (x, x[:, :1]),
            nn.MSELoss(),
            n=10,
            M=2,
            test_size=10,
            epochs=1,
            record_at=[0],
            label_noise=0.5,
        )


def test_conv_model_vmap_matches_loop_and_auto_picks_the_loop_on_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (120,), generator=g)

    def build():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))

    kw = dict(n=20, M=3, test_size=40, lr=0.05, epochs=3, record_at=[0, 2])
    a = osgr_experiment(build, (x, y), vectorize=True, **kw)
    auto = osgr_experiment(build, (x, y), **kw)
    assert a.settings["vectorized"] and not auto.settings["vectorized"]
    np.testing.assert_allclose(a.lhs, auto.lhs, rtol=1e-4)
    np.testing.assert_allclose(a.rhs, auto.rhs, rtol=1e-4)
