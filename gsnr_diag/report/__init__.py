"""The generalization report: run dict → view-model → HTML (jinja2, inline SVG) → PDF (weasyprint).

Heavy dependencies (matplotlib, jinja2, weasyprint) are imported only when a report is rendered.
"""

from .render import render_html, render_pdf, write_html
from .run import RUN_KIND, RUN_SCHEMA_VERSION, load_run, new_run, save_run, validate_run
from .viewmodel import THRESHOLDS, build_view, verdict_values

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
