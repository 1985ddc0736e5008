"""Which stages are still learning: drift (1 - linear CKA) between logged steps, and a
per-stage strip of channel-mean maps over the whole training history.

Linear CKA (centered kernel alignment, Kornblith et al. 2019) compares two sets of
activations of the same inputs, rows = samples (positions of the probe images), columns =
channels: ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
``Xc``, ``Yc``. It is 1 for identical activations and is unchanged by a permutation or an
orthogonal rotation of the channels and by an isotropic scaling; ``1 - CKA`` is the drift.

The history a stage needs (its first and latest samples, its last strip cells) is small,
kept in ``<logdir>/tbfeat-history.pt`` (tensors only: it loads with ``weights_only=True``,
checked against the ``HISTORY_MAX_*`` limits before use), and picked up again when a run
resumes or a sweep goes on.
"""

from __future__ import annotations

import functools
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write, open_regular
from .notes import warn
from .pictures import SEPARATOR_INDEX
from .render import quantize

HISTORY_FILE = "tbfeat-history.pt"
HISTORY_MAX_BYTES = 2**30
"""The largest history loaded: its file, and all its tensors together (1 GiB)."""
HISTORY_MAX_PICKLE = 64 * 2**20
"""The most bytes of plain values (stage keys, names, step lists) in a history file."""
HISTORY_MAX_STAGES = 4096
"""The most stages a history holds."""
HISTORY_MAX_STEPS = 1024
"""The most kept steps (evolution cells, drift values) per stage: ``evolution_steps``
when that is larger."""
HISTORY_MAX_IMAGES = 1024
"""The most probe image names per stage."""
HISTORY_MAX_ITEMS = 2**20
"""The most strip cells (steps x images) and drift values of all stages together."""
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.no_grad()
def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """``Xc Xc^T`` (samples x samples, float32) of column-centred ``x``: what linear CKA
    needs of one matrix. Cheap for few samples, however many channels."""
    x = x if x.dtype == torch.float64 else x.float()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def cka_from_grams(kx: torch.Tensor, ky: torch.Tensor) -> float:
    """Linear CKA from two :func:`centred_gram` results of the same samples."""
    if kx.shape != ky.shape:
        raise ValueError(f"grams of different samples: {tuple(kx.shape)} and {tuple(ky.shape)}")
    kx, ky = kx.double(), ky.double()
    norm = float(torch.sqrt((kx * kx).sum() * (ky * ky).sum()))
    if norm == 0.0:  # a constant stage: nothing to compare
        return 1.0 if torch.equal(kx, ky) else 0.0
    return float((kx * ky).sum()) / norm


@functools.lru_cache(maxsize=256)
def _positions(height: int, width: int, count: int) -> torch.Tensor:
    """``count`` fixed flat positions of an ``height x width`` map (all when fewer):
    the same for the same size at every step, spread by a seeded permutation. Cached:
    callers must not change it."""
    total = height * width
    if total <= count:
        return torch.arange(total)
    g = torch.Generator().manual_seed(height * 100003 + width)
    return torch.randperm(total, generator=g)[:count].sort().values


def sample_positions(height: int, width: int, count: int) -> torch.Tensor:
    """The positions :func:`sample_rows` reads, as a new tensor: ``count`` fixed flat
    positions of an ``height x width`` map (all when fewer)."""
    return _positions(height, width, count).clone()  # cached: the caller may change its copy


