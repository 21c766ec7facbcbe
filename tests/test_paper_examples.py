"""The paper-reproduction scripts (examples/paper/): each --quick mode runs, writes its
figures, results and a gsnr-diag run JSON, and shows the direction of each finding that the quick
mode reproduces robustly (docs/REPRODUCTION.md lists what is and is not reproduced; findings that do
not reproduce are deliberately NOT asserted here).

Slow (each script takes up to ~2 minutes on a 2-core CPU): run with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "paper"
TIMEOUT = 900  # generous: a loaded CI machine; a quiet 2-core CPU needs < 120 s per script


def run_quick(name: str, out: Path) -> dict:
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(PAPER / f"{name}.py"), "--quick", "--report", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{name}.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((out / "results.json").read_text())
    # the run JSON is a valid gsnr-diag run and the report was rendered from it
    from gsnr_diag import load_run

    run = load_run(out / "run.json")
    assert run["kind"] == "gsnr-diag-run"
    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    for fig in _figure_files(results):
        assert (out / fig).is_file() and (out / fig).stat().st_size > 1000, fig
    return results


def _figure_files(results: dict) -> list[str]:
    found: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x.endswith((".svg", ".png")):
            found.append(x)

    walk(results.get("figures", {}))
    if results.get("osgr"):
        walk(results["osgr"].get("figures", []))
    assert found, "the script reported no figures"
    return found


@pytest.fixture(scope="module")
def feature_learning(tmp_path_factory):
    return run_quick("feature_learning", tmp_path_factory.mktemp("feature_learning"))


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return run_quick("mnist_real_vs_random", tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def osgr(tmp_path_factory):
    return run_quick("osgr_lhs_rhs", tmp_path_factory.mktemp("osgr"))


@pytest.fixture(scope="module")
def bn(tmp_path_factory):
    return run_quick("bn_network", tmp_path_factory.mktemp("bn"))


# ----------------------------------------------------------------------------- Sec. 3.2, Fig. 6, Table 1
def test_small_init_trainable_second_layer_gsnr_rises(feature_learning):
    """Fig. 6a with the small init N(0, 0.03²): the trainable case rises well above its start, every seed."""
    peaks = feature_learning["summary"]["small_trainable"]["peak_ratio"]
    assert min(peaks) > 1.3, peaks


def test_small_init_frozen_second_layer_gsnr_does_not_rise(feature_learning):
    """Fig. 6a with the small init: with the first layer frozen the GSNR never rises and ends below its start."""
    s = feature_learning["summary"]["small_frozen"]
    assert max(s["peak_ratio"]) < 1.05, s["peak_ratio"]
    assert max(s["end_ratio"]) < 1.0, s["end_ratio"]


def test_default_init_shows_no_rise(feature_learning):
    """The documented deviation: with PyTorch's default init the second-layer GSNR starts high and decays
    in both cases (docs/REPRODUCTION.md) — asserted so that a change of this behaviour is noticed."""
    for case in ("default_trainable", "default_frozen"):
        assert max(feature_learning["summary"][case]["peak_ratio"]) < 1.0, case


def test_learned_features_generalize_better(feature_learning):
    """Fig. 6b: learning the features gives a lower test loss than fixed random features (both inits)."""
    for init in ("default", "small"):
        assert feature_learning["findings"][init]["test_loss_trainable_below_frozen"], init


def test_table1_features_become_correlated_with_target(feature_learning):
    """Table 1 (small init): at their GSNR peak the hidden features correlate more with y than at initialization."""
    f = feature_learning["findings"]["small"]
    assert f["table1_mean_abs_corr_at_peak"] > f["table1_mean_abs_corr_init"] + 0.05, f


def test_toy_osgr_lhs_close_to_rhs_at_the_start(feature_learning):
    """Appendix A.3 / Fig. 4 on the toy regression: at step 0, LHS (eq. 23) and RHS (eq. 19) are close,
    closer than at the last recorded step (where RHS falls far below LHS, docs/REPRODUCTION.md)."""
    f = feature_learning["findings"]
    assert f["osgr_first_epoch"] == 0
    assert f["osgr_first_epoch_mean_abs_diff"] < 0.2, f
    assert f["osgr_first_epoch_mean_abs_diff"] < f["osgr_last_epoch_mean_abs_diff"], f


# ----------------------------------------------------------------------------- Sec. 3.1, Fig. 5; Sec. 3.3, Fig. 7
def test_real_labels_have_higher_gsnr_than_shuffled(mnist):
    """Fig. 5a: from the end of epoch 2 on, mean GSNR with real labels exceeds that with shuffled labels."""
    f = mnist["findings"]
    assert f["ratio_fraction_above_1_from_epoch2"] == 1.0, f
    assert f["ratio_min_from_epoch2"] > 2.0, f


def test_real_label_gsnr_rises_shuffled_does_not(mnist):
    """Fig. 5a: mean GSNR rises above its start for real labels and not for shuffled labels."""
    f = mnist["findings"]
    assert f["gsnr_real"]["max_after_epoch1"] > f["gsnr_real"]["start"], f["gsnr_real"]
    assert f["gsnr_shuffled"]["max_after_epoch1"] <= f["gsnr_shuffled"]["start"] * 1.05, f["gsnr_shuffled"]


def test_delta_g_weight_correlation_negative_early(mnist):
    """Fig. 7a: early in training the change of the mean gradient is anti-correlated with the weights
    (eq. 28). Only the sign is asserted; |r| stays below ~0.2 in our runs."""
    early = mnist["findings"]["delta_g_w_corr_real_first3epochs"]
    assert early and all(v < 0 for v in early), early


# Not asserted, because they do not reproduce in the full run (docs/REPRODUCTION.md):
# the rise of the same-sign fraction from ≈50% to ≈56% (Fig. 5c) and ≈80% of the top-10% |W| weights
# opposite in sign to their mean gradient (Fig. 7b).


# ----------------------------------------------------------------------------- Sec. 2.4, Fig. 4
def test_osgr_grid_ran_and_is_finite(osgr):
    """The OSGR grid produced a finite LHS and RHS at every recorded step of every setting."""
    for r in osgr["results"]:
        assert all(v is not None and math.isfinite(v) for v in r["lhs"] + r["rhs"]), r


def test_measured_osgr_grows_with_n(osgr):
    """Eq. 19's message on the CNN: with more training samples per set, a step generalizes better — the
    measured OSGR (LHS, eq. 23) at step 0 is larger for n = 300 than for n = 100, at each label-noise level.
    (The quick grid has 4 points, too few to assert a Pearson c; the full grid's c is in docs/REPRODUCTION.md.)"""
    by = {(r["settings"]["n"], r["settings"]["p_random"]): r for r in osgr["results"]}
    for p in {k[1] for k in by}:
        assert by[(300, p)]["lhs"][0] > by[(100, p)]["lhs"][0] + 0.05, p


# ----------------------------------------------------------------------------- Appendix A.2 (BatchNorm)
def test_batchnorm_network_is_measured_exactly_in_eval_mode(bn):
    f = bn["findings"]
    assert f["batch_mixing_train_mode"] > 0 and f["batch_mixing_eval_mode"] == 0, f
    for when in ("max_rel_err_init", "max_rel_err_trained"):
        assert all(e < 1e-4 for e in f[when].values()), (when, f[when])
    assert f["train_mode_refused"]
