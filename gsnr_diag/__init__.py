"""gsnr-diag: gradient signal-to-noise ratio diagnostics for PyTorch (Liu et al., ICLR 2020).

The public names below are imported lazily (PEP 562 module ``__getattr__``): importing
``gsnr_diag`` (or ``gsnr_diag.plugin``, which pytest loads in every run through the
``pytest11`` entry point) does not import torch. ``from gsnr_diag import gradient_stats``
imports the defining submodule on first use.

To export a name, map it to its submodule with ``_lazy(".module", "Name", ...)`` under your
anchor below (it also extends ``__all__``); do not add eager ``from .x import y`` lines here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> submodule (relative to this package) that defines it
_LAZY: dict[str, str] = {}

__all__: list[str] = ["__version__"]


def _lazy(module: str, *names: str) -> None:
    """Export ``names`` from ``module`` (e.g. ``".measure"``) on first attribute access."""
    for name in names:
        _LAZY[name] = module
        if name not in __all__:
            __all__.append(name)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_lazy(
    ".errors",
    "ArgumentError",
    "DataError",
    "GsnrDiagError",
    "LossError",
    "ModelError",
    "NonFiniteGradientError",
    "ThresholdError",
    "TrajectoryFormatError",
)
_lazy(".measure", "gradient_stats", "gradient_stats_with_se")
_lazy(".core.uncertainty", "bias_corrected_gsnr", "gsnr_floor")
_lazy(".core.moments", "ChunkMoments", "Moments")
_lazy(".core.stats", "GradientStats")

if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from .core.moments import ChunkMoments, Moments  # noqa: F401
    from .core.stats import GradientStats  # noqa: F401
    from .core.uncertainty import bias_corrected_gsnr, gsnr_floor  # noqa: F401
    from .errors import (  # noqa: F401
        ArgumentError,
        DataError,
        GsnrDiagError,
        LossError,
        ModelError,
        NonFiniteGradientError,
        ThresholdError,
        TrajectoryFormatError,
    )
    from .measure import gradient_stats, gradient_stats_with_se  # noqa: F401

# --- dynamics and experiments ---
_lazy(
    ".experiments", "ControlResult", "OSGRPool", "OSGRResult", "osgr_experiment", "pool_osgr", "shuffled_label_control"
)
_lazy(".dynamics.monitor", "Monitor")
_lazy(".dynamics.schedules", "linear", "logarithmic", "report_schedule")
_lazy(".dynamics.trajectory", "Snapshot", "Trajectory")
_lazy(".dynamics.training", "train")

# --- report ---
_lazy(".report", "render_html", "render_pdf", "load_run", "save_run", "new_run")

# --- plugin: gsnr_diag.plugin (pytest11 entry point), not re-exported here ---

# --- online mode (training mini-batches) ---
_lazy(".dynamics.online", "OnlineGSNR")
