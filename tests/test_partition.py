"""Tests for edgefl.partition.dirichlet_partition (property tests plus label-skew checks)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgefl.errors import BadInputError
from edgefl.partition import dirichlet_partition

IntArray = npt.NDArray[np.int64]

label_arrays = hnp.arrays(
    np.int64, st.integers(min_value=1, max_value=300), elements=st.integers(0, 9)
)
partitions = st.integers(min_value=1, max_value=12)
alphas = st.floats(min_value=0.01, max_value=1e3, allow_nan=False, allow_infinity=False)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def assert_exact_cover(parts: list[IntArray], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    for p in parts:
        assert p.dtype == np.int64
        assert p.ndim == 1
        assert np.all(np.diff(p) > 0)  # sorted, no index twice within a partition
    every = np.concatenate(parts)
    assert len(every) == n
    np.testing.assert_array_equal(np.sort(every), np.arange(n))


def largest_label_share(labels: IntArray, parts: list[IntArray]) -> float:
    shares = [np.bincount(labels[p]).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))


@settings(max_examples=150, deadline=None)
@given(labels=label_arrays, num_partitions=partitions, alpha=alphas, seed=seeds)
def test_every_index_exactly_once(
    labels: IntArray, num_partitions: int, alpha: float, seed: int
) -> None:
    parts = dirichlet_partition(labels, num_partitions, alpha, seed=seed, min_size=0)
    assert_exact_cover(parts, len(labels), num_partitions)


@settings(max_examples=150, deadline=None)
@given(
    labels=label_arrays,
    num_partitions=partitions,
    alpha=alphas,
    seed=seeds,
    min_size=st.integers(min_value=0, max_value=20),
)
def test_min_size_respected_or_refused(
    labels: IntArray, num_partitions: int, alpha: float, seed: int, min_size: int
) -> None:
    refusal = ""
    try:
        parts = dirichlet_partition(
            labels, num_partitions, alpha, seed=seed, min_size=min_size, max_attempts=20
        )
    except BadInputError as exc:
        refusal = str(exc)
    if refusal:
        # Either impossible on its face, or no draw in max_attempts met min_size.
        assert min_size * num_partitions > len(labels) or "attempts" in refusal
        return
    assert min_size * num_partitions <= len(labels)
    assert_exact_cover(parts, len(labels), num_partitions)
    assert min(len(p) for p in parts) >= min_size


@settings(max_examples=60, deadline=None)
@given(labels=label_arrays, num_partitions=partitions, alpha=alphas, seed=seeds)
def test_deterministic_per_seed(
    labels: IntArray, num_partitions: int, alpha: float, seed: int
) -> None:
    a = dirichlet_partition(labels, num_partitions, alpha, seed=seed, min_size=0)
    b = dirichlet_partition(labels.copy(), num_partitions, alpha, seed=seed, min_size=0)
    assert len(a) == len(b)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)


def test_different_seeds_differ() -> None:
    labels = np.repeat(np.arange(10), 50)
    a = dirichlet_partition(labels, 5, 0.5, seed=0)
    b = dirichlet_partition(labels, 5, 0.5, seed=1)
    assert any(not np.array_equal(pa, pb) for pa, pb in zip(a, b, strict=True))


def test_min_size_is_met_on_a_realistic_split() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 10, 0.3, seed=3, min_size=20)
    assert_exact_cover(parts, len(labels), 10)
    assert min(len(p) for p in parts) >= 20


def test_accepts_a_python_list() -> None:
    parts = dirichlet_partition([0, 1, 0, 1, 2, 2], 2, 10.0, seed=0)
    assert_exact_cover(parts, 6, 2)


def test_single_partition_gets_everything() -> None:
    labels = np.array([3, 1, 3, 2, 2], dtype=np.int64)
    (only,) = dirichlet_partition(labels, 1, 0.5, seed=0)
    np.testing.assert_array_equal(only, np.arange(5))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 100).astype(np.int64)
    skewed, iid = [], []
    for seed in range(5):
        small = dirichlet_partition(labels, 10, 0.05, seed=seed, min_size=0)
        large = dirichlet_partition(labels, 10, 1000.0, seed=seed, min_size=0)
        skewed.append(largest_label_share(labels, small))
        iid.append(largest_label_share(labels, large))
    # Near-IID: every partition's top label holds little more than 1/10 of it.
    assert np.mean(iid) < 0.2
    # Strong skew: most partitions are dominated by one label.
    assert np.mean(skewed) > 0.6
    assert min(skewed) > max(iid)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha(alpha: float) -> None:
    with pytest.raises(BadInputError, match="alpha"):
        dirichlet_partition(np.zeros(10, dtype=np.int64), 2, alpha)


@pytest.mark.parametrize("num_partitions", [0, -3])
def test_bad_num_partitions(num_partitions: int) -> None:
    with pytest.raises(BadInputError, match="num_partitions"):
        dirichlet_partition(np.zeros(10, dtype=np.int64), num_partitions, 1.0)


def test_impossible_min_size() -> None:
    with pytest.raises(BadInputError) as info:
        dirichlet_partition(np.arange(10) % 2, 4, 1.0, min_size=3)
    assert info.value.hint


def test_labels_must_be_one_dimensional() -> None:
    with pytest.raises(BadInputError, match="1-D"):
        dirichlet_partition(np.zeros((5, 2), dtype=np.int64), 2, 1.0)


def test_gives_up_when_no_draw_meets_min_size() -> None:
    # One class, ten devices, alpha tiny: nearly all samples go to one device every time.
    with pytest.raises(BadInputError, match="attempts") as info:
        dirichlet_partition(np.zeros(10, dtype=np.int64), 10, 0.01, seed=0, min_size=1)
    assert "alpha" in info.value.hint


def test_empty_labels_are_refused_but_one_sample_is_split() -> None:
    # The contract is a refusal naming the cause, even when min_size=0 would allow
    # three empty partitions; the smallest non-empty input is still split, not refused.
    with pytest.raises(BadInputError, match="empty"):
        dirichlet_partition(np.array([], dtype=np.int64), 3, 1.0, min_size=0)
    parts = dirichlet_partition(np.array([4], dtype=np.int64), 3, 1.0, min_size=0)
    assert_exact_cover(parts, 1, 3)
    assert sorted(len(p) for p in parts) == [0, 0, 1]
