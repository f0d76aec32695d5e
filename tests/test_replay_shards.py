"""By default a training replay plays the device's own non-IID shard, not the whole split."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.edge_agent.sources import (
    DEVICE_SHARDS,
    DatasetReplayConfig,
    device_partition,
    replay_arrays,
)


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


@pytest.fixture(scope="module")
def whole() -> tuple[np.ndarray, np.ndarray]:
    return replay_arrays(DatasetReplayConfig(num_partitions=1))


def test_two_devices_replay_disjoint_label_skewed_shards_by_default(
    whole: tuple[np.ndarray, np.ndarray],
) -> None:
    # Device ids whose crc32 picks different shards of the default four.
    a = device_partition(DatasetReplayConfig(), "pi-01")
    b = device_partition(DatasetReplayConfig(), "pi-02")
    assert (a.num_partitions, b.num_partitions) == (DEVICE_SHARDS["digits"],) * 2
    assert a.partition != b.partition
    xa, ya = replay_arrays(a)
    xb, yb = replay_arrays(b)
    x_all, _ = whole
    assert 0 < len(xa) < len(x_all)
    assert 0 < len(xb) < len(x_all)
    assert not _rows(xa) & _rows(xb)  # not one sample in common
    # Non-IID: the label mixes differ (Dirichlet α=0.5 over the classes).
    pa = np.bincount(ya, minlength=10) / len(ya)
    pb = np.bincount(yb, minlength=10) / len(yb)
    assert np.abs(pa - pb).sum() > 0.3
    # Deterministic: the same device gets the same shard again.
    again, _ = replay_arrays(device_partition(DatasetReplayConfig(), "pi-01"))
    assert np.array_equal(again, xa)
    # The shards cover the split exactly once.
    shards = [
        replay_arrays(DatasetReplayConfig(partition=p, num_partitions=a.num_partitions))[0]
        for p in range(DEVICE_SHARDS["digits"])
    ]
    assert sum(len(s) for s in shards) == len(x_all)


def test_the_whole_split_when_asked_or_held_out(whole: tuple[np.ndarray, np.ndarray]) -> None:
    everyone = device_partition(DatasetReplayConfig(num_partitions=1), "pi-01")
    assert everyone.partition is None
    assert len(replay_arrays(everyone)[0]) == len(whole[0])
    held_out = device_partition(DatasetReplayConfig(split="test", evaluation=True), "pi-01")
    assert held_out.partition is None  # accuracy on the whole held-out split
    explicit = device_partition(DatasetReplayConfig(partition=2, num_partitions=3), "pi-01")
    assert (explicit.partition, explicit.num_partitions) == (2, 3)
    assert device_partition(DatasetReplayConfig(), None).partition is None
