"""The FeatureLogger: a thin facade over hooks, a capture session, a recorder and a sink.

How a capture travels (see the README's "How it works")::

    forward thread                         worker thread
    StageHooks -> CaptureSession --post--> Worker -> Recorder -> EventSink -> disk

The facade owns the configuration (model, options, stages, logdir, probe images) and the
lifetime of the parts; the forward side owns its per-step bookkeeping; the recorder owns
everything accumulated between steps. Only configuration crosses a process boundary: a
pickled logger recreates its thread, writer and hooks when first used.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import ModelAdapter, Probes, adapt, check_preprocess
from .cams import compute_cams
from .capture import CamImages, CaptureSession, Scalars, SetLogdir, capture_hooks_kwargs
from .hooks import StageHooks
from .images import ImageLike
from .notes import Notes
from .options import LogOptions
from .recorder import RUN_MODES, Recorder
from .stages import Stage, StageSpec, resolve_stages
from .targets import NoScores, ScoreTap
from .worker import WAIT_S, Worker
from .writer import EventSink, NullWriter, check_logdir, check_writer, global_rank, writer_logdir

CAM_MAX_PIXELS = 2048 * 2048
"""Largest input (height x width) that probes draw class activation maps for."""


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
        if run not in RUN_MODES:
            raise ValueError(f"run must be one of {', '.join(map(repr, RUN_MODES))}, got {run!r}")
        if writer is not None and logdir is not None:
            raise ValueError("pass either logdir or writer, not both")
        if writer is not None:
            check_writer(writer)
        self.model = model
        self.adapter = adapt(model)
        self.stage_spec = stages
        self._resolved: tuple[nn.Module, list[Stage]] | None = None
        self.stages  # noqa: B018 - resolve now: an unknown stage fails here, not mid-training
        self._step = _check_step(step)
        self.preprocess = check_preprocess(preprocess, self.adapter)
        if images is not None:  # bad probe images fail here too
            self.prepare(images)
        self.images = images
        self.run = run
        self.logdir = os.fspath(logdir) if logdir is not None else None
        self._writer = writer
        self._auto_logdir = writer is None and logdir is None
        if self.logdir is not None and self.enabled:
            check_logdir(self.logdir)
        self._start()

    def _start(self) -> None:
        """The parts that live in this process only (recreated after unpickling)."""
        self._worker: Worker | None = None
        self._recorder: Recorder | None = None
        self._finalizer: weakref.finalize | None = None
        self._session: CaptureSession | None = None
        self._hooks: StageHooks | None = None
        self._cam_handle: Any = None
        self._detach: Callable[[], None] | None = None
        self._depth = 0
        self._closed = False
        self._notes = Notes()

    # ----------------------------------------------------------------- properties
    @property
    def stages(self) -> list[Stage]:
        """The stages logged, resolved against the adapter's current model (an Ultralytics
        ``YOLO`` object swaps in its trained model after ``train()``)."""
        module = self.adapter.module
        if self._resolved is None or self._resolved[0] is not module:
            self._resolved = (module, self.resolve(module))
        return self._resolved[1]

    @property
    def step(self) -> int:
        """The step that captured forwards are logged at; setting it ends the current step."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = _check_step(value)
        if self._session is not None:
            self._session.set_step(self._step)

    @property
    def writer(self) -> Any:
        """A ``SummaryWriter`` for your own events beside the feature maps: the ``writer=``
        given, else one writing its own file in the run folder (opened now, at
        :attr:`step`, if not yet; closed by :meth:`close`). On ranks other than 0, a
        stand-in whose methods do nothing, so the same code runs on every rank."""
        if not self.enabled:
            return NullWriter()
        recorder = self._pipeline()
        return self._worker.call(lambda: recorder.writer(self._step))

    @property
    def flushed_step(self) -> int | None:
        """The last step whose events are on disk (written and flushed by the writer thread)."""
        return self._recorder.sink.flushed_step if self._recorder is not None else None

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
                self._exit()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit()

    def _exit(self) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth:
            return
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
        if self._session is not None:
            self._session.end_step()
        if self._worker is not None and not self._worker.join():
            self._notes(
                "flush-timeout",
                "tbfeat: the writer thread did not finish writing within "
                f"{WAIT_S:.0f} s; flush() returned without waiting longer",
                warn=True,
            )

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
            if self._finalizer is not None:
                self._finalizer()

    def __repr__(self) -> str:
        return (
            f"FeatureLogger({type(self.adapter.module).__name__}, stages={len(self.stages)}, "
            f"step={self.step}, logdir={self.logdir!r})"
        )

    # ----------------------------------------------------------------- pickling
    def config(self) -> LoggerConfig:
        """This logger's configuration, without the model (see :class:`LoggerConfig`)."""
        logdir = self.logdir
        if logdir is None and self._writer is not None:
            logdir = writer_logdir(self._writer)
        return LoggerConfig(
            logdir=logdir,
            auto_logdir=self._auto_logdir,
            stages=self.stage_spec,
            step=self._step,
            images=self.images,
            options=self.options,
            run=self.run,
            preprocess=self.preprocess,
        )

    @classmethod
    def from_config(cls, model: nn.Module | Any, config: LoggerConfig) -> FeatureLogger:
        """A logger of ``model`` configured by ``config`` (from :meth:`config`)."""
        logger = cls.__new__(cls)
        logger.__setstate__({"model": model, "config": config})
        return logger

    def __getstate__(self) -> dict[str, Any]:
        """The model and the configuration: no thread, writer or hook crosses a process
        boundary."""
        return {"model": self.model, "config": self.config()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        config = state["config"]
        given = {k: v for k, v in vars(config).items() if k not in ("logdir", "auto_logdir")}
        self.__init__(state["model"], config.logdir, **given)
        self._auto_logdir = config.auto_logdir

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
            ...     logger = FeatureLogger(model, logdir=d, max_channels=8)
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

    def prepare(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: Any = None,
        names: Sequence[str] | None = None,
        imgsz: int | None = None,
    ) -> Probes:
        """Check and convert probe images for :meth:`probe`, before anything is hooked.

        Args:
            images: As for :meth:`log`.
            model: The model they are for (default the logger's; an EMA copy, a checkpoint).
            names: One name per image for the tags.
            imgsz: Letterbox size for integrations that letterbox (default the option).
        """
        adapter = self._adapter_for(model)
        return adapter.prepare(
            images, names, imgsz=imgsz or self.options.imgsz, preprocess=self.preprocess
        )

    def probe(self, probes: Probes, *, model: Any = None, step: int | None = None) -> Any:
        """Run prepared probes through ``model`` with its stages hooked, and end the step.

        This is the integration API for fixed probes: the EMA model at an epoch's end, a
        checkpoint of a sweep. Eval mode and ``torch.no_grad()`` for the forward; every
        module's train/eval mode is restored and the hooks are removed afterwards, also when
        the forward raises. Probes of one model, by any logger on any thread, run one at a
        time; a probe's forward is recorded by this probe only, not by captures begun with
        :meth:`begin` (this logger's or another's ``with`` block).

        Args:
            probes: What :meth:`prepare` returned.
            model: The model to run (default the logger's): anything the logger accepts.
            step: The step to log at (default :attr:`step`).

        Returns:
            The model's output, or ``None`` on processes other than rank 0.
        """
        self._check_open()
        if not self.enabled:
            return None
        step = self._step if step is None else _check_step(step)
        adapter = self._adapter_for(model)
        stages = self.resolve(adapter.module)
        if self._session is not None:
            self._session.end_step()
        session = CaptureSession(
            self._post,
            self.options,
            step,
            track=True,
            names=probes.names,
            note=self._notes,
            drain=self._drain,
        )
        try:
            hooks = capture_hooks_kwargs(session, self._notes)
            out = adapter.run_probe(probes, stages, **hooks)
            if self.options.cam is not None:
                self._log_cams(adapter, probes.inputs, session.names, stages, step, output=out)
            return out
        finally:
            session.end_step()

    def _log_cams(
        self,
        adapter: ModelAdapter,
        inputs: Sequence[Any],
        names: Sequence[str],
        stages: Sequence[Stage],
        step: int,
        module: nn.Module | None = None,
        output: Any = None,
    ) -> None:
        """Post the class activation maps of the step's first images; a failure is said
        once and leaves the rest of the step as it is. ``output``, the probe's, tells a
        model without class scores before any pass of its own."""
        n = min(self.options.max_images, len(inputs), len(names))
        if not n:
            return
        largest = max(t.shape[-2] * t.shape[-1] for t in inputs[:n])
        if largest > CAM_MAX_PIXELS:
            self._notes(
                "cam-size",
                f"tbfeat: no class activation maps for inputs of {largest} pixels (more than "
                f"{CAM_MAX_PIXELS}): their backward passes would need several times the "
                "memory of the forward; resize the probes, or pass cam=None",
                warn=True,
            )
            return
        try:
            if output is not None:
                _check_scores(adapter, module or adapter.module, output, self.options)
            result = compute_cams(
                adapter, inputs[:n], stages, self.options.cam, self.options.cam_target_spec(),
                module=module,
            )  # fmt: skip
        except NoScores as e:  # a model with no class scores: nothing to explain
            self._notes(
                "cam-no-scores",
                f"tbfeat: no class activation maps: {str(e).replace('target=', 'cam_target=')} "
                "(or cam='activation', which needs none; cam=None turns them off)",
                warn=self.options.cam_target is not None,
            )
            return
        except Exception as e:  # noqa: BLE001 - a map never ends the user's run
            self._notes(
                f"cam-error:{type(e).__name__}",
                f"tbfeat: class activation maps were not logged: {type(e).__name__}: {e}",
                warn=True,
            )
            return
        maps = tuple((key, tuple(m)) for key, m in result.maps.items())
        nbytes = sum(t.numel() * t.element_size() for t in result.seen)
        nbytes += sum(t.numel() * t.element_size() for _, m in maps for t in m)
        self._post(CamImages(step, tuple(result.seen), maps, tuple(names[:n])), nbytes)

    # ----------------------------------------------------------------- captures
    def begin(
        self,
        module: nn.Module | None = None,
        *,
        gate: Callable[[], bool] | None = None,
        names: Iterable[str] = (),
    ) -> CaptureSession | None:
        """Capture the forwards of ``module`` at :attr:`step` until :meth:`end`.

        The integration API for the user's own forwards (predict, validation). Any capture
        begun before ends first.

        Args:
            module: The module that runs (default the logger's model): another copy of it
                (a predictor's or validator's) is hooked by the same stage choice.
            gate: A predicate; forwards are captured only while it returns True.
            names: Names of the first images.

        Returns:
            The session, whose ``add_names(...)`` names further images; ``None`` on
            processes other than rank 0.
        """
        self._check_open()
        self.end()
        if not self.enabled:
            return None
        module = self.adapter.module if module is None else module
        stages = self.resolve(module)
        session = CaptureSession(
            self._post, self.options, self._step, names=names, note=self._notes, drain=self._drain
        )
        hooks = StageHooks(
            stages, root=module, gate=gate, **capture_hooks_kwargs(session, self._notes)
        )
        hooks.install()
        self._session, self._hooks = session, hooks
        if self.options.cam is not None and self.options.cam_captures:
            self._cam_handle = module.register_forward_hook(
                self._captured_cams(module, stages, session, hooks)
            )
        return session

    def _captured_cams(
        self, module: nn.Module, stages: list[Stage], session: CaptureSession, hooks: StageHooks
    ) -> Callable[..., None]:
        """A forward hook on the captured module: maps of the batch it just ran (one more
        forward and backward), for ``cam_captures=True``."""
        adapter = self._adapter_for(module)

        def after_forward(m: nn.Module, args: Any, output: Any) -> None:
            if not hooks.active() or not args:
                return
            images = _batch_images(args[0])
            names = session.claim_cam_images(len(images)) if images else ()
            if names:
                self._log_cams(adapter, images, names, stages, session.step, module=module)

        return after_forward

    def end(self) -> None:
        """End the capture begun by :meth:`begin`: remove its hooks, end its step. Safe
        to call twice."""
        hooks, session, cam_handle = self._hooks, self._session, self._cam_handle
        self._hooks = self._session = self._cam_handle = None
        try:
            if cam_handle is not None:
                cam_handle.remove()
            if hooks is not None:
                hooks.remove()
        finally:
            if session is not None:
                session.end_step()

    def use_logdir(self, logdir: str | os.PathLike) -> None:
        """Write later steps into ``logdir`` when the logger was given neither ``logdir``
        nor ``writer``: integrations pass the framework's own run folder (an Ultralytics
        trainer's ``save_dir``). A no-op otherwise."""
        logdir = os.fspath(logdir)
        if not self._auto_logdir or logdir == self.logdir or not self.enabled:
            return
        check_logdir(logdir)
        self.logdir = logdir
        if self._session is not None:
            self._session.end_step()
        if self._worker is not None:
            self._worker.post(SetLogdir(logdir))

    def add_scalars(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Write ``{tag: value}`` scalars at ``step`` (default :attr:`step`) into this
        logger's run, as one event: an integration's metrics beside the feature maps."""
        self._check_open()
        if not self.enabled or not values:
            return
        step = self._step if step is None else _check_step(step)
        items = tuple((str(k), float(v)) for k, v in values.items())
        self._pipeline()
        self._worker.post(Scalars(step, items))

    def resolve(self, module: nn.Module) -> list[Stage]:
        """This logger's ``stages=`` applied to ``module`` (a copy of the model, say)."""
        adapter = self._adapter_for(module)
        return resolve_stages(
            adapter.module, adapter.candidate_stages(), self.stage_spec, adapter.default_stages()
        )

    # ----------------------------------------------------------------- internals
    def _adapter_for(self, model: Any) -> ModelAdapter:
        if model is None or model is self.model or model is self.adapter.module:
            return self.adapter
        return adapt(model)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this FeatureLogger is closed; create a new one")

    def _pipeline(self) -> Recorder:
        """The recorder and its worker thread, created on first use."""
        if self._recorder is None:
            sink = EventSink(self.logdir, self._writer)
            self._recorder = Recorder(sink, self.options, self.run)
            self._worker = Worker(self._recorder.handle)
            # a logger dropped without close() still drains and closes what it created
            self._finalizer = weakref.finalize(self, _shutdown, self._worker, self._recorder)
        return self._recorder

    def _drain(self) -> None:
        if self._worker is not None:
            self._worker.join()

    def _post(self, message: Any, nbytes: int = 0) -> bool:
        self._pipeline()
        return self._worker.post(message, nbytes)


def _shutdown(worker: Worker, recorder: Recorder) -> None:
    """Write what is pending, stop the thread, close the writer (once, from any thread).

    Once the worker thread has ended, the recorder has no other user: closing it here
    keeps the one-owner rule and starts no thread (also at interpreter exit).
    """
    if worker.stop():
        recorder.close()


def _check_scores(adapter: ModelAdapter, module: nn.Module, output: Any, options: Any) -> None:
    """Raise :class:`NoScores` when a plain module's output holds no ``(N, classes)``
    scores to explain by default (a detector's probe ran its backbone only: no verdict)."""
    if options.cam != "layercam" or callable(options.cam_target):
        return
    tap = adapter.score_tap(module)
    if type(tap) is ScoreTap:
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


def _check_step(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"step must be an int, got {value!r}")
    return value
