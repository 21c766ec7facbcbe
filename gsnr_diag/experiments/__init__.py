"""The paper's experiments built on training.py + monitor.py: the shuffled-label control
(Sec. 3.1, Fig. 5) and the OSGR experiment (Sec. 2.4, eq. 23 vs eq. 19, Fig. 4)."""

from .control import ControlResult, shuffled_label_control
from .osgr import OSGRPool, OSGRResult, osgr_experiment, pool_osgr

__all__ = ["ControlResult", "shuffled_label_control", "OSGRPool", "OSGRResult", "osgr_experiment", "pool_osgr"]
