"""Per-layer histograms of log10 GSNR, small enough to keep in every snapshot of a run JSON — pure math.

For each parameter tensor, over its elements with a finite, positive GSNR r_j (eq. 2): the counts of
log10 r_j in ``bins`` equal-width bins between their minimum and maximum, with the moments TensorBoard's
raw histograms take (``num``, ``sum``, ``sum_squares``, ``min``, ``max``). Undefined (ρ² = 0) and zero
GSNR elements are left out (log10 0 = −∞) and counted in ``left_out``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["LOG10_GSNR_BINS", "log10_gsnr_histogram", "layer_log10_gsnr_histograms"]

LOG10_GSNR_BINS = 16


def log10_gsnr_histogram(r: torch.Tensor, bins: int = LOG10_GSNR_BINS) -> dict[str, Any] | None:
    """``{"edges", "counts", "num", "sum", "sum_squares", "min", "max", "left_out"}`` of log10 r; ``None`` if empty."""
    flat = r.detach().flatten().to("cpu", torch.float64)
    keep = torch.isfinite(flat) & (flat > 0)
    values = flat[keep].log10().numpy()
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:  # one value: a bin of width 1 around it
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "num": int(values.size),
        "sum": float(values.sum()),
        "sum_squares": float(np.square(values).sum()),
        "min": float(values.min()),
        "max": float(values.max()),
        "left_out": int(flat.numel() - values.size),
    }


def layer_log10_gsnr_histograms(gsnr: dict[str, torch.Tensor], bins: int = LOG10_GSNR_BINS) -> dict[str, Any]:
    """:func:`log10_gsnr_histogram` of every parameter tensor (tensors with no defined element left out)."""
    out = {}
    for name, r in gsnr.items():
        h = log10_gsnr_histogram(r, bins)
        if h is not None:
            out[name] = h
    return out


def valid_histogram(h: Any) -> bool:
    """Whether ``h`` has the shape :func:`log10_gsnr_histogram` writes (used when reading a run JSON)."""
    if not isinstance(h, dict):
        return False
    edges, counts = h.get("edges"), h.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) != len(counts) + 1:
        return False
    numbers = [*edges, *counts, h.get("num"), h.get("sum"), h.get("sum_squares"), h.get("min"), h.get("max")]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
