"""Where events go: a TensorBoard ``SummaryWriter`` created lazily, or the user's own.

Ownership follows Lightning's TensorBoardLogger: a writer the sink creates is closed by
:meth:`EventSink.close`; a writer passed in is flushed, never closed. The sink only
encodes and writes: it receives finished steps (:class:`StepBundle`) from the recorder,
on the recorder's thread, and writes each as one event, then flushes. It holds no step
state and starts no thread; :class:`~tbfeat.recorder.Recorder` is its only caller.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _crc

FLUSH_SECS = 5
MIN_FREE_BYTES = 16 * 2**20
FILE_SUFFIX = ".tbfeat"
"""Ends the names of the event files tbfeat creates, so that a new run can remove the old
run's steps from tbfeat's own files and never touch another writer's."""
WRITER_METHODS = ("add_scalar", "add_histogram_raw", "add_image", "flush")


def check_logdir(logdir: str | os.PathLike) -> None:
    """Fail early, with one clear message, on a logdir that cannot take event files."""
    logdir = os.fspath(logdir)
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


def check_writer(writer: Any) -> None:
    """A ``SummaryWriter``, or an object with the part of its API the sink uses."""
    missing = [m for m in WRITER_METHODS if not callable(getattr(writer, m, None))]
    if missing:
        raise TypeError(
            f"writer must be a SummaryWriter; {type(writer).__name__} lacks {', '.join(missing)}"
        )


