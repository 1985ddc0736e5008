"""Activation statistics against numpy."""

import math

import numpy as np
import pytest
import torch

from tbfeat.stats import STAT_NAMES, RunningStats

from .helpers import numpy_stats


def relu_like(shape, seed):
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0.2, 1.0, size=shape), 0).astype(np.float32) - 0.1 * (
        rng.random(shape) < 0.05
    )


def test_single_batch_matches_numpy_and_histogram_matches_numpy_histogram():
    a = relu_like((2, 8, 16, 16), 0)
    rs = RunningStats(bins=32)
    rs.update(torch.from_numpy(a))
    s = rs.summary()
    for name, value in numpy_stats(a).items():
        assert s.scalars()[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    counts, edges = np.histogram(a.astype(np.float64), bins=32, range=(a.min(), a.max()))
    np.testing.assert_allclose(s.hist_edges, edges, rtol=1e-6)
    assert int(s.hist_counts.sum()) == a.size
    # torch.histc and numpy may disagree only for values sitting on a bucket edge
    assert np.abs(s.hist_counts - counts).sum() <= 4
    assert s.sum == pytest.approx(a.astype(np.float64).sum(), rel=1e-5)
    assert s.sum_squares == pytest.approx((a.astype(np.float64) ** 2).sum(), rel=1e-5)


def test_batches_merge_to_the_statistics_of_the_whole():
    parts = [relu_like((1, 4, 8, 8), s) * (s + 1) for s in range(3)]
    rs = RunningStats(bins=16)
    for p in parts:
        rs.update(torch.from_numpy(p))
    s = rs.summary()
    whole = numpy_stats(np.concatenate([p.ravel() for p in parts]))
    for name in STAT_NAMES:
        assert s.scalars()[name] == pytest.approx(whole[name], rel=1e-6, abs=1e-7), name
    assert int(s.hist_counts.sum()) == sum(p.size for p in parts)
    assert s.hist_edges[0] == pytest.approx(whole["min"]) and s.hist_edges[-1] == pytest.approx(
        whole["max"]
    )


def test_nonfinite_values_are_counted_and_kept_out_of_the_rest():
    a = np.array([1.0, 2.0, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    rs = RunningStats(bins=4)
    rs.update(torch.from_numpy(a))
    s = rs.summary()
    assert s.nonfinite_count == 3 and s.count == 3
    assert s.mean == pytest.approx(1.0) and s.max == 2.0 and s.min == 0.0
    assert s.zero_fraction == pytest.approx(1 / 3)
    assert int(s.hist_counts.sum()) == 3


def test_all_nonfinite_gives_only_the_count():
    rs = RunningStats()
    rs.update(torch.full((3, 3), float("nan")))
    s = rs.summary()
    assert s.scalars() == {"nonfinite_count": 9.0}
    assert math.isnan(s.mean)


def test_half_precision_and_integer_inputs():
    a = torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    for t in (a.half(), a.bfloat16(), a.to(torch.int32)):
        rs = RunningStats(bins=8)
        rs.update(t)
        s = rs.summary()
        assert s.mean == pytest.approx(0.75) and s.negative_fraction == pytest.approx(0.25)


def test_constant_values_make_one_bucket():
    rs = RunningStats(bins=8)
    rs.update(torch.full((10,), 3.0))
    s = rs.summary()
    assert s.std == 0 and s.hist_counts.tolist() == [10] and s.hist_edges.tolist() == [3.0, 3.0]


def test_empty_input_adds_nothing():
    rs = RunningStats()
    rs.update(torch.zeros(0, 3))
    assert rs.summary() is None
