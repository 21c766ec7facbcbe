"""The comparisons behind ``gsnr.expect``, ``gsnr.expect_rising`` and ``gsnr.expect_control``, and their messages.

Each function takes a measured result and resolved :class:`~gsnr_diag.plugin.thresholds.Threshold` s and
returns the :class:`~gsnr_diag.plugin.session.Check` s made and the lines of the failure message: every
threshold, where it came from, the measured value, and a table of the worst layers. Raising is left to
the fixture, so these stay plain functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._format import number, text_table
from .._io import clean_float
from .session import Check, kind_of, point_of
from .thresholds import Threshold, layer_thresholds, threshold_text

__all__ = ["MAX_LAYER_ROWS", "describe", "expect_checks", "expect_control_checks", "expect_rising_checks"]

MAX_LAYER_ROWS = 8

#: (threshold key, quantity shown, field of the scalar view, why it can be undefined)
SCALAR_CHECKS = (
    ("min_mean_gsnr", "mean GSNR", "mean_gsnr", "undefined: every element has zero variance"),
    ("min_same_sign", "same-sign fraction", "mean_same_sign", "not measured (signs=False?) or undefined"),
    ("min_osgr", "OSGR (eq. 19)", "osgr", "undefined: every mean gradient is zero"),
)


def _measured(x: Any) -> str:
    return number(x) if x is not None else "undefined"


def _low_first(value: float | None) -> float:
    return -math.inf if value is None else value


def describe(result: Any) -> tuple[str, dict[str, Any]]:
    """(what was checked, its scalar view) for ``gsnr.expect``."""
    kind = kind_of(result)
    if kind == "stats":
        if not (isinstance(result, Mapping) and "mean_gsnr" in result) and not hasattr(result, "mean_gsnr"):
            raise TypeError(
                "gsnr.expect: expected a GradientStats, Trajectory, Snapshot or ControlResult "
                f"(or an aggregates dict), got {type(result).__name__}"
            )
        point = point_of(result)
        n = point.get("n")
        return (f"GradientStats (n = {n} samples)" if n is not None else "gradient statistics"), point
    if kind == "snapshot":
        point = point_of(result)
        return f"Snapshot at step {point['step']}", point
    traj = result.real if kind == "control" else result
    snaps = list(traj.snapshots)
    if not snaps:
        raise ValueError(f"gsnr.expect: the {'control' if kind == 'control' else 'trajectory'} holds no snapshots")
    point = point_of(snaps[-1])
    prefix = "ControlResult, real labels" if kind == "control" else "Trajectory"
    return f"{prefix}, last snapshot (step {point['step']} of {len(snaps)} recorded)", point


def _limited(title: str, rows: list[list[str]], head: list[str]) -> list[str]:
    if not rows:
        return [f"{title}: no per-layer values"]
    shown = rows[:MAX_LAYER_ROWS]
    out = [f"{title}:"] + text_table(head, shown)
    if len(rows) > len(shown):
        out.append(f"  ... and {len(rows) - len(shown)} more layer(s)")
    return out


def _worst_layers_table(point: dict[str, Any], layer_min: dict[str, float]) -> list[str]:
    layers = point["layer_gsnr"]
    same = point["layer_same_sign"]

    def failing(name: str) -> bool:
        return name in layer_min and (layers.get(name) is None or layers[name] < layer_min[name])

    rows = []
    for name in sorted(layers, key=lambda n: (not failing(n), _low_first(layers[n]))):
        status = ("FAIL" if failing(name) else "ok") if name in layer_min else ""
        minimum = number(layer_min[name]) if name in layer_min else "-"
        rows.append([name, _measured(layers[name]), number(same.get(name)), minimum, status])
    head = ["layer", "mean GSNR", "same-sign", "min GSNR", ""]
    return _limited("worst layers (failing first, then lowest mean GSNR)", rows, head)


def _layer_check(point: dict[str, Any], t: Threshold) -> tuple[Check, dict[str, float]]:
    layers = point["layer_gsnr"]
    layer_min, unmatched = layer_thresholds(t.value, list(layers))
    if unmatched:
        raise ValueError(
            f"gsnr.expect: min_layer_gsnr glob(s) {unmatched} match no parameter; parameters are {list(layers)}"
        )
    failing = [n for n, m in layer_min.items() if layers.get(n) is None or layers[n] < m]
    worst = min(layer_min, key=lambda n: -math.inf if layers.get(n) is None else layers[n] / max(layer_min[n], 1e-300))
    below = f"{len(failing)} of {len(layer_min)} below" if failing else f"all {len(layer_min)} ok"
    quantity = f"layer GSNR, worst: {worst} ({below})"
    text = threshold_text("min_layer_gsnr", t.value)
    return Check("expect", quantity, text, layers.get(worst), t.source, not failing, t.value), layer_min


def expect_checks(what: str, point: dict[str, Any], resolved: dict[str, Threshold]) -> tuple[list[Check], list[str]]:
    """``gsnr.expect``: lower bounds on mean GSNR, same-sign fraction, OSGR (eq. 19) and per-layer GSNR.

    ``what`` and ``point`` are :func:`describe` of the result checked.
    """
    checks: list[Check] = []
    notes: dict[str, str] = {}
    for key, quantity, field_, why_none in SCALAR_CHECKS:
        t = resolved.get(key)
        if t is None:
            continue
        measured = point[field_]
        ok = measured is not None and measured >= t.value
        checks.append(Check("expect", quantity, threshold_text(key, t.value), measured, t.source, ok, t.value))
        if measured is None:
            notes[quantity] = why_none
    layer_min: dict[str, float] = {}
    if resolved.get("min_layer_gsnr") is not None:
        check, layer_min = _layer_check(point, resolved["min_layer_gsnr"])
        checks.append(check)

    failed = [c for c in checks if not c.passed]
    lines = [f"gsnr.expect: {len(failed)} of {len(checks)} threshold(s) not met by the {what}", ""]
    rows = [["ok" if c.passed else "FAIL", c.quantity, _measured(c.measured), c.threshold, c.source] for c in checks]
    head = ["", "quantity", "measured", "threshold (measured must be >=)", "set by"]
    lines += text_table(head, rows, left=(0, 1, 3, 4))
    lines += [f"  ({quantity}: {why})" for quantity, why in notes.items()]
    lines.append("")
    lines += _worst_layers_table(point, layer_min)
    return checks, lines


def expect_rising_checks(trajectory: Any, t: Threshold) -> tuple[list[Check], list[str]]:
    """``gsnr.expect_rising``: peak mean GSNR ≥ factor × its value at the first recorded step (Fig. 5)."""
    traj = trajectory.real if kind_of(trajectory) == "control" else trajectory
    if kind_of(traj) != "trajectory":
        raise TypeError(f"gsnr.expect_rising: expected a Trajectory or ControlResult, got {type(trajectory).__name__}")
    snaps = list(traj.snapshots)
    if len(snaps) < 2:
        raise ValueError(f"gsnr.expect_rising: the trajectory holds {len(snaps)} snapshot(s); a rise needs at least 2")
    first = snaps[0]
    v0 = clean_float(first.mean_gsnr)
    defined = [(s.step, clean_float(s.mean_gsnr)) for s in snaps if clean_float(s.mean_gsnr) is not None]
    peak_step, peak = max(defined, key=lambda sv: sv[1]) if defined else (None, None)
    ratio = peak / v0 if (peak is not None and v0) else None
    ok = v0 is not None and peak is not None and peak >= t.value * v0
    text = threshold_text("factor", t.value)
    check = Check("expect_rising", "peak / first mean GSNR", text, ratio, t.source, ok, t.value)
    required = number(t.value * v0) if v0 is not None else "undefined"
    lines = [
        f"gsnr.expect_rising: {'ok' if ok else 'FAIL'}: peak mean GSNR {number(peak)} (step {peak_step}) is "
        f"{number(ratio)}x its value at step {first.step} ({number(v0)})",
        f"  required: peak >= factor x step-{first.step} value = {number(t.value)} x {number(v0)} = "
        f"{required}   (factor set by {t.source})",
        f"  trajectory: {len(snaps)} snapshots, steps {snaps[0].step}..{snaps[-1].step}",
        "",
    ]
    rows = []
    for name in traj.layers():
        l0 = clean_float(first.layer_gsnr.get(name))
        vals = [(s.step, clean_float(s.layer_gsnr.get(name))) for s in snaps]
        vals = [(step, v) for step, v in vals if v is not None]
        ps, pv = max(vals, key=lambda sv: sv[1]) if vals else (None, None)
        r = pv / l0 if (pv is not None and l0) else None
        rows.append((r, [name, number(l0), number(pv), str(ps) if ps is not None else "-", number(r)]))
    rows.sort(key=lambda rr: _low_first(rr[0]))
    head = ["layer", f"GSNR at step {first.step}", "peak GSNR", "at step", "peak / first"]
    lines += _limited(
        "layers with the smallest rise (peak / first layer GSNR, smallest first)", [r for _, r in rows], head
    )
    return [check], lines


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


def _control_step(control: Any, at: str) -> Any:
    """The step of the ratio checked: the last defined one, or (``at="peak"``) the largest after step 0."""
    ratios = [clean_float(r) for r in (getattr(control, "ratio", None) or [])]
    steps = list(getattr(control, "steps", None) or [])
    defined = [(i, r) for i, r in enumerate(ratios) if r is not None]
    if not defined:
        return None
    if at == "peak":  # as ControlResult.peak_ratio
        later = [(i, r) for i, r in defined if i >= len(steps) or steps[i] > 0] or defined
        idx = max(later, key=lambda ir: ir[1])[0]
    else:
        idx = defined[-1][0]
    return steps[idx] if idx < len(steps) else None


def expect_control_checks(control: Any, t: Threshold, at: str) -> tuple[list[Check], list[str]]:
    """``gsnr.expect_control``: real/shuffled mean-GSNR ratio (final or peak) ≥ ``min_ratio`` (Sec. 3.1)."""
    if kind_of(control) != "control":
        raise TypeError(f"gsnr.expect_control: expected a ControlResult, got {type(control).__name__}")
    measured = clean_float(getattr(control, f"{at}_ratio", None))
    step = _control_step(control, at)
    ok = measured is not None and measured >= t.value
    text = threshold_text("min_ratio", t.value)
    check = Check("expect_control", f"control ratio ({at})", text, measured, t.source, ok, t.value)
    real = _snapshot_at(control.real, step)
    shuf = _snapshot_at(control.shuffled, step)
    where = "at its peak" if at == "peak" else "at the last snapshot"
    lines = [
        f"gsnr.expect_control: {'ok' if ok else 'FAIL'}: real/shuffled mean-GSNR ratio {where} (step {step}) is "
        f"{_measured(measured)}; required >= min_ratio = {number(t.value)}   (set by {t.source})",
        f"  mean GSNR at step {step}: real labels {number(real.mean_gsnr if real else None)}, "
        f"shuffled labels {number(shuf.mean_gsnr if shuf else None)}; "
        f"label_noise = {number(getattr(control, 'label_noise', None))}",
    ]
    verdict = getattr(control, "verdict", None)
    if verdict:
        lines.append(f"  verdict: {verdict}")
    lines.append("")
    rows = []
    if real is not None and shuf is not None:
        for name in real.layer_gsnr:
            a, b = clean_float(real.layer_gsnr.get(name)), clean_float(shuf.layer_gsnr.get(name))
            r = a / b if (a is not None and b) else None
            rows.append((r, [name, number(a), number(b), number(r)]))
    rows.sort(key=lambda rr: _low_first(rr[0]))
    title = f"layers with the lowest real/shuffled layer-GSNR ratio at step {step}"
    lines += _limited(title, [r for _, r in rows], ["layer", "real GSNR", "shuffled GSNR", "real / shuffled"])
    return [check], lines
