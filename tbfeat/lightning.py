"""``from tbfeat.lightning import FeatureLoggerCallback`` (needs the ``lightning`` extra)."""

from .integrations.lightning import FeatureLoggerCallback

__all__ = ["FeatureLoggerCallback"]
