"""tbfeat: see what a vision model sees, stage by stage, in TensorBoard.

Example:
    >>> from tbfeat import FeatureLogger                       # doctest: +SKIP
    >>> with FeatureLogger(model, logdir="runs/exp", step=epoch):  # doctest: +SKIP
    ...     model(images)
"""

from .adapters import Probes, list_stages
from .cams import stage_cams
from .logger import FeatureLogger, LoggerConfig
from .options import LogOptions
from .render import colorize, feature_grid
from .stages import Stage
from .stats import STAT_NAMES
from .sweep import SweepError, SweepResult, sweep

__all__ = [
    "STAT_NAMES",
    "FeatureLogger",
    "LogOptions",
    "LoggerConfig",
    "Probes",
    "Stage",
    "SweepError",
    "SweepResult",
    "colorize",
    "feature_grid",
    "list_stages",
    "stage_cams",
    "sweep",
]
__version__ = "0.1.0"
