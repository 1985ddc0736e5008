"""One home for what tbfeat says while it logs: never an exception, each thing once.

:func:`warn` is the one place a ``RuntimeWarning`` of tbfeat's is raised; :class:`Notes`
says each message once per key, as a warning (a problem: something was not logged) or in
the ``tbfeat`` log (a choice the user may want to know of). Every part that can fail
while logging (the capture, the worker thread, the sink, the integrations) owns one.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

PREFIX = "tbfeat: "


def warn(message: str, stacklevel: int = 2) -> None:
    """Raise tbfeat's ``RuntimeWarning``, prefixed ``tbfeat: `` (``stacklevel`` as for
    ``warnings.warn``, counted from the caller)."""
    _warning(message, stacklevel + 1)


def _text(message: str) -> str:
    return message if message.startswith(PREFIX) else PREFIX + message


def _warning(message: str, stacklevel: int) -> None:
    warnings.warn(_text(message), RuntimeWarning, stacklevel=stacklevel + 1)


class Notes:
    """Messages said once per key, from any thread.

    Example:
        >>> from tbfeat.notes import Notes
        >>> notes = Notes()
        >>> notes("skip:conv", "stage conv gives no tensor; not logged")
        True
        >>> notes("skip:conv", "said once only")
        False
        >>> import pickle
        >>> pickle.loads(pickle.dumps(notes))("skip:conv", "said already, in another process")
        False
    """

    def __init__(self, log: bool = False) -> None:
        self.log = log
        """Say warnings too in the ``tbfeat`` log (one line each, at WARNING), not as
        Python warnings: for a server, whose log is its output."""
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        """What was said, without the lock: an object that holds notes stays picklable
        (a callback sent to a DDP process)."""
        return {"said": set(self._said), "log": self.log}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(bool(state.get("log", False)))
        self._said = set(state["said"])

    def __call__(self, key: str, message: str, warn: bool = False, stacklevel: int = 2) -> bool:
        """Say ``message`` unless ``key`` was said; True when it was said now."""
        with self._lock:
            if key in self._said:
                return False
            self._said.add(key)
        if warn and self.log:
            logging.getLogger("tbfeat").warning(_text(message))
        elif warn:
            _warning(message, stacklevel + 1)
        else:
            logging.getLogger("tbfeat").info(_text(message))
        return True


class Stoppable:
    """Logging that a training's callback runs again and again, stopped for the rest of
    that training by its first error: said once, as a warning, and never raised into the
    training. :meth:`reset` when the next training begins.

    Example:
        >>> import warnings
        >>> guard = Stoppable()
        >>> with warnings.catch_warnings(record=True) as said:
        ...     warnings.simplefilter("always")
        ...     guard.attempt("at step 2", lambda: 1 / 0)
        ...     guard.attempt("at step 4", lambda: print("not run"))
        >>> guard.stopped, len(said)
        (True, 1)
        >>> print(str(said[0].message).split(": ", 1)[1])
        stopped logging feature maps of this training at step 2: ZeroDivisionError: division by zero
    """

    def __init__(self) -> None:
        self.stopped = False
        self._notes = Notes()

    def reset(self) -> None:
        self.__init__()

    def attempt(self, when: str, log: Callable[[], object]) -> None:
        """Run ``log`` unless an earlier attempt failed; a failure stops the logging."""
        if self.stopped:
            return
        try:
            log()
        except Exception as e:  # noqa: BLE001 - logging never ends the user's training
            self.stopped = True
            message = f"stopped logging feature maps of this training {when}: "
            self._notes("stopped", f"{message}{type(e).__name__}: {e}", warn=True, stacklevel=3)
