"""The report's view-model: plain dataclasses built from a run dict, rendered second.

Everything the template shows is computed here — verdicts against the stated
thresholds, formatted numbers, figure SVGs, notes for absent data — so the template
holds no logic beyond loops and conditionals, and every user-provided string reaches
the template as data (jinja2 escapes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .._io import clean_float
from ..core.correlation import pearson
from . import figures

__all__ = [
    "THRESHOLDS",
    "Metric",
    "FigureView",
    "LayerRow",
    "ReportView",
    "build_view",
    "verdict_values",
    "fmt",
]

PAPER = "Liu et al., ICLR 2020"

# Verdict thresholds: (good_at_least, watch_at_least) for higher-is-better quantities,
# (good_at_most, watch_at_most) for the gap fraction. Stated verbatim in the report.
THRESHOLDS: dict[str, tuple[float, float]] = {
    "peak_rise": (2.0, 1.2),
    "final_gsnr_n": (10.0, 1.0),
    "control_ratio": (2.0, 1.2),
    "osgr": (0.5, 0.1),
    "realized_ratio": (0.5, 0.1),
    "same_sign": (0.55, 0.52),
}


# ----------------------------------------------------------------------------- helpers


_num = clean_float


def fmt(x: Any, digits: int = 3) -> str:
    """A number for the reader: 3 significant digits, scientific only when very large/small."""
    v = _num(x)
    if v is None:
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def fmt_pct(x: Any) -> str:
    v = _num(x)
    return "–" if v is None else f"{100 * v:.1f}%"


def fmt_int(x: Any) -> str:
    v = _num(x)
    return "–" if v is None else f"{int(v):,}"


def _status_high(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    good, watch = THRESHOLDS[key]
    return "good" if value >= good else "watch" if value >= watch else "bad"


def _status_low(value: float | None, key: str) -> str:
    if value is None:
        return "n/a"
    good, watch = THRESHOLDS[key]
    return "good" if value <= good else "watch" if value <= watch else "bad"


def _snapshots(traj: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not traj:
        return []
    snaps = [s for s in traj.get("snapshots", []) if isinstance(s, dict)]
    return sorted(snaps, key=lambda s: s.get("step", 0))


def _series(snaps: list[dict[str, Any]], key: str) -> tuple[list[int], list[float | None]]:
    return [int(s.get("step", 0)) for s in snaps], [_num(s.get(key)) for s in snaps]


def _has(values: Sequence[Any]) -> bool:
    return any(_num(v) is not None for v in values)


# ----------------------------------------------------------------------------- dataclasses


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


@dataclass
class FigureView:
    """One figure: its SVG, or a one-line note saying why it is left out."""

    id: str
    title: str
    svg: str | None
    caption: str
    guide: str
    note: str | None = None


@dataclass
class LayerRow:
    name: str
    params: str
    gsnr_mean: str
    gsnr_median: str
    same_sign: str
    opposite_sign: str


@dataclass
class KeyValue:
    key: str
    value: str


@dataclass
class ReportView:
    title: str
    model: str
    header: list[KeyValue]
    headline: str
    headline_status: str
    headline_detail: str
    metrics: list[Metric]
    figures: list[FigureView]
    layers: list[LayerRow]
    layer_note: str
    settings: list[KeyValue]
    versions: list[KeyValue]
    command: str
    notes: list[str] = field(default_factory=list)
    partial: bool = False


# ----------------------------------------------------------------------------- verdicts


def verdict_values(run: dict[str, Any]) -> dict[str, float | None]:
    """The verdict panel's numbers from a run (also used by ``gsnr-diag check``)."""
    snaps = _snapshots(run.get("trajectory"))
    control = run.get("control") or None
    steps, gsnr = _series(snaps, "mean_gsnr")
    first = gsnr[0] if gsnr else None
    defined = [(s, g) for s, g in zip(steps, gsnr) if g is not None]
    final = defined[-1][1] if defined else None
    peak_step, peak = (max(defined, key=lambda t: t[1]) if defined else (None, None))
    last = snaps[-1] if snaps else {}
    gap = _num(last.get("generalization_gap"))
    meta = _meta(run)
    n_train = _num(meta.get("n_train"))
    control_ratio = None
    control_peak = None
    if control:
        control_ratio = _num(control.get("final_ratio"))
        control_peak = _num(control.get("peak_ratio"))
    # eq. 19 over the whole run: each interval's training-loss decrease weighted by the OSGR
    # predicted at its start, Σ R_t ΔL_t / Σ ΔL_t; and its measured counterpart (eq. 23 over
    # the run), the test-loss decrease divided by the training-loss decrease.
    num = den = 0.0
    for a, b in zip(snaps, snaps[1:]):
        r, l0, l1 = _num(a.get("osgr")), _num(a.get("train_loss")), _num(b.get("train_loss"))
        if r is None or l0 is None or l1 is None:
            continue
        num += r * (l0 - l1)
        den += l0 - l1
    osgr_run = num / den if den > 0 else None
    realized = None
    tr = [(_num(s.get("train_loss")), _num(s.get("test_loss"))) for s in snaps]
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
        "osgr_final": _num(last.get("osgr")),
        "generalization_gap": gap,
        "realized_ratio": realized,
        "same_sign": _num(last.get("mean_same_sign")),
    }


