"""Tags: the one module that writes and reads the names tbfeat logs under.

Every tag tbfeat writes is built by a function here and read back by :func:`parse`:

==============================  =========  ===================================================
tag                             kind       what
==============================  =========  ===================================================
``features/<base>/<image>``     image      the channel grid of one image (:func:`features`)
``cam/<base>/<image>``          image      a class activation map of one image (:func:`cam`)
``input/<image>``               image      the probe image as the model saw it (:func:`input`)
``activations/<base>``          histogram  every activation of the step's images
``stats/<base>/<stat>``         scalar     one statistic (``mean``, ``std``...)
``drift/<base>``                scalar     drift against the step before
``drift/<base>_vs_first``       scalar     drift against the first step
``evolution/<base>``            image      the evolution strip
``overview/drift``              image      every stage's drift over the steps (:data:`OVERVIEW`)
``tbfeat/run``                  tensor     the run's metadata (:data:`RUN`, :class:`RunInfo`)
==============================  =========  ===================================================

``<base>`` names one stage output: ``<NN>_<label>`` (a stage key, ``<NN>.<MM>_<label>`` for
a deeper module, see :attr:`tbfeat.stages.Stage.key`), then ``/<output>`` for one element
of a tuple, list or dict output (:func:`tbfeat.capture.stage_tensors`), or ``/cls`` for
the class token of a transformer stage (:mod:`tbfeat.tokens`; :func:`output`). Labels, output keys
and image names are made tag-safe by :func:`tbfeat.stages.sanitize` (letters, digits,
``_``, ``.``, ``-``; never ``/``), so the image or statistic is the part after the last
``/``. ``<base>`` may still hold characters that are special in a regular expression
(``.``, ``-``; a label an integration or a user chose may hold more): the custom scalars
charts select tags with :func:`pattern`, which anchors and escapes them.

A drift tag against the step before of a base ending in ``_vs_first`` would read as the
drift against the first step of another base: :func:`drift` refuses such a base.

This module imports nothing else of tbfeat.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

KINDS = (
    "features", "cam", "input", "activations", "stats", "drift", "evolution", "overview", "run"
)  # fmt: skip
"""Every kind of tag tbfeat writes (:attr:`Tag.kind`)."""
IMAGE_KINDS = ("features", "cam", "input", "evolution", "overview")
"""The kinds whose tags hold images."""
DERIVED_KINDS = ("drift", "evolution", "overview")
"""The kinds computed from several steps of a stage (or of every stage)."""
OVERVIEW = "overview/drift"
"""The picture of every stage's drift over the steps."""
RUN = "tbfeat/run"
"""The run's metadata (:class:`RunInfo`), a tensor of TensorBoard's plugin ``tbfeat``."""
PLUGIN_NAME = "tbfeat"
"""``SummaryMetadata.plugin_data.plugin_name`` of :data:`RUN`: no dashboard of
TensorBoard's own (Scalars, Images, Histograms, Time Series...) shows it."""
RUN_VERSION = 1
"""The version of :class:`RunInfo`'s JSON."""
VS_FIRST = "_vs_first"
"""Ends a drift tag against the first step."""

_BASE = re.compile(r"\d+(?:\.\d+)*_[^/]+(?:/[^/]+)*")
_WITH_PART = ("features", "cam", "stats")


@dataclass(frozen=True)
class Tag:
    """A tbfeat tag, read by :func:`parse`; ``str(tag)`` writes it again.

    Attributes:
        kind: One of :data:`KINDS`.
        base: The stage output (``<NN>_<label>[/<output>]``); ``None`` for ``overview``,
            ``run`` and ``input``.
        image: The image name of ``features``, ``cam`` and ``input`` tags.
        stat: The statistic of ``stats`` tags.
        vs_first: A ``drift`` tag against the first step (else against the step before).
    """

    kind: str
    base: str | None = None
    image: str | None = None
    stat: str | None = None
    vs_first: bool = False

    @property
    def stage(self) -> str | None:
        """The stage key of :attr:`base` (``05_Concat`` of ``05_Concat/1``)."""
        return None if self.base is None else self.base.partition("/")[0]

    @property
    def output(self) -> str | None:
        """The output element of :attr:`base` (``1`` of ``05_Concat/1``), else ``None``."""
        if self.base is None or "/" not in self.base:
            return None
        return self.base.partition("/")[2]

    def __str__(self) -> str:
        return build(self)


# --------------------------------------------------------------------------- builders
def features(base: str, image: str) -> str:
    """``features/<base>/<image>``: the channel grid of one image."""
    return f"features/{_base(base)}/{_part('image', image)}"


def cam(base: str, image: str) -> str:
    """``cam/<base>/<image>``: the class activation map of one image."""
    return f"cam/{_base(base)}/{_part('image', image)}"


def input(image: str) -> str:  # noqa: A001 - the tag kind's name
    """``input/<image>``: a probe image as the model saw it, at each step it changed.

    A ``cam/`` map of a step is drawn over the ``input/`` picture of the same image at
    the latest step up to it.
    """
    return f"input/{_part('image', image)}"


