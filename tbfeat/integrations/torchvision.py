"""torchvision models: detector backbones with their FPN levels, and classifiers.

``FeatureLogger(model)`` with a torchvision detection model (Faster/Mask/Keypoint R-CNN,
RetinaNet, FCOS, SSD, SSDlite) logs

- the backbone body's stem and stages: ``00_stem`` (conv1-bn1-relu), ``01_layer1`` ...
  ``04_layer4`` for ResNet bodies; one stage per feature block for MobileNet-style bodies;
- every feature level the backbone returns: ``05_fpn_0`` ... ``09_fpn_pool`` behind an
  FPN (``fpn_p6``/``fpn_p7`` for RetinaNet and FCOS), ``level_0`` ... for SSD.

``logger.log(images)`` runs the model's own ``transform`` first (resize and normalize, as
the detector sees its input), then the backbone; the heads run only if a chosen stage
lies in them. Classification models (ResNet, MobileNet, EfficientNet, ConvNeXt, RegNet, ...)
get their ``features``/``trunk_output`` blocks as stages instead of one opaque block.

:func:`load_checkpoint` reads state dicts saved by training scripts, torchvision's
reference format (``{"model": state_dict, "epoch": ...}``) included, into a
:class:`~tbfeat.checkpoints.LoadedCheckpoint`.
"""

from __future__ import annotations

import os
import re
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..hooks import probing
from ..options import did_you_mean
from ..safeload import LoadedCheckpoint
from ..stages import CONTAINERS, Stage, sanitize
from ..targets import NoScores, ScoreTap

_EXPAND = ("features", "trunk_output")  # classifier children holding the real stages


def _detection_types() -> tuple[type, ...]:
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return (GeneralizedRCNN, RetinaNet, FCOS, SSD)


def adapter_for(obj: object) -> ModelAdapter | None:
    """The adapter for a torchvision detection or classification model; ``None`` (not one
    of this integration's) for anything else."""
    if not isinstance(obj, nn.Module):
        return None
    if isinstance(obj, _detection_types()):
        return DetectionAdapter(obj)
    if type(obj).__module__.startswith("torchvision.models"):
        return ClassifierAdapter(obj)
    return None


_DETECTORS: weakref.WeakKeyDictionary[nn.Module, list[str] | None] = weakref.WeakKeyDictionary()
"""Per model of another package: the keys its backbone returns ([] for one tensor), or
``None`` when it is not a detector. Read once, with one small forward."""


def adapter_for_structure(obj: nn.Module) -> ModelAdapter | None:
    """A detector of any package built like torchvision's: a ``transform`` and a
    ``backbone`` with a ``body`` and an ``fpn``; or a ``transform`` that batches images
    into an ``ImageList`` (``.tensors``, ``.image_sizes``) and a ``backbone`` that returns
    a dict, list or tensor of features. ``None`` for anything else (a plain module)."""
    transform, backbone = getattr(obj, "transform", None), getattr(obj, "backbone", None)
    if not isinstance(transform, nn.Module) or not isinstance(backbone, nn.Module):
        return None
    if isinstance(getattr(backbone, "body", None), nn.Module) and hasattr(backbone, "fpn"):
        return DetectionAdapter(obj)
    return DetectionAdapter(obj) if _detector_keys(obj) is not None else None


def _detector_keys(model: nn.Module) -> list[str] | None:
    """The keys of the backbone's output ([] for one tensor), from one small forward of
    the transform and backbone; ``None`` when they are not a detector's. A definite
    answer is kept per model; a forward that raised is tried again next time."""
    if model in _DETECTORS:
        return _DETECTORS[model]
    size = getattr(model.transform, "min_size", 320)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    param = next(iter(model.parameters()), None)
    like = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    if not like.get("dtype", torch.float32).is_floating_point:
        like["dtype"] = torch.float32
    try:
        with probing(model.backbone, owner=model):
            batched = model.transform([torch.zeros(3, size, size, **like)])
            images = batched[0] if isinstance(batched, tuple) else batched
            out = model.backbone(images.tensors) if hasattr(images, "image_sizes") else None
    except Exception:  # noqa: BLE001 - not a detector's transform and backbone, or not now
        return None
    if isinstance(out, torch.Tensor):
        keys: list[str] | None = []
    elif isinstance(out, dict):
        keys = [str(k) for k in out]
    elif isinstance(out, (list, tuple)) and out:
        keys = [str(i) for i in range(len(out))]
    else:
        keys = None
    _DETECTORS[model] = keys
    return keys