def _metrics(run: dict[str, Any], v: dict[str, float | None]) -> list[Metric]:
    t = THRESHOLDS
    step0 = fmt(v["initial_mean_gsnr"])
    out = [
        Metric(
            "peak_mean_gsnr",
            "Peak mean GSNR",
            v["peak_mean_gsnr"],
            f"{fmt(v['peak_mean_gsnr'])} at step {fmt_int(v['peak_step'])}",
            _status_high(v["peak_rise"], "peak_rise"),
            f"peak ÷ step-0 value ({step0}): good ≥ {t['peak_rise'][0]:g}×, watch ≥ {t['peak_rise'][1]:g}×, "
            "else bad",
            f"{fmt(v['peak_rise'])}× the value at initialization. Real labels make GSNR rise early in training "
            f"({PAPER}, Sec. 3.1, Fig. 5a).",
        ),
        Metric(
            "final_mean_gsnr",
            "Final mean GSNR",
            v["final_mean_gsnr"],
            fmt(v["final_mean_gsnr"]),
            _status_high(v["final_gsnr_n"], "final_gsnr_n"),
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
            _status_high(v["control_ratio"], "control_ratio"),
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
            _status_high(v["osgr"], "osgr"),
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
            _status_high(v["realized_ratio"], "realized_ratio") if v["generalization_gap"] is not None else "n/a",
            f"test − train loss at the end; status from the test-loss decrease ÷ train-loss decrease over the run "
            f"(the measured OSGR, eq. 23): good ≥ {t['realized_ratio'][0]:g}, watch ≥ {t['realized_ratio'][1]:g}, "
            "else bad",
            (f"Over the run the test loss fell {fmt(v['realized_ratio'])}× as much as the training loss: what "
             "actually happened on held-out data, to compare with the OSGR predicted from GSNR above."
             if v["realized_ratio"] is not None else "What actually happened on held-out data."),
        ),
        Metric(
            "same_sign",
            "Mean same-sign fraction",
            v["same_sign"],
            fmt(v["same_sign"]),
            _status_high(v["same_sign"], "same_sign"),
            f"at the last snapshot: good ≥ {t['same_sign'][0]:g}, watch ≥ {t['same_sign'][1]:g}, else bad "
            "(0.50 = samples disagree at random)",
            "Rises from about 0.50 to about 0.56 on real MNIST labels in the paper (Fig. 5c).",
        ),
    ]
    return out


def _headline(metrics: list[Metric]) -> tuple[str, str, str]:
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


# ----------------------------------------------------------------------------- figures

