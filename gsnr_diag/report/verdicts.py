"""The verdict panel: numbers from a run dict, graded against the one threshold table.

:func:`verdict_values` (also read by ``gsnr-diag check``), :func:`metrics` (the panel's rows) and
:func:`headline`. Every status comes from :func:`gsnr_diag._thresholds.grade` on
``VERDICT_THRESHOLDS``, the table the control and the pytest plugin read too; the report states
the thresholds verbatim. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._format import integer, number, percent
from .._io import clean_float
from .._thresholds import VERDICT_THRESHOLDS, grade
from .run import run_metadata, snapshot_series, snapshots

__all__ = [
    "MISSING",
    "PAPER",
    "THRESHOLDS",
    "Metric",
    "fmt",
    "fmt_int",
    "fmt_pct",
    "headline",
    "metrics",
    "verdict_values",
]

PAPER = "Liu et al., ICLR 2020"

#: The report's threshold table: the one of :mod:`gsnr_diag._thresholds` (the same object).
THRESHOLDS = VERDICT_THRESHOLDS

#: What the report shows for a value that is absent or not a finite number.
MISSING = "–"


def fmt(x: Any, digits: int = 3) -> str:
    """A number as the report prints it: :func:`gsnr_diag._format.number` with 3 significant digits."""
    return number(x, digits, MISSING)


def fmt_pct(x: Any) -> str:
    return percent(x, MISSING)


def fmt_int(x: Any) -> str:
    return integer(x, MISSING)


@dataclass
class Metric:
    """One row of the verdict panel."""

    key: str
    label: str
    value: float | None
    display: str
    status: str  # "good" | "watch" | "bad" | "n/a"
    threshold: str
    detail: str = ""


def verdict_values(run: dict[str, Any]) -> dict[str, float | None]:
    """The verdict panel's numbers from a run (also used by ``gsnr-diag check``)."""
    snaps = snapshots(run.get("trajectory"))
    control = run.get("control") or None
    steps, gsnr = snapshot_series(snaps, "mean_gsnr")
    first = gsnr[0] if gsnr else None
    defined = [(s, g) for s, g in zip(steps, gsnr) if g is not None]
    final = defined[-1][1] if defined else None
    peak_step, peak = max(defined, key=lambda t: t[1]) if defined else (None, None)
    last = snaps[-1] if snaps else {}
    gap = clean_float(last.get("generalization_gap"))
    meta = run_metadata(run)
    n_train = clean_float(meta.get("n_train"))
    control_ratio = None
    control_peak = None
    if control:
        control_ratio = clean_float(control.get("final_ratio"))
        control_peak = clean_float(control.get("peak_ratio"))
    # eq. 19 over the whole run: each interval's training-loss decrease weighted by the OSGR
    # predicted at its start, Σ R_t ΔL_t / Σ ΔL_t; and its measured counterpart (eq. 23 over
    # the run), the test-loss decrease divided by the training-loss decrease.
    num = den = 0.0
    for a, b in zip(snaps, snaps[1:]):
        r, l0, l1 = clean_float(a.get("osgr")), clean_float(a.get("train_loss")), clean_float(b.get("train_loss"))
        if r is None or l0 is None or l1 is None:
            continue
        num += r * (l0 - l1)
        den += l0 - l1
    osgr_run = num / den if den > 0 else None
    realized = None
    tr = [(clean_float(s.get("train_loss")), clean_float(s.get("test_loss"))) for s in snaps]
    tr = [(a, b) for a, b in tr if a is not None and b is not None]
    if len(tr) >= 2 and tr[0][0] - tr[-1][0] > 0:
        realized = (tr[0][1] - tr[-1][1]) / (tr[0][0] - tr[-1][0])
    return {
        "initial_mean_gsnr": first,
        "final_mean_gsnr": final,
        "peak_mean_gsnr": peak,
        "peak_step": float(peak_step) if peak_step is not None else None,
        "peak_rise": (peak / first) if (peak is not None and first) else None,
        "final_gsnr_n": (final * n_train) if (final is not None and n_train) else None,
        "n_train": n_train,
        "control_ratio": control_ratio,
        "control_peak_ratio": control_peak,
        "osgr": osgr_run,
        "osgr_final": clean_float(last.get("osgr")),
        "generalization_gap": gap,
        "realized_ratio": realized,
        "same_sign": clean_float(last.get("mean_same_sign")),
        "noise_scale": clean_float(last.get("noise_scale")),
        "m_coherence": clean_float(last.get("m_coherence")),
    }


