"""What the dashboard shows, read from a logdir on demand: the one owner of its reader.

:class:`Board` answers the dashboard's questions (which runs tbfeat wrote, a run's stages,
images, steps and metrics, a logged picture, one tile of a grid, the drift of every stage,
an export figure) through one :class:`tbfeat.reader.Reader`, whose index holds offsets and
scalar values, never a picture. Every question is checked against what the logdir holds
first: a run, tag, step, image, stage or channel that is not there raises
:class:`BadRequest`, with a message naming the value and what is allowed.

No torch here: the TensorBoard process stays small.
"""

from __future__ import annotations

import io
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from .. import tags as tagging
from ..notes import Notes
from ..pictures import CAM_ALPHA, CAM_CMAP
from ..reader import NotLogged, Reader

CACHE_BYTES = 64 << 20
"""Records kept parsed (a step is one record: the cells of a step share it)."""
MAX_STEPS = 64
"""The most steps one request may name (a figure, a view's columns)."""
MAX_METRICS = 64
"""The most scalar tags of the training itself (not tbfeat's) sent with a run."""
_INT = re.compile(r"-?\d{1,19}")
_INT64 = (-(2**63), 2**63 - 1)
_KINDS = ("features", "cam")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF8", "image/gif"))  # fmt: skip


class BadRequest(ValueError):
    """A request naming something the logdir does not hold (answered with 400)."""


@dataclass
class _Run:
    """What one run's index says, derived once per version of it."""

    version: int
    pictures: dict[str, tagging.Tag]
    """Every tbfeat image tag: grids, maps, inputs, strips, the drift overview."""
    scalars: list[str]
    """The scalar tags that are not tbfeat's (the training's losses and metrics)."""
    drift: dict[tuple[str, bool], str]
    """``(base, vs_first)`` -> the drift tag."""
    infos: list[int]
    """The steps at which the run's metadata (:class:`tbfeat.tags.RunInfo`) was logged."""
    steps: dict[str, list[int]] = field(default_factory=dict)
    """The steps of each kind's tags (``features``, ``cam``), and of both (``all``)."""
    layouts: dict[int, tagging.RunInfo] = field(default_factory=dict)

    def of(self, kind: str) -> dict[str, tagging.Tag]:
        return {tag: p for tag, p in self.pictures.items() if p.kind == kind}


def content_type(data: bytes) -> str:
    """The MIME type of an encoded picture, by its first bytes.

    Example:
        >>> content_type(b"\\x89PNG\\r\\n\\x1a\\n...")
        'image/png'
    """
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


def parse_int(name: str, text: Any, low: int = _INT64[0], high: int = _INT64[1]) -> int:
    """An integer parameter, checked.

    Example:
        >>> parse_int("step", "12")
        12
        >>> parse_int("step", "x")
        Traceback (most recent call last):
        ...
        tbfeat.dashboard.data.BadRequest: step must be an integer, got 'x'
    """
    if not isinstance(text, str) or not _INT.fullmatch(text):
        raise BadRequest(f"{name} must be an integer, got {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}], got {value}")
    return value


def parse_steps(text: Any) -> list[int]:
    """A comma-separated list of steps, checked (at most :data:`MAX_STEPS`)."""
    if not isinstance(text, str) or not text:
        raise BadRequest(f"steps must be comma-separated integers, got {text!r}")
    parts = text.split(",")
    if len(parts) > MAX_STEPS:
        raise BadRequest(f"at most {MAX_STEPS} steps per request, got {len(parts)}")
    return [parse_int("step", p) for p in parts]


