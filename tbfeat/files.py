"""Every file tbfeat writes is created new, never opened through a link.

A file that replaces another (the drift history, the sweep manifest, a trimmed event
file, an exported figure) is written whole by :func:`atomic_write`: into a temporary file
of a fresh random name in the same folder, created with ``O_CREAT | O_EXCL | O_NOFOLLOW``
(an existing file or a link there makes the name fail and another is drawn), then renamed
over the target. A link at the target is replaced by the file, so what it points to is
never written. A file that is only ever appended to (an event file) is created with
:func:`create_new`.

One logger writes to a run folder at a time: :class:`FolderLock` holds an advisory lock
(``fcntl.flock``) on :data:`LOCK_FILE` in the folder while a logger writes there, and
writes the holder's pid and host into it; the holder removes the file as it lets go. The
loggers of one process share the lock, and the processes it starts (DDP ranks) write
beside it. The system releases the lock when the holder ends (a crash or a kill too),
so a lock file left behind is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

NEW_FILE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)  # fmt: skip
"""How a new file is opened: created now, or an error (never an existing file or a link)."""
TEMP_TRIES = 100


READ_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)  # fmt: skip
"""How a file tbfeat reads back is opened: never through a link, never waiting on a FIFO."""


class NotRegularFile(OSError):
    """A path that is not a regular file: a link, a folder, a FIFO, a socket."""


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path`` if it is a regular file.

    Never follows a link in the last part of the path and never blocks on a FIFO.

    Raises:
        FileNotFoundError: nothing is there.
        NotRegularFile: a link, folder, FIFO or socket is there.
    """
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a link, not a regular file", str(path)) from None
        raise
    return _regular(fd, path)


def _regular(fd: int, path: str | os.PathLike) -> int:
    """``fd`` if it is a regular file's; else it is closed and :class:`NotRegularFile`
    raised (a folder, FIFO or socket opened without following a link)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    return fd


def create_new(path: str | os.PathLike, mode: int = 0o666) -> int:
    """Create ``path`` for writing and return its descriptor; ``mode`` is narrowed by the
    umask, as for ``open()``.

    Raises:
        FileExistsError: something (a file, a link, even a dangling one) is there.
    """
    return os.open(path, NEW_FILE_FLAGS, mode)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], object], durable: bool = True
) -> None:
    """Write ``path`` whole or not at all: ``write(f)`` fills a new temporary file in the
    same folder (binary), which then replaces ``path``.

    The new file gets the mode (and, where permitted, the owner) of the regular file it
    replaces, else the umask's default. With ``durable``, its data and then the folder's
    entry are synced to disk before this returns. On any error the temporary file is
    removed and ``path`` is as it was.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from tbfeat.files import atomic_write
        >>> path = Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write(path, lambda f: f.write(b"hello"))
        >>> path.read_bytes()
        b'hello'
    """
    path = Path(path)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _copy_owner_and_mode(path, f.fileno())
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        sync_folder(path.parent)


def _new_temp(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, open for writing."""
    for _ in range(TEMP_TRIES):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return create_new(tmp), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")


def _copy_owner_and_mode(path: Path, fd: int) -> None:
    """Give the new file the mode and owner of the regular file at ``path``, if any."""
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(old.st_mode):  # a link (or else) is replaced, not copied
        return
    if hasattr(os, "fchown"):
        with contextlib.suppress(OSError):  # another owner: only root may give it
            os.fchown(fd, old.st_uid, old.st_gid)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(old.st_mode))


def sync_folder(folder: Path) -> None:
    """Sync a folder's entries (a rename) to disk, where the system allows it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ one writer per folder
LOCK_FILE = "tbfeat.lock"
"""The lock file of a run folder (see :class:`FolderLock`)."""
LOCK_WAIT_S = 1.0
"""How long taking a folder's lock waits for another holder before it fails."""
HOLDER_BYTES = 256
"""The most of a lock file read to name its holder."""

try:
    import fcntl
