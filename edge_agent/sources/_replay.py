"""The dataset-replay source: a bundled dataset played back at a rate, as a sensor would.

It stands in for a real sensor so the agent produces real traffic, and with ``evaluation:
true`` (on the held-out ``test`` split) it feeds the on-device accuracy figure with samples
that are never stored for training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from edgefl.config import StrictModel
from edgefl.edge_agent.sources._base import DataSource, SourceRecord
from edgefl.edge_agent.sources._samples import SampleError, conform
from edgefl.proto.ids import ID_REGEX

__all__ = [
    "DEVICE_SHARDS",
    "DatasetReplayConfig",
    "DatasetReplaySource",
    "device_partition",
    "replay_arrays",
]

logger = logging.getLogger("edgefl.edge_agent.sources")


class DatasetReplayConfig(StrictModel):
    """A simulated sensor that replays a bundled dataset."""

    type: Literal["dataset-replay"] = "dataset-replay"
    name: str = Field("replay", description="Name of this source in logs and status.")
    dataset: Literal["digits", "mnist5k", "breast-cancer"] = "digits"
    split: Literal["train", "test"] = "train"
    rate_hz: float = Field(1.0, gt=0, le=10_000, description="Samples per second.")
    stream: str = Field("samples", pattern=ID_REGEX)
    kind: Literal["data", "telemetry"] = "data"
    partition: int | None = Field(
        None,
        ge=0,
        description="Replay only this Dirichlet partition of the split (0 .. "
        "num_partitions - 1). Default: on the train split, the one the device id picks "
        "(device_partition); on the test split, all of it.",
    )
    num_partitions: int | None = Field(
        None,
        ge=1,
        description="How many label-skewed (Dirichlet alpha) shards the split is cut into. "
        "Default: DEVICE_SHARDS[dataset] for the device's own shard, 1 with an explicit "
        "partition; 1 makes every device replay the whole split.",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller: more skew).")
    seed: int = Field(0, description="Seed of the dataset split and of the partitioning.")
    limit: int | None = Field(None, ge=1, description="Stop after this many samples.")
    evaluation: bool = Field(
        False,
        description="Held-out labelled samples: scored for on-device accuracy, never stored "
        "for training (needs split: test).",
    )

    @model_validator(mode="after")
    def _partition_in_range(self) -> DatasetReplayConfig:
        if self.partition is not None and self.partition >= (self.num_partitions or 1):
            raise ValueError(
                f"partition {self.partition} must be < num_partitions {self.num_partitions}"
            )
        if self.evaluation and self.split != "test":
            raise ValueError(
                "an evaluation replay plays the held-out split: set split: test (accuracy "
                "measured on the training split says nothing about the model)"
            )
        return self


DEVICE_SHARDS: Final = {"digits": 4, "mnist5k": 10, "breast-cancer": 2}
"""Shards of the train split a device picks from by default: about 360 digits, 400 MNIST
images or 230 breast-cancer rows each on average (Dirichlet α=0.5, so some have fewer)."""


def device_partition(config: DatasetReplayConfig, device_id: str | None) -> DatasetReplayConfig:
    """The config with the samples this device replays made explicit.

    An explicit ``partition`` is kept (``num_partitions`` default 1). Otherwise a replay of
    the train split (not an ``evaluation`` one) plays one of ``num_partitions`` (default
    :data:`DEVICE_SHARDS`) label-skewed shards: the one ``crc32(device_id)`` picks, so each
    device keeps its own non-IID shard across restarts, devices on the same shard count and
    seed cut the split the same way, and two devices whose ids pick different shards never
    replay the same sample. Without a device id (or ``num_partitions: 1``): the whole split.
    """
    if config.partition is not None:
        return config.model_copy(update={"num_partitions": config.num_partitions or 1})
    shards = config.num_partitions or DEVICE_SHARDS.get(config.dataset, 1)
    if config.split != "train" or config.evaluation or not device_id or shards <= 1:
        return config.model_copy(update={"num_partitions": 1})
    pick = zlib.crc32(device_id.encode("utf-8")) % shards
    return config.model_copy(update={"partition": pick, "num_partitions": shards})


class DatasetReplaySource(DataSource):
    """Emits one JSON sample ``{"i", "x", "y"}`` every ``1/rate_hz`` seconds, cycling.

    ``i`` is the sample's row in the dataset; the record's :attr:`~SourceRecord.index`
    counts what this source emitted. With a model spec (:meth:`expect`) a sample that does
    not fit it is not emitted: it is counted (``bad_shape`` ...) and logged once.
    """

    def __init__(
        self,
        config: DatasetReplayConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        cache_dir: Path | None = None,
        device_id: str | None = None,
    ) -> None:
        config = device_partition(config, device_id)
        x, y = replay_arrays(config, cache_dir)
        self.name = config.name
        self._config = config
        self._x = x
        self._y = y
        self._period = 1.0 / config.rate_hz
        self._next = clock()
        self._emitted = 0
        self._index = 0
        self._warned: set[str] = set()

    @property
    def emitted(self) -> int:
        """How many samples this source has played (emitted or refused by the model spec)."""
        return self._emitted

    @property
    def rate_hz(self) -> float:
        """Samples per second."""
        return self._config.rate_hz

    def set_rate(self, rate_hz: float) -> float:
        """Change the rate, validated like the config field; returns the previous rate.

        Raises:
            ValueError: The rate is outside the config's bounds.
        """
        old = self._config
        self._config = DatasetReplayConfig.model_validate({**old.model_dump(), "rate_hz": rate_hz})
        self._period = 1.0 / self._config.rate_hz
        return old.rate_hz

    def due(self, now: float) -> list[SourceRecord]:
        """Every sample whose slot has come, at most one second's worth at once."""
        out: list[SourceRecord] = []
        limit = self._config.limit
        burst = max(1, int(self._config.rate_hz))
        while now >= self._next and len(out) < burst:
            if limit is not None and self._emitted >= limit:
                break
            i = self._emitted % len(self._y)
            self._next += self._period
            record = self._record(i)
            if record is not None:
                out.append(record)
                self._index += 1
            self._emitted += 1
        if now - self._next > 1.0:
            # Fell behind (process paused): skip ahead instead of bursting forever.
            self._next = now
        return out

    def _record(self, i: int) -> SourceRecord | None:
        config = self._config
        label = int(self._y[i])
        spec = self.expected
        try:
            inputs = conform(
                self._x[i],
                [] if spec is None else [spec.shape],
                [] if spec is None else [spec.dtype],
                typed=True,
                what=f"{config.dataset} row {i}",
            )
        except SampleError as exc:
            self.reject(exc.reason)
            if exc.reason not in self._warned:
                self._warned.add(exc.reason)
                logger.warning("source %s skips samples the model cannot take: %s", self.name, exc)
            return None
        x = np.round(self._x[i], 5).tolist()
        body = {"i": int(i), "x": x, "y": label, "source": self.name}
        return SourceRecord(
            stream=config.stream,
            kind=config.kind,
            content_type="application/json",
            body=json.dumps(body, separators=(",", ":")).encode(),
            sample=None if config.evaluation else (x, label),
            source=self.name,
            index=self._index,
            inputs=inputs,
            label=label,
            evaluation=config.evaluation,
        )