def metrics(run: dict[str, Any], v: dict[str, float | None]) -> list[Metric]:
    """The verdict panel's rows: value, display, status against the stated thresholds, and detail."""
    t = THRESHOLDS
    step0 = fmt(v["initial_mean_gsnr"])
    out = [
        Metric(
            "peak_mean_gsnr",
            "Peak mean GSNR",
            v["peak_mean_gsnr"],
            f"{fmt(v['peak_mean_gsnr'])} at step {fmt_int(v['peak_step'])}",
            grade("peak_rise", v["peak_rise"]),
            f"peak ÷ step-0 value ({step0}): good ≥ {t['peak_rise'][0]:g}×, watch ≥ {t['peak_rise'][1]:g}×, else bad",
            f"{fmt(v['peak_rise'])}× the value at initialization. Real labels make GSNR rise early in training "
            f"({PAPER}, Sec. 3.1, Fig. 5a).",
        ),
        Metric(
            "final_mean_gsnr",
            "Final mean GSNR",
            v["final_mean_gsnr"],
            fmt(v["final_mean_gsnr"]),
            grade("final_gsnr_n", v["final_gsnr_n"]),
            f"final GSNR × n (n = {fmt_int(v['n_train'])} training samples): good ≥ {t['final_gsnr_n'][0]:g}, "
            f"watch ≥ {t['final_gsnr_n'][1]:g}, else bad",
            f"{fmt(v['final_mean_gsnr'])} × {fmt_int(v['n_train'])} = {fmt(v['final_gsnr_n'])}. A gradient step "
            "generalizes when GSNR is large against 1/n "
            "(eq. 22); GSNR falls near the end of training as the training loss approaches zero.",
        ),
        Metric(
            "control_ratio",
            "Control ratio real ÷ shuffled",
            v["control_ratio"],
            fmt(v["control_ratio"]) if v["control_ratio"] is not None else "not run",
            grade("control_ratio", v["control_ratio"]),
            f"final mean GSNR real ÷ shuffled labels: good ≥ {t['control_ratio'][0]:g}, "
            f"watch ≥ {t['control_ratio'][1]:g}, else bad",
            (
                f"Peak ratio {fmt(v['control_peak_ratio'])}. Only real labels show the early rise of GSNR "
                "(Sec. 3.1, Fig. 5a)."
                if v["control_ratio"] is not None
                else "The shuffled-label control was not run (regression task, or --no-control)."
            ),
        ),
        Metric(
            "osgr",
            "One-step generalization ratio (OSGR), over training",
            v["osgr"],
            fmt(v["osgr"]),
            grade("osgr", v["osgr"]),
            f"Σ R·ΔL ÷ Σ ΔL over the snapshots, R the single-set eq. 19: good ≥ {t['osgr'][0]:g}, "
            f"watch ≥ {t['osgr'][1]:g}, else bad",
            "The predicted share of the training-loss decrease that also lowers the test loss (1 = all of it, "
            f"0 = none). At the last snapshot R = {fmt(v['osgr_final'])}.",
        ),
        Metric(
            "generalization_gap",
            "Measured generalization gap",
            v["generalization_gap"],
            fmt(v["generalization_gap"]) if v["generalization_gap"] is not None else "no test set",
            grade("realized_ratio", v["realized_ratio"]) if v["generalization_gap"] is not None else "n/a",
            f"test − train loss at the end; status from the test-loss decrease ÷ train-loss decrease over the run "
            f"(the measured OSGR, eq. 23): good ≥ {t['realized_ratio'][0]:g}, watch ≥ {t['realized_ratio'][1]:g}, "
            "else bad",
            (
                f"Over the run the test loss fell {fmt(v['realized_ratio'])}× as much as the training loss: what "
                "actually happened on held-out data, to compare with the OSGR predicted from GSNR above."
                if v["realized_ratio"] is not None
                else "What actually happened on held-out data."
            ),
        ),
        Metric(
            "same_sign",
            "Mean same-sign fraction",
            v["same_sign"],
            fmt(v["same_sign"]),
            grade("same_sign", v["same_sign"]),
            f"at the last snapshot: good ≥ {t['same_sign'][0]:g}, watch ≥ {t['same_sign'][1]:g}, else bad "
            "(0.50 = samples disagree at random)",
            "Rises from about 0.50 to about 0.56 on real MNIST labels in the paper (Fig. 5c).",
        ),
        _noise_metric(v),
    ]
    return out


def _noise_metric(v: dict[str, float | None]) -> Metric:
    """Informational row (never graded): B_simple, 1 − B_simple/n beside the OSGR, and m-coherence."""
    b, n = v.get("noise_scale"), v.get("n_train")
    one_minus = (1 - b / n) if (b is not None and n) else None
    return Metric(
        "noise_scale",
        "Gradient noise scale B_simple and m-coherence",
        b,
        f"B = {fmt(b)}, m-coherence {fmt(v.get('m_coherence'))}",
        "n/a",
        "at the last snapshot; not graded (no threshold): B_simple = Σρ²/Σḡ² (McCandlish et al. 2018)",
        f"1 − B/n = {fmt(one_minus)} beside the single-set OSGR (eq. 19) R = {fmt(v.get('osgr_final'))}: on the "
        "same samples they are the same number. m-coherence (Chatterjee & Zielinski 2020) counts how many of the n "
        "samples one sample's gradient step helps on average (1 = unrelated, n = identical).",
    )


def headline(metrics: list[Metric]) -> tuple[str, str, str]:
    """(headline, status, detail) of the verdict panel from its rows."""
    counted = [m for m in metrics if m.status != "n/a"]
    good = sum(m.status == "good" for m in counted)
    bad = sum(m.status == "bad" for m in counted)
    watch = sum(m.status == "watch" for m in counted)
    detail = f"{good} good, {watch} watch, {bad} bad of {len(counted)} indicators measured"
    control = next((m for m in metrics if m.key == "control_ratio"), None)
    if not counted:
        return "Not enough data for a verdict", "n/a", detail
    if bad >= 2 or (control is not None and control.status == "bad"):
        return "Little evidence of generalizable features: signs of memorization", "bad", detail
    if good >= max(1, (len(counted) + 1) // 2) and bad == 0:
        return "Learning features that generalize", "good", detail
    return "Mixed evidence: partly generalizable features", "watch", detail
