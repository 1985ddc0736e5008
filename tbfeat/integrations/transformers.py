"""Hugging Face vision models: each family's own stages, tokens logged as maps.

``FeatureLogger(model)`` with a Hugging Face vision model logs the stages its family
describes, chosen by ``config.model_type`` (never guessed from a shape):

- **ViT, DINOv2, DINOv2 with registers** (``ViTModel``, ``Dinov2Model``,
  ``Dinov2WithRegistersModel`` and their classifiers): each layer of the encoder, the
  ``ModuleList`` of ``config.num_hidden_layers`` layers, labelled by its module name
  (``00_encoder.layer.0``); a ``Dinov2Backbone`` logs the layers of its ``out_features``
  (``00_stage3``), the tokens of its feature maps before its final layer norm. A layer
  returns tokens ``(N, 1 + registers + H·W, C)``: the class token and
  ``config.num_register_tokens`` register tokens are left out of the map, the patch grid
  is the input's size over ``config.patch_size``, rounded down as the patch embedding
  does, at any input size these models take (``interpolate_pos_encoding``; DINOv2
  always), non-square too, and the class token's statistics are logged under
  ``<stage>/cls`` (:mod:`tbfeat.tokens`).
- **Swin and ConvNeXt** (``SwinModel``, ``ConvNextModel``, their classifiers and
  ``SwinBackbone``/``ConvNextBackbone``): the stages of ``config.depths``, labelled by the
  family's stage names (``00_stage1``); a ``*Backbone`` logs the stages of its
  ``out_features``, each the feature map it returns (its ``hidden_states_norms`` output).
  ConvNeXt stages are ``(N, C, H, W)``; a Swin stage is the output of its last block,
  before the patch merging: tokens ``(N, H·W, C)`` at the stage's resolution, whose grid
  follows the input as the model computes it (padded to whole patches, odd sizes rounded
  up at each merge: :attr:`tbfeat.tokens.TokenLayout.stride`), non-square inputs too.
- **DETR and RT-DETR** (``DetrForObjectDetection`` with its default timm backbone or a
  Hugging Face ResNet, ``RTDetrForObjectDetection``): the backbone's stages (a Hugging
  Face backbone's ``out_features``, a timm one's ``feature_info``), then the levels
  handed to the decoder: DETR's projected level (``input_projection``, labelled
  ``level_0``) and its encoder's output tokens on that grid (``encoder``); RT-DETR's
  ``decoder_input_proj`` maps (``level_0`` ...). Nothing of the decoder or the prediction
  heads is a default stage. Class activation maps explain the class logits of the
  queries: DETR's softmax (its "no object" class left out), RT-DETR's sigmoid.

Probe images are taken as given, or through ``preprocess=``: a function of a ``(3, H, W)``
image in [0, 1], or the model's image processor (built locally, as
``ViTImageProcessor(size=...)`` or ``AutoImageProcessor.from_pretrained(folder)``; it
resizes and normalizes as configured, :class:`ImageProcessor`). A classifier's ``logits`` are what
``stage_cams`` and ``cam=`` explain.

This module is the one place that knows transformers' internals (module names, stage
strides, output layouts).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..stages import Stage, sanitize
from ..targets import NoScores, ScoreTap
from ..tokens import TokenLayout

TOKEN_FAMILIES = ("vit", "dinov2", "dinov2_with_registers")
"""``config.model_type`` of the families whose layers return a class token, then
``config.num_register_tokens`` register tokens, then the patch tokens."""
STAGE_FAMILIES = ("swin", "convnext")
"""``config.model_type`` of the families built of ``config.depths`` stages of falling
resolution, named by ``config.stage_names``."""
TOKEN_STAGE_FAMILIES = ("swin",)
"""Of :data:`STAGE_FAMILIES`, those whose stages return tokens ``(N, H·W, C)``."""
DETECTOR_FAMILIES = ("detr", "rt_detr")
"""``config.model_type`` of the query-based detectors (a backbone, an encoder whose
levels the decoder reads, a decoder and per-query heads)."""
RESNET_BACKBONES = ("resnet", "rt_detr_resnet")
"""``config.model_type`` of the backbones built as ``embedder`` then ``encoder.stages``,
each stage "same"-padded: the stem reduces 4x, each later stage 2x."""

Named = tuple[str, nn.Module, str | int | None, TokenLayout | None]
"""``(label, module, output key, token layout)`` of one stage, before it is numbered."""


def adapter_for(obj: object) -> ModelAdapter | None:
    """The adapter for a Hugging Face model (a ``config.model_type``); ``None`` for
    anything else, which the generic adapter then takes."""
    if not isinstance(obj, nn.Module) or family(obj) is None:
        return None
    if family(obj) in DETECTOR_FAMILIES:
        return DetectorAdapter(obj)
    return TransformersAdapter(obj)


class TransformersAdapter(ModelAdapter):
    """A Hugging Face vision model: the stages of its family (those of any module, its
    children, for a family this module does not know), its ``logits`` explained, its
    image processor taken as ``preprocess=``."""

    def candidate_stages(self) -> list[Stage]:
        return model_stages(self.module) or super().candidate_stages()

    def score_tap(self, module: nn.Module) -> ScoreTap:
        return LogitsTap(module)

    def preprocessor(self, preprocess: Any) -> Any:
        """An image processor (``ViTImageProcessor(...)``, ``AutoImageProcessor`` of a
        local folder) as a function of one image; any other ``preprocess`` as given."""
        return ImageProcessor(preprocess) if is_image_processor(preprocess) else preprocess


class DetectorAdapter(TransformersAdapter):
    """DETR and RT-DETR: backbone stages and decoder levels; maps explain query logits."""

    def score_tap(self, module: nn.Module) -> ScoreTap:
        return QueryLogitsTap(module)


class LogitsTap(ScoreTap):
    """A classifier's scores: the ``logits`` of its output (``ImageClassifierOutput``)."""

    def logits(self, output: Any) -> list[Any]:
        return super().logits(getattr(output, "logits", output))


