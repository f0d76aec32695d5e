"""Small TCP helpers shared by the processes edgefl supervises (stdlib only)."""

from __future__ import annotations

import socket

__all__ = ["dial_host", "free_port", "port_open"]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel says is free on ``host`` (it may be taken again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def dial_host(host: str) -> str:
    """Where to connect to reach a listener bound to ``host`` on this machine.

    A wildcard address (``0.0.0.0``, ``::`` or empty) is not dialable: loopback is.
    """
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
