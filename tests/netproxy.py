"""A loopback TCP relay for fault tests: put it between a client and a server, then cut it.

Not a test module. ``netem`` is missing from this kernel and ``iptables`` is not
installed, so network faults are injected in userspace: the client connects to
:attr:`TcpProxy.port` and the proxy relays every byte to the upstream port.

* :meth:`TcpProxy.cut` is a silent network drop (a pulled cable, a Wi-Fi or cellular
  link gone): the relay stops forwarding in both directions and stops reading, existing
  connections are held open (neither side sees a FIN or RST; what a pump had already read
  is held back, the rest stays unread in the kernel's buffers, so the sender's window
  fills), and new connections are accepted but get nothing. A peer only notices through
  its own timeouts (MQTT keepalive, gRPC keepalive, a progress deadline).
* :meth:`TcpProxy.restore` resets every held connection (RST), so the clients notice at
  once and reconnect, and forwards normally again.
* :meth:`TcpProxy.resume` brings the link back *without* a reset: the held connections
  carry on where they stopped, nothing lost (a drop shorter than both sides' timeouts).

``downlink_bps`` limits the upstream → client direction (a serialising link shared by
every connection), so a transfer takes long enough to be cut in the middle.
:attr:`TcpProxy.downstream_read` counts the bytes the relay took from the upstream side
(what the server put on the link, including what a cut swallowed);
:attr:`TcpProxy.downstream_sent` the bytes it delivered to the client.

Usage::

    with TcpProxy(broker.port) as proxy:
        ...  # client connects to proxy.port
        proxy.cut()
        proxy.restore()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["TcpProxy"]

_CHUNK = 65536
_PACED_CHUNK = 16384
"""Read size under a rate limit: small enough that pacing (and a cut) is fine-grained."""


@dataclass(eq=False)
class _Conn:
    """One relayed connection: the client side and (once connected) the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    aborted: bool = False
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        """Reset both sides (RST) and wake every pump parked on this connection."""
        self.aborted = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        self.flowing.set()


class TcpProxy:
    """A TCP relay ``127.0.0.1:port`` → ``upstream_host:upstream_port`` on its own thread.

    Args:
        upstream_port: Port to relay to.
        upstream_host: Host to relay to (loopback only in tests).
        port: Port to listen on; a free one when ``0``.
        downlink_bps: Upstream → client rate limit in bit/s; ``None`` for none.
    """

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        port: int = 0,
        *,
        downlink_bps: float | None = None,
    ) -> None:
        if downlink_bps is not None and downlink_bps <= 0:
            raise ValueError("downlink_bps must be > 0 bit/s")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self.port = port
        self.downlink_bps = downlink_bps
        self.accepted = 0
        self.downstream_read = 0
        """Bytes read from the upstream side, over every connection (cut or not)."""
        self.downstream_sent = 0
        """Bytes delivered to the client side, over every connection."""
        self._down_free_at = 0.0
        self._cut = False
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- control (any thread) -------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        """Whether the relay is currently cut."""
        return self._cut

    @property
    def active(self) -> int:
        """Connections currently held or relayed."""
        return len(self._conns)

    def start(self, timeout: float = 10.0) -> None:
        """Start the relay thread and wait until the listening socket is bound."""
        if self._thread is not None:
            raise RuntimeError("TcpProxy.start() called twice")
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the TCP proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"the TCP proxy failed to start: {self._error}")

    def cut(self) -> None:
        """Stop forwarding and reading in both directions; hold every connection open."""
        self._call(self._do_cut)

    def restore(self) -> None:
        """Reset the held connections so the clients reconnect; forward normally again."""
        self._call(self._do_restore)

    def resume(self) -> None:
        """Forward again on the held connections, without a reset (the link came back)."""
        self._call(self._do_resume)

    def stop(self) -> None:
        """Close the listener and every connection, stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- event loop thread ----------------------------------------------------------------

    def _call(self, action: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("TcpProxy is not running")

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        if self._server is not None:
            await self._server.wait_closed()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.stop)

    def _do_cut(self) -> None:
        self._cut = True
        for conn in self._conns:
            conn.flowing.clear()

    def _do_restore(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        self._cut = False

    def _do_resume(self) -> None:
        self._cut = False
        for conn in self._conns:
            conn.flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(writer)
        if not self._cut:
            conn.flowing.set()
        self._conns.add(conn)
        try:
            # Cut: accepted but nothing behind it, the client's CONNECT goes unanswered.
            await conn.flowing.wait()
            if conn.aborted:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return
            conn.upstream = up_writer
            await asyncio.gather(
                self._pump(reader, up_writer, conn, downstream=False),
                self._pump(up_reader, writer, conn, downstream=True),
            )
        finally:
            self._conns.discard(conn)
            conn.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Conn,
        *,
        downstream: bool,
    ) -> None:
        paced = downstream and self.downlink_bps is not None
        size = _PACED_CHUNK if paced else _CHUNK
        while True:
            try:
                data = await reader.read(size)
            except OSError:
                data = b""
            if downstream:
                self.downstream_read += len(data)
            if paced and data:
                await self._pace(len(data))
            # Cut: hold what arrived and read no more, propagate nothing (not even an EOF
            # or a reset from the other side) until resume(), restore() or stop().
            await conn.flowing.wait()
            if conn.aborted:
                return
            if not data:
                conn.abort()  # the other side closed: pass it on
                return
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                conn.abort()
                return
            if downstream:
                self.downstream_sent += len(data)

    async def _pace(self, n: int) -> None:
        """Hold ``n`` bytes until the rate-limited downlink has carried them."""
        assert self.downlink_bps is not None
        now = time.monotonic()
        self._down_free_at = max(now, self._down_free_at) + 8 * n / self.downlink_bps
        delay = self._down_free_at - now
        if delay > 0:
            await asyncio.sleep(delay)
