"""Ultralytics YOLO / RT-DETR: per-layer feature maps in predict, val and train.

``FeatureLogger(yolo)`` with an ``ultralytics.YOLO`` (or ``RTDETR``) object gets
:class:`UltralyticsAdapter`: the stages are the layers of ``yolo.model.model`` (tag
``<m.i>_<short m.type>``, head skipped by default), and inside a ``with`` block the
callbacks below log

- ``predict()``: every predicted image (up to ``max_images`` per call), never the warm-up;
- ``val()``: the first ``max_images`` validation images;
- ``train()``: probe images, letterboxed at the training ``imgsz``, through the EMA model
  at the end of every ``every``-th epoch, at step = the 1-based epoch of ``results.csv``,
  into the trainer's own ``save_dir``.

The callbacks are plain functions, one per Ultralytics event (``on_predict_start``,
``on_val_start``, ``on_fit_epoch_end``...), written like Ultralytics' own
``ultralytics/utils/callbacks`` modules; their state is one small picklable
:class:`UltralyticsCallbacks` per logger instead of module globals, so each function
takes it first and is bound to it. They use the logger's public API only
(``begin``/``end`` around the user's forwards, ``prepare``/``probe`` for the epoch's
probes, ``use_logdir``). Every attribute of Ultralytics objects read here, and
everything that differs between its releases, is in the compatibility section.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MethodType
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters import ModelAdapter, Probes, check_preprocess
from ..images import ImageLike, to_tensors
from ..notes import Notes, warn
from ..safeload import CheckpointError, LoadedCheckpoint, allowed_globals, inspect_checkpoint
from ..stages import Stage, sanitize
from ..targets import NoScores, ScoreTap
from ..writer import global_rank

# ==================================================================== compatibility
# Everything tbfeat reads or patches of Ultralytics objects, and everything that differs
# between its releases, tested on 8.3.0 and the newest release. The adapter and the
# callbacks after this section reach Ultralytics only through it.
ARRAY_CHANNEL_ORDER = "BGR"
"""Ultralytics takes numpy arrays as BGR (OpenCV's order, what ``YOLO.predict``
assumes), so probe arrays for its models are read so; everything else is RGB."""

FILES_EXIF_ORIENTED = True
"""Ultralytics reads image files with OpenCV, which turns them upright by their EXIF
orientation, so probe files for its models are read so."""


def _classes() -> tuple[type, type]:
    from ultralytics.engine.model import Model
    from ultralytics.nn.tasks import BaseModel

    return Model, BaseModel


def torch_model(model: Any) -> nn.Module:
    """The ``nn.Module`` with the layer list behind an ``AutoBackend`` or a DDP wrapper."""
    for _ in range(5):
        if model is None:
            break
        if isinstance(getattr(model, "model", None), nn.Sequential):
            return model
        backend = getattr(model, "backend", None)
        if backend is not None:
            model = getattr(backend, "model", None)
        elif getattr(model, "module", None) is not None:
            model = model.module
        else:
            model = getattr(model, "model", None)
    raise TypeError("no PyTorch Ultralytics model found (exported formats cannot be hooked)")


def layer_key(m: nn.Module, position: int) -> tuple[int, str]:
    """A layer's index ``m.i`` and short type name ``m.type`` (set by ``parse_model``)."""
    index = getattr(m, "i", position)
    return index, str(getattr(m, "type", type(m).__name__)).rsplit(".", 1)[-1]


def model_imgsz(wrapper: Any, module: nn.Module) -> int | list | None:
    """The training ``imgsz``: the wrapper's overrides, else the model's ``args`` (a
    namespace in training, a dict on a model loaded from a checkpoint)."""
    overrides = getattr(wrapper, "overrides", None) or {}
    args = getattr(module, "args", None)
    stored = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    return overrides.get("imgsz") or stored


def save_dir(owner: Any) -> str | None:
    folder = getattr(owner, "save_dir", None)
    return os.fspath(folder) if folder else None


def batch_paths(predictor: Any) -> list[Any]:
    """The source paths of the predictor's current batch (``batch[0]``)."""
    batch = getattr(predictor, "batch", None)
    return list(batch[0]) if batch else []


def done_warmup(owner: Any) -> bool:
    return bool(getattr(owner, "done_warmup", True))


def val_files(validator: Any) -> list[str]:
    dataset = getattr(getattr(validator, "dataloader", None), "dataset", None)
    return list(getattr(dataset, "im_files", None) or [])