def writer_logdir(writer: Any) -> str | None:
    """The folder a ``SummaryWriter`` (or a look-alike) writes to, if it says."""
    get = getattr(writer, "get_logdir", None)
    logdir = get() if callable(get) else getattr(writer, "log_dir", None)
    return os.fspath(logdir) if logdir else None


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
    """One finished step: encoded images (from :meth:`EventSink.encode_image`), scalars
    and histograms (``(tag, StatsSummary)``), written as one event."""

    step: int
    images: list[Any] = field(default_factory=list)
    scalars: list[tuple[str, float]] = field(default_factory=list)
    histograms: list[tuple[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images or self.scalars or self.histograms)


class EventSink:
    """Encodes grids and writes finished steps to a TensorBoard event file.

    Args:
        logdir: Directory for a writer created on first use (``SummaryWriter(logdir)``);
            ``None`` with no ``writer`` gives ``SummaryWriter``'s default
            ``runs/<date>_<host>``.
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or any object with its
            ``add_scalar``/``add_histogram_raw``/``add_image``/``flush`` methods) to use
            instead; it is flushed, never closed.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from tbfeat.writer import EventSink, StepBundle
        >>> sink = EventSink(tempfile.mkdtemp())
        >>> image = sink.encode_image("features/00_Conv2d/0", np.zeros((4, 4), np.uint8))
        >>> sink.write(StepBundle(step=1, images=[image], scalars=[("stats/x", 2.0)]))
        >>> sink.flushed_step
        1
        >>> sink.close()
    """

    def __init__(self, logdir: str | os.PathLike | None = None, writer: Any = None) -> None:
        if writer is not None and logdir is not None:
            raise ValueError("pass either logdir or writer, not both")
        if writer is not None:
            check_writer(writer)
        self.logdir = os.fspath(logdir) if logdir is not None else None
        self._writer = writer
        self._owns = writer is None
        self._raw = writer is not None and callable(getattr(writer, "_get_file_writer", None))
        _crc.install()
        self.flushed_step: int | None = None
        """The last step whose event is written and flushed to disk."""
        self.steps_written = 0
        """Steps written and flushed by this sink."""

    @property
    def owns_writer(self) -> bool:
        """True when the sink creates (and closes) its writer."""
        return self._owns

    def run_dir(self) -> Path | None:
        """The folder events go to (known once a writer exists when no logdir was given)."""
        if self.logdir is not None:
            return Path(self.logdir)
        folder = writer_logdir(self._writer) if self._writer is not None else None
        return Path(folder) if folder else None

    def set_logdir(self, logdir: str | os.PathLike) -> None:
        """Write later steps to ``logdir``; a writer this sink opened elsewhere is closed."""
        logdir = os.fspath(logdir)
        if not self._owns or logdir == self.logdir:
            return
        self.close()
        self.logdir = logdir

    def open(self) -> Any:
        """The writer, created now if needed (a new event file ending in
        :data:`FILE_SUFFIX`)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # flush_secs: TensorBoard's writer also flushes by itself every few seconds
            self._writer = SummaryWriter(
                log_dir=self.logdir, flush_secs=FLUSH_SECS, filename_suffix=FILE_SUFFIX
            )
            self._raw = True
        return self._writer

    def drop_steps(self, first: int | None) -> int:
        """Remove the steps from ``first`` on (all with ``None``) from the event files
        tbfeat wrote in this sink's folder before, so that a new run replaces them; other
        writers' files stay as they are. Returns how many files changed."""
        folder = self.run_dir()
        if folder is None or not self._owns or not folder.is_dir():
            return 0
        own = writer_file(self._writer) if self._writer is not None else None
        changed = 0
        for path in sorted(folder.glob(f"events.out.tfevents.*{FILE_SUFFIX}")):
            if own is None or path.resolve() != own:
                changed += trim_event_file(path, first)
        return changed

    # ---------------------------------------------------------------- encoding
    def encode_image(self, tag: str, grid: np.ndarray, cmap: str = "viridis") -> Any:
        """A palette-index grid as what :meth:`write` takes: an encoded PNG summary value
        for a ``SummaryWriter``, the RGB array for a writer with only the public API."""
        if not self._raw and self._writer is not None:
            from .render import colorize

            return (tag, colorize(grid, cmap))
        from tensorboard.compat.proto.summary_pb2 import Summary

        from .render import encode_png

        height, width = grid.shape
        png = encode_png(grid, cmap)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        return Summary.Value(tag=tag, image=image)

    # ---------------------------------------------------------------- writing
    def write(self, bundle: StepBundle) -> None:
        """Write a finished step as one event and flush."""
        if not bundle:
            return
        writer, step = self.open(), bundle.step
        if not self._raw:  # a writer without torch's raw access: its public API
            for tag, rgb in bundle.images:
                writer.add_image(tag, rgb, global_step=step, dataformats="HWC")
            for tag, value in bundle.scalars:
                writer.add_scalar(tag, value, global_step=step)
            for tag, stats in bundle.histograms:
                writer.add_histogram_raw(tag, global_step=step, **histogram_args(stats))
        else:
            from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

            values = list(bundle.images)
            for tag, value in bundle.scalars:
                values.append(Summary.Value(tag=tag, simple_value=float(value)))
            for tag, stats in bundle.histograms:
                a = histogram_args(stats)
                histo = HistogramProto(
                    min=a["min"], max=a["max"], num=a["num"], sum=a["sum"],
                    sum_squares=a["sum_squares"], bucket_limit=a["bucket_limits"],
                    bucket=a["bucket_counts"],
                )  # fmt: skip
                values.append(Summary.Value(tag=tag, histo=histo))
            writer._get_file_writer().add_summary(Summary(value=values), step)
        writer.flush()
        self.steps_written += 1
        self.flushed_step = step

    def close(self) -> None:
        """Close the writer if this sink created it, else flush it. Safe to call twice."""
        writer = self._writer
        if writer is None:
            return
        if self._owns:
            self._writer = None
            writer.close()
        else:
            writer.flush()


def histogram_args(stats: Any) -> dict[str, Any]:
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


def writer_file(writer: Any) -> Path | None:
    """The event file a ``SummaryWriter`` writes, if it has one open."""
    file_writer = getattr(writer, "file_writer", None)
    name = getattr(getattr(file_writer, "event_writer", None), "_file_name", None)
    return Path(name).resolve() if name else None


def trim_event_file(path: Path, first: int | None) -> int:
    """Drop the summaries at steps ``>= first`` (all with ``None``) from an event file:
    delete it when nothing else is left, else rewrite it atomically. Returns 1 if changed."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer.record_writer import RecordWriter

    def dropped(event: Any) -> bool:
        return first is None or (not event.HasField("file_version") and event.step >= first)

    events = list(EventFileLoader(str(path)).Load())
    keep = [e for e in events if not dropped(e)]
    if len(keep) == len(events):
        return 0
    if not any(e.HasField("summary") for e in keep):
        path.unlink(missing_ok=True)
        return 1
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            records = RecordWriter(f)
            for event in keep:
                records.write(event.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return 1
