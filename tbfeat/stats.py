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

    Each :meth:`update` reduces a batch, on its device, to a handful of numbers and a
    ``bins``-bucket histogram; nothing of the activation itself is kept. :meth:`summary`
    moves the histograms to the CPU once and merges everything (Chan et al.'s formula for
    mean and variance; histograms of several batches are re-binned onto their joint range
    by bucket centre).

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
        self._hists: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the values of ``x`` (any shape, any real dtype); ``x`` is not modified.

        Exact statistics from one pass over ``x`` in cache-sized chunks (:func:`one_pass`:
        min/max, sums of values, squares and signs, and the histogram's sample); a
        second, centred pass only when the mean dwarfs the spread. The histogram bins a
        fixed-size strided sample of :data:`HIST_SAMPLE` values between the exact min and
        max, its counts scaled to the number of values. NaN/Inf are filtered out only when
        min/max show there are some. One device-to-host read per call (two with NaN/Inf).
        """
        flat = flat_view(x.detach())
        if flat.dtype in (torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16):
            flat = flat.float()
        elif not flat.is_floating_point():  # int32/int64: float32 would round large values
            flat = flat.double()
        numel = flat.numel()
        if numel == 0:
            return
        sums, sample = one_pass(flat)
        if not (math.isfinite(sums[0]) and math.isfinite(sums[1])):  # NaN spoils min/max
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                self._rows.append([0.0, float(numel), *(math.nan,) * 4, 0.0, 0.0])
                self._hists.append(torch.zeros(self.bins, device=flat.device))
                return
            sums, sample = one_pass(flat)
        lo, hi, total, squares, signed, nonzero = sums
        if not (math.isfinite(total) and math.isfinite(squares)) and flat.dtype != torch.float64:
            wide = flat.double()  # |values| near the float32 limit: the sums overflow
            total, squares = torch.stack([wide.sum(), torch.dot(wide, wide)]).tolist()
        n = flat.numel()
        m2 = _m2(flat, total, squares)
        self._rows.append(
            [n, numel - n, total / n, m2, lo, hi, n - nonzero, (nonzero - signed) / 2]
        )
        self._hists.append(self._histogram(sample, n, lo, hi))

    def _histogram(self, sample: torch.Tensor, n: int, lo: float, hi: float) -> torch.Tensor:
        """``bins`` counts of ``sample`` over ``[lo, hi]``, scaled to ``n`` values."""
        scale = max(abs(lo), abs(hi), 1.0) if max(abs(lo), abs(hi)) > 1e38 else 1.0
        if scale != 1.0:  # histc's bin width would overflow float32
            sample, lo, hi = sample / scale, lo / scale, hi / scale
        hist = torch.histc(sample.float(), self.bins, lo, hi)
        return hist * (n / sample.numel()) if sample.numel() != n else hist

    def summary(self) -> StatsSummary | None:
        """Merge what was added into a :class:`StatsSummary`; ``None`` if nothing was."""
        if not self._rows:
            return None
        rows = np.asarray(self._rows, dtype=np.float64)
        hists = torch.stack(self._hists).cpu().to(torch.float64).numpy()
        n, nonfinite, means, m2s, los, his, zeros, negs = rows.T
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


CHUNK = 2**18
"""Values per chunk of :func:`one_pass` on a CPU: a chunk stays in the cache for all sums."""


def one_pass(flat: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Min, max, sum, sum of squares, sum of signs and count of nonzero values of a 1-D
    float tensor, read once from memory, and its histogram sample ``flat[::step]``.

    The chunks are small enough to stay in a CPU's cache while every sum reads them
    (accelerators take 2**23 values at a time); the sums of signs (positives - negatives)
    and of their squares (positives + negatives) are exact in float32 within a chunk,
    and the chunks' sums are added in float64.

    Returns:
        The six numbers (one device-to-host read) and the sample of
        ``max(1, n // HIST_SAMPLE)``-strided values, the same as ``flat[::step]``.
    """
    n = flat.numel()
    step = max(1, n // HIST_SAMPLE)
    chunk = CHUNK if flat.is_cpu else 2**23
    if n <= chunk:
        return _chunk_sums(flat, torch.empty_like(flat)).tolist(), flat[::step]
    buffer = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
    rows, samples = [], []
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        rows.append(_chunk_sums(part, buffer[: part.numel()]))
        samples.append(part[(-start) % step :: step].clone())  # copied while in cache
    sums = torch.stack(rows)
    lo, hi = sums[:, 0].min(), sums[:, 1].max()
    rest = sums[:, 2:].double().sum(0)
    return torch.cat([torch.stack([lo, hi]).double(), rest]).tolist(), torch.cat(samples)


def _chunk_sums(part: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``[min, max, sum, sum of squares, sum of signs, nonzero count]`` of ``part``;
    ``buffer`` (``part``'s size) receives its signs."""
    lo, hi = torch.aminmax(part)
    signs = torch.sign(part, out=buffer)
    return torch.stack(
        [lo, hi, part.sum(), torch.dot(part, part), signs.sum(), torch.dot(signs, signs)]
    )


def _m2(flat: torch.Tensor, total: float, squares: float) -> float:
    """The sum of squared deviations from the mean; a centred pass when the plain formula
    would cancel (the mean dwarfs the spread) or the sum of squares overflowed."""
    mean = total / flat.numel()
    m2 = squares - total * mean
    if math.isfinite(squares) and m2 >= 1e-3 * squares:
        return max(m2, 0.0)
    centred = flat - mean
    m2 = float(torch.dot(centred, centred))
    if not math.isfinite(m2):  # beyond float32 even centred
        centred = flat.double() - mean
        m2 = float(torch.dot(centred, centred))
    return max(m2, 0.0)


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