def in_training(validator: Any, trainer: Any) -> bool:
    """Validation run by a training: each epoch's, and ``final_eval`` (which calls the
    trainer's validator without a trainer)."""
    return bool(getattr(validator, "training", False)) or (
        trainer is not None and validator is getattr(trainer, "validator", None)
    )


def epoch_of(trainer: Any) -> tuple[int, int]:
    """The 1-based epoch just finished (as in ``results.csv``) and the number of epochs."""
    return int(trainer.epoch) + 1, int(trainer.epochs)


def epoch_curves(trainer: Any) -> dict[str, float]:
    """The epoch's mean losses and learning rates, under Ultralytics' own tags
    (``train/box_loss``, ``lr/pg0``), as its TensorBoard callback writes them."""
    return {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.lr}


def fit_metrics(trainer: Any) -> dict[str, float]:
    """The epoch's validation metrics and losses (``metrics/mAP50(B)``, ``val/box_loss``)."""
    return dict(trainer.metrics or {})


def writes_own_tensorboard(trainer: Any) -> bool:
    """Whether Ultralytics' TensorBoard callback is on for this trainer and can write
    (the ``tensorboard`` setting, and TensorBoard importable)."""
    for fns in getattr(trainer, "callbacks", {}).values():
        for fn in fns:
            module = getattr(fn, "__module__", "") or ""
            if module.endswith("callbacks.tensorboard"):
                return getattr(sys.modules.get(module), "SummaryWriter", None) is not None
    return False


def probe_model(trainer: Any) -> nn.Module:
    """The model an epoch's probes run through: the EMA when there is one."""
    ema = getattr(getattr(trainer, "ema", None), "ema", None)
    return torch_model(ema if ema is not None else trainer.model)


def train_imgsz(trainer: Any) -> int:
    size = trainer.args.imgsz
    return int(max(size) if isinstance(size, (list, tuple)) else size)


def train_probe_files(trainer: Any, n: int) -> list[str]:
    """The first ``n`` validation images of a training (detection or classification)."""
    dataset = getattr(getattr(trainer, "test_loader", None), "dataset", None)
    files = list(getattr(dataset, "im_files", None) or [])
    if not files:
        files = [s[0] for s in getattr(dataset, "samples", None) or []]
    return files[:n]


def ran_ddp(trainer: Any) -> bool:
    """Whether ``train()`` launched DDP ranks in subprocesses: 8.4 sets ``trainer.ddp``;
    8.3 decides inside ``train()`` from ``args.device`` (several devices) alone."""
    if hasattr(trainer, "ddp"):
        return bool(trainer.ddp)
    device = getattr(getattr(trainer, "args", None), "device", None)
    if isinstance(device, str):
        devices = [d for d in device.split(",") if d.strip()]
    else:
        devices = list(device) if isinstance(device, (list, tuple)) else []
    return len(devices) > 1 and "LOCAL_RANK" not in os.environ


DDP_CALLBACKS_SINCE = (8, 4, 140)
"""The first Ultralytics release whose DDP launch (``generate_ddp_file``) pickles the
trainer's callbacks into every rank; earlier ones re-import the trainer class by name in
the ranks and drop every callback added in Python."""


HEAD_CACHES = ("shape", "shapes", "anchors", "strides", "valid_mask")
"""Attributes in which heads keep anchors between forwards (Detect: ``shape``,
``anchors``, ``strides``; RT-DETR: ``shapes``, ``anchors``, ``valid_mask``). Made under
inference mode they cannot enter an autograd graph, so a CAM forward rebuilds them."""


