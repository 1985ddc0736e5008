"""The FeatureLogger: the facade a user reads in one sitting.

It composes two parts (see the README's "How it works")::

    forward thread                              worker thread
    Capturer -> StageHooks -> CaptureSession --post--> Run: Worker -> Recorder -> EventSink

- a :class:`~tbfeat.capturer.Capturer`, the capture side: which stages of which model
  are hooked, for the user's forwards (``with``) or fixed probes (:meth:`log`);
- a :class:`~tbfeat.run.Run`, the one owner of the logdir, the writers and the thread
  that writes.

Integrations call the capture protocol (``begin``/``end``/``prepare``/``probe``) and the
run's (``use_logdir``, ``add_scalars``) through the facade's methods of the same names.
Only configuration crosses a process boundary: a pickled logger is its
:class:`LoggerConfig` and its model, and builds its thread, writer and hooks anew.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters import Probes, adapt, check_preprocess
from .capture import CaptureSession
from .capturer import Capturer
from .images import ImageLike
from .options import LogOptions, check_step
from .run import Run
from .stages import Stage, StageSpec
from .writer import NullWriter, check_logdir, global_rank


@dataclass(frozen=True)
class LoggerConfig:
    """A :class:`FeatureLogger`'s configuration without its model: what crosses a process
    boundary when each process has its own copy of the model (a DDP rank).

    It holds no open file, thread, lock or hook. ``logdir`` is where the events go (the
    folder of a ``writer=`` given); ``auto_logdir`` says that no folder was chosen, so an
    integration may still pass the framework's run folder.

    Example:
        ::

            config = logger.config()          # small and picklable
            rank_logger = config.build(model)  # in another process, with its own model
    """

    logdir: str | None = None
    auto_logdir: bool = True
    stages: Any = None
    step: int = 0
    images: Any = None
    options: LogOptions = field(default_factory=LogOptions)
    run: str = "auto"
    preprocess: Any = None

    def build(self, model: nn.Module | Any) -> FeatureLogger:
        """A new logger of ``model`` with this configuration (nothing is opened yet)."""
        return FeatureLogger.from_config(model, self)


class FeatureLogger:
    """Log what each stage of a vision model produces, as TensorBoard images and statistics.

    For every stage and every logged image it writes

    - ``features/<NN>_<Type>[/<output>]/<image>``: a grid of up to ``max_channels``
      channels, colour-mapped, 8 per row;
    - ``activations/<NN>_<Type>[/<output>]``: a histogram of the activations;
    - ``stats/<NN>_<Type>[/<output>]/<name>``: mean, std, min, max, zero_fraction,
      negative_fraction and nonfinite_count.

    ``NN`` is the stage index from :func:`tbfeat.list_stages`; ``<output>`` names the
    element of a stage that returns a tuple, list or dict; ``<image>`` is the image's file
    stem or its position in the step. The same tags recur at every step, so TensorBoard's
    step slider compares a stage across epochs.

    Args:
        model: A ``torch.nn.Module`` (integrations add Ultralytics and torchvision objects).
        logdir: Directory of the event files; a ``SummaryWriter`` is created there on the
            first write and closed by :meth:`close`. ``None`` with no ``writer`` gives
            ``SummaryWriter``'s default ``runs/<date>_<host>`` (or an integration's run
            folder, such as an Ultralytics trainer's ``save_dir``).
        writer: A ``SummaryWriter`` to write to instead; it is flushed, never closed.
        stages: Which stages to log: ``None`` for the model's defaults, or indices, names,
            glob patterns (``"layer*"``) and type names; see :func:`tbfeat.list_stages`.
        step: The step (epoch, checkpoint) that forwards are logged at.
        images: Probe images for :meth:`log` and training integrations (Ultralytics
            ``train()``, the Lightning callback): paths, PIL images, arrays or tensors.
            Default for Ultralytics training: the first ``max_images`` validation images.
        options: A :class:`LogOptions`; keyword arguments override its fields.
        run: What the first step does to a logdir that already holds a run: ``"auto"``
            continues it when the step lies beyond the last step recorded there and
            otherwise starts a new run (TensorBoard then shows the old run's steps from
            that step on no more); ``"new"`` always starts a new run, hiding all of the old
            one; ``"append"`` never does.
        preprocess: For plain modules and classifiers: called with each probe image as a
            ``(3, H, W)`` RGB float tensor in [0, 1], returns what the model takes, such
            as ``weights.transforms()`` of a torchvision model (resize, crop, normalize).
            Without it the model gets the image as it is. Detectors and YOLO models
            prepare their input themselves (their transform, a letterbox).
        **kwargs: :class:`LogOptions` fields (``max_channels=16``, ``cmap="magma"``, ...).

    Example:
        Log the forwards made inside a block::

            with FeatureLogger(model, logdir="runs/exp", step=epoch):
                model(images)

        Log fixed probe images once per epoch of a hand-written loop::

            logger = FeatureLogger(model, logdir="runs/exp")
            for epoch in range(epochs):
                train_one_epoch(model)
                logger.log(probe_images, step=epoch)
            logger.close()
    """

    def __init__(
        self,
        model: nn.Module | Any,
        logdir: str | os.PathLike | None = None,
        *,
        writer: Any = None,
        stages: StageSpec | Iterable[StageSpec] | None = None,
        step: int = 0,
        images: ImageLike | Sequence[ImageLike] | None = None,
        options: LogOptions | None = None,
        run: str = "auto",
        preprocess: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.options = LogOptions.from_kwargs(options, **kwargs)
        self.model = model
        self._run = Run(logdir, writer, options=self.options, mode=run)
        adapter = adapt(model)
        self._capturer = Capturer(
            model, adapter, stages, self.options, self._run.post, self._run.drain,
            step=step, preprocess=check_preprocess(preprocess, adapter),
        )  # fmt: skip
        self.stages  # noqa: B018 - resolve now: an unknown stage fails here, not mid-training
        if images is not None:  # bad probe images fail here too
            self.prepare(images)
        self.images = images
        if logdir is not None and self.enabled:
            check_logdir(logdir)
        self._detach: Callable[[], None] | None = None
        self._depth = 0
        self._closed = False

    # ----------------------------------------------------------------- properties
    @property
    def adapter(self) -> Any:
        """The model, adapted: its stages, how it takes probe images, how it runs."""
        return self._capturer.adapter

    @property
    def stages(self) -> list[Stage]:
        """The stages logged, resolved against the adapter's current model (an Ultralytics
        ``YOLO`` object swaps in its trained model after ``train()``)."""
        return self._capturer.stages

    @property
    def step(self) -> int:
        """The step that captured forwards are logged at; setting it ends the current step."""
        return self._capturer.step

    @step.setter
    def step(self, value: int) -> None:
        self._capturer.step = value

    @property
    def run(self) -> str:
        """The ``run=`` mode: what the first step does to a logdir holding a run already."""
        return self._run.mode

    @property
    def logdir(self) -> str | None:
        """The run folder (the given writer's, if it says); ``None`` until one is chosen."""
        return self._run.logdir

    @property
    def writer(self) -> Any:
        """A ``SummaryWriter`` for your own events beside the feature maps: the ``writer=``
        given, else one writing its own file in the run folder (closed by :meth:`close`).
        On ranks other than 0, a stand-in whose methods do nothing, so the same code runs
        on every rank."""
        self._check_open()
        return self._run.summary_writer() if self.enabled else NullWriter()

    @property
    def flushed_step(self) -> int | None:
        """The last step whose events are on disk (written and flushed by the writer thread)."""
        return self._run.flushed_step

    @property
    def enabled(self) -> bool:
        """False on processes other than global rank 0: they hook and write nothing."""
        return global_rank() == 0

    # ----------------------------------------------------------------- life cycle
    def __enter__(self) -> FeatureLogger:
        self._check_open()
        self._depth += 1
        if self._depth == 1 and self.enabled:
            try:
                self._detach = self.adapter.attach(self)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth = max(self._depth - 1, 0)
        if not self._depth:
            try:
                self._undo_attach()
            finally:
                self.flush()

    def _undo_attach(self) -> None:
        """Remove the integration's callbacks and every hook; also when detaching raises."""
        detach, self._detach = self._detach, None
        try:
            if detach is not None:
                detach()
        finally:
            self.end()

    def at(self, step: int) -> FeatureLogger:
        """Set the step and return the logger, for ``with logger.at(epoch): model(x)``."""
        self.step = step
        return self

    def flush(self) -> None:
        """End the current step and block until everything logged is on disk."""
        self._capturer.end_step()
        self._run.flush()

    def close(self) -> None:
        """Remove hooks, write what is pending, close the writer if this logger created it.

        Safe to call twice.
        """
        if self._closed:
            return
        self._depth = 0
        try:
            self._undo_attach()
        finally:
            self._closed = True
            self._run.close()

    def __repr__(self) -> str:
        return (
            f"FeatureLogger({type(self.adapter.module).__name__}, stages={len(self.stages)}, "
            f"step={self.step}, logdir={self.logdir!r})"
        )

    # ----------------------------------------------------------------- pickling
    def config(self) -> LoggerConfig:
        """This logger's configuration, without the model (see :class:`LoggerConfig`)."""
        return LoggerConfig(
            logdir=self.logdir,
            auto_logdir=self._run.auto,
            stages=self._capturer.stage_spec,
            step=self.step,
            images=self.images,
            options=self.options,
            run=self._run.mode,
            preprocess=self._capturer.preprocess,
        )

    @classmethod
    def from_config(cls, model: nn.Module | Any, config: LoggerConfig) -> FeatureLogger:
        """A logger of ``model`` configured by ``config`` (from :meth:`config`)."""
        logger = cls(
            model, None if config.auto_logdir else config.logdir, stages=config.stages,
            step=config.step, images=config.images, options=config.options, run=config.run,
            preprocess=config.preprocess,
        )  # fmt: skip
        if config.auto_logdir and config.logdir is not None:
            logger.use_logdir(config.logdir)  # the folder an integration chose, still movable
        return logger

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as the model and :meth:`config`: no thread, writer or hook crosses a
        process boundary."""
        return (self.from_config, (self.model, self.config()))

    # ----------------------------------------------------------------- probes
    def log(
        self,
        inputs: ImageLike | Sequence[ImageLike] | None = None,
        step: int | None = None,
        names: Sequence[str] | None = None,
    ) -> Any:
        """Run the model on fixed probe inputs and log every stage at ``step``.

        The model runs in eval mode under ``torch.no_grad()``; the train/eval mode of every
        module is restored afterwards. The step is then encoded, written and flushed by a
        background thread (:meth:`flush` waits for it; :meth:`close` and leaving a ``with``
        block do too). This is what a hand-written training loop calls once per epoch.

        Args:
            inputs: A ``(N, C, H, W)`` tensor, or one or a list of images: ``(C, H, W)``
                tensors, paths, PIL images or ``(H, W, C)`` arrays. Images of different
                sizes run one at a time. Default: the ``images=`` given at construction.
            step: The step to log at (it becomes :attr:`step`); default :attr:`step`.
            names: One name per image for the tags; default file stems or positions.

        Returns:
            The model's output, or ``None`` on processes other than rank 0.

        Example:
            >>> import torch, torchvision, tempfile
            >>> from tbfeat import FeatureLogger
            >>> model = torchvision.models.resnet18(weights=None)
            >>> with tempfile.TemporaryDirectory() as d:
            ...     logger = FeatureLogger(model, logdir=d, max_channels=8, cam=None)
            ...     _ = logger.log(torch.rand(1, 3, 64, 64), step=1)
            ...     logger.close()
        """
        self._check_open()
        if not self.enabled:
            return None
        if inputs is None:
            if self.images is None:
                raise ValueError("log() needs inputs, or images= when the logger is created")
            inputs = self.images
        probes = self.prepare(inputs, names=names)
        if step is not None:
            self.step = step
        return self.probe(probes)

    # ----------------------------------------------------------------- integrations
    # The protocol integrations call (Ultralytics, Lightning, sweeps); see the Capturer.
    def prepare(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: Any = None,
        names: Sequence[str] | None = None,
        imgsz: int | None = None,
    ) -> Probes:
        """Check and convert probe images (as for :meth:`log`) for :meth:`probe`, before
        anything is hooked: for ``model`` (default the logger's; an EMA copy, a checkpoint),
        named ``names``, letterboxed at ``imgsz`` where the model letterboxes."""
        return self._capturer.prepare(images, model=model, names=names, imgsz=imgsz)

    def probe(self, probes: Probes, *, model: Any = None, step: int | None = None) -> Any:
        """Run prepared probes through ``model`` (default the logger's: an EMA copy, a
        checkpoint) with its stages hooked, log them at ``step`` (default :attr:`step`)
        with their class activation maps, and end the step; see
        :meth:`tbfeat.capturer.Capturer.probe`. Returns the model's output, or ``None`` on
        processes other than rank 0."""
        self._check_open()
        return self._capturer.probe(probes, model=model, step=step) if self.enabled else None

    def begin(
        self,
        module: nn.Module | None = None,
        *,
        gate: Callable[[], bool] | None = None,
        names: Iterable[str] = (),
    ) -> CaptureSession | None:
        """Capture the forwards of ``module`` (default the model; a predictor's or
        validator's copy) at :attr:`step` until :meth:`end`, while ``gate()`` allows; see
        :meth:`tbfeat.capturer.Capturer.begin`. Returns the session, whose
        ``add_names(...)`` names further images; ``None`` on processes other than rank 0."""
        self._check_open()
        if not self.enabled:
            self._capturer.end()
            return None
        return self._capturer.begin(module, gate=gate, names=names)

    def end(self) -> None:
        """End the capture begun by :meth:`begin`: remove its hooks, end its step. Safe
        to call twice."""
        self._capturer.end()

    def resolve(self, module: nn.Module) -> list[Stage]:
        """This logger's ``stages=`` applied to ``module`` (a copy of the model, say)."""
        return self._capturer.resolve(module)

    def use_logdir(self, logdir: str | os.PathLike) -> None:
        """Write later steps into ``logdir`` when the logger was given neither ``logdir``
        nor ``writer``: integrations pass the framework's own run folder (an Ultralytics
        trainer's ``save_dir``). A no-op otherwise."""
        if self.enabled:
            self._run.use_logdir(logdir, before=self._capturer.end_step)

    def add_scalars(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Write ``{tag: value}`` scalars at ``step`` (default :attr:`step`) into this
        logger's run, as one event: an integration's metrics beside the feature maps."""
        self._check_open()
        if self.enabled:
            self._run.add_scalars(self.step if step is None else check_step(step), values)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this FeatureLogger is closed; create a new one")
