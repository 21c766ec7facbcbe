"""The logic behind the pytest plugin (issue 5); :mod:`gsnr_diag.plugin` only holds hooks and the fixture.

* :data:`THRESHOLDS` — every threshold keyword, its ini option and its help text;
* :func:`resolve_defaults` — per-test defaults: ``@pytest.mark.gsnr(...)`` over ini options
  (explicit arguments of ``gsnr.expect*`` override both);
* :class:`TestRecord`/:class:`Check` — what each test measured and checked, and its outcome;
* :class:`GsnrSession` — one per pytest run, kept in ``config.stash[SESSION_KEY]``: records and
  the terminal summary table; at the end it writes ``--gsnr-save``/``--gsnr-report``.

The fixture's object (:class:`gsnr_diag.pytest_checks.GsnrFixture`), the failure messages, the
JSON and the report live in :mod:`gsnr_diag.pytest_checks`, imported only when a test uses the
fixture. This module is imported by every pytest run in the environment, so it stays small and
imports nothing heavy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from .._io import clean_float

__all__ = [
    "THRESHOLDS",
    "Threshold",
    "Check",
    "Measurement",
    "TestRecord",
    "GsnrSession",
    "make_fixture",
    "resolve_defaults",
    "parse_ini_thresholds",
    "SESSION_KEY",
]

JSON_SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------------------
# thresholds: keywords, ini options, precedence (explicit argument > marker > ini)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdSpec:
    key: str  # keyword of gsnr.expect* and of @pytest.mark.gsnr
    ini: str  # ini option holding the project-wide default
    method: str  # the gsnr method that uses it
    help: str
    layered: bool = False  # a number or a mapping {glob of parameter names: number}


THRESHOLDS: tuple[ThresholdSpec, ...] = (
    ThresholdSpec("min_mean_gsnr", "gsnr_min_mean_gsnr", "expect", "default min_mean_gsnr of gsnr.expect: lower bound on the mean GSNR over all parameter elements"),
    ThresholdSpec("min_layer_gsnr", "gsnr_min_layer_gsnr", "expect", "default min_layer_gsnr of gsnr.expect: one number for every parameter tensor, or lines 'GLOB = NUMBER' (fnmatch globs of parameter names)", layered=True),
    ThresholdSpec("min_same_sign", "gsnr_min_same_sign", "expect", "default min_same_sign of gsnr.expect: lower bound on the mean same-sign fraction (about 0.5 at initialization)"),
    ThresholdSpec("min_osgr", "gsnr_min_osgr", "expect", "default min_osgr of gsnr.expect: lower bound on the single-set one-step generalization ratio (eq. 19)"),
    ThresholdSpec("factor", "gsnr_rising_factor", "expect_rising", "default factor of gsnr.expect_rising: peak mean GSNR >= factor x its value at the first recorded step"),
    ThresholdSpec("min_ratio", "gsnr_min_control_ratio", "expect_control", "default min_ratio of gsnr.expect_control: real-label / shuffled-label mean-GSNR ratio"),
)
SPECS = {s.key: s for s in THRESHOLDS}
MARKER_HELP = (
    "gsnr(" + ", ".join(f"{s.key}=..." for s in THRESHOLDS) + "): default thresholds of the gsnr fixture's "
    "expect/expect_rising/expect_control for this test (explicit arguments override them; they override ini options)"
)

SRC_CALL = "argument"
SRC_MARK = "@pytest.mark.gsnr"


def _src_ini(spec: ThresholdSpec) -> str:
    return f"ini option {spec.ini}"


@dataclass(frozen=True)
class Threshold:
    """A resolved threshold: its value (a float, or a dict glob → float) and where it came from."""

    value: Any
    source: str


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _check_value(spec: ThresholdSpec, value: Any, where: str) -> Any:
    """Validate a threshold value given as an argument or a marker keyword."""
    if spec.layered and isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{where}: the mapping of parameter-name globs to thresholds is empty")
        out = {}
        for glob, v in value.items():
            if not isinstance(glob, str) or not glob:
                raise ValueError(f"{where}: keys must be globs of parameter names such as '0.*' or '*.weight', got {glob!r}")
            out[glob] = _number(v, f"{where}[{glob!r}]")
        return out
    what = "a number or a mapping {glob of parameter names: number}" if spec.layered else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: expected {what}, got {value!r}")
    return float(value)


def parse_ini_thresholds(getini: Callable[[str], Any]) -> dict[str, Threshold]:
    """Read the ``gsnr_*`` ini options; raises :class:`pytest.UsageError` on a malformed value."""
    out: dict[str, Threshold] = {}
    for spec in THRESHOLDS:
        raw = getini(spec.ini)
        if spec.layered:
            lines = [ln.strip() for ln in (raw or []) if ln and ln.strip()]
            if not lines:
                continue
            try:
                if len(lines) == 1 and "=" not in lines[0]:
                    value: Any = _parse_float(lines[0], spec.ini)
                else:
                    value = {}
                    for ln in lines:
                        glob, sep, num = ln.partition("=")
                        if not sep or not glob.strip():
                            raise ValueError(f"ini option {spec.ini}: line {ln!r} is not 'GLOB = NUMBER'")
                        value[glob.strip()] = _parse_float(num.strip(), f"{spec.ini} ({glob.strip()})")
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
        else:
            text = (raw or "").strip() if isinstance(raw, str) else raw
            if text in ("", None):
                continue
            try:
                value = _parse_float(str(text), spec.ini)
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
        out[spec.key] = Threshold(value, _src_ini(spec))
    return out


def _parse_float(text: str, name: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"ini option {name}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"ini option {name}: {text!r} is not a finite number")
    return v


def marker_thresholds(node: Any) -> dict[str, Threshold]:
    """Thresholds from ``@pytest.mark.gsnr`` on the test, its class and module (closest wins)."""
    out: dict[str, Threshold] = {}
    for mark in reversed(list(node.iter_markers("gsnr"))):
        if mark.args:
            raise ValueError(
                f"@pytest.mark.gsnr takes keyword arguments only ({', '.join(SPECS)}), got positional {mark.args!r}"
            )
        for key, value in mark.kwargs.items():
            if key not in SPECS:
                raise ValueError(f"@pytest.mark.gsnr: unknown threshold {key!r}; known: {', '.join(SPECS)}")
            out[key] = Threshold(_check_value(SPECS[key], value, f"@pytest.mark.gsnr({key}=...)"), SRC_MARK)
    return out


def resolve_defaults(node: Any, ini: Mapping[str, Threshold]) -> dict[str, Threshold]:
    """The test's default thresholds: marker over ini (explicit arguments are applied per call)."""
    merged = dict(ini)
    merged.update(marker_thresholds(node))
    return merged


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------


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
            "threshold_value": _plain(self.value),
            "measured": _clean(self.measured),
            "source": self.source,
            "passed": self.passed,
        }


