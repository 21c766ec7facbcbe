"""The verdict: run-level evidence graded against the one threshold table, with its uncertainty.

Three indicators are graded (:mod:`.evidence`): the integrated OSGR Σ R̄·ΔL / Σ ΔL (eq. 19 over the
run), the real-vs-shuffled separation while the training loss falls (Sec. 3.1) and the early rise
of mean GSNR. Each carries a 95% interval; where the interval straddles a threshold the indicator
is ``"inconclusive"``, never graded on a difference smaller than its uncertainty. The final GSNR,
same-sign fraction, control ratio at the end and the measured test loss are *described* (shown,
not graded): final GSNR collapses once the training set is fitted, whatever the model learned.

The level: ``"bad"`` if the integrated OSGR or the control is bad; else ``"inconclusive"`` if one of
them is; else the lower of the two (the integrated OSGR alone without a control). No training-loss
decrease yet → ``"inconclusive"``. The early rise is graded and shown but does not move the level:
on the validation zoo (docs/VALIDATION.md) letting a bad early rise lower "good" to "watch" cut the
agreement with what happened on the fitting half from 81% to 38%.
:func:`verdict_object` is the machine-readable form stored in the run JSON (``run["verdict"]``),
read by ``gsnr-diag check`` and ``gsnr.expect_verdict``. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._format import integer, number, percent
from .._io import clean_float
from .._thresholds import VERDICT_THRESHOLDS, grade
from .evidence import Evidence, control_evidence, early_rise_evidence, osgr_evidence
from .run import run_metadata, snapshot_series, snapshots

__all__ = [
    "LEVELS",
    "MISSING",
    "PAPER",
    "THRESHOLDS",
    "Metric",
    "fmt",
    "fmt_int",
    "fmt_pct",
    "grade_interval",
    "headline",
    "metrics",
    "verdict_object",
    "verdict_values",
]

PAPER = "Liu et al., ICLR 2020"
THRESHOLDS = VERDICT_THRESHOLDS
MISSING = "–"
#: Verdict levels from worst to best ("inconclusive" is not on this scale).
LEVELS = ("bad", "watch", "good")
GRADED = ("integrated_osgr", "control_separation", "early_rise")
SHORT_NAMES = {
    "integrated_osgr": "integrated OSGR",
    "control_separation": "control separation",
    "early_rise": "early rise",
}


def fmt(x: Any, digits: int = 3) -> str:
    """A number as the report prints it: :func:`gsnr_diag._format.number` with 3 significant digits."""
    return number(x, digits, MISSING)


def fmt_pct(x: Any) -> str:
    return percent(x, MISSING)


def fmt_int(x: Any) -> str:
    return integer(x, MISSING)


@dataclass
class Metric:
    """One row of the verdict panel; ``graded`` rows carry the status the verdict uses."""

    key: str
    label: str
    value: float | None
    display: str
    status: str  # "good" | "watch" | "bad" | "inconclusive" | "n/a" | "info"
    threshold: str
    detail: str = ""
    interval: tuple[float, float] | None = None
    graded: bool = False
    settle: str = ""  # what would settle an inconclusive or missing indicator

    @property
    def interval_text(self) -> str:
        """ "95%: a to b" under the value (the interval the status was graded on), or ""."""
        return f"95%: {fmt(self.interval[0])} to {fmt(self.interval[1])}" if self.interval else ""


def grade_interval(key: str, value: float | None, interval: tuple[float, float] | None) -> str:
    """The grade of ``value``, or ``"inconclusive"`` when the interval's ends get different grades."""
    if value is None:
        return "n/a"
    if interval is None:
        return grade(key, value)
    lo, hi = grade(key, interval[0]), grade(key, interval[1])
    return lo if lo == hi else "inconclusive"


def _with_interval(value: float | None, interval: tuple[float, float] | None) -> str:
    if value is None:
        return MISSING
    if interval is None:
        return fmt(value)
    return f"{fmt(value)} (95%: {fmt(interval[0])} to {fmt(interval[1])})"


def _thresholds_text(key: str, unit: str = "") -> str:
    good, watch = THRESHOLDS[key]
    return f"good ≥ {good:g}{unit}, watch ≥ {watch:g}{unit}, else bad; inconclusive when the 95% interval straddles one"


