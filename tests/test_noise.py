"""Gradient noise scale B_simple and m-coherence against the float64 batch-of-one loop (tests/reference.py).

The reference computes m-coherence from its definition over sample pairs (a Gram matrix of the
per-sample gradients, O(n²)), B_simple from the per-sample variance; neither shares code with
gsnr_diag.core.noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import cases
from reference import per_sample_gradients
from torch import nn

from gsnr_diag import gradient_stats
from gsnr_diag.core.noise import m_coherence, noise_scale
from gsnr_diag.core.stats import GradientStats

CASES = cases()
RTOL = 1e-5


def _reference(G: dict[str, np.ndarray], n: int) -> dict:
    """B_simple and m-coherence (α = E_{z,z'}[g_z·g_z'] / E_z[g_z·g_z], times n) from per-sample gradients."""

    def both(keys):
        flat = np.concatenate([G[k].reshape(n, -1) for k in keys], axis=1)  # [n, elements]
        gram = flat @ flat.T  # g_i · g_j
        alpha = gram.mean() / np.trace(gram) * n  # E over independent pairs / E over the diagonal
        mean = flat.mean(0)
        var = ((flat - mean) ** 2).sum(0) / (n - 1)
        signal = float((mean**2).sum())
        return (var.sum() / signal if signal > 0 else None), (n * alpha if np.trace(gram) > 0 else None)

    overall = both(list(G))
    per_layer = {k: both([k]) for k in G}
    return {
        "noise_scale": overall[0],
        "m_coherence": overall[1],
        "layer_noise_scale": {k: v[0] for k, v in per_layer.items()},
        "layer_m_coherence": {k: v[1] for k, v in per_layer.items()},
    }


def _approx(got, expected, what):
    if expected is None:
        assert got is None, what
    else:
        assert got == pytest.approx(expected, rel=RTOL), what


NAMES = ["mlp", "cnn", "batchnorm_cnn", "bare_parameter", "tied_weights", "embedding_layernorm"]


@pytest.mark.parametrize("name", NAMES)
def test_noise_scale_and_m_coherence_match_the_loop(name):
    build, X, Y = CASES[name]
    torch.manual_seed(1)
    model = build().double()
    X = X.double() if X.is_floating_point() else X
    loss_fn = nn.CrossEntropyLoss()
    n = int(Y.shape[0])
    ref = _reference(per_sample_gradients(model, X, Y, loss_fn), n)
    got = gradient_stats(model, (X, Y), loss_fn, batch_size=7)
    _approx(got.noise_scale, ref["noise_scale"], f"{name} noise_scale")
    _approx(got.m_coherence, ref["m_coherence"], f"{name} m_coherence")
    assert set(got.layer_noise_scale) == set(ref["layer_noise_scale"])
    for k in ref["layer_noise_scale"]:
        _approx(got.layer_noise_scale[k], ref["layer_noise_scale"][k], f"{name} layer_noise_scale[{k}]")
        _approx(got.layer_m_coherence[k], ref["layer_m_coherence"][k], f"{name} layer_m_coherence[{k}]")
    # the single-set OSGR (eq. 19) is exactly 1 − B_simple / n
    assert got.osgr == pytest.approx(1 - got.noise_scale / n, rel=1e-12, abs=1e-12)
    # and m-coherence = n / (1 + (n − 1)/n · B_simple)
    assert got.m_coherence == pytest.approx(n / (1 + (n - 1) / n * got.noise_scale), rel=1e-12)


def test_limits_orthogonal_and_identical_gradients():
    n = 6
    eye = torch.eye(n, dtype=torch.float64)  # sample i's gradient is the unit vector e_i
    mean, var = eye.mean(0), eye.var(0)
    assert m_coherence([mean], [var], n) == pytest.approx(1.0)
    same = torch.tensor([[1.0, -2.0, 3.0]] * n, dtype=torch.float64)
    assert m_coherence([same.mean(0)], [same.var(0)], n) == pytest.approx(n)
    assert noise_scale([same.mean(0)], [same.var(0)]) == 0.0
    zero = torch.zeros(3, dtype=torch.float64)
    assert noise_scale([zero], [zero]) is None and m_coherence([zero], [zero], n) is None


def test_fields_round_trip_and_reach_the_snapshot(tmp_path):
    from gsnr_diag import Monitor, Trajectory

    torch.manual_seed(0)
    X, Y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    stats = gradient_stats(model, (X, Y))
    back = GradientStats.from_dict(stats.to_dict())
    assert back.noise_scale == stats.noise_scale and back.layer_m_coherence == stats.layer_m_coherence
    assert "noise scale B_simple" in stats.summary()
    seen = []
    monitor = Monitor(model, (X, Y), every=1, path=tmp_path / "run.jsonl", on_snapshot=seen.append)
    snap = monitor.record(0)
    assert seen == [snap]
    # The Monitor measures in folds (for OSGR's standard error): equal up to float rounding of the merge.
    assert snap.noise_scale == pytest.approx(stats.noise_scale, rel=1e-6)
    assert snap.m_coherence == pytest.approx(stats.m_coherence, rel=1e-6)
    assert snap.layer_noise_scale == pytest.approx(stats.layer_noise_scale, rel=1e-6)
    traj = Trajectory.load(tmp_path / "run.jsonl")
    assert traj.snapshots[0].noise_scale == pytest.approx(stats.noise_scale)
    _, values = traj.series("layer_m_coherence", layer="0.weight")
    assert values[0] == pytest.approx(stats.layer_m_coherence["0.weight"])


def test_on_snapshot_must_be_callable():
    from gsnr_diag import Monitor
    from gsnr_diag.errors import MonitorError

    with pytest.raises(MonitorError, match="on_snapshot"):
        Monitor(nn.Linear(2, 2), (torch.randn(4, 2), torch.randint(0, 2, (4,))), on_snapshot=3)


def _trained_run(steps: int = 6):
    from gsnr_diag import Monitor, train
    from gsnr_diag.report import new_run

    torch.manual_seed(0)
    X, Y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    monitor = Monitor(model, (X[:48], Y[:48]), test_data=(X[48:], Y[48:]), every=2)
    traj = train(model, (X[:48], Y[:48]), epochs=steps, lr=0.5, monitor=monitor, progress=False)
    return new_run(traj, metadata=traj.metadata), traj


def test_report_shows_noise_scale_beside_osgr():
    from gsnr_diag.report import render_html
    from gsnr_diag.report.verdicts import fmt, metrics, verdict_values

    run, traj = _trained_run()
    v = verdict_values(run)
    last = traj.snapshots[-1]
    assert v["noise_scale"] == pytest.approx(last.noise_scale)
    row = next(m for m in metrics(run, v) if m.key == "noise_scale")
    assert row.status == "n/a"  # informational, never counted in the headline
    n = traj.metadata["n_train"]
    assert f"1 − B/n = {fmt(1 - last.noise_scale / n)}" in row.detail
    assert f"R = {fmt(last.osgr)}" in row.detail and fmt(last.osgr) == fmt(1 - last.noise_scale / n)
    html = render_html(run)
    section = html.split('id="fig-noise"', 1)[1].split("</section>", 1)[0]
    assert "<svg" in section
    assert "Gradient noise scale B_simple and m-coherence" in html
    table = html.split('id="layers"', 1)[1].split("</section>", 1)[0]
    assert "<th>Noise scale</th>" in table and fmt(last.layer_noise_scale["0.weight"]) in table
