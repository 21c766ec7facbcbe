"""``--gsnr-save`` and ``--gsnr-report``: the plugin's files, written once at the end of the session.

Every measurement of every test becomes a run dict (:func:`gsnr_diag.report.run.new_run`, the format the
CLI's report renders). ``--gsnr-save`` writes them as run JSON files plus ``index.json``. ``--gsnr-report``
is a view on the report's render path: one section per test, built from the same run dicts, with the
report's figures (matplotlib SVG), its verdict values graded by the one threshold table, and the report's
jinja environment and CSS; a ``.pdf`` suffix prints it with the report's weasyprint step.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from .._format import number
from .._io import atomic_write_text, environment_info, write_json
from ..report import figures
from ..report.render import _environment, render_pdf
from ..report.run import new_run, snapshot_series, snapshots
from ..report.verdicts import headline, metrics, verdict_values
from .session import GsnrSession, Measurement, TestRecord, point_of

__all__ = ["INDEX_SCHEMA_VERSION", "measurement_run", "page_view", "render_page", "unique_names", "write_files"]

INDEX_SCHEMA_VERSION = 1
TEMPLATE = "plugin_report.html.jinja2"
TITLES = {
    "stats": "gradient statistics",
    "snapshot": "snapshot",
    "trajectory": "trajectory",
    "control": "shuffled-label control",
}


def _html_number(x: Any) -> str:
    """Numbers on the page as in the report: 3 significant digits."""
    return number(x, digits=3, missing="–")


def safe_name(nodeid: str) -> str:
    """A file name and HTML id from a pytest node id."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")
    return s[-150:] or "test"


def unique_names(nodeids: list[str]) -> dict[str, str]:
    """:func:`safe_name` of each node id, made unique (ignoring case, for case-insensitive file systems).

    Node ids that differ only in replaced characters (``t[a b]``, ``t[a_b]``, ``t[a/b]``) all give
    ``t_a_b``; every one after the first gets 8 hex digits of the SHA-1 of its node id appended.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for nodeid in nodeids:
        base = name = safe_name(nodeid)
        if name.lower() in used:
            digest = hashlib.sha1(nodeid.encode("utf-8")).hexdigest()[:8]
            name, k = f"{base}-{digest}", 2
            while name.lower() in used:
                name, k = f"{base}-{digest}-{k}", k + 1
        used.add(name.lower())
        out[nodeid] = name
    return out


# ------------------------------------------------------------------------------------------- runs


def measurement_run(rec: TestRecord, m: Measurement, machine: dict[str, Any]) -> dict[str, Any]:
    """A saved run (docs/CONTRACT.md "run JSON") for one measurement of one test."""
    if m.run is not None:  # made by the xdist worker that ran the test (gsnr_diag.plugin.workers)
        return m.run
    trajectory = control = final_stats = None
    if m.kind == "control":
        control, trajectory = m.result, m.result.real
    elif m.kind == "trajectory":
        trajectory = m.result
    elif m.kind == "snapshot":
        final_stats = m.result.to_dict() if hasattr(m.result, "to_dict") else m.result
    else:
        final_stats = m.result  # new_run takes GradientStats.aggregates()
    metadata = {
        "source": "pytest",
        "test": rec.nodeid,
        "measurement": m.kind,
        "label": m.label,
        "outcome": rec.outcome,
        "checks": [c.to_dict() for c in rec.checks],
        "machine": machine,
    }
    return new_run(trajectory, control=control, final_stats=final_stats, metadata=metadata)


def _save(session: GsnrSession, records: list[TestRecord], runs: list[list[dict[str, Any]]], machine: Any) -> None:
    """One run JSON (``"kind": "gsnr-diag-run"``) per measurement, plus ``index.json`` for the session."""
    tests, written = [], set()
    stems = unique_names([rec.nodeid for rec in records])
    for rec, rec_runs in zip(records, runs):
        files = []
        for i, (m, run) in enumerate(zip(rec.measurements, rec_runs), 1):
            name = f"{stems[rec.nodeid]}--{i}-{m.kind}.json"
            write_json(session.save_dir / name, run)
            files.append(name)
            written.add(name.lower())
        tests.append(
            {"test": rec.nodeid, "outcome": rec.outcome, "checks": [c.to_dict() for c in rec.checks], "files": files}
        )
    index = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "kind": "gsnr-diag-pytest-session",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "tests": tests,
    }
    write_json(session.save_dir / "index.json", index)
    session.written.append((f"{len(written)} measurement JSON file(s) + index.json", session.save_dir))


# ------------------------------------------------------------------------------- the report view


@dataclass
class MeasurementView:
    """One measurement of a test: its scalars; for a trajectory or control the report's verdict and figure."""

    kind: str
    title: str
    scalars: list[tuple[str, str]]
    verdict: tuple[str, str, str] | None = None  # (headline, status, detail) of the report's verdict panel
    metrics: list[Any] = field(default_factory=list)  # the panel's rows (report.verdicts.Metric) that are graded
    svg: str | None = None
    caption: str = ""
    layers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class TestSection:
    """One test: outcome, its row of the index table, its threshold checks and measurements."""

    test: str
    anchor: str
    outcome: str
    passed: bool
    headline: list[str]
    checks: list[dict[str, Any]]
    measurements: list[MeasurementView]

    __test__ = False  # not a test class, whatever pytest's collection thinks of the name


