"""The one place that turns "a number or not" into a JSON-safe float (no torch import: the pytest plugin uses it)."""

from __future__ import annotations

import math
from typing import Any


def clean_float(x: Any) -> float | None:
    """A finite Python float, or ``None`` for ``None``/bool/NaN/inf/non-numbers (JSON has no NaN)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
