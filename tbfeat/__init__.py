"""tbfeat: see what a vision model sees, stage by stage, in TensorBoard.

Example:
    Log the stages of the forwards made inside a block, at step 1::

    >>> import tempfile, torch
    >>> from tbfeat import FeatureLogger
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> with tempfile.TemporaryDirectory() as logdir:
    ...     with FeatureLogger(model, logdir=logdir, step=1) as logger:
    ...         _ = model(torch.rand(1, 3, 16, 16))
    ...     logger.flushed_step
    1
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