@torch.no_grad()
def sample_rows(x: torch.Tensor, per_image: int) -> torch.Tensor:
    """``(N * P, C)`` float16 rows of a ``(N, C, H, W)`` map at fixed positions, the same
    for a map size at every step.

    Row ``i * P + j`` holds the channels of image ``i`` at its ``j``-th position. Only
    the sampled positions are read, whatever the layout of ``x``: nothing of the size of
    the map is copied.
    """
    n, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view
    if h * w <= per_image:  # every position: the map is no larger than the rows
        return pixels.reshape(-1, c).to(torch.float16).cpu()
    idx = _positions(h, w, per_image).to(x.device)
    if x.is_contiguous(memory_format=torch.channels_last):
        picked = pixels.reshape(n, h * w, c).index_select(1, idx)  # rows of a view
    else:
        picked = pixels[:, idx // w, idx % w]  # a gather of the positions alone
    return picked.reshape(-1, c).to(torch.float16).cpu()


@torch.no_grad()
def mean_map_cell(x: torch.Tensor, size: int) -> np.ndarray:
    """Palette indices ``(N, h, w)`` of each image's channel-mean map, pooled to ``size``."""
    m = x.mean(1, keepdim=True, dtype=torch.float32)  # no float copy of a half-precision map
    k = max(1, math.ceil(max(m.shape[-2:]) / size))
    if k > 1:
        m = F.avg_pool2d(m, kernel_size=k, stride=k, ceil_mode=True)
    return quantize(m.contiguous(), dims=(2, 3))[:, 0].cpu().numpy()


@dataclass
class StageHistory:
    """What drift and the evolution strip of one stage remember between steps.

    ``first`` and ``last`` are the sampled rows (float16) of the stage's first and latest
    step, or ``None`` where only their centred Gram matrix is known: a saved history keeps
    whichever of the two is smaller. ``sizes`` holds the rows' shape either way.
    """

    shape: tuple[int, int] = (0, 0)
    names: tuple[str, ...] = ()
    first: torch.Tensor | None = None
    last: torch.Tensor | None = None
    last_step: int | None = None
    cells: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    drifts: dict[int, float] = field(default_factory=dict)
    """Drift against the step before, by step (the overview's columns)."""
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def gram(self, which: str) -> torch.Tensor | None:
        """The centred Gram matrix of ``"first"`` or ``"last"``; ``None`` if there is none."""
        if which not in self.grams:
            rows = self.first if which == "first" else self.last
            if rows is None:
                return None
            self.grams[which] = centred_gram(rows)
        return self.grams[which]

    def keep(self, which: str, rows: torch.Tensor, gram: torch.Tensor) -> None:
        """Remember ``rows`` (and their ``gram``) as the ``"first"`` or ``"last"`` sample."""
        setattr(self, which, rows)
        self.grams[which], self.sizes[which] = gram, tuple(rows.shape)


class History:
    """What a run remembers between steps and across processes, saved in its logdir.

    The first and last step the run logged (a logger that starts at or below the last one
    starts a new run) and, per stage, drift samples and evolution cells. Saved atomically
    (a temporary file in the same folder, then a rename) at the end of every step.
    """

    def __init__(self, path: Path | None, keep: int = 32) -> None:
        self.path = path
        self.keep = keep
        self.stages: dict[str, StageHistory] = {}
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.dirty = False

    @classmethod
    def load(cls, path: Path | None, keep: int = 32) -> History:
        """The history saved at ``path``, or an empty one; a damaged file, or one beyond
        the ``HISTORY_MAX_*`` limits, is moved aside with one warning."""
        history = cls(path, keep)
        if path is not None and path.is_file():
            history._load(path)
        return history

    def saw_step(self, step: int) -> None:
        """Record that the run logged ``step``."""
        if self.first_step is None or step < self.first_step:
            self.first_step = step
        if self.last_step is None or step > self.last_step:
            self.last_step = step
        self.dirty = True

    def update(
        self,
        base: str,
        step: int,
        rows: torch.Tensor | None,
        shape: tuple[int, int],
        names: tuple[str, ...],
        cells: dict[str, np.ndarray],
    ) -> dict[str, float]:
        """Record one step of a stage; return ``{"before": drift, "first": drift}``, the
        drift against the step before and against the first step (empty on its first
        step, or when the probes or the map size changed)."""
        self.dirty = True
        h = self.stages.get(base)
        if h is None or h.shape != shape or h.names != names:
            h = self.stages[base] = StageHistory(shape=shape, names=names)
        out: dict[str, float] = {}
        if rows is not None:
            gram, size = centred_gram(rows), tuple(rows.shape)
            if "last" in h.sizes and h.last_step is not None and step > h.last_step:
                if h.sizes["last"] == size:
                    out["before"] = 1.0 - cka_from_grams(gram, h.gram("last"))
                if h.sizes.get("first") == size:
                    out["first"] = 1.0 - cka_from_grams(gram, h.gram("first"))
            if h.sizes.get("first") != size:  # none yet, or sampled otherwise before
                h.keep("first", rows, gram)
            if h.last_step is None or step >= h.last_step:
                h.keep("last", rows, gram)
                h.last_step = step
        if cells:
            h.cells[step] = cells
            for old in sorted(h.cells)[: -self.keep]:
                del h.cells[old]
        out = {k: max(0.0, min(1.0, v)) for k, v in out.items()}
        if "before" in out:
            h.drifts[step] = out["before"]
            for old in sorted(h.drifts)[: -self.keep]:
                del h.drifts[old]
        return out

    def overview(self) -> tuple[list[str], list[int], np.ndarray] | None:
        """Every stage's drift against the step before, over the kept steps: the stage
        keys in order (rows), the steps (columns) and the values (NaN where none)."""
        bases = sorted(b for b, h in self.stages.items() if h.drifts)
        if not bases:
            return None
        steps = sorted({s for b in bases for s in self.stages[b].drifts})[-self.keep :]
        values = np.full((len(bases), len(steps)), np.nan, np.float32)
        for i, base in enumerate(bases):
            for j, step in enumerate(steps):
                values[i, j] = self.stages[base].drifts.get(step, np.nan)
        return bases, steps, values

    def strip(self, base: str) -> np.ndarray | None:
        """The evolution strip: columns = the kept steps in order, rows = probe images."""
        h = self.stages.get(base)
        if h is None or not h.cells:
            return None
        steps = sorted(h.cells)
        names = list(dict.fromkeys(n for s in steps for n in h.cells[s]))
        ch, cw = next(iter(h.cells[steps[-1]].values())).shape
        grid = np.full(
            (len(names) * (ch + 1) - 1, len(steps) * (cw + 1) - 1), SEPARATOR_INDEX, np.uint8
        )
        for j, s in enumerate(steps):
            for i, name in enumerate(names):
                cell = h.cells[s].get(name)
                if cell is not None and cell.shape == (ch, cw):
                    grid[i * (ch + 1) : i * (ch + 1) + ch, j * (cw + 1) : j * (cw + 1) + cw] = cell
        return grid

    def save(self) -> None:
        """Write the run's steps and the stages' histories (tensors only) atomically: a
        temporary file of this process in the same folder, then a rename."""
        if self.path is None or not self.dirty:
            return
        data: dict[str, Any] = {
            "version": 4,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "stages": {base: _stage_record(h) for base, h in self.stages.items()},
        }
        atomic_write(self.path, lambda f: torch.save(data, f))
        self.dirty = False

    def _load(self, path: Path) -> None:
        """Load a saved history, checked against the limits before anything is built
        from it; one that fails is moved aside and the run starts a fresh history."""
        try:
            data = _read_history(path)
            _check_history(data, max(HISTORY_MAX_STEPS, self.keep))
            self.first_step = data.get("first_step")
            self.last_step = data.get("last_step")
            for base, d in data["stages"].items():
                self.stages[base] = _stage_from_record(d)
                if self.last_step is None and d["last_step"] is not None:  # version 2 files
                    self.last_step = max(d["last_step"], *d["cell_steps"])
        except Exception as e:  # a damaged history starts over; the events are unaffected
            self.stages, self.first_step, self.last_step = {}, None, None
            aside = _move_aside(path)
            where = f"moved to {str(aside)!r}" if aside else "it could not be moved aside"
            warn(
                f"history {str(path)!r} is unreadable ({type(e).__name__}: {e}); {where}, "
                "and the run starts a fresh history"
            )


class HistoryError(ValueError):
    """A saved history that is damaged or beyond the limits (``HISTORY_MAX_*``)."""


def _read_history(path: Path) -> Any:
    """Unpickle a history file (tensors and plain values only), never through a link,
    after checking its size and that of its plain values: what loading materialises is
    at most about the file's size; the tensors' shapes are checked after."""
    with os.fdopen(open_regular(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > HISTORY_MAX_BYTES:
            raise HistoryError(f"{size} bytes, more than {HISTORY_MAX_BYTES}")
        with zipfile.ZipFile(f) as archive:
            pickled = sum(i.file_size for i in archive.infolist() if i.filename.endswith(".pkl"))
        if pickled > HISTORY_MAX_PICKLE:
            raise HistoryError(f"{pickled} bytes of plain values, more than {HISTORY_MAX_PICKLE}")
        f.seek(0)
        return torch.load(f, map_location="cpu", weights_only=True)


def _check_history(data: Any, max_steps: int) -> None:
    """Raise :class:`HistoryError` unless ``data`` has the saved history's form and
    stays within the limits; only shapes, strides and sizes are read."""
    _check_type("the history", data, dict)
    for key in ("first_step", "last_step"):
        _check_step(key, data.get(key))
    stages = data.get("stages")
    _check_type("stages", stages, dict)
    if len(stages) > HISTORY_MAX_STAGES:
        raise HistoryError(f"{len(stages)} stages, more than {HISTORY_MAX_STAGES}")
    nbytes = items = 0
    for base, d in stages.items():
        _check_type("a stage key", base, str)
        _check_type(f"stage {base!r}", d, dict)
        b, n = _check_stage_record(base, d, max_steps)
        nbytes, items = nbytes + b, items + n
    if nbytes > HISTORY_MAX_BYTES:
        raise HistoryError(f"{nbytes} bytes of tensors, more than {HISTORY_MAX_BYTES}")
    if items > HISTORY_MAX_ITEMS:
        raise HistoryError(f"{items} cells and drift values, more than {HISTORY_MAX_ITEMS}")


def _check_stage_record(base: str, d: dict, max_steps: int) -> tuple[int, int]:
    """Check one stage's record; return its tensors' bytes and its cells + drift values."""
    _check_ints(f"{base}.shape", d.get("shape"), 2, 2)
    _check_strs(f"{base}.names", d.get("names"))
    _check_step(f"{base}.last_step", d.get("last_step"))
    steps = _check_ints(f"{base}.cell_steps", d.get("cell_steps"), 0, max_steps)
    names = _check_strs(f"{base}.cell_names", d.get("cell_names"))
    drift_steps = _check_ints(f"{base}.drift_steps", d.get("drift_steps", []), 0, max_steps)
    values = d.get("drift_values", [])
    _check_type(f"{base}.drift_values", values, list)
    if len(values) != drift_steps or not all(_is_number(v) for v in values):
        raise HistoryError(f"{base}.drift_values are not {drift_steps} numbers")
    cells = d.get("cells")
    nbytes = _check_tensor(f"{base}.cells", cells, (torch.uint8,), (steps, names, -1, -1), True)
    if steps and (not names or cells is None or 0 in cells.shape[2:]):
        raise HistoryError(f"{base}.cells are missing for {steps} steps")
    for which in ("first", "last"):
        nbytes += _check_sample(f"{base}.{which}", d, which)
    return nbytes, steps * names + drift_steps


def _check_sample(what: str, d: dict, which: str) -> int:
    """Check the ``"first"`` or ``"last"`` sample of a stage's record: rows, or a square
    Gram matrix, of the size recorded; return their bytes."""
    rows, gram, size = d.get(which), d.get(f"{which}_gram"), d.get(f"{which}_size")
    nbytes = _check_tensor(what, rows, FLOATS, (-1, -1), True)
    nbytes += _check_tensor(f"{what}_gram", gram, FLOATS, (-1, -1), True)
    if size is None:
        return nbytes
    _check_ints(f"{what}_size", size, 2, 2)
    n = size[0]
    if not (rows is not None and list(rows.shape) == list(size)) and not (
        gram is not None and tuple(gram.shape) == (n, n)
    ):
        raise HistoryError(f"{what} holds no rows or Gram matrix of size {list(size)}")
    return nbytes


def _check_tensor(
    what: str, t: Any, dtypes: tuple, shape: tuple[int, ...], optional: bool = False
) -> int:
    """Check a tensor's dtype, shape (``-1``: any size), strides and storage without
    reading its elements; return its size in bytes."""
    if t is None and optional:
        return 0
    _check_type(what, t, torch.Tensor)
    if t.dtype not in dtypes or t.dim() != len(shape):
        raise HistoryError(f"{what} is a {t.dim()}-d {t.dtype} tensor")
    if any(want not in (-1, got) for want, got in zip(shape, t.shape, strict=True)):
        raise HistoryError(f"{what} has shape {tuple(t.shape)}, not {shape}")
    nbytes = t.numel() * t.element_size()
    if nbytes > HISTORY_MAX_BYTES:
        raise HistoryError(f"{what} claims {nbytes} bytes, more than {HISTORY_MAX_BYTES}")
    # a view that repeats its elements (a zero stride) or reaches past its storage would
    # make its copies far larger than the file: refused before anything is copied
    if not t.is_contiguous() or t.untyped_storage().nbytes() < (
        t.storage_offset() * t.element_size() + nbytes
    ):
        raise HistoryError(f"{what} is not a contiguous tensor within its storage")
    return nbytes


def _check_type(what: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise HistoryError(f"{what} is a {type(value).__name__}, not a {kind.__name__}")


def _check_step(what: str, value: Any) -> None:
    if value is not None and not _is_int(value):
        raise HistoryError(f"{what} is {type(value).__name__} {value!r}, not a step")


def _check_ints(what: str, value: Any, least: int, most: int) -> int:
    """Check a list of ints of length ``least..most``; return its length."""
    if not isinstance(value, list | tuple) or not least <= len(value) <= most:
        raise HistoryError(f"{what} is not a list of {least} to {most} ints")
    if not all(_is_int(v) for v in value):
        raise HistoryError(f"{what} holds something else than ints")
    return len(value)


def _check_strs(what: str, value: Any) -> int:
    """Check a list of at most ``HISTORY_MAX_IMAGES`` strings; return its length."""
    if not isinstance(value, list | tuple) or len(value) > HISTORY_MAX_IMAGES:
        raise HistoryError(f"{what} is not a list of at most {HISTORY_MAX_IMAGES} names")
    if not all(isinstance(v, str) for v in value):
        raise HistoryError(f"{what} holds something else than names")
    return len(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _move_aside(path: Path) -> Path | None:
    """Rename a bad history to ``<name>.bad-<time>`` (a free name); None if it cannot be."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        aside = path.with_name(f"{path.name}.bad-{stamp}" + (f"-{n}" if n else ""))
        if os.path.lexists(aside):
            continue
        try:
            os.rename(path, aside)
        except OSError:
            return None
        return aside
    return None


def _stage_record(h: StageHistory) -> dict[str, Any]:
    """One stage's history as tensors and plain values: its samples and one
    ``(steps, images, h, w)`` uint8 block of strip cells."""
    steps = sorted(h.cells)
    names = list(dict.fromkeys(n for s in steps for n in h.cells[s]))
    block = None
    if steps:
        ch, cw = next(iter(h.cells[steps[-1]].values())).shape
        block = np.full((len(steps), len(names), ch, cw), SEPARATOR_INDEX, np.uint8)
        for i, s in enumerate(steps):
            for j, n in enumerate(names):
                cell = h.cells[s].get(n)
                if cell is not None and cell.shape == (ch, cw):
                    block[i, j] = cell
        block = torch.from_numpy(block)
    return {
        "shape": list(h.shape),
        "names": list(h.names),
        **_sample_record(h, "first"),
        **_sample_record(h, "last"),
        "last_step": h.last_step,
        "cell_steps": steps,
        "cell_names": names,
        "cells": block,
        "drift_steps": sorted(h.drifts),
        "drift_values": [h.drifts[s] for s in sorted(h.drifts)],
    }


def _sample_record(h: StageHistory, which: str) -> dict[str, Any]:
    """``"first"`` or ``"last"`` for saving: the float16 rows, or the float32 centred Gram
    matrix (all that drift needs) when it is smaller (more channels than twice the rows)."""
    size = h.sizes.get(which)
    rows = getattr(h, which)
    if size is not None and (rows is None or size[1] > 2 * size[0]):
        rows, gram = None, h.gram(which)
    else:
        gram = None
    return {which: rows, f"{which}_gram": gram, f"{which}_size": list(size or ()) or None}


def _stage_from_record(d: dict[str, Any]) -> StageHistory:
    h = StageHistory(shape=tuple(d["shape"]), names=tuple(d["names"]), last_step=d["last_step"])
    for which in ("first", "last"):
        rows, gram = d[which], d.get(f"{which}_gram")  # version 3 files: rows only
        size = d.get(f"{which}_size") or (list(rows.shape) if rows is not None else None)
        if size:
            setattr(h, which, rows)
            h.sizes[which] = tuple(size)
            if gram is not None:
                h.grams[which] = gram
    h.drifts = dict(zip(map(int, d.get("drift_steps", [])), d.get("drift_values", []), strict=True))
    block = d["cells"]
    if block is not None:
        for i, s in enumerate(d["cell_steps"]):
            h.cells[int(s)] = {n: block[i, j].numpy() for j, n in enumerate(d["cell_names"])}
    return h
