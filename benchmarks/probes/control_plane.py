"""Probes of the SuperLink's control plane (Flower's Control and Runtime APIs).

Attacks (names as ``benchmarks/security_probe.py`` reports them):

- ``control_api_from_outside``: from another host (a network namespace joined by veth),
  holding only the public fleet CA certificate, Flower's own CLI with a fresh
  ``FLWR_HOME`` pointed at the address devices dial tries ``flwr supernode list``,
  ``flwr supernode register`` (a key of its own) and ``flwr run`` (an app of its own);
  then it tries the SuperLink's own port directly. Held when the proxy port is reachable
  from there (a TLS request gets an HTTP answer: the check is not vacuous), every command
  fails, the SuperLink lists no new node and no run, and the SuperLink's port accepts no
  connection from the namespace.
- ``rogue_node_reply``: an insider registers a node key directly on the loopback
  SuperLink (``flwr supernode register``, as anyone reaching the port could before the
  proxy), bypassing ``edgefl server admit``. Its SuperNode connects beside one admitted
  device and claims that device's id. ``edgefl server train`` runs one round. Held when
  the rogue node is never sent a message, the round selected and aggregated only the
  admitted node, and the ledger has rows only for the admitted device.

The server is started as the README says (:class:`edgefl.server.serve.Server`, ports 0),
with ``superlink.host`` on the host side of the veth pair so the namespace can dial it.
``tests/security/test_control_plane.py`` runs these same functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgefl.server.fl.superlink import flower_env, write_run_app
from edgefl.server.serve import Server, ServerConfig
from probes.netns import VethNamespace, veth_namespace

__all__ = [
    "probe_control_api_from_outside",
    "probe_rogue_node_reply",
    "run_probes",
    "started_server",
]

ATTACKS = ("control_api_from_outside", "rogue_node_reply")

_BIN = Path(sys.executable).parent


def _result(held: bool, detail: str) -> dict[str, object]:
    return {"held": held, "detail": detail}


@contextlib.contextmanager
def started_server(workdir: Path, host: str) -> Iterator[Server]:
    """``edgefl server start`` in this process, devices dialling ``host`` (ports 0)."""
    config = ServerConfig.model_validate(
        {
            "state_dir": str(workdir / "server"),
            "ips": ["127.0.0.1", host],
            "superlink": {"host": host, "port": 0},
            "broker": {"port": 0},
        }
    )
    server = Server(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _flwr_home(home: Path, address: str, ca_file: Path) -> dict[str, str]:
    """A fresh ``FLWR_HOME`` with one connection, as an outsider would write it."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "[superlink]\n"
        'default = "target"\n\n'
        "[superlink.target]\n"
        f"address = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(ca_file))}\n",
        encoding="utf-8",
    )
    return flower_env(home)


def _node_public_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return path