def verdict_values(run: dict[str, Any]) -> dict[str, Any]:
    """Every number of the panel (graded and described), also read by ``gsnr-diag check``."""
    snaps = snapshots(run.get("trajectory"))
    meta = run_metadata(run)
    steps, gsnr = snapshot_series(snaps, "mean_gsnr")
    defined = [(s, g) for s, g in zip(steps, gsnr) if g is not None]
    first = gsnr[0] if gsnr else None
    final = defined[-1][1] if defined else None
    peak_step, peak = max(defined, key=lambda t: t[1]) if defined else (None, None)
    last = snaps[-1] if snaps else {}
    control = run.get("control") or {}
    n = clean_float(meta.get("n_train"))
    o, c, e = osgr_evidence(run), control_evidence(run), early_rise_evidence(run)
    return {
        "integrated_osgr": o,
        "control_separation": c,
        "early_rise": e,
        "n_train": n,
        "initial_mean_gsnr": first,
        "final_mean_gsnr": final,
        "peak_mean_gsnr": peak,
        "peak_step": float(peak_step) if peak_step is not None else None,
        "peak_rise": (peak / first) if (peak is not None and first) else None,
        "final_gsnr_n": (final * n) if (final is not None and n) else None,
        "gsnr_floor": (1.0 / n) if n else None,
        "control_ratio": clean_float(control.get("final_ratio")),
        "control_peak_ratio": clean_float(control.get("peak_ratio")),
        "osgr": o.value,
        "osgr_final": clean_float(last.get("osgr")),
        "generalization_gap": clean_float(last.get("generalization_gap")),
        "realized_ratio": o.details.get("measured_ratio"),
        "same_sign": clean_float(last.get("mean_same_sign")),
        "noise_scale": clean_float(last.get("noise_scale")),
        "m_coherence": clean_float(last.get("m_coherence")),
        "train_loss": clean_float(last.get("train_loss")),
        "test_loss": clean_float(last.get("test_loss")),
        "train_accuracy": clean_float(last.get("train_accuracy")),
        "test_accuracy": clean_float(last.get("test_accuracy")),
        "predicted_test_loss": o.details.get("predicted_test_loss"),
        "predicted_band": o.details.get("predicted_band"),
        "predicted_gap": o.details.get("predicted_gap"),
    }


def _graded(key: str, label: str, ev: Evidence, threshold: str, detail: str, settle: str) -> Metric:
    status = grade_interval(key, ev.value, ev.interval)
    display = fmt(ev.value) if ev.value is not None else (ev.missing or MISSING)
    if ev.value is None:
        detail = f"Not graded: {ev.missing}. " + detail
    return Metric(key, label, ev.value, display, status, threshold, detail, ev.interval, True, settle)


def _osgr_settle(o: Evidence) -> str:
    """What would narrow the integrated OSGR's band: whichever of its two parts is the larger."""
    samp, disc = o.details.get("halfwidth_sampling") or 0.0, o.details.get("halfwidth_discretization") or 0.0
    if samp >= disc:
        return "more training samples would narrow it (most of the band is the sampling error of R)"
    return "denser snapshots (--every N) would narrow it (most of the band is R moving between snapshots)"


def metrics(run: dict[str, Any], v: dict[str, Any] | None = None) -> list[Metric]:
    """The panel's rows: the three graded indicators first, then the described numbers."""
    v = v if v is not None else verdict_values(run)
    o, c, e = v["integrated_osgr"], v["control_separation"], v["early_rise"]
    band = v["predicted_band"]
    osgr_detail = (
        "The predicted share of the training-loss decrease that also lowers the held-out loss (eq. 19 at each "
        "snapshot, trapezoid rule between snapshots; 1 = all of it, 0 = none, < 0 = the held-out loss rises). "
        f"The interval adds the jackknife SE of each R_t and how much R moved between snapshots. "
        f"Measured on the test set, for comparison: {fmt(v['realized_ratio'])}."
    )
    sep_detail = (
        f"Real ÷ shuffled mean GSNR, geometric mean over the {c.details.get('snapshots', 0)} shared snapshots while "
        f"the real training loss fell (to step {fmt_int(c.details.get('phase_end_step'))}); only real labels show "
        f"the early rise ({PAPER}, Sec. 3.1, Fig. 5a). At the end: {fmt(v['control_ratio'])}, peak "
        f"{fmt(v['control_peak_ratio'])} (described, not graded)."
    )
    shuffled_n, real_n = c.details.get("shuffled_snapshots", 0), len(snapshots(run.get("trajectory")))
    if c.value is not None and shuffled_n < real_n:
        sep_detail = (
            f"The shuffled-label control was interrupted after {shuffled_n} of {real_n} snapshots; graded on the "
            "shared ones. " + sep_detail
        )
    if c.missing == "interrupted":
        sep_detail = "The shuffled-label control was interrupted before it finished, so it is not graded."
    elif c.missing == "not run":
        sep_detail = "The shuffled-label control was not run (regression task, or --no-control)."
    rise_detail = (
        "exp(mean of log r_t/r_0) over the first half of the training-loss decrease, integrated along that "
        f"decrease, so it does not depend on whether a snapshot hit the peak; r_0 = {fmt(v['initial_mean_gsnr'])}. "
        f"Peak: {fmt(v['peak_mean_gsnr'])} at step {fmt_int(v['peak_step'])} (described). The interval is the "
        "range when any one snapshot is left out."
    )
    rows = [
        _graded(
            "integrated_osgr",
            "Integrated OSGR over the run (Σ R·ΔL ÷ Σ ΔL)",
            o,
            _thresholds_text("integrated_osgr"),
            osgr_detail,
            _osgr_settle(o),
        ),
        _graded(
            "control_separation",
            "Control: real vs shuffled labels while the loss falls",
            c,
            _thresholds_text("control_separation", "×"),
            sep_detail,
            "run the control to the end (more snapshots while the loss falls narrow the interval)",
        ),
        _graded(
            "early_rise",
            "Early rise of mean GSNR",
            e,
            _thresholds_text("early_rise", "×"),
            rise_detail,
            "denser snapshots early in training (the default schedule is log-spaced from step 1)",
        ),
    ]
    floor = v["gsnr_floor"]
    corrected = v["final_mean_gsnr"] - floor if v["final_mean_gsnr"] is not None and floor else None
    rows += [
        Metric(
            "predicted_test_loss",
            "Predicted test loss (from training data only)",
            v["predicted_test_loss"],
            _with_interval(v["predicted_test_loss"], tuple(band) if band else None),
            "info",
            "described, not graded",
            f"L_train(0) − Σ R·ΔL; predicted gap {fmt(v['predicted_gap'])}. Measured: test loss "
            f"{fmt(v['test_loss'])}, gap {fmt(v['generalization_gap'])}"
            + ("" if v["test_loss"] is not None else " (no test set)")
            + ". It predicts held-out data of the training distribution (noisy labels included).",
        ),
        Metric(
            "final",
            "Final losses and accuracies",
            v["test_accuracy"],
            f"train loss {fmt(v['train_loss'])} · test loss {fmt(v['test_loss'])}"
            + (
                f" · train accuracy {fmt_pct(v['train_accuracy'])} · test accuracy {fmt_pct(v['test_accuracy'])}"
                if v["train_accuracy"] is not None
                else ""
            ),
            "info",
            "described, not graded",
            "At the last snapshot, on the full training and test sets.",
        ),
        Metric(
            "final_mean_gsnr",
            "Final mean GSNR",
            v["final_mean_gsnr"],
            fmt(v["final_mean_gsnr"]),
            "info",
            "described, not graded",
            f"Sampling floor 1/n = {fmt(floor)} (an element with true mean gradient 0 reads r ≈ 1/n); bias-corrected "
            f"mean (ḡ² − ρ²/n)/ρ² = {fmt(corrected)}. "
            "GSNR collapses once the training set is fitted (the mean gradient vanishes), whatever was learned.",
        ),
        Metric(
            "same_sign",
            "Mean same-sign fraction at the end",
            v["same_sign"],
            fmt(v["same_sign"]),
            "info",
            "described, not graded",
            "0.50 = samples disagree at random; about 0.56 on real MNIST labels in the paper (Fig. 5c).",
        ),
        _noise_metric(v),
    ]
    return rows


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


