"""PyTorch Lightning: a callback that logs probe images at every validation epoch end.

    from tbfeat.lightning import FeatureLoggerCallback

    trainer = Trainer(logger=TensorBoardLogger("runs"),
                      callbacks=[FeatureLoggerCallback(images=["bus.jpg"])])

Events go into the Lightning ``TensorBoardLogger``'s own writer (``logger.experiment``), so
Lightning's metrics and the feature maps are one TensorBoard run; without one, into
``<trainer.log_dir or default_root_dir>/tbfeat``. Only global rank 0 logs. The sanity-check
validation is skipped. An error while logging is one warning and stops the logging for the
rest of that training, never the training itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the older package name
    from pytorch_lightning import Callback
    from pytorch_lightning.loggers import TensorBoardLogger

from ..images import ImageLike, to_tensors
from ..logger import FeatureLogger
from ..notes import Stoppable
from ..options import LogOptions
from ..stages import StageSpec


class FeatureLoggerCallback(Callback):
    """Log the feature maps of fixed probe images at the end of every validation epoch.

    Args:
        images: Probe images: paths, PIL images, arrays or tensors (validated now).
        module: What to log: ``None`` for the LightningModule itself, or for its only child
            module when it has exactly one (``self.model = fasterrcnn...``); an attribute
            name (``"model"``); or a function of the LightningModule.
        stages: As for :class:`~tbfeat.FeatureLogger`.
        names: One name per probe image for the tags.
        step: ``"epoch"``, the 1-based epoch (``trainer.current_epoch + 1``, the step a
            sweep of the training's checkpoints logs it at, as Ultralytics counts), or
            ``"global_step"``.
        preprocess: As for :class:`~tbfeat.FeatureLogger` (``weights.transforms()``).
        **options: :class:`~tbfeat.LogOptions` fields; ``every=N`` logs every N-th epoch.

    Example:
        ::

            callback = FeatureLoggerCallback(images=["bus.jpg"], module="model", every=2)
            Trainer(logger=TensorBoardLogger("runs"), callbacks=[callback]).fit(module)
    """

    def __init__(
        self,
        images: ImageLike | Sequence[ImageLike],
        module: str | Callable[[nn.Module], nn.Module] | None = None,
        stages: StageSpec | Iterable[StageSpec] | None = None,
        names: Sequence[str] | None = None,
        step: str = "epoch",
        preprocess: Callable[[Any], Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if step not in ("epoch", "global_step"):
            raise ValueError(f"step must be 'epoch' or 'global_step', got {step!r}")
        if module is not None and not (isinstance(module, str) or callable(module)):
            raise TypeError(f"module must be None, an attribute name or a function, got {module!r}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be a function, got {type(preprocess).__name__}")
        _, self.names = to_tensors(images, names)  # bad images fail here, not mid-training
        LogOptions.from_kwargs(**options)  # and so do bad options
        self.images = images
        self.module = module
        self.stages = stages
        self.step = step
        self.preprocess = preprocess
        self.options = options
        self.logger: FeatureLogger | None = None
        self._guard = Stoppable()

    def target(self, pl_module: nn.Module) -> nn.Module:
        """The module to log for this LightningModule."""
        if callable(self.module) and not isinstance(self.module, nn.Module):
            return self.module(pl_module)
        if isinstance(self.module, str):
            target = getattr(pl_module, self.module, None)
            if not isinstance(target, nn.Module):
                raise ValueError(f"{type(pl_module).__name__} has no module {self.module!r}")
            return target
        children = list(pl_module.children())
        return children[0] if len(children) == 1 else pl_module

    def _feature_logger(self, trainer: Any, pl_module: nn.Module) -> FeatureLogger:
        if self.logger is None:
            writer = next(
                (lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)),
                None,
            )
            logdir = None
            if writer is None:
                root = getattr(trainer, "log_dir", None) or trainer.default_root_dir
                logdir = f"{root}/tbfeat"
            self.logger = FeatureLogger(
                self.target(pl_module),
                logdir=logdir,
                writer=writer,
                stages=self.stages,
                preprocess=self.preprocess,
                **self.options,
            )
        return self.logger

    def on_validation_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        every = self.options.get("every", 1)
        last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch + 1
        if (epoch + 1) % every and not last:
            return
        step = epoch + 1 if self.step == "epoch" else trainer.global_step
        self._guard.attempt(
            f"at epoch {epoch}",
            lambda: self._feature_logger(trainer, pl_module).log(
                self.images, step=step, names=self.names
            ),
        )

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._guard.reset()  # the next training tries again
        if self.logger is not None:
            self.logger.close()  # flushes; Lightning's own writer stays open
            self.logger = None