class ClassifierAdapter(ModelAdapter):
    """torchvision classifiers: top-level children, with ``features``/``trunk_output``
    unrolled into their blocks."""

    def candidate_stages(self) -> list[Stage]:
        stages: list[Stage] = []
        for name, child in self.module.named_children():
            if name in _EXPAND and isinstance(child, nn.Sequential):
                for sub, block in child.named_children():
                    stages.append(_stage(len(stages), f"{name}.{sub}", block))
            else:
                stages.append(_stage(len(stages), name, child))
        return stages


class DetectionAdapter(ModelAdapter):
    """torchvision detection models: backbone body stages and every output level."""

    model_prepares_input = "its transform resizes and normalizes"

    def candidate_stages(self) -> list[Stage]:
        backbone = self.module.backbone
        stages: list[Stage] = []
        body = getattr(backbone, "body", None)
        if isinstance(body, nn.Module):
            children = dict(body.named_children())
            if "layer1" in children and "relu" in children:  # ResNet: stem + layer1..4
                stages.append(Stage(0, "backbone.body.relu", "ReLU", children["relu"], "stem"))
                for name, child in children.items():
                    if name.startswith("layer"):
                        stages.append(_stage(len(stages), f"backbone.body.{name}", child, name))
            else:  # MobileNet/EfficientNet-style: one stage per feature block
                for name, child in children.items():
                    stages.append(_stage(len(stages), f"backbone.body.{name}", child))
        elif not self.output_keys():  # a backbone returning one tensor: its blocks
            blocks = list(backbone.named_children()) if isinstance(backbone, nn.Sequential) else []
            for name, child in blocks:
                stages.append(_stage(len(stages), f"backbone.{name}", child))
            if not blocks:
                stages.append(_stage(0, "backbone", backbone))
            return stages
        fpn = getattr(backbone, "fpn", None)
        prefix = "fpn" if fpn is not None else "level"
        for key in self.output_keys():
            stages.append(
                Stage(
                    len(stages),
                    "backbone",
                    type(backbone).__name__,
                    backbone,
                    sanitize(f"{prefix}_{key}"),
                    output=key,
                )
            )
        return stages

    def output_keys(self) -> list[str]:
        """The keys of the backbone's output dict: read from the structure of
        torchvision's own classes, else from what the backbone returns (one small
        forward per model: a user's FPN may add a level inline, in its ``forward``)."""
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
            LastLevelP6P7,
        )

        backbone = self.module.backbone
        body, fpn = getattr(backbone, "body", None), getattr(backbone, "fpn", None)
        if fpn is not None and hasattr(body, "return_layers"):
            if type(fpn) is not FeaturePyramidNetwork or type(body) is not IntermediateLayerGetter:
                return self._probe_keys()
            keys = [str(v) for v in body.return_layers.values()]
            extra = getattr(fpn, "extra_blocks", None)
            if isinstance(extra, LastLevelMaxPool):
                keys.append("pool")
            elif isinstance(extra, LastLevelP6P7):
                keys += ["p6", "p7"]
            elif extra is not None:
                return self._probe_keys()
            return keys
        features, extra = getattr(backbone, "features", None), getattr(backbone, "extra", None)
        if isinstance(extra, nn.ModuleList) and isinstance(features, nn.Sequential):
            from torchvision.models.detection.ssd import SSDFeatureExtractorVGG

            first = 1 if isinstance(backbone, SSDFeatureExtractorVGG) else len(features)
            return [str(i) for i in range(first + len(extra))]
        return self._probe_keys()

    def _probe_keys(self) -> list[str]:
        """Fallback for unfamiliar backbones: the keys its output has (none for one
        tensor), read with one small forward per model."""
        keys = _detector_keys(self.module)
        if keys is None:
            name = type(self.module).__name__
            raise TypeError(f"{name}'s transform and backbone give no features")
        return keys

    def forward(
        self, inputs: Sequence[Any], module: nn.Module | None = None, stages: Sequence[Stage] = ()
    ) -> Any:
        """``transform`` then ``backbone``; the whole model if a chosen stage is elsewhere."""
        model = self.module if module is None else module
        backbone_modules = {id(m) for m in model.backbone.modules()}
        if any(id(s.module) not in backbone_modules for s in stages):
            return model(list(inputs))
        images = model.transform(list(inputs))
        images = images[0] if isinstance(images, tuple) else images  # (ImageList, targets)
        return model.backbone(getattr(images, "tensors", images))

    def cam_forward(self, inputs: Sequence[Any], module: nn.Module) -> tuple[Any, list[Any]]:
        """The whole detector, its transform first, on the probe images.

        The transform (resize, normalize, pad into one batch) runs without gradient: a
        transform may pad by writing into views of its batch, which autograd refuses. The
        gradient is taken towards the batch it returns, what the model saw, so the maps
        are those of a differentiable transform.
        """
        transform = getattr(module, "transform", None)
        if not isinstance(transform, nn.Module):
            return module(list(inputs)), list(inputs)
        leaves: list[torch.Tensor] = []
        modes: list[bool] = []

        def before(m: nn.Module, args: Any) -> None:
            modes.append(torch.is_grad_enabled())
            torch.set_grad_enabled(False)

        def after(m: nn.Module, args: Any, output: Any) -> Any:
            torch.set_grad_enabled(modes.pop())
            return _batch_requiring_grad(output, leaves)

        handles = [transform.register_forward_pre_hook(before),
                   transform.register_forward_hook(after)]  # fmt: skip
        try:
            return module(list(inputs)), leaves
        finally:
            for handle in handles:
                handle.remove()

    def score_tap(self, module: nn.Module) -> ScoreTap:
        return DetectionScoreTap(module)