except ImportError:  # not on Windows: no lock there, as before
    fcntl = None  # type: ignore[assignment]


class FolderInUse(OSError):
    """A run folder whose lock another process holds."""


class _Held:
    """This process's lock of one folder, shared by its loggers there."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pid, self.users = fd, os.getpid(), 1


_HELD: dict[str, _Held] = {}
"""The folders whose locks this process holds, by real path."""
_HELD_LOCK = threading.Lock()


def _forget_locks() -> None:
    """In a forked process: the parent's locks are not held here."""
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)


class FolderLock:
    """A logger's share of the advisory lock of one run folder, held while it writes there.

    :meth:`acquire` creates :data:`LOCK_FILE` new (:func:`create_new`) or opens the one
    there (never through a link, never a FIFO), locks it with ``fcntl.flock`` and writes
    ``pid <pid> host <host> since <time>`` into it; the last :meth:`release` removes it.
    The loggers of one process share the lock (one after another, they continue one
    run), and a process the holder started (a DDP rank, a process handed the logger),
    which the holder waits for, writes beside it. Any other process gets
    :class:`FolderInUse` naming the holder. In a process forked from the holder the lock
    is :attr:`inherited`: not held there, and :meth:`release` leaves the parent's lock.

    Example:
        >>> import tempfile
        >>> from tbfeat.files import FolderLock
        >>> lock = FolderLock(tempfile.mkdtemp())
        >>> lock.acquire()
        >>> lock.held
        True
        >>> lock.release(); lock.release()  # safe twice
        >>> lock.held
        False
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._held: _Held | None = None
        self._beside = False
        """True while this process writes beside the holder that started it."""

    @property
    def held(self) -> bool:
        """True while this process holds the lock through this object."""
        return self._held is not None and self._held.pid == os.getpid()

    @property
    def inherited(self) -> bool:
        """True in a process forked from the one holding the lock."""
        return self._held is not None and self._held.pid != os.getpid()

    def acquire(self, wait_s: float = LOCK_WAIT_S) -> None:
        """Take the lock, or this process's share of it (nothing to do while held),
        waiting at most ``wait_s`` for another holder.

        Raises:
            FolderInUse: another process holds it, one this process was not started by;
                the message names its pid and host.
            NotRegularFile: a link, folder or FIFO is where the lock file belongs.
        """
        if self._beside or (self.held and os.fstat(self._held.fd).st_nlink):  # type: ignore[union-attr]
            return
        self.release()  # a lock file removed with its folder: take the new one
        if fcntl is None:
            return
        key = os.path.realpath(self.folder)
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is not None and held.pid == os.getpid() and os.fstat(held.fd).st_nlink:
                held.users += 1
            else:
                fd = _lock_new(self.folder / LOCK_FILE, self.folder, wait_s)
                if fd is None:
                    self._beside = True  # the holder started this process
                    return
                held = _HELD[key] = _Held(fd)
            self._held = held

    def release(self) -> None:
        """Let go of this share; the last one releases the lock and removes its file.
        Safe to call twice, never raises. In a forked process nothing is released: the
        parent keeps its lock."""
        held, self._held, self._beside = self._held, None, False
        if held is None or held.pid != os.getpid():
            return
        with _HELD_LOCK:
            held.users -= 1
            if held.users:
                return
            key = os.path.realpath(self.folder)
            if _HELD.get(key) is held:
                del _HELD[key]
            path = self.folder / LOCK_FILE
            with contextlib.suppress(OSError):
                if _same_file(held.fd, path):  # a waiting process then locks a new file
                    os.unlink(path)
            with contextlib.suppress(OSError):
                fcntl.flock(held.fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(held.fd)


def check_folder_free(folder: str | os.PathLike) -> None:
    """Fail when a process holds the lock of ``folder`` that may not write beside this
    one (see :class:`FolderLock`); a probe: nothing is held after it, nothing is created.

    Raises:
        FolderInUse: the folder is locked; the message names the holder.
        NotRegularFile: the lock file is a link, a folder or a FIFO.
    """
    path = Path(folder) / LOCK_FILE
    if fcntl is None or not os.path.lexists(path):
        return
    with _HELD_LOCK:
        held = _HELD.get(os.path.realpath(folder))
        if held is not None and held.pid == os.getpid():
            return
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not _started_by(holder):
                raise _in_use(Path(folder), holder) from None
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_new(path: Path, folder: Path, wait_s: float) -> int | None:
    """The locked descriptor of the folder's lock file, its holder written in; ``None``
    when the holder started this process."""
    for _ in range(TEMP_TRIES):
        fd = _open_lock_file(path)
        try:
            locked = _lock(fd, wait_s)
            if not locked:
                holder = _holder(fd)
                if _started_by(holder):
                    os.close(fd)
                    return None
                raise _in_use(folder, holder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if _same_file(fd, path):
            holder = f"pid {os.getpid()} host {socket.gethostname()} since {time.ctime()}\n"
            with contextlib.suppress(OSError):  # read-only (another owner's file): unnamed
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
            return fd
        os.close(fd)  # removed by the holder as it let go: lock the new one
    raise FileExistsError(errno.EEXIST, "the lock file keeps changing", str(path))


def _open_lock_file(path: Path) -> int:
    """A descriptor of the folder's lock file: created new, or the regular file there
    (read-write, else read-only), never through a link or a FIFO."""
    flags = os.O_RDWR | READ_FLAGS  # O_RDONLY is 0: read-write, no link, no FIFO wait
    for _ in range(TEMP_TRIES):
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            try:  # read-write: the holder is read back from the same descriptor
                return os.open(path, NEW_FILE_FLAGS & ~os.O_WRONLY | os.O_RDWR, 0o666)
            except FileExistsError:
                continue  # another process made it meanwhile: open that one
        except PermissionError:
            return open_regular(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise NotRegularFile(errno.ELOOP, "a link, not a lock file", str(path)) from None
            raise
        return _regular(fd, path)
    raise FileExistsError(errno.EEXIST, "the lock file keeps changing", str(path))


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file at ``path`` (not one removed from there)."""
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino)