class QueryLogitsTap(ScoreTap):
    """A query detector's scores: ``logits`` ``(N, queries, classes)`` of its output.

    DETR scores with a softmax whose last class is "no object"; it is moved first, so
    that it is left out as a background class. RT-DETR scores each class with a sigmoid.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.no_object = family(module) == "detr"
        self.probabilities = "softmax" if self.no_object else "sigmoid"
        self.background = self.no_object

    def logits(self, output: Any) -> list[torch.Tensor]:
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise NoScores(
                f"{type(self.module).__name__} returned no (N, queries, classes) logits; "
                "pass target= a function of the output giving one score per image"
            )
        per_image = list(logits.transpose(1, 2).unbind(0))  # (classes, queries) each
        if self.no_object:
            per_image = [torch.cat([t[-1:], t[:-1]]) for t in per_image]
        return per_image


# ------------------------------------------------------------------ family rules
class ImageProcessor:
    """A Hugging Face image processor applied to one ``(3, H, W)`` image in [0, 1]: it
    resizes and normalizes as configured; ``do_rescale=False`` because tbfeat's reader
    has scaled the pixels already. Its ``pixel_values`` are the model's input (a
    detector's ``pixel_mask`` is left out: one image is not padded). Picklable when the
    processor is."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.__name__ = type(processor).__name__

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = self.processor(images=image, do_rescale=False, return_tensors="pt")
        return out["pixel_values"][0]


def is_image_processor(obj: Any) -> bool:
    """``obj`` is a transformers image processor (not a function given as ``preprocess``)."""
    from transformers.image_processing_utils import BaseImageProcessor

    return isinstance(obj, BaseImageProcessor)


def family(model: nn.Module) -> str | None:
    """``config.model_type`` of a Hugging Face model; ``None`` for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) else None


def model_stages(model: nn.Module) -> list[Stage]:
    """The stages of ``model``'s family, numbered in order; ``[]`` for another model."""
    kind = family(model)
    if kind in TOKEN_FAMILIES:
        named: list[Named] = token_stages(model)
    elif kind in STAGE_FAMILIES:
        named = hierarchical_stages(model)
    elif kind in DETECTOR_FAMILIES:
        named = detector_stages(model)
    else:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    return [
        Stage(i, names[id(m)], type(m).__name__, m, sanitize(label), output=out, tokens=layout)
        for i, (label, m, out, layout) in enumerate(named)
    ]


def token_stages(model: nn.Module) -> list[Named]:
    """A ViT's or DINOv2's encoder layers; for a ``*Backbone`` (``Dinov2Backbone``), the
    layers its ``out_features`` name (``stage<i>`` is layer ``i - 1``, ``stem`` the
    embeddings), labelled by those names: the tokens it turns into its feature maps,
    before its final layer norm."""
    layout = token_layout(model)
    layers = encoder_layers(model)
    stage_names = list(getattr(model, "stage_names", None) or [])
    wanted = list(getattr(model, "out_features", None) or [])
    if not wanted or len(stage_names) != len(layers) + 1:
        return [(name, layer, None, layout) for name, layer in layers]
    modules = [getattr(model, "embeddings", None), *(layer for _, layer in layers)]
    return [
        (n, modules[stage_names.index(n)], None, layout)
        for n in wanted if n in stage_names and modules[stage_names.index(n)] is not None
    ]  # fmt: skip


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
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    # the patch embedding is a convolution of stride patch_size: the grid of any input
    # size (interpolate_pos_encoding, DINOv2 always) leaves the remainder out
    patch = _pair(config.patch_size)
    return TokenLayout(prefix=1 + registers, cls=True, stride=patch, rounding="down")


