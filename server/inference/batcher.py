"""Dynamic micro-batching: concurrent requests share one forward pass on a worker thread.

Handlers on the asyncio loop call :meth:`MicroBatcher.submit`; one worker thread takes the
oldest request, adds whatever else is already queued (up to ``max_batch`` samples), runs
one ``forward`` and hands each caller its rows back.

The bounded wait (``max_wait_ms``) is only spent when the previous batch held more than one
request, i.e. when there is concurrency to gather: a lone client in a request/response loop
never waits, so batching costs it no latency, while 32 concurrent clients get batches that
fill up within a couple of milliseconds.

Cancellation: a caller whose coroutine is cancelled (grpc.aio cancels a handler when its
deadline passes or the client goes away) marks its item; items that were cancelled or
whose deadline passed are dropped before compute, and a batch whose callers have *all*
gone stops between layers (:class:`~edgefl.server.inference.models.ComputeCancelledError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from edgefl.server.inference.models import ComputeCancelledError, ServedModel

if TYPE_CHECKING:
    from edgefl.server.metrics import InferenceMetrics

__all__ = ["BatchResult", "BatcherStats", "ComputeAbandonedError", "MicroBatcher"]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
_STOP: Final = object()


class ComputeAbandonedError(Exception):
    """The request was dropped: its deadline passed, or the batcher is stopping."""


@dataclass(frozen=True)
class BatchResult:
    """One caller's share of a forward pass.

    Attributes:
        output: The caller's rows of the model output.
        compute_us: Wall time of the forward pass its batch was part of.
        queue_us: Time from submission to the start of that forward pass.
        batch_size: Samples in that forward pass.
    """

    output: FloatArray
    compute_us: int
    queue_us: int
    batch_size: int


@dataclass
class BatcherStats:
    """Counters a test or an operator can read (each written by one thread only).

    Attributes:
        batches: Forward passes run to completion.
        samples: Samples computed in them.
        max_batch_seen: Largest batch, in samples.
        multi_request_batches: Passes that served more than one request.
        dropped_before_compute: Items skipped because they were cancelled or expired.
        cancelled_in_compute: Passes stopped between layers because every caller left.
        failed: Passes whose ``forward`` raised an unexpected error.
    """

    batches: int = 0
    samples: int = 0
    max_batch_seen: int = 0
    multi_request_batches: int = 0
    dropped_before_compute: int = 0
    cancelled_in_compute: int = 0
    failed: int = 0


@dataclass(eq=False)
class _Item:
    x: FloatArray
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[BatchResult]
    deadline: float | None  # time.monotonic() value, or None for no deadline
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def gone(self, now: float) -> bool:
        return self.cancelled or (self.deadline is not None and now >= self.deadline)


_Outcome = tuple[asyncio.Future[BatchResult], BatchResult | BaseException]


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for future, result in outcomes:
        if future.done():  # the caller was cancelled meanwhile
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _deliver(items: list[_Item], results: list[BatchResult | BaseException]) -> None:
    """Hand results back with one wake-up per event loop, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for item, result in zip(items, results, strict=True):
        by_loop.setdefault(item.loop, []).append((item.future, result))
    for loop, outcomes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_resolve_all, outcomes)


