"""Figures for the report: plain lists in, a self-contained SVG string out.

matplotlib is imported lazily (inside :func:`_new_figure`) and used through its
object-oriented API with the SVG canvas, so no global backend is touched and no
display is needed. Every figure is readable in grayscale print: series differ by line
style and marker, not by colour alone. Output is deterministic (fixed ``svg.hashsalt``,
no date in the metadata), so the same run renders to byte-identical HTML.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

__all__ = [
    "line_figure",
    "stacked_figure",
    "heatmap_figure",
    "scatter_figure",
    "Series",
]

Number = float | int | None

# Grayscale-safe styles: (color, linestyle, marker). Colours are the Okabe–Ito palette;
# the line style and marker alone tell the series apart on a black-and-white print.
_STYLES = [
    ("#0072B2", "-", "o"),
    ("#D55E00", "--", "s"),
    ("#009E73", ":", "^"),
    ("#CC79A7", "-.", "D"),
    ("#000000", (0, (5, 1, 1, 1)), "v"),
    ("#E69F00", (0, (1, 2)), "x"),
]

_RC = {
    "svg.fonttype": "none",  # text stays text: small, selectable, searchable in the PDF
    "svg.hashsalt": "gsnr-diag",  # deterministic element ids
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "image.cmap": "viridis",
    "text.usetex": False,  # user strings are drawn literally (see literal()), never through LaTeX
}

#: What a log axis or the log colour scale spans; values outside are drawn at its ends (log ticks far
#: beyond it overflow a float). A linear axis spans ±LOG_RANGE[1] alike. Tables print the true values.
LOG_RANGE = (1e-100, 1e100)


def drawable(value: float, log: bool = False) -> float:
    """``value`` clamped into what an axis can draw (see :data:`LOG_RANGE`)."""
    lo, hi = LOG_RANGE
    return min(max(value, lo), hi) if log else min(max(value, -hi), hi)


def literal(text: str) -> str:
    """``text`` drawn as written: every ``$`` escaped, so matplotlib never parses a user's name as math.

    A module or parameter named ``$x$`` (or a setting holding ``$``) would otherwise be typeset as
    mathtext — or break rendering for good when it is not valid mathtext.
    """
    return str(text).replace("$", r"\$")


class Series:
    """One line of a line figure: ``x`` and ``y`` lists (``None`` = missing point)."""

    def __init__(
        self,
        label: str,
        x: Sequence[Number],
        y: Sequence[Number],
        *,
        axis: str = "left",
        style: int | None = None,
        band: tuple[Sequence[Number], Sequence[Number]] | None = None,
    ) -> None:
        self.label = label
        self.x = list(x)
        self.y = list(y)
        self.axis = axis
        self.style = style
        self.band = band  # (low, high) per x: drawn as a shaded band behind the line

    def points(self, log: bool = False) -> tuple[list[float], list[float]]:
        """Finite points only (positive ones on a log axis), in order."""
        xs, ys = [], []
        for a, b in zip(self.x, self.y):
            if a is None or b is None:
                continue
            a, b = float(a), float(b)
            if not (math.isfinite(a) and math.isfinite(b)) or (log and b <= 0):
                continue
            xs.append(drawable(a))
            ys.append(drawable(b, log))
        return xs, ys


def _mpl():
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    return matplotlib, Figure, FigureCanvasSVG


def _new_figure(width: float = 6.4, height: float = 3.0):
    matplotlib, Figure, FigureCanvasSVG = _mpl()
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def _to_svg(fig) -> str:
    matplotlib, _, _ = _mpl()
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "gsnr-diag"})
    text = buf.getvalue()
    # Drop the XML prolog and DOCTYPE: the SVG is embedded inline in HTML.
    start = text.find("<svg")
    svg = text[start:] if start >= 0 else text
    # The RDF metadata block (creator, format) is dead weight inline.
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    # Let CSS size the figure: keep the viewBox, make it scale to the column width.
    svg = svg.replace("<svg ", '<svg class="figure-svg" preserveAspectRatio="xMidYMid meet" ', 1)
    return svg


def _step_axis(ax, xs_all: Sequence[float]) -> None:
    """Symmetric-log step axis (linear up to step 10, log beyond), so the early phase gets room."""
    if xs_all and max(xs_all) > 20:
        ax.set_xscale("symlog", linthresh=10, linscale=0.6)
        ax.set_xlim(left=0)


def _draw(target, s: Series, i: int, log: bool) -> object:
    color, ls, marker = _STYLES[(s.style if s.style is not None else i) % len(_STYLES)]
    xs, ys = s.points(log=log and s.axis == "left")
    n = len(xs)
    if s.band is not None:
        lo, hi = s.band
        pts = [
            (float(a), float(b), float(c))
            for a, b, c in zip(s.x, lo, hi)
            if a is not None and b is not None and c is not None and math.isfinite(float(b)) and math.isfinite(float(c))
        ]
        if pts:
            target.fill_between(
                [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], color=color, alpha=0.18, linewidth=0
            )
    (h,) = target.plot(
        xs,
        ys,
        color=color,
        linestyle=ls,
        marker=marker,
        markersize=3.5,
        markevery=max(1, n // 12) if n else 1,
        linewidth=1.4,
        label=literal(s.label),
    )
    return h


def line_figure(
    series: Sequence[Series],
    *,
    xlabel: str,
    ylabel: str,
    right_ylabel: str | None = None,
    log: bool = False,
    hline: tuple[float, str] | None = None,
    height: float = 3.4,
    step_axis: bool = True,
) -> str:
    """Line plot of one or more series (optional right axis, log scale, reference line, bands) as SVG.

    ``step_axis``: the x axis is a training step, drawn symmetric-log (see :func:`_step_axis`).
    """
    matplotlib, _, _ = _mpl()
    with matplotlib.rc_context(_RC):
        fig = _new_figure(height=height)
        ax = fig.add_subplot(1, 1, 1)
        ax2 = None
        handles = []
        for i, s in enumerate(series):
            target = ax
            if s.axis == "right":
                if ax2 is None:
                    ax2 = ax.twinx()
                    ax2.grid(False)
                    ax2.spines["right"].set_visible(True)
                target = ax2
            handles.append(_draw(target, s, i, log))
        if log:
            ax.set_yscale("log")
        if hline is not None:
            value, label = hline
            h = ax.axhline(value, color="#555555", linestyle=(0, (2, 2)), linewidth=1.0, label=literal(label))
            handles.append(h)
        if step_axis:
            _step_axis(ax, [float(x) for s in series for x in s.points()[0]])
        ax.set_xlabel(literal(xlabel))
        ax.set_ylabel(literal(ylabel))
        if ax2 is not None and right_ylabel:
            ax2.set_ylabel(literal(right_ylabel))
        if handles:
            # Below the axes, outside the data: never hides a curve.
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), frameon=False)
        return _to_svg(fig)


def stacked_figure(
    panels: Sequence[tuple[str, Sequence[Series]]], *, xlabel: str, height_per_panel: float = 1.55
) -> str:
    """Panels stacked over one shared step axis (symmetric-log), one y axis each — no twin axes to collide."""
    matplotlib, _, _ = _mpl()
    panels = [(label, list(ss)) for label, ss in panels if ss]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(height=0.9 + height_per_panel * max(1, len(panels)))
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        handles = []
        k = 0
        for ax, (ylabel, series) in zip(axes, panels):
            for s in series:
                handles.append(_draw(ax, s, k, False))
                k += 1
            ax.set_ylabel(ylabel)
        _step_axis(axes[0], [float(x) for _, ss in panels for s in ss for x in s.points()[0]])
        axes[-1].set_xlabel(xlabel)
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), frameon=False)
        return _to_svg(fig)


def heatmap_figure(
    rows: Sequence[str],
    steps: Sequence[int],
    values: Sequence[Sequence[Number]],
    *,
    xlabel: str = "step",
    colorbar_label: str = "mean GSNR (log scale)",
) -> str:
    """Layers × steps heat map on a log colour scale (viridis: monotone in lightness) as SVG.

    Missing or non-positive values are drawn as hatched gaps, not as a colour.
    """
    import numpy as np

    matplotlib, _, _ = _mpl()
    from matplotlib.colors import LogNorm

    data = np.array(
        [
            [(float(v) if v is not None and math.isfinite(float(v)) and float(v) > 0 else np.nan) for v in row]
            for row in values
        ],
        dtype=float,
    )
    masked = np.ma.masked_invalid(data)
    finite = data[np.isfinite(data)]
    with matplotlib.rc_context(_RC):
        height = min(9.0, 1.4 + 0.22 * max(1, len(rows)))
        fig = _new_figure(height=height)
        ax = fig.add_subplot(1, 1, 1)
        ax.grid(False)
        ax.set_facecolor("#ffffff")
        ax.patch.set_hatch("////")
        ax.patch.set_edgecolor("#bbbbbb")
        if finite.size:
            data = np.clip(data, LOG_RANGE[0], LOG_RANGE[1])
            masked = np.ma.masked_invalid(data)
            lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
            if hi <= lo:
                lo, hi = (lo / 10.0, hi) if lo >= LOG_RANGE[1] / 10 else (lo, lo * 10.0)
            norm = LogNorm(vmin=lo, vmax=hi)
            mesh = ax.imshow(masked, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis")
            cb = fig.colorbar(mesh, ax=ax, pad=0.01)
            cb.set_label(literal(colorbar_label))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([literal(_short(r)) for r in rows])
        n = len(steps)
        if n:
            idx = sorted(set(np.linspace(0, n - 1, num=min(n, 8)).round().astype(int).tolist()))
            ax.set_xticks(idx)
            ax.set_xticklabels([literal(str(steps[i])) for i in idx])
        ax.set_xlabel(literal(xlabel))
        return _to_svg(fig)


def scatter_figure(
    groups: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
) -> str:
    """Scatter of (x, y) groups with the line y = x, as SVG (one marker shape per group)."""
    matplotlib, _, _ = _mpl()
    with matplotlib.rc_context(_RC):
        fig = _new_figure(width=5.2, height=4.0)
        ax = fig.add_subplot(1, 1, 1)
        allv: list[float] = []
        for i, (label, xs, ys) in enumerate(groups):
            pts = [
                (drawable(float(a)), drawable(float(b)))
                for a, b in zip(xs, ys)
                if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
            ]
            if not pts:
                continue
            color, _, marker = _STYLES[i % len(_STYLES)]
            xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
            if marker in ("x", "+"):  # unfilled markers take a plain colour
                ax.scatter(xs_, ys_, s=22, marker=marker, color=color, linewidths=1.0, label=literal(label))
            else:  # alternate filled / hollow so groups differ in grayscale too
                ax.scatter(
                    xs_,
                    ys_,
                    s=22,
                    marker=marker,
                    facecolors="none" if i % 2 else color,
                    edgecolors=color,
                    linewidths=1.0,
                    label=literal(label),
                )
            allv += [v for p in pts for v in p]
        if allv:
            lo, hi = min(allv), max(allv)
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot(
                [lo - pad, hi + pad],
                [lo - pad, hi + pad],
                color="#444444",
                linestyle="--",
                linewidth=1.0,
                label="y = x",
            )
        ax.set_xlabel(literal(xlabel))
        ax.set_ylabel(literal(ylabel))
        if title:
            ax.set_title(literal(title))
        ax.legend(loc="best", frameon=True, framealpha=0.85)
        return _to_svg(fig)


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
