"""Stages: which modules of a model are logged, and under which tag.

A :class:`Stage` is a small frozen record that integrations fill in.
:func:`tbfeat.list_stages` shows what a model offers; :func:`resolve_stages` turns a user's
``stages=`` into the list the logger hooks. This module imports nothing else of tbfeat
but :mod:`tbfeat.tokens` (the token layout a transformer stage carries).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .tokens import TokenLayout

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
"""Plain containers: their class name says nothing, so stages are labelled by name."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")

StageSpec = int | str
"""One entry of ``stages=``: an index, a module name, a glob pattern or a type name."""


@dataclass(frozen=True)
class Stage:
    """One logged stage of a model.

    Attributes:
        index: Position of the stage in the model's stage list (``NN`` in tags).
        name: Qualified module name, as in ``model.named_modules()``.
        type: Short module class name (``"Conv2d"``, ``"C2f"``).
        module: The module whose forward output is captured.
        label: The text after ``NN_`` in tags; the type, or the name where the type says
            nothing (containers such as ``Sequential``) or where an integration chose one.
        output: For a module that returns a dict, list or tuple: the key or position of
            the one element this stage logs (an FPN level); ``None`` logs every element.
        sub: For a stage chosen by a deeper module name: its number among the stages
            chosen under the same listed stage, in forward order (``NN.MM`` in tags, which
            sorts before ``NN_``: inside a stage comes before its output).
        digits: Width of the zero-padded ``NN`` in :attr:`key` (from the number of listed
            stages), so that TensorBoard's text sort keeps ``2`` before ``10``.
        sub_digits: Width of the zero-padded ``MM``.
        tokens: How the output holds its feature map when it is not ``(N, C, H, W)``:
            a transformer's tokens or a channels-last map (:mod:`tbfeat.tokens`), set by
            the integration that knows the model family; ``None`` for a plain map.

    Example:
        >>> import torch
        >>> from tbfeat import list_stages
        >>> [s.key for s in list_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))]
        ['00_Conv2d']
    """

    index: int
    name: str
    type: str
    module: nn.Module = field(repr=False, compare=False, hash=False)
    label: str = ""
    output: str | int | None = None
    sub: int | None = None
    digits: int = 2
    sub_digits: int = 2
    tokens: TokenLayout | None = None

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", sanitize(self.type))

    def select(self, output: Any) -> Any:
        """This stage's part of its module's output: the element :attr:`output` names;
        for a token stage whose module returns a tuple (a transformers 4 layer returns
        ``(tokens, ...)``, a transformers 5 layer the tokens), its first element, so that
        its tags are the same whichever the version."""
        if self.output is not None:
            return output[self.output]
        if self.tokens is not None and isinstance(output, (tuple, list)) and output:
            return output[0]
        return output

    @property
    def key(self) -> str:
        """``"<NN>_<label>"`` (``"<NN>.<MM>_<label>"`` for a deeper module): the part of
        every tag that names this stage."""
        number = f"{self.index:0{self.digits}d}"
        if self.sub is not None:
            number += f".{self.sub:0{self.sub_digits}d}"
        return f"{number}_{self.label}"


def numbered(stages: Sequence[Stage], total: int) -> list[Stage]:
    """``stages`` of a model with ``total`` listed stages, ready for tags: ``NN`` as wide
    as ``total`` needs (the same whatever is chosen), and the deeper modules under each
    listed stage numbered ``MM`` in the order given (forward order)."""
    subs: dict[int, int] = {}
    out = []
    for s in stages:
        if s.sub is not None:
            s = replace(s, sub=subs.setdefault(s.index, 0))
            subs[s.index] += 1
        out.append(s)
    digits = max(2, len(str(total)))
    sub_digits = max(2, len(str(max(subs.values(), default=1) - 1)))
    return [replace(s, digits=digits, sub_digits=sub_digits) for s in out]


def sanitize(text: str) -> str:
    """Make ``text`` safe for a TensorBoard tag and a file name (no separators, no controls)."""
    return _UNSAFE.sub("_", str(text)).strip("_.") or "_"


def generic_stages(model: nn.Module) -> list[Stage]:
    """Default stages of any module: its direct children, in registration order.

    Container children (``Sequential``, ``ModuleList``, ``ModuleDict``) are labelled by
    their name (``layer1``), other children by their type (``Conv2d``).
    """
    stages = []
    for i, (name, child) in enumerate(model.named_children()):
        label = sanitize(name) if type(child) in CONTAINERS else ""
        stages.append(Stage(i, name, type(child).__name__, child, label))
    return stages


