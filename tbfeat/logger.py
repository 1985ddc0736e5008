"""The FeatureLogger: forward hooks on a model's stages, written to TensorBoard at a step."""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import adapt
from .drift import HISTORY_FILE, History, mean_map_cell, sample_rows
from .images import ImageLike, unique_names
from .options import LogOptions
from .render import feature_tiles, select_channels
from .stages import Stage, StageSpec, resolve_stages, sanitize
from .stats import RunningStats
from .writer import EventSink, StepBundle

log = logging.getLogger("tbfeat")

MAX_INFLIGHT_BYTES = 256 * 2**20
"""Activation bytes that may wait for the writer thread; beyond, captures run inline."""


@dataclass
class _Capture:
    """One stage output to summarize and draw, for the writer thread or inline."""

    base: str
    step: int
    x: Any
    stats: RunningStats | None
    tags: list[str] | None
    names: list[str] | None = None  # image names, for drift and the evolution strip


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
            ``SummaryWriter``'s default ``runs/<date>_<host>``.
        writer: A ``SummaryWriter`` to write to instead; it is flushed, never closed.
        stages: Which stages to log: ``None`` for the model's defaults, or indices, names,
            glob patterns (``"layer*"``) and type names; see :func:`tbfeat.list_stages`.
        step: The step (epoch, checkpoint) that forwards are logged at.
        images: Probe images for training integrations (Ultralytics ``train()``, the
            Lightning callback): paths, PIL images, arrays or tensors. Default: the first
            ``max_images`` images of the validation set.
        options: A :class:`LogOptions`; keyword arguments override its fields.
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
        **kwargs: Any,
    ) -> None:
        self.options = LogOptions.from_kwargs(options, **kwargs)
        self.adapter = adapt(model)
        self.adapter.logger = self
        self.model = model
        self.stage_spec = stages
        # resolve now: an unknown stage fails here, not mid-training
        self._resolved = (self.adapter.module, self.resolve(self.adapter.module))
        self.step = step
        if images is not None:
            self.adapter.prepare(images, None)  # bad probe images fail here too
        self.images = images
        self._sink = EventSink(logdir, writer)
        self._installed: tuple[list[Stage], nn.Module | None] | None = None
        # a logger dropped without close() still drains and closes what it created
        self._finalizer = weakref.finalize(self, self._sink.close)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._depth = 0
        self._attached = False
        self._names: list[str] = []
        self._pending: dict[str, RunningStats] = {}
        self._counts: dict[str, int] = {}
        self._active_step: int | None = None
        self._channels: dict[str, torch.Tensor] = {}
        self._noted: set[str] = set()
        self._closed = False
        self._forward_id = 0
        self._calls: dict[tuple[str, str | int | None], tuple[int, int]] = {}
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._step_extra: dict[int, dict[str, dict[str, Any]]] = {}
        self._probing = False
        self._history: History | None = None
        self.gate: Callable[[], bool] | None = None
        """Integrations set a predicate; hooks capture only while it returns True."""

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
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"step must be an int, got {value!r}")
        if getattr(self, "_active_step", None) is not None and value != self._active_step:
            self.finish_step()
        self._step = value

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` events go to (created on first access if none was given)."""
        return self._sink.writer

    @property
    def flushed_step(self) -> int | None:
        """The last step whose events are on disk (written and flushed by the writer thread)."""
        return self._sink.flushed_step

    @property
    def enabled(self) -> bool:
        """False on processes other than global rank 0: they hook and write nothing."""
        return self._sink.enabled

    # ----------------------------------------------------------------- life cycle
    def __enter__(self) -> FeatureLogger:
        if self._closed:
            raise RuntimeError("this FeatureLogger is closed; create a new one")
        self._depth += 1
        if self._depth == 1 and self.enabled:
            self._attached = True
            try:
                self.adapter.attach(self)
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
            self._detach()
        finally:
            self.flush()

    def _detach(self) -> None:
        """Remove the integration's callbacks and every hook; also when detaching raises."""
        try:
            if self._attached:
                self._attached = False
                self.adapter.detach(self)
        finally:
            self.remove_hooks()

    def at(self, step: int) -> FeatureLogger:
        """Set the step and return the logger, for ``with logger.at(epoch): model(x)``."""
        self.step = step
        return self

    def close(self) -> None:
        """Remove hooks, write what is pending, close the writer if this logger created it.

        Safe to call twice.
        """
        if self._closed:
            return
        self._depth = 0
        try:
            self._detach()
        finally:
            self.finish_step()
            self._sink.call(self._save_history)  # after the last step, on the writer thread
            self._sink.close()
            self._closed = True

    def __repr__(self) -> str:
        return (
            f"FeatureLogger({type(self.adapter.module).__name__}, stages={len(self.stages)}, "
            f"step={self.step}, logdir={self._sink.logdir!r})"
        )

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
            step: The step to log at; default the logger's current :attr:`step`.
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
        if self._closed:
            raise RuntimeError("this FeatureLogger is closed; create a new one")
        if inputs is None:
            if self.images is None:
                raise ValueError("log() needs inputs, or images= when the logger is created")
            inputs = self.images
        if step is not None:
            self.step = step
        prepared, names = self.adapter.prepare(inputs, names)
        if not self.enabled:
            return None
        module = self.adapter.module
        return self.run_probes(module, self.stages, prepared, names)

    def run_probes(
        self, module: nn.Module, stages: Sequence[Stage], prepared: Any, names: Sequence[str]
    ) -> Any:
        """Forward prepared probes through ``module`` with ``stages`` hooked, then end the step.

        Eval mode and ``torch.no_grad()`` for the forward; every module's train/eval mode
        is restored and the hooks removed afterwards, also when the forward raises.
        Integrations call this with the model of the moment (an EMA copy, say).
        """
        self.finish_step()
        training = [m for m in module.modules() if m.training]
        installed = self._installed
        self.remove_hooks()  # hooks of a surrounding block come back afterwards
        gate, self.gate = self.gate, None
        try:
            for m in training:  # module.eval(), without touching modules already in eval
                m.training = False
            self.install_hooks(stages, root=module)
            self._forward_id += 1
            self._probing = True
            self._names = list(names)
            with torch.no_grad():
                return self.adapter.forward(prepared, module)
        finally:
            self._probing = False
            self.gate = gate
            for m in training:
                m.training = True
            self.remove_hooks()
            self.finish_step()
            if installed is not None:
                self.install_hooks(*installed)

    # ----------------------------------------------------------------- hooks
    def resolve(self, module: nn.Module) -> list[Stage]:
        """This logger's ``stages=`` applied to ``module`` (integrations pass a fresh model)."""
        adapter = self.adapter if module is self.adapter.module else adapt(module)
        return resolve_stages(
            adapter.module,
            adapter.candidate_stages(),
            self.stage_spec,
            adapter.default_stages(),
        )

    def install_hooks(self, stages: Sequence[Stage], root: nn.Module | None = None) -> None:
        """Register a forward hook on each stage's module; :meth:`remove_hooks` undoes it.

        ``root`` is the module whose calls are "one forward": a stage module called again
        within one forward (a head shared by FPN levels) logs those calls as ``call1``, ...
        """
        self._installed = (list(stages), root)
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(self._new_forward))
        for stage in stages:
            hook = functools.partial(self._hook, stage)
            self._handles.append(stage.module.register_forward_hook(hook))

    def _new_forward(self, module: nn.Module, args: Any) -> None:
        self._forward_id += 1

    def remove_hooks(self) -> None:
        """Remove every hook this logger registered. Safe to call twice."""
        handles, self._handles = self._handles, []
        self._installed = None
        for handle in handles:
            handle.remove()

    def add_image_names(self, names: Iterable[str]) -> None:
        """Name the next images of the current step (integrations call this per batch).

        Names are sanitized for tags; a name already used in this step gets ``_1``, ...
        """
        self._names += unique_names((sanitize(n) for n in names), taken=self._names)

    def _hook(self, stage: Stage, module: nn.Module, args: Any, output: Any) -> None:
        if self.gate is not None and not self.gate():
            return
        try:
            with torch.no_grad():
                self._capture(stage, output)
        except Exception as e:  # a stage that fails to log must never break the forward
            self._note(
                f"error:{stage.key}:{type(e).__name__}",
                f"tbfeat: stage {stage.key} ({stage.name}) was not logged: {type(e).__name__}: {e}",
                warn=True,
            )

    def _capture(self, stage: Stage, output: Any) -> None:
        if self._active_step is not None and self._active_step != self._step:
            self.finish_step()
        if self._active_step is None:
            # a new step: let the writer finish the previous one first, so that at most one
            # step's copies wait in memory (a no-op when steps are epochs apart)
            self._sink.wait()
        self._active_step = self._step
        ident = (stage.name, stage.output)
        forward, calls = self._calls.get(ident, (-1, -1))
        calls = calls + 1 if forward == self._forward_id else 0
        self._calls[ident] = (self._forward_id, calls)
        if stage.output is not None:
            output = output[stage.output]
        opts = self.options
        found = False
        for suffix, t in _tensors(output, f"call{calls}" if calls else ""):
            found = True
            base = f"{stage.key}/{suffix}" if suffix else stage.key
            if t.dim() not in (2, 3, 4) or t.is_complex() or t.dtype == torch.bool:
                self._note(
                    f"skip:{base}",
                    f"tbfeat: stage {base} gives a {t.dim()}-D {t.dtype} tensor; not logged",
                )
                continue
            done = self._counts.get(base, 0)
            k = min(t.shape[0], opts.max_images - done)
            if k <= 0:
                continue
            self._counts[base] = done + k
            x = t[:k].detach()
            stats = None
            if opts.stats or opts.histograms:
                stats = self._pending.get(base)
                if stats is None:
                    stats = self._pending[base] = RunningStats(opts.hist_bins)
            tags = names = None
            if x.dim() == 4:
                names = [self._image_name(done + i) for i in range(k)]
                if opts.grids:
                    tags = [f"features/{base}/{name}" for name in names]
                if not (self._probing and (opts.drift or opts.evolution)):
                    names = None  # drift compares the same probe images: log() only
            self._dispatch(_Capture(base, self._step, x, stats, tags, names))
        if not found:
            self._note(
                f"skip:{stage.key}",
                f"tbfeat: stage {stage.key} gives {type(output).__name__}, no tensor; not logged",
            )

    def _dispatch(self, job: _Capture) -> None:
        """Process a capture on the writer thread, overlapping the rest of the forward, or
        here when the copies waiting for that thread would exceed
        :data:`MAX_INFLIGHT_BYTES`.

        The writer thread works on a copy: a later layer may change the output in place
        (``ReLU(inplace=True)`` after a ``BatchNorm``), and the copy costs one memory pass
        against the several that statistics and tiles take.
        """
        x = job.x
        nbytes = x.numel() * x.element_size()
        with self._inflight_lock:
            defer = self._inflight + nbytes <= MAX_INFLIGHT_BYTES
            if defer:
                self._inflight += nbytes
        if not defer:
            self._process(job, deferred=False)
            return
        job.x = x.clone()
        self._sink.call(self._process, job, True)

    def _process(self, job: _Capture, deferred: bool) -> None:
        """Statistics and channel tiles of one capture (writer thread, or inline)."""
        x = job.x
        try:
            with torch.no_grad():
                if job.stats is not None:
                    try:
                        job.stats.update(x)
                    except Exception as e:  # the grids may still work
                        self._note(
                            f"error:{job.base}:stats:{type(e).__name__}",
                            f"tbfeat: statistics of stage {job.base} were not logged: "
                            f"{type(e).__name__}: {e}",
                            warn=True,
                        )
                if job.tags is not None:
                    opts = self.options
                    channels = self._channels.get(job.base)
                    if channels is None or int(channels.max()) >= x.shape[1]:
                        channels = select_channels(x, opts.max_channels, opts.channels).cpu()
                        self._channels[job.base] = channels
                    tiles = feature_tiles(x, channels, tile=opts.tile, normalize=opts.normalize)
                    tiles = tiles.cpu().numpy()
                    images = [(tag, t) for tag, t in zip(job.tags, tiles, strict=True) if t.size]
                    self._sink.images(job.step, images, opts.cmap, opts.ncols)
                if job.names is not None and x.numel():
                    self._track(job)
        except Exception as e:  # a stage that fails to log must never break anything
            self._note(
                f"error:{job.base}:{type(e).__name__}",
                f"tbfeat: stage {job.base} was not logged: {type(e).__name__}: {e}",
                warn=True,
            )
        finally:
            if deferred:
                with self._inflight_lock:
                    self._inflight -= x.numel() * x.element_size()
            job.x = None

    def _track(self, job: _Capture) -> None:
        """Keep this capture's drift samples and strip cells for its step."""
        opts = self.options
        x = job.x
        extra = self._step_extra.setdefault(job.step, {}).setdefault(
            job.base, {"rows": [], "cells": {}, "names": [], "shape": tuple(x.shape[-2:])}
        )
        if opts.drift:
            per_image = max(1, opts.drift_samples // opts.max_images)
            extra["rows"].append(sample_rows(x, per_image))
        if opts.evolution:
            for name, cell in zip(job.names, mean_map_cell(x, opts.evolution_cell), strict=True):
                extra["cells"][name] = cell
        extra["names"] += job.names

    def _history_for(self) -> History:
        """The run's drift/evolution history, loaded from (and saved to) its logdir."""
        logdir = self._sink.logdir
        if logdir is None:
            writer = self._sink.writer
            get = getattr(writer, "get_logdir", None)
            logdir = get() if callable(get) else getattr(writer, "log_dir", None)
        path = Path(logdir) / HISTORY_FILE if logdir else None
        if self._history is None or self._history.path != path:
            self._history = History(path, keep=self.options.evolution_steps)
        return self._history

    def _image_name(self, position: int) -> str:
        return self._names[position] if position < len(self._names) else str(position)

    def finish_step(self) -> None:
        """End the current step: hand its grids and statistics to the writer thread.

        The step is written and flushed in the background; :meth:`flush` waits for it.
        """
        pending, self._pending = self._pending, {}
        captured = self._active_step is not None
        step = self._active_step if captured else self._step
        self._counts.clear()
        self._names = []
        self._active_step = None
        if captured:
            self._sink.call(self._write_step, step, pending)

    def _write_step(self, step: int, pending: dict[str, RunningStats]) -> None:
        """Summarize a finished step's statistics and write the step (writer thread)."""
        opts = self.options
        bundle = StepBundle(step=step, cmap=opts.cmap)
        extras = self._step_extra.pop(step, {})
        history = self._history_for() if extras else None
        for base, extra in extras.items():
            try:
                rows = torch.cat(extra["rows"]) if extra["rows"] else None
                drift = history.update(
                    base, step, rows, extra["shape"], tuple(extra["names"]), extra["cells"]
                )
                for suffix, value in drift.items():
                    bundle.scalars.append((f"drift/{base}{suffix}", value))
                strip = history.strip(base) if opts.evolution else None
                if strip is not None:
                    bundle.images.append((f"evolution/{base}", strip))
            except Exception as e:
                self._note(
                    f"error:{base}:drift:{type(e).__name__}",
                    f"tbfeat: drift/evolution of stage {base} were not logged: "
                    f"{type(e).__name__}: {e}",
                    warn=True,
                )
        for base, stats in pending.items():
            try:
                summary = stats.summary()
                if summary is None:
                    continue
                if opts.stats:
                    for name, value in summary.scalars().items():
                        bundle.scalars.append((f"stats/{base}/{name}", value))
                if opts.histograms and summary.count > 0:
                    bundle.histograms.append((f"activations/{base}", summary))
            except Exception as e:
                self._note(
                    f"error:{base}:{type(e).__name__}",
                    f"tbfeat: statistics of stage {base} were not logged: {type(e).__name__}: {e}",
                    warn=True,
                )
        self._sink.submit(bundle)
        if history is not None and history.due():
            self._save_history()

    def _save_history(self) -> None:
        if self._history is None:
            return
        try:
            self._history.save()
        except OSError as e:
            self._note(
                f"history:{type(e).__name__}", f"tbfeat: drift history not saved: {e}", warn=True
            )

    def flush(self) -> None:
        """End the current step and block until everything logged is on disk."""
        self.finish_step()
        self._sink.flush()

    def _note(self, key: str, message: str, warn: bool = False) -> None:
        if key in self._noted:
            return
        self._noted.add(key)
        if warn:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            log.info(message)


def _tensors(output: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a stage's output with a tag suffix each: ``""`` for a lone tensor,
    the position or key for elements of tuples, lists and dicts (nested ones joined by
    ``_``). Anything else yields nothing."""
    if isinstance(output, torch.Tensor):
        yield prefix, output
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from _tensors(value, _join(prefix, sanitize(str(key))))
    elif isinstance(output, (list, tuple)):
        for i, value in enumerate(output):
            yield from _tensors(value, _join(prefix, str(i)))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}_{key}" if prefix else key
