"""The logic behind the pytest plugin (issue 5); :mod:`gsnr_diag.plugin` only holds hooks and the fixture.

* :data:`THRESHOLDS` — every threshold keyword, its ini option and its help text;
* :func:`resolve_defaults` — per-test defaults: ``@pytest.mark.gsnr(...)`` over ini options;
* :class:`GsnrFixture` — the object the ``gsnr`` fixture returns: ``stats``/``track``/``control``
  measure and record, ``expect``/``expect_rising``/``expect_control`` check thresholds and raise
  :class:`~gsnr_diag.errors.ThresholdError` (an ``AssertionError``) with a message that shows the
  threshold, where it came from, the measured value and a table of the worst layers;
* :class:`GsnrSession` — one per pytest run, kept in ``config.stash``: records, terminal summary,
  ``--gsnr-save`` JSON files and the ``--gsnr-report`` HTML/PDF.

This module is imported whenever pytest starts (the plugin imports it), so it imports nothing
heavy at module level: torch, the measuring code, jinja2 and weasyprint are imported inside the
functions that need them.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

__all__ = [
    "THRESHOLDS",
    "Threshold",
    "Check",
    "Measurement",
    "TestRecord",
    "GsnrSession",
    "GsnrFixture",
    "resolve_defaults",
    "parse_ini_thresholds",
    "SESSION_KEY",
]

JSON_SCHEMA_VERSION = 1
MAX_LAYER_ROWS = 8


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "quantity": self.quantity,
            "threshold": self.threshold,
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
                out["control_ratio"] = _clean(getattr(m.result, "peak_ratio", None))
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


def _clean(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


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


def _describe(result: Any) -> tuple[str, dict[str, Any]]:
    """(what was checked, its scalar view) for gsnr.expect."""
    kind = kind_of(result)
    if kind == "stats":
        if not (isinstance(result, Mapping) and "mean_gsnr" in result) and not hasattr(result, "mean_gsnr"):
            raise TypeError(
                "gsnr.expect: expected a GradientStats, Trajectory, Snapshot or ControlResult "
                f"(or an aggregates dict), got {type(result).__name__}"
            )
        point = _point_of(result)
        n = point.get("n")
        return (f"GradientStats (n = {n} samples)" if n is not None else "gradient statistics"), point
    if kind == "snapshot":
        point = _point_of(result)
        return f"Snapshot at step {point['step']}", point
    traj = result.real if kind == "control" else result
    snaps = list(traj.snapshots)
    if not snaps:
        raise ValueError(f"gsnr.expect: the {'control' if kind == 'control' else 'trajectory'} holds no snapshots")
    point = _point_of(snaps[-1])
    prefix = "ControlResult, real labels" if kind == "control" else "Trajectory"
    return f"{prefix}, last snapshot (step {point['step']} of {len(snaps)} recorded)", point


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


def _layer_thresholds(spec_value: Any, layers: list[str]) -> tuple[dict[str, float], list[str]]:
    """Per-layer minimum GSNR from a number or {glob: number}; every matching glob applies (strictest wins)."""
    if not isinstance(spec_value, Mapping):
        return {name: float(spec_value) for name in layers}, []
    out: dict[str, float] = {}
    unmatched = []
    for glob, value in spec_value.items():
        hit = [name for name in layers if fnmatch.fnmatchcase(name, glob)]
        if not hit:
            unmatched.append(glob)
        for name in hit:
            out[name] = max(out.get(name, -math.inf), float(value))
    return out, unmatched


def _threshold_text(key: str, value: Any) -> str:
    if isinstance(value, Mapping):
        return f"{key} = {{" + ", ".join(f"{g!r}: {fmt(v)}" for g, v in value.items()) + "}"
    return f"{key} = {fmt(value)}"


# ---------------------------------------------------------------------------------------------
# the fixture object
# ---------------------------------------------------------------------------------------------


class GsnrFixture:
    """What the ``gsnr`` fixture returns: measure, record and check GSNR in a test.

    Every result measured here (and every result passed to an ``expect*`` method) is recorded
    for the terminal summary, ``--gsnr-save`` and ``--gsnr-report``.
    """

    def __init__(self, session: "GsnrSession", node: Any) -> None:
        self._session = session
        self._nodeid = node.nodeid
        self.defaults: dict[str, Threshold] = resolve_defaults(node, session.ini_thresholds)

    # -- measuring --------------------------------------------------------------------------

    @property
    def device(self) -> str | None:
        """The ``--gsnr-device`` option (``None``: the model's own device)."""
        return self._session.device

    @property
    def record(self) -> TestRecord:
        return self._session.record_for(self._nodeid)

    def stats(self, model: Any, data: Any, loss_fn: Any = None, *, label: str | None = None, **kw: Any) -> Any:
        """:func:`gsnr_diag.gradient_stats` on ``--gsnr-device`` (unless ``device=`` is given), recorded."""
        from .measure import gradient_stats

        if self.device is not None:
            kw.setdefault("device", self.device)
        result = gradient_stats(model, data, loss_fn, **kw)
        self.record.add(result, label)
        return result

    def _build(self, build_model: Any, seed: int | None) -> Any:
        import torch

        if isinstance(build_model, torch.nn.Module):
            model = build_model
        else:
            if not callable(build_model):
                raise TypeError(f"build_model: expected a callable returning an nn.Module, got {type(build_model).__name__}")
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                model = build_model()
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"build_model() returned a {type(model).__name__}, expected a torch.nn.Module")
        if self.device is not None:
            model = model.to(self.device)
        return model

    def track(
        self,
        build_model: Any,
        data: Any,
        loss_fn: Any = None,
        *,
        epochs: int,
        every: Any = 1,
        test_data: Any = None,
        measure_batch_size: int | None = None,
        signs: bool = True,
        task: str | None = None,
        seed: int = 0,
        label: str | None = None,
        **train_kw: Any,
    ) -> Any:
        """Train ``build_model()`` for ``epochs`` with a :class:`~gsnr_diag.monitor.Monitor`; the Trajectory.

        ``build_model`` is a callable returning a fresh model (called with torch's RNG seeded by
        ``seed``, so the initialization is reproducible and the test's RNG is left alone) or a
        model. ``every``, ``test_data``, ``signs``, ``task`` and ``measure_batch_size`` (the
        monitor's ``batch_size``) go to the Monitor; the rest (``lr``, ``batch_size``,
        ``optimizer``, ...) to :func:`gsnr_diag.training.train`.
        """
        from .monitor import Monitor
        from .training import train

        model = self._build(build_model, seed)
        monitor = Monitor(
            model, data, loss_fn, test_data=test_data, every=every, batch_size=measure_batch_size, signs=signs, task=task
        )
        train_kw.setdefault("progress", False)
        train_kw.setdefault("seed", seed)
        result = train(model, data, loss_fn, epochs=epochs, monitor=monitor, test_data=test_data, **train_kw)
        if result is None:
            result = monitor.trajectory
        self.record.add(result, label)
        return result

    def control(
        self,
        build_model: Callable[[], Any],
        data: Any,
        loss_fn: Any = None,
        *,
        epochs: int,
        label: str | None = None,
        **kw: Any,
    ) -> Any:
        """:func:`gsnr_diag.experiments.control.shuffled_label_control` (real vs shuffled labels), recorded."""
        from .experiments.control import shuffled_label_control

        if self.device is not None and "device" not in kw:
            import torch

            device = self.device
            inner = build_model

            def build_model() -> Any:  # noqa: F811 - same callable, on --gsnr-device
                model = inner() if not isinstance(inner, torch.nn.Module) else inner
                return model.to(device)

        kw.setdefault("progress", False)
        result = shuffled_label_control(build_model, data, loss_fn, epochs=epochs, **kw)
        self.record.add(result, label)
        return result

    # -- checking ---------------------------------------------------------------------------

    def _threshold(self, key: str, explicit: Any) -> Threshold | None:
        if explicit is not None:
            return Threshold(_check_value(SPECS[key], explicit, f"{key}"), SRC_CALL)
        return self.defaults.get(key)

    def _no_threshold(self, method: str, keys: list[str]) -> TypeError:
        opts = ", ".join(f"{k}=..." for k in keys)
        inis = ", ".join(SPECS[k].ini for k in keys)
        return TypeError(
            f"gsnr.{method}: no threshold to check. Pass {opts}, or set a default with "
            f"@pytest.mark.gsnr({opts}) or the ini option(s) {inis}"
        )

    def _finish(self, method: str, checks: list[Check], lines: list[str]) -> None:
        __tracebackhide__ = True
        self.record.checks.extend(checks)
        if not all(c.passed for c in checks):
            from .errors import ThresholdError

            raise ThresholdError("\n".join(lines))

    def expect(
        self,
        result: Any,
        *,
        min_mean_gsnr: float | None = None,
        min_layer_gsnr: float | Mapping[str, float] | None = None,
        min_same_sign: float | None = None,
        min_osgr: float | None = None,
    ) -> None:
        """Assert thresholds on a GradientStats (or a Trajectory's / ControlResult's last snapshot).

        Each threshold not given here falls back to ``@pytest.mark.gsnr(...)``, then to the
        ``gsnr_*`` ini option. ``min_layer_gsnr`` is one number for every parameter tensor or
        ``{glob: number}`` (fnmatch globs of parameter names; every matching glob applies).
        Raises :class:`~gsnr_diag.errors.ThresholdError` (an AssertionError) listing every
        threshold, its source, the measured value and the worst layers.
        """
        __tracebackhide__ = True
        explicit = {
            "min_mean_gsnr": min_mean_gsnr,
            "min_layer_gsnr": min_layer_gsnr,
            "min_same_sign": min_same_sign,
            "min_osgr": min_osgr,
        }
        resolved = {k: self._threshold(k, v) for k, v in explicit.items()}
        resolved = {k: t for k, t in resolved.items() if t is not None}
        if not resolved:
            raise self._no_threshold("expect", list(explicit))
        what, point = _describe(result)
        self.record.add(result)

        checks: list[Check] = []
        scalar = (
            ("min_mean_gsnr", "mean GSNR", "mean_gsnr", "undefined: every element has zero variance"),
            ("min_same_sign", "same-sign fraction", "mean_same_sign", "not measured (signs=False?) or undefined"),
            ("min_osgr", "OSGR (eq. 19)", "osgr", "undefined: every mean gradient is zero"),
        )
        notes: dict[str, str] = {}
        for key, quantity, field_, why_none in scalar:
            t = resolved.get(key)
            if t is None:
                continue
            measured = point[field_]
            ok = measured is not None and measured >= t.value
            checks.append(Check("expect", quantity, _threshold_text(key, t.value), measured, t.source, ok))
            if measured is None:
                notes[quantity] = why_none

        layer_min: dict[str, float] = {}
        layers = point["layer_gsnr"]
        t = resolved.get("min_layer_gsnr")
        if t is not None:
            layer_min, unmatched = _layer_thresholds(t.value, list(layers))
            if unmatched:
                raise ValueError(
                    f"gsnr.expect: min_layer_gsnr glob(s) {unmatched} match no parameter; parameters are {list(layers)}"
                )
            failing = [n for n, m in layer_min.items() if layers.get(n) is None or layers[n] < m]
            worst = min(layer_min, key=lambda n: -math.inf if layers.get(n) is None else layers[n] / max(layer_min[n], 1e-300))
            checks.append(
                Check(
                    "expect",
                    f"layer GSNR ({len(failing)} of {len(layer_min)} layers below)" if failing else f"layer GSNR (all {len(layer_min)} layers)",
                    _threshold_text("min_layer_gsnr", t.value),
                    layers.get(worst),
                    t.source,
                    not failing,
                )
            )

        failed = [c for c in checks if not c.passed]
        lines = [
            f"gsnr.expect: {len(failed)} of {len(checks)} threshold(s) not met by the {what}",
            "",
        ]
        rows = []
        for c in checks:
            measured = fmt(c.measured) if c.measured is not None else "undefined"
            rows.append(["FAIL" if not c.passed else "ok", c.quantity, measured, c.threshold, c.source])
        lines += text_table(["", "quantity", "measured", "threshold (measured must be >=)", "set by"], rows, left=(0, 1, 3, 4))
        for quantity, why in notes.items():
            lines.append(f"  ({quantity}: {why})")
        lines.append("")
        lines += _worst_layers_table(point, layer_min)
        self._finish("expect", checks, lines)

    def expect_rising(self, trajectory: Any, *, factor: float | None = None) -> None:
        """Assert that the peak mean GSNR is at least ``factor`` × its value at the first recorded step.

        The paper's signature of feature learning on real labels (Fig. 5): mean GSNR rises early
        in training. Accepts a Trajectory or a ControlResult (its real-label trajectory).
        """
        __tracebackhide__ = True
        t = self._threshold("factor", factor)
        if t is None:
            raise self._no_threshold("expect_rising", ["factor"])
        self.record.add(trajectory)
        traj = trajectory.real if kind_of(trajectory) == "control" else trajectory
        if kind_of(traj) != "trajectory":
            raise TypeError(f"gsnr.expect_rising: expected a Trajectory or ControlResult, got {type(trajectory).__name__}")
        snaps = list(traj.snapshots)
        if len(snaps) < 2:
            raise ValueError(f"gsnr.expect_rising: the trajectory holds {len(snaps)} snapshot(s); a rise needs at least 2")
        first = snaps[0]
        v0 = _clean(first.mean_gsnr)
        defined = [(s.step, _clean(s.mean_gsnr)) for s in snaps if _clean(s.mean_gsnr) is not None]
        peak_step, peak = max(defined, key=lambda sv: sv[1]) if defined else (None, None)
        ratio = peak / v0 if (peak is not None and v0) else None
        ok = v0 is not None and peak is not None and peak >= t.value * v0
        check = Check("expect_rising", "peak / first mean GSNR", _threshold_text("factor", t.value), ratio, t.source, ok)
        status = "ok" if ok else "FAIL"
        lines = [
            f"gsnr.expect_rising: {status}: peak mean GSNR {fmt(peak)} (step {peak_step}) is {fmt(ratio)}x "
            f"its value at step {first.step} ({fmt(v0)})",
            f"  required: peak >= factor x step-{first.step} value = {fmt(t.value)} x {fmt(v0)} = "
            f"{fmt(t.value * v0) if v0 is not None else 'undefined'}   (factor set by {t.source})",
            f"  trajectory: {len(snaps)} snapshots, steps {snaps[0].step}..{snaps[-1].step}",
            "",
        ]
        rows = []
        for name in traj.layers():
            l0 = _clean(first.layer_gsnr.get(name))
            vals = [(s.step, _clean(s.layer_gsnr.get(name))) for s in snaps if _clean(s.layer_gsnr.get(name)) is not None]
            ps, pv = max(vals, key=lambda sv: sv[1]) if vals else (None, None)
            r = pv / l0 if (pv is not None and l0) else None
            rows.append((r, [name, fmt(l0), fmt(pv), str(ps) if ps is not None else "-", fmt(r)]))
        rows.sort(key=lambda rr: -math.inf if rr[0] is None else rr[0])
        lines += _limited("layers with the smallest rise (peak / first layer GSNR, smallest first)", rows,
                          ["layer", f"GSNR at step {first.step}", "peak GSNR", "at step", "peak / first"])
        self._finish("expect_rising", [check], lines)

    def expect_control(self, control: Any, *, min_ratio: float | None = None, at: str = "peak") -> None:
        """Assert that real labels beat shuffled ones: mean-GSNR ratio real/shuffled ≥ ``min_ratio``.

        ``at="peak"`` (default) checks the control's ``peak_ratio``, ``at="final"`` its ``final_ratio``.
        """
        __tracebackhide__ = True
        if at not in ("peak", "final"):
            raise ValueError(f"gsnr.expect_control: at must be 'peak' or 'final', got {at!r}")
        t = self._threshold("min_ratio", min_ratio)
        if t is None:
            raise self._no_threshold("expect_control", ["min_ratio"])
        if kind_of(control) != "control":
            raise TypeError(f"gsnr.expect_control: expected a ControlResult, got {type(control).__name__}")
        self.record.add(control)
        measured = _clean(getattr(control, f"{at}_ratio", None))
        ratios = [_clean(r) for r in (getattr(control, "ratio", None) or [])]
        steps = list(getattr(control, "steps", None) or [])
        idx = None
        if ratios and any(r is not None for r in ratios):
            defined = [(i, r) for i, r in enumerate(ratios) if r is not None]
            idx = max(defined, key=lambda ir: ir[1])[0] if at == "peak" else defined[-1][0]
        step = steps[idx] if (idx is not None and idx < len(steps)) else None
        ok = measured is not None and measured >= t.value
        check = Check("expect_control", f"control ratio ({at})", _threshold_text("min_ratio", t.value), measured, t.source, ok)
        real = _snapshot_at(control.real, step)
        shuf = _snapshot_at(control.shuffled, step)
        lines = [
            f"gsnr.expect_control: {'ok' if ok else 'FAIL'}: real/shuffled mean-GSNR ratio at its {at} "
            f"(step {step}) is {fmt(measured) if measured is not None else 'undefined'}; "
            f"required >= min_ratio = {fmt(t.value)}   (set by {t.source})",
            f"  mean GSNR at step {step}: real labels {fmt(real.mean_gsnr if real else None)}, "
            f"shuffled labels {fmt(shuf.mean_gsnr if shuf else None)}; label_noise = {fmt(getattr(control, 'label_noise', None))}",
        ]
        verdict = getattr(control, "verdict", None)
        if verdict:
            lines.append(f"  verdict: {verdict}")
        lines.append("")
        rows = []
        if real is not None and shuf is not None:
            for name in real.layer_gsnr:
                a, b = _clean(real.layer_gsnr.get(name)), _clean(shuf.layer_gsnr.get(name))
                r = a / b if (a is not None and b) else None
                rows.append((r, [name, fmt(a), fmt(b), fmt(r)]))
        rows.sort(key=lambda rr: -math.inf if rr[0] is None else rr[0])
        lines += _limited(f"layers with the lowest real/shuffled layer-GSNR ratio at step {step}", rows,
                          ["layer", "real GSNR", "shuffled GSNR", "real / shuffled"])
        self._finish("expect_control", [check], lines)


