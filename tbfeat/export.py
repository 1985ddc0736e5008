"""Figures to take away from a logdir: the logged grids, maps and strips, step by step.

:func:`export` reads every run folder under a logdir with :class:`tbfeat.reader.Reader`
(no model needed; only the pictures drawn are read from the event files) and draws, per
run, one figure per ``features/`` and ``cam/`` tag with the picture of each chosen step
side by side, one per ``evolution/`` tag, and the ``overview/drift`` picture where the
run has one. A ``cam/`` map, stored at its stage's resolution, is drawn over the
``input/`` picture of its image, at the picture's size (:class:`Blended`). Every other
logged pixel is kept as it is: a panel is repeated ``k`` times on both axes (nearest
neighbour, integer ``k``) and placed at integer pixel offsets, so a PNG crop of a panel,
taken every ``k``-th pixel, is the logged PNG exactly (:func:`panel_layout` says where
each panel lies). PDF and SVG embed the same pixels in a vector page. Figures are drawn
with matplotlib's object-oriented API only: no pyplot, no window, no global state.

A logdir may come from anyone, so what it holds is read within bounds: records as
:mod:`tbfeat.reader` reads them (a length is checked against the file's size), each
logged picture's size read from its PNG header and refused above
:data:`MAX_PICTURE_PIXELS` or :data:`MAX_PICTURE_SIDE` before any pixel is decoded, and
every figure's file name made safe and at most :data:`MAX_NAME_CHARS` long before the
first figure is written. Every failure is an :class:`ExportError` (``tbfeat export``:
one line, exit status 2).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import io
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import tags as tagging
from .files import atomic_write
from .options import did_you_mean
from .reader import Reader

FORMATS = ("png", "pdf", "svg")
MIN_DPI = 72
DPI = 300
"""The resolution figures are drawn at unless asked otherwise (``tbfeat export --dpi``)."""
PANEL_INCHES = 2.0
"""A panel is upscaled (integer factor) to at least this width, where the cap allows."""
MAX_SCALE = 24
"""The largest upscale factor of a panel."""
ROW_INCHES = 10.0
"""Panels are wrapped into rows about this wide (at least one panel per row)."""
MARGIN_INCHES = 0.12
"""The figure's margin and the gap between panels."""
TITLE_PT = 11
LABEL_PT = 9
MAX_PICTURE_PIXELS = 2**25
"""The most pixels of one logged picture export decodes (33.5 million, e.g. 5792 x 5792:
about 100 MB as RGB); tbfeat's own grids and maps are far smaller. A larger one is
refused from its PNG header, before any pixel is decoded."""
MAX_PICTURE_SIDE = 2**14
"""The widest or tallest logged picture export decodes (16384 pixels)."""
MAX_NAME_CHARS = 120
"""The longest figure file name (without the format's suffix): a longer one keeps its
first characters and ends in a digest of the whole name, so names stay distinct and
stable (a file system takes 255 bytes, and a temporary name adds some)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_INDEX = re.compile(r"(\d+(?:\.\d+)*)_(.+)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ExportError(ValueError):
    """A logdir, stage, step, image, format or dpi that cannot be exported."""


@dataclass(frozen=True)
class Box:
    """Where a panel lies in a figure, in output pixels from the top-left corner."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Layout:
    """The pixel geometry of one figure (see :func:`panel_layout`)."""

    scale: int
    """Every panel pixel becomes a ``scale`` x ``scale`` block."""
    width: int
    height: int
    boxes: tuple[Box, ...]
    """One per panel, in order: the upscaled panel's place."""
    margin: int
    title_band: int
    label_band: int
    """Height of the column title above each panel."""


@dataclass(frozen=True)
class Plate:
    """One figure to draw: its file (relative to the output folder), title and panels."""

    path: Path
    title: str
    panels: tuple[tuple[str, bytes], ...]
    """``(column title, logged PNG)`` per panel."""


@dataclass(frozen=True)
class Run:
    """The tbfeat images of one run folder: tag -> step -> logged PNG (read when asked)."""

    name: str
    folder: Path
    """Relative to the logdir (``.`` for the logdir itself)."""
    tags: dict[str, Mapping[int, bytes]]


