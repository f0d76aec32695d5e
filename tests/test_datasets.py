"""Tests for the bundled datasets in edgefl.datasets (real data, no downloads)."""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
import pytest

from edgefl.datasets import DATASETS, Dataset, load_dataset
from edgefl.errors import BadInputError

SHAPES = {
    "digits": ((1, 8, 8), 1797, 10),
    "breast-cancer": ((30,), 569, 2),
    "mnist5k": ((1, 28, 28), 5000, 10),
}
IMAGES = ["digits", "mnist5k"]


@functools.cache
def cached(name: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    return load_dataset(name, seed=seed, test_fraction=test_fraction)


def row_bytes(x: npt.NDArray[np.float32]) -> list[bytes]:
    return [row.tobytes() for row in x]


def test_names() -> None:
    assert set(DATASETS) == set(SHAPES)


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_and_dtypes(name: str) -> None:
    sample_shape, total, num_classes = SHAPES[name]
    ds = cached(name)
    assert ds.name == name
    assert ds.num_classes == num_classes
    assert ds.input_shape == sample_shape
    assert ds.x_train.shape[1:] == sample_shape
    assert ds.x_test.shape[1:] == sample_shape
    assert len(ds.x_train) + len(ds.x_test) == total
    assert ds.y_train.shape == (len(ds.x_train),)
    assert ds.y_test.shape == (len(ds.x_test),)
    assert ds.x_train.dtype == np.float32
    assert ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64
    assert ds.y_test.dtype == np.int64
    assert ds.x_train.flags.c_contiguous
    assert ds.x_test.flags.c_contiguous
    assert set(np.unique(ds.y_train)) == set(range(num_classes))
    assert set(np.unique(ds.y_test)) == set(range(num_classes))


@pytest.mark.parametrize("name", IMAGES)
def test_image_values_in_unit_range(name: str) -> None:
    ds = cached(name)
    for x in (ds.x_train, ds.x_test):
        assert np.isfinite(x).all()
        assert x.min() >= 0.0
        assert x.max() <= 1.0
    assert ds.x_train.max() == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_test_split_size(name: str, fraction: float) -> None:
    ds = cached(name, test_fraction=fraction)
    total = len(ds.x_train) + len(ds.x_test)
    assert len(ds.x_test) / total == pytest.approx(fraction, abs=0.01)


@pytest.mark.parametrize("name", list(SHAPES))
def test_split_is_stratified(name: str) -> None:
    ds = cached(name)
    train = np.bincount(ds.y_train, minlength=ds.num_classes) / len(ds.y_train)
    test = np.bincount(ds.y_test, minlength=ds.num_classes) / len(ds.y_test)
    assert np.abs(train - test).max() <= 0.02


@pytest.mark.parametrize("name", list(SHAPES))
def test_train_and_test_do_not_overlap(name: str) -> None:
    ds = cached(name)
    train = row_bytes(ds.x_train)
    test = row_bytes(ds.x_test)
    # Every sample of these datasets is distinct, so the split must keep them distinct.
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


@pytest.mark.parametrize("name", ["digits", "breast-cancer"])
def test_same_seed_same_split(name: str) -> None:
    a = load_dataset(name, seed=7)
    b = load_dataset(name, seed=7)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_test, b.y_test)


@pytest.mark.parametrize("name", list(SHAPES))
def test_other_seed_other_split(name: str) -> None:
    a = cached(name, seed=0)
    b = cached(name, seed=1)
    assert set(row_bytes(a.x_test)) != set(row_bytes(b.x_test))


def test_mnist_split_is_deterministic() -> None:
    a = cached("mnist5k", seed=0)
    b = load_dataset("mnist5k", seed=0)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)


def test_breast_cancer_train_features_are_standardised() -> None:
    ds = cached("breast-cancer")
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1.0, atol=1e-3)


def test_breast_cancer_test_uses_the_training_statistics() -> None:
    # Standardisation is one affine map per feature. If train and test went through the
    # same map, the sorted union of both is an affine image of the sorted raw column.
    from sklearn.datasets import load_breast_cancer

    raw = np.asarray(load_breast_cancer().data, dtype=np.float64)
    ds = cached("breast-cancer")
    both = np.concatenate([ds.x_train, ds.x_test]).astype(np.float64)
    for j in range(raw.shape[1]):
        r = np.sort(raw[:, j])
        s = np.sort(both[:, j])
        slope, intercept = np.polyfit(r, s, 1)
        assert slope > 0
        np.testing.assert_allclose(slope * r + intercept, s, atol=1e-3)
    # ...and the test split was not re-centred on its own statistics.
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(BadInputError) as info:
        load_dataset("cifar10")
    message = str(info.value)
    assert "cifar10" in message
    for name in DATASETS:
        assert name in message


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(BadInputError, match="test_fraction"):
        load_dataset("breast-cancer", test_fraction=fraction)
