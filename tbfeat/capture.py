"""The forward side of logging: stage outputs become immutable messages for the recorder.

A :class:`CaptureSession` owns the bookkeeping of one capture on the thread that runs the
forward: the step, the image names, how many images each stage has logged in the step and
which call of a shared module this is. For each stage output it posts one frozen
:class:`Capture` (a private copy of the tensor, the tag base, the image names) and, when
the step ends, one :class:`EndStep`. Nothing here touches the recorder's state: messages
go one way, to the thread that summarizes and writes them (:mod:`tbfeat.recorder`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import tags
from .images import unique_names
from .notes import Notes
from .options import LogOptions
from .stages import Stage, sanitize
from .tokens import TokenLayout, split


@dataclass(frozen=True)
class Capture:
    """One stage output of one step: what the recorder summarizes and draws."""

    step: int
    base: str
    """``<NN>_<label>[/<output>]``: the part of the tags that names the stage output."""
    x: torch.Tensor
    """A private copy of the output's first images, detached."""
    names: tuple[str, ...] = ()
    """One name per image for 4-D outputs (the tags' last part); empty otherwise."""
    track: bool = False
    """Keep drift samples and evolution cells: the same probe images come back each step."""
    images: int = 0
    """How many probe images the step has (a tracked capture's drift samples are split
    among them); 0 where not known."""
    label: str = ""
    """The stage's label (the text after ``NN_`` in its key)."""
    module_type: str = ""
    """The stage module's class name."""
    module_name: str = ""
    """The stage module's qualified name in the model."""


@dataclass(frozen=True)
class CamImages:
    """Class activation maps of one probe: what the recorder blends and draws."""

    step: int
    seen: tuple[torch.Tensor, ...]
    """Per image, ``(3, H, W)`` in [0, 1]: the input as the model saw it."""
    maps: tuple[tuple[str, tuple[torch.Tensor, ...]], ...]
    """``(stage key, one (H, W) map in [0, 1] per image)`` per stage."""
    names: tuple[str, ...]


@dataclass(frozen=True)
class EndStep:
    """Everything captured at ``step`` so far is complete: summarize and write it; or,
    ``complete=False``, the probe was interrupted: drop the step whole."""

    step: int
    complete: bool = True


@dataclass(frozen=True)
class Scalars:
    """Scalars to write at ``step`` as one event (an integration's metrics)."""

    step: int
    values: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class SetLogdir:
    """Write later steps into ``logdir`` (a framework's run folder)."""

    logdir: str


Post = Callable[[Any, int], bool]
"""``post(message, nbytes)``: hand a message to the recorder; False if it was dropped."""


