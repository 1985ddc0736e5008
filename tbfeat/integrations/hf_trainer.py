"""Hugging Face ``Trainer``: a callback that logs probe images at every evaluation.

    from tbfeat.hf import FeatureLoggerCallback

    trainer = Trainer(model, args, train_dataset=..., eval_dataset=...,
                      callbacks=[FeatureLoggerCallback(images=["bus.jpg"])])

Events go into the Trainer's own TensorBoard run (``report_to="tensorboard"``), at the
Trainer's step (``state.global_step``, where its ``eval/*`` scalars are), so the
Trainer's metrics and the feature maps are one run. The run's folder is found as the
Trainer's TensorBoard callback chose it (:func:`trainer_run_dir`); ``logdir=`` names
another. Only the main process logs. An error while logging is one warning and stops the
logging for the rest of that training, never the training itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..images import ImageLike, to_tensors
from ..logger import FeatureLogger
from ..notes import Stoppable
from ..options import LogOptions
from ..recorder import RUN_MODES
from ..stages import StageSpec
from ..writer import FILE_SUFFIX
from .transformers import is_image_processor

STEPS = ("global_step", "epoch")


class FeatureLoggerCallback(TrainerCallback):
    """Log the feature maps of fixed probe images at every evaluation of a ``Trainer``.

    Args:
        images: Probe images: paths, PIL images, arrays or tensors (validated now).
        stages: As for :class:`~tbfeat.FeatureLogger` (default: the model's own).
        names: One name per probe image for the tags.
        step: ``"global_step"``, the Trainer's step (where it logs ``eval/loss``, and
            the ``global_step`` of its ``checkpoint-N/trainer_state.json``, which
            ``tbfeat sweep`` logs a checkpoint at), or ``"epoch"``, the 1-based epoch
            (with ``eval_strategy="epoch"`` only).
        preprocess: As for :class:`~tbfeat.FeatureLogger`: a function of a ``(3, H, W)``
            tensor in [0, 1], or an image processor; by default the Trainer's
            ``processing_class`` when it is an image processor, else none.
        logdir: Where to log instead of the Trainer's TensorBoard run.
        run: As for :class:`~tbfeat.FeatureLogger`: ``"auto"`` (a training that starts
            again at an earlier step replaces the steps logged from there, as a resumed
            one should), ``"append"`` or ``"new"``.
        **options: :class:`~tbfeat.LogOptions` fields; ``every=N`` logs every N-th
            evaluation (and the one at the last step).

    Example:
        ::

            callback = FeatureLoggerCallback(images=["bus.jpg"], max_channels=16)
            Trainer(model, args, ..., callbacks=[callback]).train()
    """

    def __init__(
        self,
        images: ImageLike | Sequence[ImageLike],
        stages: StageSpec | Iterable[StageSpec] | None = None,
        names: Sequence[str] | None = None,
        step: str = "global_step",
        preprocess: Callable[[Any], Any] | None = None,
        logdir: str | os.PathLike | None = None,
        run: str = "auto",
        **options: Any,
    ) -> None:
        if step not in STEPS:
            raise ValueError(f"step must be 'global_step' or 'epoch', got {step!r}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be a function, got {type(preprocess).__name__}")
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir must be a path or None, got {type(logdir).__name__}")
        if run not in RUN_MODES:
            raise ValueError(f"run must be one of {', '.join(map(repr, RUN_MODES))}, got {run!r}")
        _, self.names = to_tensors(images, names)  # bad images fail here, not mid-training
        LogOptions.from_kwargs(**options)  # and so do bad options
        self.images, self.stages, self.step = images, stages, step
        self.preprocess, self.logdir, self.run, self.options = preprocess, logdir, run, options
        self.logger: FeatureLogger | None = None
        self._run_dir: str | None = None
        self._evaluations = 0
        self._last_step: int | None = None
        self._training = False
        self._guard = Stoppable()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        strategy = getattr(args, "eval_strategy", "epoch")
        if self.step == "epoch" and getattr(strategy, "value", strategy) != "epoch":
            raise ValueError(
                f"step='epoch' needs eval_strategy='epoch', got "
                f"{getattr(strategy, 'value', strategy)!r}: evaluations between epochs "
                "would share an epoch; use step='global_step'"
            )
        self._close()  # a training that ended without on_train_end (an exception) left it
        self._guard.reset()
        self._evaluations, self._last_step = 0, None
        self._training = True
        # the Trainer's TensorBoard callback comes first and has made its run by now
        if state.is_world_process_zero:
            self._run_dir = str(self.logdir) if self.logdir is not None else trainer_run_dir(args)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self._guard.stopped:
            return
        if state.global_step == self._last_step:  # another eval data set of this evaluation
            return
        self._evaluations += 1
        every = self.options.get("every", 1)
        last = 0 < state.max_steps <= state.global_step
        if self._evaluations % every and not last:
            return
        self._last_step = state.global_step
        step = state.global_step if self.step == "global_step" else round(state.epoch or 0)
        self._guard.attempt(
            f"at step {state.global_step}",
            lambda: self._feature_logger(
                args, kwargs["model"], kwargs.get("processing_class")
            ).log(self.images, step=step, names=self.names),
        )
        if not self._training:  # trainer.evaluate() on its own: nothing stays open
            self._close()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False
        self._close()

    def _close(self) -> None:
        if self.logger is not None:
            self.logger.close()  # the next training opens its own run
            self.logger = None

    def _feature_logger(self, args: Any, model: Any, processing_class: Any) -> FeatureLogger:
        if self.logger is not None and self.logger.model is not model:
            self._close()  # another model: its own stages
        if self.logger is None:
            logdir = self._run_dir or (self.logdir or trainer_run_dir(args))  # evaluate()
            preprocess = self.preprocess
            if preprocess is None and is_image_processor(processing_class):
                preprocess = processing_class
            self.logger = FeatureLogger(
                model, logdir, stages=self.stages, preprocess=preprocess, run=self.run,
                **self.options,
            )  # fmt: skip
        return self.logger


def trainer_run_dir(args: Any) -> str:
    """The folder of the Trainer's TensorBoard run, as its TensorBoard callback chose it:
    ``args.logging_dir`` (transformers 4), ``$TENSORBOARD_LOGGING_DIR``, else the newest
    folder under ``<output_dir>/runs`` (a hyperparameter search's trials included) or
    ``./runs`` (where transformers 5 puts it when ``evaluate()`` comes before
    ``train()``) holding an event file this process opened (its name carries the host
    and the process id); a new ``<output_dir>/runs/<date>_<host>`` when the Trainer
    reports to no TensorBoard."""
    chosen = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    if chosen:
        return os.path.expanduser(str(chosen))
    mine = f".{socket.gethostname()}.{os.getpid()}."
    opened = [
        p for runs in {Path(args.output_dir) / "runs", Path("runs")}
        for pattern in ("*/events.out.tfevents.*", "*/*/events.out.tfevents.*")  # run, trial
        for p in runs.glob(pattern)
        if mine in p.name and not p.name.endswith(FILE_SUFFIX) and p.is_file()
    ]  # fmt: skip
    if opened:
        return str(max(opened, key=lambda p: p.stat().st_mtime).parent)
    from transformers.integrations.integration_utils import default_logdir

    return os.path.join(args.output_dir, default_logdir())