class Board:
    """The dashboard's view of a logdir (see the module's notes). Thread-safe: a
    TensorBoard server answers requests from many threads.

    Example:
        >>> import tempfile
        >>> Board(tempfile.mkdtemp()).runs()
        []
    """

    def __init__(self, logdir: str | os.PathLike) -> None:
        # what the reader skips goes to the server's log, one line each
        self.reader = Reader(logdir, cache_bytes=CACHE_BYTES, notes=Notes(log=True))
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ runs
    def refresh(self) -> None:
        """Read what was written since the last refresh (new runs, steps, files)."""
        self.reader.refresh()

    def runs(self) -> list[dict[str, Any]]:
        """The runs holding tbfeat pictures: name, images, stage and step counts."""
        listed = []
        for name in self.reader.runs():
            run = self._run(name)
            if not run.steps["all"]:
                continue
            shown = {**run.of("features"), **run.of("cam")}.values()
            listed.append({"run": name, "images": sorted({t.image for t in shown}),
                           "stages": len({t.base for t in shown}),
                           "steps": len(run.steps["all"]), "first": run.steps["all"][0],
                           "last": run.steps["all"][-1]})  # fmt: skip
        return listed

    def _run(self, name: str) -> _Run:
        version = self.reader.version(name)
        with self._lock:
            run = self._runs.get(name)
        if run is not None and run.version == version:
            return run
        try:
            info = self.reader.tags(name)
        except NotLogged:
            raise BadRequest(f"unknown run {name!r}; runs: {self._names()}") from None
        infos = list(info[tagging.RUN].steps) if tagging.RUN in info else []
        run = _Run(version, pictures={}, scalars=[], drift={}, infos=infos)
        steps: dict[str, set[int]] = {k: set() for k in _KINDS}
        for tag, what in info.items():
            parsed = tagging.parse(tag)
            if parsed is None:
                if what.kind == "scalar":
                    run.scalars.append(tag)
            elif what.kind == "image" and parsed.kind in tagging.IMAGE_KINDS:
                run.pictures[tag] = parsed
                if parsed.kind in steps:
                    steps[parsed.kind].update(what.steps)
            elif what.kind == "scalar" and parsed.kind == "drift":
                run.drift[parsed.base, parsed.vs_first] = tag
        run.steps = {k: sorted(v) for k, v in steps.items()}
        run.steps["all"] = sorted(steps["features"] | steps["cam"])
        with self._lock:
            self._runs[name] = run
        return run

    def _names(self) -> str:
        names = self.reader.runs()
        return ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")

    # ------------------------------------------------------------------ one run
    def run(self, name: str) -> dict[str, Any]:
        """Everything the dashboard needs to lay out a run (no picture)."""
        run = self._run(name)
        inputs = {p.image: self.reader.steps(name, tag) for tag, p in run.of("input").items()}
        shown = {**run.of("features"), **run.of("cam")}.values()
        return {
            "run": name, "outputs": self._outputs(name, run),
            "images": sorted({t.image for t in shown}), "steps": run.steps,
            "grids": sorted({t.base for t in run.of("features").values()}),
            "maps": sorted({t.base for t in run.of("cam").values()}),
            "inputs": inputs, "layouts": self._layouts(name, run),
            "metrics": {t: self.reader.scalars(name, t) for t in run.scalars[:MAX_METRICS]},
            "drift": bool(run.drift), "cam": {"alpha": CAM_ALPHA, "cmap": CAM_CMAP},
        }  # fmt: skip

    def _outputs(self, name: str, run: _Run) -> list[dict[str, Any]]:
        """The stage outputs in forward order, as the run's metadata last says; the
        bases it does not name (a run written before it existed), by stage key."""
        info = self._info(name, run, run.infos[-1]) if run.infos else None
        listed = [
            {"base": o.base, "label": o.label, "type": o.type, "shape": list(o.shape)}
            for o in (info.outputs if info else ())
        ]
        named = {o["base"] for o in listed}
        bases = {t.base for t in {**run.of("features"), **run.of("cam")}.values()}
        rest = sorted(bases - named, key=_stage_order)
        listed += [{"base": b, "label": b.partition("_")[2], "type": "", "shape": []}
                   for b in rest]  # fmt: skip
        return listed

    def _info(self, name: str, run: _Run, step: int) -> tagging.RunInfo | None:
        info = run.layouts.get(step)
        if info is None:
            try:
                info = self.reader.run_info(name, step)
            except (NotLogged, ValueError):
                return None
            if info is not None:
                run.layouts[step] = info
        return info

    def _layouts(self, name: str, run: _Run) -> list[dict[str, Any]]:
        """Each grid layout from the step it was logged at: ``{step, grids: {base:
        {channels, ncols, tile}}}``, the layouts that did not change left out."""
        listed, last = [], None
        for step in run.infos:
            info = self._info(name, run, step)
            if info is None:
                continue
            grids = {o.base: {"channels": list(o.grid.channels), "ncols": o.grid.ncols,
                              "tile": list(o.grid.tile)}
                     for o in info.outputs if o.grid is not None}  # fmt: skip
            if grids != last:
                listed.append({"step": step, "grids": grids})
                last = grids
        return listed

    # ------------------------------------------------------------------ pictures
    def image(self, name: str, tag: str, step: int) -> bytes:
        """The picture logged at ``(run, tag, step)``, its bytes as they are."""
        if tag not in self._run(name).pictures:
            raise BadRequest(f"run {name!r} has no tbfeat image tag {tag!r}")
        try:
            return self.reader.image(name, tag, step)
        except NotLogged as e:
            raise BadRequest(str(e)) from None

    def tile(self, name: str, tag: str, step: int, channel: int) -> bytes:
        """One channel's tile of a ``features/`` grid, cropped from the logged PNG."""
        from PIL import Image

        parsed = tagging.parse(tag)
        if parsed is None or parsed.kind != "features":
            raise BadRequest(f"tiles are cut from features/ tags, got {tag!r}")
        data = self.image(name, tag, step)
        box = self._tile_box(name, parsed.base, step, channel)
        out = io.BytesIO()
        with Image.open(io.BytesIO(data)) as im:
            im.crop(box).save(out, format="PNG")
        return out.getvalue()

    def _tile_box(self, name: str, base: str, step: int, channel: int) -> tuple[int, ...]:
        run = self._run(name)
        at = [s for s in run.infos if s <= step]
        info = self._info(name, run, at[-1]) if at else None
        grid = next((o.grid for o in info.outputs if o.base == base), None) if info else None
        if grid is None:
            raise BadRequest(f"run {name!r} has no grid layout of {base!r} at step {step}")
        if channel not in grid.channels:
            raise BadRequest(f"channel {channel} is not in the grid of {base!r} at step "
                             f"{step}; its channels: {list(grid.channels)}")  # fmt: skip
        i = grid.channels.index(channel)
        (th, tw), (row, col) = grid.tile, divmod(i, grid.ncols)
        y, x = row * (th + 1), col * (tw + 1)
        return (x, y, x + tw, y + th)

    # ------------------------------------------------------------------ drift
    def drift(self, name: str) -> dict[str, Any]:
        """Every stage's drift by step: ``{bases, steps, delta, first}``, where
        ``delta[i][j]`` is stage ``i``'s drift against the step before at ``steps[j]``
        and ``first`` against the first step (``None`` where not logged)."""
        run = self._run(name)
        bases = [o["base"] for o in self._outputs(name, run)]
        bases += sorted({b for b, _ in run.drift} - set(bases), key=_stage_order)
        series = {key: dict(self.reader.scalars(name, tag)) for key, tag in run.drift.items()}
        bases = [b for b in bases if (b, False) in series or (b, True) in series]
        steps = sorted({s for values in series.values() for s in values})
        table = {
            key: [[series.get((b, vs_first), {}).get(s) for s in steps] for b in bases]
            for key, vs_first in (("delta", False), ("first", True))
        }
        return {"run": name, "bases": bases, "steps": steps, **table}

    # ------------------------------------------------------------------ figures
    def figure(self, name: str, kind: str, base: str, image: str, steps: list[int]) -> tuple:
        """``(file name, PNG)``: the figure ``tbfeat export`` draws of one stage and image
        at these steps (``kind``: ``features`` or ``cam``)."""
        from .. import export

        if kind not in _KINDS:
            raise BadRequest(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        run = export.load_run(self.reader, name)
        tag = tagging.features(base, image) if kind == "features" else tagging.cam(base, image)
        if tag not in run.tags:
            raise BadRequest(f"run {name!r} has no tag {tag!r}")
        try:
            plates = export.plan([run], stages=[base], steps=steps, images=[image])
        except export.ExportError as e:
            raise BadRequest(str(e)) from None
        plate = next(p for p in plates if p.path.name.startswith(f"{kind}_"))
        out = io.BytesIO()
        export.draw(plate, out, "png", export.DPI)
        return plate.path.name, out.getvalue()


def _stage_order(base: str) -> tuple:
    index, _, rest = base.partition("_")
    try:
        return tuple(int(p) for p in index.split(".")), rest
    except ValueError:
        return (1 << 30,), base