def _batch_requiring_grad(output: Any, leaves: list[torch.Tensor]) -> Any:
    """A transform's output whose batch (an ``ImageList``'s ``tensors``, or the tensor
    itself) is a new leaf that requires grad, appended to ``leaves``."""
    images = output[0] if isinstance(output, tuple) else output
    batch = getattr(images, "tensors", images)
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        return output
    batch = batch.detach().requires_grad_(True)
    leaves.append(batch)
    if hasattr(images, "tensors"):
        images.tensors = batch
        return output
    return (batch, *output[1:]) if isinstance(output, tuple) else batch


class DetectionScoreTap(ScoreTap):
    """The class logits of a detector's predictions and its transformed input.

    R-CNN models: the box predictor's logits of every proposal (softmax, background 0).
    RetinaNet and FCOS: the head's ``cls_logits`` of every anchor (sigmoid); SSD: the
    same with a softmax and a background class. What the model saw is the transform's
    batch (resized, normalized, padded).
    """

    reads_output = False

    def install(self) -> None:
        model = self.module
        self._seen: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._counts: list[int] | None = None
        transform = getattr(model, "transform", None)
        if isinstance(transform, nn.Module):
            self._handles.append(transform.register_forward_hook(self._keep_seen))
        roi_heads = getattr(model, "roi_heads", None)
        predictor = getattr(roi_heads, "box_predictor", None)
        if isinstance(predictor, nn.Module):
            self.probabilities, self.background = "softmax", True
            self._handles.append(roi_heads.register_forward_pre_hook(self._keep_counts))
            self._handles.append(predictor.register_forward_hook(self._keep_box_logits))
            return
        head = getattr(model, "head", None)
        if isinstance(head, nn.Module):
            from torchvision.models.detection.ssd import SSD

            ssd = isinstance(model, SSD)
            self.probabilities, self.background = ("softmax", True) if ssd else ("sigmoid", False)
            self._handles.append(head.register_forward_hook(self._keep_head_logits))
            return
        raise NoScores(
            f"{type(model).__name__} has neither roi_heads.box_predictor nor a head with "
            "cls_logits; pass target= a function of the output giving one score per image"
        )

    def _keep_seen(self, module: nn.Module, args: Any, output: Any) -> None:
        images = output[0] if isinstance(output, tuple) else output
        self._seen = getattr(images, "tensors", images)

    def _keep_counts(self, module: nn.Module, args: Any) -> None:
        proposals = args[1] if len(args) > 1 else None
        if isinstance(proposals, (list, tuple)):
            self._counts = [len(p) for p in proposals]

    def _keep_box_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        self._logits = output[0] if isinstance(output, tuple) else output

    def _keep_head_logits(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, dict) and "cls_logits" in output:
            self._logits = output["cls_logits"]

    def logits(self, output: Any) -> list[torch.Tensor]:
        logits = self._logits
        if logits is None:
            raise NoScores(
                f"{type(self.module).__name__}'s head gave no class logits; pass target= a "
                "function of the output giving one score per image"
            )
        if logits.dim() == 3:  # (N, anchors, classes)
            return list(logits.transpose(1, 2).unbind(0))
        counts = self._counts or [logits.shape[0]]
        return [chunk.t() for chunk in logits.split(counts)]  # (proposals, classes) each

    def seen(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self._seen if self._seen is not None else super().seen(inputs)


def _stage(index: int, name: str, module: nn.Module, short: str | None = None) -> Stage:
    """Plain containers are labelled by (short) name, everything else by type."""
    label = sanitize(short or name) if type(module) in CONTAINERS else ""
    return Stage(index, name, type(module).__name__, module, label)


# ------------------------------------------------------------------ checkpoints
def load_checkpoint(
    path: str | os.PathLike,
    arch: str | nn.Module,
    *,
    trust: bool = False,
    **builder_kwargs: Any,
) -> LoadedCheckpoint:
    """Load a state-dict checkpoint into a torchvision model, safely.

    Reads a bare ``state_dict``, torchvision's reference format ``{"model": state_dict,
    "epoch": e, "args": Namespace, ...}`` or Lightning's ``{"state_dict": ...}`` with
    ``torch.load(weights_only=True)``: the file's globals are checked against tbfeat's
    allow-list first (``argparse.Namespace``, numpy scalars, ...; see
    :func:`tbfeat.checkpoints.allowed_global`), nothing else that runs code. The number of
    classes is read from the checkpoint's box predictor or classifier when
    ``num_classes`` is not given.

    Args:
        path: The checkpoint file.
        arch: A torchvision builder name (``"fasterrcnn_resnet50_fpn"``) or a model to load
            into.
        trust: Load a file that needs globals off the allow-list, with full unpickling
            (``weights_only=False``): it can run code, so only for files you trust.
        **builder_kwargs: Passed to the builder (``weights=None, weights_backbone=None``
            are the defaults).

    Returns:
        The model in eval mode, the epoch the file stores (``None`` for a bare state
        dict) and the checkpoint's other entries (``epoch``, ``args``, ``optimizer``...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown ``arch`` (naming the closest builder), a file that is not a
            checkpoint, a state dict of another architecture (naming a few missing and
            unexpected keys), or without ``trust`` a file that needs globals off the
            allow-list (:class:`~tbfeat.checkpoints.UnsafeCheckpointError`, naming them).
    """
    from ..safeload import CheckpointError, error_text, torch_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    try:
        ckpt = torch_load(path, trust=trust, mmap=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} as a state dict "
            f"({error_text(e)})"
        ) from None
    state, meta = _split_checkpoint(ckpt, path)
    if isinstance(arch, nn.Module):
        model, name = arch, type(arch).__name__
    else:
        name = arch
        kwargs = {"weights": None, "weights_backbone": None, **builder_kwargs}
        if "num_classes" not in kwargs:
            n = infer_num_classes(state, arch)
            if n is not None:
                kwargs["num_classes"] = n
        model = build(arch, **kwargs)
    load_state(model, state, name, path, builder=not isinstance(arch, nn.Module))
    return LoadedCheckpoint.of(model.eval(), meta)


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming the closest torchvision builder unless ``arch`` is one."""
    import torchvision

    names = torchvision.models.list_models()
    if arch not in names:
        raise ValueError(
            f"unknown arch {arch!r}{did_you_mean(arch, names)}; allowed: a torchvision "
            "builder name such as fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn, resnet50 "
            "(torchvision.models.list_models() lists all)"
        )


def build(arch: str, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(arch, **kwargs)`` with an error naming the closest name."""
    import torchvision

    check_arch(arch)
    kwargs.setdefault("weights", None)
    if "weights_backbone" in kwargs and kwargs["weights_backbone"] is None:
        import inspect

        builder = torchvision.models.get_model_builder(arch)
        if "weights_backbone" not in inspect.signature(builder).parameters:
            kwargs.pop("weights_backbone")
    return torchvision.models.get_model(arch, **kwargs)


