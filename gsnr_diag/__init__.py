"""gsnr-diag: gradient signal-to-noise ratio diagnostics for PyTorch (Liu et al., ICLR 2020)."""

from .errors import (
    DataError,
    GsnrDiagError,
    LossError,
    ModelError,
    NonFiniteGradientError,
    ThresholdError,
    TrajectoryFormatError,
)
from .measure import gradient_stats
from .moments import ChunkMoments, Moments
from .stats import GradientStats

__version__ = "0.1.0"

__all__ = [
    "ChunkMoments",
    "DataError",
    "GradientStats",
    "GsnrDiagError",
    "LossError",
    "ModelError",
    "Moments",
    "NonFiniteGradientError",
    "ThresholdError",
    "TrajectoryFormatError",
    "gradient_stats",
    "__version__",
]

# --- dynamics exports (issue 3: monitor, trajectory, training, experiments) ---

# --- report exports (issue 4) ---

# --- plugin exports (issue 5) ---
