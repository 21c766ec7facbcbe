"""The generalization report: run dict → verdicts → view-model → HTML (jinja2, inline SVG) → PDF.

Torch-free. Heavy dependencies (matplotlib, jinja2, weasyprint) are imported only when a report is
rendered. Layout: run.py (the run JSON), verdicts.py (the verdict panel against the one threshold
table), figure_views.py and figures.py (the figures), viewmodel.py (everything the template shows),
render.py (HTML and PDF).
"""

from .render import render_html, render_pdf, write_html
from .run import RUN_KIND, RUN_SCHEMA_VERSION, load_run, new_run, save_run, validate_run
from .verdicts import THRESHOLDS, verdict_values
from .viewmodel import build_view

__all__ = [
    "RUN_KIND",
    "RUN_SCHEMA_VERSION",
    "THRESHOLDS",
    "build_view",
    "load_run",
    "new_run",
    "render_html",
    "render_pdf",
    "save_run",
    "validate_run",
    "verdict_values",
    "write_html",
]
