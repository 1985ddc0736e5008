"""Activation statistics computed on the tensor's device and merged over a step's forwards."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

STAT_NAMES = (
    "mean",
    "std",
    "min",
    "max",
    "zero_fraction",
    "negative_fraction",
    "nonfinite_count",
)
"""Scalars written under ``stats/<NN>_<Type>/<name>``."""

HIST_SAMPLE = 16384
"""Histograms bin every ``ceil``-th value so that at most about this many are binned."""


@dataclass(frozen=True)
class StatsSummary:
    """Statistics of one stage's activations at one step.

    ``mean``, ``std`` (population, ``ddof=0``), ``min``, ``max`` and the fractions cover the
    finite values; ``nonfinite_count`` counts NaN and Inf. The histogram covers the finite
    values: ``hist_counts[i]`` values lie in ``[hist_edges[i], hist_edges[i + 1]]``.
    """

    count: int
    nonfinite_count: int
    mean: float
    std: float
    min: float
    max: float
    zero_fraction: float
    negative_fraction: float
    sum: float
    sum_squares: float
    hist_edges: np.ndarray
    hist_counts: np.ndarray

    def scalars(self) -> dict[str, float]:
        """The scalars of :data:`STAT_NAMES`; with no finite value only ``nonfinite_count``."""
        if self.count == 0:
            return {"nonfinite_count": float(self.nonfinite_count)}
        return {name: float(getattr(self, name)) for name in STAT_NAMES}


class RunningStats:
    """Accumulates :class:`StatsSummary` inputs over several batches on the device.

    Each :meth:`update` reduces a batch to a handful of device scalars and a ``bins``-bucket
    histogram; nothing of the activation itself is kept. :meth:`summary` moves those few
    numbers to the CPU once and merges them (Chan et al.'s formula for mean and variance;
    histograms of several batches are re-binned onto their joint range by bucket centre).

    Example:
        >>> import torch
        >>> from tbfeat.stats import RunningStats
        >>> rs = RunningStats(bins=4)
        >>> rs.update(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        >>> rs.summary().mean
        1.5
    """

    def __init__(self, bins: int = 64) -> None:
        self.bins = bins
        self._rows: list[list[float]] = []
        self._counts: list[torch.Tensor] = []
        self._hists: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the values of ``x`` (any shape, any real dtype); ``x`` is not modified.

        Exact statistics from a few fast passes (min/max, sum, sum of squares, zero and
        negative counts; the counts are skipped when min/max already decide them, and a
        centred second pass runs only when the mean dwarfs the spread). The histogram
        bins a fixed-size strided sample of :data:`HIST_SAMPLE` values between the exact
        min and max, its counts scaled to the number of values. NaN/Inf are filtered
        out only when min/max show there are some. One device-to-host read per call.
        """
        flat = flat_view(x.detach())
        if flat.dtype in (torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16):
            flat = flat.float()
        elif not flat.is_floating_point():  # int32/int64: float32 would round large values
            flat = flat.double()
        numel = flat.numel()
        if numel == 0:
            return
        lo, hi = torch.aminmax(flat)
        total, squares = flat.sum(), torch.dot(flat, flat)
        lo_f, hi_f, sum_f, sq_f = torch.stack([lo, hi, total, squares]).tolist()
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)):  # NaN propagates into min/max
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                self._rows.append([0.0, float(numel), math.nan, math.nan, math.nan, math.nan])
                self._counts.append(torch.zeros(2, dtype=torch.float64, device=flat.device))
                self._hists.append(torch.zeros(self.bins, device=flat.device))
                return
            lo, hi = torch.aminmax(flat)
            total, squares = flat.sum(), torch.dot(flat, flat)
            lo_f, hi_f, sum_f, sq_f = torch.stack([lo, hi, total, squares]).tolist()
        n = flat.numel()
        if not (math.isfinite(sum_f) and math.isfinite(sq_f)) and flat.dtype != torch.float64:
            flat = flat.double()  # |values| near the float32 limit: sums overflow
            sum_f, sq_f = torch.stack([flat.sum(), torch.dot(flat, flat)]).tolist()
        mean = sum_f / n
        m2 = sq_f - sum_f * mean
        if not math.isfinite(sq_f) or m2 < 1e-3 * sq_f:  # cancellation: centre first
            centred = flat - mean
            m2 = float(torch.dot(centred, centred))
            if not math.isfinite(m2):  # beyond float32 even centred
                centred = flat.double() - mean
                m2 = float(torch.dot(centred, centred))
        zero = torch.zeros((), dtype=torch.float64, device=flat.device)
        nonzero = None if (lo_f > 0 or hi_f < 0) else torch.count_nonzero(flat)
        zeros = zero if nonzero is None else n - nonzero
        if lo_f >= 0:
            negatives = zero
        elif hi_f < 0:
            negatives = zero + n
        elif n < 2**24:  # sign sums are exact in float32: positives - negatives
            negatives = (nonzero - torch.sign(flat).sum()) / 2
        else:
            negatives = torch.count_nonzero(flat.lt(0))
        step = max(1, n // HIST_SAMPLE)
        sample = flat[::step]
        scale = max(abs(lo_f), abs(hi_f), 1.0) if max(abs(lo_f), abs(hi_f)) > 1e38 else 1.0
        hist = torch.histc(
            (sample / scale).float() if scale != 1.0 else sample.float(),
            self.bins,
            lo_f / scale,
            hi_f / scale,
        )
        if sample.numel() != n:
            hist = hist * (n / sample.numel())
        self._rows.append([float(n), float(numel - n), mean, max(m2, 0.0), lo_f, hi_f])
        self._counts.append(torch.stack([zeros.to(torch.float64), negatives.to(torch.float64)]))
        self._hists.append(hist)

    def summary(self) -> StatsSummary | None:
        """Merge what was added into a :class:`StatsSummary`; ``None`` if nothing was."""
        if not self._rows:
            return None
        rows = np.asarray(self._rows, dtype=np.float64)
        counts = torch.stack(self._counts).cpu().numpy()
        hists = torch.stack(self._hists).cpu().to(torch.float64).numpy()
        n, nonfinite, means, m2s, los, his = rows.T
        zeros, negs = counts.T
        total = float(n.sum())
        nonfinite_count = int(round(float(nonfinite.sum())))
        if total == 0:
            return StatsSummary(
                0, nonfinite_count, *(math.nan,) * 8, np.zeros(0), np.zeros(0, dtype=np.int64)
            )
        keep = n > 0
        n, means, m2s, los, his = n[keep], means[keep], m2s[keep], los[keep], his[keep]
        hists = hists[keep]
        mean = float((n * means).sum() / total)
        m2 = float((m2s + n * (means - mean) ** 2).sum())
        lo, hi = float(los.min()), float(his.max())
        edges, counts = _merge_histograms(los, his, hists, lo, hi, self.bins)
        return StatsSummary(
            count=int(round(total)),
            nonfinite_count=nonfinite_count,
            mean=mean,
            std=math.sqrt(max(m2 / total, 0.0)),
            min=lo,
            max=hi,
            zero_fraction=float(zeros.sum()) / total,
            negative_fraction=float(negs.sum()) / total,
            sum=mean * total,
            sum_squares=m2 + total * mean * mean,
            hist_edges=edges,
            hist_counts=counts,
        )


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """All values of ``x`` as a 1-D tensor, in memory order: a view, not a copy, for
    contiguous and channels-last tensors (what convolutions on a CPU often return)."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def _merge_histograms(
    los: np.ndarray, his: np.ndarray, hists: np.ndarray, lo: float, hi: float, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    if hi <= lo:  # every finite value equal: one bucket holding all of them
        return np.array([lo, hi]), np.array([int(round(hists.sum()))], dtype=np.int64)
    edges = np.linspace(lo, hi, bins + 1)
    if len(hists) == 1:
        return edges, np.rint(hists[0]).astype(np.int64)
    counts = np.zeros(bins, dtype=np.float64)
    for clo, chi, h in zip(los, his, hists, strict=True):
        centres = clo + (np.arange(len(h)) + 0.5) * (chi - clo) / len(h)
        where = np.clip(((centres - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
        np.add.at(counts, where, h)
    return edges, np.rint(counts).astype(np.int64)
