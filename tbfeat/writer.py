"""Where events go: tbfeat's own event files, or the user's ``SummaryWriter``.

Ownership follows Lightning's TensorBoardLogger: files the sink creates are closed by
:meth:`EventSink.close`; a writer passed in is flushed, never closed. The sink receives
finished steps (:class:`StepBundle`) from the recorder, on the recorder's thread, and
writes each as one event, then flushes. It holds no step state and starts no thread.

Storage faults stay here. tbfeat writes its own files synchronously
(:class:`EventFile`), so a failed write is seen at once and cut back to the last whole
record: a step lands whole or not at all, and :attr:`EventSink.flushed_step` only counts
steps on disk. A step that cannot be written is dropped with one warning per outage;
the next step tries again in a fresh event file (the folder is recreated if it was
removed), and a file that could not even take its header is removed again.

One sink writes to a run folder at a time: it holds the folder's
:class:`~tbfeat.files.FolderLock` from before it trims or creates its first file there
until :meth:`EventSink.close` (or it moves to another folder). A process forked from the
holder writes nothing through the sink it inherited: each of its steps is refused, said
once.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import _crc
from .files import (
    FolderLock,
    NotRegularFile,
    atomic_write,
    check_folder_free,
    create_new,
    not_regular,
    open_regular,
)
from .notes import Notes, warn
from .records import DamagedRecord, read_records

MIN_FREE_BYTES = 16 * 2**20
FILE_SUFFIX = ".tbfeat"
"""Ends the names of the event files tbfeat creates, so that a new run can remove the old
run's steps from tbfeat's own files and never touch another writer's."""
WRITER_METHODS = ("add_scalar", "add_histogram_raw", "add_image", "flush")
_FILE_IDS = itertools.count()
NAME_TRIES = 100


def check_logdir(logdir: str | os.PathLike) -> None:
    """Fail early, with one clear message, on a logdir that cannot take event files:
    not writable, nearly full, or written by another logger
    (:class:`~tbfeat.files.FolderInUse`, naming its pid and host)."""
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
    check_folder_free(logdir)


def check_writer(writer: Any) -> None:
    """A ``SummaryWriter``, or an object with the part of its API the sink uses."""
    missing = [m for m in WRITER_METHODS if not callable(getattr(writer, m, None))]
    if missing:
        raise TypeError(
            f"writer must be a SummaryWriter; {type(writer).__name__} lacks {', '.join(missing)}"
        )


def check_destination(logdir: str | os.PathLike | None, writer: Any) -> None:
    """Events go to a ``logdir`` or to a ``writer``: refuse both, and a writer without
    ``SummaryWriter``'s methods."""
    if writer is not None and logdir is not None:
        raise ValueError("pass either logdir or writer, not both")
    if writer is not None:
        check_writer(writer)


def writer_logdir(writer: Any) -> str | None:
    """The folder a ``SummaryWriter`` (or a look-alike) writes to, if it says."""
    get = getattr(writer, "get_logdir", None)
    logdir = get() if callable(get) else getattr(writer, "log_dir", None)
    return os.fspath(logdir) if logdir else None


