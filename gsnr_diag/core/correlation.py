"""Pearson correlation of paired values (float64), the one used by monitor, OSGR pooling and the report."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def pearson(xs: Any, ys: Any) -> float | None:
    """Pearson correlation of the pairs where both values are finite, in float64.

    ``xs``/``ys``: equally long sequences or arrays (NumPy, or CPU tensors via ``np.asarray``).
    ``None`` with fewer than 3 such pairs or when either side has no spread.
    """
    x = np.asarray(xs, dtype=np.float64).ravel()
    y = np.asarray(ys, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson: {x.size} values against {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    if not keep.all():
        x, y = x[keep], y[keep]
    if x.size < 3:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0 or not math.isfinite(denom):
        return None
    return float(xc @ yc) / denom