GUIDES = {
    "gsnr": (
        "Healthy: on real labels the mean GSNR climbs during the first epochs, often by several times, and stays "
        "well above the shuffled-label curve. Unhealthy: no early rise, or a real-label curve that tracks the "
        "shuffled one — the gradients of different samples do not agree, so each step mostly fits individual "
        f"samples. ({PAPER}, Sec. 3.1, Fig. 5a.)"
    ),
    "heatmap": (
        "Each row is one parameter tensor, each column a snapshot; brighter = larger GSNR (log colour scale). "
        "Healthy: the rise is visible in most layers, not only in the last one. A layer that stays dark (low GSNR) "
        "throughout learns little that is shared across samples; hatched cells are undefined (zero variance)."
    ),
    "same_sign": (
        "The fraction of samples whose gradient points the same way as the mean gradient, per parameter. At "
        "initialization it is about 0.5 (half for, half against). Healthy: it rises above 0.5 on real labels "
        f"(about 0.56 for MNIST in the paper) and stays near 0.5 on shuffled labels. ({PAPER}, Sec. 3.1, Fig. 5c.)"
    ),
    "opposite": (
        "Left axis: the fraction of weights whose sign is opposite to their mean gradient, for all weights and for "
        "the 10% largest |W| per tensor; right axis: the correlation between the change of the mean gradient and "
        "the weights. Healthy training drives the correlation negative early and the top-10% fraction towards "
        f"about 0.8, the stable state in which large weights stop growing. ({PAPER}, Sec. 3.3, Fig. 7.)"
    ),
    "osgr": (
        "Left axis: the one-step generalization ratio predicted from GSNR (eq. 19, single-set estimate): the "
        "share of each training-loss decrease that also lowers the test loss. Right axis: the measured gap "
        "(test − train loss). Healthy: OSGR stays high while the gap stays small; a falling OSGR together with a "
        f"growing gap is the signature of memorization. ({PAPER}, Sec. 2.3–2.4, eq. 19–22.)"
    ),
    "osgr_scatter": (
        "Each point compares the OSGR measured by definition from M training sets (eq. 23, vertical) with the "
        "prediction from GSNR (eq. 19 with eq. 24, horizontal). Healthy agreement: points near the dashed line "
        f"y = x early in training and a Pearson c near 1. ({PAPER}, Sec. 2.4, Fig. 4.)"
    ),
    "loss": (
        "Train and test loss (left axis) and accuracy (right axis). A test loss that turns upward while the train "
        "loss keeps falling is overfitting; compare its timing with the GSNR and OSGR curves above."
    ),
}


def _osgr_scatter_figure(run: dict[str, Any]) -> FigureView:
    """Fig. 4: LHS (eq. 23) against RHS (eq. 19/24) of the OSGR experiment, or a note when absent."""
    results = [r for r in (run.get("osgr") or []) if isinstance(r, dict)]
    if results:
        by_epoch: dict[int, tuple[list[float], list[float]]] = {}
        all_l, all_r = [], []
        for r in results:
            for e, lhs, rhs in zip(r.get("epochs", []), r.get("lhs", []), r.get("rhs", [])):
                if _num(lhs) is None or _num(rhs) is None:
                    continue
                by_epoch.setdefault(int(e), ([], []))
                by_epoch[int(e)][0].append(float(rhs))
                by_epoch[int(e)][1].append(float(lhs))
                all_l.append(float(lhs))
                all_r.append(float(rhs))
        c = pearson(all_r, all_l)
        groups = []
        for e in sorted(by_epoch):
            xs, ys = by_epoch[e]
            ce = pearson(xs, ys)
            groups.append((f"epoch {e}" + (f" (c = {ce:.2f})" if ce is not None else ""), xs, ys))
        if groups:
            title = f"Pearson c = {c:.3f} over {len(all_l)} points" if c is not None else f"{len(all_l)} points"
            svg = figures.scatter_figure(groups, xlabel="RHS: predicted from GSNR (eq. 19, 24)",
                                         ylabel="LHS: measured (eq. 23)", title=title)
            settings = results[0].get("settings") or {}
            caption = (
                "OSGR experiment: M training sets of n samples each from one initialization, full-batch gradient "
                "descent" + (f" (n = {settings.get('n')}, M = {settings.get('M')}, lr = {settings.get('lr')})"
                             if settings else "") + "."
            )
            return FigureView("fig-osgr-scatter", "OSGR by definition vs predicted (Fig. 4)", svg, caption,
                              GUIDES["osgr_scatter"])
        else:
            return FigureView("fig-osgr-scatter", "OSGR by definition vs predicted (Fig. 4)", None, "",
                              GUIDES["osgr_scatter"], "The OSGR experiment produced no finite LHS/RHS pairs.")
    else:
        return FigureView("fig-osgr-scatter", "OSGR by definition vs predicted (Fig. 4)", None, "",
                          GUIDES["osgr_scatter"],
                              "The OSGR experiment was not run (use --osgr-sets M to run it), so there is no "
                              "LHS-vs-RHS scatter.")