class Logged(Mapping[int, bytes]):
    """The logged PNGs of one tag by step; each is read from its event file when asked."""

    def __init__(self, reader: Reader, run: str, tag: str, steps: Iterable[int]) -> None:
        self._reader, self._run, self._tag = reader, run, tag
        self._steps = tuple(steps)

    def __getitem__(self, step: int) -> bytes:
        from .reader import NotLogged

        if step not in self._steps:
            raise KeyError(step)
        try:
            return self._reader.image(self._run, self._tag, step)
        except NotLogged as e:  # the file changed or went since it was indexed
            raise ExportError(str(e)) from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)


# --------------------------------------------------------------------------- reading
def image_tag(tag: str) -> tuple[str, str, str | None] | None:
    """``(kind, stage key, image)`` of a tbfeat image tag (:func:`tbfeat.tags.parse`),
    else ``None``.

    The stage key of a ``features/`` or ``cam/`` tag is the tag's base: the stage key and
    a stage output's position or key.

    Example:
        >>> image_tag("features/05_Concat/1/bus")
        ('features', '05_Concat/1', 'bus')
        >>> image_tag("evolution/09_SPPF"), image_tag("stats/09_SPPF/mean")
        (('evolution', '09_SPPF', None), None)
    """
    parsed = tagging.parse(tag)
    if parsed is None or parsed.kind not in tagging.IMAGE_KINDS or parsed.kind == "input":
        return None
    if parsed.kind == "overview":
        return "overview", "drift", None
    return parsed.kind, str(parsed.base), parsed.image


class Blended(Mapping[int, bytes]):
    """The ``cam/`` maps of one image by step, each drawn over the ``input/`` picture
    of the image at the latest step up to it, as a PNG. tbfeat wrote the picture with
    the first map, so a step before any picture was written before maps were stored as
    maps (a run continued after an upgrade): its ``cam/`` PNG is the overlay itself, read
    as it is, as are the ``cam/`` tags of a run with no ``input/`` tags at all."""

    def __init__(self, maps: Mapping[int, bytes], inputs: Mapping[int, bytes]) -> None:
        self._maps, self._inputs = maps, inputs
        self._input_steps = sorted(inputs)

    def __getitem__(self, step: int) -> bytes:
        from .pictures import CAM_CMAP, blend, cam_values, encode_rgb_png

        at = bisect.bisect_right(self._input_steps, step) - 1
        if at < 0:
            return self._maps[step]
        indices = decode_indices(self._maps[step], CAM_CMAP)
        image = decode_png(self._inputs[self._input_steps[at]])
        return encode_rgb_png(blend(image, cam_values(indices), CAM_CMAP))

    def __iter__(self) -> Iterator[int]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


def load_run(reader: Reader, run: str) -> Run:
    """The tbfeat image tags of one run of ``reader`` (every event file of its folder,
    every step kept; the last event of a step wins). No picture is read yet."""
    logged = {
        tag: Logged(reader, run, tag, info.steps)
        for tag, info in reader.tags(run).items()
        if info.kind == "image"
    }
    inputs = {}
    for tag, steps in logged.items():
        parsed = tagging.parse(tag)
        if parsed is not None and parsed.kind == "input":
            inputs[parsed.image] = steps
    tags: dict[str, Mapping[int, bytes]] = {}
    for tag, steps in logged.items():
        parsed = image_tag(tag)
        if parsed is not None:
            kind, _, image = parsed
            drawn = kind == "cam" and image in inputs
            tags[tag] = Blended(steps, inputs[image]) if drawn else steps
    rel = Path(run)
    name = rel.as_posix() if rel != Path(".") else (reader.logdir.resolve().name or ".")
    return Run(name=name, folder=rel, tags=tags)


