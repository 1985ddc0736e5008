"""One reader for everything tbfeat reads back: runs, tags, steps and single values.

A :class:`Reader` indexes the event files under a logdir once, in one sequential pass over
their TFRecord framing (an 8-byte length, the masked CRC-32C of the length, the payload,
the masked CRC-32C of the payload; checked with :mod:`tbfeat._crc`). The index holds, for
each record, its offset, length, step and wall time (:class:`Record`), and for each
summary value its tag, kind and place in the record; never an image. One value is read
later by seeking to its record and parsing that record alone, so memory grows with what
is shown, not with the logdir.

:meth:`Reader.refresh` keeps the index current and is cheap to call often:

- a file that did not change (same size, modification time and inode) is not read;
- a file that grew is read from where its index ended (only the new bytes);
- a record still being written (cut short at the end of the file) is left for the next
  refresh;
- a file that shrank, or was replaced, is indexed again from its start;
- a damaged record (a bad CRC, or a length over :data:`MAX_RECORD_BYTES`) ends that
  file's index, with one warning naming the file and the offset; the other files are
  still read.

Runs are the folders under the logdir (itself included) that hold regular files named
``events.out.tfevents.*``; anything else so named (a folder, a FIFO, a socket, a link out
of the logdir) is skipped with one warning and never opened. The files of one run merge
in file-name order; a later file's value for the same tag and step wins, as in
TensorBoard.

The index lives in memory, one per :class:`Reader`. It is not written to disk: building it
reads the event files once at the speed of the disk and the CRC (see
``scripts/bench_scale.py``), and a long-lived reader (a dashboard) refreshes for free.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from . import tags as tagging
from ._crc import masked_crc32c
from .files import not_regular, open_regular
from .notes import Notes
from .records import HEAD, TAIL, DamagedRecord, read_records

EVENT_PREFIX = "events.out.tfevents"
"""Event files are the files whose names begin with this."""
KINDS = ("image", "scalar", "histogram", "tensor", "audio")
"""The kinds of summary values (:attr:`TagInfo.kind`)."""
_FIELDS = {"image": "image", "simple_value": "scalar", "histo": "histogram",
           "tensor": "tensor", "audio": "audio"}  # fmt: skip


class NotLogged(LookupError):
    """A run, tag or step that is not in the index (or no longer on disk as indexed)."""


class Record(NamedTuple):
    """One event of an event file: where it lies and its step."""

    offset: int
    """Where its 12-byte header begins."""
    length: int
    """Its payload's length (the record takes ``length + 16`` bytes)."""
    step: int
    wall_time: float


@dataclass(frozen=True)
class TagInfo:
    """What a run logged under one tag."""

    kind: str
    """One of :data:`KINDS`."""
    plugin: str
    """The TensorBoard plugin of the tag's first value with metadata (``""`` if none)."""
    steps: tuple[int, ...]
    """The steps logged, ascending."""


class _Tag:
    """One tag's index: ``steps`` maps a step to ``(file, record, position in it)``;
    a scalar tag also keeps its values (``values``, by step), a few bytes each."""

    __slots__ = ("kind", "plugin", "steps", "values")

    def __init__(self, kind: str, plugin: str = "") -> None:
        self.kind = kind
        self.plugin = plugin
        self.steps: dict[int, tuple[FileIndex, Record, int]] = {}
        self.values: dict[int, float] = {}