class MicroBatcher:
    """Gathers concurrent requests for one model into batched forward passes.

    Args:
        model: The model; its ``forward`` runs on this batcher's worker thread only.
        max_batch: Most samples per forward pass; 1 turns batching off (one request per
            pass, in arrival order). A request larger than this runs alone.
        max_wait_ms: Longest time the worker waits for more requests once it holds one
            (only when the previous pass served more than one request).
        metrics: Prometheus hooks: each forward pass's size goes to
            ``edgefl_inference_batch_size`` (``None``: not counted).
    """

    def __init__(
        self,
        model: ServedModel,
        *,
        max_batch: int,
        max_wait_ms: float,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.stats = BatcherStats()
        self._metrics = metrics
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._carry: _Item | None = None
        self._last_requests = 1
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"edgefl-batcher-{model.name}", daemon=True
        )
        self._thread.start()

    async def submit(self, x: FloatArray, *, deadline: float | None = None) -> BatchResult:
        """Queue ``x`` (``[N, *input_shape]``) and wait for its rows of the output.

        Args:
            x: The input batch; it is not modified.
            deadline: ``time.monotonic()`` after which nobody wants the answer; the
                item is then dropped before compute.

        Returns:
            The caller's output rows and timings.

        Raises:
            ComputeAbandonedError: The deadline passed before compute, or the batcher
                stopped.
            asyncio.CancelledError: The caller was cancelled (the item is marked so
                the worker skips it, or stops the batch if every caller left).
        """
        if self._stopping:
            raise ComputeAbandonedError("the server is stopping")
        loop = asyncio.get_running_loop()
        item = _Item(x=x, loop=loop, future=loop.create_future(), deadline=deadline)
        self._queue.put(item)
        try:
            return await item.future
        except asyncio.CancelledError:
            item.cancelled = True
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the pass in progress; queued requests are abandoned."""
        self._stopping = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- worker thread ---------------------------------------------------------------

    def _next(self, timeout: float | None) -> _Item | None:
        """The next live item, or ``None`` on timeout/stop (``timeout=0``: don't block)."""
        while True:
            got: _Item | object
            if self._carry is not None:
                got, self._carry = self._carry, None
            else:
                try:
                    if timeout is None:
                        got = self._queue.get()
                    elif timeout <= 0:
                        got = self._queue.get_nowait()
                    else:
                        got = self._queue.get(timeout=timeout)
                except queue.Empty:
                    return None
            if got is _STOP:
                self._stopping = True
                return None
            assert isinstance(got, _Item)
            if got.gone(time.monotonic()):
                self._abandon(got, "its deadline passed while it was queued")
                continue
            return got

    def _abandon(self, item: _Item, why: str) -> None:
        self.stats.dropped_before_compute += 1
        _deliver([item], [ComputeAbandonedError(why)])

    def _gather(self, first: _Item) -> list[_Item]:
        batch, rows = [first], first.rows
        wait_until = None
        if self._last_requests > 1 and self.max_wait_s > 0:
            wait_until = time.monotonic() + self.max_wait_s
        while rows < self.max_batch and not self._stopping:
            remaining = 0.0 if wait_until is None else wait_until - time.monotonic()
            item = self._next(max(remaining, 0.0))
            if item is None:
                break
            if rows + item.rows > self.max_batch:
                self._carry = item  # first of the next pass, keeps arrival order
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _run(self) -> None:
        while not self._stopping:
            first = self._next(None)
            if first is None:
                continue
            batch = self._gather(first) if self.max_batch > 1 else [first]
            self._last_requests = len(batch)
            self._compute(batch)
        # Whatever is still queued is answered, so no handler waits forever.
        leftovers = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                got = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(got, _Item):
                leftovers.append(got)
        for item in leftovers:
            self._abandon(item, "the server is stopping")

    def _compute(self, batch: list[_Item]) -> None:
        def should_stop() -> bool:
            now = time.monotonic()
            return all(item.gone(now) for item in batch)

        x = np.concatenate([item.x for item in batch]) if len(batch) > 1 else batch[0].x
        if not x.flags.writeable:
            x = x.copy()  # torch.from_numpy wants a writable buffer
        start_ns = time.perf_counter_ns()
        try:
            out = self.model.forward(x, should_stop)
        except ComputeCancelledError:
            self.stats.cancelled_in_compute += 1
            logger.info("stopped a batch of %d: every caller had left", len(x))
            _deliver(batch, [ComputeAbandonedError("every caller left") for _ in batch])
            return
        except Exception as exc:
            self.stats.failed += 1
            logger.exception("forward pass of %s failed", self.model.name)
            _deliver(batch, [exc for _ in batch])
            return
        compute_us = (time.perf_counter_ns() - start_ns) // 1000
        stats = self.stats
        stats.batches += 1
        stats.samples += len(x)
        stats.max_batch_seen = max(stats.max_batch_seen, len(x))
        if len(batch) > 1:
            stats.multi_request_batches += 1
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(x))
        results: list[BatchResult | BaseException] = []
        offset = 0
        for item in batch:
            results.append(
                BatchResult(
                    output=out[offset : offset + item.rows],
                    compute_us=compute_us,
                    queue_us=max(start_ns - item.enqueued_ns, 0) // 1000,
                    batch_size=len(x),
                )
            )
            offset += item.rows
        _deliver(batch, results)
