"""The agent's local training data: labelled samples its sources collected, in SQLite (WAL).

One file, ``<state_dir>/samples.db``. The daemon appends every labelled sample
(:meth:`LocalDataStore.add_many`); the ClientApp, in a process the SuperNode starts for
each message, reads it (:meth:`LocalDataStore.train_arrays`,
:meth:`LocalDataStore.eval_arrays`). WAL lets that reader see a consistent snapshot while
the daemon keeps writing; both sides wait on a busy database instead of failing.

The store is bounded by ``max_samples``: past it the oldest samples are deleted and
counted in ``dropped``. Sample ids are never reused (``AUTOINCREMENT``), so the
train/evaluation split, which is a pure function of the id, stays stable as samples come
and go: a sample is used for evaluation when a multiplicative hash of its id falls below
``eval_fraction``.

Features are stored flat (float32); :class:`LocalDataStore` reshapes them to the
``input_shape`` of the model it serves (``edgefl.zoo.ModelSpec.input_shape``) and keeps
only samples of that size, so a store fed by two different sensors still trains one model.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from edgefl.errors import BadInputError, ConfigError

__all__ = ["SAMPLES_FILE", "DataStoreStats", "LocalDataStore", "Sample", "is_eval_id"]

SAMPLES_FILE: Final = "samples.db"
_BUSY_TIMEOUT_MS: Final = 10_000
_GOLDEN: Final = 2654435761  # Knuth's multiplicative hash constant (2^32 / φ)
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS samples ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, stream TEXT NOT NULL,"
    " label INTEGER NOT NULL, dim INTEGER NOT NULL, x BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped', 0)",
)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Sample:
    """One labelled sample.

    Attributes:
        x: Flat feature vector.
        y: Class label.
        stream: Dataset or stream it came from.
        ts: Wall-clock time it was collected (seconds); now when ``None``.
    """

    x: Sequence[float] | npt.NDArray[np.floating]
    y: int
    stream: str = "samples"
    ts: float | None = None


@dataclass(frozen=True)
class DataStoreStats:
    """Counts for ``agent status``."""

    samples: int
    dropped: int
    max_samples: int


def is_eval_id(sample_ids: npt.NDArray[np.int64], eval_fraction: float) -> npt.NDArray[np.bool_]:
    """Which sample ids belong to the evaluation split (a pure function of the id)."""
    ids = sample_ids.astype(np.uint64)
    hashed = (ids * np.uint64(_GOLDEN)) % np.uint64(2**32)
    result: npt.NDArray[np.bool_] = hashed.astype(np.float64) / 2.0**32 < eval_fraction
    return result


class LocalDataStore:
    """The samples one device collected; implements ``edgefl.edge_agent.fl.data.TrainingData``.

    Args:
        path: The SQLite file.
        input_shape: Shape of one model input; only samples with that many features are
            served, reshaped to ``(n, *input_shape)``. Required by the two array methods.
        max_samples: Keep at most this many samples (the oldest are dropped).
        eval_fraction: Share of sample ids held out for evaluation.
        create: Create the file when missing; a reader passes ``False`` and gets a clear
            error instead of an empty new file.

    Raises:
        ConfigError: ``max_samples`` or ``eval_fraction`` is out of range.
        BadInputError: ``create`` is false and there is no store at ``path``, or the file
            is not a data store.
    """

    def __init__(
        self,
        path: Path,
        *,
        input_shape: Sequence[int] | None = None,
        max_samples: int = 10_000,
        eval_fraction: float = 0.2,
        create: bool = True,
    ) -> None:
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self.path = Path(path)
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape else None
        self.max_samples = max_samples
        self.eval_fraction = eval_fraction
        if not create and not self.path.is_file():
            raise BadInputError(
                f"no local data store at {self.path}",
                hint="the agent creates it once its config has a training section and a "
                "source has produced labelled samples",
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if create:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute("COMMIT")
            self._db.execute("SELECT 1 FROM samples LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise BadInputError(f"{self.path} is not a local data store: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> LocalDataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add_many(self, samples: Iterable[Sample]) -> int:
        """Append samples in one transaction, dropping the oldest past ``max_samples``.

        Returns:
            How many old samples were dropped to make room.
        """
        now = time.time()
        rows = []
        for s in samples:
            x = np.asarray(s.x, dtype=np.float32).reshape(-1)
            rows.append((now if s.ts is None else s.ts, s.stream, int(s.y), x.size, x.tobytes()))
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO samples (ts, stream, label, dim, x) VALUES (?, ?, ?, ?, ?)", rows
                )
                dropped = self._trim()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return dropped

    def _trim(self) -> int:
        row = self._db.execute(
            "SELECT id FROM samples ORDER BY id DESC LIMIT 1 OFFSET ?", (self.max_samples,)
        ).fetchone()
        if row is None:
            return 0
        dropped = self._db.execute("DELETE FROM samples WHERE id <= ?", (row[0],)).rowcount
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
        return int(dropped)

    def count(self) -> int:
        """How many samples the store holds."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def stats(self) -> DataStoreStats:
        """Sample count, dropped total and bound."""
        with self._lock:
            n = int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
            dropped = int(
                self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0]
            )
        return DataStoreStats(samples=n, dropped=dropped, max_samples=self.max_samples)

    def _arrays(self) -> tuple[IntArray, FloatArray, IntArray]:
        if self.input_shape is None:
            raise BadInputError(
                f"{self.path}: no input shape given, cannot build model inputs",
                hint="pass the model's input_shape to LocalDataStore",
            )
        dim = int(np.prod(self.input_shape))
        with self._lock:
            # One read transaction: a consistent snapshot while the daemon writes.
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute(
                    "SELECT id, label, x FROM samples WHERE dim = ? ORDER BY id", (dim,)
                ).fetchall()
                dims: list[tuple[int, int]] = []
                if not rows:
                    dims = self._db.execute(
                        "SELECT dim, COUNT(*) FROM samples GROUP BY dim"
                    ).fetchall()
            finally:
                self._db.execute("COMMIT")
        if not rows:
            have = ", ".join(f"{n} with {d} features" for d, n in dims) or "none"
            raise BadInputError(
                f"{self.path}: no samples with {dim} features for input shape "
                f"{self.input_shape} (the store has {have})",
                hint="let the agent collect labelled samples from a source matching the model",
            )
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        y = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        x = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(
            (len(rows), *self.input_shape)
        )
        return ids, x, y

    def train_arrays(self) -> tuple[FloatArray, IntArray]:
        """The training split, reshaped to ``(n, *input_shape)``; never empty.

        When every sample falls into the evaluation split (a store of one or two
        samples), all of them are used for training instead.

        Raises:
            BadInputError: The store has no sample of the model's size.
        """
        ids, x, y = self._arrays()
        keep = ~is_eval_id(ids, self.eval_fraction)
        if not keep.any():
            return x, y
        return x[keep], y[keep]

    def eval_arrays(self) -> tuple[FloatArray, IntArray]:
        """The evaluation split (may be empty).

        Raises:
            BadInputError: The store has no sample of the model's size.
        """
        ids, x, y = self._arrays()
        held = is_eval_id(ids, self.eval_fraction)
        return x[held], y[held]
