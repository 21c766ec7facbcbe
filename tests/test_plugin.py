"""The pytest plugin, tested with pytester: thresholds and their messages, marker and ini precedence,
the report and JSON files, the terminal summary and the start-up cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# pytester's in-process runs remove every module first imported during the inner run from
# sys.modules afterwards; C extensions (torch, numpy, matplotlib's) cannot be imported twice in one
# process (the second import segfaults), so everything the inner runs use is imported here, up front.
import jinja2  # noqa: F401
import numpy  # noqa: F401
import opacus  # noqa: F401
import pytest
import torch

import gsnr_diag.dynamics.monitor
import gsnr_diag.dynamics.training
import gsnr_diag.experiments.control
import gsnr_diag.measure
import gsnr_diag.plugin.files
import gsnr_diag.report.figures
import gsnr_diag.report.run

# The pytester fixture also restores sys.modules when a test ends, dropping what the test itself imported:
# weasyprint (Pango's bindings) and pypdf imported inside test_pdf_report and imported again by a later test
# of the same process crashed in libpango or failed in fontTools. So they are imported here too, when present.
try:
    import pypdf  # noqa: F401
    import weasyprint  # noqa: F401

    import gsnr_diag.report.render
except ImportError:  # the PDF test skips itself
    pass

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module", autouse=True)
def _warm_lazy_imports():
    """Run the code paths once out here: torch imports some modules lazily (optimizer.step imports
    torch._dynamo, which registers a TORCH_LIBRARY and cannot be imported a second time)."""
    from gsnr_diag.experiments.control import shuffled_label_control

    x, y = torch.randn(8, 3), torch.arange(8) % 2
    shuffled_label_control(lambda: torch.nn.Linear(3, 2), (x, y), epochs=1, lr=0.1, progress=False)
    # matplotlib imports its backend and font modules on the first figure
    series = gsnr_diag.report.figures.Series("warm-up", [0, 1], [1.0, 2.0])
    gsnr_diag.report.figures.line_figure([series], xlabel="step", ylabel="mean GSNR", log=True)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "test_example_gsnr.py"

# Tiny, fast and deterministic: two Gaussian clusters in 4-D, a 4-8-2 ReLU MLP.
CONFTEST = """
import pytest
import torch
from torch import nn


def make_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 4, generator=g)
    x[:, 0] += 2.0 * y - 1.0
    return x, y.long()


def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model()


@pytest.fixture
def build():
    return build_model
