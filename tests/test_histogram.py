"""Per-layer log10-GSNR histograms of a snapshot against the float64 loop (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import cases
from reference import reference_stats
from torch import nn

from gsnr_diag import Monitor, Trajectory
from gsnr_diag.core.histogram import log10_gsnr_histogram


def test_snapshot_histograms_match_the_loop(tmp_path):
    build, X, Y = cases()["cnn"]
    torch.manual_seed(1)
    model = build().double()
    X = X.double()
    ref = reference_stats(model, X, Y, nn.CrossEntropyLoss())
    monitor = Monitor(model, (X, Y), path=tmp_path / "run.jsonl")
    monitor.record(0)
    snap = Trajectory.load(tmp_path / "run.jsonl").snapshots[0]  # through the JSONL round trip
    assert set(snap.layer_log10_gsnr_hist) == set(ref["gsnr"])
    for k, r in ref["gsnr"].items():
        values = np.log10(r[np.isfinite(r) & (r > 0)])
        h = snap.layer_log10_gsnr_hist[k]
        counts, _ = np.histogram(values, bins=len(h["counts"]), range=(values.min(), values.max()))
        assert h["num"] == values.size and h["left_out"] == r.size - values.size
        assert h["min"] == pytest.approx(values.min(), rel=1e-5, abs=1e-9)
        assert h["max"] == pytest.approx(values.max(), rel=1e-5, abs=1e-9)
        assert sum(h["counts"]) == values.size
        # a value on a bin edge may fall either side by rounding: counts agree to within one per bin
        assert np.abs(np.array(h["counts"]) - counts).max() <= 1, k
        assert h["sum"] == pytest.approx(values.sum(), rel=1e-6, abs=1e-6)


def test_histogram_edge_cases():
    assert log10_gsnr_histogram(torch.tensor([float("nan"), 0.0])) is None
    h = log10_gsnr_histogram(torch.tensor([10.0, 10.0, float("nan")]))
    assert h["num"] == 2 and h["left_out"] == 1 and sum(h["counts"]) == 2 and h["min"] == h["max"] == 1.0
