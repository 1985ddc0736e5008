"""Class activation maps per stage: where each stage finds the evidence for the answer.

:func:`stage_cams` runs a model on probe images with its stages hooked and, for
``method="layercam"``, takes the gradient of the chosen predictions' class scores with
respect to each stage's output: LayerCAM weighs every activation by its positive
gradient, sums over channels and clamps at 0. A detector's predictions are chosen as
Ultralytics' LayerCAM chooses them (:func:`tbfeat.targets.choose`); each costs one
backward pass, and each stage's map is the maximum of the per-prediction maps, each
scaled to its own maximum, so a strong prediction does not hide a weak one.
``method="activation"`` needs no gradient: the channel mean of ``|activation|``. Each map
is scaled to [0, 1] per image and resized to the input as the model sees it.

The gradient is taken with ``torch.autograd.grad`` towards the input alone (a detector's:
the batch its transform returns, the transform run without gradient), so no parameter's
``.grad`` is touched; the model runs in eval mode under the probe lock, out
of ``torch.inference_mode``, and its hooks are removed, every module's mode and the
heads' caches restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import ModelAdapter, adapt, check_preprocess
from .capture import CamImages, CaptureSession
from .hooks import StageHooks, probing
from .images import ImageLike
from .notes import Notes
from .options import LogOptions
from .stages import Stage, StageSpec, resolve_stages
from .targets import CamTarget, NoScores, ScoreTap, as_target, choose
from .tokens import as_map

CAM_METHODS = ("layercam", "activation")
Target = int | Sequence[int] | Callable[[Any], torch.Tensor] | CamTarget | None
"""A classifier's class (``None``: each image's top-1); a detector's class ids (``None``:
every class); or a function of the model's output giving one score per image."""


@dataclass(frozen=True)
class CamResult:
    """Maps of one probe, one entry per image (images of different sizes may differ)."""

    maps: dict[str, list[torch.Tensor]]
    """``{stage key: [(h, w) map in [0, 1] per image]}``, at the stage's own resolution
    (:func:`tbfeat.render.cam_overlay` blends one over the input of any size)."""
    seen: list[torch.Tensor]
    """Per image, ``(3, H, W)`` in [0, 1]: the input as the model saw it."""