"""


@pytest.fixture
def pt(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def summary_block(result: pytest.RunResult) -> str:
    out = result.stdout.str()
    assert "gsnr-diag: gradient signal-to-noise ratio" in out, out
    return out.split("gsnr-diag: gradient signal-to-noise ratio", 1)[1]


def summary_rows(result: pytest.RunResult) -> list[list[str]]:
    """The rows of the gsnr-diag summary table, split into cells."""
    lines = summary_block(result).splitlines()[3:]
    rows = []
    for ln in lines:
        if not ln.strip() or ln.startswith(("=", "gsnr-diag:")):
            break
        rows.append(ln.split())
    return rows


# --------------------------------------------------------------------------- thresholds


def test_passing_thresholds_and_summary(pt):
    pt.makepyfile(
        test_ok="""
        def test_stats(gsnr, model, data):
            stats = gsnr.stats(model, data)
            assert stats.n == 64
            gsnr.expect(stats, min_mean_gsnr=0.0, min_layer_gsnr=0.0, min_same_sign=0.0, min_osgr=-1e9)

        def test_not_using_gsnr():
            pass

        def test_fixture_without_measuring(gsnr):
            assert gsnr.device is None
        """
    )
    result = run(pt)
    result.assert_outcomes(passed=3)
    block = summary_block(result)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert lines[1].split() == [
        "test",
        "(in",
        "test_ok.py)",
        "mean",
        "GSNR",
        "OSGR",
        "same-sign",
        "control",
        "ratio",
        "checks",
        "result",
    ]
    rows = summary_rows(result)
    assert len(rows) == 1, block  # only the test that measured something
    assert rows[0][0] == "test_stats"
    assert rows[0][-2:] == ["4/4", "PASS"]


def test_no_summary_when_nothing_measured(pt):
    pt.makepyfile(test_plain="def test_x():\n    assert True\n")
    result = run(pt)
    result.assert_outcomes(passed=1)
    assert "gsnr-diag:" not in result.stdout.str()


def test_failing_threshold_explains_itself(pt):
    pt.makepyfile(
        test_bad="""
        def test_too_strict(gsnr, model, data):
            stats = gsnr.stats(model, data)
            gsnr.expect(stats, min_mean_gsnr=1e9, min_layer_gsnr={"0.*": 1e9}, min_same_sign=0.0)
        """
    )
    result = run(pt)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # threshold, measured value and where the threshold came from
    result.stdout.fnmatch_lines(
        [
            "*gsnr.expect: 2 of 3 threshold(s) not met by the GradientStats (n = 64 samples)*",
            "*FAIL*mean GSNR*min_mean_gsnr = 1.000e+09*argument*",
            "*ok*same-sign fraction*min_same_sign = 0*argument*",
            "*FAIL*layer GSNR, worst: 0.*(2 of 2 below)*min_layer_gsnr = {'0.*': 1.000e+09}*argument*",
            "*worst layers (failing first, then lowest mean GSNR):*",
            "*layer*mean GSNR*same-sign*min GSNR*",
        ]
    )
    # the layer table: failing first-layer tensors on top, the second layer unchecked
    table = out.split("worst layers", 1)[1].split("test_bad.py:", 1)[0]
    names = [
        ln.split()[1]
        for ln in table.splitlines()
        if ln.startswith("E ") and ln.split()[1:2] and ln.split()[1][0].isdigit()
    ]
    assert names[:2] and set(names[:2]) == {"0.weight", "0.bias"}, table
    assert set(names) == {"0.weight", "0.bias", "2.weight", "2.bias"}, table
    (row,) = summary_rows(result)
    assert row[0] == "test_too_strict" and row[4] == "-" and row[-2:] == ["1/3", "FAIL"]
    assert 0 < float(row[1]) < 1e9 and 0.5 <= float(row[3]) <= 1  # mean GSNR, same-sign
    # the traceback points at the user's line, not into gsnr-diag
    assert "gsnr_diag/plugin/" not in out


def test_expect_needs_a_threshold_and_validates(pt):
    pt.makepyfile(
        test_usage="""
        import pytest

        def test_no_threshold(gsnr, model, data):
            with pytest.raises(TypeError, match="no threshold to check.*gsnr_min_mean_gsnr"):
                gsnr.expect(gsnr.stats(model, data))

        def test_bad_value(gsnr, model, data):
            with pytest.raises(ValueError, match="finite number"):
                gsnr.expect(gsnr.stats(model, data), min_mean_gsnr="high")

        def test_unmatched_glob(gsnr, model, data):
            with pytest.raises(ValueError, match="match no parameter"):
                gsnr.expect(gsnr.stats(model, data), min_layer_gsnr={"encoder.*": 0.1})

        @pytest.mark.gsnr(min_gsnr=1)
        def test_unknown_marker_key(gsnr):
            pass
        """
    )
    result = run(pt)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.gsnr: unknown threshold 'min_gsnr'; known: min_mean_gsnr*"])


# --------------------------------------------------------------------------- precedence


def test_precedence_explicit_over_marker_over_ini(pt):
    pt.makeini(
        """
        [pytest]
        gsnr_min_mean_gsnr = 1e9
        gsnr_min_control_ratio = 2.5
        gsnr_min_layer_gsnr =
            0.* = 1e9
            2.weight = 0
        """
    )
    pt.makepyfile(
        test_prec="""
        import pytest

        def test_ini_applies(gsnr, model, data):
            assert gsnr.defaults["min_mean_gsnr"].source == "ini option gsnr_min_mean_gsnr"
            assert gsnr.defaults["min_ratio"].value == 2.5
            assert gsnr.defaults["min_layer_gsnr"].value == {"0.*": 1e9, "2.weight": 0.0}
            gsnr.expect(gsnr.stats(model, data), min_layer_gsnr=0.0)

        @pytest.mark.gsnr(min_mean_gsnr=0.0, min_layer_gsnr=0.0)
        def test_marker_beats_ini(gsnr, model, data):
            assert gsnr.defaults["min_mean_gsnr"].source == "@pytest.mark.gsnr"
            gsnr.expect(gsnr.stats(model, data))

        @pytest.mark.gsnr(min_mean_gsnr=0.0)
        def test_explicit_beats_marker(gsnr, model, data):
            gsnr.expect(gsnr.stats(model, data), min_mean_gsnr=5e8, min_layer_gsnr=0.0)

        @pytest.mark.gsnr(min_mean_gsnr=1e9)
        class TestClassMarker:
            @pytest.mark.gsnr(min_mean_gsnr=0.0)
            def test_closest_marker_wins(self, gsnr, model, data):
                gsnr.expect(gsnr.stats(model, data), min_layer_gsnr=0.0)

            def test_class_marker(self, gsnr):
                assert gsnr.defaults["min_mean_gsnr"].value == 1e9
                assert gsnr.defaults["min_mean_gsnr"].source == "@pytest.mark.gsnr"

        def test_ini_layer_globs(gsnr, model, data):
            gsnr.expect(gsnr.stats(model, data), min_mean_gsnr=0.0)
        """
    )
    result = run(pt, "-rf")
    result.assert_outcomes(passed=3, failed=3)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*FAIL*mean GSNR*min_mean_gsnr = 1.000e+09*ini option gsnr_min_mean_gsnr*",
            "*FAIL*mean GSNR*min_mean_gsnr = 5.000e+08*argument*",
            "*FAIL*layer GSNR, worst: 0.*(2 of 3 below)*ini option gsnr_min_layer_gsnr*",
        ]
    )
    failed = {ln.split()[1] for ln in out.splitlines() if ln.startswith("FAILED ")}
    assert failed == {
        "test_prec.py::test_ini_applies",
        "test_prec.py::test_explicit_beats_marker",
        "test_prec.py::test_ini_layer_globs",
    }, out


def test_pyproject_toml_values(pt):
    pt.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        gsnr_min_same_sign = 0.5
        gsnr_min_control_ratio = "3"
        gsnr_min_layer_gsnr = ["*.weight = 1e-3", "*.bias = 0"]
        """
    )
    pt.makepyfile(
        test_toml="""
        def test_defaults(gsnr):
            d = {k: t.value for k, t in gsnr.defaults.items()}
            assert d == {"min_same_sign": 0.5, "min_ratio": 3.0, "min_layer_gsnr": {"*.weight": 1e-3, "*.bias": 0.0}}
        """
    )
    run(pt).assert_outcomes(passed=1)


