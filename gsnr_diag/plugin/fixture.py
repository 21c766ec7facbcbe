"""The ``gsnr`` fixture's object and the plugin's files, imported only once a test uses them.

* :class:`GsnrFixture` — ``stats``/``track``/``control`` measure and record; ``expect``,
  ``expect_rising`` and ``expect_control`` check thresholds (an explicit argument, else
  ``@pytest.mark.gsnr``, else the ``gsnr_*`` ini option) and raise
  :class:`~gsnr_diag.errors.ThresholdError` (an ``AssertionError``) whose message shows every
  threshold, where it came from, the measured value and a table of the worst layers;
* :func:`save_json` (``--gsnr-save``: one run JSON per measurement + ``index.json``) and
  :func:`write_report` (``--gsnr-report``: HTML from ``templates/plugin_report.html.jinja2``,
  or PDF by suffix), called by :meth:`gsnr_diag.pytest_support.GsnrSession.finish`.

Split from :mod:`gsnr_diag.pytest_support` (imported by every pytest run) to keep pytest's
start-up cheap; torch, jinja2 and weasyprint are still imported inside functions.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from .session import (
    JSON_SCHEMA_VERSION,
    SPECS,
    SRC_CALL,
    Check,
    GsnrSession,
    Measurement,
    TestRecord,
    Threshold,
    _check_value,
    _clean,
    _last_point,
    _plain,
    _point_of,
    fmt,
    kind_of,
    resolve_defaults,
    text_table,
)

__all__ = ["GsnrFixture", "save_json", "write_report", "measurement_run", "render_report_html", "report_view"]

MAX_LAYER_ROWS = 8


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

    def __repr__(self) -> str:
        defaults = ", ".join(f"{k}={_plain(t.value)!r} ({t.source})" for k, t in self.defaults.items())
        return f"<gsnr fixture of {self._nodeid}; default thresholds: {defaults or 'none'}>"

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
        from ..measure import gradient_stats

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
        monitor_batch_size: int | None = None,
        signs: bool = True,
        task: str | None = None,
        mode: str = "eval",
        seed: int = 0,
        label: str | None = None,
        **train_kw: Any,
    ) -> Any:
        """Train ``build_model()`` for ``epochs`` with a :class:`~gsnr_diag.monitor.Monitor`; the Trajectory.

        ``build_model`` is a callable returning a fresh model (called with torch's RNG seeded by
        ``seed``, so the initialization is reproducible and the test's RNG is left alone) or a
        model. ``every``, ``test_data``, ``signs``, ``task``, ``mode`` and ``monitor_batch_size``
        (the measurement chunk) go to the Monitor; the rest (``lr`` — required —, ``batch_size``,
        ``optimizer``, ``progress``) to :func:`gsnr_diag.training.train`, with ``seed`` also
        seeding its batch order. The same keywords as :meth:`control`.
        """
        from ..dynamics.monitor import Monitor
        from ..dynamics.training import train

        model = self._build(build_model, seed)
        monitor = Monitor(
            model, data, loss_fn, test_data=test_data, every=every, batch_size=monitor_batch_size, signs=signs,
            task=task, mode=mode,
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
        from ..experiments.control import shuffled_label_control

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
            from ..errors import ThresholdError

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
            checks.append(Check("expect", quantity, _threshold_text(key, t.value), measured, t.source, ok, t.value))
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
            below = f"{len(failing)} of {len(layer_min)} below" if failing else f"all {len(layer_min)} ok"
            checks.append(
                Check(
                    "expect",
                    f"layer GSNR, worst: {worst} ({below})",
                    _threshold_text("min_layer_gsnr", t.value),
                    layers.get(worst),
                    t.source,
                    not failing,
                    t.value,
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
        check = Check("expect_rising", "peak / first mean GSNR", _threshold_text("factor", t.value), ratio, t.source, ok, t.value)
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

    def expect_control(self, control: Any, *, min_ratio: float | None = None, at: str = "final") -> None:
        """Assert that real labels beat shuffled ones: mean-GSNR ratio real/shuffled ≥ ``min_ratio``.

        ``at="final"`` (default, as ``gsnr-diag check --min-control-ratio`` and the report's verdict panel)
        checks the control's ``final_ratio``, ``at="peak"`` its ``peak_ratio`` (largest after step 0).
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
            if at == "peak":  # as ControlResult.peak_ratio: the largest ratio after step 0
                later = [(i, r) for i, r in defined if i >= len(steps) or steps[i] > 0] or defined
                idx = max(later, key=lambda ir: ir[1])[0]
            else:
                idx = defined[-1][0]
        step = steps[idx] if (idx is not None and idx < len(steps)) else None
        ok = measured is not None and measured >= t.value
        check = Check("expect_control", f"control ratio ({at})", _threshold_text("min_ratio", t.value), measured, t.source, ok, t.value)
        real = _snapshot_at(control.real, step)
        shuf = _snapshot_at(control.shuffled, step)
        lines = [
            f"gsnr.expect_control: {'ok' if ok else 'FAIL'}: real/shuffled mean-GSNR ratio "
            f"{'at its peak' if at == 'peak' else 'at the last snapshot'} (step {step}) is {fmt(measured) if measured is not None else 'undefined'}; "
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


def save_json(session: GsnrSession, records: list[TestRecord]) -> list[Path]:
    """One run JSON (``"kind": "gsnr-diag-run"``) per measurement, plus ``index.json`` for the session."""
    session.save_dir.mkdir(parents=True, exist_ok=True)
    index_tests = []
    paths = []
    for rec in records:
        files = []
        for i, m in enumerate(rec.measurements, 1):
            name = f"{_safe_name(rec.nodeid)}--{i}-{m.kind}.json"
            run = measurement_run(rec, m)
            path = session.save_dir / name
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
    (session.save_dir / "index.json").write_text(json.dumps(index, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    session.written.append((f"{len(paths)} measurement JSON file(s) + index.json", session.save_dir))
    return paths

def write_report(session: GsnrSession, records: list[TestRecord]) -> Path:
    html_text = render_report_html(records, machine_info())
    path = session.report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".pdf":
        try:
            from ..report.render import render_pdf
        except ImportError:
            render_pdf = None
        if render_pdf is not None:
            render_pdf(html_text, path)
        else:
            import weasyprint

            weasyprint.HTML(string=html_text).write_pdf(str(path))
    else:
        path.write_text(html_text, encoding="utf-8")
    session.written.append((f"report ({len(records)} test section(s))", path))
    return path



def _safe_name(nodeid: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")
    return s[-150:] or "test"


def machine_info() -> dict[str, Any]:
    import platform

    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist, mod in (("torch", "torch"), ("opacus", "opacus"), ("gsnr-diag", "gsnr_diag"), ("pytest", "pytest")):
        m = sys.modules.get(mod)
        version = getattr(m, "__version__", None) if m is not None else None
        if version is None:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = None
        versions[mod] = str(version) if version is not None else None
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
        from ..report.run import new_run
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
    ml, mr, mt, mb = 62, 12, 22, 34
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
        parts.append(f'<text x="{ml + 130 * k}" y="{mt - 8}" fill="{color}">\u2014 {html.escape(name)}</text>')
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