def read_runs(logdir: str | os.PathLike) -> list[Run]:
    """The runs under ``logdir`` that hold tbfeat images.

    Raises:
        ExportError: no such folder, no event files, or none with tbfeat images.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise ExportError(f"logdir not found: {str(root)!r}")
    reader = Reader(root)
    names = reader.runs()
    if not names:
        raise ExportError(f"no event files under {str(root)!r}; give a logdir tbfeat wrote")
    runs = [run for run in (load_run(reader, n) for n in names) if run.tags]
    if not runs:
        raise ExportError(
            f"no tbfeat images (features/, cam/, evolution/ tags) in the event files of "
            f"{len(names)} folder(s) under {str(root)!r}"
        )
    return runs


def decode_indices(data: bytes, cmap: str) -> np.ndarray:
    """The palette indices of a logged map: a palette PNG's own, or those of the colours
    of an RGB one (a writer given to tbfeat takes RGB pictures only)."""
    from .pictures import palette_indices

    with open_picture(data) as im, _decoding():
        if im.mode == "P":
            return np.asarray(im, dtype=np.uint8)
        return palette_indices(np.asarray(im.convert("RGB"), dtype=np.uint8), cmap)


def decode_png(data: bytes) -> np.ndarray:
    """A logged PNG (palette or RGB) as an ``(H, W, 3)`` uint8 RGB array.

    Example:
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> Image.new("P", (3, 2)).save(buf, format="PNG")
        >>> decode_png(buf.getvalue()).shape
        (2, 3, 3)
    """
    with open_picture(data) as im, _decoding():
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def open_picture(data: bytes) -> Any:
    """A logged PNG opened (its header read, no pixel decoded yet), its size checked
    against :data:`MAX_PICTURE_PIXELS` and :data:`MAX_PICTURE_SIDE` first.

    Raises:
        ExportError: not a PNG, or a larger one.
    """
    from PIL import Image

    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ExportError("a logged picture is not a PNG")
    width, height = struct.unpack(">II", data[16:24])  # IHDR comes first, by the format
    if width * height > MAX_PICTURE_PIXELS or max(width, height) > MAX_PICTURE_SIDE:
        raise ExportError(
            f"a logged picture of {width} x {height} pixels is larger than export decodes "
            f"(at most {MAX_PICTURE_PIXELS} pixels, {MAX_PICTURE_SIDE} on a side)"
        )
    try:
        return Image.open(io.BytesIO(data), formats=["PNG"])
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise ExportError(
            f"a logged picture is not a readable PNG ({type(e).__name__}: {e})"
        ) from None


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Decoding a logged picture: its damage (a cut-off or corrupt stream) is an
    :class:`ExportError`."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL and zlib raise many kinds
        raise ExportError(f"a logged picture cannot be decoded ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- choosing
def _parts(key: str) -> tuple[tuple[int, ...] | None, str]:
    """``(index, name)`` of a stage key: ``"04.01_layer1.1.conv1"`` -> ``((4, 1), ...)``."""
    m = _INDEX.fullmatch(key)
    if m is None:
        return None, key
    return tuple(int(p) for p in m.group(1).split(".")), m.group(2)


def _listing(values: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _match_stage(selector: str, keys: Sequence[str]) -> list[str]:
    """The keys one selector names: the key, its index, or its name (exact case first)."""
    exact = [k for k in keys if selector in (k, k.split("/")[0])]
    if exact:
        return exact
    if re.fullmatch(r"\d+(\.\d+)*", selector):
        index = tuple(int(p) for p in selector.split("."))
        return [k for k in keys if _parts(k.split("/")[0])[0] == index]
    for fold in (str, str.casefold):
        named = [
            k
            for k in keys
            if fold(selector) in (fold(_parts(k)[1]), fold(_parts(k.split("/")[0])[1]))
        ]
        bases = sorted({k.split("/")[0] for k in named})
        if len(bases) > 1:
            raise ExportError(
                f"stage {selector!r} is ambiguous: it names {_listing(bases)}; "
                "give the stage key or its index"
            )
        if named:
            return named
    return []


def select_stages(selectors: Iterable[str] | None, keys: Iterable[str]) -> list[str]:
    """The stage keys that ``selectors`` name: a key (``09_SPPF``), its index (``9``,
    ``09``, ``04.01``) or the part after the index (``SPPF``, when one stage has it).

    Raises:
        ExportError: a selector names no stage, or more than one by its type.

    Example:
        >>> select_stages(["9", "C2f"], ["02_C2f", "09_SPPF", "12_Upsample"])
        ['02_C2f', '09_SPPF']
        >>> select_stages(None, ["02_C2f", "09_SPPF"])
        ['02_C2f', '09_SPPF']
    """
    keys = sorted(set(keys))
    if selectors is None:
        return keys
    chosen: set[str] = set()
    for selector in selectors:
        found = _match_stage(str(selector), keys)
        if not found:
            choices = keys + sorted({_parts(k)[1] for k in keys})
            raise ExportError(
                f"unknown stage {selector!r}{did_you_mean(str(selector), choices)}; "
                f"logged stages: {_listing(keys)}"
            )
        chosen.update(found)
    return sorted(chosen)


def select_images(names: Iterable[str] | None, logged: Iterable[str]) -> list[str]:
    """The image names asked for, each checked against those logged (all by default).

    Example:
        >>> select_images(None, ["zidane", "bus"])
        ['bus', 'zidane']
    """
    logged = sorted(set(logged))
    if names is None:
        return logged
    for name in names:
        if name not in logged:
            raise ExportError(
                f"unknown image {name!r}{did_you_mean(name, logged)}; "
                f"logged images: {_listing(logged)}"
            )
    return sorted(set(names))


def _ranges(steps: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    parts: list[list[int]] = []
    for s in sorted(steps):
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return _listing([f"{a}-{b}" if b > a else str(a) for a, b in parts])


def check_steps(
    steps: Iterable[int] | None, logged: Iterable[int], where: str = ""
) -> list[int] | None:
    """The steps asked for, each checked against those logged; ``None`` for all.

    Args:
        steps: Steps asked for, or ``None``.
        logged: Steps logged.
        where: What the error adds after "was not logged" (``" for the chosen stages"``).

    Example:
        >>> check_steps([3, 1], [1, 2, 3])
        [1, 3]
    """
    if steps is None:
        return None
    logged = sorted(set(logged))
    chosen = []
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ExportError(f"steps must be integers, got {step!r}")
        if step not in logged:
            near = min(logged, key=lambda s: (abs(s - step), s)) if logged else None
            hint = f" (did you mean {near}?)" if near is not None else ""
            raise ExportError(
                f"step {step} was not logged{where}{hint}; logged steps: {_ranges(logged)}"
            )
        chosen.append(step)
    return sorted(set(chosen))


# --------------------------------------------------------------------------- planning
def safe_name(text: str) -> str:
    """A file-name-safe form of a tag part, at most :data:`MAX_NAME_CHARS` long (a
    longer one ends in a digest of the whole).

    Example:
        >>> safe_name("05_Concat/1 · x")
        '05_Concat_1_x'
        >>> len(safe_name("x" * 300)), safe_name("x" * 300) != safe_name("x" * 301)
        (120, True)
    """
    name = _UNSAFE.sub("_", text).strip("_.") or "_"
    if len(name) <= MAX_NAME_CHARS:
        return name
    return f"{name[: MAX_NAME_CHARS - 9]}-{_digest(text)}"


def _digest(text: str) -> str:
    """8 hex digits that tell names apart, the same in every run."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@dataclass(frozen=True)
