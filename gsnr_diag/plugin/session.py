"""One pytest run of the plugin: what each test measured and checked, and the terminal summary.

* :class:`Check`, :class:`Measurement`, :class:`TestRecord` — the records of one test;
* :func:`kind_of`, :func:`point_of`, :func:`last_point` — the scalar view of a measured result
  (GradientStats, Snapshot, Trajectory, ControlResult or an aggregates dict);
* :class:`GsnrSession` — one per pytest run, kept in ``config.stash[SESSION_KEY]``: options, ini
  thresholds, records, the summary table, and what was written (by :mod:`gsnr_diag.plugin.files`).

Imported by every pytest run of the environment, so it imports nothing heavy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .._format import number, text_table
from .._io import clean_float, to_plain
from .thresholds import Threshold, parse_ini_thresholds

__all__ = [
    "SESSION_KEY",
    "WORKER_OUTPUT_KEY",
    "Check",
    "GsnrSession",
    "Measurement",
    "TestRecord",
    "kind_of",
    "last_point",
    "point_of",
]

REPORT_SUFFIXES = (".html", ".htm", ".pdf")


@dataclass
class Check:
    """One threshold comparison made by ``gsnr.expect*``."""

    method: str
    quantity: str
    threshold: str
    measured: float | None
    source: str
    passed: bool
    value: Any = None  # the threshold itself: a number, or {glob: number} for min_layer_gsnr

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "quantity": self.quantity,
            "threshold": self.threshold,
            "threshold_value": to_plain(self.value),
            "measured": clean_float(self.measured),
            "source": self.source,
            "passed": self.passed,
        }


@dataclass
class Measurement:
    """A result measured (or checked) in one test: kind is "stats", "snapshot", "trajectory" or "control"."""

    kind: str
    result: Any
    label: str | None = None
    run: dict[str, Any] | None = None  # the finished run dict, for a measurement made in an xdist worker


@dataclass
class TestRecord:
    """What one test measured and checked, and its outcome."""

    nodeid: str
    measurements: list[Measurement] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    outcome: str | None = None
    remote_headline: dict[str, float | None] | None = None  # computed by the xdist worker that ran the test

    __test__ = False  # not a test class, whatever pytest's collection thinks of the name

    def add(self, result: Any, label: str | None = None) -> None:
        if any(m.result is result for m in self.measurements):
            return
        self.measurements.append(Measurement(kind_of(result), result, label))

    @property
    def passed(self) -> bool:
        return self.outcome in ("passed", "xfailed")

    def headline(self) -> dict[str, float | None]:
        """mean GSNR, OSGR and same-sign of the latest measurement; the latest control's ratio."""
        if self.remote_headline is not None:
            return dict(self.remote_headline)
        out: dict[str, float | None] = {"mean_gsnr": None, "osgr": None, "same_sign": None, "control_ratio": None}
        for m in reversed(self.measurements):
            point = last_point(m.result)
            if point is not None:
                out["mean_gsnr"] = point.get("mean_gsnr")
                out["osgr"] = point.get("osgr")
                out["same_sign"] = point.get("mean_same_sign")
                break
        for m in reversed(self.measurements):
            if m.kind == "control":
                out["control_ratio"] = clean_float(getattr(m.result, "final_ratio", None))
                break
        return out


def kind_of(result: Any) -> str:
    """ "control", "trajectory", "snapshot" or "stats" (GradientStats or an aggregates dict)."""
    if hasattr(result, "real") and hasattr(result, "shuffled"):
        return "control"
    if hasattr(result, "snapshots"):
        return "trajectory"
    if hasattr(result, "step") and hasattr(result, "mean_gsnr"):
        return "snapshot"
    return "stats"


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def point_of(obj: Any) -> dict[str, Any]:
    """The scalar view of a GradientStats / Snapshot / aggregates dict."""
    return {
        "mean_gsnr": clean_float(_get(obj, "mean_gsnr")),
        "osgr": clean_float(_get(obj, "osgr")),
        "mean_same_sign": clean_float(_get(obj, "mean_same_sign")),
        "layer_gsnr": {k: clean_float(v) for k, v in (_get(obj, "layer_gsnr") or {}).items()},
        "layer_same_sign": {k: clean_float(v) for k, v in (_get(obj, "layer_same_sign") or {}).items()},
        "n": _get(obj, "n"),
        "step": _get(obj, "step"),
    }


