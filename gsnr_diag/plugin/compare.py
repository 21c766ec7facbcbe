"""Regressions against a baseline: ``--gsnr-compare DIR`` and ``gsnr.expect_no_regression``.

``--gsnr-save DIR`` stores every measurement of every test as a run JSON plus ``DIR/index.json``;
a later run with ``--gsnr-compare DIR`` compares each test's i-th measurement with the i-th one saved
for the same test id (the same kind: stats, snapshot, trajectory or control) through
:func:`gsnr_diag.report.compare.compare_points`, and a test with a regression fails with the table
of deltas (``--gsnr-tolerance``, ``--gsnr-sigma``). The comparison runs in the process that ran the
test (so under pytest-xdist in the worker); tests without a saved baseline are listed in the summary.
Imported by every pytest run (through the plugin), so nothing heavy at module level.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .session import Check

__all__ = [
    "COMPARE_KEY",
    "BaselineState",
    "add_options",
    "check_against_baseline",
    "configure",
    "expect_no_regression_checks",
    "summary_lines",
]

_FILE = re.compile(r"--(\d+)-(stats|snapshot|trajectory|control)\.json$")


@dataclass
class BaselineState:
    """The ``--gsnr-compare`` baseline of this pytest run and what was compared against it."""

    directory: Path
    tests: dict[str, list[str]]
    tolerance: float
    sigma: float
    compared: int = 0
    without_baseline: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)


COMPARE_KEY = pytest.StashKey[BaselineState]()


def add_options(group: Any) -> None:
    group.addoption(
        "--gsnr-compare",
        metavar="DIR",
        default=None,
        help="compare every measurement of the gsnr fixture with the one saved for the same test by "
        "--gsnr-save DIR; a test whose GSNR, same-sign fraction or noise scale regressed fails",
    )
    group.addoption(
        "--gsnr-tolerance",
        metavar="X",
        type=float,
        default=0.2,
        help="--gsnr-compare: relative change in the harmful direction that is a regression (default 0.2 = 20%%)",
    )
    group.addoption(
        "--gsnr-sigma",
        metavar="S",
        type=float,
        default=2.0,
        help="--gsnr-compare: where both sides carry jackknife standard errors, a regression must also exceed "
        "S standard errors of the difference (default 2)",
    )


def configure(config: Any) -> None:
    """Read ``DIR/index.json`` of ``--gsnr-compare DIR``; a missing or malformed baseline is a usage error."""
    directory = config.getoption("gsnr_compare", None)
    if not directory:
        return
    directory = Path(directory)
    tolerance, sigma = config.getoption("gsnr_tolerance"), config.getoption("gsnr_sigma")
    if not (tolerance >= 0) or not (sigma >= 0):
        raise pytest.UsageError(f"--gsnr-tolerance {tolerance} / --gsnr-sigma {sigma}: expected numbers ≥ 0")
    index = directory / "index.json"
    try:
        d = json.loads(index.read_text(encoding="utf-8"))
        tests = {str(t["test"]): [str(f) for f in t["files"]] for t in d["tests"]}
    except FileNotFoundError as exc:
        raise pytest.UsageError(
            f"--gsnr-compare {directory}: no {index.name} there; save a baseline first with --gsnr-save {directory}"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise pytest.UsageError(f"--gsnr-compare {directory}: {index} is not a --gsnr-save index ({exc!r})") from exc
    config.stash[COMPARE_KEY] = BaselineState(directory, tests, float(tolerance), float(sigma))


def _baseline_for(state: BaselineState, files: list[str], i: int, kind: str) -> Path | None:
    for name in files:
        m = _FILE.search(name)
        if m and int(m.group(1)) == i and m.group(2) == kind:
            return state.directory / os.path.basename(name)
    return None


def check_against_baseline(item: Any, report: Any, record: Any) -> None:
    """Make a passed test's report failed when one of its measurements regressed against the baseline."""
    state = item.config.stash.get(COMPARE_KEY, None)
    if state is None or report.when != "call" or not report.passed or record is None or not record.measurements:
        return
    files = state.tests.get(report.nodeid)
    if files is None:
        state.without_baseline.append(report.nodeid)
        return
    from ..errors import GsnrDiagError
    from ..report.compare import compare_points, load_comparable

    lines = []
    for i, m in enumerate(record.measurements, 1):
        path = _baseline_for(state, files, i, m.kind)
        if path is None:
            lines.append(f"measurement {i} ({m.kind}): no baseline of that kind in {state.directory}")
            continue
        try:
            result = compare_points(load_comparable(path), m.result, tolerance=state.tolerance, sigma=state.sigma)
        except GsnrDiagError as exc:
            lines.append(f"measurement {i} ({m.kind}) against {path}: {exc}")
            continue
        state.compared += 1
        if result.regressions:
            lines.append(f"measurement {i} ({m.kind}) regressed against {path}:")
            lines += ["  " + line for line in result.table().splitlines()]
    if lines:
        state.regressions.append(report.nodeid)
        report.outcome = "failed"
        report.longrepr = f"gsnr-diag --gsnr-compare {state.directory}:\n" + "\n".join(lines)


def summary_lines(config: Any) -> list[str]:
    state = config.stash.get(COMPARE_KEY, None)
    if state is None:
        return []
    if config.pluginmanager.hasplugin("dsession"):  # the pytest-xdist controller: the workers compared
        return [
            f"gsnr-diag --gsnr-compare {state.directory}: compared in the pytest-xdist workers; a test that "
            "regressed failed with its table of deltas"
        ]
    out = [
        f"gsnr-diag --gsnr-compare {state.directory}: {state.compared} measurement(s) compared, "
        f"{len(state.regressions)} test(s) regressed (tolerance {state.tolerance:g}, sigma {state.sigma:g})"
    ]
    out += [f"  regressed: {t}" for t in state.regressions]
    if state.without_baseline:
        out.append(
            f"  {len(state.without_baseline)} test(s) without a saved baseline: " + ", ".join(state.without_baseline)
        )
    return out


def expect_no_regression_checks(
    result: Any, baseline: Any, *, tolerance: float, sigma: float, two_sided: bool, layers: bool
) -> tuple[list[Check], list[str]]:
    """The checks and failure lines of ``gsnr.expect_no_regression``."""
    from ..report.compare import compare_points, load_comparable

    source = "baseline"
    if isinstance(baseline, (str, os.PathLike)):
        source = str(baseline)
        baseline = load_comparable(baseline)
    cmp = compare_points(baseline, result, tolerance=tolerance, sigma=sigma, two_sided=two_sided, layers=layers)
    threshold = f"no regression past {tolerance:g} (and {sigma:g} SE)"
    checks = [
        Check("expect_no_regression", d.key, threshold, d.current, source, False, tolerance) for d in cmp.regressions
    ]
    if not checks:
        checks = [Check("expect_no_regression", "every compared value", threshold, None, source, True, tolerance)]
        return checks, []
    lines = [f"gsnr.expect_no_regression: {len(cmp.regressions)} value(s) regressed against {source}:"]
    return checks, lines + cmp.table().splitlines()
