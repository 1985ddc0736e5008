"""tbfeat: see what a vision model sees, stage by stage, in TensorBoard.

Example:
    >>> from tbfeat import FeatureLogger                       # doctest: +SKIP
    >>> with FeatureLogger(model, logdir="runs/exp", step=epoch):  # doctest: +SKIP
    ...     model(images)
"""

from .logger import FeatureLogger
from .options import LogOptions
from .render import colorize, feature_grid
from .stages import Stage, list_stages
from .stats import STAT_NAMES

__all__ = [
    "STAT_NAMES",
    "FeatureLogger",
    "LogOptions",
    "Stage",
    "colorize",
    "feature_grid",
    "list_stages",
]
__version__ = "0.1.0"
