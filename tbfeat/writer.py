"""Where events go: a TensorBoard ``SummaryWriter`` created lazily, or the user's own.

Ownership follows Lightning's TensorBoardLogger: a writer this module creates is closed by
:meth:`EventSink.close`; a writer passed in is flushed, never closed. Only the process of
global rank 0 writes.

Encoding and writing run off the forward path: the logger hands each finished step to
:meth:`EventSink.submit` as one :class:`StepBundle`; a background thread encodes its grids
as palette PNGs, writes the whole step as one event and flushes it. The queue is bounded
(a full queue makes ``submit`` wait, so memory cannot grow), :meth:`EventSink.wait` blocks
until everything submitted is on disk, and interpreter exit drains every open sink.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _crc
from .render import layout

FLUSH_SECS = 5
MIN_FREE_BYTES = 16 * 2**20


def check_logdir(logdir: str) -> None:
    """Fail early, with one clear message, on a logdir that cannot take event files."""
    try:
        os.makedirs(logdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=logdir):
            pass
    except OSError as e:
        raise OSError(
            f"logdir {logdir!r} is not writable ({e.strerror or e}); "
            "choose a folder you can write to"
        ) from None
    free = shutil.disk_usage(logdir).free
    if free < MIN_FREE_BYTES:
        raise OSError(
            f"logdir {logdir!r} has only {free // 2**20} MiB free; "
            f"tbfeat needs at least {MIN_FREE_BYTES // 2**20} MiB to write events"
        )


def global_rank() -> int:
    """This process's global rank: ``torch.distributed`` if initialized, else ``RANK`` etc."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


@dataclass
class StepBundle:
    """Everything logged at one step: grids (palette indices), scalars and histograms."""

    step: int
    cmap: str = "viridis"
    images: list[tuple[str, np.ndarray]] = field(default_factory=list)
    """(tag, palette-index grid ``(H, W)`` or tiles ``(C, th, tw)``)."""
    scalars: list[tuple[str, float]] = field(default_factory=list)
    histograms: list[tuple[str, Any]] = field(default_factory=list)
    ncols: int = 8
    """Tiles per row for entries of ``images`` that are ``(C, th, tw)`` tiles."""
    final: bool = True
    """False for grids sent ahead while the step still runs; True ends the step."""


@dataclass
class _Task:
    fn: Any
    args: tuple[Any, ...]


_OPEN_SINKS: weakref.WeakSet[EventSink] = weakref.WeakSet()


@atexit.register
def _drain_open_sinks() -> None:
    for sink in list(_OPEN_SINKS):
        sink.close()


