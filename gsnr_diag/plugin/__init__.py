"""pytest plugin of gsnr-diag: the ``gsnr`` fixture, ``@pytest.mark.gsnr``, ``--gsnr-*`` options.

Registered through the ``pytest11`` entry point, so pytest imports this module in every run of the
environment: it holds hooks and the fixture only and imports nothing heavy (no torch, matplotlib or
weasyprint). The package is cut by job:

* :mod:`.thresholds` — the threshold keywords, their ini options and marker, and their precedence;
* :mod:`.session` — the per-run state, the records of each test, the terminal summary;
* :mod:`.fixture` — the fixture's object (``stats``/``track``/``control`` and ``expect*``), imported
  when a test first asks for ``gsnr``;
* :mod:`.checks` — the comparisons of ``expect*`` and their failure messages;
* :mod:`.files` — ``--gsnr-save`` (run JSON) and ``--gsnr-report`` (through :mod:`gsnr_diag.report`),
  imported at the end of a session that has something to write;
* :mod:`.workers` — under pytest-xdist, each worker's records sent to the controller through
  ``config.workeroutput`` and merged there, so files and summary cover every test.
"""

from __future__ import annotations

from typing import Any

import pytest

from . import compare as _compare
from .session import SESSION_KEY, WORKER_OUTPUT_KEY, GsnrSession
from .thresholds import MARKER_HELP, THRESHOLDS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gsnr", "gsnr-diag: gradient signal-to-noise ratio (GSNR) checks")
    group.addoption(
        "--gsnr-device",
        metavar="DEVICE",
        default=None,
        help="torch device to measure and train on in the gsnr fixture (e.g. cpu, cuda, cuda:1); "
        "default: the model's own device",
    )
    group.addoption(
        "--gsnr-report",
        metavar="PATH",
        default=None,
        help="write a report with one section per test that measured GSNR: HTML, or PDF when PATH ends in .pdf; "
        "PATH/index.html when PATH is a folder (ends in /)",
    )
    group.addoption(
        "--gsnr-save",
        metavar="DIR",
        default=None,
        help="save every measurement of the gsnr fixture as a run JSON file in DIR (plus DIR/index.json)",
    )
    _compare.add_options(group)  # --gsnr-compare DIR, --gsnr-tolerance, --gsnr-sigma (plugin/compare.py)
    for spec in THRESHOLDS:
        parser.addini(spec.ini, spec.help, type="linelist" if spec.layered else "string")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.stash[SESSION_KEY] = state = GsnrSession(config)
    if not state.is_worker:
        config.pluginmanager.register(_Order(config), "gsnr-diag-order")
    _compare.configure(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    state = item.config.stash.get(SESSION_KEY, None)
    if state is not None:
        _compare.check_against_baseline(item, report, state.records.get(report.nodeid))  # --gsnr-compare
        state.update_outcome(report)
    return report


class _Order:
    """On the xdist controller: an empty record per collected test, so merged tests keep the collection order."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        state = self.config.stash.get(SESSION_KEY, None)
        if state is not None:
            for nodeid in ids:
                state.record_for(nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist controller: merge the records a worker sent in ``workeroutput`` at its session end."""
    state = node.config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    payload = (getattr(node, "workeroutput", None) or {}).get(WORKER_OUTPUT_KEY)
    name = getattr(getattr(node, "gateway", None), "id", "a worker")
    if payload:
        from .workers import merge_payload

        merge_payload(state, payload, worker=name)
    elif error and (state.save_dir is not None or state.report_path is not None):
        state.errors.append(f"the records of {name}: it went down ({error}); the tests it ran are missing")


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    if state.is_worker:  # the controller writes the files and the summary for every worker
        if any(r.measurements or r.checks for r in state.records.values()):
            from .workers import worker_payload

            session.config.workeroutput[WORKER_OUTPUT_KEY] = worker_payload(state)  # type: ignore[attr-defined]
        return
    if not state.wants_files():
        return
    try:
        from .files import write_files
    except ImportError as exc:  # a missing report dependency must not hide the test results
        state.errors.append(f"--gsnr-save/--gsnr-report: {exc}")
        return
    write_files(state)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    lines = state.summary_lines()
    if lines:
        terminalreporter.write_sep("-", "gsnr-diag: gradient signal-to-noise ratio")
        for line, markup in lines:
            terminalreporter.write_line(line, **markup)
    for what, path in state.written:
        terminalreporter.write_line(f"gsnr-diag: wrote {what}: {path}")
    for err in state.errors:
        terminalreporter.write_line(f"gsnr-diag: could not write {err}", red=True)
    for line in _compare.summary_lines(config):
        terminalreporter.write_line(line)


@pytest.fixture
def gsnr(request: pytest.FixtureRequest) -> Any:
    """Measure GSNR and assert thresholds in a test.

    ``gsnr.stats(model, data, loss_fn=None, **kw)`` → GradientStats,
    ``gsnr.track(build_model, data, loss_fn=None, *, epochs, **kw)`` → Trajectory,
    ``gsnr.control(build_model, data, loss_fn=None, *, epochs, **kw)`` → ControlResult,
    ``gsnr.expect(result, *, min_mean_gsnr=, min_layer_gsnr=, min_same_sign=, min_osgr=)``,
    ``gsnr.expect_rising(trajectory, *, factor=)``, ``gsnr.expect_control(control, *, min_ratio=)``,
    ``gsnr.expect_no_regression(result, *, baseline=, tolerance=0.2)``.
    Thresholds not passed come from ``@pytest.mark.gsnr(...)``, then from ``gsnr_*`` ini options.
    """
    from .fixture import GsnrFixture

    try:
        return GsnrFixture(request.config.stash[SESSION_KEY], request.node)
    except ValueError as exc:  # a malformed @pytest.mark.gsnr
        pytest.fail(str(exc), pytrace=False)
