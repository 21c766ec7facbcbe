"""Exceptions raised by gsnr-diag.

Every error a user can cause is a :class:`GsnrDiagError` subclass with a message that
names the argument and says what was expected. The CLI maps them to exit codes
(``UsageError``-like input problems → 2).
"""

from __future__ import annotations


class GsnrDiagError(Exception):
    """Base class of every error gsnr-diag raises on purpose."""


class DataError(GsnrDiagError, ValueError):
    """The ``data`` argument could not be understood or holds too few samples."""


class ModelError(GsnrDiagError, ValueError):
    """The model cannot be measured as asked (no trainable parameters, BatchNorm in train mode, ...)."""


class LossError(GsnrDiagError, ValueError):
    """``loss_fn`` did not return a differentiable scalar."""


class NonFiniteGradientError(GsnrDiagError, FloatingPointError):
    """Per-sample gradients contained NaN or inf."""


class TrajectoryFormatError(GsnrDiagError, ValueError):
    """A saved run or trajectory file is malformed or from a newer schema."""


class ThresholdError(GsnrDiagError, AssertionError):
    """A measured value is below a user-given threshold."""


class MonitorError(GsnrDiagError, ValueError):
    """A Monitor argument (schedule, task, extra numbers, step) is invalid."""


class ArgumentError(GsnrDiagError, ValueError):
    """A setting argument is invalid: ``device``, ``epsilon``, ``max_memory_mb``, ``distributed``, ``optimizer``, ..."""


class SlowPathWarning(UserWarning):
    """Per-sample gradients fall back to a batch-of-one loop (exact, but one forward and backward per sample)."""


class OutputError(GsnrDiagError, OSError):
    """An output file could not be written (an unwritable folder, a path through a file, a full disk)."""


class ExportError(GsnrDiagError, ValueError):
    """An export to TensorBoard/W&B cannot be done: the package is missing or the destination is unusable."""


class ComparisonError(GsnrDiagError, ValueError):
    """Two runs (or a result and its baseline) cannot be compared: nothing in common, bad tolerance, bad file."""
