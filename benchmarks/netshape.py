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

**Trace replay.** With a :class:`NetworkTrace` the conditions change on schedule: from
:meth:`ShapingProxy.start_trace` on, each chunk is shaped by the segment in force when it
is sent (the last segment holds after the trace's end). An *outage* segment is a black
hole, modelled as TCP lives through one:

* a chunk sent during an outage, or still on the link when one begins, is lost; TCP
  retransmits it after ``rto_ms``, then after twice that and so on (Linux doubles the
  retransmission timeout, up to 120 s), so it goes out again at the first retransmission
  after the outage ends, and travels with the delay in force then. Everything the same
  direction sends until then waits behind it (in order), as behind a TCP head that was
  lost. After a 30 s outage an old connection can stay silent for many more seconds:
  the next retransmission may be 20 s away;
* a connection opened during an outage loses its SYN; the client's kernel retries after
  1, 3, 7, 15, 31 s (Linux's initial 1 s SYN timeout, doubling), so the relay connects
  upstream only at the first retry after the outage (until then the client's bytes wait
  unread). The relay's own listener still accepts at once: it is on loopback;
* ``reset``: the outage ends with the device on another address (a new cell, a NAT that
  forgot the flow); every connection opened before its end is reset (RST both ways), so
  clients must reconnect.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import random
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LinkShape", "NetworkTrace", "ShapingProxy", "TraceError", "TraceSegment"]

_CHUNK = 65536
_RTO_MAX_S = 120.0  # Linux's TCP_RTO_MAX
_SYN_RTO_S = 1.0  # Linux's initial SYN retransmission timeout (RFC 6298)
_SYN_RETRIES = 6  # Linux's tcp_syn_retries: the client gives up after about 127 s


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


class TraceError(ValueError):
    """A trace file or document that cannot be replayed; the message says what to fix."""


_SEGMENT_KEYS = frozenset(
    {"label", "duration_s", "rtt_ms", "uplink_kbps", "downlink_kbps", "loss", "outage", "reset"}
)


@dataclass(frozen=True)
class TraceSegment:
    """A stretch of a trace during which the conditions hold still.

    Attributes:
        duration_s: How long it lasts.
        shape: The conditions (ignored during an outage).
        outage: Nothing gets through (see the module docstring).
        reset: Only with ``outage``: it ends with every connection reset.
        label: What it stands for (``lte``, ``handover``, ``tunnel`` ...).
    """

    duration_s: float
    shape: LinkShape = LinkShape()
    outage: bool = False
    reset: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise TraceError(f"a segment's duration_s must be > 0, got {self.duration_s}")
        if self.reset and not self.outage:
            raise TraceError("reset: true only goes with outage: true")

    def to_dict(self) -> dict[str, Any]:
        """The segment as the trace file writes it."""
        doc: dict[str, Any] = {"label": self.label, "duration_s": self.duration_s}
        if self.outage:
            doc["outage"] = True
            if self.reset:
                doc["reset"] = True
            return doc
        doc["rtt_ms"] = self.shape.rtt_ms
        for key, bps in (
            ("uplink_kbps", self.shape.uplink_bps),
            ("downlink_kbps", self.shape.downlink_bps),
        ):
            doc[key] = None if bps is None else bps / 1000.0
        doc["loss"] = self.shape.loss
        return doc


@dataclass(frozen=True)
class NetworkTrace:
    """Time-ordered segments of network conditions, replayed by :class:`ShapingProxy`.

    The file format (JSON)::

        {"name": "cellular", "about": "where the figures come from", "rto_ms": 200,
         "segments": [
           {"label": "lte", "duration_s": 8, "rtt_ms": 35, "uplink_kbps": 8000,
            "downlink_kbps": 20000, "loss": 0.0},
           {"label": "tunnel", "duration_s": 5, "outage": true},
           {"label": "new-cell", "duration_s": 12, "outage": true, "reset": true}]}

    ``rtt_ms`` is required in a segment that is not an outage; a missing or ``null``
    rate is unlimited, a missing loss is 0.

    Attributes:
        name: Short name (reports).
        segments: The segments in order.
        about: Where the trace comes from.
        rto_ms: TCP's retransmission timeout (also the first retransmission after an
            outage's loss).
    """

    name: str
    segments: tuple[TraceSegment, ...]
    about: str = ""
    rto_ms: float = 200.0

    def __post_init__(self) -> None:
        if not self.segments:
            raise TraceError(f"trace {self.name!r} has no segments")

    @property
    def duration_s(self) -> float:
        """The length of the trace."""
        return sum(seg.duration_s for seg in self.segments)

    def starts(self) -> list[float]:
        """Each segment's start, seconds from the trace's start."""
        out, t = [], 0.0
        for seg in self.segments:
            out.append(t)
            t += seg.duration_s
        return out

    def index_at(self, t: float) -> int:
        """The segment in force ``t`` seconds into the trace (the last one after its end)."""
        if t < 0:
            return 0
        return min(bisect.bisect_right(self.starts(), t) - 1, len(self.segments) - 1)

    def outages(self) -> list[tuple[float, float, bool]]:
        """``(start_s, end_s, reset)`` of each outage; adjacent outage segments merge."""
        out: list[tuple[float, float, bool]] = []
        for start, seg in zip(self.starts(), self.segments, strict=True):
            if not seg.outage:
                continue
            end = start + seg.duration_s
            if out and math.isclose(out[-1][1], start):
                out[-1] = (out[-1][0], end, out[-1][2] or seg.reset)
            else:
                out.append((start, end, seg.reset))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The trace as its file holds it."""
        return {
            "name": self.name,
            "about": self.about,
            "rto_ms": self.rto_ms,
            "segments": [seg.to_dict() for seg in self.segments],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, where: str = "trace") -> NetworkTrace:
        """Read a trace document.

        Raises:
            TraceError: A missing or unknown key, or a value out of range, named by
                segment number.
        """
        if not isinstance(doc, Mapping):
            raise TraceError(f"{where}: expected a JSON object with 'segments'")
        unknown = sorted(set(doc) - {"name", "about", "rto_ms", "segments"})
        if unknown:
            raise TraceError(f"{where}: unknown keys {unknown}")
        raw = doc.get("segments")
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise TraceError(f"{where}: 'segments' must be a non-empty list")
        rto_ms = _number(doc.get("rto_ms", 200.0), f"{where}: rto_ms")
        segments = []
        for n, item in enumerate(raw):
            at = f"{where}: segment {n}"
            if not isinstance(item, Mapping):
                raise TraceError(f"{at}: expected an object")
            bad = sorted(set(item) - _SEGMENT_KEYS)
            if bad:
                raise TraceError(f"{at}: unknown keys {bad} (allowed: {sorted(_SEGMENT_KEYS)})")
            if "duration_s" not in item:
                raise TraceError(f"{at}: duration_s is required")
            outage = item.get("outage", False)
            reset = item.get("reset", False)
            if not isinstance(outage, bool) or not isinstance(reset, bool):
                raise TraceError(f"{at}: outage and reset are true or false")
            try:
                if outage:
                    shape = LinkShape(rto_ms=rto_ms)
                else:
                    if "rtt_ms" not in item:
                        raise TraceError(f"{at}: rtt_ms is required (or outage: true)")
                    shape = LinkShape(
                        rtt_ms=_number(item["rtt_ms"], f"{at}: rtt_ms"),
                        uplink_bps=_rate(item.get("uplink_kbps"), f"{at}: uplink_kbps"),
                        downlink_bps=_rate(item.get("downlink_kbps"), f"{at}: downlink_kbps"),
                        loss=_number(item.get("loss", 0.0), f"{at}: loss"),
                        rto_ms=rto_ms,
                    )
                segments.append(
                    TraceSegment(
                        duration_s=_number(item["duration_s"], f"{at}: duration_s"),
                        shape=shape,
                        outage=outage,
                        reset=reset,
                        label=str(item.get("label", "")),
                    )
                )
            except TraceError:
                raise
            except ValueError as exc:
                raise TraceError(f"{at}: {exc}") from exc
        return cls(
            name=str(doc.get("name", "trace")),
            segments=tuple(segments),
            about=str(doc.get("about", "")),
            rto_ms=rto_ms,
        )

    @classmethod
    def load(cls, path: Path) -> NetworkTrace:
        """Read a trace file (JSON).

        Raises:
            TraceError: The file cannot be read or is not a valid trace.
        """
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise TraceError(f"cannot read the trace {path}: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path} is not JSON: {exc}") from exc
        return cls.from_dict(doc, where=str(path))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _rate(value: Any, what: str) -> float | None:
    if value is None:
        return None
    kbps = _number(value, what)
    if kbps <= 0:
        raise TraceError(f"{what} must be > 0 kbit/s (omit it for unlimited), got {value!r}")
    return kbps * 1000.0


class _Schedule:
    """The conditions in force at a time: the fixed shape, or the trace from its origin."""

    def __init__(self, shape: LinkShape, trace: NetworkTrace | None) -> None:
        self.shape = shape
        self.trace = trace
        self.origin: float | None = None
        self._starts: list[float] = []
        self._outages: list[tuple[float, float, bool]] = []

    def begin(self, origin: float) -> None:
        assert self.trace is not None
        self._starts = [origin + s for s in self.trace.starts()]
        self._outages = [(origin + a, origin + b, r) for a, b, r in self.trace.outages()]
        self.origin = origin

    @property
    def outages(self) -> list[tuple[float, float, bool]]:
        return self._outages

    def shape_at(self, t: float) -> LinkShape:
        if self.trace is None or self.origin is None or t < self.origin:
            return self.shape
        index = min(bisect.bisect_right(self._starts, t) - 1, len(self._starts) - 1)
        return self.trace.segments[index].shape

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """The outage ``t`` falls in, as absolute ``(start, end)``."""
        for start, end, _ in self._outages:
            if start <= t < end:
                return start, end
            if start > t:
                break
        return None

    def first_clear(self, first_sent: float, rto_s: float, *, retries: int | None = None) -> float:
        """When a transmission first lost at ``first_sent`` finally goes through.

        Retransmissions at ``first_sent + rto_s * (2**k - 1)`` (each wait doubled, capped
        at 120 s); the first one outside every outage wins. ``retries`` bounds them (a SYN):
        ``inf`` when the sender gives up first.
        """
        t, wait = first_sent, rto_s
        for _ in range(10_000 if retries is None else retries):
            t += wait
            wait = min(wait * 2.0, _RTO_MAX_S)
            if self.outage_at(t) is None:
                return t
        return math.inf


class _Direction:
    """Delivery schedule of one direction: link occupancy, delay, loss, outages, order."""

    def __init__(self, schedule: _Schedule, upstream: bool, rng: random.Random) -> None:
        self.schedule = schedule
        self.upstream = upstream
        self.rng = rng
        self.link_free_at = 0.0
        self.last_delivery = 0.0
        self.release: float | None = None  # a head lost in an outage goes out again then
        self.chunks = 0
        self.held = 0
        self.outage_lost = 0

    def delivery_time(self, now: float, size: int) -> float:
        schedule = self.schedule
        shape = schedule.shape_at(now)
        bps = shape.uplink_bps if self.upstream else shape.downlink_bps
        sent = now
        if bps is not None:
            sent = max(now, self.link_free_at) + size * 8.0 / bps
            self.link_free_at = sent
        at = sent + shape.rtt_ms / 2000.0
        if self.release is not None and now < self.release:
            # Behind a head lost in an outage: TCP sends it once the head got through.
            at = max(at, self.release + schedule.shape_at(self.release).rtt_ms / 2000.0)
        elif schedule.outage_at(now) is not None or schedule.outage_at(at) is not None:
            self.release = schedule.first_clear(now, shape.rto_ms / 1000.0)
            at = self.release + schedule.shape_at(self.release).rtt_ms / 2000.0
            self.outage_lost += 1
        elif shape.loss and self.rng.random() < shape.loss:
            at += (shape.rto_ms + shape.rtt_ms) / 1000.0
            self.held += 1
        at = max(at, self.last_delivery)  # TCP delivers in order
        self.last_delivery = at
        self.chunks += 1
        return at


class ShapingProxy:
    """A shaping TCP relay ``127.0.0.1:port`` → ``upstream`` on its own event-loop thread.

    Args:
        upstream_port: Port to relay to.
        shape: The network conditions (with a trace: until :meth:`start_trace`).
        upstream_host: Host to relay to (loopback).
        seed: Seed of the loss draws.
        trace: Conditions that change on schedule once :meth:`start_trace` is called.
    """

    def __init__(
        self,
        upstream_port: int,
        shape: LinkShape,
        *,
        upstream_host: str = "127.0.0.1",
        seed: int = 0,
        trace: NetworkTrace | None = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.shape = shape
        self.trace = trace
        self.host = "127.0.0.1"
        self.port = 0
        self._rng = random.Random(seed)
        self._schedule = _Schedule(shape, trace)
        self._directions: list[_Direction] = []
        # Open connections: client side -> (when accepted, its pumps once relaying).
        self._opened: dict[asyncio.StreamWriter, tuple[float, list[asyncio.Task[None]]]] = {}
        self.connections = 0  # connections accepted
        self.resets = 0  # connections reset at the end of an outage
        self.syn_delayed = 0  # connections whose set-up waited out an outage
        self._closing: asyncio.Event | None = None
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

    @property
    def outage_lost_chunks(self) -> int:
        """Chunks first lost to an outage (then delivered after it), both directions."""
        return sum(d.outage_lost for d in self._directions)

    @property
    def trace_origin(self) -> float | None:
        """``time.monotonic()`` at which the trace started, ``None`` before."""
        return self._schedule.origin

    def start_trace(self, origin: float | None = None) -> float:
        """Start replaying the trace now (or at monotonic ``origin``); returns the origin.

        Raises:
            RuntimeError: No trace was given, the relay is not running, or the trace
                already started.
        """
        if self.trace is None:
            raise RuntimeError("this relay has no trace to replay")
        loop = self._loop
        if loop is None:
            raise RuntimeError("start the relay before its trace")
        if self._schedule.origin is not None:
            raise RuntimeError("the trace already started")
        at = time.monotonic() if origin is None else origin

        def begin() -> None:
            self._schedule.begin(at)
            for _, end, reset in self._schedule.outages:
                if reset:
                    loop.call_at(end, self._reset_before, end)

        # On the relay's own thread, so that no chunk sees half a schedule; the event
        # loop's clock is time.monotonic(), so the resets are due at the trace's times.
        asyncio.run_coroutine_threadsafe(_call(begin), loop).result(timeout=10)
        return at

    def _reset_before(self, end: float) -> None:
        """An outage that moved the device to another address ends: reset old connections."""
        for writer, (opened, pumps) in list(self._opened.items()):
            if opened < end:
                _reset(writer)
                for task in pumps:  # the upstream side is closed when its pumps end
                    task.cancel()
                self.resets += 1

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
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._closing is not None:
            self._closing.set()
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
        self.connections += 1
        accepted = time.monotonic()
        self._opened[writer] = (accepted, [])
        try:
            await self._relay_accepted(reader, writer, accepted)
        finally:
            self._opened.pop(writer, None)

    async def _relay_accepted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accepted: float
    ) -> None:
        if self._schedule.outage_at(accepted) is not None:
            # The SYN is lost: the client's kernel retries it after 1, 3, 7 ... s.
            self.syn_delayed += 1
            through = self._schedule.first_clear(accepted, _SYN_RTO_S, retries=_SYN_RETRIES)
            wait = through - time.monotonic()
            assert self._closing is not None
            if math.isinf(through) or self._closing.is_set():
                writer.transport.abort()  # the client gave up (ETIMEDOUT)
                self._writers.discard(writer)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=max(wait, 0.0))
            if self._closing.is_set() or writer.transport.is_closing():
                writer.transport.abort()
                self._writers.discard(writer)
                return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()  # upstream refused: so does the "network"
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        uplink = _Direction(self._schedule, True, self._rng)
        downlink = _Direction(self._schedule, False, self._rng)
        self._directions += [uplink, downlink]
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, uplink, writer)),
            asyncio.create_task(self._pump(up_reader, writer, downlink, up_writer)),
        ]
        self._tasks.update(pumps)
        self._opened[writer] = (accepted, pumps)
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


async def _call(fn: Any) -> None:
    fn()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (zero linger), as a peer that lost the connection's state does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
