"""Devices that drop out mid-round: skipped, reported, and back later with their accountant.

Real processes on loopback: a TLS SuperLink with node authentication, three registered
SuperNodes running edgefl's ClientApp with a ``state-dir`` (so each device keeps its
privacy accountant in ``fl_privacy.json`` as a deployed device does), and edgefl's
ServerApp submitted with ``flwr run``. One device is lost in round 2, either by
``kill -9`` of its SuperNode (and the ClientApp it runs) or by cutting its network for
longer than 10 s; the round completes with the other two at its timeout, the device is
back for rounds 3 and 4, and the privacy ledger ends equal to every device's own
accountant, with one row per device and round it trained in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefl.edge_agent.fl.privacy import FilePrivacyStore, epsilon_of
from edgefl.edge_agent.identity import prepare_enrollment
from edgefl.federation import FederationPlan
from edgefl.server.fl.ledger import FlStore
from edgefl.server.fl.superlink import write_run_app

try:
    from tests.flower_deploy import (
        Deployment,
        SuperNodeProcess,
        start_deployment,
        wait_clientapp_running,
        wait_run_finished,
    )
    from tests.netproxy import TcpProxy
except ImportError:  # run from inside tests/
    from flower_deploy import (  # type: ignore[import-not-found,no-redef]
        Deployment,
        SuperNodeProcess,
        start_deployment,
        wait_clientapp_running,
        wait_run_finished,
    )
    from netproxy import TcpProxy  # type: ignore[import-not-found,no-redef]

pytestmark = pytest.mark.slow

DEVICES = 3
# A killed device is back once the SuperLink releases its session (~60 s); a cut-off one
# once its SuperNode is found stuck and restarted, which can take a few rounds longer.
ROUNDS_KILL = 5
ROUNDS_CUT = 9
RUN = "offline-run"
# Round 1 includes every device's cold start and σ choice; a lost device costs its round
# this long. Flower keeps a node "online" for 60 s after its last heartbeat.
ROUND_TIMEOUT_S = 60.0


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = start_deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


def _plan(rounds: int) -> FederationPlan:
    return FederationPlan.model_validate(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": DEVICES,
            "rounds": rounds,
            "lr": 0.3,
            "min_train_nodes": 2,
            "min_available_nodes": 2,
            "node_wait_s": 90,
            "round_timeout_s": ROUND_TIMEOUT_S,
            "select_by_capability": False,
            "dp": {"target_epsilon": 8.0},
        }
    )


class _Fleet:
    """Three registered devices, each a SuperNode with its own state dir."""

    def __init__(self, dep: Deployment, tmp_path: Path, proxied: int | None) -> None:
        self.dep = dep
        self.tmp = tmp_path
        self.keys: list[Path] = []
        self.nodes: list[SuperNodeProcess] = []
        self.proxy: TcpProxy | None = None
        if proxied is not None:
            self.proxy = TcpProxy(dep.superlink.port)
            self.proxy.start()
        self.proxied = proxied
        self.relaunches = 0
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        for i in range(DEVICES):
            ident = prepare_enrollment(f"dev-{i}", "lab", self.state_dir(i))
            dep.admin.register_node(ident.paths.node_public_key, name=f"dev-{i}")
            self.keys.append(ident.paths.node_key)
            self.nodes.append(self.start(i))

    def state_dir(self, i: int) -> Path:
        return self.tmp / f"device{i}"

    def start(self, i: int) -> SuperNodeProcess:
        address = self.dep.superlink.address
        if self.proxy is not None and i == self.proxied:
            address = f"127.0.0.1:{self.proxy.port}"
        return SuperNodeProcess(
            self.tmp / f"node{i}-{time.monotonic_ns()}",
            address,
            root_certificates=self.dep.ca.cert_path,
            node_key=self.keys[i],
            node_config={
                "partition-id": i,
                "num-partitions": DEVICES,
                "device-id": f"dev-{i}",
                "state-dir": str(self.state_dir(i)),
            },
        )

    def keep_alive(self, i: int) -> None:
        """Relaunch device ``i``'s SuperNode whenever it exits, as the agent would.

        Right after a crash the SuperLink still holds the node's session online (up to
        60 s after its last heartbeat) and refuses to activate it again: the SuperNode
        exits ("Failed to activate SuperNode") and is simply started again later.
        """

        def loop() -> None:
            while not self._stop.wait(0.5):
                if self.nodes[i].ended():
                    self.nodes[i].kill()
                    self.nodes[i].stop()
                    if self._stop.wait(3.0):
                        return
                    self.nodes[i] = self.start(i)
                    self.relaunches += 1

        self._watch = threading.Thread(target=loop, daemon=True)
        self._watch.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join()
        for node in self.nodes:
            node.stop()
        if self.proxy is not None:
            self.proxy.stop()


def _rounds_done(url: str) -> int:
    store = FlStore(url)
    try:
        return len(store.result(RUN).rounds)
    except Exception:  # the run row does not exist yet
        return 0
    finally:
        store.close()


def _run_with_fault(
    dep: Deployment, tmp_path: Path, fleet: _Fleet, fault: Callable[[], None], rounds: int
) -> str:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    app = write_run_app(tmp_path / "app", _plan(rounds), registry_url=url, run_id=RUN)
    flower_run = dep.admin.submit_run(app)
    deadline = time.monotonic() + 300
    while _rounds_done(url) < 1:
        assert time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.5)
    fault()
    status = wait_run_finished(dep.admin, flower_run, timeout=420)
    assert status == "finished:completed", status
    return url


def _check_ledger(url: str, fleet: _Fleet, lost: str, rounds: int) -> None:
    store = FlStore(url)
    try:
        result = store.result(RUN)
        ledger = store.ledger(RUN)
        plan = store.plan(RUN)
    finally:
        store.close()
    assert result.status == "completed"
    assert [r.round for r in result.rounds] == list(range(1, rounds + 1))
    first, lost_round, *later = result.rounds
    assert first.num_replies == DEVICES
    # The lost device is reported as a failure and skipped; the round aggregates the rest.
    assert lost_round.num_replies == DEVICES - 1, lost_round
    assert lost_round.num_failures >= 1, lost_round
    assert lost_round.aggregated
    # The others go on while it is away (it is not selected until it is online again) ...
    for report in later:
        assert report.num_replies >= DEVICES - 1, report
        assert report.aggregated
    # ... and it is back before the run ends.
    assert later[-1].num_replies == DEVICES, later[-1]
    rows = [(r.device_id, r.round) for r in ledger]
    assert len(rows) == len(set(rows)), "duplicate ledger rows"
    assert ("dev-0", 2) in rows
    assert (lost, 2) not in rows
    assert (lost, rounds) in rows
    for i in range(DEVICES):
        device = f"dev-{i}"
        state = FilePrivacyStore(fleet.state_dir(i)).load(RUN)
        assert state is not None, device
        own = epsilon_of(state.history, plan.dp.delta)
        last = max((r for r in ledger if r.device_id == device), key=lambda r: r.round)
        assert last.epsilon_total == pytest.approx(own, rel=1e-9), device
        assert 0 < own <= plan.dp.cap * (1 + 1e-9)


def test_supernode_killed_mid_round_is_skipped_and_rejoins_with_its_accountant(
    deployment: Deployment, tmp_path: Path
) -> None:
    fleet = _Fleet(deployment, tmp_path, proxied=None)
    lost = 2

    def kill_mid_round() -> None:
        wait_clientapp_running(fleet.nodes[lost], timeout=120)
        fleet.keep_alive(lost)
        fleet.nodes[lost].kill()  # the SuperNode and the ClientApp it was running

    try:
        url = _run_with_fault(deployment, tmp_path, fleet, kill_mid_round, ROUNDS_KILL)
        _check_ledger(url, fleet, f"dev-{lost}", ROUNDS_KILL)
        assert fleet.relaunches >= 1
    finally:
        fleet.stop()


def test_network_cut_mid_round_is_skipped_and_device_rejoins(
    deployment: Deployment, tmp_path: Path
) -> None:
    lost = 1
    fleet = _Fleet(deployment, tmp_path, proxied=lost)
    assert fleet.proxy is not None
    proxy = fleet.proxy

    def cut_mid_round() -> None:
        wait_clientapp_running(fleet.nodes[lost], timeout=120)
        fleet.keep_alive(lost)
        proxy.cut()
        time.sleep(ROUND_TIMEOUT_S + 2)  # > 10 s, and past the round's timeout
        proxy.restore()

    try:
        url = _run_with_fault(deployment, tmp_path, fleet, cut_mid_round, ROUNDS_CUT)
        _check_ledger(url, fleet, f"dev-{lost}", ROUNDS_CUT)
    finally:
        fleet.stop()
