"""Class activation maps per stage: where each stage finds the evidence for the answer.

:func:`stage_cams` runs a model once on probe images with its stages hooked and, for
``method="layercam"``, takes the gradient of a target score (a class logit) with respect
to each stage's output: LayerCAM weighs every activation by its positive gradient, sums
over channels and clamps at 0. ``method="activation"`` needs no gradient: the channel
mean of ``|activation|``. Each map is scaled to [0, 1] per image and resized to the input
the model sees.

The gradient is taken with ``torch.autograd.grad`` on the stage outputs alone, so no
parameter's ``.grad`` is touched; the model runs in eval mode under the probe lock, and
its hooks are removed and every module's mode restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import adapt
from .hooks import StageHooks, probing
from .images import ImageLike
from .stages import StageSpec, resolve_stages

CAM_METHODS = ("layercam", "activation")
Target = int | Callable[[Any], torch.Tensor] | None
"""A classifier's class (``None``: each image's top-1), or a function of the model's
output giving one score per image."""


def stage_cams(
    model: nn.Module | Any,
    inputs: ImageLike | Sequence[ImageLike],
    *,
    stages: StageSpec | Iterable[StageSpec] | None = None,
    method: str = "layercam",
    target: Target = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-stage class activation maps of a plain module or classifier.

    Args:
        model: An ``nn.Module`` whose output is ``(N, classes)`` scores, or any module
            with a callable ``target``. Detectors and YOLO models are not handled yet.
        inputs: Probe images, as for :meth:`tbfeat.FeatureLogger.log`.
        stages: As for :class:`~tbfeat.FeatureLogger`; stages without a 4-D output are
            left out.
        method: ``"layercam"`` (gradients) or ``"activation"`` (no gradient).
        target: ``None`` for each image's top-1 class, an ``int`` class, or a function of
            the output returning ``(N,)`` scores.
        preprocess: As for :class:`~tbfeat.FeatureLogger`.

    Returns:
        ``{stage key: (N, H, W) float map in [0, 1]}`` at the input's size, on the CPU.

    Example:
        >>> import torch, torchvision
        >>> from tbfeat import stage_cams
        >>> net = torchvision.models.resnet18(weights=None, num_classes=3)
        >>> maps = stage_cams(net, torch.rand(1, 3, 64, 64), stages=["layer2"])
        >>> tuple(maps["05_layer2"].shape)
        (1, 64, 64)
    """
    if method not in CAM_METHODS:
        raise ValueError(
            f"method must be one of {', '.join(map(repr, CAM_METHODS))}, got {method!r}"
        )
    _check_target(target)
    adapter = adapt(model)
    if not adapter.takes_preprocess:
        raise ValueError(
            f"stage_cams handles plain modules and classifiers; {type(adapter.module).__name__} "
            "(a detector or YOLO model) is not supported yet"
        )
    extra = {"preprocess": preprocess} if preprocess is not None else {}
    probes = adapter.prepare(inputs, **extra)
    if len({tuple(t.shape) for t in probes.inputs}) > 1:
        raise ValueError("stage_cams takes images of one size; resize them, or call it per image")
    module = adapter.module
    chosen = resolve_stages(module, adapter.candidate_stages(), stages, adapter.default_stages())
    layercam = method == "layercam"
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(stage: Any, output: Any) -> None:
        t = output[stage.output] if stage.output is not None else output
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            return
        if stage.key in acts:
            return
        acts[stage.key] = t.detach().clone()  # later in-place ops change t, not this copy
        if layercam and t.requires_grad:  # the gradient w.r.t. this value, as it is now
            t.register_hook(lambda g, key=stage.key: grads.__setitem__(key, g.detach()))

    hooks = StageHooks(chosen, keep, root=module, exclusive=True)
    gradients = torch.enable_grad() if layercam else contextlib.nullcontext()
    with probing(module, hooks), hooks, torch.inference_mode(False), gradients:
        # the input requires grad, so frozen parameters still give stage gradients
        x = [t.detach().clone().requires_grad_(layercam) for t in probes.inputs]
        out = adapter.forward(x, module, chosen)
        if layercam:
            _backward(out, x, target)  # fills grads through the tensor hooks
    size = tuple(probes.inputs[0].shape[-2:])
    return {key: _cam(a, grads if layercam else None, key, size) for key, a in acts.items()}


def _check_target(target: Any) -> None:
    if (
        target is not None
        and not callable(target)
        and (isinstance(target, bool) or not isinstance(target, int) or target < 0)
    ):
        raise TypeError(
            f"target must be None (top-1), a class index >= 0 or a function of the output, "
            f"got {target!r}"
        )


def _backward(out: Any, inputs: list[torch.Tensor], target: Target) -> None:
    """Backpropagate the summed target score to the inputs (never to a parameter's
    ``.grad``); the stage outputs' tensor hooks keep their gradients on the way."""
    score = _score(out, target)
    if not score.requires_grad:
        raise ValueError(
            "the target score does not depend on the input through a gradient (a forward "
            "under no_grad, or a target that detaches); use method='activation'"
        )
    torch.autograd.grad(score.sum(), inputs, allow_unused=True)


def _score(out: Any, target: Target) -> torch.Tensor:
    """One score per image: the target class's logit (top-1 by default) or ``target(out)``."""
    if callable(target):
        score = target(out)
    elif isinstance(out, torch.Tensor) and out.dim() == 2:
        classes = out.argmax(1)
        if target is not None:
            classes = torch.full_like(classes, target)
        if int(classes.max()) >= out.shape[1]:
            raise ValueError(
                f"target class {target} is out of range; allowed 0..{out.shape[1] - 1}"
            )
        score = out.gather(1, classes[:, None])[:, 0]
    else:
        raise TypeError(
            f"the model returned {type(out).__name__} "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}, not (N, classes) "
            "scores; pass target= a function of the output giving one score per image"
        )
    if not isinstance(score, torch.Tensor) or score.dim() != 1:
        raise TypeError(f"target must give one score per image, a 1-D tensor, got {score!r}")
    return score


@torch.no_grad()
def _cam(
    act: torch.Tensor, grads: dict[str, torch.Tensor] | None, key: str, size: tuple[int, int]
) -> torch.Tensor:
    """LayerCAM (``grads`` given; a stage the score does not depend on gets zeros) or the
    channel mean of |activation|, resized to ``size``, per image in [0, 1]."""
    a = act.detach().float()
    if grads is None:
        cam = a.abs().mean(1)
    else:
        grad = grads.get(key, torch.zeros_like(a))
        cam = (grad.float().clamp(min=0) * a).sum(1).clamp(min=0)
    cam = nn.functional.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    cam = (cam - lo[:, None, None]) / (hi - lo).clamp(min=1e-12)[:, None, None]
    return cam.clamp(0, 1).cpu()
