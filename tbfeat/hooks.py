"""Hook lifetime: forward hooks on a model's stages, and the train/eval mode of a probe.

:class:`StageHooks` follows PyTorch's ``RemovableHandle`` and Lightning's ``LayerSummary``:
it keeps every handle it registers and removes them all on exit, also when the forward
raises; removing twice is safe. It knows nothing about logging: each stage output goes to
a callback, which never sees an exception escape into the model's forward. A stage whose
token grid follows the input's size (:attr:`tbfeat.tokens.TokenLayout.stride`) reaches the
callback with the layout of the input its root saw in this forward.
:func:`eval_mode` is the one helper that puts a model in eval mode for a probe and gives
every module back the mode it had; :func:`probing` wraps it for a probe: it holds the
model's probe lock, so two threads never switch one model's modes at once, and marks the
forwards in the block as the probe's own, so no other hooks on the model record them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .stages import Stage

OutputCallback = Callable[[Stage, Any], None]
"""``(stage, output)``: called with each hooked stage's forward output."""

_PROBE: contextvars.ContextVar[object | None] = contextvars.ContextVar("tbfeat_probe", default=None)
"""The probe running on this thread: the hooks that own its forwards (or a bare token)."""
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class StageHooks:
    """Forward hooks on ``stages`` that pass each output to ``on_output``.

    Args:
        stages: The stages to hook.
        on_output: Called as ``on_output(stage, output)`` after a stage's forward.
            Exceptions it raises are passed to ``on_error`` and never reach the forward.
        root: The module whose call counts as one forward (a forward pre-hook on it
            calls ``on_forward`` and reads the input's size, which gives the grid of token
            stages with a stride); ``None`` for none.
        on_forward: Called before each forward of ``root``.
        on_error: Called as ``on_error(stage, exception)`` when ``on_output`` raises.
        gate: A predicate; while it returns False the hooks pass nothing on (an
            integration's warm-up forwards, say).
        exclusive: Pass on only the forwards of this hooks' own :func:`probing` block
            (probe hooks). Hooks that are not exclusive pass on every forward except
            those of another probe.

    Example:
        >>> import torch
        >>> from tbfeat.hooks import StageHooks
        >>> from tbfeat.stages import generic_stages
        >>> model = torch.nn.Sequential(torch.nn.ReLU())
        >>> seen = []
        >>> with StageHooks(generic_stages(model), lambda s, out: seen.append(s.key)):
        ...     _ = model(torch.zeros(1))
        >>> seen, len(model[0]._forward_hooks)
        (['00_ReLU'], 0)
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        on_output: OutputCallback,
        *,
        root: nn.Module | None = None,
        on_forward: Callable[[], None] | None = None,
        on_error: Callable[[Stage, Exception], None] | None = None,
        gate: Callable[[], bool] | None = None,
        exclusive: bool = False,
    ) -> None:
        self.stages = list(stages)
        self.exclusive = exclusive
        self.root = root
        self._on_output = on_output
        self._on_forward = on_forward
        self._on_error = on_error
        self._gate = gate
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._strided = any(s.tokens is not None and s.tokens.stride for s in self.stages)
        self._input = threading.local()  # per thread: the (rows, columns) the root saw

    def install(self) -> StageHooks:
        """Register the hooks (again, after :meth:`remove`); a no-op when installed."""
        if self._handles:
            return self
        try:
            if self.root is not None and (self._on_forward is not None or self._strided):
                self._handles.append(
                    self.root.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
            if self.root is not None and self._strided:  # the size holds for one forward
                self._handles.append(
                    self.root.register_forward_hook(self._forget_size, always_call=True)
                )
            for stage in self.stages:
                hook = functools.partial(self._hook, stage)
                self._handles.append(stage.module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook registered. Safe to call twice."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> StageHooks:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def active(self) -> bool:
        """Whether the forward running now is one these hooks pass on (their gate is
        open, and it is not another probe's)."""
        return self._open()

    def _open(self) -> bool:
        probe = _PROBE.get()
        if probe is not self and (probe is not None or self.exclusive):
            return False  # another probe's forward, or (for probe hooks) not our probe's
        try:
            return self._gate is None or bool(self._gate())
        except Exception:  # a broken gate closes the hooks; it never breaks the forward
            return False

    def _pre_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not self._open():
            return
        if self._strided:
            self._input.size = _image_size(args, kwargs)
        if self._on_forward is not None:
            self._on_forward()

    def _forget_size(self, module: nn.Module, args: Any, output: Any) -> None:
        self._input.size = None  # a stage run outside the root's forward sees no size

    def _hook(self, stage: Stage, module: nn.Module, args: Any, output: Any) -> None:
        if not self._open():
            return
        try:
            size = getattr(self._input, "size", None)
            if size is not None and stage.tokens is not None and stage.tokens.stride:
                stage = replace(stage, tokens=stage.tokens.at(size))
            self._on_output(stage, output)
        except Exception as e:  # a stage that fails to log must never break the forward
            if self._on_error is not None:
                self._on_error(stage, e)


def _image_size(args: Any, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """``(rows, columns)`` of a forward's input: its first ``(N, C, H, W)`` tensor."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return int(value.shape[-2]), int(value.shape[-1])
    return None


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``torch.no_grad()`` for the block; afterwards every submodule has
    the train/eval mode it had (a frozen BatchNorm inside a training model stays frozen).

    Unlike ``module.eval()`` this calls no overridden ``train()``/``eval()`` method
    (Ultralytics' ``Model.eval`` trains, for one).
    """
    training = [m for m in module.modules() if m.training]
    try:
        for m in training:
            m.training = False
        with torch.no_grad():
            yield module
    finally:
        for m in training:
            m.training = True


def probe_lock(module: nn.Module) -> threading.RLock:
    """The lock every probe of ``module`` holds (one per model, for every logger)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


@contextlib.contextmanager
def probing(
    module: nn.Module, hooks: StageHooks | None = None, *, owner: nn.Module | None = None
) -> Iterator[nn.Module]:
    """A probe of ``module``: :func:`eval_mode` under the probe lock of ``owner`` (default
    ``module``; the whole model when probing a part of it), with the block's forwards
    marked as the probe's own: only ``hooks`` (if given) see them.

    Example:
        >>> import torch
        >>> from tbfeat.hooks import probing
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2)).train()
        >>> with probing(model):
        ...     _ = model(torch.ones(3, 2))
        >>> model.training, model[0].num_batches_tracked.item()
        (True, 0)
    """
    with probe_lock(module if owner is None else owner):
        token = _PROBE.set(hooks if hooks is not None else object())
        try:
            with eval_mode(module):
                yield module
        finally:
            _PROBE.reset(token)