def _compute_replay_arrays(
    config: DatasetReplayConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    from edgefl.datasets import load_dataset
    from edgefl.partition import dirichlet_partition

    data = load_dataset(config.dataset, seed=config.seed)
    x, y = (data.x_train, data.y_train) if config.split == "train" else (data.x_test, data.y_test)
    if config.partition is not None and (config.num_partitions or 1) > 1:
        parts = dirichlet_partition(y, config.num_partitions or 1, config.alpha, seed=config.seed)
        keep = parts[config.partition]
        x, y = x[keep], y[keep]
    return np.ascontiguousarray(x.reshape(len(x), -1)), np.asarray(y)


def replay_arrays(
    config: DatasetReplayConfig, cache_dir: Path | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The samples a replay source plays: flat features and labels.

    The bundled datasets come through scikit-learn (loading and the stratified split),
    whose import with SciPy costs a process about 120 MB of resident memory for good. With
    ``cache_dir`` the arrays are computed once in a short-lived child process and kept
    there as ``.npz`` (keyed by everything that selects the samples), so the agent
    process itself only ever reads numpy files.

    Raises:
        ConfigError: The child process could not prepare the samples.
    """
    config = device_partition(config, None)  # explicit num_partitions in the cache key
    if cache_dir is None:
        return _compute_replay_arrays(config)
    selection = config.model_dump(include={"dataset", "split", "partition", "num_partitions"})
    selection.update(alpha=config.alpha, seed=config.seed)
    key = hashlib.sha256(json.dumps(selection, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"replay-{config.dataset}-{key}.npz"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgefl.edge_agent.sources",
                config.model_dump_json(),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0 or not path.is_file():
            from edgefl.errors import ConfigError

            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(
                f"cannot prepare the {config.dataset} samples of source {config.name!r}: {tail}",
                hint="check that the device install has the dataset extras (scikit-learn)",
            )
    with np.load(path) as data:
        return np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64)


def export_replay_arrays(config_json: str, target: str) -> None:
    """Child-process side of :func:`replay_arrays`: compute and write the ``.npz``."""
    x, y = _compute_replay_arrays(DatasetReplayConfig.model_validate_json(config_json))
    path = Path(target)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, x=x, y=y)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