def _mean_gsnr_figure(run: dict[str, Any]) -> tuple[str | None, str]:
    """The report's first figure, mean GSNR over training on a log scale (real vs shuffled labels); its caption."""
    steps, real = snapshot_series(snapshots(run.get("trajectory")), "mean_gsnr")
    shuffled = snapshots((run.get("control") or {}).get("shuffled"))
    if not any(v is not None and v > 0 for v in real):
        return None, "Mean GSNR is undefined or zero at every snapshot: nothing to draw on a log scale."
    series = [figures.Series("real labels" if shuffled else "training set", steps, real, style=0)]
    if shuffled:
        series.append(figures.Series("shuffled labels", *snapshot_series(shuffled, "mean_gsnr"), style=1))
    svg = figures.line_figure(series, xlabel="training step", ylabel="mean GSNR (log scale)", log=True)
    caption = "Mean GSNR r = ḡ²/ρ² over all parameters (eq. 2), measured on the training set at each snapshot"
    return svg, caption + (", with real and with shuffled labels." if shuffled else ".")


def _verdict(view: MeasurementView, run: dict[str, Any]) -> None:
    """The report's verdict panel of a trajectory or control run: its headline and the rows it could grade."""
    rows = metrics(run, verdict_values(run))
    view.verdict = headline(rows)
    view.metrics = [m for m in rows if m.status != "n/a"]


def _scalars(kind: str, run: dict[str, Any], point: dict[str, Any]) -> list[tuple[str, str]]:
    f = _html_number
    last = [
        ("mean GSNR", f(point["mean_gsnr"])),
        ("OSGR (eq. 19)", f(point["osgr"])),
        ("same-sign fraction", f(point["mean_same_sign"])),
    ]
    if kind == "stats":
        stats = run.get("final_stats") or {}
        q = stats.get("gsnr_quantiles") or {}
        return [
            ("samples n", str(point["n"])),
            *last,
            ("median GSNR", f(q.get("median"))),
            ("p90 GSNR", f(q.get("p90"))),
            ("opposite-sign top-10% |W|", f(stats.get("opposite_sign_top10"))),
            ("measured in", f"{stats.get('mode', '?')} mode"),
        ]
    if kind == "snapshot":
        return [("step", str(point["step"])), *last]
    snaps = snapshots(run.get("trajectory"))
    steps = f"{len(snaps)} (steps {snaps[0]['step']}..{snaps[-1]['step']})" if snaps else "0"
    if kind == "trajectory":
        return [("snapshots", steps), *last]
    control = run.get("control") or {}
    return [
        ("peak ratio real/shuffled", f(control.get("peak_ratio"))),
        ("final ratio real/shuffled", f(control.get("final_ratio"))),
        ("label noise", f(control.get("label_noise"))),
        ("verdict", str(control.get("verdict") or "–")),
        ("snapshots", steps),
    ] + [(f"{k} (real labels, last)", v) for k, v in last]


