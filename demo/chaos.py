"""``edgefl demo --chaos``: faults injected while the agents' results flow.

Three faults, one after the other, each while results stream through the outboxes:

1. **network cut**: one agent's MQTT connection goes through a :class:`CutRelay` from
   the start; the cut resets its connection mid-stream (RST both ways) and refuses it for
   a few seconds, as a link that drops and comes back. Its outbox keeps what it commits
   meanwhile and sends it after the reconnect.
2. **agent kill -9**: another agent's process group is killed with SIGKILL (no clean
   shutdown, records committed but not acknowledged still in its outbox) and started
   again on the same state folder.
3. **broker kill -9**: the server's mosquitto is killed with SIGKILL; the server's
   supervisor restarts it, and every agent reconnects and resends what was not
   acknowledged.

The demo then checks what the system promises: every record committed was stored, and
none twice (the ingest stores an envelope once per ``(device, incarnation, seq)``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from edgefl.netutil import port_open

if TYPE_CHECKING:
    from edgefl.demo.run import Demo

__all__ = ["CutRelay", "inject"]


class CutRelay:
    """A loopback TCP relay to ``upstream_port`` that can cut its connections on demand.

    Unlike :class:`edgefl.testing.CuttingRelay` (which resets the first connection after
    a byte count), the cut happens when the caller says, and new connections are refused
    for a while: the agent's link is down, then back.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket]] = []
        self._down_until = 0.0
        self._stop = threading.Event()
        self.cuts = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept, name="cut-relay", daemon=True)

    def start(self) -> None:
        """Accept and relay connections on a thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop relaying and close every connection."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._reset_all()
        self._thread.join(5.0)

    def cut(self, down_s: float) -> int:
        """Reset every relayed connection now and refuse new ones for ``down_s`` seconds.

        Returns:
            How many connections were cut.
        """
        with self._lock:
            self._down_until = time.monotonic() + down_s
        cut = self._reset_all()
        self.cuts += cut
        return cut

    def _reset_all(self) -> int:
        with self._lock:
            conns, self._open = self._open, []
        for pair in conns:
            for s in pair:  # RST, both ways: the peers see it at once
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
        return len(conns)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = time.monotonic() < self._down_until
            if down:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 5.0)
            except OSError:
                client.close()  # the broker is down: so is the link
                continue
            pair = (client, upstream)
            with self._lock:
                self._open.append(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def inject(demo: Demo) -> dict[str, Any]:
    """Inject the three faults into a running demo (results flowing); what was done."""
    board = demo.board
    agents = demo.agents
    outcome: dict[str, Any] = {}
    version = int(demo.release["version"])

    def flowing() -> bool:
        stored = demo.stored_results()
        board.update(f"results flowing before the faults: {sum(stored.values())}")
        return all(stored.get(a.device_id, 0) >= 5 for a in agents)

    demo.wait(flowing, 120.0, "results flowing", component="results (before the faults)")

    # 1. One agent's network, cut mid-stream.
    relay = demo.relay
    cut_agent = agents[-1]
    if relay is not None:
        board.update(f"cutting {cut_agent.device_id}'s network for 8 s")
        cut = relay.cut(8.0)
        outcome["network_cut"] = {"device": cut_agent.device_id, "connections_reset": cut}
        time.sleep(2.0)

    # 2. kill -9 of another agent, started again on its state folder.
    killed = agents[0]
    assert killed.proc is not None
    board.update(f"kill -9 {killed.device_id} (pid {killed.proc.pid})")
    outcome["agent_killed"] = {"device": killed.device_id, "pid": killed.proc.pid}
    killed.proc.kill()
    time.sleep(1.0)
    demo.start_agents()
    outcome["agent_killed"]["restarted_pid"] = killed.proc.pid

    # 3. kill -9 of the broker; the server's supervisor starts it again.
    pid = int((demo.info.get("pids") or {}).get("broker") or 0)
    port = int(demo.info["broker"]["port"])
    if pid:
        board.update(f"kill -9 the broker (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        outcome["broker_killed"] = {"pid": pid}
        time.sleep(0.5)
        demo.wait(
            lambda: port_open("127.0.0.1", port),
            60.0,
            "the broker restarted by the server",
            component="broker (mosquitto, restarted by edgefl server start)",
            log=demo.server.log_path if demo.server else None,
        )

    def recovered() -> bool:
        statuses = [demo.agent_status(a) for a in agents]
        up = sum(bool(s.get("connected")) for s in statuses)
        board.update(f"after the faults: {up}/{len(agents)} agents connected again")
        return up == len(agents)

    demo.wait(recovered, 120.0, "every agent connected again", component="agents (reconnect)")
    serving = demo.on_release()
    outcome["agents_serving_after"] = serving
    outcome["release_version"] = version
    if relay is not None:
        outcome["network_cut"]["refused_while_down"] = relay.refused
    return outcome
