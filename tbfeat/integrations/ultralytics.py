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

Hooks live only around our own capture, so none is on a model while a checkpoint is
saved (``save_model`` pickles the EMA model). Callbacks are removed when the block exits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..adapters import ModelAdapter
from ..images import ImageLike, unique_names
from ..stages import Stage, sanitize

if TYPE_CHECKING:
    from ..logger import FeatureLogger


def adapt(obj: object) -> ModelAdapter | None:
    """The adapter for an Ultralytics ``Model`` wrapper or a bare Ultralytics ``BaseModel``."""
    from ultralytics.engine.model import Model
    from ultralytics.nn.tasks import BaseModel

    if isinstance(obj, Model):
        if not isinstance(obj.model, nn.Module):
            raise TypeError(
                f"only PyTorch Ultralytics models can be logged, got model={obj.model!r}"
            )
        return UltralyticsAdapter(obj.model, wrapper=obj)
    if isinstance(obj, BaseModel):
        return UltralyticsAdapter(obj)
    return None


def yolo_stages(model: nn.Module) -> list[Stage]:
    """One stage per layer of ``model.model``, indexed by ``m.i`` and labelled by ``m.type``."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential):
        raise TypeError(f"{type(model).__name__} has no Ultralytics layer list (model.model)")
    stages = []
    for pos, m in enumerate(layers):
        index = getattr(m, "i", pos)
        type_name = str(getattr(m, "type", type(m).__name__)).rsplit(".", 1)[-1]
        stages.append(Stage(index, f"model.{pos}", type_name, m, sanitize(type_name)))
    return stages


def is_head(module: nn.Module, layers: nn.Sequential) -> bool:
    """A head is the last layer, or a module class from ``ultralytics.nn.modules.head``."""
    return module is layers[-1] or type(module).__module__.endswith("nn.modules.head")


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


def letterbox(image: ImageLike, imgsz: int, stride: int = 32) -> tuple[torch.Tensor, str | None]:
    """A probe image as the ``(3, imgsz, imgsz)`` RGB float tensor a YOLO model sees.

    Paths are read with OpenCV and numpy arrays are taken as BGR, as in Ultralytics'
    predict; PIL images are RGB. Tensors are taken as already preprocessed.
    """
    import cv2
    from PIL import Image
    from ultralytics.data.augment import LetterBox

    name = None
    if isinstance(image, torch.Tensor):  # RGB (3, H, W) in [0, 1], letterboxed like the rest
        if image.dim() != 3 or image.shape[0] != 3 or image.is_complex():
            raise ValueError(
                f"a probe tensor must be RGB (3, H, W) in [0, 1], got shape {tuple(image.shape)}"
            )
        rgb = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
        bgr = np.ascontiguousarray(rgb.cpu().numpy()[:, :, ::-1])
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {str(path)!r}")
        bgr = cv2.imread(str(path))
        if bgr is None:
            raise ValueError(f"cannot read image {str(path)!r}")
        name = path.stem
    elif isinstance(image, Image.Image):
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"a probe array must be uint8 BGR (H, W, 3), got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape:
            raise ValueError(
                f"a probe array must be (H, W) or (H, W, C) with C in 1, 3, 4, got {image.shape}"
            )
        bgr = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    else:
        raise TypeError(
            "a probe image must be a path, a PIL image, a BGR array or a tensor, "
            f"got {type(image).__name__}"
        )
    boxed = LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=stride)(image=bgr[:, :, :3])
    rgb = np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1))
    return torch.from_numpy(rgb).float().div_(255.0), name


def _validator_model(validator: Any) -> nn.Module | None:
    """The model a standalone validation runs: a deep copy that ``BaseValidator.__call__``
    keeps only as its local ``model`` (an ``AutoBackend``), found in the calling frames."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is validator:
            model = frame.f_locals.get("model")
            if isinstance(model, nn.Module):
                return model
        frame = frame.f_back
    return None