def test_device_option(pt):
    pt.makepyfile(
        test_dev="""
        def test_dev(gsnr, model, data):
            assert gsnr.device == "cpu"
            assert gsnr.stats(model, data).n == 64
        """
    )
    run(pt, "--gsnr-device=cpu").assert_outcomes(passed=1)


def test_malformed_ini_is_a_usage_error(pt):
    pt.makeini("[pytest]\ngsnr_min_osgr = high\n")
    pt.makepyfile(test_x="def test_x():\n    pass\n")
    result = run(pt)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option gsnr_min_osgr: 'high' is not a number*"])


def test_options_in_one_group(pt):
    result = run(pt, "--help")
    out = result.stdout.str()
    section = out.split("gsnr-diag: gradient signal-to-noise ratio (GSNR) checks:", 1)[1].split("\n\n", 1)[0]
    for opt in ("--gsnr-device=DEVICE", "--gsnr-report=PATH", "--gsnr-save=DIR"):
        assert opt in section
    for ini in (
        "gsnr_min_mean_gsnr",
        "gsnr_min_layer_gsnr",
        "gsnr_min_same_sign",
        "gsnr_min_osgr",
        "gsnr_rising_factor",
        "gsnr_min_control_ratio",
    ):
        assert ini in out
    markers = run(pt, "--markers").stdout.str()
    assert "@pytest.mark.gsnr(min_mean_gsnr=..." in markers


# --------------------------------------------------------------------------- dynamics, files