def infer_num_classes(state: dict[str, torch.Tensor], arch: str = "") -> int | None:
    """Classes of a detection or classification state dict, from its last layer's shape."""
    for key in (
        "roi_heads.box_predictor.cls_score.weight",  # Faster/Mask/Keypoint R-CNN
        "fc.weight",  # ResNet, RegNet, GoogLeNet
        "classifier.weight",  # DenseNet
        "heads.head.weight",  # ViT
        "head.weight",  # Swin
    ):
        w = state.get(key)
        if isinstance(w, torch.Tensor):
            return int(w.shape[0])
    logits = state.get("head.classification_head.cls_logits.weight")
    if isinstance(logits, torch.Tensor):  # RetinaNet: 9 anchors per location, FCOS: 1
        anchors = 9 if arch.startswith("retinanet") else 1
        return int(logits.shape[0]) // anchors
    if arch.startswith("ssd"):  # first level: (anchors * classes) output channels
        first = [
            k
            for k in state
            if k.startswith("head.classification_head.module_list.0.")
            and k.endswith("weight")
            and state[k].dim() == 4
        ]
        if first:
            anchors = 4 if arch.startswith("ssd300") else 6
            return int(state[sorted(first)[-1]].shape[0]) // anchors
    classifier = [
        k
        for k in state
        if re.fullmatch(r"classifier\.\d+(\.\d+)?\.weight", k) and state[k].dim() in (2, 4)
    ]
    if classifier:
        last = max(classifier, key=lambda k: [int(p) for p in k.split(".")[1:-1]])
        return int(state[last].shape[0])
    return None


