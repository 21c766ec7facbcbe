"""Analysis of the verdict-validation zoo (see verdict_validation.py): tables, correlations, errors, threshold fit.

Reads the saved runs, recomputes every verdict with the installed gsnr-diag, and writes
``benchmarks/verdict_validation.json`` and the generated part of ``docs/VALIDATION.md`` (between the
``<!-- zoo:begin -->`` and ``<!-- zoo:end -->`` markers; the text around them is kept).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gsnr_diag._format import number
from gsnr_diag._thresholds import VERDICT_THRESHOLDS, grade
from gsnr_diag.dynamics.generalization import integrated_osgr, predict_test_loss
from gsnr_diag.report import verdicts as V
from gsnr_diag.report.evidence import early_rise_evidence

ORDER = ("bad", "watch", "good")


def _rank(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _rank(a), _rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _series(run: dict, key: str) -> list:
    return [s.get(key) for s in run["trajectory"]["snapshots"]]


def _subsample(run: dict, keep) -> dict:
    """The same run with only the snapshots whose step passes ``keep`` (schedule sensitivity)."""
    traj = dict(run["trajectory"])
    traj["snapshots"] = [s for s in traj["snapshots"] if keep(int(s["step"]))]
    return {**run, "trajectory": traj}


def row_of(run: dict) -> dict:
    z = run["metadata"]["zoo"]
    values = V.verdict_values(run)
    verdict = V.verdict_object(run)
    o = values["integrated_osgr"]
    L, R, S = _series(run, "train_loss"), _series(run, "osgr"), _series(run, "osgr_se")
    test = _series(run, "test_loss")
    last = predict_test_loss(L, R, S)[-1]
    left = predict_test_loss(L, R, S, rule="left")[-1]
    steps = [int(s["step"]) for s in run["trajectory"]["snapshots"]]
    k = max(1, max(steps) // 30) if steps else 1
    lin_only = _subsample(run, lambda s: s % k == 0 or s == max(steps))
    Ll, Rl, Sl = (_series(lin_only, x) for x in ("train_loss", "osgr", "osgr_se"))
    lin = predict_test_loss(Ll, Rl, Sl)[-1]
    meas_test, meas_train = test[-1], L[-1]
    meas_ratio = values["realized_ratio"]
    rise02 = None
    # the early rise over the first 20% of the decrease instead of 50% (a variant checked on the fitting half)
    from gsnr_diag.report import evidence as E

    saved = E.EARLY_PHASE
    try:
        E.EARLY_PHASE = 0.2
        rise02 = early_rise_evidence(run).value
    finally:
        E.EARLY_PHASE = saved
    ind = {i["name"]: i for i in verdict["indicators"]}
    return {
        "name": z["name"],
        "dataset": z["dataset"],
        "arch": z["arch"],
        "n": z["n"],
        "p": z["p"],
        "length": z["length"],
        "epochs": z["epochs"],
        "level": verdict["level"],
        "truth": grade("integrated_osgr", meas_ratio),
        "integrated_osgr": o.value,
        "integrated_osgr_interval": list(o.interval) if o.interval else None,
        "integrated_osgr_left": integrated_osgr(L, R, S, rule="left").value,
        "measured_ratio": meas_ratio,
        "control_separation": ind["control_separation"]["value"],
        "control_status": ind["control_separation"]["status"],
        "early_rise": ind["early_rise"]["value"],
        "early_rise_status": ind["early_rise"]["status"],
        "early_rise_20": rise02,
        "osgr_status": ind["integrated_osgr"]["status"],
        "predicted_test_loss": last.value,
        "predicted_band": [last.low, last.high],
        "predicted_test_loss_left": left.value,
        "predicted_test_loss_linear_schedule": lin.value if lin else None,
        "measured_test_loss": meas_test,
        "train_loss": meas_train,
        "predicted_gap": last.gap,
        "measured_gap": meas_test - meas_train,
        "clean_test_loss": z["clean_test_loss"],
        "clean_test_accuracy": z["clean_test_accuracy"],
        "snapshots": len(steps),
        "cpu_seconds": z["cpu_seconds"],
    }


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _level_rule(r: dict, osgr_t: tuple[float, float], use_rise: bool, rise_key: str = "early_rise") -> str:
    """The verdict's rule on point values (no intervals), with given OSGR thresholds: for the fit."""
    g, w = osgr_t
    o = r["integrated_osgr"]
    lv = "good" if o >= g else "watch" if o >= w else "bad"
    c = r["control_separation"]
    if c is not None:
        lc = grade("control_separation", c)
        lv = min(lv, lc, key=ORDER.index)
    if use_rise and r[rise_key] is not None and lv == "good":
        if grade("early_rise", r[rise_key]) == "bad":
            lv = "watch"
    return lv