def test_track_control_report_and_json(pt, tmp_path):
    pt.makepyfile(
        test_dyn="""
        import pytest

        def test_rising(gsnr, build, data):
            traj = gsnr.track(build, data, epochs=10, lr=0.5, every=5)
            assert [s.step for s in traj.snapshots] == [0, 5, 10]
            gsnr.expect_rising(traj, factor=0.0)
            gsnr.expect(traj, min_mean_gsnr=0.0)

        def test_rising_fails(gsnr, build, data):
            traj = gsnr.track(build, data, epochs=10, lr=0.5, every=5)
            gsnr.expect_rising(traj, factor=1e6)

        @pytest.mark.gsnr(min_ratio=1e6)
        def test_control_fails(gsnr, build, data):
            control = gsnr.control(build, data, epochs=10, lr=0.5, every=5)
            gsnr.expect_control(control)

        def test_control_passes(gsnr, build, data, model):
            control = gsnr.control(build, data, epochs=10, lr=0.5, every=5)
            gsnr.expect_control(control, min_ratio=0.0)
            gsnr.stats(model, data, label="after")
        """
    )
    report, save = tmp_path / "report.html", tmp_path / "runs"
    result = run(pt, f"--gsnr-report={report}", f"--gsnr-save={save}")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*gsnr.expect_rising: FAIL: peak mean GSNR * (step *) is *x its value at step 0 (*)",
            "*required: peak >= factor x step-0 value = 1.000e+06 x * (factor set by argument)",
            "*layers with the smallest rise (peak / first layer GSNR, smallest first):",
            "*gsnr.expect_control: FAIL: real/shuffled mean-GSNR ratio at the last snapshot (step *) is *; "
            "required >= min_ratio = 1.000e+06   (set by @pytest.mark.gsnr)",
            "*layers with the lowest real/shuffled layer-GSNR ratio at step *",
        ]
    )
    block = summary_block(result)
    row = next(ln for ln in block.splitlines() if ln.startswith("test_control_passes"))
    assert row.split()[-2:] == ["1/1", "PASS"] and row.split()[4] != "-"  # the control ratio column
    result.stdout.fnmatch_lines(
        [
            f"gsnr-diag: wrote 5 measurement JSON file(s) + index.json: {save}",
            f"gsnr-diag: wrote report (4 test section(s)): {report}",
        ]
    )

    # JSON: one run file per measurement, loadable by the library; an index with outcomes and checks
    index = json.loads((save / "index.json").read_text())
    assert index["kind"] == "gsnr-diag-pytest-session" and index["schema_version"] == 1
    by_test = {t["test"]: t for t in index["tests"]}
    assert by_test["test_dyn.py::test_control_fails"]["outcome"] == "failed"
    assert by_test["test_dyn.py::test_control_fails"]["checks"][0]["threshold_value"] == 1e6
    assert by_test["test_dyn.py::test_control_passes"]["files"] == [
        "test_dyn.py_test_control_passes--1-control.json",
        "test_dyn.py_test_control_passes--2-stats.json",
    ]
    from gsnr_diag.dynamics.trajectory import Trajectory
    from gsnr_diag.experiments.control import ControlResult

    run_json = json.loads((save / "test_dyn.py_test_control_passes--1-control.json").read_text())
    assert run_json["kind"] == "gsnr-diag-run" and run_json["metadata"]["test"] == "test_dyn.py::test_control_passes"
    ControlResult.from_dict(run_json["control"])
    assert len(Trajectory.load(save / "test_dyn.py_test_rising--1-trajectory.json").snapshots) == 3
    stats_json = json.loads((save / "test_dyn.py_test_control_passes--2-stats.json").read_text())
    assert stats_json["final_stats"]["n"] == 64 and stats_json["metadata"]["label"] == "after"

    # HTML: one self-contained file, one section per test that measured something
    html = report.read_text()
    assert html.count("<section id=") == 4
    for name in ("test_rising", "test_rising_fails", "test_control_fails", "test_control_passes"):
        assert f'id="test_dyn.py_{name}"' in html
    assert html.count("<svg") == 4 and "shuffled labels" in html
    # the report's render path: its matplotlib figures, its verdict panel graded by the one threshold table
    assert html.count('class="figure-svg"') == 4
    from gsnr_diag._thresholds import VERDICT_THRESHOLDS

    good, watch = VERDICT_THRESHOLDS["control_separation"]
    assert "Control: real vs shuffled labels" in html and f"good ≥ {good:g}×, watch ≥ {watch:g}×" in html
    assert "<link" not in html and 'src="http' not in html