def resolve_stages(
    root: nn.Module,
    candidates: Sequence[Stage],
    stages: StageSpec | Iterable[StageSpec] | None,
    default: Sequence[Stage] | None = None,
) -> list[Stage]:
    """Turn a user's ``stages=`` into the list of stages to hook.

    Args:
        root: The module the stage names are relative to.
        candidates: What :func:`tbfeat.list_stages` shows (indices refer to this list).
        stages: ``None`` for ``default``; else one or a list of: an ``int`` index into
            ``candidates``; a stage name (``"layer1"``) or any qualified module name of
            ``root`` (``"layer1.0.conv1"``); a glob over names, matched segment by segment
            (``"layer*"``); or a type name or glob over types (``"C2f"``, ``"Conv*"``).
        default: Stages used when ``stages`` is ``None``; default all candidates.

    Returns:
        Stages without duplicates, in model order.

    Raises:
        TypeError: an entry is neither ``int`` nor ``str``.
        ValueError: an entry matches nothing; the message names the closest valid choice.
    """
    if stages is None:
        return numbered(candidates if default is None else default, len(candidates))
    if isinstance(stages, (int, str)):
        stages = [stages]
    try:
        specs = list(stages)
    except TypeError:
        raise TypeError(
            f"stages must be None, an int, a str or a list of them, got {type(stages).__name__}"
        ) from None
    if not specs:
        raise ValueError("stages is empty; pass None for the default stages or name at least one")

    by_name = {s.name: s for s in candidates if s.output is None}
    by_name.update({f"{s.name}:{s.output}": s for s in candidates if s.output is not None})
    by_name.update(  # labels an integration chose (fpn_0, stem), not type names
        {s.label: s for s in candidates if s.label != sanitize(s.type) and s.label not in by_name}
    )
    modules = dict(root.named_modules())
    modules.pop("", None)
    chosen: dict[tuple[str, str | int | None], Stage] = {}
    for spec in specs:
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise TypeError(f"a stage must be an int index or a str name, got {spec!r}")
        for stage in _match(spec, candidates, by_name, modules):
            chosen.setdefault((stage.name, stage.output), stage)
    order = {name: i for i, name in enumerate(modules)}
    ordered = sorted(chosen.values(), key=lambda s: (s.index, s.sub is None, order.get(s.name, -1)))
    return numbered(ordered, len(candidates))


def _match(
    spec: StageSpec,
    candidates: Sequence[Stage],
    by_name: dict[str, Stage],
    modules: dict[str, nn.Module],
) -> list[Stage]:
    if isinstance(spec, int):
        n = len(candidates)
        if not -n <= spec < n:
            raise ValueError(f"stage index {spec} is out of range; allowed: 0..{n - 1}")
        return [candidates[spec]]
    if spec in by_name:
        return [by_name[spec]]
    if spec in modules:
        return [_deep_stage(spec, modules[spec], candidates)]
    if any(ch in spec for ch in "*?["):
        names = [n for n in modules if _glob_segments(n, spec)]
        if names:
            return [by_name.get(n) or _deep_stage(n, modules[n], candidates) for n in names]
    typed = [s for s in candidates if fnmatch.fnmatchcase(s.type, spec)]
    if typed:
        return typed
    choices = list(by_name) + sorted({s.type for s in candidates})
    close = difflib.get_close_matches(spec, choices + list(modules), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    deep = [n for n in modules if "." in n and n not in by_name]
    example = f" such as {max(deep[:50], key=lambda n: n.count('.'))!r}" if deep else ""
    raise ValueError(
        f"unknown stage {spec!r}{hint}; allowed: an index 0..{len(candidates) - 1}, "
        f"a name or glob of {', '.join(by_name) or '(none)'}, a type of "
        f"{', '.join(sorted({s.type for s in candidates})) or '(none)'}, "
        f"or a qualified module name of the model{example}"
    )


def _glob_segments(name: str, pattern: str) -> bool:
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pats, strict=True)
    )


def _deep_stage(name: str, module: nn.Module, candidates: Sequence[Stage]) -> Stage:
    """A module off the candidate list: numbered under its nearest listed ancestor
    (``NN.MM``), or under the number after the whole list when it has none (a detector's
    head); its label is its full name. :func:`numbered` gives the ``MM``."""
    ancestors = [s for s in candidates if name.startswith(s.name + ".") or name == s.name]
    nearest = max(ancestors, key=lambda s: (len(s.name), -s.index), default=None)
    index = nearest.index if nearest is not None else len(candidates)
    return Stage(index, name, type(module).__name__, module, sanitize(name), sub=0)