class YoloScoreTap(ScoreTap):
    """The class logits of a YOLO head's predictions, read where each release computes
    them: the class branch of every level of Detect and its subclasses (Segment, Pose,
    OBB; the one-to-one branch of end-to-end heads), Classify's linear layer, RT-DETR's
    last decoder score head. The head's anchor caches are rebuilt for the forward and
    given back afterwards."""

    reads_output = False

    def install(self) -> None:
        head = self.module.model[-1]
        self._parts: list[torch.Tensor] = []
        self._caches = {a: getattr(head, a) for a in HEAD_CACHES if hasattr(head, a)}
        for a in ("shape", "shapes"):
            if a in self._caches:
                setattr(head, a, None)
        linear = getattr(head, "linear", None)
        if type(head).__name__.startswith("Classify") and isinstance(linear, nn.Linear):
            self.probabilities = "softmax"
            self._add(linear, lambda out: out[:, :, None])
            return
        scores = getattr(head, "dec_score_head", None)
        if isinstance(scores, nn.ModuleList) and len(scores):
            self.probabilities = "sigmoid"
            self._add(scores[-1], lambda out: out.transpose(1, 2))  # (B, nc, queries)
            return
        branches = getattr(head, "one2one_cv3" if getattr(head, "end2end", False) else "cv3", None)
        nc = getattr(head, "nc", None)
        if isinstance(branches, nn.ModuleList) and nc:
            self.probabilities = "sigmoid"
            for branch in branches:
                self._add(branch, lambda out, nc=nc: _level_logits(out, nc))
            return
        raise NoScores(
            f"no class scores found in the {type(head).__name__} head; pass target= a "
            "function of the output giving one score per image"
        )

    def _add(self, module: nn.Module, reshape: Callable[[torch.Tensor], torch.Tensor]) -> None:
        def hook(m: nn.Module, args: Any, output: Any) -> None:
            self._parts.append(reshape(output))

        self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        super().remove()
        head = self.module.model[-1]
        for name, value in getattr(self, "_caches", {}).items():
            setattr(head, name, value)
        self._caches = {}

    def logits(self, output: Any) -> list[torch.Tensor]:
        if not self._parts:
            raise NoScores("the YOLO head gave no class logits in this forward")
        return list(torch.cat(self._parts, 2).unbind(0))


def _level_logits(out: torch.Tensor, nc: int) -> torch.Tensor:
    if out.dim() != 4 or out.shape[1] != nc:
        raise NoScores(
            f"a class branch gave shape {tuple(out.shape)}, not (B, {nc}, h, w) class "
            "logits (an open-vocabulary head?); pass target= a function of the output"
        )
    return out.flatten(2)


def ultralytics_version() -> str:
    import ultralytics

    return str(getattr(ultralytics, "__version__", "0"))


def ddp_keeps_callbacks(version: str | None = None) -> bool:
    """Whether this Ultralytics release runs the trainer's callbacks in its DDP ranks."""
    parts = []
    for part in (version or ultralytics_version()).split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts) >= DDP_CALLBACKS_SINCE


def predict_source_names(source: Any) -> list[str | None] | None:
    """File stems of a list source, which some releases lose (``autocast_list`` drops
    the images' ``filename``)."""
    if not isinstance(source, (list, tuple)):
        return None
    return [Path(s).stem if isinstance(s, (str, os.PathLike)) else None for s in source]


def model_layers(model: nn.Module) -> nn.Sequential:
    """The layer list of an Ultralytics model (``model.model``, built by ``parse_model``)."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential):
        raise TypeError(f"{type(model).__name__} has no Ultralytics layer list (model.model)")
    return layers


def is_head(module: nn.Module, layers: nn.Sequential) -> bool:
    """A head is the last layer, or a module class from ``ultralytics.nn.modules.head``."""
    return module is layers[-1] or type(module).__module__.endswith("nn.modules.head")


def model_stride(model: nn.Module) -> int:
    """The model's largest stride (``model.stride``), 32 when it has none."""
    stride = getattr(model, "stride", None)
    return int(stride.max()) if isinstance(stride, torch.Tensor) else 32


def letterbox_hwc(image: np.ndarray, imgsz: int, stride: int) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image resized and padded to ``(imgsz, imgsz, 3)`` (gray 114
    borders) by Ultralytics' own ``LetterBox``, as its validation does."""
    from ultralytics.data.augment import LetterBox

    return LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=stride)(image=image)


def wrapper_model(wrapper: Any) -> nn.Module | None:
    """The ``YOLO`` object's current model (``train()`` replaces it)."""
    current = getattr(wrapper, "model", None)
    return current if isinstance(current, nn.Module) else None


def predict_model(predictor: Any) -> nn.Module:
    """The model a predictor runs (``predictor.model``, an ``AutoBackend``)."""
    return torch_model(predictor.model)


def add_callbacks(wrapper: Any, events: dict[str, Callable[[Any], None]]) -> None:
    """Register ``events`` on a ``YOLO`` object (shared by its trainer, predictor and
    validator)."""
    for event, fn in events.items():
        wrapper.add_callback(event, fn)


def remove_callbacks(wrapper: Any, events: dict[str, Callable[[Any], None]]) -> None:
    for event, fn in events.items():
        fns = wrapper.callbacks.get(event, [])
        if fn in fns:
            fns.remove(fn)


