"""Hugging Face vision transformers: the encoder's layers as stages, tokens as maps.

``FeatureLogger(model)`` with a Hugging Face ``ViTModel``, ``ViTForImageClassification``,
``Dinov2Model`` or ``Dinov2WithRegistersModel`` (and their classifiers) logs each layer of
the encoder: the ``ModuleList`` of ``config.num_hidden_layers`` layers, labelled by their
module name (``00_layers.0``, ``00_encoder.layer.0``). A layer returns tokens
``(N, 1 + registers + H·W, C)``: the class token and ``config.num_register_tokens``
register tokens are left out of the map, the patch grid is ``config.image_size //
config.patch_size`` (a square grid at other input sizes, which these models interpolate
to), and the class token's statistics are logged under ``<stage>/cls``
(:mod:`tbfeat.tokens`).

Probe images are taken as given, or through ``preprocess=`` (the model's image processor
normalizes; built locally, it downloads nothing). A classifier's ``logits`` are what
``stage_cams`` and ``cam=`` explain.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import ModelAdapter
from ..stages import Stage, sanitize
from ..targets import ScoreTap
from ..tokens import TokenLayout

TOKEN_FAMILIES = ("vit", "dinov2", "dinov2_with_registers")
"""``config.model_type`` of the families whose layers return a class token, then
``config.num_register_tokens`` register tokens, then the patch tokens."""


def adapter_for(obj: object) -> ModelAdapter | None:
    """The adapter for a Hugging Face model of :data:`TOKEN_FAMILIES`; ``None`` for any
    other, which the generic adapter then takes."""
    if not isinstance(obj, nn.Module) or token_layout(obj) is None or not encoder_layers(obj):
        return None
    return TransformersAdapter(obj)


class TransformersAdapter(ModelAdapter):
    """A Hugging Face vision transformer: its encoder's layers, read as token maps."""

    def candidate_stages(self) -> list[Stage]:
        layout = token_layout(self.module)
        return [
            Stage(i, name, type(layer).__name__, layer, sanitize(name), tokens=layout)
            for i, (name, layer) in enumerate(encoder_layers(self.module))
        ]

    def score_tap(self, module: nn.Module) -> ScoreTap:
        return LogitsTap(module)


class LogitsTap(ScoreTap):
    """A classifier's scores: the ``logits`` of its output (``ImageClassifierOutput``)."""

    def logits(self, output: Any) -> list[Any]:
        return super().logits(getattr(output, "logits", output))


def encoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the first ``ModuleList`` of ``config.num_hidden_layers``
    modules (the encoder's layers, wherever the version of transformers keeps them)."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 1:
        return []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    return []


def token_layout(model: nn.Module) -> TokenLayout | None:
    """The tokens of ``model``'s layers, from its config; ``None`` for another family."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in TOKEN_FAMILIES:
        return None
    size, patch = _pair(config.image_size), _pair(config.patch_size)
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    grid = (size[0] // patch[0], size[1] // patch[1])
    return TokenLayout(prefix=1 + registers, cls=True, grid=grid, dynamic=True)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
