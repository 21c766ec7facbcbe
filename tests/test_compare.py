"""gsnr-diag compare and report.compare: deltas, jackknife standard errors, exit codes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gsnr_diag import Monitor, train
from gsnr_diag.cli import main
from gsnr_diag.errors import ComparisonError
from gsnr_diag.report import new_run, save_run
from gsnr_diag.report.compare import compare_points


def _run(seed=0, groups=4, epochs=4):
    torch.manual_seed(seed)
    X, Y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    monitor = Monitor(model, (X, Y), every=2, batch_size=32, jackknife_groups=groups)
    traj = train(model, (X, Y), epochs=epochs, lr=0.5, monitor=monitor, progress=False)
    return new_run(traj, metadata=traj.metadata)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    base = _run()
    same = _run()
    noisy = copy.deepcopy(base)
    noisy["trajectory"]["snapshots"][-1]["layer_gsnr"]["0.weight"] *= 0.3  # that layer's GSNR collapsed
    collapsed, plain = copy.deepcopy(noisy), copy.deepcopy(base)
    for run in (collapsed, plain):  # measured without jackknife groups: no standard errors
        run["trajectory"]["snapshots"][-1]["standard_errors"] = {}
    paths = {}
    for name, run in (("base", base), ("same", same), ("collapsed", collapsed), ("plain", plain), ("noisy", noisy)):
        paths[name] = d / f"{name}.json"
        save_run(run, paths[name])
    return paths


def test_identical_runs_pass_with_zero_deltas(runs):
    result = CliRunner().invoke(main, ["compare", str(runs["base"]), str(runs["same"])])
    assert result.exit_code == 0, result.output
    assert "no regression" in result.output
    a = json.loads(runs["base"].read_text())
    cmp = compare_points(a, json.loads(runs["same"].read_text()))
    assert all(d.delta == 0 for d in cmp.deltas)
    se = cmp.deltas[0].se  # mean_gsnr, SE(Δ) = sqrt(2) × the run's own jackknife SE
    own = a["trajectory"]["snapshots"][-1]["standard_errors"]["mean_gsnr"]
    assert se == pytest.approx(2**0.5 * own) and own > 0


def test_a_collapsed_layer_exits_1_and_is_named(runs, tmp_path):
    out = tmp_path / "deltas.json"
    result = CliRunner().invoke(main, ["compare", str(runs["plain"]), str(runs["collapsed"]), "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "layer_gsnr/0.weight" in result.output and "REGRESSION" in result.output
    deltas = json.loads(out.read_text())["deltas"]
    bad = [d for d in deltas if d["regression"]]
    assert [(d["quantity"], d["layer"]) for d in bad] == [("mean_gsnr", "0.weight")]
    assert bad[0]["relative"] == pytest.approx(-0.7)
    loose = CliRunner().invoke(main, ["compare", str(runs["plain"]), str(runs["collapsed"]), "--tolerance", "0.8"])
    assert loose.exit_code == 0, loose.output
    # with jackknife standard errors on both sides the same drop is within 2 SE(Δ) on this small model
    # (64 samples after training: mean GSNR is dominated by a few samples), so it is not called a regression
    noisy = CliRunner().invoke(main, ["compare", str(runs["base"]), str(runs["noisy"])])
    assert noisy.exit_code == 0, noisy.output
    assert "SE(Δ)" in noisy.output
    strict = CliRunner().invoke(main, ["compare", str(runs["base"]), str(runs["noisy"]), "--sigma", "0"])
    assert strict.exit_code == 1, strict.output


def test_sigma_guards_against_sampling_noise():
    base = {"mean_gsnr": 1.0, "layer_gsnr": {}, "standard_errors": {"mean_gsnr": 0.3}}
    cur = {"mean_gsnr": 0.7, "layer_gsnr": {}, "standard_errors": {"mean_gsnr": 0.3}}
    assert compare_points(base, cur, tolerance=0.1).ok  # Δ = −0.3 < 2 × 0.42
    assert not compare_points(base, cur, tolerance=0.1, sigma=0.5).ok
    no_se = {"mean_gsnr": 0.7, "layer_gsnr": {}}
    assert not compare_points(base, no_se, tolerance=0.1).ok  # tolerance alone without SEs
    up = {"mean_gsnr": 2.0, "layer_gsnr": {}}
    assert compare_points(base, up, tolerance=0.1).ok
    assert not compare_points(base, up, tolerance=0.1, two_sided=True).ok
    worse_noise = {"mean_gsnr": 1.0, "noise_scale": 3.0, "layer_gsnr": {}}
    assert not compare_points({**base, "noise_scale": 1.0}, worse_noise, tolerance=0.1).ok


def test_bad_input_exits_2(runs, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["compare", str(runs["base"]), str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "no such file" in missing.output
    (tmp_path / "junk.json").write_text("{not json")
    junk = runner.invoke(main, ["compare", str(tmp_path / "junk.json"), str(runs["base"])])
    assert junk.exit_code == 2 and "not valid JSON" in junk.output
    neg = runner.invoke(main, ["compare", str(runs["base"]), str(runs["base"]), "--tolerance", "-1"])
    assert neg.exit_code == 2
    with pytest.raises(ComparisonError, match="tolerance"):
        compare_points({"mean_gsnr": 1.0}, {"mean_gsnr": 1.0}, tolerance=-0.1)
    with pytest.raises(ComparisonError, match="no GSNR measurement"):
        compare_points({"x": 1}, {"mean_gsnr": 1.0})
