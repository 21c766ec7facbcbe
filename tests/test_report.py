"""The report: verdicts, view-model, escaping, determinism, absent sections, PDF."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch
from torch import nn

from gsnr_diag.core.correlation import pearson
from gsnr_diag.errors import TrajectoryFormatError
from gsnr_diag.report import build_view, load_run, new_run, render_html, render_pdf, save_run, validate_run
from gsnr_diag.report.verdicts import metrics, verdict_values
from gsnr_diag.report.viewmodel import fmt


def fake_trajectory(label: str = "real", n_snapshots: int = 12, n_layers: int = 4, layer_prefix: str = "net") -> dict:
    """A Trajectory.to_dict()-shaped dict with smooth, plausible curves (no training)."""
    layers = [f"{layer_prefix}.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(n_layers)]
    real = label == "real"
    snaps = []
    for k in range(n_snapshots):
        rise = 6 * math.exp(-(((k - n_snapshots / 4) / (n_snapshots / 6)) ** 2)) if real else 0.0
        g = 0.02 * (1 + rise) if real else 0.02 * math.exp(-k / n_snapshots)
        train_loss = 2.3 * math.exp(-k / 4)
        test_loss = 2.3 * math.exp(-k / 5) + 0.05
        snaps.append(
            {
                "step": 10 * k,
                "epoch": k / 2,
                "mean_gsnr": g,
                "gsnr_median": g / 3,
                "gsnr_p90": 2 * g,
                "layer_gsnr": {name: g * (1 + i / 4) for i, name in enumerate(layers)},
                "layer_same_sign": {name: 0.5 + 0.01 * k / n_snapshots for name in layers},
                "osgr": 0.9 - 0.3 * k / n_snapshots,
                "mean_same_sign": 0.5 + (0.06 if real else 0.004) * (1 - math.exp(-k / 3)),
                "opposite_sign": 0.5 + 0.1 * k / n_snapshots,
                "opposite_sign_top10": 0.5 + 0.3 * k / n_snapshots,
                "delta_g_weight_corr": None if k == 0 else -0.3 * math.exp(-k / 4),
                "train_loss": train_loss,
                "test_loss": test_loss,
                "generalization_gap": test_loss - train_loss,
                "train_accuracy": 1 - 0.9 * math.exp(-k / 4),
                "test_accuracy": 0.95 - 0.85 * math.exp(-k / 5),
                "elapsed": float(k),
                "undefined": 0,
                "extra": {},
            }
        )
    metadata = {
        "model": "toy (Sequential)",
        "param_counts": {name: (64 if name.endswith("weight") else 8) for name in layers},
        "n_train": 400,
        "n_test": 100,
        "task": "classification",
        "settings": {"epochs": 3, "lr": 0.05, "batch_size": 32},
        "seed": 0,
        "device": "cpu",
        "versions": {"python": "3", "torch": "2"},
        "command": "gsnr-diag report toy.py",
        "label": label,
    }
    return {"schema_version": 1, "kind": "gsnr-diag-trajectory", "metadata": metadata, "snapshots": snaps}


def fake_run(control: bool = True, osgr: bool = True, **kw) -> dict:
    real = fake_trajectory("real", **kw)
    ctrl = None
    if control:
        shuffled = fake_trajectory("shuffled", **kw)
        ratio = [a["mean_gsnr"] / b["mean_gsnr"] for a, b in zip(real["snapshots"], shuffled["snapshots"])]
        ctrl = {
            "real": real,
            "shuffled": shuffled,
            "steps": [s["step"] for s in real["snapshots"]],
            "ratio": ratio,
            "final_ratio": ratio[-1],
            "peak_ratio": max(ratio[1:]),
            "verdict": "fake",
            "label_noise": 1.0,
        }
    results = None
    if osgr:
        results = [
            {
                "epochs": [0, 1, 2, 5],
                "lhs": [0.9, 0.8, 0.72, 0.5],
                "rhs": [0.88, 0.81, 0.7, 0.55],
                "settings": {"n": 100, "M": 4, "lr": 0.001},
            },
            {
                "epochs": [0, 1, 2, 5],
                "lhs": [0.6, 0.55, 0.5, 0.3],
                "rhs": [0.62, 0.5, 0.52, 0.33],
                "settings": {"n": 50, "M": 4, "lr": 0.001},
            },
        ]
    return new_run(real, control=ctrl, osgr=results, metadata={"date": "2026-01-01 00:00 UTC"})


# ----------------------------------------------------------------------------- view-model


def test_fmt_and_pearson():
    assert fmt(None) == "–"
    assert fmt(0.123456) == "0.123"
    assert fmt(12345.6) == "12,346"
    assert fmt(1.5e-5) == "1.50e-05"
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2], [1, 2]) is None


def test_verdict_values_from_run():
    run = fake_run()
    v = verdict_values(run)
    snaps = run["trajectory"]["snapshots"]
    assert v["final_mean_gsnr"] == snaps[-1]["mean_gsnr"]
    assert v["peak_mean_gsnr"] == max(s["mean_gsnr"] for s in snaps)
    assert v["control_ratio"] == run["control"]["final_ratio"]
    assert v["osgr_final"] == snaps[-1]["osgr"]
    # eq. 19 over the run: each training-loss decrease weighted by the OSGR at both ends of its interval
    drops = [((a["osgr"] + b["osgr"]) / 2, a["train_loss"] - b["train_loss"]) for a, b in zip(snaps, snaps[1:])]
    assert v["osgr"] == pytest.approx(sum(r * d for r, d in drops) / sum(d for _, d in drops))
    assert v["integrated_osgr"].value == v["osgr"]
    first, last = snaps[0], snaps[-1]
    assert v["realized_ratio"] == pytest.approx(
        (first["test_loss"] - last["test_loss"]) / (first["train_loss"] - last["train_loss"])
    )
    assert v["final_gsnr_n"] == pytest.approx(last["mean_gsnr"] * 400)
    assert v["same_sign"] == snaps[-1]["mean_same_sign"]
    rows = metrics(run, v)
    statuses = {m.key: m.status for m in rows}
    assert set(statuses.values()) <= {"good", "watch", "bad", "inconclusive", "n/a", "info"}
    assert [m.key for m in rows if m.graded] == ["integrated_osgr", "control_separation", "early_rise"]
    assert statuses["final_mean_gsnr"] == "info"  # described, not graded: it collapses once the data are fitted
    shown = {m.key: m.display for m in rows}
    assert shown["integrated_osgr"] == fmt(v["osgr"])  # the graded value is the value shown


# ----------------------------------------------------------------------------- HTML


def test_html_is_self_contained_and_deterministic():
    run = fake_run()
    html = render_html(run)
    assert html.startswith("<!DOCTYPE html>")
    assert "<style>" in html and "@page" in html  # CSS inlined
    assert html.count("<svg") >= 7  # every figure inline, incl. the OSGR scatter
    for needle in ('src="http', "src='http", 'href="http', "url(http", "<link", "@import", "<script"):
        assert needle not in html  # nothing fetched from the network
    assert render_html(run) == html


def test_saved_run_rerenders_to_same_html(tmp_path):
    run = fake_run()
    html = render_html(run)
    path = save_run(run, tmp_path / "run.json")
    assert render_html(load_run(path)) == html


def test_absent_sections_are_left_out_with_a_note():
    html = render_html(fake_run(control=False, osgr=False))
    assert "shuffled labels</text>" not in html and ">shuffled labels<" not in html
    assert "No shuffled-label control in this run" in html
    assert "The OSGR experiment was not run" in html
    scatter = html.split('id="fig-osgr-scatter"', 1)[1].split("</section>", 1)[0]
    assert "<svg" not in scatter  # not drawn empty
    # the control's verdict row says so instead of inventing a number
    assert "not run" in html


def test_with_control_and_osgr_everything_is_drawn():
    html = render_html(fake_run())
    scatter = html.split('id="fig-osgr-scatter"', 1)[1].split("</section>", 1)[0]
    assert "<svg" in scatter and "Pearson c" in scatter
    assert "shuffled labels" in html


def test_user_strings_are_escaped():
    """A module registered under a name containing <script> appears escaped, never as markup."""
    from gsnr_diag.dynamics.monitor import Monitor
    from gsnr_diag.dynamics.training import train

    evil = "<script>alert(1)</script>"
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(evil, nn.Linear(3, 4))
    model.add_module("relu", nn.ReLU())
    model.add_module("out", nn.Linear(4, 2))
    X, Y = torch.randn(24, 3), torch.randint(0, 2, (24,))
    monitor = Monitor(model, (X, Y), every=2, metadata={"model": f"{evil} model"})
    traj = train(model, (X, Y), epochs=2, lr=0.1, batch_size=8, monitor=monitor, progress=False)
    assert any(evil in name for name in traj.snapshots[0].layer_gsnr)
    run = new_run(
        traj,
        final_stats=monitor.last_stats,
        metadata={"command": f"gsnr-diag report '{evil}.py'", "settings": {evil: evil}},
    )
    html = render_html(run)
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert f"{evil}.weight" not in html


def test_validate_run_errors(tmp_path):
    with pytest.raises(TrajectoryFormatError, match="not a gsnr-diag run"):
        validate_run({"kind": "something"})
    run = fake_run()
    run["schema_version"] = 99
    with pytest.raises(TrajectoryFormatError, match="newer"):
        validate_run(run)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TrajectoryFormatError, match="not valid JSON"):
        load_run(bad)


def test_partial_run_says_so():
    run = fake_run(control=False, osgr=False)
    run["metadata"].update(partial=True, stopped="interrupted (Ctrl-C)")
    html = render_html(run)
    assert "did not finish" in html and "interrupted (Ctrl-C)" in html


# ----------------------------------------------------------------------------- PDF


def test_pdf_large_run_pages_text_and_size(tmp_path):
    """~50 snapshots × ~20 layers render in seconds, stay small, and the PDF carries the verdict numbers."""
    from pypdf import PdfReader

    run = fake_run(n_snapshots=50, n_layers=20)
    t0 = time.perf_counter()
    html = render_html(run)
    path = render_pdf(html, tmp_path / "report.pdf")
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, elapsed  # seconds on an idle machine; generous for a shared CI box
    assert len(html.encode()) < 3_000_000
    assert path.stat().st_size < 3_000_000
    reader = PdfReader(io.BytesIO(path.read_bytes()))
    assert len(reader.pages) >= 3
    text = " ".join(page.extract_text() for page in reader.pages)
    norm = " ".join(text.split())
    view = build_view(run)
    for metric in view.metrics:
        first = metric.display.split(" ")[0]
        assert first in norm, (metric.label, first)
    assert "page 1 of" in norm  # page numbers from the print CSS


def test_osgr_only_run_still_draws_its_scatter():
    run = fake_run(control=False, osgr=True)
    run["trajectory"] = None
    html = render_html(run)
    assert 'id="fig-osgr-scatter"' in html or "fig-osgr-scatter" in html
    assert "<svg" in html
