"""What a class activation map explains: the class scores of a model's predictions.

A :class:`ScoreTap` collects, during one forward, what the model saw and the class logits
of each image's predictions as a ``(classes, predictions)`` tensor: a classifier has one
prediction per image, a detector one per anchor, proposal or query. Integrations
subclass it to hook their heads. :func:`choose` then picks which predictions to explain,
the way Ultralytics' LayerCAM does: those whose class probability passes ``conf`` (the
single best one where none does), the ``topk`` strongest, optionally of some classes
only. For a classifier that is the top-1 class, or the class asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CamTarget:
    """Which predictions a class activation map explains.

    Args:
        classes: Only these class ids count (a classifier: the class to explain);
            ``None`` for every class (a classifier: each image's top-1).
        conf: A detector's predictions whose class probability reaches ``conf`` count;
            where none does, the single best one.
        topk: At most this many predictions per image, the strongest first; each costs
            one backward pass.
        score: Instead of the above, a function of the model's output giving one score
            per image, a ``(N,)`` tensor.
    """

    classes: tuple[int, ...] | None = None
    conf: float = 0.25
    topk: int = 16
    score: Callable[[Any], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.score is not None and not callable(self.score):
            raise TypeError(f"score must be a function of the output, got {self.score!r}")
        if self.classes is not None:
            for c in self.classes:
                if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                    raise TypeError(f"class ids must be ints >= 0, got {c!r}")
        if isinstance(self.conf, bool) or not isinstance(self.conf, (int, float)):
            raise TypeError(f"conf must be a number in [0, 1], got {self.conf!r}")
        if not 0 <= self.conf <= 1:
            raise ValueError(f"conf must be in [0, 1], got {self.conf!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {self.topk!r}")


def as_target(target: Any, conf: float = 0.25, topk: int = 16) -> CamTarget:
    """A :class:`CamTarget` from what ``stage_cams(target=...)`` and the ``cam_target``
    option take: ``None``, a class id, a sequence of class ids, a function or a target."""
    if isinstance(target, CamTarget):
        return target
    if target is None:
        return CamTarget(conf=conf, topk=topk)
    if callable(target):
        return CamTarget(conf=conf, topk=topk, score=target)
    if isinstance(target, int) and not isinstance(target, bool) and target >= 0:
        return CamTarget((target,), conf, topk)
    if isinstance(target, (list, tuple)) and target:
        return CamTarget(tuple(target), conf, topk)
    raise TypeError(
        "target must be None (top-1 class, or every class of a detector), a class id >= 0, "
        f"a list of class ids or a function of the output, got {target!r}"
    )


class NoScores(TypeError):
    """The model gives no class scores to explain (not an ``(N, classes)`` output, nor a
    head whose class logits a tap can read)."""


class ScoreTap:
    """Collects, during one forward, what the model saw and its predictions' class logits.

    This base class reads a classifier's ``(N, classes)`` output and sees the input
    batch as it is. Integrations hook a head instead (:meth:`install`).

    Example:
        >>> import torch
        >>> tap = ScoreTap(torch.nn.Identity())
        >>> with tap:
        ...     out = tap.module(torch.tensor([[0.0, 2.0]]))
        >>> [tuple(t.shape) for t, _ in tap.scores(out)]
        [(2, 1)]
    """

    probabilities = "softmax"
    """How the logits become class probabilities: ``"softmax"`` or ``"sigmoid"``."""
    background = False
    """Whether class 0 of the softmax is a background class, left out of the choice."""
    reads_output = True
    """Whether the logits are the model's output (so a probe's output tells whether there
    are any); False for taps that hook a head, which a probe may not run."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handles: list[Any] = []

    def __enter__(self) -> ScoreTap:
        try:
            self.install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        """Register the hooks (``self._handles``) that collect the logits."""

    def remove(self) -> None:
        """Remove every hook; safe twice."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def logits(self, output: Any) -> list[torch.Tensor]:
        """One ``(classes, predictions)`` logit tensor per image, background included."""
        if isinstance(output, torch.Tensor) and output.dim() == 2:
            return [row[:, None] for row in output]
        got = f"{type(output).__name__} {tuple(output.shape) if torch.is_tensor(output) else ''}"
        raise NoScores(
            f"the model returned {got.strip()}, not (N, classes) scores; pass target= a "
            "function of the output giving one score per image"
        )

    def seen(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """What the model saw of the batch's ``inputs`` (one ``(C, H, W)`` each), as
        ``(N, C, H, W)``: the inputs themselves, unless a hook caught the model's own
        transform of them."""
        return torch.stack(list(inputs))

    def scores(self, output: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, the ``(classes, predictions)`` logits and probabilities, without a
        background class."""
        pairs = []
        for logit in self.logits(output):
            if self.probabilities == "sigmoid":
                prob = logit.detach().float().sigmoid()
            else:
                prob = logit.detach().float().softmax(0)
            if self.background:
                logit, prob = logit[1:], prob[1:]
            pairs.append((logit, prob))
        return pairs


def choose(
    scores: Sequence[tuple[torch.Tensor, torch.Tensor]], target: CamTarget
) -> list[torch.Tensor]:
    """The predictions to explain: for each of ``n`` backward passes, one summed score.

    Per image, each prediction's score is its best allowed class logit; those whose
    probability reaches ``target.conf`` are kept, else the best one; the strongest
    ``target.topk`` of them, in order. Images with fewer repeat theirs (as Ultralytics
    does: the maps are combined by their maximum, so a repeat changes nothing).

    Returns:
        ``n`` scalar tensors; pass ``k``'s gradient for the ``k``-th map.
    """
    picked = []
    for logit, prob in scores:
        classes = _allowed(target.classes, logit.shape[0])
        if classes is not None and not len(classes):
            raise ValueError(
                f"cam target classes {list(target.classes)} are all outside the model's "
                f"{logit.shape[0]} classes (allowed 0..{logit.shape[0] - 1})"
            )
        if classes is not None:
            logit, prob = logit[classes], prob[classes]
        best, best_class = logit.detach().max(0)
        p = prob.gather(0, best_class[None])[0]
        keep = (p >= target.conf) | (best == best.max())
        order = best.masked_fill(~keep, float("-inf")).argsort(descending=True)
        order = order[: min(int(keep.sum()), target.topk)]
        picked.append(logit.gather(0, best_class[None])[0][order])
    n = max(len(p) for p in picked)
    return [sum(p[k % len(p)] for p in picked) for k in range(n)]


def _allowed(classes: tuple[int, ...] | None, n: int) -> list[int] | None:
    if classes is None:
        return None
    return [c for c in classes if c < n]
