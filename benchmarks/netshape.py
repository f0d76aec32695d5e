"""A loopback TCP relay that shapes traffic: one-way delay, uplink rate limit, TCP-like loss.

Not a benchmark by itself. ``tc netem`` is missing from this kernel (see DESIGN.md), so
network conditions are injected in userspace: the client connects to
:attr:`ShapingProxy.port`, the relay forwards every byte to the upstream port and decides
*when* each chunk it read is delivered on the other side.

The model, per direction (client → server is the uplink):

* **Delay**: each chunk is delivered ``rtt_ms / 2`` after it finished arriving, so a
  request/response exchange sees ``rtt_ms`` of extra round trip.
* **Rate limit**: a serialising link of ``uplink_bps`` / ``downlink_bps`` bits per second.
  A chunk occupies the link for ``8 * len / bps`` seconds after the previous one left
  (a token bucket with a one-chunk burst), then travels with the delay.
* **Loss**: TCP never loses bytes, it retransmits them. What an application sees of
  packet loss is a segment that arrives a retransmission timeout late, and everything
  behind it waiting (head-of-line blocking). So each chunk is, with probability
  ``loss``, held back an extra ``rto_ms + rtt_ms`` (Linux's minimum RTO is 200 ms; the
  retransmission then needs a round trip of its own) and delivery order is preserved:
  no chunk overtakes a held one. Fast retransmit (which needs three duplicate ACKs, so
  enough data in flight) never helps a small request/response flow, which is why the
  full RTO is the right penalty here.

A chunk is one ``read()`` of up to 64 KiB, i.e. roughly what the sender wrote in one go
(one gRPC message with its frames); the proxy's randomness is seeded, so runs repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["LinkShape", "ShapingProxy"]

_CHUNK = 65536


@dataclass(frozen=True)
class LinkShape:
    """Network conditions between the client and the server.

    Attributes:
        rtt_ms: Extra round-trip time, split evenly between the two directions.
        uplink_bps: Client → server rate limit in bit/s, ``None`` for unlimited.
        downlink_bps: Server → client rate limit in bit/s, ``None`` for unlimited.
        loss: Probability that a chunk is "lost" (held back one retransmission timeout),
            applied in both directions.
        rto_ms: Retransmission timeout a lost chunk waits (Linux minimum: 200 ms).
    """

    rtt_ms: float = 0.0
    uplink_bps: float | None = None
    downlink_bps: float | None = None
    loss: float = 0.0
    rto_ms: float = 200.0

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.rto_ms < 0:
            raise ValueError("rtt_ms and rto_ms must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        for bps in (self.uplink_bps, self.downlink_bps):
            if bps is not None and bps <= 0:
                raise ValueError("rate limits must be > 0 bit/s")


class _Direction:
    """Delivery schedule of one direction: link occupancy, delay, loss, order."""

    def __init__(self, shape: LinkShape, bps: float | None, rng: random.Random) -> None:
        self.shape = shape
        self.bps = bps
        self.rng = rng
        self.link_free_at = 0.0
        self.last_delivery = 0.0
        self.chunks = 0
        self.held = 0

    def delivery_time(self, now: float, size: int) -> float:
        sent = now
        if self.bps is not None:
            sent = max(now, self.link_free_at) + size * 8.0 / self.bps
            self.link_free_at = sent
        at = sent + self.shape.rtt_ms / 2000.0
        if self.shape.loss and self.rng.random() < self.shape.loss:
            at += (self.shape.rto_ms + self.shape.rtt_ms) / 1000.0
            self.held += 1
        at = max(at, self.last_delivery)  # TCP delivers in order
        self.last_delivery = at
        self.chunks += 1
        return at


class ShapingProxy:
    """A shaping TCP relay ``127.0.0.1:port`` → ``upstream`` on its own event-loop thread.

    Args:
        upstream_port: Port to relay to.
        shape: The network conditions.
        upstream_host: Host to relay to (loopback).
        seed: Seed of the loss draws.
    """

    def __init__(
        self,
        upstream_port: int,
        shape: LinkShape,
        *,
        upstream_host: str = "127.0.0.1",
        seed: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.shape = shape
        self.host = "127.0.0.1"
        self.port = 0
        self._rng = random.Random(seed)
        self._directions: list[_Direction] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # pumps
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def held_chunks(self) -> int:
        """Chunks held back as lost so far, both directions."""
        return sum(d.held for d in self._directions)

    @property
    def chunks(self) -> int:
        """Chunks relayed so far, both directions."""
        return sum(d.chunks for d in self._directions)

    def start(self, timeout: float = 10.0) -> None:
        """Start the relay thread and wait until it listens."""
        if self._thread is not None:
            raise RuntimeError("ShapingProxy.start() called twice")
        self._thread = threading.Thread(target=self._run, name="shaping-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the shaping proxy did not start")

    def stop(self) -> None:
        """Close the listener and every connection; join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> ShapingProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._listen())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        pumps = list(self._tasks)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        # Connection handlers end by themselves once their pumps are gone; cancelling
        # them instead trips asyncio's start_server callback (it reads the exception).
        await asyncio.gather(*self._handlers, return_exceptions=True)
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.stop)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        try:
            await self._relay(reader, writer)
        finally:
            if me is not None:
                self._handlers.discard(me)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()  # upstream refused: so does the "network"
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        uplink = _Direction(self.shape, self.shape.uplink_bps, self._rng)
        downlink = _Direction(self.shape, self.shape.downlink_bps, self._rng)
        self._directions += [uplink, downlink]
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, uplink, writer)),
            asyncio.create_task(self._pump(up_reader, writer, downlink, up_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: _Direction,
        other: asyncio.StreamWriter,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer, other))
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                queue.put_nowait((direction.delivery_time(time.monotonic(), len(data)), data))
            queue.put_nowait((direction.last_delivery, b""))  # EOF after the data in flight
            await deliver
        finally:
            deliver.cancel()
            await asyncio.gather(deliver, return_exceptions=True)

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
    ) -> None:
        while True:
            at, data = await queue.get()
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.transport.abort()
                other.transport.abort()
                return
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                other.transport.abort()
                return