class CaptureSession:
    """Bookkeeping of one capture, on the forward thread; posts messages, keeps no tensor.

    Args:
        post: Where messages go (:meth:`tbfeat.worker.Worker.post`).
        options: What to capture (``max_images``).
        step: The step captures are logged at.
        track: Probe images: keep drift samples and evolution cells.
        names: Names of the first images of the step (for ``track``, every probe image:
            their number splits the drift samples).
        note: Where to say what is skipped.
        drain: Called before the first capture of each step: waits until the steps
            before are written, so that at most one step's copies wait in memory (a
            no-op when steps are epochs apart).

    Example:
        >>> import torch
        >>> from tbfeat.capture import CaptureSession
        >>> from tbfeat.options import LogOptions
        >>> from tbfeat.stages import generic_stages
        >>> sent = []
        >>> session = CaptureSession(lambda m, n: sent.append(m) or True, LogOptions(), step=3)
        >>> stage = generic_stages(torch.nn.Sequential(torch.nn.ReLU()))[0]
        >>> session.on_output(stage, torch.zeros(1, 2, 4, 4))
        >>> session.end_step()
        True
        >>> [(type(m).__name__, m.step) for m in sent]
        [('Capture', 3), ('EndStep', 3)]
    """

    def __init__(
        self,
        post: Post,
        options: LogOptions,
        step: int,
        *,
        track: bool = False,
        names: Iterable[str] = (),
        note: Notes | None = None,
        drain: Callable[[], Any] | None = None,
    ) -> None:
        self._post = post
        self._drain = drain
        self.options = options
        self.step = step
        self.track = track
        self._note = note if note is not None else Notes()
        self._probe_images = 0
        self._names: list[str] = []
        self._counts: dict[str, int] = {}
        self._calls: dict[tuple[str, str | int | None], tuple[int, int]] = {}
        self._forward_id = 0
        self._cam_images = 0
        self._captured = False
        self._lock = threading.Lock()  # one model may run on several threads
        self.add_names(names)
        if track:
            self._probe_images = min(len(self._names), options.max_images)

    @property
    def names(self) -> list[str]:
        """The image names of the current step so far."""
        return list(self._names)

    def add_names(self, names: Iterable[str]) -> None:
        """Name the next images of the step (sanitized; a repeat gets ``_1``, ``_2``...)."""
        with self._lock:
            self._names += unique_names((sanitize(n) for n in names), taken=self._names)

    def claim_cam_images(self, n: int) -> tuple[str, ...]:
        """Names of the next ``n`` images of the step to draw maps of (fewer once the
        step has ``max_images``), counted apart from the stages' images."""
        with self._lock:
            done = self._cam_images
            k = max(0, min(n, self.options.max_images - done))
            self._cam_images = done + k
            return tuple(self._image_name(done + i) for i in range(k))

    def say_once(self, key: str, message: str) -> None:
        """Warn ``message`` unless ``key`` was said by this session's logger."""
        self._note(key, message, warn=True, stacklevel=3)

    def on_forward(self) -> None:
        """A new forward of the hooked model begins (for calls of shared modules)."""
        with self._lock:
            self._forward_id += 1

    def set_step(self, step: int) -> None:
        """Log later captures at ``step``; a different step ends the current one."""
        if step != self.step:
            self.end_step()
        self.step = step

    def end_step(self, complete: bool = True) -> bool:
        """Post :class:`EndStep` if anything was captured (``complete=False``: the step
        was interrupted, drop it); reset the step's bookkeeping."""
        with self._lock:
            captured, self._captured = self._captured, False
            self._names, self._counts, self._cam_images = [], {}, 0
        if captured:
            self._post(EndStep(self.step, complete), 0)
        return captured

    def on_output(self, stage: Stage, output: Any) -> None:
        """Post one :class:`Capture` per tensor of a stage's output."""
        with self._lock:
            ident = (stage.name, stage.output)
            forward, calls = self._calls.get(ident, (-1, -1))
            calls = calls + 1 if forward == self._forward_id else 0
            self._calls[ident] = (self._forward_id, calls)
            output = stage.select(output)
            renamed: list[str] = []
            skip = () if self.options.predictions else PREDICTION_KEYS
            skipped: list[str] = []
            tensors = stage_tensors(
                output, f"call{calls}" if calls else "", renamed, skip=skip, skipped=skipped
            )
            for suffix, t in tensors:
                base = f"{stage.key}/{suffix}" if suffix else stage.key
                if stage.tokens is None:
                    self._capture(base, t, stage)
                else:
                    self._capture_tokens(base, t, stage, stage.tokens)
        if skipped:
            self._note(
                f"predictions:{stage.key}",
                f"tbfeat: stage {stage.key} returns detections ({', '.join(skipped[:3])}): "
                "coordinates and class ids, not activations, so not logged (predictions=True "
                "logs them)",
            )
        if not tensors and not skipped:
            self._note(
                f"skip:{stage.key}",
                f"tbfeat: stage {stage.key} gives {type(output).__name__}, no tensor; not logged",
            )
        if renamed:
            self._note(
                f"renamed:{stage.key}",
                f"tbfeat: stage {stage.key} has output keys that give the same tag once made "
                f"tag-safe; logged as {', '.join(renamed)}",
            )

    def _capture_tokens(
        self, base: str, t: torch.Tensor, stage: Stage, layout: TokenLayout
    ) -> None:
        """A transformer stage's output (:attr:`Stage.tokens`): its map under ``base``, as
        a convolutional stage's, and its class token's statistics under ``<base>/cls``;
        an output that holds no grid logs its statistics only, said once."""
        parts = split(t, layout)
        if parts.map is None:
            self._note(
                f"tokens:{base}",
                f"tbfeat: stage {base} ({stage.name}): {parts.problem}; it logs statistics only",
                warn=True,
            )
            self._capture(base, t, stage)
            return
        self._capture(base, parts.map, stage)
        if parts.cls is not None:
            self._capture(tags.output(base, "cls"), parts.cls, stage)

    def _capture(self, base: str, t: torch.Tensor, stage: Stage) -> None:
        if t.dim() not in (2, 3, 4) or t.is_complex() or t.dtype == torch.bool:
            self._note(
                f"skip:{base}",
                f"tbfeat: stage {base} gives a {t.dim()}-D {t.dtype} tensor; not logged",
            )
            return
        done = self._counts.get(base, 0)
        k = min(t.shape[0], self.options.max_images - done)
        if k <= 0:
            return
        if not self._captured and self._drain is not None:
            self._drain()
        with torch.no_grad():
            # a copy: a later layer may change the output in place (ReLU(inplace=True)); of a
            # quantized output, its real values (dequantize() returns a new float tensor)
            # (contiguous: a token map is a permuted view)
            x = (
                t[:k].dequantize()
                if t.is_quantized
                else t[:k].detach().clone(memory_format=torch.contiguous_format)
            )
        names = tuple(self._image_name(done + i) for i in range(k)) if x.dim() == 4 else ()
        message = Capture(
            self.step, base, x, names, self.track and x.dim() == 4, self._probe_images,
            label=stage.label, module_type=stage.type, module_name=stage.name,
        )  # fmt: skip
        if self._post(message, x.numel() * x.element_size()):
            self._counts[base] = done + k
            self._captured = True
        else:
            self._note(
                f"dropped:{base}",
                f"tbfeat: stage {base} was not logged at step {self.step}: the writer thread "
                "did not make room in time",
                warn=True,
            )

    def _image_name(self, position: int) -> str:
        return self._names[position] if position < len(self._names) else str(position)