def _snapshot_at(traj: Any, step: Any) -> Any:
    snaps = list(getattr(traj, "snapshots", []) or [])
    if not snaps:
        return None
    if step is None:
        return snaps[-1]
    for s in snaps:
        if s.step == step:
            return s
    return min(snaps, key=lambda s: abs(s.step - step))


def _limited(title: str, rows: list[tuple[Any, list[str]]], head: list[str]) -> list[str]:
    if not rows:
        return [f"{title}: no per-layer values"]
    shown = rows[:MAX_LAYER_ROWS]
    more = len(rows) - len(shown)
    out = [f"{title}:"] + text_table(head, [r for _, r in shown])
    if more:
        out.append(f"  ... and {more} more layer(s)")
    return out


def _worst_layers_table(point: dict[str, Any], layer_min: dict[str, float]) -> list[str]:
    layers = point["layer_gsnr"]
    same = point["layer_same_sign"]

    def failing(name: str) -> bool:
        return name in layer_min and (layers.get(name) is None or layers[name] < layer_min[name])

    order = sorted(layers, key=lambda n: (not failing(n), -math.inf if layers[n] is None else layers[n]))
    rows = []
    for name in order:
        status = ("FAIL" if failing(name) else "ok") if name in layer_min else ""
        rows.append(
            (None, [name, fmt(layers[name]) if layers[name] is not None else "undefined", fmt(same.get(name)),
                    fmt(layer_min[name]) if name in layer_min else "-", status])
        )
    return _limited("worst layers (failing first, then lowest mean GSNR)", rows,
                    ["layer", "mean GSNR", "same-sign", "min GSNR", ""])


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
        for rec in self.records.values():
            if not rec.measurements and not rec.checks:
                continue
            h = rec.headline()
            n_ok = sum(c.passed for c in rec.checks)
            checks = f"{n_ok}/{len(rec.checks)}" if rec.checks else "-"
            outcome = rec.outcome or "?"
            rows.append([rec.nodeid, fmt(h["mean_gsnr"]), fmt(h["osgr"]), fmt(h["same_sign"]), fmt(h["control_ratio"]),
                         checks, "PASS" if outcome in ("passed", "xfailed") else outcome.upper() if outcome != "failed" else "FAIL"])
            marks.append({"green": outcome == "passed"} if outcome == "passed" else {"red": outcome in ("failed", "error")})
        if not rows:
            return []
        table = text_table(["test", "mean GSNR", "OSGR", "same-sign", "control ratio", "checks", "result"], rows, indent="",
                           left=(0, 6))
        out: list[tuple[str, dict[str, bool]]] = [(table[0], {"bold": True}), (table[1], {})]
        out += list(zip(table[2:], marks))
        return out

    # -- files ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Write ``--gsnr-save`` JSON and the ``--gsnr-report`` file (errors are reported, not raised)."""
        records = [r for r in self.records.values() if r.measurements]
        if self.save_dir is not None:
            try:
                self.save_json(records)
            except Exception as exc:  # noqa: BLE001 - a report problem must not hide the test results
                self.errors.append(f"--gsnr-save {self.save_dir}: {type(exc).__name__}: {exc}")
        if self.report_path is not None:
            try:
                self.write_report(records)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"--gsnr-report {self.report_path}: {type(exc).__name__}: {exc}")

    def save_json(self, records: list[TestRecord]) -> list[Path]:
        """One run JSON (``"kind": "gsnr-diag-run"``) per measurement, plus ``index.json`` for the session."""
        self.save_dir.mkdir(parents=True, exist_ok=True)
        index_tests = []
        paths = []
        for rec in records:
            files = []
            for i, m in enumerate(rec.measurements, 1):
                name = f"{_safe_name(rec.nodeid)}--{i}-{m.kind}.json"
                run = measurement_run(rec, m)
                path = self.save_dir / name
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(run, indent=1, allow_nan=False) + "\n", encoding="utf-8")
                os.replace(tmp, path)
                files.append(name)
                paths.append(path)
            index_tests.append(
                {"test": rec.nodeid, "outcome": rec.outcome, "checks": [c.to_dict() for c in rec.checks], "files": files}
            )
        index = {
            "schema_version": JSON_SCHEMA_VERSION,
            "kind": "gsnr-diag-pytest-session",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "tests": index_tests,
        }
        (self.save_dir / "index.json").write_text(json.dumps(index, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        self.written.append((f"{len(paths)} measurement JSON file(s) + index.json", self.save_dir))
        return paths

    def write_report(self, records: list[TestRecord]) -> Path:
        html_text = render_report_html(records, machine_info())
        path = self.report_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".pdf":
            try:
                from .report.render import render_pdf  # issue 4's renderer, when present
            except ImportError:
                render_pdf = None
            if render_pdf is not None:
                render_pdf(html_text, path)
            else:
                import weasyprint

                weasyprint.HTML(string=html_text).write_pdf(str(path))
        else:
            path.write_text(html_text, encoding="utf-8")
        self.written.append((f"report ({len(records)} test section(s))", path))
        return path


def _safe_name(nodeid: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")
    return s[-150:] or "test"


def machine_info() -> dict[str, Any]:
    import platform

    versions = {"python": platform.python_version()}
    for mod in ("torch", "opacus", "gsnr_diag", "pytest"):
        m = sys.modules.get(mod)
        versions[mod] = getattr(m, "__version__", None) if m is not None else None
    return {"platform": platform.platform(), "machine": platform.machine(), "versions": versions}


def measurement_run(rec: TestRecord, m: Measurement) -> dict[str, Any]:
    """A saved run (docs/CONTRACT.md "run JSON") for one measurement of one test."""
    kind = m.kind
    trajectory = control = final_stats = None
    if kind == "control":
        control, trajectory = m.result, m.result.real
    elif kind == "trajectory":
        trajectory = m.result
    elif kind == "snapshot":
        final_stats = m.result.to_dict() if hasattr(m.result, "to_dict") else m.result
    else:
        final_stats = m.result.aggregates() if hasattr(m.result, "aggregates") else m.result
    metadata = {
        "source": "pytest",
        "test": rec.nodeid,
        "measurement": kind,
        "label": m.label,
        "outcome": rec.outcome,
        "checks": [c.to_dict() for c in rec.checks],
        "machine": machine_info(),
    }
    try:
        from .report.run import new_run
    except ImportError:
        new_run = None
    if new_run is not None:
        return new_run(trajectory, control=control, final_stats=final_stats, metadata=metadata)
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "kind": "gsnr-diag-run",
        "trajectory": _plain(trajectory),
        "control": _plain(control),
        "osgr": None,
        "final_stats": _plain(final_stats),
        "metadata": _plain(metadata),
    }


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


# ---------------------------------------------------------------------------------------------
# the HTML report: view-model first, then templates/plugin_report.html.jinja2
# ---------------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def svg_lines(series: list[tuple[str, list[int], list[float | None]]], *, ylabel: str, width: int = 560, height: int = 220) -> str:
    """A small self-contained SVG line chart (log-scaled y when every value is positive)."""
    import html
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if _clean(y) is not None]
    if len(pts) < 1:
        return ""
    log = all(y > 0 for _, y in pts)
    f = (lambda y: math.log10(y)) if log else (lambda y: y)
    xs = [p[0] for p in pts]
    ys = [f(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    ml, mr, mt, mb = 62, 12, 10, 34
    pw, ph = width - ml - mr, height - mt - mb

    def px(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return mt + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(ylabel)} against step" font-family="sans-serif" font-size="11">',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        label = fmt(10 ** yv if log else yv, 3)
        parts.append(f'<text x="{ml - 4}" y="{py(yv) + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
        xv = x0 + frac * (x1 - x0)
        parts.append(f'<text x="{px(xv):.1f}" y="{height - mb + 14}" text-anchor="middle">{xv:.0f}</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">step</text>')
    parts.append(f'<text x="12" y="{mt + ph / 2:.1f}" text-anchor="middle" transform="rotate(-90 12 {mt + ph / 2:.1f})">'
                 f'{html.escape(ylabel)}{" (log)" if log else ""}</text>')
    for k, (name, sx, sy) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        seg = [f"{px(x):.1f},{py(f(y)):.1f}" for x, y in zip(sx, sy) if _clean(y) is not None]
        if seg:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{" ".join(seg)}"/>')
        parts.append(f'<text x="{ml + 8}" y="{mt + 14 + 13 * k}" fill="{color}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _measurement_view(m: Measurement) -> dict[str, Any]:
    kind = m.kind
    title = {"stats": "gradient statistics", "trajectory": "trajectory", "control": "shuffled-label control",
             "snapshot": "snapshot"}[kind]
    if m.label:
        title += f" — {m.label}"
    point = _last_point(m.result) or {}
    scalars = [
        ("mean GSNR", fmt(point.get("mean_gsnr"))),
        ("OSGR (eq. 19)", fmt(point.get("osgr"))),
        ("same-sign fraction", fmt(point.get("mean_same_sign"))),
    ]
    figure = ""
    if kind == "stats":
        scalars.insert(0, ("samples n", str(point.get("n"))))
        q = getattr(m.result, "gsnr_quantiles", None) or {}
        scalars += [("median GSNR", fmt(q.get("median"))), ("p90 GSNR", fmt(q.get("p90"))),
                    ("opposite-sign top-10% |W|", fmt(getattr(m.result, "opposite_sign_top10", None))),
                    ("measured in", f"{getattr(m.result, 'mode', '?')} mode")]
    elif kind == "trajectory":
        steps, vals = m.result.series("mean_gsnr") if m.result.snapshots else ([], [])
        scalars.insert(0, ("snapshots", f"{len(m.result.snapshots)} (steps {steps[0]}..{steps[-1]})" if steps else "0"))
        figure = svg_lines([("mean GSNR", steps, vals)], ylabel="mean GSNR")
    elif kind == "control":
        rs, rv = m.result.real.series("mean_gsnr")
        ss, sv = m.result.shuffled.series("mean_gsnr")
        scalars = [("peak ratio real/shuffled", fmt(getattr(m.result, "peak_ratio", None))),
                   ("final ratio real/shuffled", fmt(getattr(m.result, "final_ratio", None))),
                   ("label noise", fmt(getattr(m.result, "label_noise", None))),
                   ("verdict", str(getattr(m.result, "verdict", "") or "-"))] + [
                      (f"{k} (real labels, last)", v) for k, v in scalars]
        figure = svg_lines([("real labels", rs, rv), ("shuffled labels", ss, sv)], ylabel="mean GSNR")
    layers = [
        {"name": name, "gsnr": fmt(v), "same_sign": fmt((point.get("layer_same_sign") or {}).get(name))}
        for name, v in sorted((point.get("layer_gsnr") or {}).items(), key=lambda kv: -math.inf if kv[1] is None else kv[1])
    ]
    return {"kind": kind, "title": title, "scalars": scalars, "figure": figure, "layers": layers}


def report_view(records: list[TestRecord], machine: dict[str, Any]) -> dict[str, Any]:
    """The view-model of the plugin report: one section per test that measured something."""
    sections = []
    for rec in records:
        h = rec.headline()
        sections.append({
            "test": rec.nodeid,
            "anchor": _safe_name(rec.nodeid),
            "outcome": rec.outcome or "?",
            "passed": rec.outcome in ("passed", "xfailed"),
            "headline": [("mean GSNR", fmt(h["mean_gsnr"])), ("OSGR", fmt(h["osgr"])),
                         ("same-sign", fmt(h["same_sign"])), ("control ratio", fmt(h["control_ratio"]))],
            "checks": [{"passed": c.passed, "method": c.method, "quantity": c.quantity,
                        "measured": fmt(c.measured) if c.measured is not None else "undefined",
                        "threshold": c.threshold, "source": c.source} for c in rec.checks],
            "measurements": [_measurement_view(m) for m in rec.measurements],
        })
    return {
        "title": "gsnr-diag: GSNR checks of the test suite",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "sections": sections,
        "n_failed": sum(1 for s in sections if not s["passed"]),
    }


def render_report_html(records: list[TestRecord], machine: dict[str, Any]) -> str:
    import jinja2
    from markupsafe import Markup

    view = report_view(records, machine)
    for s in view["sections"]:
        for m in s["measurements"]:
            m["figure"] = Markup(m["figure"])  # generated here from numbers only; safe
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gsnr_diag.templates", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("plugin_report.html.jinja2").render(**view)
