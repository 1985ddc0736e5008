"""Every file tbfeat writes is created new, never opened through a link.

A file that replaces another (the drift history, the sweep manifest, a trimmed event
file, an exported figure) is written whole by :func:`atomic_write`: into a temporary file
of a fresh random name in the same folder, created with ``O_CREAT | O_EXCL | O_NOFOLLOW``
(an existing file or a link there makes the name fail and another is drawn), then renamed
over the target. A link at the target is replaced by the file, so what it points to is
never written. A file that is only ever appended to (an event file) is created with
:func:`create_new`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
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