def stage_cams(
    model: nn.Module | Any,
    inputs: ImageLike | Sequence[ImageLike],
    *,
    stages: StageSpec | Iterable[StageSpec] | None = None,
    method: str = "layercam",
    target: Target = None,
    conf: float = 0.25,
    topk: int = 16,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    imgsz: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-stage class activation maps of a classifier, a detector or any module.

    Args:
        model: What :class:`~tbfeat.FeatureLogger` takes: an ``nn.Module`` classifier
            (``(N, classes)`` scores), an Ultralytics model (Detect, Segment, Pose, OBB,
            Classify heads, RT-DETR), a torchvision detector (Faster/Mask/Keypoint R-CNN,
            RetinaNet, FCOS, SSD), or any module with a callable ``target``.
        inputs: Probe images, as for :meth:`tbfeat.FeatureLogger.log`.
        stages: As for :class:`~tbfeat.FeatureLogger`; stages without a 4-D output are
            left out.
        method: ``"layercam"`` (gradients) or ``"activation"`` (no gradient).
        target: A classifier: ``None`` for each image's top-1 class, or a class id. A
            detector: ``None`` for every class, or class ids to keep. Any model: a function
            of the output returning ``(N,)`` scores.
        conf: A detector's predictions at or above this class probability are explained;
            where none is, the single best one.
        topk: At most this many predictions per image (one backward pass each).
        preprocess: As for :class:`~tbfeat.FeatureLogger` (plain modules, classifiers).
        imgsz: The letterbox size of Ultralytics models (default their training size).

    Returns:
        ``{stage key: (N, H, W) float map in [0, 1]}`` at the size the model sees (after
        a letterbox or a detector's transform), on the CPU.

    Example:
        >>> import torch, torchvision
        >>> from tbfeat import stage_cams
        >>> net = torchvision.models.resnet18(weights=None, num_classes=3)
        >>> maps = stage_cams(net, torch.rand(1, 3, 64, 64), stages=["layer2"])
        >>> tuple(maps["05_layer2"].shape)
        (1, 64, 64)
    """
    check_method(method)
    cam_target = as_target(target, conf, topk)
    adapter = adapt(model)
    check_preprocess(preprocess, adapter)
    probes = adapter.prepare(inputs, imgsz=imgsz, preprocess=preprocess)
    module = adapter.module
    chosen = resolve_stages(module, adapter.candidate_stages(), stages, adapter.default_stages())
    result = compute_cams(adapter, probes.inputs, chosen, method, cam_target, at_input=True)
    if len({tuple(s.shape) for s in result.seen}) > 1:
        raise ValueError("stage_cams takes images of one size; resize them, or call it per image")
    size = tuple(result.seen[0].shape[-2:])
    return {key: _finish(torch.stack(maps), size) for key, maps in result.maps.items()}


def check_method(method: Any) -> None:
    if method not in CAM_METHODS:
        raise ValueError(
            f"method must be one of {', '.join(map(repr, CAM_METHODS))}, got {method!r}"
        )


def compute_cams(
    adapter: ModelAdapter,
    inputs: Sequence[torch.Tensor],
    stages: Sequence[Stage],
    method: str,
    target: CamTarget,
    module: nn.Module | None = None,
    at_input: bool = False,
) -> CamResult:
    """The maps of prepared probe inputs (:meth:`ModelAdapter.prepare`), images of one
    size batched together, for ``module`` (default the adapter's).

    Each explained prediction's map is scaled to its own maximum, and a stage's map is
    the maximum over the predictions: at the stage's resolution (what a probe stores), or
    with ``at_input`` at the size the model sees, each prediction's map resized first, as
    Ultralytics' own ``class_activation_map`` combines them.
    """
    module = adapter.module if module is None else module
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(inputs):
        groups.setdefault(tuple(t.shape), []).append(i)
    maps: dict[str, list[Any]] = {}
    seen: list[Any] = [None] * len(inputs)
    for indices in groups.values():
        batch = [inputs[i] for i in indices]
        group_maps, group_seen = _batch_cams(
            adapter, module, batch, stages, method, target, at_input
        )
        for j, i in enumerate(indices):
            seen[i] = group_seen[j]
            for key, m in group_maps.items():
                maps.setdefault(key, [None] * len(inputs))[i] = m[j]
    return CamResult({k: v for k, v in maps.items() if all(m is not None for m in v)}, seen)


def _batch_cams(
    adapter: ModelAdapter,
    module: nn.Module,
    batch: list[torch.Tensor],
    stages: Sequence[Stage],
    method: str,
    target: CamTarget,
    at_input: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    layercam = method == "layercam"
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(stage: Stage, output: Any) -> None:
        t = stage.select(output)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return
        fmap = as_map(t, stage.tokens)  # a transformer's tokens as their map
        if fmap is None or stage.key in acts:
            return
        acts[stage.key] = fmap.detach().clone()  # later in-place ops change t, not this copy
        if layercam and t.requires_grad:  # the gradient w.r.t. this value, as it is now

            def keep_grad(g: torch.Tensor, key: str = stage.key, how: Any = stage.tokens) -> None:
                grads[key] = as_map(g.detach(), how)  # laid out as the activation

            t.register_hook(keep_grad)

    hooks = StageHooks(stages, keep, root=module, exclusive=True)
    tap = adapter.score_tap(module)
    grad_mode = torch.enable_grad() if layercam else torch.no_grad()
    with probing(module, hooks), hooks, tap, torch.inference_mode(False), grad_mode:
        # the input requires grad, so frozen parameters still give stage gradients
        x = [t.detach().clone().requires_grad_(layercam) for t in batch]
        out, leaves = adapter.cam_forward(x, module)
        seen = tap.seen(x).detach()
        if layercam:
            size = tuple(seen.shape[-2:]) if at_input else None
            cams = _layercam(out, leaves, tap, target, acts, grads, size)
        else:
            cams = {key: a.float().abs().mean(1) for key, a in acts.items()}
    return {key: _scaled(c.float().cpu()) for key, c in cams.items()}, _displayable(seen)


def _layercam(
    out: Any,
    leaves: list[torch.Tensor],
    tap: ScoreTap,
    target: CamTarget,
    acts: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    size: tuple[int, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """One backward pass per chosen prediction; per stage, the maximum of the passes'
    LayerCAM maps, each scaled per image to its maximum (resized to ``size`` first)."""
    scores = [_score(out, target.score).sum()] if target.score else choose(tap.scores(out), target)
    combined: dict[str, torch.Tensor] = {}
    for k, score in enumerate(scores):
        if not score.requires_grad:
            raise ValueError(
                "the target score does not depend on the input through a gradient (a "
                "forward under no_grad, or a target that detaches); use method='activation'"
            )
        grads.clear()
        torch.autograd.grad(score, leaves, retain_graph=k < len(scores) - 1, allow_unused=True)
        for key, a in acts.items():
            g = grads.get(key)  # None: the score does not depend on this stage
            cam = _layer_map(a, torch.zeros_like(a) if g is None else g, size)
            combined[key] = cam if key not in combined else torch.maximum(combined[key], cam)
    return combined


@torch.no_grad()
def _layer_map(
    act: torch.Tensor, grad: torch.Tensor, size: tuple[int, ...] | None = None
) -> torch.Tensor:
    cam = (grad.float().clamp(min=0) * act.float()).sum(1).clamp(min=0)
    if size is not None:
        cam = nn.functional.interpolate(cam[:, None], size=size, mode="bilinear",
                                        align_corners=False)[:, 0]  # fmt: skip
    return (cam / cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]).cpu()


def _score(out: Any, score: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    s = score(out)
    if not isinstance(s, torch.Tensor) or s.dim() != 1:
        raise TypeError(f"target must give one score per image, a 1-D tensor, got {s!r}")
    return s


@torch.no_grad()
def _finish(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, h, w)`` maps to ``size`` and scale each image's map to [0, 1]. The
    bilinear resize is affine, so maps already scaled give what the raw ones would."""
    cam = nn.functional.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)
    return _scaled(cam[:, 0])


@torch.no_grad()
def _scaled(cam: torch.Tensor) -> torch.Tensor:
    """Each image's ``(h, w)`` map scaled to its own [0, 1] (all 0 where it is flat)."""
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    cam = (cam - lo[:, None, None]) / (hi - lo).clamp(min=1e-12)[:, None, None]
    return cam.clamp(0, 1)


@torch.no_grad()
def _displayable(seen: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1]: the first three channels (one repeated), each image
    scaled to its own min/max when it lies outside [0, 1] (a normalized input)."""
    x = seen.detach().float().cpu()
    x = x[:, :1].expand(-1, 3, -1, -1) if x.shape[1] < 3 else x[:, :3]
    lo = x.amin((1, 2, 3), keepdim=True)
    hi = x.amax((1, 2, 3), keepdim=True)
    outside = (lo < 0) | (hi > 1)
    scaled = (x - lo) / (hi - lo).clamp(min=1e-12)
    return torch.where(outside, scaled, x).contiguous()


# ---------------------------------------------------------------------- the logger's policy
CAM_MAX_PIXELS = 2048 * 2048
"""Largest input (height x width) that probes draw class activation maps for."""


def probe_cams(
    adapter: ModelAdapter,
    inputs: Sequence[torch.Tensor],
    names: Sequence[str],
    stages: Sequence[Stage],
    step: int,
    options: LogOptions,
    notes: Notes,
    *,
    module: nn.Module | None = None,
    output: Any = None,
) -> tuple[CamImages, int] | None:
    """The maps of a probe's first ``max_images`` images, as the message the recorder
    draws and its size in bytes; ``None`` when there are none to draw, said once through
    ``notes`` (a map never ends the user's run). ``output``, the probe's own, tells a
    model without class scores before any pass of the maps' own."""
    n = min(options.max_images, len(inputs), len(names))
    if not n or _too_large(inputs[:n], notes):
        return None
    try:
        if output is not None:
            _check_scores(adapter, module or adapter.module, output, options)
        target = options.cam_target_spec()
        result = compute_cams(adapter, inputs[:n], stages, options.cam, target, module=module)
    except NoScores as e:  # a model with no class scores: nothing to explain
        notes(
            "cam-no-scores",
            f"no class activation maps: {str(e).replace('target=', 'cam_target=')} "
            "(or cam='activation', which needs none; cam=None turns them off)",
            warn=options.cam_target is not None,
        )
        return None
    except Exception as e:  # noqa: BLE001 - a map never ends the user's run
        notes(
            f"cam-error:{type(e).__name__}",
            f"class activation maps were not logged: {type(e).__name__}: {e}",
            warn=True,
        )
        return None
    maps = tuple((key, tuple(m)) for key, m in result.maps.items())
    nbytes = sum(t.numel() * t.element_size() for t in result.seen)
    nbytes += sum(t.numel() * t.element_size() for _, m in maps for t in m)
    return CamImages(step, tuple(result.seen), maps, tuple(names[:n])), nbytes


def captured_cams(
    adapter: ModelAdapter,
    stages: Sequence[Stage],
    session: CaptureSession,
    active: Callable[[], bool],
    post: Callable[[Any, int], bool],
    notes: Notes,
) -> Callable[..., None]:
    """A forward hook for the module a ``with`` block captures (``cam_captures=True``):
    the maps of the batch it just ran (one more forward and backward), while ``active()``
    says the block's hooks record."""
    module = adapter.module

    def after_forward(m: nn.Module, args: Any, output: Any) -> None:
        if not active() or not args:
            return
        images = _batch_images(args[0])
        names = session.claim_cam_images(len(images)) if images else ()
        if names:
            found = probe_cams(
                adapter, images, names, stages, session.step, session.options, notes, module=module
            )
            if found is not None:
                post(*found)

    return after_forward


def _too_large(inputs: Sequence[torch.Tensor], notes: Notes) -> bool:
    largest = max(t.shape[-2] * t.shape[-1] for t in inputs)
    if largest <= CAM_MAX_PIXELS:
        return False
    notes(
        "cam-size",
        f"no class activation maps for inputs of {largest} pixels (more than "
        f"{CAM_MAX_PIXELS}): their backward passes would need several times the "
        "memory of the forward; resize the probes, or pass cam=None",
        warn=True,
    )
    return True


def _check_scores(adapter: ModelAdapter, module: nn.Module, output: Any, options: Any) -> None:
    """Raise :class:`NoScores` when a model whose scores are its output holds no
    ``(N, classes)`` scores to explain by default (a detector's probe ran its backbone
    only: its tap reads the heads, and the probe's output says nothing)."""
    if options.cam != "layercam" or callable(options.cam_target):
        return
    tap = adapter.score_tap(module)
    if tap.reads_output:
        tap.logits(output[0] if isinstance(output, list) and output else output)


def _batch_images(batch: Any) -> list[torch.Tensor]:
    """The images of a captured forward's first argument: an ``(N, C, H, W)`` batch or
    a list of ``(C, H, W)`` images (torchvision detectors); none for anything else."""
    if isinstance(batch, torch.Tensor) and batch.dim() == 4 and batch.is_floating_point():
        return list(batch.unbind(0))
    if isinstance(batch, (list, tuple)) and all(
        isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point() for t in batch
    ):
        return list(batch)
    return []
