"""Render a run to one self-contained HTML file (jinja2, inline CSS and SVG) and to PDF (weasyprint).

One ``jinja2.Environment(autoescape=True)``: every string from the run (model and layer
names, settings, the command line) is escaped. ``select_autoescape()`` is deliberately
not used — it does not escape ``*.html.jinja2`` names. The only ``|safe`` values are the
SVGs produced by matplotlib (which escapes its own text) and the packaged CSS.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes, atomic_write_text
from .run import validate_run
from .verdicts import THRESHOLDS
from .viewmodel import build_view

__all__ = ["render_html", "render_pdf", "write_html"]


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gsnr_diag.templates", "."),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env


def render_html(run: dict[str, Any]) -> str:
    """The report of a run dict (see :mod:`gsnr_diag.report.run`) as one self-contained HTML string.

    Deterministic: the same run gives byte-identical HTML (no clock is read here; the
    date shown is the one stored in the run).
    """
    validate_run(run)
    view = build_view(run)
    template = _environment().get_template("report.html.jinja2")
    return template.render(view=view, thresholds=THRESHOLDS)


def write_html(html: str, path: str | os.PathLike[str]) -> Path:
    """Write the report HTML atomically (temp file + rename)."""
    return atomic_write_text(path, html)


def render_pdf(html: str, path: str | os.PathLike[str]) -> Path:
    """Print the report HTML to a PDF with weasyprint (the print CSS gives A4 and page numbers).

    Written atomically (temp file + rename), like every output."""
    import logging

    import weasyprint

    # weasyprint logs every unsupported CSS property at WARNING; they are cosmetic here.
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    data = weasyprint.HTML(string=html, base_url=None).write_pdf()
    return atomic_write_bytes(path, data)
