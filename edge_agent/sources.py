"""Data sources: where the samples an agent collects come from.

A source yields records at its own pace; the agent daemon commits every record to the
outbox before it is published. :class:`DatasetReplaySource` plays a bundled dataset back
at a configurable rate, standing in for a real sensor so the agent produces real traffic;
an agent with a ``training:`` section also keeps its labelled samples in the local data
store (:mod:`edgefl.edge_agent.datastore`) that on-device training reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from edgefl.config import StrictModel
from edgefl.proto.ids import ID_REGEX

__all__ = [
    "DataSource",
    "DatasetReplayConfig",
    "DatasetReplaySource",
    "SourceConfig",
    "SourceRecord",
    "build_source",
    "replay_arrays",
]


@dataclass(frozen=True)
class SourceRecord:
    """One sample a source produced, ready to be enveloped.

    Attributes:
        stream: Stream name (last topic level).
        kind: Envelope kind (``data``, ``telemetry``).
        content_type: MIME type of ``body``.
        body: The payload.
        sample: The labelled sample behind ``body`` as ``(flat features, label)``, when the
            source has one; the agent stores it for local training without parsing
            ``body`` again.
    """

    stream: str
    kind: str
    content_type: str
    body: bytes
    sample: tuple[list[float], int] | None = None


class DataSource(ABC):
    """A producer of records; :meth:`due` is polled by the agent's source loop."""

    name: str

    @abstractmethod
    def due(self, now: float) -> list[SourceRecord]:
        """Records that are due at monotonic time ``now`` (possibly none)."""


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
        None, ge=0, description="Replay only this Dirichlet partition (with num_partitions)."
    )
    num_partitions: int = Field(1, ge=1)
    alpha: float = Field(0.5, gt=0)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="Stop after this many samples.")

    @model_validator(mode="after")
    def _partition_in_range(self) -> DatasetReplayConfig:
        if self.partition is not None and self.partition >= self.num_partitions:
            raise ValueError(
                f"partition {self.partition} must be < num_partitions {self.num_partitions}"
            )
        return self


SourceConfig = Annotated[DatasetReplayConfig, Field(discriminator="type")]


class DatasetReplaySource(DataSource):
    """Emits one JSON sample ``{"i", "x", "y"}`` every ``1/rate_hz`` seconds, cycling."""

    def __init__(
        self,
        config: DatasetReplayConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        cache_dir: Path | None = None,
    ) -> None:
        x, y = replay_arrays(config, cache_dir)
        self.name = config.name
        self._config = config
        self._x = x
        self._y = y
        self._period = 1.0 / config.rate_hz
        self._next = clock()
        self._emitted = 0

    @property
    def emitted(self) -> int:
        """How many samples this source has produced."""
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
            x = np.round(self._x[i], 5).tolist()
            body = {"i": int(i), "x": x, "y": int(self._y[i]), "source": self.name}
            out.append(
                SourceRecord(
                    stream=self._config.stream,
                    kind=self._config.kind,
                    content_type="application/json",
                    body=json.dumps(body, separators=(",", ":")).encode(),
                    sample=(x, int(self._y[i])),
                )
            )
            self._emitted += 1
            self._next += self._period
        if now - self._next > 1.0:
            # Fell behind (process paused): skip ahead instead of bursting forever.
            self._next = now
        return out


def build_source(config: SourceConfig, *, cache_dir: Path | None = None) -> DataSource:
    """Instantiate the source a config describes (``cache_dir``: see :func:`replay_arrays`)."""
    return DatasetReplaySource(config, cache_dir=cache_dir)


def _compute_replay_arrays(
    config: DatasetReplayConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    from edgefl.datasets import load_dataset
    from edgefl.partition import dirichlet_partition

    data = load_dataset(config.dataset, seed=config.seed)
    x, y = (data.x_train, data.y_train) if config.split == "train" else (data.x_test, data.y_test)
    if config.partition is not None:
        parts = dirichlet_partition(y, config.num_partitions, config.alpha, seed=config.seed)
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


def _export(config_json: str, target: str) -> None:
    """Child-process side of :func:`replay_arrays`: compute and write the ``.npz``."""
    x, y = _compute_replay_arrays(DatasetReplayConfig.model_validate_json(config_json))
    path = Path(target)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, x=x, y=y)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    _export(sys.argv[1], sys.argv[2])
