"""The paper's experiments built on dynamics/: the shuffled-label control (Sec. 3.1, Fig. 5) and the
OSGR experiment (Sec. 2.4, eq. 23 vs eq. 19, Fig. 4).

Names are imported lazily (PEP 562): ``gsnr_diag.experiments.results`` (the torch-free result types)
can be imported without torch; ``control`` and ``osgr`` import torch when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "ControlResult": ".results",
    "OSGRPool": ".results",
    "OSGRResult": ".results",
    "pool_osgr": ".results",
    "shuffled_label_control": ".control",
    "osgr_experiment": ".osgr",
}

__all__ = ["ControlResult", "shuffled_label_control", "OSGRPool", "OSGRResult", "osgr_experiment", "pool_osgr"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs only
    from .control import shuffled_label_control
    from .osgr import osgr_experiment
    from .results import ControlResult, OSGRPool, OSGRResult, pool_osgr
