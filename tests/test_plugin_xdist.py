"""The pytest plugin under pytest-xdist, and the names of its files: tested with pytester.

Under ``-n 2`` the tests run in two worker processes; each worker sends its records to the controller
through ``workeroutput`` and the controller writes ``--gsnr-save``/``--gsnr-report`` and the summary for
every test. ``--gsnr-save`` names stay unique for node ids that differ only in replaced characters.
"""

from __future__ import annotations

import json

# imported up front for the same reason as in test_plugin.py: pytester's in-process runs must not be
# the first to import a C extension
import jinja2  # noqa: F401
import numpy  # noqa: F401
import pytest
import torch

import gsnr_diag.dynamics.monitor
import gsnr_diag.dynamics.training
import gsnr_diag.measure
import gsnr_diag.plugin.files
import gsnr_diag.plugin.workers
import gsnr_diag.report.figures

pytest.importorskip("xdist")
pytest_plugins = ["pytester"]


@pytest.fixture(scope="module", autouse=True)
def _warm_lazy_imports():
    """As in test_plugin.py: torch imports some modules on first use (optimizer.step imports torch._dynamo,
    which cannot be imported twice in one process), and matplotlib its backend on the first figure."""
    from gsnr_diag.dynamics.training import train

    x, y = torch.randn(8, 3), torch.arange(8) % 2
    train(torch.nn.Linear(3, 2), (x, y), epochs=1, lr=0.1, progress=False)
    series = gsnr_diag.report.figures.Series("warm-up", [0, 1], [1.0, 2.0])
    gsnr_diag.report.figures.line_figure([series], xlabel="step", ylabel="mean GSNR", log=True)


CONFTEST = """
import pytest
import torch
from torch import nn


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 2
    x = torch.randn(32, 4, generator=g)
    x[:, 0] += 2.0 * y - 1.0
    return x, y.long()


@pytest.fixture
def build():
    return lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
"""

TESTS = """
import pytest
import torch


@pytest.mark.parametrize("seed", range(5))
def test_stats(gsnr, build, data, seed):
    torch.manual_seed(seed)
    gsnr.expect(gsnr.stats(build(), data), min_mean_gsnr=0.0)


def test_too_strict(gsnr, build, data):
    torch.manual_seed(9)
    gsnr.expect(gsnr.stats(build(), data), min_mean_gsnr=1e9)


def test_track(gsnr, build, data):
    traj = gsnr.track(build, data, epochs=4, lr=0.5, every=2)
    gsnr.expect_rising(traj, factor=0.0)


def test_without_gsnr():
    pass
"""

MEASURED = [f"test_stats[{i}]" for i in range(5)] + ["test_too_strict", "test_track"]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def summary_names(result: pytest.RunResult) -> list[str]:
    out = result.stdout.str()
    assert "gsnr-diag: gradient signal-to-noise ratio" in out, out
    lines = out.split("gsnr-diag: gradient signal-to-noise ratio", 1)[1].splitlines()[3:]
    names = []
    for ln in lines:
        if not ln.strip() or ln.startswith(("=", "gsnr-diag:")):
            break
        names.append(ln.split()[0])
    return names


def test_xdist_keeps_every_test_in_files_and_summary(pytester, tmp_path):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_many=TESTS)
    report, save = tmp_path / "out" / "r.html", tmp_path / "runs"
    result = run(pytester, "-n", "2", f"--gsnr-report={report}", f"--gsnr-save={save}")
    result.assert_outcomes(passed=7, failed=1)
    assert "2 workers" in result.stdout.str() or "gw1" in result.stdout.str()

    # the summary: every measured test once, in collection order, with its outcome and checks
    assert summary_names(result) == MEASURED
    out = result.stdout.str()
    row = next(ln for ln in out.splitlines() if ln.startswith("test_too_strict"))
    assert row.split()[-2:] == ["0/1", "FAIL"]
    result.stdout.fnmatch_lines(
        [
            f"gsnr-diag: wrote 7 measurement JSON file(s) + index.json: {save}",
            f"gsnr-diag: wrote report (7 test section(s)): {report}",
        ]
    )

    # index.json and the run files: every test, the outcomes the workers saw
    index = json.loads((save / "index.json").read_text())
    by_test = {t["test"].split("::", 1)[1]: t for t in index["tests"]}
    assert list(by_test) == MEASURED
    assert by_test["test_too_strict"]["outcome"] == "failed" and by_test["test_stats[0]"]["outcome"] == "passed"
    assert by_test["test_too_strict"]["checks"][0]["threshold_value"] == 1e9
    files = sorted(p.name for p in save.glob("*.json") if p.name != "index.json")
    assert len(files) == 7 and files == sorted(f for t in index["tests"] for f in t["files"])
    traj = json.loads((save / by_test["test_track"]["files"][0]).read_text())
    assert traj["kind"] == "gsnr-diag-run" and len(traj["trajectory"]["snapshots"]) == 3
    assert traj["metadata"]["outcome"] == "passed" and traj["metadata"]["checks"][0]["passed"] is True

    # the report: one section per test and an index table row per test
    html = report.read_text()
    assert html.count("<section id=") == 7 and html.count('<th scope="row" class="tid">') == 7
    for name in MEASURED:
        assert f"test_many.py::{name}</a>" in html
    assert html.count('class="figure-svg"') == 1

    # the controller shows what the workers measured: the same numbers as a run without xdist
    serial = tmp_path / "serial"
    run(pytester, f"--gsnr-save={serial}").assert_outcomes(passed=7, failed=1)
    assert _numbers(serial) == _numbers(save)


