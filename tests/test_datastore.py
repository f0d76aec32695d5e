"""The agent's local data store: real SQLite, a second process reading while the agent writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgefl.edge_agent.datastore import LocalDataStore, Sample, is_eval_id
from edgefl.edge_agent.fl.data import TrainingData
from edgefl.edge_agent.sources import DatasetReplayConfig, DatasetReplaySource
from edgefl.errors import BadInputError, ConfigError


def _samples(start: int, n: int, dim: int = 4) -> list[Sample]:
    # Every feature of sample k equals k: a reader can check rows are never torn.
    return [Sample(x=[float(k)] * dim, y=k % 10, stream="s") for k in range(start, start + n)]


def test_round_trip_reshapes_to_the_model_input(tmp_path: Path) -> None:
    with LocalDataStore(tmp_path / "samples.db", input_shape=(1, 2, 2)) as store:
        store.add_many(_samples(0, 50))
        x, y = store.train_arrays()
        xe, ye = store.eval_arrays()
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    assert x.shape[1:] == (1, 2, 2)
    assert len(x) + len(xe) == 50
    assert 0 < len(xe) < 25
    merged = sorted([float(v[0, 0, 0]) for v in x] + [float(v[0, 0, 0]) for v in xe])
    assert merged == [float(k) for k in range(50)]
    for xs, ys in ((x, y), (xe, ye)):
        assert all(int(v[0, 0, 0]) % 10 == label for v, label in zip(xs, ys, strict=True))


def test_it_is_training_data(tmp_path: Path) -> None:
    store: TrainingData = LocalDataStore(tmp_path / "s.db", input_shape=(4,))
    assert hasattr(store, "train_arrays")


def test_split_is_deterministic_by_id_and_near_the_fraction() -> None:
    ids = np.arange(1, 10_001, dtype=np.int64)
    held = is_eval_id(ids, 0.2)
    assert abs(held.mean() - 0.2) < 0.01
    assert (is_eval_id(ids, 0.2) == held).all()
    assert not is_eval_id(ids, 0.0).any()


def test_split_survives_dropping_old_samples(tmp_path: Path) -> None:
    with LocalDataStore(tmp_path / "s.db", input_shape=(4,), max_samples=30) as store:
        store.add_many(_samples(0, 30))
        before = {float(v[0]) for v in store.eval_arrays()[0]}
        store.add_many(_samples(30, 10))
        after = {float(v[0]) for v in store.eval_arrays()[0]}
    assert {v for v in before if v >= 10} <= after


def test_bounded_oldest_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with LocalDataStore(path, input_shape=(4,), max_samples=100) as store:
        assert store.add_many(_samples(0, 80)) == 0
        assert store.add_many(_samples(80, 50)) == 30
        stats = store.stats()
        x, _ = store.train_arrays()
        xe, _ = store.eval_arrays()
    assert (stats.samples, stats.dropped, stats.max_samples) == (100, 30, 100)
    assert min(float(v[0]) for v in np.concatenate([x, xe])) == 30.0
    with LocalDataStore(path, max_samples=100) as reopened:
        assert reopened.stats().dropped == 30  # persisted


def test_empty_store_and_wrong_size_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no local data store"):
        LocalDataStore(tmp_path / "missing.db", input_shape=(4,), create=False)
    with LocalDataStore(tmp_path / "s.db", input_shape=(64,)) as store:
        with pytest.raises(BadInputError, match="no samples with 64 features"):
            store.train_arrays()
        store.add_many(_samples(0, 5, dim=30))
        with pytest.raises(BadInputError, match="5 with 30 features"):
            store.train_arrays()
    with pytest.raises(ConfigError):
        LocalDataStore(tmp_path / "x.db", eval_fraction=1.0)


def test_tiny_store_still_trains(tmp_path: Path) -> None:
    with LocalDataStore(tmp_path / "s.db", input_shape=(4,), eval_fraction=0.9) as store:
        store.add_many(_samples(0, 1))
        x, _ = store.train_arrays()
    assert len(x) == 1


def test_mixed_streams_serve_only_the_models_size(tmp_path: Path) -> None:
    with LocalDataStore(tmp_path / "s.db", input_shape=(2, 2), eval_fraction=0.0) as store:
        store.add_many(_samples(0, 10, dim=4) + _samples(100, 7, dim=30))
        x, _ = store.train_arrays()
    assert x.shape == (10, 2, 2)


def test_replay_source_carries_the_sample_it_encoded() -> None:
    source = DatasetReplaySource(DatasetReplayConfig(dataset="digits", rate_hz=100), lambda: 0.0)
    records = source.due(1.0)
    assert records
    for record in records:
        assert record.sample is not None
        body = json.loads(record.body)
        assert record.sample == (body["x"], body["y"])
        assert len(record.sample[0]) == 64


_READER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from edgefl.edge_agent.datastore import LocalDataStore
    # eval_fraction 0: one train_arrays() call is one snapshot of the whole store.
    store = LocalDataStore(Path(sys.argv[1]), input_shape=(4,), eval_fraction=0.0, create=False)
    sizes = []
    torn = 0
    print("ready", flush=True)
    while True:
        x, y = store.train_arrays()
        torn += int(((x != x[:, :1]).any(axis=1)).sum())
        torn += int((x[:, 0].astype(int) % 10 != y).sum())
        sizes.append(len(x))
        if sizes[-1] >= int(sys.argv[2]):
            break
    print(json.dumps({"sizes": sizes, "torn": torn}))
    """
)


@pytest.mark.slow
def test_another_process_reads_consistent_snapshots_while_the_agent_writes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "samples.db"
    total = 3000
    with LocalDataStore(path, input_shape=(4,), max_samples=100_000) as store:
        store.add_many(_samples(0, 10))
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(path), str(total)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "ready"
            for start in range(10, total, 10):
                store.add_many(_samples(start, 10))
                time.sleep(0.001)  # let the reader interleave even on a loaded machine
            out, _ = reader.communicate(timeout=120)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    assert reader.returncode == 0
    report = json.loads(out)
    assert report["torn"] == 0
    sizes = report["sizes"]
    assert sizes == sorted(sizes)  # snapshots only ever grow
    assert sizes[-1] == total
    assert len(set(sizes)) > 2  # it really read while the store grew
    assert all(n % 10 == 0 for n in sizes)  # a batch is seen whole or not at all