def _lock(fd: int, wait_s: float) -> bool:
    """``flock`` ``fd`` exclusively, trying for at most ``wait_s``; False if it stayed
    held."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _holder(fd: int) -> str:
    """The holder a lock file names (one printable line), or ``""``."""
    try:
        raw = os.pread(fd, HOLDER_BYTES, 0).decode("utf-8", "replace")
    except OSError:
        return ""
    return " ".join("".join(c if c.isprintable() else " " for c in raw).split())


def _started_by(holder: str) -> bool:
    """Whether the holder a lock file names started this process (on this host)."""
    words = holder.split()
    if len(words) < 4 or words[0] != "pid" or words[2] != "host" or not words[1].isdigit():
        return False
    return words[3] == socket.gethostname() and int(words[1]) in _ancestors()


def _ancestors() -> set[int]:
    """The pids of the processes that started this one (its parent, theirs, ...)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found and len(found) < 64:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break  # no /proc (not Linux): the parent only
    return found


def _in_use(folder: Path, holder: str) -> FolderInUse:
    return FolderInUse(
        f"run folder {str(folder)!r} is being written by another process "
        f"({holder or 'holder unknown'}); one process writes to a run folder at a time: "
        "close its logger (or let it end), or choose another folder"
    )


def not_regular(path: str | os.PathLike, root: str | None = None) -> str | None:
    """Why ``path`` is no regular file to open (``None``: it is one), in a few words: a
    folder, a FIFO, a socket, a broken link, or (with ``root``) a link out of ``root``.

    Example:
        >>> import tempfile
        >>> not_regular(tempfile.mkdtemp())
        'a folder'
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        return e.strerror or type(e).__name__
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if root is not None and os.path.commonpath([root, target]) != root:
            return "a link out of the logdir"
        try:
            st = os.stat(target)
        except OSError:
            return "a broken link"
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(st.st_mode):
            return what
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"