@dataclass
class Measurement:
    """A result measured (or checked) in one test: kind is "stats", "trajectory" or "control"."""

    kind: str
    result: Any
    label: str | None = None


@dataclass
class TestRecord:
    """What one test measured and checked, and its outcome."""

    nodeid: str
    measurements: list[Measurement] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    outcome: str | None = None

    __test__ = False  # not a test class, whatever pytest's collection thinks of the name

    def add(self, result: Any, label: str | None = None) -> None:
        if any(m.result is result for m in self.measurements):
            return
        self.measurements.append(Measurement(kind_of(result), result, label))

    def headline(self) -> dict[str, float | None]:
        """mean GSNR, OSGR and same-sign of the latest measurement; the latest control's ratio."""
        out: dict[str, float | None] = {"mean_gsnr": None, "osgr": None, "same_sign": None, "control_ratio": None}
        for m in reversed(self.measurements):
            point = _last_point(m.result)
            if point is not None:
                out["mean_gsnr"] = point.get("mean_gsnr")
                out["osgr"] = point.get("osgr")
                out["same_sign"] = point.get("mean_same_sign")
                break
        for m in reversed(self.measurements):
            if m.kind == "control":
                out["control_ratio"] = _clean(getattr(m.result, "final_ratio", None))
                break
        return out


def kind_of(result: Any) -> str:
    if hasattr(result, "real") and hasattr(result, "shuffled"):
        return "control"
    if hasattr(result, "snapshots"):
        return "trajectory"
    if hasattr(result, "step") and hasattr(result, "mean_gsnr"):
        return "snapshot"
    return "stats"


_clean = clean_float


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _point_of(obj: Any) -> dict[str, Any]:
    """The scalar view of a GradientStats / Snapshot / aggregates dict."""
    return {
        "mean_gsnr": _clean(_get(obj, "mean_gsnr")),
        "osgr": _clean(_get(obj, "osgr")),
        "mean_same_sign": _clean(_get(obj, "mean_same_sign")),
        "layer_gsnr": {k: _clean(v) for k, v in (_get(obj, "layer_gsnr") or {}).items()},
        "layer_same_sign": {k: _clean(v) for k, v in (_get(obj, "layer_same_sign") or {}).items()},
        "n": _get(obj, "n"),
        "step": _get(obj, "step"),
    }