class UltralyticsAdapter(ModelAdapter):
    """Stages and callbacks for an Ultralytics model (``wrapper`` is the ``YOLO`` object)."""

    def __init__(self, module: nn.Module, wrapper: Any = None) -> None:
        self.wrapper = wrapper
        super().__init__(module)
        self._registered: list[tuple[str, Any]] = []
        self._probes: tuple[int, list[torch.Tensor], list[str]] | None = None
        self._in_batch = False
        self._owner: Any = None

    @property
    def module(self) -> nn.Module:
        """The wrapper's current model (``train()`` replaces it), else the bare model."""
        current = getattr(self.wrapper, "model", None)
        return current if isinstance(current, nn.Module) else self._module

    @module.setter
    def module(self, value: nn.Module) -> None:
        self._module = value

    # -------------------------------------------------------------- stages
    def candidate_stages(self) -> list[Stage]:
        return yolo_stages(self.module)

    def default_stages(self) -> list[Stage]:
        layers = self.module.model
        return [s for s in self.candidate_stages() if not is_head(s.module, layers)]

    # -------------------------------------------------------------- probes
    def imgsz(self, default: int = 640) -> int:
        logger = self.logger
        if logger is not None and logger.options.imgsz is not None:
            return logger.options.imgsz
        overrides = getattr(self.wrapper, "overrides", None) or {}
        size = overrides.get("imgsz") or getattr(getattr(self.module, "args", None), "imgsz", None)
        if isinstance(size, (list, tuple)):
            size = max(size)
        return int(size) if size else default

    def stride(self, module: nn.Module | None = None) -> int:
        stride = getattr(module if module is not None else self.module, "stride", None)
        return int(stride.max()) if isinstance(stride, torch.Tensor) else 32

    def prepare(
        self,
        inputs: ImageLike | Sequence[ImageLike],
        names: Sequence[str] | None,
        imgsz: int | None = None,
        module: nn.Module | None = None,
    ) -> tuple[Any, list[str]]:
        """Letterbox probe images to ``imgsz`` like Ultralytics' validation does."""
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            items = list(inputs.unbind(0))
        if not items:
            raise ValueError("inputs is empty; pass at least one image")
        size = imgsz or self.imgsz()
        stride = self.stride(module)
        boxed = [letterbox(item, size, stride) for item in items]
        tensors = [t for t, _ in boxed]
        if names is None:
            names = [n if n is not None else str(i) for i, (_, n) in enumerate(boxed)]
        if len(names) != len(tensors):
            raise ValueError(f"got {len(names)} names for {len(tensors)} images")
        return tensors, unique_names([sanitize(n) for n in names])

    def forward(self, prepared: Any, module: nn.Module | None = None) -> Any:
        module = self.module if module is None else module
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return super().forward([t.to(device=device, dtype=dtype) for t in prepared], module)

    # -------------------------------------------------------------- life cycle
    def attach(self, logger: FeatureLogger) -> None:
        """Add our callbacks to the ``YOLO`` object (shared by its trainer, predictor and
        validator); a bare model gets hooks for the block instead."""
        if self.wrapper is None:
            super().attach(logger)
            return
        self._trainer_before = getattr(self.wrapper, "trainer", None)
        for event, fn in self.callbacks().items():
            self.wrapper.add_callback(event, fn)
            self._registered.append((event, fn))

    def detach(self, logger: FeatureLogger) -> None:
        for event, fn in self._registered:
            fns = self.wrapper.callbacks.get(event, [])
            if fn in fns:
                fns.remove(fn)
        self._registered = []
        self._in_batch = False
        logger.gate = None
        logger.remove_hooks()
        self._warn_if_ddp_ran()
        self._probes = None

    def callbacks(self) -> dict[str, Any]:
        """Ultralytics events and this adapter's handlers for them."""
        return {
            "on_predict_start": self.on_predict_start,
            "on_predict_batch_start": self.on_predict_batch_start,
            "on_predict_batch_end": self.on_batch_end,
            "on_predict_end": self.on_end,
            "on_val_start": self.on_val_start,
            "on_val_batch_start": self.on_val_batch_start,
            "on_val_batch_end": self.on_batch_end,
            "on_val_end": self.on_end,
            "on_pretrain_routine_start": self.on_pretrain_routine_start,
            "on_train_epoch_end": self.on_train_epoch_end,
        }

    # -------------------------------------------------------------- predict / val
    def _start(self, owner: Any, model: Any) -> None:
        logger = self.logger
        logger.finish_step()
        logger.remove_hooks()
        logger._sink.use_default_logdir(owner.save_dir)
        module = torch_model(model)
        logger.install_hooks(logger.resolve(module), root=module)
        self._owner = owner
        self._in_batch = False
        logger.gate = self._gate

    def _gate(self) -> bool:
        # warm-up forwards run inside the first batch before done_warmup is set
        return self._in_batch and getattr(self._owner, "done_warmup", True)

    def on_predict_start(self, predictor: Any) -> None:
        self._start(predictor, predictor.model)

    def on_predict_batch_start(self, predictor: Any) -> None:
        paths = predictor.batch[0] if predictor.batch else []
        start = len(self.logger._names)
        self.logger.add_image_names(
            Path(p).stem if isinstance(p, str) and Path(p).is_file() else str(start + i)
            for i, p in enumerate(paths)
        )
        self._in_batch = True

    def on_val_start(self, validator: Any) -> None:
        trainer = getattr(self.wrapper, "trainer", None)
        if getattr(validator, "training", False) or validator is getattr(trainer, "validator", 0):
            return  # validation inside train(), final_eval too: the epoch-end probe covers it
        self._start(validator, _validator_model(validator) or self.wrapper.model)
        dataset = getattr(validator.dataloader, "dataset", None)
        files = list(getattr(dataset, "im_files", None) or [])
        self.logger.add_image_names(Path(f).stem for f in files[: self.logger.options.max_images])

    def on_val_batch_start(self, validator: Any) -> None:
        if self._owner is validator:
            self._in_batch = True

    def on_batch_end(self, owner: Any) -> None:
        self._in_batch = False

    def on_end(self, owner: Any) -> None:
        if self._owner is owner:
            self._end_capture()

    def _end_capture(self) -> None:
        logger = self.logger
        logger.gate = None
        logger.remove_hooks()
        logger.finish_step()
        self._owner = None
        self._in_batch = False

    # -------------------------------------------------------------- train
    def on_pretrain_routine_start(self, trainer: Any) -> None:
        self._end_capture()  # a predict stopped half-way (stream=True, break) ends here
        self.logger._sink.use_default_logdir(trainer.save_dir)
        self._probes = None

    def on_train_epoch_end(self, trainer: Any) -> None:
        logger = self.logger
        epoch = trainer.epoch + 1  # 1-based, as in results.csv
        every = logger.options.every
        if epoch % every and epoch < trainer.epochs:
            return
        ema = getattr(getattr(trainer, "ema", None), "ema", None)
        model = ema if ema is not None else trainer.model
        model = torch_model(model)
        imgsz = logger.options.imgsz or int(trainer.args.imgsz)
        if self._probes is None or self._probes[0] != imgsz:
            images = logger.images if logger.images is not None else self._val_images(trainer)
            tensors, names = self.prepare(images, None, imgsz=imgsz, module=model)
            self._probes = (imgsz, tensors, names)
        _, tensors, names = self._probes
        logger.step = epoch
        logger.run_probes(model, logger.resolve(model), tensors, names)

    def _val_images(self, trainer: Any) -> list[str]:
        n = self.logger.options.max_images
        loader = getattr(trainer, "test_loader", None)
        dataset = getattr(loader, "dataset", None)
        files = list(getattr(dataset, "im_files", None) or [])
        if not files:
            samples = getattr(dataset, "samples", None) or []  # classification datasets
            files = [s[0] for s in samples]
        if not files:
            raise ValueError(
                "no probe images: pass images=[...] to FeatureLogger (the trainer's "
                "validation set lists none)"
            )
        return files[:n]

    def _warn_if_ddp_ran(self) -> None:
        trainer = getattr(self.wrapper, "trainer", None)
        new = trainer is not getattr(self, "_trainer_before", None)
        if new and trainer is not None and getattr(trainer, "ddp", False):
            import warnings

            warnings.warn(
                "tbfeat: this train() ran in Ultralytics' DDP subprocess, which drops "
                "callbacks added in Python, so no feature maps were logged; log the saved "
                "checkpoints instead (save_period=1, then `tbfeat sweep`)",
                RuntimeWarning,
                stacklevel=3,
            )