class Selection:
    """What :func:`plan` draws: stage keys, image names, steps (``None``: all) and
    whether the ``overview/drift`` picture (of every stage) is wanted."""

    stages: list[str]
    images: list[str]
    steps: list[int] | None = None
    overview: bool = True


def _chosen(run: Run, sel: Selection) -> dict[str, tuple]:
    """The run's tags the selection keeps, with their parsed parts."""
    kept = {}
    for tag in run.tags:
        kind, key, image = image_tag(tag)
        if kind == "overview" and not sel.overview:
            continue
        if kind == "overview" or (key in sel.stages and (image is None or image in sel.images)):
            kept[tag] = (kind, key, image)
    return kept


def _plates(run: Run, sel: Selection, many: bool) -> list[Plate]:
    """The figures of one run, in kind, stage and image order."""
    suffix, steps = f"  ({run.name})" if many else "", sel.steps
    plates = []
    order = {"features": 0, "cam": 1, "evolution": 2, "overview": 3}
    parsed = _chosen(run, sel)
    for tag, (kind, key, image) in sorted(parsed.items(), key=lambda t: (order[t[1][0]], t[0])):
        try:
            plate = _plate(run.tags[tag], kind, key, image, steps, suffix)
        except ExportError as e:
            raise ExportError(f"tag {tag!r} of run {run.name!r}: {e}") from None
        if plate is not None:
            plates.append(plate)
    return plates


def _plate(
    logged: Mapping[int, bytes],
    kind: str,
    key: str,
    image: str | None,
    steps: list[int] | None,
    suffix: str,
) -> Plate | None:
    """The figure of one tag, ``None`` when no chosen step has it."""
    if kind in ("features", "cam"):
        shown = [s for s in sorted(logged) if steps is None or s in steps]
        panels = tuple((f"step {s}", logged[s]) for s in shown)
        what = " · class activation map" if kind == "cam" else ""
        title, name = f"{key} · {image}{what}{suffix}", f"{kind}_{key}_{image}"
    else:
        last = [s for s in sorted(logged) if steps is None or s <= max(steps)]
        panels = ((f"at step {last[-1]}", logged[last[-1]]),) if last else ()
        if kind == "evolution":
            title = f"{key} · evolution (rows: images, columns: steps){suffix}"
        else:
            title = f"drift overview{suffix}"
        name = f"{kind}_{key}"
    return Plate(Path(safe_name(name)), title, panels) if panels else None