def patch_wrapper(
    wrapper: Any, before_predict: Callable[[Any], None], after_train: Callable[[Any], None]
) -> Callable[[], None]:
    """Wrap the ``YOLO`` object's ``predict`` (``before_predict(source)`` first: some
    releases lose a list source's file names) and ``train`` (``after_train(trainer)``
    after a ``train()`` that made a trainer); returns what undoes it."""
    predict = type(wrapper).predict.__get__(wrapper)
    train = type(wrapper).train.__get__(wrapper)

    def predicting(source: Any = None, *args: Any, **kwargs: Any) -> Any:
        before_predict(source)
        return predict(source, *args, **kwargs)

    def training(*args: Any, **kwargs: Any) -> Any:
        before = getattr(wrapper, "trainer", None)
        result = train(*args, **kwargs)
        trainer = getattr(wrapper, "trainer", None)
        if trainer is not before and trainer is not None:
            after_train(trainer)
        return result

    wrapper.predict, wrapper.train = predicting, training

    def undo() -> None:
        wrapper.__dict__.pop("predict", None)
        wrapper.__dict__.pop("train", None)

    return undo


# A standalone val() runs a model tbfeat cannot reach through a documented hook point:
# Ultralytics' callbacks receive only the validator, and ``BaseValidator.__call__`` keeps
# the model it runs (8.4: an AutoBackend around a deep copy made by ``get_model``; 8.3.0:
# an AutoBackend, with ``# self.model = model`` commented out) in a local variable. The
# one place it passes that model on is ``init_metrics(model)``, a method for validator
# subclasses to override, not a callback. So a global forward pre-hook finds it, for as
# short a time as possible (removed at the first match, or when the val() ends).
class _ModelFinder:
    """Finds the model a standalone ``val()`` runs (a copy, only a local of the
    validator): a global forward pre-hook, removed when found, matches the first
    Ultralytics model whose forward starts in a validation batch on this thread."""

    def __init__(self, gate: Callable[[], bool], found: Callable[[nn.Module], None]) -> None:
        self._gate, self._found = gate, found
        self._thread = threading.get_ident()
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any) -> None:
        if (
            self._handle is None
            or threading.get_ident() != self._thread
            or not isinstance(module, _classes()[1])
            or not self._gate()
        ):
            return
        self.remove()
        self._found(module)

    def remove(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()


# ---------------------------------------------------- checkpoints (compatibility)
def _ultralytics_loader(path: Path) -> Any:
    """Ultralytics' own restricted loader (``torch_safe_load(safe_only=True)`` with its
    ``_SafeLoad`` allow-list, 8.4+) for a ``.pt`` name it loads as given, else ``None``.

    8.3's ``safe_only`` is another thing (a full unpickler that lets ``builtins`` through),
    so the signature alone does not qualify; names Ultralytics rewrites (``yolov5s.pt`` to
    ``yolov5su.pt``, then downloads) are loaded by tbfeat itself.
    """
    import inspect

    try:
        from ultralytics.nn import tasks
        from ultralytics.utils.checks import check_yolov5u_filename
    except ImportError:
        return None
    load = getattr(tasks, "torch_safe_load", None)
    if (
        path.suffix != ".pt"
        or load is None
        or not getattr(getattr(tasks, "_SafeLoad", None), "SUPPORTED", False)
        or "safe_only" not in inspect.signature(load).parameters
        or check_yolov5u_filename(str(path), verbose=False) != str(path)
        or str(path) != str(path).strip().replace("'", "")
    ):
        return None
    return load


def _ultralytics_dict(path: Path) -> dict[str, Any]:
    """An Ultralytics checkpoint's dict, loaded within the allow-list."""
    import torch

    entries = allowed_globals(inspect_checkpoint(path))
    load = _ultralytics_loader(path)
    # the entries, the user's own layers among them, in addition to Ultralytics' own list
    with torch.serialization.safe_globals(entries):
        if load is None:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        ckpt, file = load(str(path), safe_only=True)
    if Path(file) != path:
        raise CheckpointError(f"Ultralytics loaded {file!r} instead of {str(path)!r}")
    return ckpt


def ultralytics_model(ckpt: Any, path: Path) -> Any:
    """The model in an Ultralytics checkpoint dict, prepared as Ultralytics' own loader
    does (FP32, eval, ``args`` with the training ``imgsz``), without loading it again."""
    import torch
    from torch import nn
    from ultralytics.utils import DEFAULT_CFG_DICT

    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{str(path)!r} holds no Ultralytics model ('ema' or 'model')")
    train_args = ckpt.get("train_args")
    model = model.float()
    model.args = {**DEFAULT_CFG_DICT, **(train_args if isinstance(train_args, dict) else {})}
    model.pt_path = str(path)
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model.eval()


def _load_yolo(path: Path) -> Any:
    """``YOLO(path)`` (``RTDETR`` for RT-DETR models): Ultralytics' full unpickling."""
    from ultralytics import RTDETR, YOLO

    model = YOLO(str(path))
    if type(model.model).__name__.startswith("RTDETR"):
        model = RTDETR(str(path))
    return model


def load_checkpoint(path: Path, *, trust: bool = False) -> LoadedCheckpoint:
    """An Ultralytics checkpoint: its model, its stored epoch and its other entries
    (``train_args``, ``date``...; ``model`` and ``ema`` left out).

    Without ``trust`` the file loads within tbfeat's allow-list (Ultralytics' restricted
    loader where it has one, else ``torch.load(weights_only=True)``) and the model is the
    bare task model (``DetectionModel``...); with ``trust`` it is ``YOLO(path)``
    (``RTDETR``), fully unpickled as Ultralytics loads it.

    Raises:
        UnsafeCheckpointError: without ``trust``, a global off the allow-list.
    """
    if trust:
        model = _load_yolo(path)
        ckpt = getattr(model, "ckpt", None) or {}
    else:
        ckpt = _ultralytics_dict(path)
        model = ultralytics_model(ckpt, path)
    extras = {k: v for k, v in ckpt.items() if k not in ("model", "ema")}
    return LoadedCheckpoint.of(model, extras)


# (end of the compatibility section)


# ==================================================================== adapter
def adapter_for(obj: object) -> ModelAdapter | None:
    """The adapter for an Ultralytics ``Model`` wrapper or a bare Ultralytics ``BaseModel``;
    ``None`` (not one of this integration's) for anything else."""
    model_cls, base_cls = _classes()
    if isinstance(obj, model_cls):
        if not isinstance(obj.model, nn.Module):
            raise TypeError(
                f"only PyTorch Ultralytics models can be logged, got model={obj.model!r}"
            )
        return UltralyticsAdapter(obj.model, wrapper=obj)
    if isinstance(obj, base_cls):
        return UltralyticsAdapter(obj)
    return None


def yolo_stages(model: nn.Module) -> list[Stage]:
    """One stage per layer of ``model.model``, indexed by ``m.i`` and labelled by ``m.type``."""
    stages = []
    for pos, m in enumerate(model_layers(model)):
        index, type_name = layer_key(m, pos)
        stages.append(Stage(index, f"model.{pos}", type_name, m, sanitize(type_name)))
    return stages


def letterbox(image: torch.Tensor, imgsz: int, stride: int = 32) -> torch.Tensor:
    """An RGB ``(3, H, W)`` image in [0, 1], as tbfeat's reader gives it, as the
    ``(3, imgsz, imgsz)`` tensor a YOLO model sees: at 8 bits, resized and padded as
    Ultralytics' validation does (a step after the reader, not another reader)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"a probe tensor must be RGB (3, H, W) in [0, 1], got shape {tuple(image.shape)}"
        )
    rgb = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    boxed = letterbox_hwc(np.ascontiguousarray(rgb.cpu().numpy()), imgsz, stride)
    return torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1))).float().div_(255.0)


class UltralyticsAdapter(ModelAdapter):
    """Stages and probes of an Ultralytics model (``wrapper`` is the ``YOLO`` object)."""

    model_prepares_input = "Ultralytics' letterbox"

    def __init__(self, module: nn.Module, wrapper: Any = None) -> None:
        self.wrapper = wrapper
        super().__init__(module)

    @property
    def module(self) -> nn.Module:
        """The wrapper's current model (``train()`` replaces it), else the bare model."""
        current = wrapper_model(self.wrapper)
        return self._module if current is None else current

    @module.setter
    def module(self, value: nn.Module) -> None:
        self._module = value

    def candidate_stages(self) -> list[Stage]:
        return yolo_stages(self.module)

    def default_stages(self) -> list[Stage]:
        layers = model_layers(self.module)
        return [s for s in self.candidate_stages() if not is_head(s.module, layers)]

    def imgsz(self, default: int = 640) -> int:
        size = model_imgsz(self.wrapper, self.module)
        if isinstance(size, (list, tuple)):
            size = max(size)
        return int(size) if size else default

    def prepare(
        self,
        inputs: ImageLike | Sequence[ImageLike],
        names: Sequence[str] | None = None,
        *,
        imgsz: int | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Probes:
        """Read probe images as Ultralytics does (arrays BGR, files upright), then
        letterbox them to ``imgsz`` (default the model's training size) like its
        validation does. ``preprocess`` must be ``None``: the letterbox prepares them."""
        check_preprocess(preprocess, self)
        tensors, names = to_tensors(
            inputs, names, channel_order=ARRAY_CHANNEL_ORDER, exif_orientation=FILES_EXIF_ORIENTED
        )
        size, stride = imgsz or self.imgsz(), model_stride(self.module)
        device, dtype = self.device(), self.dtype()
        boxed = (letterbox(t, size, stride).to(device=device, dtype=dtype) for t in tensors)
        return Probes(tuple(boxed), tuple(names))

    def score_tap(self, module: nn.Module) -> ScoreTap:
        return YoloScoreTap(module)

    def attach(self, logger: Any) -> Callable[[], None]:
        """Add the callbacks to the ``YOLO`` object (shared by its trainer, predictor and
        validator); a bare model is captured for the block instead."""
        if self.wrapper is None:
            return super().attach(logger)
        return attach_callbacks(UltralyticsCallbacks(logger), self.wrapper)


# ==================================================================== callbacks
@dataclass
class Capture:
    """A ``predict()`` or standalone ``val()`` whose forwards are being logged."""

    owner: Any = None  # the predictor or validator
    session: Any = None  # the logger's capture, once the model is known
    in_batch: bool = False  # inside a batch (warm-up forwards run before done_warmup)
    finder: _ModelFinder | None = None  # a standalone val(): looks for its model


@dataclass
class PredictNames:
    """Names of a ``predict()``'s images, in the order they come."""

    source: list[str | None] | None = None  # file stems of a list source, if any
    position: int = 0  # images named so far

    def next(self, path: Any) -> str:
        i, self.position = self.position, self.position + 1
        hints = self.source or []
        if i < len(hints) and hints[i]:
            return hints[i]
        if isinstance(path, str) and Path(path).is_file():
            return Path(path).stem
        return str(i)


@dataclass
class Training:
    """One ``train()``: its trainer, probes and what has stopped."""

    trainer: Any = None
    probes: tuple[int, int, Probes] | None = None  # (id(model), imgsz, probes)
    stopped: bool = False  # probing failed: off for the rest of this training
    curves: bool = False  # tbfeat writes Ultralytics' curves (its own TensorBoard is off)
    metric_steps: set[int] = field(default_factory=set)  # epochs whose metrics are written


@dataclass(eq=False)
class UltralyticsCallbacks:
    """The state tbfeat's Ultralytics callbacks share for one logger; ``callbacks()``
    gives the callbacks bound to it, as Ultralytics calls them.

    Small and picklable: Ultralytics' multi-GPU launch (8.4.140 and later) pickles the
    trainer's callbacks into every DDP rank. A pickled copy carries the logger's
    configuration (:class:`~tbfeat.LoggerConfig`), not its model (each rank has its
    own) nor anything open or in progress. In a rank it builds a logger of the trainer's
    model at the first epoch it logs, on global rank 0 only, and closes it when the
    training ends; the other ranks return at once and touch no file.

    Example:
        ::

            for event, fn in UltralyticsCallbacks(logger).callbacks().items():
                yolo.add_callback(event, fn)
    """

    logger: Any  # None in a rank until rank 0 builds its own from saved_config
    saved_config: Any = None
    owns_logger: bool = False
    capture: Capture = field(default_factory=Capture)
    names: PredictNames = field(default_factory=PredictNames)
    training: Training = field(default_factory=Training)
    notes: Notes = field(default_factory=Notes)

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, saved_config=state["config"])  # type: ignore[misc]

    def __getattr__(self, name: str) -> Callable[[Any], None]:
        """A callback by its event (``state.on_train_epoch_end``), bound to this state;
        also how a bound callback is found again when unpickled."""
        if name not in _BY_NAME:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return MethodType(_BY_NAME[name], self)

    @property
    def config(self) -> Any:
        """The logger's :class:`~tbfeat.LoggerConfig` (also before a rank built it)."""
        return self.saved_config if self.logger is None else self.logger.config()

    @property
    def options(self) -> Any:
        """The logger's :class:`~tbfeat.LogOptions`."""
        return (self.saved_config if self.logger is None else self.logger).options

    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        """Ultralytics events and the callbacks for them, bound to this state."""
        return {event: MethodType(fn, self) for event, fn in CALLBACKS.items()}


def attach_callbacks(state: UltralyticsCallbacks, wrapper: Any) -> Callable[[], None]:
    """Register the callbacks on ``wrapper`` (a ``YOLO`` object) and wrap its
    ``predict``/``train``; returns what removes them again."""
    events = state.callbacks()
    add_callbacks(wrapper, events)
    unpatch = patch_wrapper(wrapper, partial(_remember_source, state), _warn_if_callbacks_dropped)

    def detach() -> None:
        remove_callbacks(wrapper, events)
        unpatch()
        _end_capture(state)

    return detach


def _remember_source(state: UltralyticsCallbacks, source: Any) -> None:
    state.names.source = predict_source_names(source)


# ---------------------------------------------------------------- predict / val
def on_predict_start(state: UltralyticsCallbacks, predictor: Any) -> None:
    if state.logger is None:  # a DDP rank: it only trains
        return
    _end_capture(state)
    _use_logdir(state, predictor)
    state.names.position = 0
    _begin(state, predictor, predict_model(predictor))


def on_predict_batch_start(state: UltralyticsCallbacks, predictor: Any) -> None:
    capture = state.capture
    if capture.owner is not predictor:
        return
    names = [state.names.next(p) for p in batch_paths(predictor)]
    if capture.session is not None:
        capture.session.add_names(names)
    capture.in_batch = True


def on_val_start(state: UltralyticsCallbacks, validator: Any) -> None:
    if in_training(validator, state.training.trainer) or state.logger is None:
        return  # the epoch-end probe covers training; final_eval too
    _end_capture(state)
    _use_logdir(state, validator)
    names = [Path(f).stem for f in val_files(validator)[: state.options.max_images]]
    state.capture.owner = validator
    state.capture.finder = _ModelFinder(
        partial(_gate, state), lambda m: _begin(state, validator, m, names)
    )


def on_val_batch_start(state: UltralyticsCallbacks, validator: Any) -> None:
    if state.capture.owner is validator:
        state.capture.in_batch = True


def on_batch_end(state: UltralyticsCallbacks, owner: Any) -> None:
    state.capture.in_batch = False


def on_end(state: UltralyticsCallbacks, owner: Any) -> None:
    capture = state.capture
    if capture.owner is not owner:
        return
    state.names.source = None  # the next predict records its own
    if capture.finder is not None and capture.session is None:
        warn(
            "found no PyTorch Ultralytics model in this val() run; nothing was "
            "logged (exported formats cannot be hooked)"
        )
    _end_capture(state)


def _use_logdir(state: UltralyticsCallbacks, owner: Any) -> None:
    folder = save_dir(owner)  # the run folder of the predictor, validator or trainer
    if folder and state.logger is not None:
        state.logger.use_logdir(folder)


def _gate(state: UltralyticsCallbacks) -> bool:
    # warm-up forwards run inside the first batch before done_warmup is set
    return state.capture.in_batch and done_warmup(state.capture.owner)


def _begin(
    state: UltralyticsCallbacks, owner: Any, module: nn.Module, names: Sequence[str] = ()
) -> None:
    state.capture.session = state.logger.begin(module, gate=partial(_gate, state), names=names)
    state.capture.owner = owner


def _end_capture(state: UltralyticsCallbacks) -> None:
    capture, state.capture = state.capture, Capture()
    if capture.finder is not None:
        capture.finder.remove()
    if capture.session is not None:
        state.logger.end()


# ---------------------------------------------------------------- train
def on_pretrain_routine_start(state: UltralyticsCallbacks, trainer: Any) -> None:
    _end_capture(state)  # a predict stopped half-way (stream=True, break) ends here
    _use_logdir(state, trainer)
    # the curves go into the run unless Ultralytics' own TensorBoard callback writes them
    state.training = Training(trainer, curves=not writes_own_tensorboard(trainer))


def on_train_epoch_end(state: UltralyticsCallbacks, trainer: Any) -> None:
    if global_rank() != 0:
        return  # another DDP rank: no model run, no file, no collective call
    _write_curves(state, trainer, epoch_curves)
    if state.training.stopped:
        return
    epoch, epochs = epoch_of(trainer)
    if epoch % state.options.every and epoch < epochs:
        return
    try:
        _probe_epoch(state, trainer, epoch)
    except Exception as e:  # noqa: BLE001 - logging never ends the user's training
        state.training.stopped = True
        _stopped_warning(f"logging this training at epoch {epoch}", e)


def on_fit_epoch_end(state: UltralyticsCallbacks, trainer: Any) -> None:
    step, _ = epoch_of(trainer)
    if global_rank() == 0 and step not in state.training.metric_steps:
        # (releases before 8.4 validate best.pt at the last epoch's step again)
        state.training.metric_steps.add(step)
        _write_curves(state, trainer, fit_metrics)


def on_train_end(state: UltralyticsCallbacks, trainer: Any) -> None:
    state.training.trainer = None
    _close_own_logger(state)


def teardown(state: UltralyticsCallbacks, trainer: Any) -> None:
    """After every training, also one that raised: close the logger a rank built."""
    _close_own_logger(state)


def _write_curves(
    state: UltralyticsCallbacks, trainer: Any, read: Callable[[Any], dict[str, float]]
) -> None:
    """Ultralytics' curves at the 1-based epoch, as its own TensorBoard callback writes
    them; an error turns them off for this training with one warning."""
    if not state.training.curves:
        return
    try:
        values = {k: float(v) for k, v in read(trainer).items()}
        logger = _rank_logger(state, trainer, probe_model(trainer))
        logger.add_scalars(values, step=epoch_of(trainer)[0])
    except Exception as e:  # noqa: BLE001 - logging never ends the user's training
        state.training.curves = False
        _stopped_warning("writing this training's curves", e)


def _probe_epoch(state: UltralyticsCallbacks, trainer: Any, epoch: int) -> None:
    model = probe_model(trainer)
    logger = _rank_logger(state, trainer, model)
    imgsz = logger.options.imgsz or train_imgsz(trainer)
    training = state.training
    if training.probes is None or training.probes[:2] != (id(model), imgsz):
        images = logger.images
        if images is None:
            images = train_probe_files(trainer, logger.options.max_images)
            if not images:
                _warn_no_probes(state)
                return
        training.probes = (id(model), imgsz, logger.prepare(images, model=model, imgsz=imgsz))
    logger.step = epoch
    logger.probe(training.probes[2], model=model, step=epoch)


def _rank_logger(state: UltralyticsCallbacks, trainer: Any, model: nn.Module) -> Any:
    """The logger; in a DDP rank, one of the rank's model built from the configuration
    (into the trainer's ``save_dir`` unless a logdir was chosen)."""
    if state.logger is None:
        state.logger = state.saved_config.build(model)
        state.owns_logger = True
        _use_logdir(state, trainer)
    return state.logger


def _warn_no_probes(state: UltralyticsCallbacks) -> None:
    state.notes(
        "no-probes",
        "no probe images for this training (the trainer's validation set "
        "lists none); pass images=[...] to FeatureLogger. Nothing is logged.",
        warn=True,
    )


def _close_own_logger(state: UltralyticsCallbacks) -> None:
    if state.owns_logger and state.logger is not None:
        logger, state.logger, state.owns_logger = state.logger, None, False
        state.saved_config = logger.config()
        state.training.probes = None
        logger.close()


CALLBACKS: dict[str, Callable[[UltralyticsCallbacks, Any], None]] = {
    "on_predict_start": on_predict_start,
    "on_predict_batch_start": on_predict_batch_start,
    "on_predict_batch_end": on_batch_end,
    "on_predict_end": on_end,
    "on_val_start": on_val_start,
    "on_val_batch_start": on_val_batch_start,
    "on_val_batch_end": on_batch_end,
    "on_val_end": on_end,
    "on_pretrain_routine_start": on_pretrain_routine_start,
    "on_train_epoch_end": on_train_epoch_end,
    "on_fit_epoch_end": on_fit_epoch_end,
    "on_train_end": on_train_end,
    "teardown": teardown,
}
"""Ultralytics events and tbfeat's callback for each (called with the state first)."""

_BY_NAME = {**{fn.__name__: fn for fn in CALLBACKS.values()}, **CALLBACKS}


def _stopped_warning(what: str, error: Exception) -> None:
    """The one warning of a part of the logging that stops for the rest of a training."""
    warn(f"stopped {what}: {type(error).__name__}: {error}", stacklevel=3)


def _warn_if_callbacks_dropped(trainer: Any) -> None:
    """After a ``train()`` that ran in DDP subprocesses of a release that drops callbacks."""
    if not ran_ddp(trainer) or ddp_keeps_callbacks():
        return
    since = ".".join(map(str, DDP_CALLBACKS_SINCE))
    weights = Path(save_dir(trainer) or "runs/detect/train") / "weights"
    warn(
        f"Ultralytics {ultralytics_version()} ran this train() on several devices "
        "in DDP subprocesses, which drop callbacks added in Python, so no feature maps "
        f"were logged (Ultralytics {since} and later keep them). Log the checkpoints "
        f"instead: train with save_period=1, then `tbfeat sweep {weights} --images ... "
        "--logdir ...`",
        stacklevel=3,
    )
