"""``from tbfeat.hf import FeatureLoggerCallback`` (needs the ``transformers`` extra)."""

from .integrations.hf_trainer import FeatureLoggerCallback

__all__ = ["FeatureLoggerCallback"]