PREDICTION_KEYS = ("boxes", "scores", "labels", "masks", "keypoints", "keypoints_scores")
"""Keys of the dicts detection heads return (Faster, Mask and Keypoint R-CNN): boxes,
confidences, class ids, masks and keypoints, left out of what a stage logs unless
``LogOptions.predictions`` is set."""


def stage_tensors(
    output: Any,
    prefix: str = "",
    renamed: list[str] | None = None,
    *,
    skip: tuple[str, ...] = (),
    skipped: list[str] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a stage's output, each with a distinct tag suffix.

    The suffix is ``""`` for a lone tensor, else the position or key of the element in
    tuples, lists and dicts (nested ones joined by ``_``, keys made tag-safe by
    :func:`~tbfeat.stages.sanitize`). Keys that give the same suffix (``1`` and ``"1"``,
    ``"a/b"`` and ``"a_b"``) are told apart in output order: the first keeps it, later
    ones get the first free ``_1``, ``_2``... that no other element has, so the same
    output structure gives the same suffixes at every step.

    Args:
        output: What a stage's forward returned.
        prefix: Put before every suffix (``call1`` for a shared module's second call).
        renamed: If given, gets ``"<key path> as <suffix>"`` for each renamed element.
        skip: Dict keys whose values are left out (:data:`PREDICTION_KEYS`).
        skipped: If given, gets the key path of each element left out.

    Returns:
        ``(suffix, tensor)`` pairs in output order; empty when ``output`` holds no tensor.
    """
    found = []
    for suffix, path, t in _walk(output, prefix, ""):
        if skip and _last_key(path) in skip:
            if skipped is not None:
                skipped.append(path)
            continue
        found.append((suffix, path, t))
    natural = {suffix for suffix, _, _ in found}
    used: set[str] = set()
    out = []
    for suffix, path, t in found:
        name, k = suffix, 0
        while name in used or (k and name in natural):
            k += 1
            name = _join(suffix, str(k))
        used.add(name)
        out.append((name, t))
        if k and renamed is not None:
            renamed.append(f"{path} as {name}")
    return out


def _walk(output: Any, prefix: str, path: str) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(suffix, key path, tensor)`` for each tensor of ``output``; suffixes may repeat."""
    if isinstance(output, torch.Tensor):
        yield prefix, path, output
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from _walk(value, _join(prefix, sanitize(str(key))), f"{path}[{key!r}]")
    elif isinstance(output, (list, tuple)):
        for i, value in enumerate(output):
            yield from _walk(value, _join(prefix, str(i)), f"{path}[{i}]")


def _last_key(path: str) -> str | None:
    """``"boxes"`` of ``"[0]['boxes']"``; ``None`` when the last step is a position."""
    last = path.rsplit("[", 1)[-1].rstrip("]")
    return last[1:-1] if last[:1] in "'\"" and len(last) > 1 else None


def _join(prefix: str, key: str) -> str:
    """``prefix_key``, or ``key`` alone when there is no prefix."""
    return f"{prefix}_{key}" if prefix else key


def capture_hooks_kwargs(session: CaptureSession, note: Notes) -> dict[str, Any]:
    """The :class:`~tbfeat.hooks.StageHooks` callbacks that feed ``session``."""

    def on_error(stage: Stage, e: Exception) -> None:
        note(
            f"error:{stage.key}:{type(e).__name__}",
            f"tbfeat: stage {stage.key} ({stage.name}) was not logged: {type(e).__name__}: {e}",
            warn=True,
        )

    return {"on_output": session.on_output, "on_forward": session.on_forward, "on_error": on_error}
