"""The run-level verdict: OSGR's jackknife SE, the predicted test loss, the graded evidence and its
intervals, the machine-readable verdict, ``gsnr-diag check --min-level`` and the report's panel."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gsnr_diag.cli import main
from gsnr_diag.core.moments import Moments
from gsnr_diag.core.uncertainty import bias_corrected_gsnr, gsnr_floor, jackknife_osgr
from gsnr_diag.dynamics.generalization import integrated_osgr, measured_ratio, predict_test_loss
from gsnr_diag.dynamics.schedules import report_schedule
from gsnr_diag.dynamics.trajectory import Snapshot, Trajectory
from gsnr_diag.measure import gradient_stats, gradient_stats_with_se
from gsnr_diag.report import new_run, render_html
from gsnr_diag.report.evidence import control_evidence, early_rise_evidence
from gsnr_diag.report.verdicts import grade_interval, verdict_object

# ----------------------------------------------------------------------------- uncertainty (core)


def _data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x.double(), (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def _model():  # float64: the fold merge and the loop then agree to rounding
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def test_fold_stats_equal_plain_stats_and_jackknife_matches_a_loop():
    model, data = _model(), _data()
    ref = gradient_stats(model, data)
    stats, se = gradient_stats_with_se(model, data, folds=6)
    assert stats.n == ref.n and stats.osgr == pytest.approx(ref.osgr, rel=1e-9)
    assert stats.mean_gsnr == pytest.approx(ref.mean_gsnr, rel=1e-9)
    # independent float64 jackknife: R on every leave-one-fold-out subset (chunks of 40, round-robin)
    X, Y = data
    folds = [list(range(k * 40, (k + 1) * 40)) for k in range(6)]
    loo = []
    for k in range(6):
        keep = [i for j, f in enumerate(folds) if j != k for i in f]
        loo.append(gradient_stats(model, (X[keep], Y[keep])).osgr)
    avg = sum(loo) / 6
    expected = math.sqrt(5 / 6 * sum((r - avg) ** 2 for r in loo))
    assert se == pytest.approx(expected, rel=1e-5)


def test_jackknife_needs_three_folds_and_floor_and_bias_correction():
    m = Moments(signs=False)
    assert jackknife_osgr([m]) == (None, None)
    assert gsnr_floor(200) == 0.005
    mean, var = torch.tensor([0.1, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])
    r = bias_corrected_gsnr(mean, var, 10)
    assert r[0].item() == pytest.approx((0.01 - 0.1) / 1.0) and r[1].item() == pytest.approx(-0.1)
    assert math.isnan(r[2].item())


# ----------------------------------------------------------------------------- the predicted test loss


def test_predicted_test_loss_is_the_integrated_eq19():
    L = [2.0, 1.5, 1.0, 0.8]
    R = [0.9, 0.7, 0.5, 0.1]
    S = [0.01, 0.02, 0.03, 0.2]
    preds = predict_test_loss(L, R, S)
    drop = 0.5 * (0.9 + 0.7) * 0.5 + 0.5 * (0.7 + 0.5) * 0.5 + 0.5 * (0.5 + 0.1) * 0.2
    assert preds[-1].value == pytest.approx(2.0 - drop)
    assert preds[-1].gap == pytest.approx(2.0 - drop - 0.8)
    disc = 0.5 * 0.2 / 2 + 0.5 * 0.2 / 2 + 0.2 * 0.4 / 2
    samp = 1.959964 * (0.5 * 0.015 + 0.5 * 0.025 + 0.2 * 0.115)
    assert preds[-1].high - preds[-1].value == pytest.approx(disc + samp)
    left = predict_test_loss(L, R, S, rule="left")
    assert left[-1].value == pytest.approx(2.0 - (0.9 * 0.5 + 0.7 * 0.5 + 0.5 * 0.2))
    ratio = integrated_osgr(L, R, S)
    assert ratio.value == pytest.approx(drop / 1.2) and ratio.low < ratio.value < ratio.high
    assert integrated_osgr([1.0, 1.0], [0.5, 0.5]).value is None  # nothing fell: nothing to share out
    assert measured_ratio(L, [2.0, 1.6, 1.2, 1.1]) == pytest.approx(0.9 / 1.2)
    assert predict_test_loss([None, 1.0], [0.5, 0.5]) == [None, None]


def _traj(L, R, test=None, gsnr=None, steps=None, se=0.01):
    steps = steps or list(range(0, 10 * len(L), 10))
    snaps = []
    for i, (s, loss, r) in enumerate(zip(steps, L, R)):
        snaps.append(
            Snapshot(
                step=s,
                train_loss=loss,
                osgr=r,
                osgr_se=se,
                test_loss=test[i] if test else None,
                mean_gsnr=gsnr[i] if gsnr else 0.01,
            )
        )
    return Trajectory(snaps, {"n_train": 100, "task": "classification"})


def test_trajectory_predicted_test_loss_and_run_json(tmp_path):
    traj = _traj([2.3, 1.5, 0.7, 0.2], [0.9, 0.8, 0.7, 0.6], test=[2.3, 1.6, 0.9, 0.5])
    p = traj.predicted_test_loss()
    assert p.steps == [0, 10, 20, 30] and p.measured == [2.3, 1.6, 0.9, 0.5]
    assert p.value[0] == 2.3 and p.final == pytest.approx(
        predict_test_loss([2.3, 1.5, 0.7, 0.2], [0.9, 0.8, 0.7, 0.6], [0.01] * 4)[-1].value
    )
    run = new_run(traj, metadata={"n_train": 100})
    snaps = json.loads(json.dumps(run))["trajectory"]["snapshots"]
    assert all("predicted_test_loss" in s and "predicted_test_loss_band" in s for s in snaps)
    assert snaps[-1]["predicted_test_loss"] == pytest.approx(p.final)
    lo, hi = snaps[-1]["predicted_test_loss_band"]
    assert lo < p.final < hi
    traj.save(tmp_path / "t.json")
    again = Trajectory.load(tmp_path / "t.json")
    assert again.snapshots[-1].predicted_test_loss_band == pytest.approx([lo, hi])


def test_report_schedule_resolves_the_early_phase_for_any_length():
    for total in (30, 300, 30_000):
        s = report_schedule(total)
        steps = [t for t in range(total + 1) if s(t)]
        assert steps[:4] == [0, 1, 2, 3]  # log-spaced from step 1, whatever the length
        assert len(steps) <= 30 + 6 * 5 + 2


# ----------------------------------------------------------------------------- graded evidence


def test_early_rise_is_robust_to_a_schedule_that_skips_the_peak():
    L = [2.3, 2.2, 2.0, 1.8, 1.5, 1.2, 0.8, 0.4, 0.1]
    g = [0.01, 0.02, 0.04, 0.06, 0.05, 0.04, 0.02, 0.01, 0.005]
    full = _traj(L, [0.8] * 9, gsnr=g)
    keep = [0, 1, 2, 4, 5, 6, 7, 8]  # the same run, one schedule skipped the peak (index 3)
    skipped = Trajectory([full.snapshots[i] for i in keep], dict(full.metadata))
    a = early_rise_evidence(new_run(full))
    b = early_rise_evidence(new_run(skipped))
    assert a.value == pytest.approx(b.value, rel=0.25)
    assert grade_interval("early_rise", a.value, a.interval) == grade_interval("early_rise", b.value, b.interval)
    assert a.interval[0] <= a.value <= a.interval[1]
    # peak ÷ start would be 6 for one and 5 for the other: the old grade hinged on one snapshot


def test_control_separation_reads_the_falling_phase_not_the_final_snapshot():
    L = [2.3, 1.8, 1.2, 0.6, 0.2, 0.05, 0.04, 0.04]
    real = _traj(L, [0.8] * 8, gsnr=[0.01, 0.05, 0.08, 0.06, 0.03, 0.002, 0.001, 0.001])
    shuffled = _traj([2.3] * 8, [0.1] * 8, gsnr=[0.01] * 8)
    control = {"real": real.to_dict(), "shuffled": shuffled.to_dict(), "final_ratio": 0.1, "peak_ratio": 8.0}
    ev = control_evidence(new_run(real, control=control))
    assert ev.details["phase_end_step"] == 40  # 90% of the decrease is made at the 5th snapshot
    assert ev.value == pytest.approx(math.exp(sum(math.log(x / 0.01) for x in (0.05, 0.08, 0.06, 0.03)) / 4))
    assert grade_interval("control_separation", ev.value, ev.interval) == "good"


def test_inconclusive_when_the_interval_straddles_a_threshold():
    assert grade_interval("integrated_osgr", 0.6, (0.55, 0.7)) == "good"
    assert grade_interval("integrated_osgr", 0.6, (0.4, 0.8)) == "inconclusive"
    assert grade_interval("integrated_osgr", None, None) == "n/a"
    traj = _traj([2.3, 2.0, 1.7, 1.5], [0.6, 0.5, 0.5, 0.4], se=0.3)  # wide: inconclusive
    v = verdict_object(new_run(traj))
    assert v["level"] == "inconclusive" and "straddles" in v["headline"]


def test_verdict_object_shape_and_levels():
    good = _traj([2.3, 1.5, 0.7, 0.2], [0.9, 0.9, 0.85, 0.8], gsnr=[0.01, 0.03, 0.02, 0.01])
    v = new_run(good)["verdict"]
    assert set(v) == {"level", "headline", "indicators"}
    assert [i["name"] for i in v["indicators"]] == ["integrated_osgr", "control_separation", "early_rise"]
    for ind in v["indicators"]:
        assert set(ind) == {"name", "value", "interval", "status", "threshold"}
        assert set(ind["threshold"]) == {"good", "watch"}
    assert v["level"] == "good"
    bad = _traj([2.3, 2.0, 1.5, 1.0], [0.0, -0.2, -0.1, 0.0], gsnr=[0.01] * 4)
    assert new_run(bad)["verdict"]["level"] == "bad"
    assert new_run(Trajectory())["verdict"]["level"] == "inconclusive"


# ----------------------------------------------------------------------------- check and the report


def _write(tmp_path, run, name="r.run.json"):
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)


def test_check_min_level_partial_and_usage(tmp_path):
    good = _traj([2.3, 1.5, 0.7, 0.2], [0.9, 0.9, 0.85, 0.8], gsnr=[0.01, 0.03, 0.02, 0.01])
    path = _write(tmp_path, new_run(good))
    runner = CliRunner()
    ok = runner.invoke(main, ["check", path, "--min-level", "watch"])
    assert ok.exit_code == 0, ok.output
    assert "verdict level: good" in ok.output
    bad = _traj([2.3, 2.0, 1.5, 1.0], [0.0, -0.2, -0.1, 0.0], gsnr=[0.01] * 4)
    fail = runner.invoke(main, ["check", _write(tmp_path, new_run(bad), "b.json"), "--min-level", "watch"])
    assert fail.exit_code == 1 and "--min-level watch: the verdict is bad" in fail.output
    none = runner.invoke(main, ["check", path])
    assert none.exit_code == 2 and "at least one threshold" in none.output
    partial = _write(tmp_path, new_run(good, metadata={"partial": True, "stopped": "interrupted (Ctrl-C)"}), "p.json")
    assert runner.invoke(main, ["check", partial, "--min-level", "bad"]).exit_code == 1
    assert runner.invoke(main, ["check", partial, "--min-level", "bad", "--allow-partial"]).exit_code == 0
    each = runner.invoke(
        main,
        ["check", path, "--min-integrated-osgr", "0.5", "--min-early-rise", "1.0", "--min-control-separation", "1"],
    )
    assert (
        each.exit_code == 1 and "--min-control-separation 1: control separation (graded) is not measured" in each.output
    )


def test_report_panel_numbers_empty_run_and_interrupted_control():
    traj = _traj([2.3, 1.5, 0.7, 0.2], [0.9, 0.9, 0.85, 0.8], test=[2.3, 1.6, 0.9, 0.5])
    traj.snapshots[-1].train_accuracy, traj.snapshots[-1].test_accuracy = 0.99, 0.93
    html = render_html(new_run(traj, metadata={"n_train": 100}))
    assert "Predicted test loss" in html and "test accuracy 93.0%" in html and "train loss 0.2" in html
    assert 'id="fig-predicted"' in html
    empty = render_html(new_run(Trajectory(), metadata={"task": "classification"}))
    assert "no snapshot yet" in empty and "– × –" not in empty
    stopped = new_run(
        traj,
        metadata={"task": "classification", "partial": True, "settings": {"control": "shuffled labels"}},
    )
    assert "control was interrupted" in render_html(stopped)
    assert (
        "regression task, or --no-control" not in render_html(stopped).split('id="verdict"')[1].split("</section>")[0]
    )


# ----------------------------------------------------------------------------- the pytest plugin

pytest_plugins = ["pytester"]


def test_expect_verdict_in_the_plugin(pytester):
    pytester.makepyfile(
        test_v="""
        import pytest
        from gsnr_diag.dynamics.trajectory import Snapshot, Trajectory

        def traj(R):
            L = [2.3, 1.5, 0.7, 0.2]
            snaps = [Snapshot(step=10 * i, train_loss=l, osgr=r, osgr_se=0.01, mean_gsnr=0.01 * (1 + i % 2))
                     for i, (l, r) in enumerate(zip(L, R))]
            return Trajectory(snaps, {"n_train": 100})

        def test_good(gsnr):
            gsnr.expect_verdict(traj([0.9, 0.9, 0.85, 0.8]), at_least="good")

        def test_bad(gsnr):
            gsnr.expect_verdict(traj([0.0, -0.2, -0.1, 0.0]), at_least="watch")

        def test_wrong_level(gsnr):
            with pytest.raises(ValueError, match="at_least"):
                gsnr.expect_verdict(traj([0.9] * 4), at_least="great")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "the verdict is 'bad', expected at least 'watch'" in out
    assert "integrated_osgr" in out
