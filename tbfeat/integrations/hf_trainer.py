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
from ..notes import Notes
from ..options import LogOptions
from ..stages import StageSpec
from ..writer import FILE_SUFFIX

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
            (``round(state.epoch)``: ``eval_strategy="epoch"`` only).
        preprocess: As for :class:`~tbfeat.FeatureLogger`: a function of a ``(3, H, W)``
            tensor in [0, 1], or the model's image processor.
        logdir: Where to log instead of the Trainer's TensorBoard run.
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
        **options: Any,
    ) -> None:
        if step not in STEPS:
            raise ValueError(f"step must be 'global_step' or 'epoch', got {step!r}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be a function, got {type(preprocess).__name__}")
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir must be a path or None, got {type(logdir).__name__}")
        _, self.names = to_tensors(images, names)  # bad images fail here, not mid-training
        LogOptions.from_kwargs(**options)  # and so do bad options
        self.images, self.stages, self.step = images, stages, step
        self.preprocess, self.logdir, self.options = preprocess, logdir, options
        self.logger: FeatureLogger | None = None
        self._run_dir: str | None = None
        self._evaluations = 0
        self._training = False
        self._stopped = False
        self._notes = Notes()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the Trainer's TensorBoard callback comes first and has made its run by now
        self._stopped, self._notes, self._evaluations = False, Notes(), 0
        self._training = True
        if state.is_world_process_zero:
            self._run_dir = str(self.logdir) if self.logdir is not None else trainer_run_dir(args)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self._stopped:
            return
        self._evaluations += 1
        every = self.options.get("every", 1)
        last = 0 < state.max_steps <= state.global_step
        if self._evaluations % every and not last:
            return
        try:
            step = state.global_step if self.step == "global_step" else round(state.epoch or 0)
            self._feature_logger(args, kwargs["model"]).log(
                self.images, step=step, names=self.names
            )
        except Exception as e:  # noqa: BLE001 - logging never ends the user's training
            self._stopped = True
            self._notes(
                "stopped",
                f"stopped logging feature maps of this training at step {state.global_step}: "
                f"{type(e).__name__}: {e}",
                warn=True,
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

    def _feature_logger(self, args: Any, model: Any) -> FeatureLogger:
        if self.logger is None:
            logdir = self._run_dir or (self.logdir or trainer_run_dir(args))  # evaluate()
            self.logger = FeatureLogger(
                model, logdir, stages=self.stages, preprocess=self.preprocess, **self.options
            )
        return self.logger


def trainer_run_dir(args: Any) -> str:
    """The folder of the Trainer's TensorBoard run, as its TensorBoard callback chose it:
    ``args.logging_dir`` (transformers 4), ``$TENSORBOARD_LOGGING_DIR``, else the newest
    ``<output_dir>/runs/*`` folder holding an event file this process opened (its name
    carries the host and the process id); a new ``<output_dir>/runs/<date>_<host>``
    when the Trainer reports to no TensorBoard."""
    chosen = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    if chosen:
        return os.path.expanduser(str(chosen))
    runs = Path(args.output_dir) / "runs"
    mine = f".{socket.gethostname()}.{os.getpid()}."
    opened = [
        p for p in runs.glob("*/events.out.tfevents.*")
        if mine in p.name and not p.name.endswith(FILE_SUFFIX) and p.is_file()
    ]  # fmt: skip
    if opened:
        return str(max(opened, key=lambda p: p.stat().st_mtime).parent)
    from transformers.integrations.integration_utils import default_logdir

    return os.path.join(args.output_dir, default_logdir())