def _level(rows: list[Metric]) -> tuple[str, list[Metric]]:
    by = {m.key: m for m in rows if m.graded}
    o, c = by["integrated_osgr"], by["control_separation"]
    if o.status == "n/a":
        return "inconclusive", [o]
    primary = [o] + ([c] if c.status != "n/a" else [])
    if any(m.status == "bad" for m in primary):
        return "bad", [m for m in primary if m.status == "bad"]
    unsure = [m for m in primary if m.status == "inconclusive"]
    if unsure:
        return "inconclusive", unsure
    level = min((m.status for m in primary), key=LEVELS.index)
    return level, [m for m in primary if m.status == level]


def headline(rows: list[Metric]) -> tuple[str, str, str]:
    """(headline, level, detail) of the verdict panel from its rows."""
    if not any(m.graded for m in rows):
        return "Not enough data for a verdict", "inconclusive", "no graded indicator"
    level, why = _level(rows)
    o = next(m for m in rows if m.key == "integrated_osgr")
    share = fmt_pct(o.value) if o.value is not None else MISSING
    if level == "inconclusive":
        if o.status == "n/a":
            reason = o.display if o.display != MISSING else "no training-loss decrease yet"
            text = f"Inconclusive: {reason}; train longer to get a verdict"
        else:
            names = " and ".join(SHORT_NAMES[m.key] for m in why)
            text = f"Inconclusive: the 95% interval of the {names} straddles a threshold; " + "; ".join(
                m.settle for m in why
            )
    elif level == "good":
        text = f"Learning features that generalize: about {share} of the training-loss decrease carries over"
    elif level == "watch":
        text = f"Partly generalizable: about {share} of the training-loss decrease is predicted to carry over"
    else:
        text = "Little evidence of generalizable features: signs of memorization"
    graded = [m for m in rows if m.graded]
    counts = ", ".join(f"{SHORT_NAMES[m.key]}: {m.status}" for m in graded)
    return text, level, counts


def verdict_object(run: dict[str, Any]) -> dict[str, Any]:
    """``{"level", "headline", "indicators": [{"name", "value", "interval", "status", "threshold"}]}``."""
    rows = metrics(run)
    text, level, _ = headline(rows)
    indicators = []
    for m in rows:
        if not m.graded:
            continue
        good, watch = THRESHOLDS[m.key]
        indicators.append(
            {
                "name": m.key,
                "value": clean_float(m.value),
                "interval": [clean_float(m.interval[0]), clean_float(m.interval[1])] if m.interval else None,
                "status": m.status,
                "threshold": {"good": good, "watch": watch},
            }
        )
    return {"level": level, "headline": text, "indicators": indicators}
