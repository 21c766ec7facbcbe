"""Run-level evidence for the verdict, each value with its 95% interval (pure Python, torch-free).

* :func:`osgr_evidence` — the integrated OSGR Σ R̄·ΔL / Σ ΔL (eq. 19 over the run) and the test
  loss it predicts from training data alone (:mod:`gsnr_diag.dynamics.generalization`);
* :func:`control_evidence` — the separation of real from shuffled labels over the phase in which
  the training loss falls (Sec. 3.1, Fig. 5a): the geometric mean of the mean-GSNR ratio
  real ÷ shuffled over the snapshots after step 0 up to the one where the real-label training
  loss has made 90% of its decrease; the interval is the normal-theory one of the mean log ratio;
* :func:`early_rise_evidence` — the early rise of mean GSNR, robust to the schedule: the mean of
  log(r_t / r_0) over the first half of the training-loss decrease, integrated with the trapezoid
  rule along that decrease (so it does not hinge on whether a snapshot hit the peak), as a factor;
  its interval is the range of the delete-one-snapshot values (how much it rests on any one snapshot).

Nothing here reads the test set: the measured generalization is computed only to be shown beside
the prediction, never graded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .._io import clean_float
from ..dynamics.generalization import Z_95, integrated_osgr, measured_ratio, predict_test_loss
from .run import run_metadata, snapshots

__all__ = ["Evidence", "osgr_evidence", "control_evidence", "early_rise_evidence", "falling_phase_end"]

#: The control is read while the training loss falls: up to 90% of its decrease.
CONTROL_PHASE = 0.9
#: The early rise is read over the first half of the training-loss decrease.
EARLY_PHASE = 0.5


@dataclass
class Evidence:
    """One run-level quantity: value, 95% interval (or ``None``), and why it is missing when it is."""

    value: float | None
    interval: tuple[float, float] | None = None
    missing: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _losses(snaps: list[dict[str, Any]], key: str = "train_loss") -> list[float | None]:
    return [clean_float(s.get(key)) for s in snaps]


def falling_phase_end(train_loss: list[float | None], fraction: float) -> int | None:
    """Index of the first snapshot where the training loss has made ``fraction`` of its total decrease."""
    defined = [(i, v) for i, v in enumerate(train_loss) if v is not None]
    if len(defined) < 2:
        return None
    l0 = defined[0][1]
    low = min(v for _, v in defined)
    if l0 - low <= 0:
        return None
    for i, v in defined:
        if l0 - v >= fraction * (l0 - low):
            return i
    return defined[-1][0]


def osgr_evidence(run: dict[str, Any]) -> Evidence:
    """Integrated OSGR with its band, and the predicted test loss and gap at the last snapshot."""
    snaps = snapshots(run.get("trajectory"))
    if not snaps:
        return Evidence(None, missing="no snapshot yet")
    L = _losses(snaps)
    R = [clean_float(s.get("osgr")) for s in snaps]
    S = [clean_float(s.get("osgr_se")) for s in snaps]
    ratio = integrated_osgr(L, R, S)
    preds = predict_test_loss(L, R, S)
    last = next((p for p in reversed(preds) if p is not None), None)
    details: dict[str, Any] = {
        "predicted_test_loss": last.value if last else None,
        "predicted_band": (last.low, last.high) if last else None,
        "predicted_gap": last.gap if last else None,
        "train_loss_start": L[0],
        "train_loss_end": next((v for v in reversed(L) if v is not None), None),
        "has_se": any(s is not None for s in S),
        "measured_ratio": measured_ratio(L, _losses(snaps, "test_loss")),
        "left_rule": integrated_osgr(L, R, S, rule="left").value,
        "halfwidth_sampling": last.halfwidth_sampling / last.decrease if last and last.decrease > 0 else None,
        "halfwidth_discretization": last.halfwidth_discretization / last.decrease
        if last and last.decrease > 0
        else None,
    }
    if ratio.value is None:
        missing = "the training loss has not fallen yet" if len(snaps) >= 2 else "only one snapshot"
        return Evidence(None, missing=missing, details=details)
    return Evidence(ratio.value, (ratio.low, ratio.high), details=details)


def _gsnr_by_step(snaps: list[dict[str, Any]]) -> dict[int, float]:
    out = {}
    for s in snaps:
        g = clean_float(s.get("mean_gsnr"))
        if g is not None and g > 0:
            out[int(s.get("step", 0))] = g
    return out


def control_evidence(run: dict[str, Any]) -> Evidence:
    """Geometric-mean real ÷ shuffled mean-GSNR ratio over the falling phase of the real training loss."""
    control = run.get("control") or None
    meta = run_metadata(run)
    if not control:
        planned = str((meta.get("settings") or {}).get("control") or "off") != "off"
        if planned and meta.get("task") == "classification" and (meta.get("partial") or meta.get("stopped")):
            return Evidence(None, missing="interrupted")
        return Evidence(None, missing="not run")
    real = snapshots(control.get("real")) or snapshots(run.get("trajectory"))
    shuffled = snapshots(control.get("shuffled"))
    if not shuffled:
        return Evidence(None, missing="interrupted before its first snapshot")
    end = falling_phase_end(_losses(real), CONTROL_PHASE)
    end_step = int(real[end].get("step", 0)) if end is not None else int(real[-1].get("step", 0))
    a, b = _gsnr_by_step(real), _gsnr_by_step(shuffled)
    steps = sorted(s for s in a if s in b and 0 < s <= end_step)
    if not steps:
        steps = sorted(s for s in a if s in b and s > 0)[:1]
    details = {"phase_end_step": end_step, "snapshots": len(steps), "shuffled_snapshots": len(shuffled)}
    if not steps:
        return Evidence(None, missing="no shared snapshot after step 0", details=details)
    logs = [math.log(a[s] / b[s]) for s in steps]
    m = sum(logs) / len(logs)
    interval = None
    if len(logs) >= 2:
        sd = math.sqrt(sum((x - m) ** 2 for x in logs) / (len(logs) - 1))
        half = Z_95 * sd / math.sqrt(len(logs))
        interval = (math.exp(m - half), math.exp(m + half))
    return Evidence(math.exp(m), interval, details=details)


def _early_mean(u: list[float], logs: list[float], limit: float) -> float | None:
    """Trapezoid mean of ``logs`` over u ∈ [0, limit] (u increasing along the snapshots); None if unresolved."""
    area = width = 0.0
    for i in range(len(u) - 1):
        u0, u1, y0, y1 = u[i], u[i + 1], logs[i], logs[i + 1]
        if u0 >= limit:
            break
        if u1 <= u0:
            continue
        if u1 > limit:  # clip the interval at the phase's end, interpolating linearly
            y1 = y0 + (y1 - y0) * (limit - u0) / (u1 - u0)
            u1 = limit
        area += (u1 - u0) * (y0 + y1) / 2
        width += u1 - u0
    return area / width if width > 0 else None


def early_rise_evidence(run: dict[str, Any]) -> Evidence:
    """exp(mean log(r_t / r_0)) over the first half of the training-loss decrease, with a leave-one-out range."""
    snaps = snapshots(run.get("trajectory"))
    pts = [(clean_float(s.get("train_loss")), clean_float(s.get("mean_gsnr"))) for s in snaps]
    pts = [(loss, g) for loss, g in pts if loss is not None and g is not None and g > 0]
    if len(pts) < 2:
        return Evidence(None, missing="fewer than two snapshots with a training loss and a mean GSNR")
    l0, g0 = pts[0]
    total = l0 - min(loss for loss, _ in pts)
    if total <= 0:
        return Evidence(None, missing="the training loss has not fallen yet")
    # u: share of the total decrease made so far, kept monotone (a loss that bounces back does not undo progress)
    u, logs, best = [], [], 0.0
    for loss, g in pts:
        best = max(best, (l0 - loss) / total)
        u.append(best)
        logs.append(math.log(g / g0))
    resolved = sum(1 for x in u[1:] if x < EARLY_PHASE)
    details = {"snapshots_in_phase": resolved, "initial_mean_gsnr": g0}
    if resolved == 0:
        return Evidence(None, missing="the schedule has no snapshot in the early phase", details=details)
    value = _early_mean(u, logs, EARLY_PHASE)
    if value is None:
        return Evidence(None, missing="the early phase is not resolved", details=details)
    loo = []
    for k in range(1, len(u)):
        if u[k] >= EARLY_PHASE and (k > 1 and u[k - 1] >= EARLY_PHASE):
            break
        v = _early_mean(u[:k] + u[k + 1 :], logs[:k] + logs[k + 1 :], EARLY_PHASE)
        if v is not None:
            loo.append(v)
    interval = (math.exp(min(loo + [value])), math.exp(max(loo + [value]))) if loo else None
    return Evidence(math.exp(value), interval, details=details)