def fit(rows: list[dict]) -> dict:
    """Fit the integrated-OSGR thresholds and the early-rise rule on half A (even rows), check on half B."""
    A, B = rows[0::2], rows[1::2]

    def agree(rs, t, rise, key="early_rise"):
        return sum(_level_rule(r, t, rise, key) == r["truth"] for r in rs) / len(rs)

    grid = [(g / 20, w / 20) for g in range(4, 20) for w in range(-4, 20) if w < g]
    default = VERDICT_THRESHOLDS["integrated_osgr"]
    best = max(grid, key=lambda t: (agree(A, t, False), -abs(t[0] - default[0]) - abs(t[1] - default[1])))
    variants = {}
    for name, rise, key in (
        ("without the early rise", False, "early_rise"),
        ("early rise (first 50% of the decrease) caps good → watch", True, "early_rise"),
        ("early rise (first 20% of the decrease) caps good → watch", True, "early_rise_20"),
    ):
        variants[name] = {
            "A": agree(A, default, rise, key),
            "B": agree(B, default, rise, key),
        }
    return {
        "half_A": [r["name"] for r in A],
        "half_B": [r["name"] for r in B],
        "default": list(default),
        "fitted_on_A": list(best),
        "agreement_A_default": agree(A, default, False),
        "agreement_A_fitted": agree(A, best, False),
        "agreement_B_default": agree(B, default, False),
        "agreement_B_fitted": agree(B, best, False),
        "variants": variants,
    }


def summary(rows: list[dict]) -> dict:
    errs = [_rel(r["predicted_test_loss"], r["measured_test_loss"]) for r in rows]
    errs_left = [_rel(r["predicted_test_loss_left"], r["measured_test_loss"]) for r in rows]
    errs_lin = [
        _rel(r["predicted_test_loss_linear_schedule"], r["measured_test_loss"])
        for r in rows
        if r["predicted_test_loss_linear_schedule"] is not None
    ]
    gap_rows = [r for r in rows if abs(r["measured_gap"]) > 1e-3]
    gap = [_rel(r["predicted_gap"], r["measured_gap"]) for r in gap_rows]
    by_length = {
        length: median([_rel(r["predicted_test_loss"], r["measured_test_loss"]) for r in rows if r["length"] == length])
        for length in ("short", "long")
    }
    gap_by_length = {
        length: median([_rel(r["predicted_gap"], r["measured_gap"]) for r in gap_rows if r["length"] == length])
        for length in ("short", "long")
    }
    graded = [r for r in rows if r["level"] != "inconclusive"]
    inside = sum(r["predicted_band"][0] <= r["measured_test_loss"] <= r["predicted_band"][1] for r in rows)
    return {
        "runs": len(rows),
        "spearman_osgr_vs_measured": spearman(
            [r["integrated_osgr"] for r in rows], [r["measured_ratio"] for r in rows]
        ),
        "spearman_osgr_vs_clean_accuracy": spearman(
            [r["integrated_osgr"] for r in rows], [r["clean_test_accuracy"] for r in rows]
        ),
        "test_loss_rel_error_median": median(errs),
        "test_loss_rel_error_worst": max(errs),
        "test_loss_rel_error_median_left_rule": median(errs_left),
        "test_loss_rel_error_median_linear_schedule": median(errs_lin) if errs_lin else None,
        "gap_rel_error_median": median(gap),
        "gap_rel_error_worst": max(gap),
        "measured_inside_band": inside,
        "test_loss_rel_error_median_by_length": by_length,
        "gap_rel_error_median_by_length": gap_by_length,
        "agreement_all": sum(r["level"] == r["truth"] for r in rows) / len(rows),
        "agreement_graded": (sum(r["level"] == r["truth"] for r in graded) / len(graded)) if graded else None,
        "inconclusive": len(rows) - len(graded),
        "levels": {lv: sum(r["level"] == lv for r in rows) for lv in ("good", "watch", "bad", "inconclusive")},
    }


