"""Delete-a-group jackknife standard errors against a float64 loop on the leave-one-group-out subsets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from models import cases
from reference import reference_stats
from torch import nn

from gsnr_diag import gradient_stats
from gsnr_diag.errors import ArgumentError


def _groups(n: int, batch: int, G: int) -> list[np.ndarray]:
    """The samples of each group: chunk by chunk, G contiguous slices (what gradient_stats does)."""
    out = [[] for _ in range(G)]
    for start in range(0, n, batch):
        b = min(batch, n - start)
        bounds = [round(i * b / G) for i in range(G + 1)]
        for g in range(G):
            out[g].extend(range(start + bounds[g], start + bounds[g + 1]))
    return [np.array(v) for v in out]


def _jackknife(values):
    G = len(values)
    mean = sum(values) / G
    return math.sqrt((G - 1) / G * sum((v - mean) ** 2 for v in values))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_jackknife_standard_errors_match_the_loop(name):
    build, X, Y = cases()[name]
    torch.manual_seed(1)
    model = build().double()
    X = X.double()
    loss_fn = nn.CrossEntropyLoss()
    n, batch, G = int(Y.shape[0]), 10, 4
    got = gradient_stats(model, (X, Y), loss_fn, batch_size=batch, jackknife_groups=G)
    plain = gradient_stats(model, (X, Y), loss_fn, batch_size=batch)
    assert got.jackknife_groups == G
    assert got.mean_gsnr == pytest.approx(plain.mean_gsnr, rel=1e-9)  # the groups change nothing else
    reps = []
    for idx in _groups(n, batch, G):
        keep = np.setdiff1d(np.arange(n), idx)
        reps.append(reference_stats(model, X[keep], Y[keep], loss_fn))
    se = got.standard_errors
    assert se["mean_gsnr"] == pytest.approx(_jackknife([r["mean_gsnr"] for r in reps]), rel=1e-5)
    assert se["mean_same_sign"] == pytest.approx(_jackknife([r["mean_same_sign"] for r in reps]), rel=1e-5)
    assert se["osgr"] == pytest.approx(_jackknife([r["osgr"] for r in reps]), rel=1e-5)
    for k in got.layer_gsnr:
        assert se[f"layer_gsnr/{k}"] == pytest.approx(_jackknife([r["layer_gsnr"][k] for r in reps]), rel=1e-5)
    # noise scale from the subsets' own moments
    scale = []
    for r in reps:
        signal = sum(float((m**2).sum()) for m in r["mean"].values())
        scale.append(sum(float(v.sum()) for v in r["var"].values()) / signal)
    assert se["noise_scale"] == pytest.approx(_jackknife(scale), rel=1e-5)
    assert se["mean_gsnr"] > 0


def test_jackknife_off_by_default_and_validated():
    X, Y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    model = nn.Linear(3, 2)
    assert gradient_stats(model, (X, Y)).standard_errors == {}
    for bad in (1, -2, 2.5, True):
        with pytest.raises(ArgumentError, match="jackknife_groups"):
            gradient_stats(model, (X, Y), jackknife_groups=bad)