def measurement_view(run: dict[str, Any]) -> MeasurementView:
    """What the page shows of one run dict: scalars, the report's verdicts and figure 1, the layers."""
    meta = run.get("metadata") or {}
    kind = meta.get("measurement") or "stats"
    title = TITLES.get(kind, kind) + (f" — {meta['label']}" if meta.get("label") else "")
    if run.get("final_stats") is not None:
        point = point_of(run["final_stats"])
    else:
        snaps = snapshots(run.get("trajectory"))
        point = point_of(snaps[-1] if snaps else {})
    view = MeasurementView(kind, title, _scalars(kind, run, point))
    if kind in ("trajectory", "control"):
        _verdict(view, run)
        view.svg, view.caption = _mean_gsnr_figure(run)
    layers = sorted(point["layer_gsnr"].items(), key=lambda kv: float("-inf") if kv[1] is None else kv[1])
    view.layers = [(name, _html_number(v), _html_number(point["layer_same_sign"].get(name))) for name, v in layers]
    return view


def page_view(records: list[TestRecord], runs: list[list[dict[str, Any]]], machine: dict[str, Any]) -> dict[str, Any]:
    """The plugin page's view-model: one section per test that measured something."""
    sections = []
    anchors = unique_names([rec.nodeid for rec in records])
    for rec, rec_runs in zip(records, runs):
        h = rec.headline()
        checks = [
            {**c.to_dict(), "measured": _html_number(c.measured) if c.measured is not None else "undefined"}
            for c in rec.checks
        ]
        sections.append(
            TestSection(
                test=rec.nodeid,
                anchor=anchors[rec.nodeid],
                outcome=rec.outcome or "?",
                passed=rec.passed,
                headline=[_html_number(h[k]) for k in ("mean_gsnr", "osgr", "same_sign", "control_ratio")],
                checks=checks,
                measurements=[measurement_view(run) for run in rec_runs],
            )
        )
    return {
        "title": "gsnr-diag: GSNR checks of the test suite",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "sections": sections,
        "n_failed": sum(not s.passed for s in sections),
    }


def render_page(view: dict[str, Any]) -> str:
    """The page as one self-contained HTML string, through the report's jinja environment."""
    return _environment().get_template(TEMPLATE).render(**view)


def _report(session: GsnrSession, records: list[TestRecord], runs: list[list[dict[str, Any]]], machine: Any) -> None:
    html = render_page(page_view(records, runs, machine))
    path = session.report_path
    if path.suffix.lower() == ".pdf":
        render_pdf(html, path)
    else:
        atomic_write_text(path, html)
    session.written.append((f"report ({len(records)} test section(s))", path))


# ------------------------------------------------------------------------------------------ entry


def write_files(session: GsnrSession) -> None:
    """Write ``--gsnr-save`` and ``--gsnr-report``; a failure is reported in the summary, never raised."""
    records = session.measured()
    if not records:
        return
    outputs = []
    if session.save_dir is not None:
        outputs.append((_save, f"--gsnr-save {session.save_dir}"))
    if session.report_path is not None:
        outputs.append((_report, f"--gsnr-report {session.report_path}"))
    try:
        machine = environment_info(extra=("pytest",))
        runs = [[measurement_run(rec, m, machine) for m in rec.measurements] for rec in records]
    except Exception as exc:
        session.errors += [f"{what}: {type(exc).__name__}: {exc}" for _, what in outputs]
        return
    for write, what in outputs:
        try:
            write(session, records, runs, machine)
        except Exception as exc:
            session.errors.append(f"{what}: {type(exc).__name__}: {exc}")