def _figures(run: dict[str, Any]) -> list[FigureView]:
    snaps = _snapshots(run.get("trajectory"))
    control = run.get("control") or None
    shuffled = _snapshots(control.get("shuffled")) if control else []
    out: list[FigureView] = []
    if not snaps:  # e.g. an OSGR-only run: its scatter needs no trajectory
        return [_osgr_scatter_figure(run)]
    no_control = (
        "No shuffled-label control in this run (regression task, or run with --no-control), so only the "
        "real-label curve is drawn."
    )

    # 1. mean GSNR, log scale, real vs shuffled
    steps, g = _series(snaps, "mean_gsnr")
    main_label = "real labels" if shuffled else "training set"  # "real" only means something beside a control
    series = [figures.Series(main_label, steps, g, style=0)]
    if shuffled and _has(_series(shuffled, "mean_gsnr")[1]):
        series.append(figures.Series("shuffled labels", *_series(shuffled, "mean_gsnr"), style=1))
    out.append(
        FigureView(
            "fig-gsnr",
            "Mean GSNR over training",
            figures.line_figure(series, xlabel="training step", ylabel="mean GSNR (log scale)", log=True)
            if _has(g)
            else None,
            "Mean GSNR r = ḡ²/ρ² over all parameters (eq. 2), measured on the training set at each snapshot.",
            GUIDES["gsnr"],
            None if _has(g) else "Mean GSNR is undefined at every snapshot (no parameter had gradient variance).",
        )
    )
    if control is None or not shuffled:
        out[-1].note = no_control if out[-1].note is None else out[-1].note

    # 2. heat map layers × steps
    layers: list[str] = []
    for s in snaps:
        for name in (s.get("layer_gsnr") or {}):
            if name not in layers:
                layers.append(name)
    matrix = [[_num((s.get("layer_gsnr") or {}).get(name)) for s in snaps] for name in layers]
    has_heat = bool(layers) and any(_has(row) for row in matrix)
    out.append(
        FigureView(
            "fig-heatmap",
            "Per-layer GSNR, layers × steps",
            figures.heatmap_figure(layers, steps, matrix, xlabel="snapshot (labelled with its training step)") if has_heat else None,
            "Mean GSNR of each parameter tensor at each snapshot; one column per snapshot, so early, densely "
            "recorded steps get as much room as later ones.",
            GUIDES["heatmap"],
            None if has_heat else "No per-layer GSNR was recorded in this run.",
        )
    )

    # 3. same-sign fraction
    _, ss = _series(snaps, "mean_same_sign")
    if _has(ss):
        series = [figures.Series(main_label, steps, ss, style=0)]
        if shuffled and _has(_series(shuffled, "mean_same_sign")[1]):
            series.append(figures.Series("shuffled labels", *_series(shuffled, "mean_same_sign"), style=1))
        svg = figures.line_figure(series, xlabel="training step", ylabel="mean same-sign fraction",
                                  hline=(0.5, "0.5: random agreement"))
        note = None if (control and shuffled) else no_control
    else:
        svg, note = None, "Sign statistics were not recorded in this run (monitor with signs=False)."
    out.append(FigureView("fig-same-sign", "Same-sign fraction over training", svg,
                          "Mean over parameters of the share of samples whose gradient has the sign of the mean "
                          "gradient (zeros excluded; Sec. 3.1).", GUIDES["same_sign"], note))

    # 4. opposite-sign fractions and Δḡ–W correlation
    _, opp = _series(snaps, "opposite_sign")
    _, top = _series(snaps, "opposite_sign_top10")
    _, corr = _series(snaps, "delta_g_weight_corr")
    if _has(opp) or _has(top) or _has(corr):
        series = []
        if _has(opp):
            series.append(figures.Series("opposite sign, all weights", steps, opp, style=0))
        if _has(top):
            series.append(figures.Series("opposite sign, top 10% |W|", steps, top, style=2))
        if _has(corr):
            series.append(figures.Series("corr(Δḡ, W) (right axis)", steps, corr, axis="right", style=1))
        svg = figures.line_figure(series, xlabel="training step", ylabel="fraction of weights",
                                  right_ylabel="Pearson corr(Δḡ, W)")
        note = None
    else:
        svg, note = None, "Weight-sign statistics were not recorded (the model has no weight matrices)."
    out.append(FigureView("fig-opposite", "Opposite-sign fractions and Δḡ–W correlation", svg,
                          "Weights with W·ḡ < 0 (tensors with ≥ 2 dimensions), and the Pearson correlation over "
                          "weight elements between the change of the mean gradient since the previous snapshot "
                          "and the weights (eq. 28).", GUIDES["opposite"], note))

    # 5. OSGR over training beside the measured gap
    _, osgr = _series(snaps, "osgr")
    _, gap = _series(snaps, "generalization_gap")
    if _has(osgr):
        series = [figures.Series("OSGR predicted from GSNR (eq. 19)", steps, osgr, style=0)]
        if _has(gap):
            series.append(figures.Series("measured gap, test − train loss (right axis)", steps, gap,
                                         axis="right", style=1))
        svg = figures.line_figure(series, xlabel="training step", ylabel="OSGR", right_ylabel="generalization gap")
        note = None if _has(gap) else "No test set, so the measured gap is not drawn."
    else:
        svg, note = None, "OSGR is undefined at every snapshot."
    out.append(FigureView("fig-osgr", "OSGR over training beside the measured gap", svg,
                          "R = 1 − Σρ²/(n·Σḡ²), the single-training-set estimate of eq. 19, with n the number of "
                          "training samples.", GUIDES["osgr"], note))

    # 6. OSGR experiment scatter (Fig. 4)
    out.append(_osgr_scatter_figure(run))

    # 7. losses and accuracy
    _, trl = _series(snaps, "train_loss")
    _, tel = _series(snaps, "test_loss")
    _, tra = _series(snaps, "train_accuracy")
    _, tea = _series(snaps, "test_accuracy")
    series = []
    if _has(trl):
        series.append(figures.Series("train loss", steps, trl, style=0))
    if _has(tel):
        series.append(figures.Series("test loss", steps, tel, style=1))
    if _has(tra):
        series.append(figures.Series("train accuracy (right axis)", steps, tra, axis="right", style=2))
    if _has(tea):
        series.append(figures.Series("test accuracy (right axis)", steps, tea, axis="right", style=3))
    notes = []
    if not _has(tel):
        notes.append("no test set, so only training curves are drawn")
    if not _has(tra):
        notes.append("no accuracy (regression task)")
    out.append(FigureView(
        "fig-loss", "Loss and accuracy", figures.line_figure(series, xlabel="training step", ylabel="loss",
                                                            right_ylabel="accuracy") if series else None,
        "Losses and accuracies measured at each snapshot on the full training and test sets.",
        GUIDES["loss"],
        ("Note: " + "; ".join(notes) + ".") if (notes and series) else (None if series else "No losses recorded."),
    ))
    return out


