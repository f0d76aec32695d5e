"""Where a device's training data comes from: the :class:`TrainingData` interface.

The ClientApp trains on whatever implements :class:`TrainingData`:

- :class:`PartitionData` (simulation): one Dirichlet partition of a bundled dataset's
  training split, chosen by the node's ``partition-id``; its evaluation data is the same
  device's Dirichlet share of the held-out split. Loaded once per process and cached
  (a simulation actor serves many virtual devices).
- :class:`edgefl.edge_agent.datastore.LocalDataStore` (a real device): the labelled
  samples the agent's sources collected, read from its SQLite file; the ClientApp uses it
  when the node config names a ``data-store``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["PartitionData", "TrainingData"]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class TrainingData(Protocol):
    """A device's local data, as float32 inputs (batch first) and int64 labels."""

    def train_arrays(self) -> tuple[FloatArray, IntArray]:
        """The samples to train on (never empty)."""
        ...

    def eval_arrays(self) -> tuple[FloatArray, IntArray]:
        """Local samples to evaluate the global model on (may be empty)."""
        ...


class PartitionData:
    """One simulated device's Dirichlet partition of a bundled dataset.

    Args:
        dataset: Bundled dataset name.
        partition_id: This device's partition, in ``[0, num_partitions)``.
        num_partitions: How many devices share the data.
        alpha: Dirichlet α.
        seed: Seed of the train/test split and of the partitioning.
        test_fraction: Held-out share of the dataset.
    """

    def __init__(
        self,
        dataset: str,
        partition_id: int,
        num_partitions: int,
        alpha: float,
        seed: int,
        test_fraction: float = 0.2,
    ) -> None:
        self._key = (dataset, num_partitions, alpha, seed, test_fraction)
        self.partition_id = partition_id
        if not 0 <= partition_id < num_partitions:
            from edgefl.errors import BadInputError

            raise BadInputError(
                f"partition-id {partition_id} is outside [0, {num_partitions})",
                hint="check the node config (partition-id, num-partitions)",
            )

    def train_arrays(self) -> tuple[FloatArray, IntArray]:
        """This partition's training samples."""
        x, y, parts, _, _ = _split(*self._key)
        idx = parts[self.partition_id]
        return x[idx], y[idx]

    def eval_arrays(self) -> tuple[FloatArray, IntArray]:
        """This device's share of the held-out split."""
        _, _, _, (xt, yt), test_parts = _split(*self._key)
        idx = test_parts[self.partition_id]
        return xt[idx], yt[idx]


@lru_cache(maxsize=4)
def _split(
    dataset: str, num_partitions: int, alpha: float, seed: int, test_fraction: float
) -> tuple[
    FloatArray,
    IntArray,
    list[npt.NDArray[np.int64]],
    tuple[FloatArray, IntArray],
    list[npt.NDArray[np.int64]],
]:
    from edgefl.datasets import load_dataset
    from edgefl.partition import dirichlet_partition

    data = load_dataset(dataset, test_fraction=test_fraction, seed=seed)
    parts = dirichlet_partition(data.y_train, num_partitions, alpha, seed=seed)
    # The held-out split is small: some devices may get no test samples (min_size=0).
    test_parts = dirichlet_partition(data.y_test, num_partitions, alpha, seed=seed + 1, min_size=0)
    return data.x_train, data.y_train, parts, (data.x_test, data.y_test), test_parts