def activations(base: str) -> str:
    """``activations/<base>``: the histogram of a stage output."""
    return f"activations/{_base(base)}"


def stats(base: str, stat: str) -> str:
    """``stats/<base>/<stat>``: one statistic of a stage output."""
    return f"stats/{_base(base)}/{_part('stat', stat)}"


def drift(base: str, vs_first: bool = False) -> str:
    """``drift/<base>`` (against the step before) or ``drift/<base>_vs_first``.

    Raises:
        ValueError: ``base`` ends in ``_vs_first``: its drift tag would read as another's.
    """
    base = _base(base)
    if base.endswith(VS_FIRST):
        raise ValueError(
            f"stage output {base!r} ends in {VS_FIRST!r}: its drift tags would read as the "
            f"drift of {base.removesuffix(VS_FIRST)!r} against the first step"
        )
    return f"drift/{base}{VS_FIRST if vs_first else ''}"


def output(base: str, name: str) -> str:
    """``<base>/<name>``: the base of one part of a stage output (``cls``, the class token
    of a transformer stage, whose statistics are logged apart from its map)."""
    return f"{_base(base)}/{_part('output', name)}"


def evolution(base: str) -> str:
    """``evolution/<base>``: the evolution strip of a stage output."""
    return f"evolution/{_base(base)}"


def build(tag: Tag) -> str:
    """The tag string of a :class:`Tag` (what :func:`parse` read)."""
    if tag.kind == "overview":
        return OVERVIEW
    if tag.kind == "run":
        return RUN
    if tag.kind not in KINDS:
        raise ValueError(f"tag kind must be one of {', '.join(KINDS)}; got {tag.kind!r}")
    base = tag.base or ""
    if tag.kind == "features":
        return features(base, tag.image or "")
    if tag.kind == "cam":
        return cam(base, tag.image or "")
    if tag.kind == "input":
        return input(tag.image or "")
    if tag.kind == "stats":
        return stats(base, tag.stat or "")
    if tag.kind == "drift":
        return drift(base, tag.vs_first)
    return activations(base) if tag.kind == "activations" else evolution(base)


def pattern(*tags: str) -> str:
    """A regular expression that matches exactly the given tags and no other:
    ``^<tag>$`` with the tag escaped (``^(?:<a>|<b>)$`` for several).

    TensorBoard's custom scalars charts and dashboard filters take regular expressions
    and match them from the start of a tag only: ``drift/00_Conv2d`` also matches
    ``drift/00_Conv2d_vs_first``, and a ``.`` in a label matches any character.

    Example:
        >>> pattern("drift/04.00_layer1.0")
        '^drift/04\\\\.00_layer1\\\\.0$'
    """
    if not tags:
        raise ValueError("pattern needs at least one tag")
    if len(tags) == 1:
        return "^" + re.escape(tags[0]) + "$"
    return "^(?:" + "|".join(re.escape(t) for t in tags) + ")$"


def _base(base: str) -> str:
    if not isinstance(base, str):
        raise TypeError(f"a tag's stage output must be a str, got {type(base).__name__}")
    if not _BASE.fullmatch(base):
        raise ValueError(
            f"a tag's stage output must be '<NN>_<label>' or '<NN>_<label>/<output>' "
            f"(no empty part), got {base!r}"
        )
    return base


