"""The run: where one logger's events go, and the one owner of everything that writes them.

A :class:`Run` owns the logdir, the user's ``writer=``, the ``SummaryWriter`` it makes
for the user's own events, and the pipeline that writes captures: one
:class:`~tbfeat.worker.Worker` thread handing messages to one
:class:`~tbfeat.recorder.Recorder`, which writes finished steps through an
:class:`~tbfeat.writer.EventSink`. The pipeline is created on the first message. Nothing
outside the run touches the worker, the recorder or the sink; the forward side only
posts immutable messages (:mod:`tbfeat.capture`), from any thread.
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from .capture import Scalars, SetLogdir
from .notes import Notes
from .options import LogOptions
from .recorder import RUN_MODES, Recorder
from .worker import WAIT_S, Worker
from .writer import EventSink, check_destination, check_logdir, writer_logdir


class Run:
    """One logger's run: its folder, its writers and its writer thread.

    Args:
        logdir: The run folder; ``None`` with no ``writer`` gives ``runs/<date>_<host>``
            on first use, or the folder an integration passes to :meth:`use_logdir`.
        writer: A ``SummaryWriter`` to write to instead; flushed, never closed.
        options: What the recorder summarizes and draws.
        mode: What the first step does to a folder that holds a run already
            (:data:`~tbfeat.recorder.RUN_MODES`).

    Example:
        >>> import tempfile
        >>> from tbfeat.capture import Scalars
        >>> from tbfeat.options import LogOptions
        >>> from tbfeat.run import Run
        >>> run = Run(tempfile.mkdtemp(), options=LogOptions())
        >>> run.post(Scalars(step=3, values=(("loss", 0.5),)))
        True
        >>> run.flush(), run.flushed_step
        (True, 3)
        >>> run.close()
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None = None,
        writer: Any = None,
        *,
        options: LogOptions,
        mode: str = "auto",
    ) -> None:
        if mode not in RUN_MODES:
            raise ValueError(f"run must be one of {', '.join(map(repr, RUN_MODES))}, got {mode!r}")
        check_destination(logdir, writer)
        self._logdir = os.fspath(logdir) if logdir is not None else None
        self._given = writer
        self.auto = writer is None and logdir is None
        """True while no folder was chosen: an integration's :meth:`use_logdir` may."""
        self.options = options
        self.mode = mode
        self._lock = threading.Lock()
        self._worker: Worker | None = None
        self._recorder: Recorder | None = None
        self._finalizer: weakref.finalize | None = None
        self._user_writer: Any = None
        self._notes = Notes()

    @property
    def logdir(self) -> str | None:
        """The run folder: the logdir chosen, else the given writer's folder if it says."""
        if self._logdir is None and self._given is not None:
            return writer_logdir(self._given)
        return self._logdir

    @property
    def flushed_step(self) -> int | None:
        """The last step whose events are on disk (written and flushed by the thread)."""
        recorder = self._recorder
        return recorder.sink.flushed_step if recorder is not None else None

    # ------------------------------------------------------------------ posting
    def post(self, message: Any, nbytes: int = 0) -> bool:
        """Hand ``message`` to the recorder (see :meth:`tbfeat.worker.Worker.post`)."""
        return self._pipeline().post(message, nbytes)

    def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """``{tag: value}`` scalars at ``step`` as one event."""
        items = tuple((str(k), float(v)) for k, v in values.items())
        if items:
            self.post(Scalars(step, items))

    def drain(self) -> None:
        """Wait until everything posted so far is written."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def flush(self) -> bool:
        """Block until everything posted is on disk; False (said once) on a timeout."""
        worker = self._worker
        if worker is None or worker.join():
            return True
        self._notes(
            "flush-timeout",
            f"the writer thread did not finish writing within {WAIT_S:.0f} s; "
            "flush() returned without waiting longer",
            warn=True,
        )
        return False

    # ------------------------------------------------------------------ folders
    def use_logdir(
        self, logdir: str | os.PathLike, before: Callable[[], Any] | None = None
    ) -> bool:
        """Write later steps into ``logdir`` when no folder was chosen (an integration's
        run folder); ``before`` runs first (ending the step in progress). False, doing
        nothing, when a folder was chosen or ``logdir`` is the current one."""
        logdir = os.fspath(logdir)
        if not self.auto or logdir == self._logdir:
            return False
        check_logdir(logdir)
        if before is not None:
            before()
        with self._lock:
            self._logdir = logdir
            worker = self._worker
        self._close_user_writer()  # the user's events follow the run to its new folder
        if worker is not None:
            worker.post(SetLogdir(logdir))
        return True

    def summary_writer(self) -> Any:
        """A ``SummaryWriter`` for the user's own events: the ``writer=`` given, else one
        writing its own file in the run folder (made now if not yet; closed by
        :meth:`close`)."""
        if self._given is not None:
            return self._given
        with self._lock:
            if self._user_writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._user_writer = SummaryWriter(log_dir=self._folder())
            return self._user_writer

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Write what is pending, stop the thread, close what the run created. Safe to
        call twice."""
        with self._lock:
            finalizer = self._finalizer
        if finalizer is not None:
            finalizer()
        self._close_user_writer()

    def _pipeline(self) -> Worker:
        """The writer thread and the recorder behind it, created on first use."""
        with self._lock:
            if self._worker is None:
                sink = EventSink(self._folder() if self._given is None else None, self._given)
                if not self.auto and self._given is None:
                    sink.claim()  # a folder another logger writes to fails here, on the caller
                recorder = Recorder(sink, self.options, self.mode)
                worker = Worker(recorder.handle)
                # a run dropped without close() still drains and closes what it created
                self._finalizer = weakref.finalize(self, _shutdown, worker, recorder)
                self._recorder, self._worker = recorder, worker
            return self._worker

    def _folder(self) -> str:
        """The logdir, choosing ``runs/<date>_<host>`` the first time none was given."""
        if self._logdir is None:
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            self._logdir = os.path.join("runs", f"{stamp}_{socket.gethostname()}")
        return self._logdir

    def _close_user_writer(self) -> None:
        with self._lock:
            writer, self._user_writer = self._user_writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001 - a storage fault never ends the training
            e.__traceback__ = None
            self._notes(
                "close-writer", f"closing the writer of {self._logdir!r} failed: {e}", warn=True
            )


def _shutdown(worker: Worker, recorder: Recorder) -> None:
    """Write what is pending, stop the thread, close the sink (once, from any thread).

    Once the worker thread has ended, the recorder has no other user: closing it here
    keeps the one-owner rule and starts no thread (also at interpreter exit).
    """
    if worker.stop():
        recorder.close()