def global_rank() -> int:
    """This process's global rank: ``torch.distributed`` if initialized, else ``RANK`` etc.

    A negative ``RANK`` (Ultralytics sets ``-1`` outside DDP) counts as 0.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var)
        if value is not None and value.strip().lstrip("-").isdigit():
            return max(int(value), 0)
    return 0


class NullWriter:
    """A ``SummaryWriter`` stand-in for ranks other than 0: every method does nothing.

    Example:
        >>> NullWriter().add_scalar("loss", 0.5, 1) is None
        True
    """

    log_dir = None

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("__"):
            raise AttributeError(name)
        return _do_nothing

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return "NullWriter()"


def _do_nothing(*args: Any, **kwargs: Any) -> None:
    return None


@dataclass
class StepBundle:
    """One finished step: encoded images (from :meth:`EventSink.encode_image`), scalars
    and histograms (``(tag, StatsSummary)``), written as one event."""

    step: int
    images: list[Any] = field(default_factory=list)
    scalars: list[tuple[str, float]] = field(default_factory=list)
    histograms: list[tuple[str, Any]] = field(default_factory=list)
    layout: dict[str, Any] | None = None
    """A custom scalars layout (``SummaryWriter.add_custom_scalars``'s argument)."""
    run: Any = None
    """The run's metadata (a :class:`~tbfeat.tags.RunInfo`), where it changed."""

    def __bool__(self) -> bool:
        return bool(
            self.images or self.scalars or self.histograms or self.layout or self.run is not None
        )

    def summary(self) -> Any:
        """The step as one TensorBoard ``Summary`` (images already encoded)."""
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        values = list(self.images)
        if self.layout:
            from torch.utils.tensorboard.summary import custom_scalars

            values += list(custom_scalars(self.layout).value)
        if self.run is not None:
            from .tags import run_value

            values.append(run_value(self.run))
        for tag, value in self.scalars:
            values.append(Summary.Value(tag=tag, simple_value=float(value)))
        for tag, stats in self.histograms:
            a = histogram_args(stats)
            histo = HistogramProto(
                min=a["min"], max=a["max"], num=a["num"], sum=a["sum"],
                sum_squares=a["sum_squares"], bucket_limit=a["bucket_limits"],
                bucket=a["bucket_counts"],
            )  # fmt: skip
            values.append(Summary.Value(tag=tag, histo=histo))
        return Summary(value=values)


class EventFile:
    """One event file of tbfeat's own, appended to synchronously by a single caller.

    The name follows TensorBoard's (``events.out.tfevents.<time>.<host>.<pid>.<n>``, the
    number zero-padded) and
    ends in :data:`FILE_SUFFIX`. Each :meth:`append` writes whole records or, on an error,
    cuts the file back to where it was, so a reader never meets half a step.

    Raises:
        OSError: the folder cannot be created or the file cannot take its first record
            (it is removed again: no empty file is left per attempt).
    """

    def __init__(self, folder: Path) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path, fd = _new_event_file(Path(folder))
        self._file: io.FileIO | None = io.FileIO(fd, "wb")
        try:
            from tensorboard.compat.proto import event_pb2

            header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            header.source_metadata.writer = "tbfeat"
            self.append(header.SerializeToString())
        except BaseException:
            self.close()
            self.path.unlink(missing_ok=True)
            raise

    def append(self, event: bytes) -> None:
        """Append one serialized ``Event`` as a TFRecord; all of it or nothing."""
        from tensorboard.summary.writer.record_writer import RecordWriter

        if self._file is None:
            raise ValueError(f"event file {str(self.path)!r} is closed")
        buffer = io.BytesIO()
        RecordWriter(buffer).write(event)
        record = memoryview(buffer.getbuffer())
        fd, start = self._file.fileno(), self._file.tell()
        try:
            while record:
                record = record[os.write(fd, record) :]
            if os.fstat(fd).st_nlink == 0:  # the folder or the file was removed
                raise FileNotFoundError(errno.ENOENT, "the event file was removed", str(self.path))
        except BaseException:
            record = None  # type: ignore[assignment]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.lseek(fd, start, os.SEEK_SET)
            raise

    def close(self) -> None:
        """Close the file; safe to call twice, never raises."""
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def _new_event_file(folder: Path) -> tuple[Path, int]:
    """A new event file's path and descriptor; a name already taken (by anything, a link
    too) is passed over for the next number, never opened."""
    for _ in range(NAME_TRIES):
        # the file number is padded: files one process opens within a second sort (and
        # TensorBoard reads them) in the order they were opened, also past the 9th
        name = "events.out.tfevents.%010d.%s.%s.%06d%s" % (  # noqa: UP031 - TensorBoard's
            time.time(), socket.gethostname(), os.getpid(), next(_FILE_IDS), FILE_SUFFIX
        )  # fmt: skip
        try:
            return folder / name, create_new(folder / name)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free event file name", str(folder))


class EventSink:
    """Encodes grids and writes finished steps to TensorBoard event files.

    Args:
        logdir: Directory of tbfeat's own event files (created on the first write);
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
        True
        >>> sink.flushed_step
        1
        >>> sink.close()
    """

    def __init__(self, logdir: str | os.PathLike | None = None, writer: Any = None) -> None:
        check_destination(logdir, writer)
        self.logdir = os.fspath(logdir) if logdir is not None else None
        self._given = writer
        self._raw = writer is None or callable(getattr(writer, "_get_file_writer", None))
        self._file: EventFile | None = None
        self._lock: FolderLock | None = None
        """The lock of the folder this sink writes to, taken before it writes there."""
        self._failing = False
        self._notes = Notes()
        _crc.install()
        self.flushed_step: int | None = None
        """The last step whose event is written and flushed to disk."""
        self.steps_written = 0
        """Steps written and flushed by this sink."""
        self.steps_dropped = 0
        """Steps that could not be written (a storage error)."""

    @property
    def failing(self) -> bool:
        """True while the last step could not be written (a storage fault), and always
        in a process forked from the one that wrote."""
        return self._failing or self._inherited()

    def run_dir(self) -> Path | None:
        """The folder events go to: the logdir, ``runs/<date>_<host>`` (chosen on first
        use) without one, or the given writer's folder if it says."""
        if self._given is not None:
            folder = writer_logdir(self._given)
            return Path(folder) if folder else None
        if self.logdir is None:
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            self.logdir = os.path.join("runs", f"{stamp}_{socket.gethostname()}")
        return Path(self.logdir)

    def set_logdir(self, logdir: str | os.PathLike) -> None:
        """Write later steps to ``logdir``; files this sink opened elsewhere are closed."""
        logdir = os.fspath(logdir)
        if self._given is not None or logdir == self.logdir:
            return
        self.close()
        self.logdir = logdir

    def drop_steps(self, first: int | None) -> int:
        """Remove the steps from ``first`` on (all with ``None``) from the event files
        tbfeat wrote in this sink's folder before, so that a new run replaces them; other
        writers' files stay as they are. Returns how many files changed."""
        folder = self.run_dir()
        if folder is None or self._given is not None or not folder.is_dir() or self._inherited():
            return 0
        self.claim()
        own = self._file.path.resolve() if self._file is not None else None
        changed, odd = 0, []
        for path in sorted(folder.glob(f"events.out.tfevents.*{FILE_SUFFIX}")):
            why = "a link" if path.is_symlink() else not_regular(path)
            if why is not None:  # never opened: a FIFO would block, a link is not ours
                odd.append(f"{path.name} ({why})")
            elif path.resolve() != own:
                changed += trim_event_file(path, first)
        if odd:
            self._notes(f"odd:{folder}", f"tbfeat: left alone what is named like an event "
                        f"file in {str(folder)!r} but is not one: {'; '.join(odd)}",
                        warn=True)  # fmt: skip
        return changed

    # ---------------------------------------------------------------- encoding
    def encode_image(self, tag: str, grid: np.ndarray, cmap: str = "viridis") -> Any:
        """A palette-index grid as what :meth:`write` takes: an encoded PNG summary value,
        or the RGB array for a given writer with only the public API."""
        if not self._raw:
            from .render import colorize

            return (tag, colorize(grid, cmap))
        from tensorboard.compat.proto.summary_pb2 import Summary

        from .pictures import encode_png

        height, width = grid.shape
        png = encode_png(grid, cmap)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        return Summary.Value(tag=tag, image=image)

    def encode_rgb(self, tag: str, rgb: np.ndarray) -> Any:
        """An ``(H, W, 3)`` uint8 RGB picture as what :meth:`write` takes (see
        :meth:`encode_image`)."""
        if not self._raw:
            return (tag, rgb)
        from tensorboard.compat.proto.summary_pb2 import Summary

        from .pictures import encode_rgb_png

        height, width, _ = rgb.shape
        png = encode_rgb_png(rgb)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        return Summary.Value(tag=tag, image=image)

    # ---------------------------------------------------------------- writing
    def write(self, bundle: StepBundle) -> bool:
        """Write a finished step as one event and flush it; never raises for storage.

        Returns:
            True when the step is on disk; False when it was dropped (said once per
            outage as a warning naming the folder and the error).
        """
        if not bundle:
            return True
        if self._inherited():
            self._notes(
                "forked",
                f"this process (pid {os.getpid()}) was forked from the one writing to "
                f"{self._where()}; its steps are not written there (step {bundle.step} is "
                "the first): create a logger with its own run folder in this process",
                warn=True,
            )
            return False
        try:
            if self._given is not None:
                self._write_given(bundle)
            else:
                self._write_own(bundle)
        except Exception as e:  # a storage fault: the training goes on, the step is lost
            self._failed(bundle.step, e)
            return False
        if self._failing:
            self._failing = False
            logging.getLogger("tbfeat").info(
                "tbfeat: writing to %s works again; logging resumed at step %d",
                self._where(),
                bundle.step,
            )
        self.steps_written += 1
        self.flushed_step = bundle.step
        return True

    def _write_own(self, bundle: StepBundle) -> None:
        from tensorboard.compat.proto import event_pb2

        event = event_pb2.Event(wall_time=time.time(), step=bundle.step, summary=bundle.summary())
        data = event.SerializeToString()
        fresh = self._file is None
        try:
            self._event_file().append(data)
        except OSError:
            self._drop_file()
            if fresh:
                raise
            self._event_file().append(data)  # once more, in a new file (a removed folder)

    def _event_file(self) -> EventFile:
        if self._file is None:
            self._file = EventFile(self.claim())
        return self._file

    def claim(self) -> Path:
        """The run folder (created if missing), its lock held by this sink (taken before
        the first write, or by the run as it starts, so that a second logger fails early).

        Raises:
            FolderInUse: another logger writes there; nothing is written.
        """
        folder = self.run_dir()
        os.makedirs(folder, exist_ok=True)
        if self._lock is None:
            self._lock = FolderLock(folder)
        self._lock.acquire()
        return folder

    def _inherited(self) -> bool:
        """True in a process forked from the one that holds this sink's folder."""
        return self._lock is not None and self._lock.inherited

    def _write_given(self, bundle: StepBundle) -> None:
        writer, step = self._given, bundle.step
        if self._raw:
            writer._get_file_writer().add_summary(bundle.summary(), step)
        else:  # a writer without torch's raw access: its public API, which has no call
            # for another plugin's summary: the run's metadata is left out
            if bundle.layout:
                writer.add_custom_scalars(bundle.layout)
            for tag, rgb in bundle.images:
                writer.add_image(tag, rgb, global_step=step, dataformats="HWC")
            for tag, value in bundle.scalars:
                writer.add_scalar(tag, value, global_step=step)
            for tag, stats in bundle.histograms:
                writer.add_histogram_raw(tag, global_step=step, **histogram_args(stats))
        writer.flush()

    def _failed(self, step: int, error: Exception) -> None:
        # TensorBoard's writer raises the one stored error again on every call: without
        # this, its traceback would grow a frame (holding that step's images) per step
        error.__traceback__ = None
        self._drop_file()
        self.steps_dropped += 1
        if not self._failing:
            self._failing = True
            retry = "" if self._given is not None else ", in a new event file"
            warn(
                f"cannot write step {step} to {self._where()} ({type(error).__name__}: "
                f"{error}); steps are dropped until it can be written again{retry}"
            )

    def _drop_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _where(self) -> str:
        folder = self.run_dir()
        return f"logdir {str(folder)!r}" if folder is not None else "the writer"

    def close(self) -> None:
        """Close the file this sink created, flush a given writer. Safe to call twice;
        never raises (a storage error is warned about). The folder's lock is released
        (in a forked process, only that process's copy of it is closed)."""
        self._drop_file()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        if self._given is None:
            return
        try:
            self._given.flush()
        except Exception as e:
            e.__traceback__ = None
            if not self._failing:  # else said already: the same fault
                warn(f"closing the writer of {self._where()} failed: {type(e).__name__}: {e}")


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


def trim_event_file(path: Path, first: int | None) -> int:
    """Drop the records of steps ``>= first`` (all with ``None``) from an event file of
    tbfeat's: delete it when no summary is left, else rewrite it atomically with the kept
    records unchanged, byte for byte (the file's mode and owner are kept). A damaged or
    cut-off tail is dropped too. A link is not tbfeat's file: it is left alone. Returns 1
    if the file changed."""
    from tensorboard.compat.proto import event_pb2

    try:
        fd = open_regular(path)
    except (NotRegularFile, FileNotFoundError):  # a link or else; or removed meanwhile
        return 0
    with os.fdopen(fd, "rb") as f:
        keep, summaries, end = [], 0, 0
        with contextlib.suppress(DamagedRecord):  # a damaged tail is dropped
            for record in read_records(f, 0, os.fstat(f.fileno()).st_size):
                end = record.offset + record.size
                event = event_pb2.Event.FromString(record.payload)
                if event.HasField("file_version") or (first is not None and event.step < first):
                    keep.append((record.offset, record.size))
                    summaries += event.HasField("summary")
        if sum(size for _, size in keep) == end == os.fstat(f.fileno()).st_size:
            return 0
        if not summaries:
            path.unlink(missing_ok=True)
            return 1
        atomic_write(path, lambda out: _copy_ranges(f, out, keep))
    return 1


def _copy_ranges(source: Any, out: Any, ranges: list[tuple[int, int]]) -> None:
    """Copy the byte ranges ``(start, size)`` of ``source`` to ``out``, in order."""
    for start, size in ranges:
        source.seek(start)
        data = source.read(size)
        if len(data) != size:
            raise OSError(errno.EIO, "the event file changed while it was trimmed")
        out.write(data)