def _part(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a tag's {what} must be a str, got {type(value).__name__}")
    if not value or "/" in value:
        raise ValueError(f"a tag's {what} must be a non-empty name without '/', got {value!r}")
    return value


# --------------------------------------------------------------------------- the parser
def parse(tag: str) -> Tag | None:
    """The :class:`Tag` of a tag tbfeat writes; ``None`` for any other tag.

    Example:
        >>> parse("features/05_Concat/1/bus")
        Tag(kind='features', base='05_Concat/1', image='bus', stat=None, vs_first=False)
        >>> parse("drift/09_SPPF_vs_first").vs_first, parse("train/box_loss")
        (True, None)
    """
    if tag == OVERVIEW:
        return Tag("overview")
    if tag == RUN:
        return Tag("run")
    kind, sep, rest = tag.partition("/")
    if not sep:
        return None
    if kind == "input":
        return Tag(kind, image=rest) if rest and "/" not in rest else None
    if kind in _WITH_PART:
        base, sep, last = rest.rpartition("/")
        if not sep or not last or not _BASE.fullmatch(base):
            return None
        if kind == "stats":
            return Tag(kind, base, stat=last)
        return Tag(kind, base, image=last)
    if kind in ("activations", "evolution", "drift"):
        vs_first = kind == "drift" and rest.endswith(VS_FIRST)
        base = rest.removesuffix(VS_FIRST) if vs_first else rest
        if not _BASE.fullmatch(base) or (kind == "drift" and base.endswith(VS_FIRST)):
            return None  # a drift base ending in _vs_first is never written (:func:`drift`)
        return Tag(kind, base, vs_first=vs_first)
    return None


# --------------------------------------------------------------------------- run metadata
@dataclass(frozen=True)
class Grid:
    """How a ``features/`` grid is laid out: tile ``i`` shows channel ``channels[i]`` at
    row ``i // ncols``, column ``i % ncols``, its top-left pixel at
    ``(row * (tile[0] + 1), column * (tile[1] + 1))`` (1 px separators)."""

    channels: tuple[int, ...]
    """The channel each tile shows, in tile order."""
    ncols: int
    """Tiles per row of the grid."""
    tile: tuple[int, int]
    """``(height, width)`` of a tile in pixels (the map, average-pooled by ``pool``)."""
    pool: int = 1
    """The integer factor the map was average-pooled by."""


@dataclass(frozen=True)
class Output:
    """One stage output as logged at a step."""

    base: str
    """The tags' ``<base>`` (:class:`Tag`)."""
    label: str
    """The stage's label (the text after ``NN_``)."""
    type: str
    """The module's class name (``""`` where not known)."""
    module: str
    """The module's qualified name in the model (``""`` where not known)."""
    shape: tuple[int, ...]
    """The output's shape for one image: ``(C, H, W)`` for a feature map."""
    images: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """``(image name, shape)`` of each image of a feature map, as in its tags."""
    grid: Grid | None = None
    """The grid of each image (``None`` where no grid was drawn)."""


@dataclass(frozen=True)
class RunInfo:
    """What a dashboard needs to read a run's tags: its stage outputs, in the order the
    forward logged them, at a step (written at :data:`RUN` when it changes)."""

    outputs: tuple[Output, ...]
    version: int = RUN_VERSION

    @property
    def order(self) -> tuple[str, ...]:
        """The stage outputs' bases in forward order."""
        return tuple(o.base for o in self.outputs)


def encode_run(info: RunInfo) -> bytes:
    """:class:`RunInfo` as UTF-8 JSON (``{"version": 1, "outputs": [...]}``)."""
    outputs = []
    for o in info.outputs:
        grid = None
        if o.grid is not None:
            g = o.grid
            grid = {"channels": list(g.channels), "ncols": g.ncols, "tile": list(g.tile),
                    "pool": g.pool}  # fmt: skip
        outputs.append({
            "base": o.base, "label": o.label, "type": o.type, "module": o.module,
            "shape": list(o.shape), "images": {n: list(s) for n, s in o.images}, "grid": grid,
        })  # fmt: skip
    doc = {"version": info.version, "outputs": outputs}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_run(data: bytes | str) -> RunInfo:
    """The :class:`RunInfo` of :func:`encode_run`'s JSON.

    Raises:
        ValueError: not JSON, a version this tbfeat does not know, or missing fields.
    """
    try:
        doc = json.loads(data)
        version = doc["version"]
        if version != RUN_VERSION:
            raise ValueError(f"run metadata version {version!r}; this tbfeat reads {RUN_VERSION}")
        outputs = tuple(_output(o) for o in doc["outputs"])
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"not tbfeat run metadata: {type(e).__name__}: {e}") from None
    return RunInfo(outputs, version)


def _output(o: dict[str, Any]) -> Output:
    g = o["grid"]
    grid = None
    if g is not None:
        grid = Grid(tuple(int(c) for c in g["channels"]), int(g["ncols"]),
                    (int(g["tile"][0]), int(g["tile"][1])), int(g["pool"]))  # fmt: skip
    return Output(
        base=str(o["base"]), label=str(o["label"]), type=str(o["type"]),
        module=str(o["module"]), shape=_ints(o["shape"]),
        images=tuple((str(n), _ints(s)) for n, s in o["images"].items()), grid=grid,
    )  # fmt: skip


def _ints(values: Iterable[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def run_value(info: RunInfo) -> Any:
    """:class:`RunInfo` as one TensorBoard ``Summary.Value`` at :data:`RUN`: a string
    tensor holding :func:`encode_run`'s JSON, of the plugin :data:`PLUGIN_NAME`.

    The JSON is in the tensor, read per step: TensorBoard keeps a tag's plugin content
    from its first event only, so that holds just ``{"version": 1}``.
    """
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING

    content = json.dumps({"version": info.version}).encode("utf-8")
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content),
        data_class=DATA_CLASS_TENSOR,
    )
    tensor = TensorProto(
        dtype=DT_STRING, tensor_shape=TensorShapeProto(), string_val=[encode_run(info)]
    )
    return Summary.Value(tag=RUN, metadata=metadata, tensor=tensor)


def read_run(tensor: Any) -> RunInfo:
    """The :class:`RunInfo` of a :data:`RUN` event's ``TensorProto`` (as TensorBoard's
    ``EventAccumulator.Tensors(RUN)`` gives it)."""
    if len(tensor.string_val) != 1:
        raise ValueError(f"not tbfeat run metadata: {len(tensor.string_val)} strings")
    return decode_run(tensor.string_val[0])