class EventSink:
    """Writes step bundles to a TensorBoard event file from a background thread.

    Args:
        logdir: Directory for a writer created on first use (``SummaryWriter(logdir)``).
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or any object with its
            ``add_scalar``/``add_histogram_raw``/``add_image``/``flush`` methods) to use
            instead; it is flushed, never closed.
        max_pending: Queue entries (a stage's grids, or a finished step) that may wait for
            the background thread before the caller blocks.
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None = None,
        writer: Any = None,
        max_pending: int = 64,
    ) -> None:
        if writer is not None and logdir is not None:
            raise ValueError("pass either logdir or writer, not both")
        if writer is not None:
            missing = [
                m
                for m in ("add_scalar", "add_histogram_raw", "add_image", "flush")
                if not callable(getattr(writer, m, None))
            ]
            if missing:
                raise TypeError(
                    f"writer must be a SummaryWriter; {type(writer).__name__} lacks "
                    f"{', '.join(missing)}"
                )
        self.logdir = os.fspath(logdir) if logdir is not None else None
        if self.logdir is not None and self.enabled:
            check_logdir(self.logdir)
        self._writer = writer
        self._owns = writer is None
        self._auto = writer is None and logdir is None
        self._lock = threading.Lock()
        self._queue: queue.Queue[StepBundle | _Task | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._worker_ident: int | None = None
        self._warned: set[str] = set()
        self._pending: dict[int, list[Any]] = {}
        _crc.install()
        self.flushed_step: int | None = None
        """The last step whose event is written and flushed to disk."""
        self.steps_written = 0
        """Steps whose events were written and flushed (read it after :meth:`wait`)."""

    @property
    def enabled(self) -> bool:
        """Only global rank 0 writes (read at each use: ranks may be set up later)."""
        return global_rank() == 0

    # ---------------------------------------------------------------- writer
    @property
    def writer(self) -> Any:
        """The SummaryWriter, created on first use."""
        with self._lock:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                # flush_secs: TensorBoard's own writer also flushes on its own every few
                # seconds (its default is two minutes)
                self._writer = SummaryWriter(log_dir=self.logdir, flush_secs=FLUSH_SECS)
            return self._writer

    @property
    def created(self) -> bool:
        return self._writer is not None

    def use_default_logdir(self, logdir: str | os.PathLike) -> None:
        """Point a sink that was given neither ``logdir`` nor ``writer`` at ``logdir``.

        Integrations call this with the framework's own run folder (an Ultralytics
        trainer's ``save_dir``). Pending steps are written first and a writer already
        open elsewhere is closed.
        """
        if not self._auto:
            return
        logdir = os.fspath(logdir)
        if logdir == self.logdir:
            return
        self.wait()
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self.logdir = logdir

    # ---------------------------------------------------------------- queue
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="tbfeat-writer", daemon=True)
            self._thread.start()
            _OPEN_SINKS.add(self)

    def images(
        self, step: int, images: list[tuple[str, np.ndarray]], cmap: str, ncols: int = 8
    ) -> None:
        """Queue grids (or ``(C, th, tw)`` tiles to lay out ``ncols`` per row) of a step
        that is still running; the thread encodes them at once, overlapping the rest of
        the forward, and keeps them for the step's event."""
        if not self.enabled or not images:
            return
        bundle = StepBundle(step=step, cmap=cmap, images=images, ncols=ncols, final=False)
        if threading.get_ident() == self._worker_ident:  # already on the writer thread
            self.write(bundle)
            return
        self._ensure_thread()
        self._queue.put(bundle)

    def call(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the writer thread, in order with everything queued."""
        if not self.enabled:
            return
        if threading.get_ident() == self._worker_ident:
            fn(*args)
            return
        self._ensure_thread()
        self._queue.put(_Task(fn, args))

    def submit(self, bundle: StepBundle) -> None:
        """Queue a finished step; the background thread writes it as one event and flushes."""
        if not self.enabled:
            return
        if threading.get_ident() == self._worker_ident:
            self.write(bundle)
            return
        self._ensure_thread()
        self._queue.put(bundle)

    def wait(self) -> None:
        """Block until every submitted step is written and flushed."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def _run(self) -> None:
        self._worker_ident = threading.get_ident()
        # yield the CPU to the training/inference threads; use what they leave idle
        # (Linux; elsewhere, or when not permitted, the thread keeps normal priority)
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            bundle = self._queue.get()
            try:
                if bundle is None:
                    return
                if isinstance(bundle, _Task):
                    bundle.fn(*bundle.args)
                else:
                    self.write(bundle)
            except Exception as e:  # never let a write kill the thread or the training
                what = f"step {bundle.step}" if isinstance(bundle, StepBundle) else "a task"
                self._warn(f"write:{type(e).__name__}", f"{what}: {type(e).__name__}: {e}")
            finally:
                bundle = None  # hold nothing (a task holds its logger) while waiting
                self._queue.task_done()

    def write(self, bundle: StepBundle) -> None:
        """Encode a bundle's grids; for a final bundle, write the step as one event and
        flush (background thread)."""
        pending = self._pending.setdefault(bundle.step, [])
        raw = getattr(self.writer, "_get_file_writer", None) is not None
        for tag, indices in bundle.images:
            try:
                if indices.ndim == 3:
                    indices = layout(indices, bundle.ncols)
                pending.append(
                    self._image_value(tag, indices, bundle.cmap)
                    if raw
                    else (tag, indices, bundle.cmap)
                )
            except Exception as e:
                self._warn(f"image:{tag}", f"image {tag} was not written: {type(e).__name__}: {e}")
        if not bundle.final:
            return
        images = self._pending.pop(bundle.step)
        if not (images or bundle.scalars or bundle.histograms):
            return
        writer, step = self.writer, bundle.step
        if not raw:  # a writer without torch's raw access: its public API
            from .render import colorize

            for tag, indices, cmap in images:
                writer.add_image(tag, colorize(indices, cmap), global_step=step, dataformats="HWC")
            for tag, value in bundle.scalars:
                writer.add_scalar(tag, value, global_step=step)
            for tag, stats in bundle.histograms:
                writer.add_histogram_raw(tag, global_step=step, **_histogram_args(stats))
        else:
            from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

            values = list(images)
            for tag, value in bundle.scalars:
                values.append(Summary.Value(tag=tag, simple_value=float(value)))
            for tag, stats in bundle.histograms:
                args = _histogram_args(stats)
                histo = HistogramProto(
                    min=args["min"],
                    max=args["max"],
                    num=args["num"],
                    sum=args["sum"],
                    sum_squares=args["sum_squares"],
                    bucket_limit=args["bucket_limits"],
                    bucket=args["bucket_counts"],
                )
                values.append(Summary.Value(tag=tag, histo=histo))
            writer._get_file_writer().add_summary(Summary(value=values), step)
        writer.flush()
        self.steps_written += 1
        self.flushed_step = step

    @staticmethod
    def _image_value(tag: str, indices: np.ndarray, cmap: str) -> Any:
        from tensorboard.compat.proto.summary_pb2 import Summary

        from .render import encode_png

        height, width = indices.shape
        png = encode_png(indices, cmap)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        return Summary.Value(tag=tag, image=image)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"tbfeat: {message}", RuntimeWarning, stacklevel=2)

    # ---------------------------------------------------------------- end
    def flush(self) -> None:
        """Write everything submitted and flush the writer."""
        self.wait()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Drain the queue, stop the thread; close the writer if this sink created it.

        Safe to call twice.
        """
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()
        self._thread = None
        _OPEN_SINKS.discard(self)
        with self._lock:
            if self._writer is None:
                return
            if self._owns:
                self._writer.close()
                self._writer = None
            else:
                self._writer.flush()


def _histogram_args(stats: Any) -> dict[str, Any]:
    """``add_histogram_raw`` arguments from a :class:`~tbfeat.stats.StatsSummary`.

    TensorBoard stores right bucket edges only; the first left edge is ``min``.
    """
    return {
        "min": float(stats.min),
        "max": float(stats.max),
        "num": int(stats.count),
        "sum": float(stats.sum),
        "sum_squares": float(stats.sum_squares),
        "bucket_limits": np.asarray(stats.hist_edges[1:], dtype=np.float64).tolist(),
        "bucket_counts": np.asarray(stats.hist_counts, dtype=np.float64).tolist(),
    }