def _last_point(result: Any) -> dict[str, Any] | None:
    kind = kind_of(result)
    if kind == "control":
        result = result.real
        kind = "trajectory"
    if kind == "trajectory":
        snaps = list(result.snapshots)
        return _point_of(snaps[-1]) if snaps else None
    return _point_of(result)


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; '-' for None/NaN."""
    v = _clean(x)
    if v is None:
        return "-" if x is None else str(x)
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def text_table(head: list[str], rows: list[list[str]], indent: str = "  ", left: tuple[int, ...] = (0,)) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return indent + "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


# ---------------------------------------------------------------------------------------------
# the session: records, summary, JSON, report
# ---------------------------------------------------------------------------------------------

SESSION_KEY = pytest.StashKey["GsnrSession"]()


class GsnrSession:
    """Per-run state of the plugin, stored in ``config.stash[SESSION_KEY]``."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.device: str | None = config.getoption("gsnr_device")
        report = config.getoption("gsnr_report")
        save = config.getoption("gsnr_save")
        self.report_path: Path | None = Path(report) if report else None
        self.save_dir: Path | None = Path(save) if save else None
        if self.report_path is not None and self.report_path.suffix.lower() not in (".html", ".htm", ".pdf"):
            raise pytest.UsageError(
                f"--gsnr-report {report}: the file name must end in .html or .pdf (the suffix picks the format)"
            )
        self.ini_thresholds = parse_ini_thresholds(config.getini)
        self.records: dict[str, TestRecord] = {}
        self.written: list[tuple[str, Path]] = []
        self.errors: list[str] = []

    def record_for(self, nodeid: str) -> TestRecord:
        rec = self.records.get(nodeid)
        if rec is None:
            rec = self.records[nodeid] = TestRecord(nodeid)
        return rec

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

    # -- terminal summary -------------------------------------------------------------------

    def summary_lines(self) -> list[tuple[str, dict[str, bool]]]:
        """(line, markup) pairs of the terminal summary table."""
        rows = []
        marks = []
        shown = [rec for rec in self.records.values() if rec.measurements or rec.checks]
        files = {rec.nodeid.split("::", 1)[0] for rec in shown}
        strip = len(files) == 1 and all("::" in rec.nodeid for rec in shown)
        for rec in shown:
            h = rec.headline()
            n_ok = sum(c.passed for c in rec.checks)
            checks = f"{n_ok}/{len(rec.checks)}" if rec.checks else "-"
            outcome = rec.outcome or "?"
            rows.append([rec.nodeid.split("::", 1)[1] if strip else rec.nodeid, fmt(h["mean_gsnr"]), fmt(h["osgr"]), fmt(h["same_sign"]), fmt(h["control_ratio"]),
                         checks, "PASS" if outcome in ("passed", "xfailed") else outcome.upper() if outcome != "failed" else "FAIL"])
            marks.append({"green": outcome == "passed"} if outcome == "passed" else {"red": outcome in ("failed", "error")})
        if not rows:
            return []
        first = f"test (in {next(iter(files))})" if strip else "test"
        table = text_table([first, "mean GSNR", "OSGR", "same-sign", "control ratio", "checks", "result"], rows, indent="",
                           left=(0, 6))
        out: list[tuple[str, dict[str, bool]]] = [(table[0], {"bold": True}), (table[1], {})]
        out += list(zip(table[2:], marks))
        return out

    # -- files ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Write ``--gsnr-save`` JSON and the ``--gsnr-report`` file (errors are reported, not raised)."""
        records = [r for r in self.records.values() if r.measurements]
        if not records:
            return
        from . import fixture as pytest_checks

        if self.save_dir is not None:
            try:
                pytest_checks.save_json(self, records)
            except Exception as exc:  # noqa: BLE001 - a report problem must not hide the test results
                self.errors.append(f"--gsnr-save {self.save_dir}: {type(exc).__name__}: {exc}")
        if self.report_path is not None:
            try:
                pytest_checks.write_report(self, records)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"--gsnr-report {self.report_path}: {type(exc).__name__}: {exc}")

def _plain(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return str(obj)


def make_fixture(config: Any, node: Any) -> Any:
    """The ``gsnr`` fixture's object for one test (imports :mod:`gsnr_diag.pytest_checks` on first use)."""
    from .fixture import GsnrFixture

    return GsnrFixture(config.stash[SESSION_KEY], node)
