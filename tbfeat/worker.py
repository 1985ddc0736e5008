"""One background thread that hands messages, in order, to the one object that owns them.

The thread is started on the first message, runs at low priority (it uses the CPU time
the training leaves idle), and stops when asked or at interpreter exit, after draining.
Memory is bounded by bytes in flight: :meth:`Worker.post` waits for room while the copies
already queued exceed ``max_bytes`` (a single larger message waits until the queue is
empty), and gives up after ``wait_s`` rather than hang the training. Nothing posted is
ever handled on the posting thread.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from .notes import Notes

MAX_INFLIGHT_BYTES = 256 * 2**20
"""Bytes of stage copies that may wait for the worker before a forward waits for room."""
WAIT_S = 60.0
"""How long a post waits for room, and :meth:`Worker.stop` for the drain, before giving up."""

_STOP = object()
_WORKERS: weakref.WeakSet[Worker] = weakref.WeakSet()


@atexit.register
def _drain_all() -> None:
    for worker in list(_WORKERS):
        worker.stop()


class _Call:
    """A function to run on the worker thread, whose result the poster waits for."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed back to the caller
            self.error = e
        finally:
            self.done.set()


class Worker:
    """Runs ``handler(message)`` on one background thread for every posted message.

    Args:
        handler: Called on the worker thread only, once per message, in posting order.
            An exception it raises is reported once as a warning; the thread goes on.
        max_bytes: In-flight budget of :meth:`post` (default :data:`MAX_INFLIGHT_BYTES`).
        name: The thread's name.

    Example:
        >>> from tbfeat.worker import Worker
        >>> seen = []
        >>> w = Worker(seen.append)
        >>> w.post("a"), w.join(), seen
        (True, True, ['a'])
        >>> w.stop()
        True
    """

    def __init__(
        self,
        handler: Callable[[Any], None],
        *,
        max_bytes: int | None = None,
        name: str = "tbfeat-writer",
    ) -> None:
        self._handler = handler
        self.max_bytes = MAX_INFLIGHT_BYTES if max_bytes is None else max_bytes
        self.name = name
        self._cond = threading.Condition()
        self._queue: deque[tuple[Any, int]] = deque()
        self._inflight = 0
        self._unfinished = 0
        self._thread: threading.Thread | None = None
        self._notes = Notes()

    @property
    def on_worker_thread(self) -> bool:
        thread = self._thread
        return thread is not None and threading.get_ident() == thread.ident

    # ------------------------------------------------------------------ posting
    def post(self, message: Any, nbytes: int = 0, wait_s: float | None = None) -> bool:
        """Queue ``message`` for the handler; wait while ``nbytes`` do not fit the budget
        (at most ``wait_s``, default :data:`WAIT_S`).

        Returns:
            True when queued; False when no room was made within ``wait_s`` (the
            message is dropped) or when called from the worker thread itself.
        """
        if self.on_worker_thread:
            return False
        deadline = time.monotonic() + (WAIT_S if wait_s is None else wait_s)
        with self._cond:
            self._ensure_thread()
            while self._inflight and self._inflight + nbytes > self.max_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._alive():
                    return False
                self._cond.wait(min(remaining, 1.0))
            self._queue.append((message, nbytes))
            self._inflight += nbytes
            self._unfinished += 1
            self._cond.notify_all()
        return True

    def call(self, fn: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        """Run ``fn()`` on the worker thread after everything posted; return its result."""
        if self.on_worker_thread:
            return fn()
        call = _Call(fn)
        if not self.post(call) or not call.done.wait(timeout):
            raise TimeoutError(f"the {self.name} thread did not answer within {timeout:.0f} s")
        if call.error is not None:
            raise call.error
        return call.result

    def join(self, timeout: float | None = WAIT_S) -> bool:
        """Block until every posted message is handled; False on a timeout."""
        if self.on_worker_thread:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._unfinished:
                if not self._alive():
                    self._discard("its thread ended")
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))
        return True

    def stop(self, timeout: float = WAIT_S) -> bool:
        """Handle everything posted, then end the thread. Safe to call twice; a later
        :meth:`post` starts a new thread."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self.on_worker_thread:
            return True
        with self._cond:
            self._queue.append((_STOP, 0))
            self._unfinished += 1
            self._cond.notify_all()
        thread.join(timeout)
        if thread.is_alive():
            self._warn("stop", f"the {self.name} thread did not finish within {timeout:.0f} s")
            return False
        _WORKERS.discard(self)
        return True

    # ------------------------------------------------------------------ the thread
    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _ensure_thread(self) -> None:
        if not self._alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
            _WORKERS.add(self)

    def _run(self) -> None:
        # yield the CPU to the training thread; use what it leaves idle (Linux; elsewhere,
        # or when not permitted, the thread keeps its priority)
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                message, nbytes = self._queue.popleft()
            try:
                if message is _STOP:
                    return
                if isinstance(message, _Call):
                    message.run()
                else:
                    self._handler(message)
            except Exception as e:  # never let a message kill the thread or the training
                self._warn(type(e).__name__, f"{type(e).__name__}: {e}")
            finally:
                message = None  # hold nothing (a copy of a stage output) while waiting
                with self._cond:
                    self._inflight -= nbytes
                    self._unfinished -= 1
                    self._cond.notify_all()

    def _discard(self, why: str) -> None:
        dropped = len(self._queue)
        self._queue.clear()
        self._inflight = self._unfinished = 0
        self._cond.notify_all()
        if dropped:
            self._warn("discard", f"{dropped} messages were not written: {why}")

    def _warn(self, key: str, message: str) -> None:
        self._notes(key, message, warn=True)