def plan(
    runs: Sequence[Run],
    stages: Iterable[str] | None = None,
    steps: Iterable[int] | None = None,
    images: Iterable[str] | None = None,
    fmt: str = "png",
) -> list[Plate]:
    """Every figure to draw, checking the selection before anything is drawn. The
    ``overview/drift`` picture, of every stage, is drawn when no stages are chosen.

    Raises:
        ExportError: an unknown stage or image, or a step not logged for them.
    """
    parsed = [p for run in runs for p in map(image_tag, run.tags)]
    sel = Selection(
        stages=select_stages(stages, {key for kind, key, _ in parsed if kind != "overview"}),
        images=select_images(images, {i for _, _, i in parsed if i is not None}),
        overview=stages is None,
    )
    logged = {s for run in runs for tag in _chosen(run, sel) for s in run.tags[tag]}
    what = " and ".join(n for n, v in (("stages", stages), ("images", images)) if v is not None)
    sel = dataclasses.replace(
        sel, steps=check_steps(steps, logged, f" for the chosen {what}" if what else "")
    )
    plates, used = [], set()
    for run in runs:
        folder = Path(*(safe_name(p) for p in run.folder.parts))
        for p in _plates(run, sel, len(runs) > 1):
            path, n = folder / f"{p.path}.{fmt}", 1
            while path in used:  # two tags that differ only in unsafe characters
                n += 1
                path = folder / f"{p.path}-{n}.{fmt}"
            used.add(path)
            plates.append(Plate(path, p.title, p.panels))
    return plates


