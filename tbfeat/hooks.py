"""Hook lifetime: forward hooks on a model's stages, and the train/eval mode of a probe.

:class:`StageHooks` follows PyTorch's ``RemovableHandle`` and Lightning's ``LayerSummary``:
it keeps every handle it registers and removes them all on exit, also when the forward
raises; removing twice is safe. It knows nothing about logging: each stage output goes to
a callback, which never sees an exception escape into the model's forward.
:func:`eval_mode` is the one helper that puts a model in eval mode for a probe and gives
every module back the mode it had.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .stages import Stage

OutputCallback = Callable[[Stage, Any], None]
"""``(stage, output)``: called with each hooked stage's forward output."""


class StageHooks:
    """Forward hooks on ``stages`` that pass each output to ``on_output``.

    Args:
        stages: The stages to hook.
        on_output: Called as ``on_output(stage, output)`` after a stage's forward.
            Exceptions it raises are passed to ``on_error`` and never reach the forward.
        root: The module whose call counts as one forward (a forward pre-hook on it
            calls ``on_forward``); ``None`` for none.
        on_forward: Called before each forward of ``root``.
        on_error: Called as ``on_error(stage, exception)`` when ``on_output`` raises.
        gate: A predicate; while it returns False the hooks pass nothing on (an
            integration's warm-up forwards, say).

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
    ) -> None:
        self.stages = list(stages)
        self.root = root
        self._on_output = on_output
        self._on_forward = on_forward
        self._on_error = on_error
        self._gate = gate
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.paused = False
        """While True, the hooks stay registered but pass nothing on."""

    def install(self) -> StageHooks:
        """Register the hooks (again, after :meth:`remove`); a no-op when installed."""
        if self._handles:
            return self
        try:
            if self.root is not None and self._on_forward is not None:
                self._handles.append(self.root.register_forward_pre_hook(self._pre_hook))
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

    def _open(self) -> bool:
        if self.paused:
            return False
        try:
            return self._gate is None or bool(self._gate())
        except Exception:  # a broken gate closes the hooks; it never breaks the forward
            return False

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if self._open():
            self._on_forward()

    def _hook(self, stage: Stage, module: nn.Module, args: Any, output: Any) -> None:
        if not self._open():
            return
        try:
            self._on_output(stage, output)
        except Exception as e:  # a stage that fails to log must never break the forward
            if self._on_error is not None:
                self._on_error(stage, e)


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
