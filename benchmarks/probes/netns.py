"""A network namespace joined to this host by a veth pair: "another host" for attacks.

A second loopback address does not stand for another machine (``127.0.0.2`` reaches a
port bound to ``127.0.0.1``), so probes that must come from the network create a
namespace ``efl-<suffix>`` with one end of a veth pair and a private ``/30``: the host
side gets the first address, the namespace the second. Only the namespace's own routes
exist in it, so from there the host is reachable at :attr:`VethNamespace.host_ip` and
nothing else. Needs root (``ip netns add``); everything is deleted on exit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["VethNamespace", "netns_available", "veth_namespace"]


@dataclass(frozen=True)
class VethNamespace:
    """One namespace and its veth link to the host.

    Attributes:
        name: Namespace name (``efl-<suffix>``).
        host_if: Host-side interface.
        ns_if: Interface inside the namespace.
        host_ip: Address of the host side (bind servers here to expose them to the namespace).
        ns_ip: Address of the namespace side.
    """

    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace; output captured as text, never raises on exit code.

        A command still running after ``timeout`` is killed and reported with exit code
        124 (as ``timeout(1)`` does).
        """
        try:
            return subprocess.run(
                self.command(argv),
                env=dict(env) if env is not None else None,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            return subprocess.CompletedProcess(
                exc.cmd, 124, out, err + f"\n(timed out after {timeout:g} s)"
            )

    def can_connect(self, host: str, port: int, timeout: float = 3.0) -> bool:
        """Whether a TCP connection from the namespace to ``host:port`` is accepted."""
        code = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        import sys

        return self.run([sys.executable, "-c", code], timeout=timeout + 10).returncode == 0


def netns_available() -> bool:
    """Whether this process can create namespaces (root and the ``ip`` tool)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _used_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


@contextlib.contextmanager
def veth_namespace(prefix: str = "efl") -> Iterator[VethNamespace]:
    """Create ``<prefix>-<random>`` with a veth pair in a free ``10.213.x.y/30``; delete it after.

    Raises:
        RuntimeError: Not root, or ``ip`` refused (the message quotes it).
    """
    if not netns_available():
        raise RuntimeError("network namespaces need root and the ip tool")
    suffix = secrets.token_hex(3)
    name = f"{prefix}-{suffix}"
    host_if, ns_if = f"{prefix}{suffix}h"[:15], f"{prefix}{suffix}n"[:15]
    used = _used_networks()
    for _ in range(64):
        base = ipaddress.ip_address(f"10.213.{secrets.randbelow(256)}.0") + 4 * secrets.randbelow(
            64
        )
        net = ipaddress.ip_network(f"{base}/30")
        if not any(net.overlaps(u) for u in used):
            break
    else:
        raise RuntimeError("no free 10.213.0.0/16 /30 for the namespace")
    host_ip, ns_ip = str(net.network_address + 1), str(net.network_address + 2)
    created: list[tuple[str, ...]] = []  # what to delete, newest first

    def cleanup() -> None:
        for args in reversed(created):
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip(*args)

    try:
        _ip("netns", "add", name)
        created.append(("netns", "del", name))
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        created.append(("link", "del", host_if))  # deleting one end deletes the pair
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        cleanup()
        raise RuntimeError(f"ip {' '.join(exc.cmd[1:])} failed: {exc.stderr.strip()}") from exc
    try:
        yield VethNamespace(name, host_if, ns_if, host_ip, ns_ip)
    finally:
        cleanup()
