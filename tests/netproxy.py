"""A loopback TCP relay for fault tests: put it between a client and a broker, then cut it.

Not a test module. ``netem`` is missing from this kernel and ``iptables`` is not
installed, so network faults are injected in userspace: the client connects to
:attr:`TcpProxy.port` and the proxy relays every byte to the upstream port.

* :meth:`TcpProxy.cut` behaves like a pulled cable: nothing is forwarded in either
  direction any more, existing connections are held open (neither side sees a FIN or
  RST; bytes that arrive are swallowed or left unread), and new connections are accepted
  but get nothing. A peer only notices through its own timeouts (MQTT keepalive).
* :meth:`TcpProxy.restore` resets every held connection (RST), so the clients notice at
  once and reconnect, and forwards normally again.

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
from dataclasses import dataclass, field

__all__ = ["TcpProxy"]

_CHUNK = 65536


@dataclass(eq=False)
class _Conn:
    """One relayed connection: the client side and (once connected) the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    stalled: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        """Reset both sides (RST) and wake every pump parked on this connection."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        self.released.set()


class TcpProxy:
    """A TCP relay ``127.0.0.1:port`` → ``upstream_host:upstream_port`` on its own thread.

    Args:
        upstream_port: Port to relay to.
        upstream_host: Host to relay to (loopback only in tests).
        port: Port to listen on; a free one when ``0``.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self.port = port
        self.accepted = 0
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
        """Stop forwarding in both directions; hold every connection open (pulled cable)."""
        self._call(self._do_cut)

    def restore(self) -> None:
        """Reset the held connections so the clients reconnect; forward normally again."""
        self._call(self._do_restore)

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

    def _call(self, action: object) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("TcpProxy is not running")

        async def run() -> None:
            assert callable(action)
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
            conn.stalled = True

    def _do_restore(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        self._cut = False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self._cut:
                # Accepted but nothing behind it: the client's CONNECT goes unanswered.
                conn.stalled = True
                await conn.released.wait()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                conn.abort()
                return
            conn.upstream = up_writer
            if self._cut:  # cut while connecting upstream
                conn.stalled = True
                await conn.released.wait()
                return
            await asyncio.gather(
                self._pump(reader, up_writer, conn), self._pump(up_reader, writer, conn)
            )
        finally:
            self._conns.discard(conn)
            if not conn.stalled:
                conn.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                data = b""
            if conn.stalled:
                # Pulled cable: swallow what arrived, stop reading, propagate nothing (not
                # even an EOF or a reset from the other side) until restore() or stop().
                await conn.released.wait()
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
