"""The report's view-model: plain dataclasses built from a run dict, rendered second.

Everything the template shows is computed here or in :mod:`.verdicts` (the verdict panel
against the one threshold table) — formatted numbers, figure SVGs, the layer table, notes for
absent data — so the template holds no logic beyond loops and conditionals, and every
user-provided string reaches the template as data (jinja2 escapes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._io import clean_float
from .figure_views import FigureView, figure_views
from .run import run_metadata, snapshots
from .verdicts import THRESHOLDS, Metric, fmt, fmt_int, fmt_pct, headline, metrics, verdict_values

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


# ----------------------------------------------------------------------------- dataclasses


@dataclass
class LayerRow:
    name: str
    params: str
    gsnr_mean: str
    gsnr_median: str
    same_sign: str
    opposite_sign: str
    noise_scale: str = "–"  # B_simple of the tensor (core/noise.py)
    m_coherence: str = "–"
    undefined: str = "–"


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
    prediction: str = ""  # the headline number: the test loss predicted from training data only
    prediction_detail: str = ""


# ----------------------------------------------------------------------------- figures

# ----------------------------------------------------------------------------- layer table


def _layers(run: dict[str, Any]) -> tuple[list[LayerRow], str]:
    final = run.get("final_stats") or {}
    meta = run_metadata(run)
    counts = meta.get("param_counts") or {}
    snaps = snapshots(run.get("trajectory"))
    last = snaps[-1] if snaps else {}
    layer_gsnr = final.get("layer_gsnr") or last.get("layer_gsnr") or {}
    layer_ss = final.get("layer_same_sign") or last.get("layer_same_sign") or {}
    medians = final.get("layer_gsnr_median") or {}
    opposite = final.get("layer_opposite_sign") or {}
    noise = final.get("layer_noise_scale") or last.get("layer_noise_scale") or {}
    coherence = final.get("layer_m_coherence") or last.get("layer_m_coherence") or {}
    undefined = final.get("layer_undefined") or {}
    roundoff = final.get("layer_roundoff") or {}
    names = list(dict.fromkeys(list(counts) + list(layer_gsnr)))
    rows = [
        LayerRow(
            name=n,
            params=fmt_int(counts.get(n)),
            gsnr_mean=fmt(layer_gsnr.get(n)),
            gsnr_median=fmt(medians.get(n)),
            same_sign=fmt(layer_ss.get(n)),
            opposite_sign=fmt_pct(opposite.get(n)) if n in opposite else "–",
            noise_scale=fmt(noise.get(n)),
            m_coherence=fmt(coherence.get(n)),
            undefined=_undefined(undefined.get(n), roundoff.get(n)),
        )
        for n in names
    ]
    note = (
        "Final GSNR per parameter tensor at the end of training; same-sign and opposite-sign as defined above "
        "(opposite-sign only for weight tensors with ≥ 2 dimensions); noise scale B_simple = Σρ²/Σḡ² and "
        "m-coherence over the tensor's elements. '–' = undefined or not measured. "
        "Undefined: elements left out of every average, because their gradient variance is zero or because "
        "every per-sample gradient is at floating-point round-off level (counted in parentheses)."
    )
    if not final:
        note += " Median and opposite-sign columns need the final measurement, which this run does not have."
    return rows, note


def _undefined(count: Any, roundoff: Any) -> str:
    if clean_float(count) is None:
        return "–"
    r = int(roundoff or 0)
    return fmt_int(count) + (f" ({fmt_int(r)} round-off)" if r else "")


# ----------------------------------------------------------------------------- header / appendix


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
    meta = run_metadata(run)
    snaps = snapshots(run.get("trajectory"))
    counts = meta.get("param_counts") or {}
    total_params = sum(int(v) for v in counts.values() if clean_float(v) is not None) if counts else None
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
    panel = metrics(run, values)
    verdict, status, detail = headline(panel)
    prediction, prediction_detail = _prediction(values)
    if not snaps:
        verdict, detail = "No snapshot yet: nothing to grade", "the run holds no measurement"
        panel = [m for m in panel if m.graded]
        for m in panel:
            m.display, m.detail, m.status = "no snapshot yet", "", "n/a"
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
            "This run did not finish"
            + (f" ({meta.get('stopped')})" if meta.get("stopped") else "")
            + ": the report shows what was measured before it stopped."
        )
    control = run.get("control") or {}
    if control.get("partial"):
        notes.append(
            "The shuffled-label control did not finish: "
            + str(control.get("verdict") or "").split(": ", 1)[0].removeprefix("partial control (").rstrip(")")
            + "; its ratios cover the steps both runs reached."
        )
    return ReportView(
        title=f"GSNR report: {model}",
        model=model,
        header=header,
        headline=verdict,
        headline_status=status,
        headline_detail=detail,
        metrics=panel,
        figures=figure_views(run),
        layers=rows,
        layer_note=layer_note,
        settings=_kv(settings),
        versions=_kv(dict(meta.get("versions") or {})),
        command=str(meta.get("command") or "–"),
        notes=notes,
        partial=partial,
        prediction=prediction,
        prediction_detail=prediction_detail,
    )


def _prediction(v: dict[str, Any]) -> tuple[str, str]:
    """("Predicted test loss X (95%: a to b) · gap Y", "measured ...") for the panel's headline number."""
    pred, band = v.get("predicted_test_loss"), v.get("predicted_band")
    if pred is None:
        return "", ""
    text = f"Predicted test loss {fmt(pred)}" + (f" (95%: {fmt(band[0])} to {fmt(band[1])})" if band else "")
    text += f" · predicted gap {fmt(v.get('predicted_gap'))}"
    if v.get("test_loss") is not None:
        detail = f"Measured on the test set: test loss {fmt(v['test_loss'])}, gap {fmt(v.get('generalization_gap'))}"
        if v.get("test_accuracy") is not None:
            detail += f", test accuracy {fmt_pct(v['test_accuracy'])}"
        detail += "."
    else:
        detail = "No test set: this is the estimate, from the training data alone (eq. 19 integrated over the run)."
    return text, detail