def _numbers(folder):
    """{test: (mean GSNR, OSGR, outcome)} of the last snapshot / the stats of each test's first file."""
    out = {}
    for t in json.loads((folder / "index.json").read_text())["tests"]:
        run_json = json.loads((folder / t["files"][0]).read_text())
        point = run_json["final_stats"] or run_json["trajectory"]["snapshots"][-1]
        out[t["test"]] = (point["mean_gsnr"], point["osgr"], t["outcome"])
    return out


def test_save_names_unique_for_ids_that_sanitize_alike(pytester, tmp_path):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_ids="""
        import pytest
        import torch

        @pytest.mark.parametrize("name", ["a b", "a_b", "a/b", "A_B"])
        def test_named(gsnr, build, data, name):
            torch.manual_seed(0)
            gsnr.stats(build(), data, label=name)
        """
    )
    save, report = tmp_path / "runs", tmp_path / "r.html"
    result = run(pytester, f"--gsnr-save={save}", f"--gsnr-report={report}")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"gsnr-diag: wrote 4 measurement JSON file(s) + index.json: {save}"])
    index = json.loads((save / "index.json").read_text())
    files = [f for t in index["tests"] for f in t["files"]]
    assert len(set(f.lower() for f in files)) == 4
    on_disk = sorted(p.name for p in save.glob("*.json") if p.name != "index.json")
    assert on_disk == sorted(files)
    for t in index["tests"]:  # each file holds its own test's measurement
        run_json = json.loads((save / t["files"][0]).read_text())
        assert run_json["metadata"]["test"] == t["test"]
        assert t["test"].endswith(f"[{run_json['metadata']['label']}]")
    html = report.read_text()
    anchors = [part.split('"', 1)[0] for part in html.split('<section id="')[1:]]
    assert len(anchors) == 4 and len(set(anchors)) == 4


def test_unique_names_keep_the_first_and_are_stable():
    names = gsnr_diag.plugin.files.unique_names(["t[a b]", "t[a_b]", "t[a/b]", "u"])
    assert names["t[a b]"] == "t_a_b" and names["u"] == "u"
    assert len(set(names.values())) == 4
    assert names == gsnr_diag.plugin.files.unique_names(["t[a b]", "t[a_b]", "t[a/b]", "u"])


def test_report_into_a_folder_writes_its_index(pytester, tmp_path):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_one="def test_one(gsnr, build, data):\n    gsnr.stats(build(), data)\n")
    out = tmp_path / "out"
    result = run(pytester, f"--gsnr-report={out}/")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"gsnr-diag: wrote report (1 test section(s)): {out / 'index.html'}"])
    assert "test_one.py::test_one" in (out / "index.html").read_text()


def test_a_malformed_worker_payload_is_reported_not_raised(pytester):
    from gsnr_diag.plugin.session import GsnrSession

    config = pytester.parseconfig()
    session = GsnrSession(config)
    gsnr_diag.plugin.workers.merge_payload(session, "{not json", worker="gw3")
    gsnr_diag.plugin.workers.merge_payload(session, json.dumps({"version": 99}), worker="gw4")
    assert session.records == {} and len(session.errors) == 2
    assert session.errors[0].startswith("the records of gw3: JSONDecodeError")
    assert "gw4" in session.errors[1] and "version 99" in session.errors[1]


def test_unusable_gsnr_device_is_named(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_dev="def test_dev(gsnr, build, data):\n    gsnr.stats(build(), data)\n")
    result = run(pytester, "--gsnr-device=meta")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ArgumentError: --gsnr-device='meta': meta tensors hold no values*"])