def _f(x, d=3) -> str:
    return number(x, d, "–")


def table(rows: list[dict]) -> str:
    head = (
        "| run | p | verdict | happened | integrated OSGR (95%) | measured | control | early rise | "
        "pred. test loss (95%) | measured test loss | pred. gap | measured gap | clean test acc. |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    out = []
    for r in rows:
        iv = r["integrated_osgr_interval"]
        mark = "" if r["level"] == r["truth"] else " ✗"
        out.append(
            f"| {r['name']} | {r['p']:g} | **{r['level']}**{mark} | {r['truth']} | {_f(r['integrated_osgr'])} "
            f"({_f(iv[0], 2)} to {_f(iv[1], 2)}) | {_f(r['measured_ratio'])} | {_f(r['control_separation'])} "
            f"({r['control_status']}) | {_f(r['early_rise'])} ({r['early_rise_status']}) | "
            f"{_f(r['predicted_test_loss'])} ({_f(r['predicted_band'][0], 2)} to {_f(r['predicted_band'][1], 2)}) | "
            f"{_f(r['measured_test_loss'])} | {_f(r['predicted_gap'])} | {_f(r['measured_gap'])} | "
            f"{100 * r['clean_test_accuracy']:.1f}% |"
        )
    return head + "\n".join(out) + "\n"


def study(out_dir: Path) -> tuple[list[dict], str]:
    """Predictions of the every-step runs against those of the same runs subsampled to coarser schedules."""
    from gsnr_diag.dynamics.schedules import report_schedule
    from gsnr_diag.dynamics.trajectory import Trajectory

    rows = []
    for path in sorted(out_dir.glob("*.every1.json")):
        traj = Trajectory.load(path)
        steps = traj.steps
        total = max(steps)
        sched = report_schedule(total)
        k = max(1, math.ceil(total / 30))
        measured = traj.snapshots[-1].test_loss
        out = {"name": path.name[: -len(".every1.json")], "snapshots": len(steps), "measured_test_loss": measured}
        for label, keep in (
            ("every step", lambda s: True),
            ("report default", lambda s: sched(s) or s == total),
            ("evenly spaced only", lambda s: s % k == 0 or s == total),
        ):
            snaps = [x for x in traj.snapshots if keep(x.step)]
            L, R, S = [x.train_loss for x in snaps], [x.osgr for x in snaps], [x.osgr_se for x in snaps]
            for rule in ("trapezoid", "left"):
                p = predict_test_loss(L, R, S, rule=rule)[-1]
                out[f"{label}, {rule}"] = p.value
        rows.append(out)
    if not rows:
        return rows, ""
    cols = [c for c in rows[0] if "," in c]
    text = (
        "Schedule study: the same runs recorded at every optimizer step, then subsampled (monitoring leaves training "
        "bitwise unchanged, so a subsample is exactly what that schedule records). Predicted final test loss "
        "(relative error against the measured one):\n\n| run | measured | "
        + " | ".join(cols)
        + " |\n|---|---|"
        + "---|" * len(cols)
        + "\n"
    )
    for r in rows:
        cells = [f"{_f(r[c])} ({_rel(r[c], r['measured_test_loss']):.0%})" for c in cols]
        text += (
            f"| {r['name']} ({r['snapshots']} steps) | {_f(r['measured_test_loss'])} | " + " | ".join(cells) + " |\n"
        )
    return rows, text + "\n"


def analyze(out_dir: Path, doc: Path) -> None:
    from verdict_validation import zoo

    names = [s["name"] for s in zoo()]
    rows = []
    for name in names:
        path = out_dir / f"{name}.run.json"
        if path.exists():
            rows.append(row_of(json.loads(path.read_text())))
    s = summary(rows)
    f = fit(rows)
    study_rows, study_text = study(out_dir)
    result = {"summary": s, "fit": f, "runs": rows, "schedule_study": study_rows}
    Path(out_dir).parent.parent.joinpath("verdict_validation.json").write_text(json.dumps(result, indent=1) + "\n")
    text = (
        f"{s['runs']} runs. Verdict = what happened in {s['agreement_all']:.0%} of all runs "
        f"({s['agreement_graded']:.0%} of the {s['runs'] - s['inconclusive']} graded; {s['inconclusive']} "
        f"inconclusive). Levels: {s['levels']}.\n\n"
        f"Spearman correlation of the integrated OSGR (predicted) with the measured generalization "
        f"(held-out loss decrease ÷ training-loss decrease): **{s['spearman_osgr_vs_measured']:.3f}**; with the clean "
        f"test accuracy: {s['spearman_osgr_vs_clean_accuracy']:.3f}.\n\n"
        f"Predicted test loss, relative error against the measured (same-noise held-out) test loss: median "
        f"**{s['test_loss_rel_error_median']:.1%}**, worst {s['test_loss_rel_error_worst']:.0%} "
        f"(left rule: median {s['test_loss_rel_error_median_left_rule']:.1%}; evenly spaced snapshots only: median "
        f"{_pct(s['test_loss_rel_error_median_linear_schedule'])}). The measured test loss lies inside the 95% band "
        f"in {s['measured_inside_band']} of {s['runs']} runs. By length, median test-loss error: short runs "
        f"{s['test_loss_rel_error_median_by_length']['short']:.1%}, long runs "
        f"{s['test_loss_rel_error_median_by_length']['long']:.1%}. Predicted gap: median relative error "
        f"**{s['gap_rel_error_median']:.0%}** (short {s['gap_rel_error_median_by_length']['short']:.0%}, long "
        f"{s['gap_rel_error_median_by_length']['long']:.0%}), worst {s['gap_rel_error_worst']:.0%}.\n\n"
        f"Threshold fit (integrated OSGR, point values, the verdict's rule): half A = {len(f['half_A'])} runs "
        f"(even rows), half B = the other {len(f['half_B'])}. Default (good, watch) = {tuple(f['default'])}: "
        f"agreement A {f['agreement_A_default']:.0%}, B {f['agreement_B_default']:.0%}. Best on A = "
        f"{tuple(f['fitted_on_A'])}: A {f['agreement_A_fitted']:.0%}, B {f['agreement_B_fitted']:.0%}.\n\n"
        "| level rule (point values, default thresholds) | agreement on A | on B |\n|---|---|---|\n"
        + "".join(f"| {k} | {v['A']:.0%} | {v['B']:.0%} |\n" for k, v in f["variants"].items())
        + "\n"
        + study_text
        + table(rows)
    )
    old = doc.read_text() if doc.exists() else "<!-- zoo:begin -->\n<!-- zoo:end -->\n"
    start, end = old.index("<!-- zoo:begin -->"), old.index("<!-- zoo:end -->")
    doc.write_text(old[: start + len("<!-- zoo:begin -->")] + "\n" + text + old[end:])
    print(json.dumps(s, indent=1))
    print(json.dumps({k: v for k, v in f.items() if not k.startswith("half")}, indent=1))


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"