def _open(path: str) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file, else ``None``
    (:func:`tbfeat.files.open_regular`)."""
    try:
        return open_regular(path)
    except OSError:
        return None


class FileIndex:
    """The index of one event file, brought up to date by :meth:`update`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bytes_read = 0
        """Bytes of the file read to index it, in all."""
        self._reset()

    def _reset(self) -> None:
        self.key: tuple[int, int, int, int] | None = None
        """``(device, inode, size, mtime_ns)`` when last indexed."""
        self.end = 0
        """The bytes indexed: the end of the last whole record."""
        self.damaged: int | None = None
        """The offset of a damaged record, where the index ended for good."""
        self.records: list[Record] = []
        self.tags: dict[str, _Tag] = {}
        self._last = b""
        """The CRC bytes that end the last record indexed."""

    def update(self, notes: Notes) -> bool | None:
        """Index what is new. True when the index changed, False when the file did not,
        ``None`` when it is gone (or no longer a regular file)."""
        fd = _open(self.path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key == self.key:
                return False
            if self._rewritten(fd, key):
                self._reset()
            self.key = key
            if self.damaged is None:
                with os.fdopen(os.dup(fd), "rb", buffering=1 << 20) as f:
                    self._scan(f, st.st_size, notes)
            return True
        finally:
            os.close(fd)

    def _rewritten(self, fd: int, key: tuple[int, int, int, int]) -> bool:
        """Whether the file must be indexed from its start: new, replaced (another
        inode), not longer than before, or no longer ending its last record as it did."""
        if self.key is None or key[:2] != self.key[:2] or key[2] <= self.key[2]:
            return True
        return os.pread(fd, len(self._last), self.end - len(self._last)) != self._last

    def _scan(self, f: Any, size: int, notes: Notes) -> None:
        """Index the whole records between :attr:`end` and ``size``; a record being
        written is read by the next refresh."""
        start = self.end
        try:
            for record in read_records(f, self.end, size):
                self._add(record.payload, record.length)
                self._last = TAIL.pack(record.crc)
        except DamagedRecord as e:
            self.damaged = self.end
            notes(f"damaged:{self.path}:{self.end}",
                  f"event file {self.path!r} is damaged at byte {self.end} ({e}); "
                  f"its records from there on are not read", warn=True)  # fmt: skip
        finally:
            self.bytes_read += f.tell() - start

    def _add(self, payload: bytes, length: int) -> None:
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto.event_pb2 import Event

        try:
            event = Event.FromString(payload)
        except DecodeError as e:
            raise DamagedRecord(self.end, f"not an event: {e}") from None
        record = Record(self.end, length, event.step, event.wall_time)
        self.records.append(record)
        self.end += HEAD.size + length + TAIL.size
        if not event.HasField("summary"):
            return
        for position, value in enumerate(event.summary.value):
            field = value.WhichOneof("value")
            kind = _FIELDS.get(field or "")
            if kind is None:
                continue
            tag = self.tags.get(value.tag)
            if tag is None or tag.kind != kind:
                tag = self.tags[value.tag] = _Tag(kind, tag.plugin if tag else "")
            if not tag.plugin and value.HasField("metadata"):
                tag.plugin = value.metadata.plugin_data.plugin_name
            tag.steps[record.step] = (self, record, position)
            if kind == "scalar":
                tag.values[record.step] = value.simple_value

    def read(self, record: Record) -> Any:
        """The ``Event`` of one indexed record, read alone.

        Raises:
            NotLogged: the file is gone, or no longer holds that record there.
        """
        from tensorboard.compat.proto.event_pb2 import Event

        fd = _open(self.path)
        if fd is None:
            raise NotLogged(f"event file {self.path!r} is gone")
        try:
            header = os.pread(fd, HEAD.size, record.offset)
            data = os.pread(fd, record.length + TAIL.size, record.offset + HEAD.size)
        finally:
            os.close(fd)
        payload, footer = data[: record.length], data[record.length :]
        if (len(header) < HEAD.size or HEAD.unpack(header)[0] != record.length
                or len(footer) < TAIL.size
                or TAIL.unpack(footer)[0] != masked_crc32c(payload)):  # fmt: skip
            raise NotLogged(f"event file {self.path!r} changed at byte {record.offset}")
        return Event.FromString(payload)


class RecordCache:
    """The events parsed last, up to ``max_bytes`` of records, least recently used out.

    tbfeat writes a step as one event, so the cells of a step that a dashboard asks for
    at once share one record: it is read and parsed once, by the first request, while
    the others wait for it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._size = 0
        self._pending: dict[tuple, Future] = {}

    def get(self, key: tuple, size: int, load: Callable[[], Any]) -> Any:
        """The value cached at ``key``, else ``load()``'s (kept if ``size`` fits)."""
        if size > self.max_bytes:
            return load()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            pending = self._pending.get(key)
            if pending is None:
                mine = self._pending[key] = Future()
        if pending is not None:
            return pending.result()
        try:
            value = load()
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            mine.set_exception(e)
            raise
        with self._lock:
            del self._pending[key]
            self._items[key] = (value, size)
            self._size += size
            while self._size > self.max_bytes:
                self._size -= self._items.popitem(last=False)[1][1]
        mine.set_result(value)
        return value


class Reader:
    """Runs, tags, steps and single values of the event files under a logdir.

    Args:
        logdir: A run folder, or a folder of runs.
        cache_bytes: Keep the events parsed last, up to this many bytes of records
            (:class:`RecordCache`; 0, the default, reads each value anew).
        notes: Where the reader says what it skipped (a damaged record, an odd entry);
            default a :class:`~tbfeat.notes.Notes` of its own, as Python warnings.

    Example:
        >>> import tempfile
        >>> Reader(tempfile.mkdtemp()).runs()
        []
    """

    def __init__(
        self, logdir: str | os.PathLike, cache_bytes: int = 0, notes: Notes | None = None
    ) -> None:
        self.logdir = Path(logdir)
        self._cache = RecordCache(cache_bytes)
        self._versions: dict[str, int] = {}
        self.bytes_read = 0
        """Bytes of event files read so far, to index them or read values."""
        self._files: dict[str, FileIndex] = {}
        self._runs: dict[str, list[FileIndex]] = {}
        self._views: dict[str, dict[str, _Tag]] = {}
        self._skipped: set[str] = set()
        self._notes = notes if notes is not None else Notes()
        self._fresh = False
        self._lock = threading.RLock()
        """Held while the index is read or changed: a dashboard asks from many threads."""

    # ---------------------------------------------------------------- indexing
    def refresh(self) -> None:
        """Bring the index up to date with the logdir (see the module's notes)."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        files: dict[str, FileIndex] = {}
        runs: dict[str, list[FileIndex]] = {}
        for run, paths in self._scan_runs():
            changed = [f.path for f in self._runs.get(run, ())] != paths
            for path in paths:
                file = self._files.get(path) or FileIndex(path)
                before = file.bytes_read
                updated = file.update(self._notes)
                self.bytes_read += file.bytes_read - before
                changed |= updated is not False
                if updated is not None:
                    files[path] = file
                    runs.setdefault(run, []).append(file)
            if changed:
                self._views.pop(run, None)
                self._versions[run] = self._versions.get(run, 0) + 1
        self._files, self._runs, self._fresh = files, runs, True
        self._views = {r: v for r, v in self._views.items() if r in runs}

    def _scan_runs(self) -> Iterator[tuple[str, list[str]]]:
        """``(run, event file paths in name order)`` of every folder holding event files."""
        root = os.path.realpath(self.logdir)
        skipped = []
        for folder, dirs, names in os.walk(self.logdir):
            dirs.sort()
            paths = []
            for name in sorted(n for n in names + dirs if n.startswith(EVENT_PREFIX)):
                path = os.path.join(folder, name)
                why = not_regular(path, root)
                if why is None:
                    paths.append(os.path.realpath(path) if os.path.islink(path) else path)
                elif path not in self._skipped:
                    self._skipped.add(path)
                    skipped.append(f"{path} ({why})")
            if paths:
                rel = Path(folder).relative_to(self.logdir).as_posix()
                yield rel, paths
        if skipped:
            self._notes(f"skipped:{skipped[0]}",
                        f"skipped what is named like an event file but is not one: "
                        f"{'; '.join(skipped)}", warn=True)  # fmt: skip

    def _ensure(self) -> None:
        if not self._fresh:
            self.refresh()

    def _locate(self, run: str, tag: str, step: int) -> tuple[FileIndex, Record, int]:
        with self._lock:
            where = self._tag(run, tag).steps.get(step)
        if where is None:
            raise NotLogged(f"run {run!r} has no step {step!r} of tag {tag!r}")
        return where

    def _view(self, run: str) -> dict[str, _Tag]:
        """The run's tags, its files merged (a later file's value wins)."""
        self._ensure()
        view = self._views.get(run)
        if view is not None:
            return view
        files = self._runs.get(run)
        if files is None:
            raise NotLogged(f"no run {run!r} under {str(self.logdir)!r}")
        if len(files) == 1:
            view = files[0].tags
        else:
            view = {}
            for file in files:
                for name, tag in file.tags.items():
                    merged = view.get(name)
                    if merged is None or merged.kind != tag.kind:
                        merged = view[name] = _Tag(tag.kind, merged.plugin if merged else "")
                    merged.plugin = merged.plugin or tag.plugin
                    merged.steps.update(tag.steps)
                    merged.values.update(tag.values)
        self._views[run] = view
        return view

    # ---------------------------------------------------------------- listing
    def runs(self) -> list[str]:
        """The runs, as folders relative to the logdir (``.`` for the logdir itself), in
        the order of a walk down the logdir (a folder, then its subfolders, by name)."""
        with self._lock:
            self._ensure()
            return list(self._runs)

    def version(self, run: str) -> int:
        """A number that grows each time :meth:`refresh` finds the run changed (what is
        derived from its index can be kept until then); 0 for an unknown run."""
        with self._lock:
            return self._versions.get(run, 0)

    def tags(self, run: str) -> dict[str, TagInfo]:
        """Every tag of a run, sorted, with its kind, plugin and steps."""
        with self._lock:
            return {name: TagInfo(t.kind, t.plugin, tuple(sorted(t.steps)))
                    for name, t in sorted(self._view(run).items())}  # fmt: skip

    def steps(self, run: str, tag: str) -> list[int]:
        """The steps a run logged ``tag`` at, ascending."""
        with self._lock:
            return sorted(self._tag(run, tag).steps)

    def _tag(self, run: str, tag: str) -> _Tag:
        found = self._view(run).get(tag)
        if found is None:
            raise NotLogged(f"run {run!r} has no tag {tag!r}")
        return found

    # ---------------------------------------------------------------- values
    def value(self, run: str, tag: str, step: int) -> Any:
        """The ``Summary.Value`` logged at ``(run, tag, step)``, read from its record."""
        file, record, position = self._locate(run, tag, step)
        event = self._cache.get((file.path, file.key[:2] if file.key else None, record),
                                record.length, lambda: self._read(file, record))  # fmt: skip
        values = event.summary.value
        if position >= len(values) or values[position].tag != tag or event.step != step:
            raise NotLogged(f"event file {file.path!r} changed at byte {record.offset}")
        return values[position]

    def _read(self, file: FileIndex, record: Record) -> Any:
        event = file.read(record)
        with self._lock:
            self.bytes_read += HEAD.size + record.length + TAIL.size
        return event

    def image(self, run: str, tag: str, step: int) -> bytes:
        """The encoded picture (PNG for tbfeat's) of an image tag at a step."""
        value = self.value(run, tag, step)
        if value.WhichOneof("value") != "image":
            raise NotLogged(f"tag {tag!r} of run {run!r} is not an image")
        return value.image.encoded_image_string

    def scalar(self, run: str, tag: str, step: int) -> float:
        """The value of a scalar tag at a step (kept in the index: nothing is read)."""
        with self._lock:
            found = self._tag(run, tag)
            if found.kind != "scalar":
                raise NotLogged(f"tag {tag!r} of run {run!r} is not a scalar")
            if step not in found.values:
                raise NotLogged(f"run {run!r} has no step {step!r} of tag {tag!r}")
            return found.values[step]

    def scalars(self, run: str, tag: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a scalar tag, by step (from the index: nothing is read)."""
        with self._lock:
            found = self._tag(run, tag)
            if found.kind != "scalar":
                raise NotLogged(f"tag {tag!r} of run {run!r} is not a scalar")
            return sorted(found.values.items())

    def run_info(self, run: str, step: int | None = None) -> tagging.RunInfo | None:
        """The run's metadata (:class:`tbfeat.tags.RunInfo`) as logged last at or before
        ``step`` (the last logged without one); ``None`` where none was."""
        with self._lock:
            found = self._view(run).get(tagging.RUN)
            logged = list(found.steps) if found is not None else []
        steps = [s for s in logged if step is None or s <= step]
        if not steps:
            return None
        return tagging.read_run(self.value(run, tagging.RUN, max(steps)).tensor)
