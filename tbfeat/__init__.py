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

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapters import Probes, list_stages
    from .cams import stage_cams
    from .logger import FeatureLogger, LoggerConfig
    from .options import LogOptions
    from .render import colorize, feature_grid
    from .stages import Stage
    from .stats import STAT_NAMES
    from .sweep import SweepError, SweepResult, sweep

_HOMES = {
    "Probes": "adapters", "list_stages": "adapters", "stage_cams": "cams",
    "FeatureLogger": "logger", "LoggerConfig": "logger", "LogOptions": "options",
    "colorize": "render", "feature_grid": "render", "Stage": "stages", "STAT_NAMES": "stats",
    "SweepError": "sweep", "SweepResult": "sweep", "sweep": "sweep",
}  # fmt: skip
"""Where each public name lives. They load when first used, so what reads a logdir back
(``tbfeat export``, :mod:`tbfeat.reader`) never loads torch."""


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tbfeat' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


class _Package(types.ModuleType):
    """``tbfeat.sweep`` is the function :func:`tbfeat.sweep.sweep`, as ever: importing the
    submodule of that name does not rebind it (``sys.modules`` holds the submodule)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "sweep" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
