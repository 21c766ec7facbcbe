"""The report's figures as view-model entries: each one's SVG, caption and reading guide, or a note.

The SVGs come from :mod:`.figures`; a figure whose data the run lacks is not drawn empty but left
out with a one-line note saying why (no control, no test set, no OSGR experiment, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._io import clean_float
from ..core.correlation import pearson
from . import figures
from .run import snapshot_series, snapshots
from .verdicts import PAPER

__all__ = ["GUIDES", "FigureView", "figure_views"]


def _has(values: Sequence[Any]) -> bool:
    return any(clean_float(v) is not None for v in values)


@dataclass
class FigureView:
    """One figure: its SVG, or a one-line note saying why it is left out."""

    id: str
    title: str
    svg: str | None
    caption: str
    guide: str
    note: str | None = None


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
    "noise": (
        "Left axis (log scale): the simple gradient noise scale B_simple = Σρ²/Σḡ² (McCandlish et al. 2018), "
        "the batch size at which the noise of a mini-batch gradient is about as large as its signal; it usually "
        "grows as training proceeds. Right axis: m-coherence (Chatterjee & Zielinski 2020), how many of the n "
        "samples a small step along one sample's gradient helps on average: 1 for unrelated (orthogonal) per-sample "
        "gradients, n for identical ones. On the same samples the single-set OSGR is exactly 1 − B_simple/n."
    ),
    "loss": (
        "Train and test loss (top) and accuracy (bottom) on one step axis. A test loss that turns upward while the "
        "train loss keeps falling is overfitting; compare its timing with the GSNR and OSGR curves above."
    ),
    "predicted": (
        "The test loss predicted from the training data alone, L_train(0) − Σ R·ΔL (eq. 19 integrated over the "
        "run), with its 95% band, beside the measured test loss when a test set exists. Healthy: the prediction "
        "falls with the training loss and stays close to it (a small predicted gap). A prediction that flattens or "
        "rises while the training loss keeps falling means the later steps fit individual samples. It predicts "
        "held-out data of the training distribution: with noisy training labels, equally noisy held-out labels."
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
                if clean_float(lhs) is None or clean_float(rhs) is None:
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
            svg = figures.scatter_figure(
                groups, xlabel="RHS: predicted from GSNR (eq. 19, 24)", ylabel="LHS: measured (eq. 23)", title=title
            )
            settings = results[0].get("settings") or {}
            caption = (
                "OSGR experiment: M training sets of n samples each from one initialization, full-batch gradient "
                "descent"
                + (
                    f" (n = {settings.get('n')}, M = {settings.get('M')}, lr = {settings.get('lr')})"
                    if settings
                    else ""
                )
                + "."
            )
            return FigureView(
                "fig-osgr-scatter", "OSGR by definition vs predicted (Fig. 4)", svg, caption, GUIDES["osgr_scatter"]
            )
        else:
            return FigureView(
                "fig-osgr-scatter",
                "OSGR by definition vs predicted (Fig. 4)",
                None,
                "",
                GUIDES["osgr_scatter"],
                "The OSGR experiment produced no finite LHS/RHS pairs.",
            )
    else:
        return FigureView(
            "fig-osgr-scatter",
            "OSGR by definition vs predicted (Fig. 4)",
            None,
            "",
            GUIDES["osgr_scatter"],
            "The OSGR experiment was not run (use --osgr-sets M to run it), so there is no LHS-vs-RHS scatter.",
        )


def _predicted_figure(snaps: list[dict[str, Any]]) -> FigureView:
    """The test loss predicted from training data only (with its band) beside the measured test loss."""
    steps = [int(s.get("step", 0)) for s in snaps]
    pred = [clean_float(s.get("predicted_test_loss")) for s in snaps]
    bands = [s.get("predicted_test_loss_band") or [None, None] for s in snaps]
    low = [clean_float(b[0]) if isinstance(b, list) and len(b) == 2 else None for b in bands]
    high = [clean_float(b[1]) if isinstance(b, list) and len(b) == 2 else None for b in bands]
    _, trl = snapshot_series(snaps, "train_loss")
    _, tel = snapshot_series(snaps, "test_loss")
    title = "Test loss predicted from the training data alone"
    if not _has(pred):
        return FigureView("fig-predicted", title, None, "", GUIDES["predicted"], "No prediction yet (it needs OSGR "
                          "and the training loss at two snapshots or more).")  # fmt: skip
    series = [figures.Series("predicted test loss, 95% band", steps, pred, style=0, band=(low, high))]
    if _has(tel):
        series.append(figures.Series("measured test loss", steps, tel, style=1))
    if _has(trl):
        series.append(figures.Series("train loss", steps, trl, style=2))
    return FigureView(
        "fig-predicted",
        title,
        figures.line_figure(series, xlabel="training step", ylabel="loss"),
        "Predicted: L_train(0) − Σ R·ΔL over the snapshots so far (R: single-set eq. 19, trapezoid rule); the band "
        "adds the jackknife SE of each R and how much R moved between snapshots.",
        GUIDES["predicted"],
        None if _has(tel) else "No test set: only the prediction and the training loss are drawn.",
    )


def figure_views(run: dict[str, Any]) -> list[FigureView]:
    """Every figure of the report, in order, drawn or with its note."""
    snaps = snapshots(run.get("trajectory"))
    control = run.get("control") or None
    shuffled = snapshots(control.get("shuffled")) if control else []
    out: list[FigureView] = []
    if not snaps:  # e.g. an OSGR-only run: its scatter needs no trajectory
        return [_osgr_scatter_figure(run)]
    no_control = (
        "No shuffled-label control in this run (regression task, or run with --no-control), so only the "
        "real-label curve is drawn."
    )

    # 0. the test loss predicted from training data only, beside the measured one
    out.append(_predicted_figure(snaps))

    # 1. mean GSNR, log scale, real vs shuffled
    steps, g = snapshot_series(snaps, "mean_gsnr")
    main_label = "real labels" if shuffled else "training set"  # "real" only means something beside a control
    series = [figures.Series(main_label, steps, g, style=0)]
    if shuffled and _has(snapshot_series(shuffled, "mean_gsnr")[1]):
        series.append(figures.Series("shuffled labels", *snapshot_series(shuffled, "mean_gsnr"), style=1))
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
        for name in s.get("layer_gsnr") or {}:
            if name not in layers:
                layers.append(name)
    matrix = [[clean_float((s.get("layer_gsnr") or {}).get(name)) for s in snaps] for name in layers]
    has_heat = bool(layers) and any(_has(row) for row in matrix)
    out.append(
        FigureView(
            "fig-heatmap",
            "Per-layer GSNR, layers × steps",
            figures.heatmap_figure(layers, steps, matrix, xlabel="snapshot (labelled with its training step)")
            if has_heat
            else None,
            "Mean GSNR of each parameter tensor at each snapshot; one column per snapshot, so early, densely "
            "recorded steps get as much room as later ones.",
            GUIDES["heatmap"],
            None if has_heat else "No per-layer GSNR was recorded in this run.",
        )
    )

    # 3. same-sign fraction
    _, ss = snapshot_series(snaps, "mean_same_sign")
    if _has(ss):
        series = [figures.Series(main_label, steps, ss, style=0)]
        if shuffled and _has(snapshot_series(shuffled, "mean_same_sign")[1]):
            series.append(figures.Series("shuffled labels", *snapshot_series(shuffled, "mean_same_sign"), style=1))
        svg = figures.line_figure(
            series, xlabel="training step", ylabel="mean same-sign fraction", hline=(0.5, "0.5: random agreement")
        )
        note = None if (control and shuffled) else no_control
    else:
        svg, note = None, "Sign statistics were not recorded in this run (monitor with signs=False)."
    out.append(
        FigureView(
            "fig-same-sign",
            "Same-sign fraction over training",
            svg,
            "Mean over parameters of the share of samples whose gradient has the sign of the mean "
            "gradient (zeros excluded; Sec. 3.1).",
            GUIDES["same_sign"],
            note,
        )
    )

    # 4. opposite-sign fractions and Δḡ–W correlation
    _, opp = snapshot_series(snaps, "opposite_sign")
    _, top = snapshot_series(snaps, "opposite_sign_top10")
    _, corr = snapshot_series(snaps, "delta_g_weight_corr")
    if _has(opp) or _has(top) or _has(corr):
        series = []
        if _has(opp):
            series.append(figures.Series("opposite sign, all weights", steps, opp, style=0))
        if _has(top):
            series.append(figures.Series("opposite sign, top 10% |W|", steps, top, style=2))
        if _has(corr):
            series.append(figures.Series("corr(Δḡ, W) (right axis)", steps, corr, axis="right", style=1))
        svg = figures.line_figure(
            series, xlabel="training step", ylabel="fraction of weights", right_ylabel="Pearson corr(Δḡ, W)"
        )
        note = None
    else:
        svg, note = None, "Weight-sign statistics were not recorded (the model has no weight matrices)."
    out.append(
        FigureView(
            "fig-opposite",
            "Opposite-sign fractions and Δḡ–W correlation",
            svg,
            "Weights with W·ḡ < 0 (tensors with ≥ 2 dimensions), and the Pearson correlation over "
            "weight elements between the change of the mean gradient since the previous snapshot "
            "and the weights (eq. 28).",
            GUIDES["opposite"],
            note,
        )
    )

    # 5. OSGR over training beside the measured gap
    _, osgr = snapshot_series(snaps, "osgr")
    _, gap = snapshot_series(snaps, "generalization_gap")
    if _has(osgr):
        series = [figures.Series("OSGR predicted from GSNR (eq. 19)", steps, osgr, style=0)]
        if _has(gap):
            series.append(
                figures.Series("measured gap, test − train loss (right axis)", steps, gap, axis="right", style=1)
            )
        svg = figures.line_figure(series, xlabel="training step", ylabel="OSGR", right_ylabel="generalization gap")
        note = None if _has(gap) else "No test set, so the measured gap is not drawn."
    else:
        svg, note = None, "OSGR is undefined at every snapshot."
    out.append(
        FigureView(
            "fig-osgr",
            "OSGR over training beside the measured gap",
            svg,
            "R = 1 − Σρ²/(n·Σḡ²), the single-training-set estimate of eq. 19, with n the number of training samples.",
            GUIDES["osgr"],
            note,
        )
    )

    # 5b. gradient noise scale and m-coherence (core/noise.py)
    out.append(_noise_figure(snaps, steps))

    # 6. OSGR experiment scatter (Fig. 4)
    out.append(_osgr_scatter_figure(run))

    # 7. losses and accuracy: two panels over one step axis (no twin axes to collide)
    _, trl = snapshot_series(snaps, "train_loss")
    _, tel = snapshot_series(snaps, "test_loss")
    _, tra = snapshot_series(snaps, "train_accuracy")
    _, tea = snapshot_series(snaps, "test_accuracy")
    loss_series = []
    if _has(trl):
        loss_series.append(figures.Series("train loss", steps, trl, style=0))
    if _has(tel):
        loss_series.append(figures.Series("test loss", steps, tel, style=1))
    acc_series = []
    if _has(tra):
        acc_series.append(figures.Series("train accuracy", steps, tra, style=2))
    if _has(tea):
        acc_series.append(figures.Series("test accuracy", steps, tea, style=3))
    notes = []
    if not _has(tel):
        notes.append("no test set, so only training curves are drawn")
    if not _has(tra):
        notes.append("no accuracy (regression task)")
    panels = [("loss", loss_series), ("accuracy", acc_series)]
    drawn = bool(loss_series or acc_series)
    out.append(
        FigureView(
            "fig-loss",
            "Loss and accuracy",
            figures.stacked_figure(panels, xlabel="training step") if drawn else None,
            "Losses and accuracies measured at each snapshot on the full training and test sets.",
            GUIDES["loss"],
            ("Note: " + "; ".join(notes) + ".") if (notes and drawn) else (None if drawn else "No losses recorded."),
        )
    )
    return out


def _noise_figure(snaps: list[dict[str, Any]], steps: list[int]) -> FigureView:
    """B_simple (log, left) and m-coherence (right) over training, or a note when not recorded."""
    _, scale = snapshot_series(snaps, "noise_scale")
    _, coherence = snapshot_series(snaps, "m_coherence")
    series = []
    if _has(scale):
        series.append(figures.Series("noise scale B_simple (log)", steps, scale, style=0))
    if _has(coherence):
        series.append(figures.Series("m-coherence (right axis)", steps, coherence, axis="right", style=1))
    svg = note = None
    if series:
        svg = figures.line_figure(
            series, xlabel="training step", ylabel="B_simple (log scale)", right_ylabel="m-coherence", log=_has(scale)
        )
    else:
        note = "The noise scale and m-coherence were not recorded in this run (a run saved by an older version)."
    return FigureView(
        "fig-noise",
        "Gradient noise scale and m-coherence over training",
        svg,
        "B_simple = Σ_j ρ²_j / Σ_j ḡ²_j and m-coherence = n·|ḡ|² / ((1/n)Σ_i |g_i|²), both from the same "
        "per-sample moments as GSNR (docs/SCIENCE.md).",
        GUIDES["noise"],
        note,
    )
