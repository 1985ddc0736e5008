"""Which stages are still learning: drift (1 - linear CKA) between logged steps, and a
per-stage strip of channel-mean maps over the whole training history.

Linear CKA (centered kernel alignment, Kornblith et al. 2019) compares two sets of
activations of the same inputs, rows = samples (positions of the probe images), columns =
channels: ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
``Xc``, ``Yc``. It is 1 for identical activations and is unchanged by a permutation or an
orthogonal rotation of the channels and by an isotropic scaling; ``1 - CKA`` is the drift.

The history a stage needs (its first and latest samples, its last strip cells) is small,
kept in ``<logdir>/tbfeat-history.pt`` (tensors only: it loads with ``weights_only=True``),
and picked up again when a run resumes or a sweep goes on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .render import SEPARATOR_INDEX, quantize

HISTORY_FILE = "tbfeat-history.pt"


@torch.no_grad()
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``(samples, features)`` matrices with the same rows.

    Example:
        >>> import torch
        >>> x = torch.randn(200, 8)
        >>> round(linear_cka(x, x[:, torch.randperm(8)] * 3.0), 6)
        1.0
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must be (samples, features) with the same samples, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if float(norm) == 0.0:  # a constant stage: nothing to compare
        return 1.0 if torch.equal(x, y) else 0.0
    return float(cross / norm)


def sample_positions(height: int, width: int, count: int) -> torch.Tensor:
    """``count`` fixed flat positions of an ``height x width`` map (all when fewer):
    the same for the same size at every step, spread by a seeded permutation."""
    total = height * width
    if total <= count:
        return torch.arange(total)
    g = torch.Generator().manual_seed(height * 100003 + width)
    return torch.randperm(total, generator=g)[:count].sort().values


@torch.no_grad()
def sample_rows(x: torch.Tensor, per_image: int) -> torch.Tensor:
    """``(N * P, C)`` float16 rows of a ``(N, C, H, W)`` map at :func:`sample_positions`."""
    n, c, h, w = x.shape
    idx = sample_positions(h, w, per_image).to(x.device)
    picked = x[:, :, idx // w, idx % w]  # (n, c, p): a gather, whatever the memory layout
    return picked.permute(0, 2, 1).reshape(-1, c).to(torch.float16).cpu()


@torch.no_grad()
def mean_map_cell(x: torch.Tensor, size: int) -> np.ndarray:
    """Palette indices ``(N, h, w)`` of each image's channel-mean map, pooled to ``size``."""
    m = x.float().mean(1, keepdim=True)
    k = max(1, math.ceil(max(m.shape[-2:]) / size))
    if k > 1:
        m = F.avg_pool2d(m, kernel_size=k, stride=k, ceil_mode=True)
    return quantize(m.contiguous(), dims=(2, 3))[:, 0].cpu().numpy()


@dataclass
class StageHistory:
    """What drift and the evolution strip of one stage remember between steps."""

    shape: tuple[int, int] = (0, 0)
    names: tuple[str, ...] = ()
    first: torch.Tensor | None = None
    last: torch.Tensor | None = None
    last_step: int | None = None
    cells: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


class History:
    """The per-stage histories of a run, saved in its logdir."""

    def __init__(self, path: Path | None, keep: int = 32) -> None:
        self.path = path
        self.keep = keep
        self.stages: dict[str, StageHistory] = {}
        if path is not None and path.is_file():
            self._load(path)

    def update(
        self,
        base: str,
        step: int,
        rows: torch.Tensor | None,
        shape: tuple[int, int],
        names: tuple[str, ...],
        cells: dict[str, np.ndarray],
    ) -> dict[str, float]:
        """Record one step of a stage; return ``{"": drift, "_vs_first": drift}`` (empty
        on its first step, or when the probes or the map size changed)."""
        h = self.stages.get(base)
        if h is None or h.shape != shape or h.names != names:
            h = self.stages[base] = StageHistory(shape=shape, names=names)
        out: dict[str, float] = {}
        if rows is not None:
            if h.last is not None and h.last_step is not None and step > h.last_step:
                if h.last.shape == rows.shape:
                    out[""] = 1.0 - linear_cka(rows, h.last)
                if h.first is not None and h.first.shape == rows.shape:
                    out["_vs_first"] = 1.0 - linear_cka(rows, h.first)
            if h.first is None:
                h.first = rows
            if h.last_step is None or step >= h.last_step:
                h.last, h.last_step = rows, step
        if cells:
            h.cells[step] = cells
            for old in sorted(h.cells)[: -self.keep]:
                del h.cells[old]
        return {k: max(0.0, min(1.0, v)) for k, v in out.items()}

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
        """Write the histories (tensors only) atomically."""
        if self.path is None:
            return
        data: dict[str, Any] = {"version": 1, "stages": {}}
        for base, h in self.stages.items():
            steps = sorted(h.cells)
            names = list(dict.fromkeys(n for s in steps for n in h.cells[s]))
            data["stages"][base] = {
                "shape": list(h.shape),
                "names": list(h.names),
                "first": h.first,
                "last": h.last,
                "last_step": h.last_step,
                "cell_steps": steps,
                "cell_names": names,
                "cells": {
                    f"{s}/{n}": torch.from_numpy(h.cells[s][n].copy())
                    for s in steps
                    for n in h.cells[s]
                },
            }
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(data, tmp)
        os.replace(tmp, self.path)

    def _load(self, path: Path) -> None:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            for base, d in data["stages"].items():
                h = StageHistory(
                    shape=tuple(d["shape"]),
                    names=tuple(d["names"]),
                    first=d["first"],
                    last=d["last"],
                    last_step=d["last_step"],
                )
                for key, cell in d["cells"].items():
                    s, name = key.split("/", 1)
                    h.cells.setdefault(int(s), {})[name] = cell.numpy()
                self.stages[base] = h
        except Exception as e:  # a damaged history starts over; the events are unaffected
            import warnings

            warnings.warn(
                f"tbfeat: history {str(path)!r} unreadable ({type(e).__name__}); starting over",
                RuntimeWarning,
                stacklevel=2,
            )
            self.stages = {}
