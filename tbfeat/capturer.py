"""The capture side of a logger: which stages of which model are hooked, and when.

A :class:`Capturer` serves the forward thread. It hooks a model's stages for the user's
own forwards (:meth:`~Capturer.begin` ... :meth:`~Capturer.end`: a ``with`` block, a
framework's predict or validation) or runs fixed probe images through them
(:meth:`~Capturer.probe`: the EMA model at an epoch's end, a checkpoint of a sweep).
What it captures goes out as immutable messages through ``post``; it never reads what
the writer side holds. This is the protocol integrations call, through
:class:`~tbfeat.FeatureLogger`'s methods of the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from .adapters import ModelAdapter, Probes, adapt
from .cams import captured_cams, probe_cams
from .capture import CaptureSession, Post, capture_hooks_kwargs
from .hooks import StageHooks
from .images import ImageLike
from .notes import Notes
from .options import LogOptions, check_step
from .stages import Stage, StageSpec, resolve_stages


class Capturer:
    """Hooks the chosen stages of a model and posts what they produce at :attr:`step`.

    Args:
        model: The logger's model, as the user gave it.
        adapter: ``model``, adapted (:func:`tbfeat.adapters.adapt`).
        stage_spec: The ``stages=`` choice, applied to every model hooked.
        options: What to capture.
        post: Where messages go (:meth:`tbfeat.run.Run.post`).
        drain: Waits until what was posted is written (:meth:`tbfeat.run.Run.drain`).
        step: The first step.
        preprocess: The ``preprocess=`` of plain modules, applied by :meth:`prepare`.
    """

    def __init__(
        self,
        model: Any,
        adapter: ModelAdapter,
        stage_spec: StageSpec | Iterable[StageSpec] | None,
        options: LogOptions,
        post: Post,
        drain: Callable[[], Any],
        step: int = 0,
        preprocess: Callable[[Any], Any] | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.stage_spec = stage_spec
        self.options = options
        self.preprocess = preprocess
        self._post = post
        self._drain = drain
        self._step = check_step(step)
        self._resolved: tuple[nn.Module, list[Stage]] | None = None
        self._session: CaptureSession | None = None
        self._handles: list[Any] = []
        self._notes = Notes()

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = check_step(value)
        if self._session is not None:
            self._session.set_step(self._step)

    @property
    def stages(self) -> list[Stage]:
        """The stages of the adapter's current model (an Ultralytics ``YOLO`` object
        swaps in its trained model after ``train()``), resolved once per model."""
        module = self.adapter.module
        if self._resolved is None or self._resolved[0] is not module:
            self._resolved = (module, self._resolve(self.adapter))
        return self._resolved[1]

    def resolve(self, module: nn.Module) -> list[Stage]:
        """The ``stages=`` choice applied to ``module`` (a copy of the model, say)."""
        if module is self.adapter.module:
            return self.stages
        return self._resolve(self.adapter_for(module))

    def _resolve(self, adapter: ModelAdapter) -> list[Stage]:
        return resolve_stages(
            adapter.module, adapter.candidate_stages(), self.stage_spec, adapter.default_stages()
        )

    def adapter_for(self, model: Any) -> ModelAdapter:
        """The logger's adapter for its own model; a new one for another."""
        if model is None or model is self.model or model is self.adapter.module:
            return self.adapter
        return adapt(model)

    # ------------------------------------------------------------------ probes
    def prepare(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        model: Any = None,
        names: Sequence[str] | None = None,
        imgsz: int | None = None,
    ) -> Probes:
        """Check and convert probe images for :meth:`probe`, before anything is hooked."""
        adapter = self.adapter_for(model)
        return adapter.prepare(
            images, names, imgsz=imgsz or self.options.imgsz, preprocess=self.preprocess
        )

    def probe(self, probes: Probes, *, model: Any = None, step: int | None = None) -> Any:
        """Run ``probes`` through ``model``'s hooked stages, log them at ``step``, and end
        the step: the integration API for fixed probes (the EMA model at an epoch's end, a
        checkpoint of a sweep).

        Eval mode and ``torch.no_grad()`` for the forward; every module's train/eval mode
        is restored and the hooks are removed afterwards, also when the forward raises.
        Probes of one model, by any logger on any thread, run one at a time; a probe's
        forward is recorded by this probe only, not by captures begun with :meth:`begin`
        (this logger's or another's ``with`` block). With ``cam`` set, the class
        activation maps of the probe images follow (:func:`tbfeat.cams.probe_cams`).
        """
        step = self._step if step is None else check_step(step)
        adapter = self.adapter_for(model)
        stages = self.resolve(adapter.module)
        self.end_step()
        session = self._session_at(step, track=True, names=probes.names)
        try:
            hooks = capture_hooks_kwargs(session, self._notes)
            out = adapter.run_probe(probes, stages, **hooks)
            if self.options.cam is not None:
                found = probe_cams(
                    adapter, probes.inputs, session.names, stages, step, self.options,
                    self._notes, output=out,
                )  # fmt: skip
                if found is not None:
                    self._post(*found)
        except BaseException:  # a forward that raised, Ctrl-C: no half step is written
            session.end_step(complete=False)
            raise
        session.end_step()
        return out

    # ------------------------------------------------------------------ captures
    def begin(
        self,
        module: nn.Module | None = None,
        *,
        gate: Callable[[], bool] | None = None,
        names: Iterable[str] = (),
    ) -> CaptureSession:
        """Capture the forwards of ``module`` (default the model) until :meth:`end`: the
        integration API for the user's own forwards (predict, validation). Another copy of
        the model (a predictor's or validator's) is hooked by the same stage choice; forwards
        are captured only while ``gate()`` returns True; ``names`` name the first images.
        Any capture begun before ends first."""
        self.end()
        module = self.adapter.module if module is None else module
        stages = self.resolve(module)
        session = self._session_at(self._step, names=names)
        hooks = StageHooks(
            stages, root=module, gate=gate, **capture_hooks_kwargs(session, self._notes)
        )
        hooks.install()
        self._session, self._handles = session, [hooks]
        if self.options.cam is not None and self.options.cam_captures:
            hook = captured_cams(
                self.adapter_for(module), stages, session, hooks.active, self._post, self._notes
            )
            self._handles.append(module.register_forward_hook(hook))
        return session

    def end(self) -> None:
        """End the capture begun by :meth:`begin`: remove its hooks, end its step. Safe
        to call twice."""
        handles, session = self._handles, self._session
        self._handles, self._session = [], None
        try:
            for handle in reversed(handles):
                handle.remove()
        finally:
            if session is not None:
                session.end_step()

    def end_step(self) -> None:
        """End the step of the capture in progress, if any (it goes on at the next)."""
        if self._session is not None:
            self._session.end_step()

    def _session_at(self, step: int, **kwargs: Any) -> CaptureSession:
        return CaptureSession(
            self._post, self.options, step, note=self._notes, drain=self._drain, **kwargs
        )