def test_pdf_report(pt, tmp_path):
    pypdf = pytest.importorskip("pypdf")
    pytest.importorskip("weasyprint")

    pt.makepyfile(
        test_p="""
        def test_a(gsnr, model, data):
            gsnr.expect(gsnr.stats(model, data), min_mean_gsnr=0.0)

        def test_b(gsnr, model, data):
            gsnr.stats(model, data)
        """
    )
    report = tmp_path / "sub" / "gsnr.pdf"
    # in a subprocess: weasyprint and fontTools import parts of themselves on the first PDF, and an in-process
    # run unloads those afterwards, so a later PDF of this process crashed in libpango (or failed in fontTools)
    result = pt.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", f"--gsnr-report={report}")
    result.assert_outcomes(passed=2)
    text = "".join(p.extract_text() for p in pypdf.PdfReader(report).pages)
    assert "test_p.py::test_a" in text and "test_p.py::test_b" in text and "min_mean_gsnr = 0" in text


def test_bad_report_suffix(pt):
    pt.makepyfile(test_x="def test_x():\n    pass\n")
    result = run(pt, "--gsnr-report=out.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gsnr-report out.txt: the file name must end in .html or .pdf*"])


def test_readme_section_shows_the_example_file():
    doc = (EXAMPLE.parents[1] / "README.md").read_text()
    assert "```python\n" + EXAMPLE.read_text() + "```" in doc


def test_example_file_passes(pytester, tmp_path):
    pytester.makepyfile(test_example_gsnr=EXAMPLE.read_text())
    result = run(pytester, f"--gsnr-save={tmp_path}")
    result.assert_outcomes(passed=3)
    block = summary_block(result)
    assert block.count("PASS") == 3


# --------------------------------------------------------------------------- start-up cost


def test_package_exports_resolve_lazily():
    import gsnr_diag

    for name in gsnr_diag.__all__:
        assert getattr(gsnr_diag, name) is not None, name
    from gsnr_diag import GradientStats, gradient_stats  # noqa: F401


HEAVY = ("torch", "weasyprint", "matplotlib", "jinja2", "numpy", "opacus")


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_importing_the_plugin_is_light():
    code = (
        "import sys, pytest\n"
        "before = set(sys.modules)\n"
        "import gsnr_diag.plugin\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "import gsnr_diag\n"
        "print(sorted(m for m in {'torch'} if m in sys.modules))\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "[]"], proc.stdout
    # import time of the plugin on top of pytest itself, from python -X importtime (microseconds)
    times = []
    for _ in range(3):  # wall-clock import time: the least disturbed of three runs
        proc = _python("-X", "importtime", "-c", "import pytest; import gsnr_diag.plugin")
        assert proc.returncode == 0, proc.stderr
        cumulative = {
            ln.split("|")[2].strip(): int(ln.split("|")[1])
            for ln in proc.stderr.splitlines()
            if ln.startswith("import time:") and ln.count("|") == 2 and "cumulative" not in ln
        }
        times.append(cumulative["gsnr_diag.plugin"])
    assert min(times) < 50_000, (times, proc.stderr[-2000:])


def test_a_pytest_run_that_does_not_use_the_plugin_loads_nothing_heavy(tmp_path):
    """Start-up cost without a timed assertion: with the plugin loaded but its fixture unused, no test
    session imports torch, numpy, matplotlib or jinja2 (a measured start-up overhead is printed only)."""
    import resource

    (tmp_path / "test_nothing.py").write_text(
        "import sys\n\n"
        "def test_nothing():\n"
        f"    loaded = sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules)\n"
        "    assert loaded == [], loaded\n"
    )
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_nothing.py"]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"

    def once(extra: list[str]) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(base + extra, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    with_plugin = min(once(["-p", "gsnr_diag.plugin", "--gsnr-device=cpu"]) for _ in range(2))
    without = min(once([]) for _ in range(2))
    print(f"pytest start-up CPU time: {without * 1e3:.0f} ms without the plugin, {with_plugin * 1e3:.0f} ms with it")
