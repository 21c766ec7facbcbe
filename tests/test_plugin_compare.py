"""The plugin's baseline comparison: --gsnr-save then --gsnr-compare DIR, and gsnr.expect_no_regression."""

from __future__ import annotations

import os

# Imported up front for the same reason as in test_plugin.py: pytester's in-process runs drop the modules
# first imported inside them, and C extensions cannot be imported twice in one process.
import jinja2  # noqa: F401
import numpy  # noqa: F401
import opacus  # noqa: F401
import pytest
import torch

import gsnr_diag.dynamics.monitor
import gsnr_diag.measure
import gsnr_diag.plugin.compare
import gsnr_diag.plugin.files
import gsnr_diag.report.compare
import gsnr_diag.report.figures

pytest_plugins = ["pytester"]

TESTS = """
import os

import torch
from torch import nn


def data(noise):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randn(64, 4, generator=g)
    x[:, 0] += 2.0 * y - 1.0
    x += noise * torch.randn(64, 4, generator=g)  # a "refactor" that breaks the input pipeline
    return x, y.long()


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_layers(gsnr):
    gsnr.stats(model(), data(float(os.environ.get("GSNR_TEST_NOISE", "0"))))


def test_expect_no_regression(gsnr):
    base = gsnr.stats(model(), data(0.0), label="base")
    gsnr.expect_no_regression(base, baseline=base)
    broken = gsnr.stats(model(), data(3.0), label="broken")
    try:
        gsnr.expect_no_regression(broken, baseline=base, tolerance=0.2)
    except AssertionError as exc:
        assert "regressed" in str(exc) and "layer_gsnr/0.weight" in str(exc), str(exc)
    else:
        raise AssertionError("no regression detected")
"""


@pytest.fixture(scope="module", autouse=True)
def _warm():
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    gsnr_diag.measure.gradient_stats(torch.nn.Linear(4, 2), (x, y))


def _run(pytester, *args):
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def test_save_then_compare(pytester, monkeypatch):
    pytester.makepyfile(test_model=TESTS)
    base = pytester.path / "baseline"
    first = _run(pytester, f"--gsnr-save={base}")
    first.assert_outcomes(passed=2)
    assert (base / "index.json").exists()

    same = _run(pytester, f"--gsnr-compare={base}")
    same.assert_outcomes(passed=2)
    same.stdout.fnmatch_lines(["*--gsnr-compare*: 3 measurement(s) compared, 0 test(s) regressed*"])

    monkeypatch.setenv("GSNR_TEST_NOISE", "3")
    broken = _run(pytester, f"--gsnr-compare={base}")
    broken.assert_outcomes(passed=1, failed=1)
    out = broken.stdout.str()
    assert "test_layers" in out and "regressed against" in out and "REGRESSION" in out
    assert "layer_gsnr/0.weight" in out
    broken.stdout.fnmatch_lines(["*1 test(s) regressed*", "*regressed: test_model.py::test_layers*"])

    loose = _run(pytester, f"--gsnr-compare={base}", "--gsnr-tolerance=100")
    loose.assert_outcomes(passed=2)


def test_new_test_without_baseline_is_listed(pytester):
    pytester.makepyfile(test_model=TESTS)
    base = pytester.path / "baseline"
    _run(pytester, f"--gsnr-save={base}", "-k", "expect").assert_outcomes(passed=1, deselected=1)
    result = _run(pytester, f"--gsnr-compare={base}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*1 test(s) without a saved baseline: test_model.py::test_layers*"])


def test_missing_baseline_is_a_usage_error(pytester):
    pytester.makepyfile(test_model=TESTS)
    result = _run(pytester, f"--gsnr-compare={pytester.path / 'nowhere'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "save a baseline first with --gsnr-save" in result.stderr.str()


def test_options_are_in_the_help(pytester):
    result = _run(pytester, "--help")
    out = result.stdout.str()
    assert "--gsnr-compare=DIR" in out and "--gsnr-tolerance=X" in out and "--gsnr-sigma=S" in out
    assert os.environ.get("GSNR_TEST_NOISE") is None