def hierarchical_stages(model: nn.Module) -> list[Named]:
    """A Swin's or ConvNeXt's stages: a backbone's ``out_features`` (its feature maps),
    else every stage of the encoder (a Swin's last block, before the patch merging)."""
    if backbone_norms(model):
        return backbone_stages(model)
    config = model.config
    depths = list(getattr(config, "depths", None) or [])
    blocks = next(
        (m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == len(depths)),
        None,
    )
    if not depths or blocks is None:
        return []
    names = list(getattr(config, "stage_names", []))[1 : len(depths) + 1]
    if family(model) not in TOKEN_STAGE_FAMILIES:
        return [(name, stage, None, None) for name, stage in zip(names, blocks, strict=True)]
    out = []
    for j, (name, stage) in enumerate(zip(names, blocks, strict=True), start=1):
        last = getattr(stage, "blocks", None)
        if isinstance(last, nn.ModuleList) and len(last):  # it returns (tokens, attention)
            out.append((name, last[-1], 0, TokenLayout(stride=swin_stride(config, j))))
    return out


def backbone_norms(backbone: nn.Module) -> nn.ModuleDict | None:
    """A ``*Backbone``'s ``hidden_states_norms``: the norm that makes each of its
    ``out_features`` the feature map it returns; ``None`` where it has none."""
    norms = getattr(backbone, "hidden_states_norms", None)
    if isinstance(norms, nn.ModuleDict) and getattr(backbone, "out_features", None):
        return norms
    return None


def backbone_stages(backbone: nn.Module) -> list[Named]:
    """A Hugging Face backbone's ``out_features`` stages: the module whose output is
    each feature map it returns (``[]`` for a backbone of another build)."""
    config, kind = backbone.config, family(backbone)
    stage_names = list(getattr(backbone, "stage_names", []))
    wanted = [n for n in getattr(backbone, "out_features", []) or [] if n in stage_names]
    norms = backbone_norms(backbone)
    if norms is not None:
        swin = kind in TOKEN_STAGE_FAMILIES
        return [
            (n, norms[n], None,
             TokenLayout(stride=swin_stride(config, stage_names.index(n))) if swin else None)
            for n in wanted if n in norms
        ]  # fmt: skip
    embedder = getattr(backbone, "embedder", None)
    stages = getattr(getattr(backbone, "encoder", None), "stages", None)
    if kind not in RESNET_BACKBONES or embedder is None or not isinstance(stages, nn.ModuleList):
        return []
    modules = [embedder, *stages]
    return [(n, modules[stage_names.index(n)], None, None) for n in wanted]


def swin_stride(config: Any, index: int) -> tuple[int, int]:
    """Input pixels per token of a Swin's ``config.stage_names[index]``: the patch size
    for the stem and the first stage, doubled by each patch merging after."""
    patch = _pair(config.patch_size)
    scale = 2 ** max(index - 1, 0)
    return patch[0] * scale, patch[1] * scale


def resnet_stride(config: Any, index: int) -> int:
    """Input pixels per cell of a ResNet backbone's ``config.stage_names[index]``."""
    if index == 0:
        return 4
    first = 2 if getattr(config, "downsample_in_first_stage", False) else 1
    return 4 * first * 2 ** (index - 1)


def detector_stages(model: nn.Module) -> list[Named]:
    """A DETR's or RT-DETR's backbone stages, then the levels its decoder reads."""
    inner = getattr(model, "model", None)
    stages, stride = detector_backbone(inner)
    if not isinstance(inner, nn.Module) or not stages:
        return []
    levels = getattr(inner, "decoder_input_proj", None)
    if isinstance(levels, nn.ModuleList):  # RT-DETR: each level the decoder reads
        return stages + [(f"level_{i}", level, None, None) for i, level in enumerate(levels)]
    projection = getattr(inner, "input_projection", None)
    if not isinstance(projection, nn.Module):
        return stages
    stages.append(("level_0", projection, None, None))
    encoder = getattr(inner, "encoder", None)
    if isinstance(encoder, nn.Module) and stride is not None:
        layout = TokenLayout(stride=(stride, stride))  # the projected level, flattened
        stages.append(("encoder", encoder, "last_hidden_state", layout))
    return stages


def detector_backbone(inner: Any) -> tuple[list[Named], int | None]:
    """The stages of the backbone under a detector's ``backbone`` and the input pixels
    per cell of its last one (``None`` where not known): a Hugging Face backbone
    (``stage_names``, ``out_features``: the ``model`` of transformers 5, the
    ``conv_encoder.model`` of 4), or a timm one (DETR's default ``use_timm_backbone``: its
    ``feature_info`` describes its stages and reductions)."""
    root = getattr(inner, "backbone", None)
    if not isinstance(root, nn.Module):
        return [], None
    for module in root.modules():
        if hasattr(module, "stage_names") and hasattr(module, "out_features"):
            names, last = list(module.stage_names), module.out_features[-1]
            known = family(module) in RESNET_BACKBONES
            stride = resnet_stride(module.config, names.index(last)) if known else None
            return backbone_stages(module), stride
        info = getattr(module, "feature_info", None)
        if hasattr(info, "get_dicts") and hasattr(info, "reduction"):
            from .timm import feature_stages

            stages = [(s.name, s.module, None, s.tokens) for s in feature_stages(module)]
            return stages, int(info.reduction()[-1])
    return [], None


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