def _split_checkpoint(ckpt: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = ckpt.get(key)
            if (
                isinstance(inner, dict)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                meta = {k: v for k, v in ckpt.items() if k != key}
                state = inner
                if key == "state_dict":  # Lightning: strip the LightningModule attribute
                    state = _strip_common_prefix(state)
                return state, meta
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt, {}
    raise ValueError(
        f"{str(path)!r} holds no state dict: expected a dict of tensors or a dict with "
        "'model' (torchvision reference format) or 'state_dict' (Lightning)"
    )


def _strip_common_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) == 1 and all("." in k for k in state):
        return {k.split(".", 1)[1]: v for k, v in state.items()}
    return state


_SHAPE = r"torch\.Size\(\[([^\]]*)\]\)"
_SIZE_MISMATCH = re.compile(
    rf"size mismatch for ([^:]+): copying a param with shape {_SHAPE} from checkpoint, "
    rf"the shape in current model is {_SHAPE}"
)


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    name: str,
    path: Path,
    *,
    builder: bool = False,
) -> None:
    """``model.load_state_dict(state)`` as leniently as PyTorch itself: the keys that stay
    missing or unexpected after the modules' own version handling (torchvision's FPN and
    RPN head rename keys saved by older layouts) decide whether the checkpoint fits. A
    key left out because its tensor is tied to one the checkpoint holds (Hugging Face's
    ``save_pretrained`` saves tied weights once) is not missing: loading fills it.

    Raises:
        ValueError: naming a few missing and unexpected keys and differing shapes;
            ``num_classes=`` is suggested when a builder name was given and only the
            classification layers differ.
    """
    try:
        missing, unexpected, mismatched = _fit(model, state)
    except ValueError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not fit {name}: {e}") from e
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:3])}")
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint ({a}), model ({b})" for k, a, b in mismatched[:2])
        parts.append(f"{len(mismatched)} shapes differ, e.g. {shown}")
    head_only = not (missing or unexpected) and all(
        any(h in k for h in ("predictor", "classif", "head", "fc.", "cls"))
        for k, _, _ in mismatched
    )
    hint = (
        "Only the classification layers differ: pass num_classes= to match the checkpoint."
        if head_only and builder
        else "Pass the model it was saved from (--arch / --model, arch= / model=)."
    )
    raise ValueError(f"checkpoint {str(path)!r} does not fit {name}: {'; '.join(parts)}. {hint}")


def _fit(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[tuple[str, str, str]]]:
    """Load ``state`` with ``strict=False``; the keys still missing and unexpected after
    the modules' version handling, and ``(key, saved shape, model shape)`` of those whose
    shapes differ (left out of a second try, which then reports the rest)."""
    metadata = getattr(state, "_metadata", None)
    mismatched: list[tuple[str, str, str]] = []
    for _ in range(2):
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            found = _SIZE_MISMATCH.findall(str(e))
            if not found:  # the reason is on the line after PyTorch's header
                raise ValueError(" ".join(x.strip() for x in str(e).splitlines()[:2])) from e
            mismatched += found
            drop = {k for k, _, _ in found}
            state = OrderedDict((k, v) for k, v in state.items() if k not in drop)
            if metadata is not None:
                state._metadata = metadata  # keeps the saved module versions
            continue
        dropped = {k for k, _, _ in mismatched} | tied_elsewhere(model, state)
        return (
            [k for k in result.missing_keys if k not in dropped],
            result.unexpected_keys,
            mismatched,
        )
    # shapes differ under names the version handling changed
    own, tied = model.state_dict(), tied_elsewhere(model, state)
    missing = [k for k in own if k not in state and k not in tied]
    return missing, [k for k in state if k not in own], mismatched


def tied_elsewhere(model: nn.Module, state: dict[str, Any]) -> set[str]:
    """Names of ``model``'s parameters and buffers that are not in ``state`` but share
    their tensor with a name that is (tied weights): loading that name fills them."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:  # fmt: skip
        names.setdefault(id(t), []).append(name)
    return {
        n for group in names.values() if any(g in state for g in group)
        for n in group if n not in state
    }  # fmt: skip
