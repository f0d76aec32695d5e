"""Samples that do not fit the model, fed to the agent's inference loop.

The attacker controls what a source hands the loop: a sensor writing to the endpoint or
the watched folder before the model's spec is known to the source, or a source plugin
that checks nothing. Each hostile sample (wrong shape, wrong dtype, NaN, infinity, values
beyond float32, a 40 MB array, a million-value list, a Python list where an array
belongs) must be refused with its reason and counted, and the loop must go on answering
the honest samples around it: the same model, in order, each once. Before the loop
checked its inputs, a sample of the wrong shape raised inside the predictor and a NaN
sample was answered as if it were data.

Real parts: the toolkit's ``digits-mlp`` as a signed release, installed by the device's
model manager, run on LiteRT by the loop's own threads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefl.edge_agent.inference.config import InferenceConfig
from edgefl.edge_agent.inference.loop import InferenceLoop
from edgefl.edge_agent.sources import SourceRecord
from edgefl.testing import wait_for
from tests.model_release_helpers import RUNTIME, Built, Fleet, build_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


def _record(index: int, **fields: Any) -> SourceRecord:
    return SourceRecord(
        stream="s",
        kind="data",
        content_type="application/json",
        body=b"{}",
        source="sensor",
        index=index,
        **fields,
    )


def _hostile() -> list[tuple[str, dict[str, Any]]]:
    good = np.zeros((1, 8, 8), dtype=np.float32)
    nan = good.copy()
    nan[0, 3, 3] = np.nan
    inf = good.copy()
    inf[0, 0, 0] = -np.inf
    return [
        ("bad_shape", {"inputs": np.zeros((8, 9), dtype=np.float32)}),
        ("bad_shape", {"inputs": np.zeros(65, dtype=np.float32)}),
        ("bad_shape", {"inputs": np.zeros(10_000_000, dtype=np.float32)}),  # 40 MB
        ("bad_shape", {"sample": ([0.0] * 1_000_000, 1)}),
        ("bad_shape", {"sample": ([[0.0] * 8] * 8, 1)}),
        ("bad_dtype", {"inputs": np.array(["x"] * 64)}),
        ("bad_dtype", {"inputs": np.zeros(64, dtype=np.complex64)}),
        ("bad_dtype", {"inputs": np.array([object()] * 64)}),
        ("bad_dtype", {"inputs": np.zeros(64, dtype=bool)}),
        ("bad_dtype", {"inputs": [0.0] * 64}),
        ("bad_dtype", {"sample": (["0.5"] * 64, 1)}),
        ("bad_dtype", {"sample": ([0.5] * 63 + [None], 1)}),
        ("bad_dtype", {"sample": ([True] * 64, 1)}),
        ("bad_shape", {"sample": ([[0.5]] * 64, 1)}),
        ("not_finite", {"inputs": nan}),
        ("not_finite", {"inputs": inf}),
        ("not_finite", {"sample": ([float("nan")] * 64, 1)}),
        ("out_of_range", {"inputs": np.full(64, 1e300)}),
        ("out_of_range", {"sample": ([1e39] * 64, 1)}),
        ("no_inputs", {}),
    ]


class Manager:
    """The device's real model manager, with v1 installed."""

    def __init__(self, fleet: Fleet) -> None:
        self.inner = fleet.manager()
        self.inner.handle(fleet.desired(fleet.publish(1, "fp32")))
        self.errors: list[str | None] = []

    @property
    def generation(self) -> int:
        return self.inner.generation

    def current(self) -> Any:
        return self.inner.current()

    def add_listener(self, callback: Any) -> None:
        self.inner.add_listener(callback)

    def record_inference(self, *, error: str | None = None) -> None:
        self.errors.append(error)  # a hostile sample is not the model's failure
        self.inner.record_inference(error=error)


def test_samples_that_do_not_fit_are_refused_counted_and_the_loop_goes_on(
    tmp_path: Path, built: Built
) -> None:
    manager = Manager(Fleet(tmp_path, built))
    committed: list[SourceRecord] = []
    loop = InferenceLoop(
        InferenceConfig(enabled=True, queue_size=1000),
        models=manager,
        runtime_key=RUNTIME,
        commit=committed.extend,
    )
    loop.start()
    try:
        rng = np.random.default_rng(0)
        records: list[SourceRecord] = []
        honest: list[int] = []
        expected: dict[str, int] = {}
        index = 0
        for reason, fields in _hostile():
            for _ in range(2):  # an honest sample before and after each hostile one
                records.append(_record(index, inputs=rng.random(64).astype(np.float32)))
                honest.append(index)
                index += 1
            records.append(_record(index, **fields))
            expected[reason] = expected.get(reason, 0) + 1
            index += 1
        records.append(_record(index, inputs=rng.random((1, 8, 8)).astype(np.float32)))
        honest.append(index)
        started = time.monotonic()
        assert loop.offer("sensor", records) == len(records)
        wait_for(lambda: len(committed) >= len(honest), 30, "every honest sample answered")
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        bodies = [json.loads(r.body) for r in committed]
        assert [b["index"] for b in bodies] == honest
        assert {(b["version"], b["where"]) for b in bodies} == {(1, "local")}
        status = loop.status()
        assert status["rejected"] == expected
        assert status["answered"] == len(honest)
        assert (status["errors"], status["dropped"]) == (0, 0)
        assert all(t.is_alive() for t in loop._threads)
        assert manager.errors == []  # nothing was blamed on the model (no rollback)
        assert elapsed < 30
    finally:
        loop.stop()


def test_a_flood_beyond_the_queue_is_dropped_and_counted_not_queued(
    tmp_path: Path, built: Built
) -> None:
    manager = Manager(Fleet(tmp_path, built))
    committed: list[SourceRecord] = []
    loop = InferenceLoop(
        InferenceConfig(enabled=True, queue_size=8),
        models=manager,
        runtime_key=RUNTIME,
        commit=committed.extend,
    )
    loop.start()
    try:
        flood = [_record(i, inputs=np.zeros(64, dtype=np.float32)) for i in range(5000)]
        accepted = loop.offer("sensor", flood)
        wait_for(lambda: len(committed) >= accepted, 30, "the accepted samples answered")
        time.sleep(0.2)
        status = loop.status()
        assert accepted < len(flood)
        assert status["dropped"] == len(flood) - accepted
        assert status["dropped_by_source"] == {"sensor": len(flood) - accepted}
        assert status["answered"] == accepted == len(committed)
        assert status["queue"]["depth"] == 0
    finally:
        loop.stop()
