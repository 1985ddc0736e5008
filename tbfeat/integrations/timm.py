"""timm models: the stages timm itself describes, transformer tokens logged as maps.

``FeatureLogger(model)`` with a model of ``timm.create_model`` logs the stages of the
model's own ``feature_info`` (what ``features_only=True`` returns: each stage's module,
channels and reduction): a ResNet's ``act1``, ``layer1`` ... ``layer4``, an EfficientNet's
blocks, a ConvNeXt's or a Swin's stages, a ViT's or a DeiT's blocks. Stages are labelled
by their module name (``00_blocks.0``); any other module can be chosen by its name.

The model family says how a stage holds its map (:mod:`tbfeat.tokens`), never the shape:

- a model with a patch embedding and prefix tokens (ViT, DeiT, EVA: ``num_prefix_tokens``,
  ``patch_embed.grid_size``) returns tokens ``(N, prefix + H·W, C)``: the class and
  register (or distillation) tokens are left out of the map, the class token's statistics
  are logged under ``<stage>/cls``;
- a model that says ``output_fmt = "NHWC"`` (Swin, Swin V2, MambaOut...) returns
  channels-last stages ``(N, H, W, C)``.

Probe images are taken as given, or through ``preprocess=`` (timm's own
``timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))`` applies to
PIL images; a function of a ``(3, H, W)`` tensor in [0, 1] goes here).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import ModelAdapter
from ..stages import Stage, sanitize
from ..tokens import TokenLayout


def adapter_for(obj: object) -> ModelAdapter | None:
    """The adapter for a timm model that describes its stages (``feature_info``);
    ``None`` for anything else, which the generic adapter then takes."""
    if not isinstance(obj, nn.Module) or not feature_stages(obj):
        return None
    return TimmAdapter(obj)


class TimmAdapter(ModelAdapter):
    """A timm model: the stages of its ``feature_info``, each with the model family's
    token layout."""

    def candidate_stages(self) -> list[Stage]:
        return feature_stages(self.module)


def feature_stages(model: nn.Module) -> list[Stage]:
    """The stages of ``model.feature_info`` in its order (a module named twice once);
    ``[]`` when the model has none that name its modules."""
    info: Any = getattr(model, "feature_info", None)
    if hasattr(info, "get_dicts"):  # a features_only model's FeatureInfo
        info = info.get_dicts()
    if not isinstance(info, (list, tuple)):
        return []
    modules = dict(model.named_modules())
    layout = token_layout(model)
    stages: list[Stage] = []
    for entry in info:
        name = entry.get("module") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name not in modules:  # features_only models join the names with "_"
            name = name.replace(".", "_")
        if name not in modules or any(s.name == name for s in stages):
            continue
        module = modules[name]
        stages.append(
            Stage(len(stages), name, type(module).__name__, module, sanitize(name), tokens=layout)
        )
    return stages


def token_layout(model: nn.Module) -> TokenLayout | None:
    """How ``model``'s stages hold their maps, from the family's own attributes:
    channels-last where it says ``output_fmt = "NHWC"``, tokens where it has a patch
    embedding with a grid and prefix tokens; ``None`` for ``(N, C, H, W)`` stages."""
    if getattr(model, "output_fmt", None) == "NHWC":
        return TokenLayout(channels_last=True)
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or grid is None:
        return None
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    tokens = {"prefix": prefix, "cls": has_cls and prefix > 0}
    patch = getattr(model.patch_embed, "patch_size", None)
    if getattr(model, "dynamic_img_size", False) and patch is not None:
        # any input size: the grid follows it, padded to whole patches or cut down
        rounding = "up" if getattr(model.patch_embed, "dynamic_img_pad", False) else "down"
        return TokenLayout(**tokens, stride=(int(patch[0]), int(patch[1])), rounding=rounding)
    return TokenLayout(**tokens, grid=(int(grid[0]), int(grid[1])))