# --------------------------------------------------------------------------- drawing
def panel_layout(shapes: Sequence[tuple[int, int]], dpi: int = 300, min_width: int = 0) -> Layout:
    """Where the panels of one figure go: one integer upscale factor for all of them,
    rows of at most about :data:`ROW_INCHES`, a column title above each panel.

    Args:
        shapes: ``(height, width)`` of each logged panel, in order.
        dpi: Output resolution; margins and bands are fixed lengths at it.
        min_width: Smallest figure width in pixels (room for a long title). Only the
            width grows; the boxes stay where they are.

    Example:
        >>> lay = panel_layout([(16, 67), (16, 67)], dpi=300)
        >>> lay.scale, lay.boxes[0].width, lay.boxes[1].x - lay.boxes[0].x
        (9, 603, 639)
    """
    if not shapes:
        raise ValueError("a figure needs at least one panel")
    widest = max(w for _, w in shapes)
    k = max(1, min(MAX_SCALE, math.ceil(PANEL_INCHES * dpi / widest)))
    margin = gap = round(MARGIN_INCHES * dpi)
    title_band, label_band = round(0.35 * dpi), round(0.25 * dpi)
    cell_w, cell_h = k * widest, k * max(h for h, _ in shapes)
    columns = max(1, min(len(shapes), int((ROW_INCHES * dpi + gap) // (cell_w + gap))))
    rows = math.ceil(len(shapes) / columns)
    boxes = []
    for i, (h, w) in enumerate(shapes):
        row, col = divmod(i, columns)
        x = margin + col * (cell_w + gap) + (cell_w - k * w) // 2
        y = margin + title_band + row * (label_band + cell_h + gap) + label_band
        boxes.append(Box(x, y, k * w, k * h))
    width = max(2 * margin + columns * cell_w + (columns - 1) * gap, min_width)
    height = 2 * margin + title_band + rows * (label_band + cell_h) + (rows - 1) * gap
    return Layout(k, width, height, tuple(boxes), margin, title_band, label_band)


def _text_width(text: str, points: float, dpi: int) -> int:
    """The width of one line of text in pixels at ``dpi``, as Agg draws it."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(1, 1, dpi)
    width, _, _ = renderer.get_text_width_height_descent(text, FontProperties(size=points), False)
    return math.ceil(width)


def render(plate: Plate, path: Path, fmt: str = "png", dpi: int = 300) -> None:
    """Draw one figure into ``path`` (a new temporary file, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: draw(plate, f, fmt, dpi), durable=False)


def draw(plate: Plate, file: IO[bytes], fmt: str = "png", dpi: int = 300) -> None:
    """Draw one figure into a binary file.

    The panels lie where :func:`panel_layout` puts them; the title is left-aligned above
    them, and the figure grows to the right where the title is the wider.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arrays = [decode_png(png) for _, png in plate.panels]
    room = _text_width(plate.title, TITLE_PT, dpi) + 2 * round(MARGIN_INCHES * dpi)
    lay = panel_layout([a.shape[:2] for a in arrays], dpi, min_width=room)
    # a quarter pixel more: the canvas truncates its float size to whole pixels
    fig = Figure(figsize=((lay.width + 0.25) / dpi, (lay.height + 0.25) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")

    def text(x: float, y: float, s: str, points: int, ha: str = "center") -> None:
        fig.text(x / lay.width, 1 - y / lay.height, s, ha=ha, va="center", fontsize=points,
                 color="black", parse_math=False, usetex=False)  # fmt: skip

    for (label, _), a, box in zip(plate.panels, arrays, lay.boxes, strict=True):
        big = np.repeat(np.repeat(a, lay.scale, axis=0), lay.scale, axis=1)
        fig.figimage(big, xo=box.x, yo=lay.height - box.y - box.height, origin="upper")
        text(box.x + box.width / 2, box.y - lay.label_band / 2, label, LABEL_PT)
    text(lay.margin, lay.margin + lay.title_band / 2, plate.title, TITLE_PT, ha="left")
    fig.savefig(file, format=fmt, dpi=dpi, facecolor="white")


def _check_output(out: Path, fmt: str, dpi: int) -> str:
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ExportError(
            f"unknown format {fmt!r}{did_you_mean(fmt, FORMATS)}; allowed: {', '.join(FORMATS)}"
        )
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < MIN_DPI:
        raise ExportError(f"dpi must be an integer >= {MIN_DPI}, got {dpi!r}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file; give a folder")
    return fmt


def export(
    logdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    stages: Iterable[str] | None = None,
    steps: Iterable[int] | None = None,
    images: Iterable[str] | None = None,
    fmt: str = "png",
    dpi: int = DPI,
) -> list[Path]:
    """Draw figures of what tbfeat logged under ``logdir`` into ``out``; no model needed.

    Per run folder (``out/<run>/``, or ``out`` itself for events directly in ``logdir``):
    ``features_<stage>_<image>`` and ``cam_<stage>_<image>`` show the chosen steps side by
    side; ``evolution_<stage>`` and ``overview_drift`` (every stage's drift, so only when
    no ``stages`` are chosen) show the picture logged last (with ``steps``, the last one
    up to the latest step chosen). Everything is checked before the first file is written.

    Args:
        logdir: A run folder, or a folder of runs (a sweep beside a training, ...).
        out: Folder the figures go to (created).
        stages: Stage keys (``09_SPPF``), indices (``9``) or types (``SPPF``, if unique);
            default all.
        steps: Logged steps to show; default all.
        images: Image names (the ``<image>`` of the tags); default all.
        fmt: ``"png"`` (at ``dpi``), ``"pdf"`` or ``"svg"`` (vector, panels embedded).
        dpi: Resolution, at least 72; sets the physical size of the panels and text.

    Returns:
        The files written, in order.

    Raises:
        ExportError: no tbfeat images under ``logdir``, an unknown stage or image, a step
            not logged, a bad format or dpi.

    Example:
        >>> from tbfeat.export import export
        >>> export("runs/sweep", "figures", stages=["9"], steps=[1, 10])  # doctest: +SKIP
        [PosixPath('figures/features_09_SPPF_bus.png'), ...]
    """
    out = Path(out)
    fmt = _check_output(out, fmt, dpi)
    runs = read_runs(logdir)
    plates = plan(
        runs,
        stages=None if stages is None else [str(s) for s in stages],
        steps=None if steps is None else list(steps),
        images=None if images is None else list(images),
        fmt=fmt,
    )
    for plate in plates:  # every picture's header, before the first figure is written
        try:
            for _, png in plate.panels:
                open_picture(png).close()
        except ExportError as e:
            raise ExportError(f"figure {str(plate.path)!r} ({plate.title}): {e}") from None
    written = []
    for plate in plates:
        try:
            render(plate, out / plate.path, fmt, dpi)
        except ExportError as e:
            raise ExportError(f"figure {str(plate.path)!r} ({plate.title}): {e}") from None
        written.append(out / plate.path)
    return written