def _runs(server: Server) -> list[dict[str, Any]]:
    """The SuperLink's runs, asked on loopback by the admin."""
    admin = server.admin()
    proc = subprocess.run(
        [str(_BIN / "flwr"), "ls", "edgefl", "--format", "json"],
        env=flower_env(admin.home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout
    doc = json.loads(out[out.find("{") :]) if "{" in out else {}
    if not doc.get("success"):
        raise RuntimeError(f"flwr ls on loopback failed: {out.strip()[-300:]} {proc.stderr[-300:]}")
    return list(doc.get("runs", []))


def _answer(proc: subprocess.CompletedProcess[str]) -> tuple[bool, str]:
    """Whether a ``flwr ... --format json`` command succeeded, and Flower's words.

    ``flwr`` exits 0 after many failures; its JSON ``success`` field is what counts.
    """
    out = proc.stdout
    try:
        doc = json.loads(out[out.find("{") :]) if "{" in out else {}
    except json.JSONDecodeError:
        doc = {}
    if proc.returncode == 0 and doc.get("success") is True:
        return True, _tail(proc)
    words = str(doc.get("error-message") or _tail(proc))
    return False, " ".join(words.split())[:120]


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    text = " ".join((proc.stdout + " " + proc.stderr).split())
    return text[-200:]


def probe_control_api_from_outside(
    server: Server, net: VethNamespace, workdir: Path
) -> dict[str, object]:
    """The ``control_api_from_outside`` attack (see the module docstring)."""
    assert server.superlink is not None
    public = server.superlink_address  # what devices dial: host_ip:port
    host = public.rpartition(":")[0]
    ca_file = server.ca_dir / "ca.pem"  # public: every device holds it
    nodes_before = {n.node_id for n in server.admin().list_nodes()}
    runs_before = len(_runs(server))

    # Not vacuous: the proxy port answers the namespace over TLS.
    probe = net.run(
        [
            sys.executable,
            "-c",
            "import http.client, ssl, sys\n"
            "host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n"
            "ctx = ssl.create_default_context(cafile=ca)\n"
            "conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)\n"
            "conn.request('POST', '/v1/control/list-nodes', body=b'')\n"
            "print(conn.getresponse().status)\n",
            host,
            public.rpartition(":")[2],
            str(ca_file),
        ],
        timeout=30,
    )
    if probe.returncode != 0 or not probe.stdout.strip().isdigit():
        return _result(False, f"inconclusive: the namespace cannot reach {public}: {_tail(probe)}")
    status = probe.stdout.strip()

    env = _flwr_home(workdir / "outsider-flwr-home", public, ca_file)
    flwr = str(_BIN / "flwr")
    got_through: list[str] = []
    answers: list[str] = []
    key = _node_public_key(workdir / "outsider.pub")
    app = write_run_app(
        workdir / "outsider-app",
        _plan(),
        registry_url=f"sqlite:///{workdir / 'outsider.db'}",
        run_id="outsider",
    )
    attempts = {
        "supernode list": [flwr, "supernode", "list", "target", "--format", "json"],
        "supernode register": [
            flwr,
            "supernode",
            "register",
            str(key),
            "target",
            "--format",
            "json",
        ],
        "run": [flwr, "run", str(app), "target", "--format", "json"],
    }
    for what, argv in attempts.items():
        ok, words = _answer(net.run(argv, env=env, timeout=120))
        if ok:
            got_through.append(f"{what}: {words}")
        else:
            answers.append(f"{what} refused ({words})")

    # What the SuperLink itself saw, asked on loopback.
    new_nodes = {n.node_id for n in server.admin().list_nodes()} - nodes_before
    if new_nodes:
        got_through.append(f"nodes registered from outside: {sorted(new_nodes)}")
    runs_after = len(_runs(server))
    if runs_after != runs_before:
        got_through.append(f"runs started from outside: {runs_after - runs_before}")
    raw_port = server.superlink.port
    for target in sorted({net.host_ip, host}):
        if net.can_connect(target, raw_port):
            got_through.append(f"the SuperLink's own port {target}:{raw_port} accepts connections")
    if got_through:
        return _result(False, "; ".join(got_through))
    return _result(
        True,
        f"proxy {public} reachable from {net.ns_ip} (Control API -> HTTP {status}); "
        f"{'; '.join(answers)}; no node or run added; SuperLink port {raw_port} "
        "(loopback) refuses the namespace",
    )


def _plan(**extra: object) -> Any:
    from edgefl.federation import FederationPlan

    return FederationPlan.model_validate(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": 2,  # the two SuperNodes' partitions (num-partitions=2)
            "rounds": 1,
            "min_train_nodes": 1,
            "min_available_nodes": 1,
            "fraction_train": 1.0,
            "node_wait_s": 60,
            "round_timeout_s": 240,
            **extra,
        }
    )


def _supernode(
    workdir: Path, name: str, server: Server, node_key: Path, device_claim: str, partition: int
) -> tuple[subprocess.Popen[bytes], Path]:
    from edgefl.netutil import free_port

    log_path = workdir / f"{name}.log"
    node_config = (
        f'partition-id={partition} num-partitions=2 device-id="{device_claim}" '
        f'state-dir="{workdir / name / "fl"}"'
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(_BIN / "flower-supernode"),
                "--superlink",
                server.superlink_address,
                "--root-certificates",
                str(server.ca_dir / "ca.pem"),
                "--auth-supernode-private-key",
                str(node_key),
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=flower_env(workdir / name / "flwr-home"),
            start_new_session=True,
        )
    return proc, log_path


def _end(proc: subprocess.Popen[bytes]) -> None:
    from edgefl.procs import end_process_group

    if proc.poll() is None:
        end_process_group(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def probe_rogue_node_reply(server: Server, workdir: Path) -> dict[str, object]:
    """The ``rogue_node_reply`` attack (see the module docstring)."""
    from edgefl.edge_agent.identity import prepare_enrollment
    from edgefl.server.enrollment import admit
    from edgefl.server.fl.ledger import FlStore
    from edgefl.server.registry import make_engine

    honest_id = "honest-0"
    engine = make_engine(server.db_url)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        honest = prepare_enrollment(honest_id, "lab", workdir / honest_id)
        honest_node = admit(honest.request, ca=server.ca, admin=server.admin(), engine=engine)
        rogue = prepare_enrollment("rogue-0", "lab", workdir / "rogue")
        # The insider's way in: straight to the loopback SuperLink, no enrollment.
        rogue_node = server.admin().register_node(rogue.paths.node_public_key, name="rogue")
        proc, honest_log = _supernode(
            workdir, "honest", server, honest.paths.node_key, honest_id, 0
        )
        procs.append(proc)
        proc, rogue_log = _supernode(workdir, "rogue", server, rogue.paths.node_key, honest_id, 1)
        procs.append(proc)
        wanted = {int(honest_node.node_id), rogue_node}
        started = time.monotonic()
        deadline = started + 90
        while True:
            online = {n.node_id for n in server.admin().list_nodes() if n.status == "online"}
            if wanted <= online:
                break
            if time.monotonic() > deadline:
                return _result(False, f"inconclusive: nodes {sorted(wanted - online)} never online")
            time.sleep(1.0)

        config = workdir / "server-config.json"
        config.write_text(json.dumps({"state_dir": str(server.state_dir)}), encoding="utf-8")
        plan = workdir / "plan.json"
        plan.write_text(_plan().model_dump_json(), encoding="utf-8")
        run_id = "rogue-probe"
        online_s = time.monotonic() - started
        done = subprocess.run(
            [
                str(_BIN / "edgefl"),
                "server",
                "train",
                "--plan",
                str(plan),
                "--config",
                str(config),
                "--run-id",
                run_id,
                "--wait",
                "--poll-s",
                "2",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        )
        train_s = time.monotonic() - started - online_s
        rogue_text = rogue_log.read_text(encoding="utf-8", errors="replace")
        honest_text = honest_log.read_text(encoding="utf-8", errors="replace")
        if "Receiving: train" in rogue_text:
            return _result(False, f"the rogue node {rogue_node} was sent a train message")
        if done.returncode != 0:
            return _result(
                False,
                f"inconclusive: server train exited {done.returncode}: "
                f"{' '.join((done.stdout + done.stderr).split())[-300:]}",
            )
        if "Receiving: train" not in honest_text:
            return _result(False, "inconclusive: the admitted node was not trained either")
        store = FlStore(server.db_url)
        try:
            reports = store.result(run_id).rounds
            ledger = store.ledger(run_id)
        finally:
            store.close()
        devices = sorted({row.device_id for row in ledger})
        if devices != [honest_id] or len(ledger) != 1:
            return _result(False, f"ledger rows for {devices} ({len(ledger)} rows), expected one")
        counts = [(r.num_selected, r.num_replies) for r in reports]
        if counts != [(1, 1)]:
            return _result(False, f"rounds (selected, aggregated) {counts}, expected [(1, 1)]")
        return _result(
            True,
            f"rogue node {rogue_node} (registered on loopback, claiming {honest_id!r}) was "
            "online and never sent a message; round 1 selected and aggregated only the "
            f"admitted node; ledger rows only for {honest_id} (nodes online after "
            f"{online_s:.0f} s, run {train_s:.0f} s)",
        )
    finally:
        for proc in procs:
            _end(proc)
        engine.dispose()


def run_probes(workdir: Path) -> dict[str, dict[str, object]]:
    """Start a server and a namespace, run both attacks, report ``{NAME: {held, detail}}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, object]] = {}
    with veth_namespace("efl") as net, started_server(workdir, net.host_ip) as server:
        attacks: dict[str, Callable[[], dict[str, object]]] = {
            "control_api_from_outside": lambda: probe_control_api_from_outside(
                server, net, workdir
            ),
            "rogue_node_reply": lambda: probe_rogue_node_reply(server, workdir),
        }
        for name, attack in attacks.items():
            try:
                out[name] = attack()
            except Exception as exc:  # a crashed attack is never a defence
                out[name] = _result(False, f"probe failed: {type(exc).__name__}: {exc}")
    return out