# ----------------------------------------------------------------------------- layer table


def _layers(run: dict[str, Any]) -> tuple[list[LayerRow], str]:
    final = run.get("final_stats") or {}
    meta = _meta(run)
    counts = meta.get("param_counts") or {}
    snaps = _snapshots(run.get("trajectory"))
    last = snaps[-1] if snaps else {}
    layer_gsnr = final.get("layer_gsnr") or last.get("layer_gsnr") or {}
    layer_ss = final.get("layer_same_sign") or last.get("layer_same_sign") or {}
    medians = final.get("layer_gsnr_median") or {}
    opposite = final.get("layer_opposite_sign") or {}
    names = list(dict.fromkeys(list(counts) + list(layer_gsnr)))
    rows = [
        LayerRow(
            name=n,
            params=fmt_int(counts.get(n)),
            gsnr_mean=fmt(layer_gsnr.get(n)),
            gsnr_median=fmt(medians.get(n)),
            same_sign=fmt(layer_ss.get(n)),
            opposite_sign=fmt_pct(opposite.get(n)) if n in opposite else "–",
        )
        for n in names
    ]
    note = (
        "Final GSNR per parameter tensor at the end of training; same-sign and opposite-sign as defined above "
        "(opposite-sign only for weight tensors with ≥ 2 dimensions). '–' = undefined or not measured."
    )
    if not final:
        note += " Median and opposite-sign columns need the final measurement, which this run does not have."
    return rows, note


