"""Records, input specs, and the two base classes every source derives from."""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefl.edge_agent.sources._samples import RawSample, SampleError, conform

__all__ = ["DataSource", "InputSpec", "PushSource", "SourceRecord"]

logger = logging.getLogger("edgefl.edge_agent.sources")


@dataclass(frozen=True)
class InputSpec:
    """What one model input looks like: ``shape`` without the batch dimension, and dtype.

    Attributes:
        shape: Dimensions of one sample, e.g. ``(64,)`` or ``(8, 8, 1)``.
        dtype: numpy dtype name of the input tensor, e.g. ``"float32"`` or ``"int8"``.
    """

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"an input shape has dimensions of at least 1, got {self.shape}")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"unknown dtype {self.dtype!r}") from exc
        if dtype.kind not in "iuf":
            raise ValueError(f"an input dtype is an integer or float type, got {dtype.name}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype.name)

    @property
    def size(self) -> int:
        """Number of values in one sample."""
        return math.prod(self.shape)

    def describe(self) -> str:
        """``(8, 8, 1) float32``, for messages."""
        return f"{self.shape} {self.dtype}"


@dataclass(frozen=True)
class SourceRecord:
    """One sample a source produced, ready to be enveloped.

    Attributes:
        stream: Stream name (last topic level).
        kind: Envelope kind (``data``, ``telemetry``).
        content_type: MIME type of ``body``.
        body: The payload.
        sample: The labelled sample behind ``body`` as ``(flat features, label)``, when the
            source has one that may be trained on; the agent stores it for local training
            without parsing ``body`` again. Evaluation records never carry one.
        source: Name of the source that produced the record.
        index: 0-based running count of the records that source produced in this process
            (each index once, in order), ``-1`` when the record does not come from a
            source's samples.
        inputs: One model input (no batch dimension), float32, shaped like the spec the
            source validated it against; ``None`` when the record is not a sample.
        label: The sample's label, when known.
        evaluation: A held-out labelled sample: it is scored, and never stored for
            training.
    """

    stream: str
    kind: str
    content_type: str
    body: bytes
    sample: tuple[list[float], int] | None = None
    source: str = ""
    index: int = -1
    inputs: npt.NDArray[np.float32] | None = field(default=None, compare=False, repr=False)
    label: int | None = None
    evaluation: bool = False


class _SourceState:
    """Counters and the expected spec, shared by a source's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.expected: InputSpec | None = None


class DataSource(ABC):
    """A producer of records; :meth:`due` is polled by the agent's source loop.

    Subclasses implement :meth:`due`; :meth:`close` releases what the source holds
    (sockets, threads, files). The agent tells a source the current model's input spec
    with :meth:`expect`; a source that checks samples reads it from :attr:`expected`, and
    counts every sample (or request, or file) it refuses with :meth:`reject`.
    """

    name: str

    @property
    def _state(self) -> _SourceState:
        # Created on first use, so a subclass need not call DataSource.__init__.
        state = self.__dict__.get("_source_state")
        if state is None:
            state = self.__dict__.setdefault("_source_state", _SourceState())
        assert isinstance(state, _SourceState)
        return state

    @abstractmethod
    def due(self, now: float) -> list[SourceRecord]:
        """Records that are due at monotonic time ``now`` (possibly none)."""

    @property
    def rejected(self) -> dict[str, int]:
        """What this source refused so far, counted by reason (a snapshot)."""
        state = self._state
        with state.lock:
            return dict(state.rejected)

    def reject(self, reason: str, count: int = 1) -> None:
        """Count ``count`` refusals under ``reason`` (e.g. ``bad_shape``, ``queue_full``)."""
        state = self._state
        with state.lock:
            state.rejected[reason] += count

    @property
    def expected(self) -> InputSpec | None:
        """The current model's input spec, as last given to :meth:`expect`."""
        return self._state.expected

    def expect(self, spec: InputSpec | None) -> None:
        """Validate samples against ``spec`` from now on (``None``: no model spec)."""
        self._state.expected = spec

    def close(self) -> None:  # noqa: B027 (a hook: most sources hold nothing)
        """Release what the source holds; the default has nothing to release."""

    def status(self) -> dict[str, Any]:
        """A small JSON-able summary for status reports."""
        expected = self.expected
        return {
            "name": self.name,
            "type": type(self).__name__,
            "rejected": self.rejected,
            "expected": None if expected is None else expected.describe(),
        }


def sample_body(
    source: str, index: int, x: npt.NDArray[np.float32], y: int | None
) -> tuple[bytes, list[float]]:
    """The JSON record body ``{"i", "x", "y"?, "source"}`` and the flat rounded features."""
    flat: list[float] = np.round(x.astype(np.float64).ravel(), 6).tolist()
    doc: dict[str, Any] = {"i": index, "x": flat}
    if y is not None:
        doc["y"] = y
    doc["source"] = source
    return json.dumps(doc, separators=(",", ":")).encode(), flat


class PushSource(DataSource):
    """A source other code pushes samples into; :meth:`due` hands out what was pushed.

    :meth:`offer` checks a group of samples against the source's own ``shape``/``dtype``
    and against the model's spec (:meth:`expect`), then queues them all or none: a group
    with one bad sample is refused whole (and counted once under its reason), so the
    sender can fix and resend it without duplicates. The queue holds at most
    ``queue_size`` samples; a group that does not fit is refused as ``queue_full``. Every
    queued sample gets the next :attr:`~SourceRecord.index`. Thread safe: the endpoint
    source offers from its server threads, a plugin from its own reader thread.
    """

    def __init__(
        self,
        name: str,
        *,
        stream: str = "samples",
        kind: str = "data",
        queue_size: int = 1000,
        shape: Sequence[int] | None = None,
        dtype: str | None = None,
        evaluation: bool = False,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.name = name
        self._stream = stream
        self._kind = kind
        self._queue_size = queue_size
        own = None if shape is None else InputSpec(tuple(shape), dtype or "float32")
        self._own_shape = None if own is None else own.shape
        self._own_dtype = None if dtype is None else np.dtype(dtype).name
        self._evaluation = evaluation
        self._queue: collections.deque[SourceRecord] = collections.deque()
        self._lock = threading.Lock()
        self._next_index = 0

    @property
    def queue_size(self) -> int:
        """The most samples the queue holds."""
        return self._queue_size

    @property
    def queued(self) -> int:
        """Samples waiting for :meth:`due`."""
        with self._lock:
            return len(self._queue)

    @property
    def accepted(self) -> int:
        """Samples accepted so far (the next sample's index)."""
        with self._lock:
            return self._next_index

    def constraints(self) -> tuple[list[tuple[int, ...]], list[str]]:
        """The shapes and dtypes a sample must fit now: the source's own, then the model's."""
        shapes = [] if self._own_shape is None else [self._own_shape]
        dtypes = [] if self._own_dtype is None else [self._own_dtype]
        model = self.expected
        if model is not None:
            shapes.append(model.shape)
            dtypes.append(model.dtype)
        return shapes, dtypes

    def check(
        self, samples: Iterable[RawSample]
    ) -> list[tuple[npt.NDArray[np.float32], int | None]]:
        """The samples as float32 model inputs, or :class:`SampleError` (not counted)."""
        shapes, dtypes = self.constraints()
        return [(conform(s.x, shapes, dtypes, typed=s.typed, what=s.what), s.y) for s in samples]

    def offer(self, samples: Sequence[RawSample]) -> int:
        """Check and queue a group of samples, all or none; returns the first one's index.

        Raises:
            SampleError: The group was refused (counted under its reason).
        """
        try:
            if not samples:
                raise SampleError("bad_format", "no samples: send at least one")
            if len(samples) > self._queue_size:
                raise SampleError(
                    "too_many",
                    f"{len(samples)} samples in one go, more than this source's whole queue "
                    f"({self._queue_size}); send them in smaller groups",
                )
            checked = self.check(samples)
            with self._lock:
                if len(self._queue) + len(checked) > self._queue_size:
                    raise SampleError(
                        "queue_full",
                        f"the queue is full ({len(self._queue)} of {self._queue_size} "
                        "samples waiting); retry shortly",
                    )
                first = self._next_index
                for x, y in checked:
                    self._queue.append(self._record(self._next_index, x, y))
                    self._next_index += 1
        except SampleError as exc:
            self.reject(exc.reason)
            raise
        return first

    def offer_one(self, x: npt.ArrayLike, y: int | None = None) -> int:
        """:meth:`offer` for one sample (an array, or nested lists of numbers)."""
        return self.offer([RawSample.of(x, y)])

    def _record(self, index: int, x: npt.NDArray[np.float32], y: int | None) -> SourceRecord:
        body, flat = sample_body(self.name, index, x, y)
        train = y is not None and not self._evaluation
        return SourceRecord(
            stream=self._stream,
            kind=self._kind,
            content_type="application/json",
            body=body,
            sample=(flat, y) if train and y is not None else None,
            source=self.name,
            index=index,
            inputs=x,
            label=y,
            evaluation=self._evaluation,
        )

    def due(self, now: float) -> list[SourceRecord]:
        """Every queued record, oldest first."""
        with self._lock:
            out = list(self._queue)
            self._queue.clear()
        return out

    def status(self) -> dict[str, Any]:
        """Adds the queue and the accepted count."""
        return {
            **super().status(),
            "accepted": self.accepted,
            "queued": self.queued,
            "queue_size": self._queue_size,
        }