def last_point(result: Any) -> dict[str, Any] | None:
    """The scalar view of a result, or of its last snapshot (the real-label one for a control)."""
    kind = kind_of(result)
    if kind == "control":
        result = result.real
        kind = "trajectory"
    if kind == "trajectory":
        snaps = list(result.snapshots)
        return point_of(snaps[-1]) if snaps else None
    return point_of(result)


SESSION_KEY = pytest.StashKey["GsnrSession"]()
#: the key of an xdist worker's records in ``config.workeroutput`` (see :mod:`gsnr_diag.plugin.workers`)
WORKER_OUTPUT_KEY = "gsnr_diag"


class GsnrSession:
    """Per-run state of the plugin, stored in ``config.stash[SESSION_KEY]``."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.device: str | None = config.getoption("gsnr_device")
        report = config.getoption("gsnr_report")
        save = config.getoption("gsnr_save")
        self.report_path: Path | None = Path(report) if report else None
        self.save_dir: Path | None = Path(save) if save else None
        if report and (report.endswith(("/", os.sep)) or Path(report).is_dir()):
            self.report_path = Path(report) / "index.html"  # a folder: its index page
        if self.report_path is not None and self.report_path.suffix.lower() not in REPORT_SUFFIXES:
            raise pytest.UsageError(
                f"--gsnr-report {report}: the file name must end in .html or .pdf (the suffix picks the format), "
                "or name a folder (ending in /) to write its index.html"
            )
        self.ini_thresholds: dict[str, Threshold] = parse_ini_thresholds(config.getini)
        self.records: dict[str, TestRecord] = {}
        self.written: list[tuple[str, Path]] = []
        self.errors: list[str] = []

    @property
    def is_worker(self) -> bool:
        """Whether this is a pytest-xdist worker (its records go to the controller, see :mod:`.workers`)."""
        return hasattr(self.config, "workerinput")

    def record_for(self, nodeid: str) -> TestRecord:
        rec = self.records.get(nodeid)
        if rec is None:
            rec = self.records[nodeid] = TestRecord(nodeid)
        return rec

    def measured(self) -> list[TestRecord]:
        """The records of the tests that measured something, in the order they ran."""
        return [r for r in self.records.values() if r.measurements]

    def wants_files(self) -> bool:
        """Whether ``--gsnr-save`` or ``--gsnr-report`` has something to write."""
        return (self.save_dir is not None or self.report_path is not None) and bool(self.measured())

    def update_outcome(self, report: Any) -> None:
        rec = self.records.get(report.nodeid)
        if rec is None:
            return
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
        elif report.skipped:
            outcome = "skipped"
        else:
            outcome = "passed"
        if report.when == "call" or report.failed or rec.outcome is None:
            if rec.outcome in ("failed", "error") and report.when == "teardown" and not report.failed:
                return
            rec.outcome = outcome

    def summary_lines(self) -> list[tuple[str, dict[str, bool]]]:
        """(line, markup) pairs of the terminal summary table."""
        shown = [rec for rec in self.records.values() if rec.measurements or rec.checks]
        if not shown:
            return []
        files = {rec.nodeid.split("::", 1)[0] for rec in shown}
        strip = len(files) == 1 and all("::" in rec.nodeid for rec in shown)
        rows, marks = [], []
        for rec in shown:
            h = rec.headline()
            checks = f"{sum(c.passed for c in rec.checks)}/{len(rec.checks)}" if rec.checks else "-"
            outcome = rec.outcome or "?"
            result = "PASS" if rec.passed else "FAIL" if outcome == "failed" else outcome.upper()
            name = rec.nodeid.split("::", 1)[1] if strip else rec.nodeid
            rows.append(
                [name, number(h["mean_gsnr"]), number(h["osgr"]), number(h["same_sign"]), number(h["control_ratio"])]
                + [checks, result]
            )
            marks.append({"green": True} if outcome == "passed" else {"red": outcome in ("failed", "error")})
        first = f"test (in {next(iter(files))})" if strip else "test"
        head = [first, "mean GSNR", "OSGR", "same-sign", "control ratio", "checks", "result"]
        table = text_table(head, rows, indent="", left=(0, 6))
        return [(table[0], {"bold": True}), (table[1], {})] + list(zip(table[2:], marks))