# ----------------------------------------------------------------------------- header / appendix


def _meta(run: dict[str, Any]) -> dict[str, Any]:
    meta = dict((run.get("trajectory") or {}).get("metadata") or {})
    meta.update(run.get("metadata") or {})
    return meta


def _kv(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(str(k), _display(v)) for k, v in d.items()]


def _display(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return fmt(v, 4)
    if isinstance(v, (list, tuple)):
        return ", ".join(_display(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}={_display(x)}" for k, x in v.items())
    return str(v)


def build_view(run: dict[str, Any]) -> ReportView:
    """Turn a run dict into everything the template shows."""
    meta = _meta(run)
    snaps = _snapshots(run.get("trajectory"))
    counts = meta.get("param_counts") or {}
    total_params = sum(int(v) for v in counts.values() if _num(v) is not None) if counts else None
    model = str(meta.get("model") or "model")
    header = [
        KeyValue("Model file" if meta.get("model_file") else "Model", str(meta.get("model_file") or model)),
        KeyValue("Parameters", fmt_int(total_params) if total_params is not None else "–"),
        KeyValue("Training samples", fmt_int(meta.get("n_train"))),
        KeyValue("Test samples", fmt_int(meta.get("n_test")) if meta.get("n_test") else "none"),
        KeyValue("Task · device", f"{meta.get('task') or '–'} · {meta.get('device') or '–'}"),
        KeyValue("Snapshots", f"{len(snaps)} (steps {snaps[0].get('step')}–{snaps[-1].get('step')})" if snaps else "0"),
        KeyValue("Date", str(meta.get("date") or "–")),
    ]
    values = verdict_values(run)
    metrics = _metrics(run, values)
    headline, status, detail = _headline(metrics)
    rows, layer_note = _layers(run)
    settings = dict(meta.get("settings") or {})
    if "seed" in meta:
        settings.setdefault("seed", meta.get("seed"))
    if meta.get("measure_mode"):
        settings.setdefault("measured in", meta.get("measure_mode"))
    notes = []
    partial = bool(meta.get("partial"))
    if partial:
        notes.append(
            "This run did not finish" + (f" ({meta.get('stopped')})" if meta.get("stopped") else "")
            + ": the report shows what was measured before it stopped."
        )
    return ReportView(
        title=f"GSNR report: {model}",
        model=model,
        header=header,
        headline=headline,
        headline_status=status,
        headline_detail=detail,
        metrics=metrics,
        figures=_figures(run),
        layers=rows,
        layer_note=layer_note,
        settings=_kv(settings),
        versions=_kv(dict(meta.get("versions") or {})),
        command=str(meta.get("command") or "–"),
        notes=notes,
        partial=partial,
    )
