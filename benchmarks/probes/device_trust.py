"""Probe of the device's trust in ClientApp code: ``untrusted_app_on_device``.

Whoever can start a run on the SuperLink (its Control API, or a compromised server)
chooses the app bundle every device's SuperNode receives. The attacker here submits, to a
real TLS SuperLink, bundles aimed at a real device: a SuperNode run by the agent's
:class:`~edgefl.edge_agent.fl.supernode.SuperNodeSupervisor` (so with edgefl's
``flwr-clientapp`` launcher), whose config trusts the fleet's app-signing key:

- ``attacker``: its ClientApp is the attacker's own module, which writes a marker file
  as soon as it is imported; the bundle is signed, but with the attacker's own Ed25519
  key (it holds no fleet key);
- ``shadow``: it names edgefl's ClientApp, the one devices trust, and ships its own
  ``edgefl/edge_agent/fl/clientapp.py`` (writing a marker) to shadow the installed one;
- ``signed`` (the control): a bring-your-own ClientApp in a bundle signed by the fleet's
  app-signing key, which must run.

Each bundle's ServerApp is a small Flower ServerApp of the probe's own that sends one
``train`` message to every node and writes the replies (error reason or content keys) to
a file. Held when neither marker exists, the attacker's reply is an error whose reason is
the device's refusal, the shadow's reply came from the installed ClientApp, and the signed
app ran.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefl.config import TlsFiles
from edgefl.edge_agent.fl.supernode import SuperNodeSupervisor, TrainingConfig
from edgefl.edge_agent.identity import prepare_enrollment
from edgefl.server.fl.app_signing import (
    create_app_signing_key,
    load_app_signing_key,
    sign_app_dir,
)
from edgefl.server.fl.superlink import SuperLink, SuperLinkConfig
from edgefl.server.fleet_ca import FleetCA

__all__ = ["NAME", "TrustOutcome", "probe_untrusted_app_on_device", "run_probes"]

NAME: Final = "untrusted_app_on_device"
REFUSAL: Final = "edgefl refused the app bundle"
"""How the device's refusal reason begins (edgefl.edge_agent.fl.apptrust)."""

_SERVER_APP = """
import json
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    out = str(context.run_config["out"])
    deadline = time.time() + 120
    nodes = []
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [
        Message(RecordDict({"config": ConfigRecord({"probe": 1})}), dst_node_id=n,
                message_type="train")
        for n in nodes
    ]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=150):
        if reply.has_error():
            replies.append({"error": str(reply.error.reason), "keys": []})
        else:
            replies.append({"error": None, "keys": sorted(reply.content.keys())})
    with open(out + ".tmp", "w") as fh:
        json.dump({"nodes": len(nodes), "replies": replies}, fh)
    import os
    os.replace(out + ".tmp", out)
"""

_MARKING_APP = """
from pathlib import Path

Path({marker!r}).write_text("imported")  # runs the moment the module is imported

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context) -> Message:
    Path({marker!r}).write_text("ran")
    return Message(RecordDict({{"result": ConfigRecord({{"ran": 1}})}}), reply_to=msg)
"""


@dataclass
class TrustOutcome:
    """What each submitted bundle did on the device."""

    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    markers: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    device_status: dict[str, Any] = field(default_factory=dict)
    """The device's SuperNode supervisor status at the end (``refused_apps`` ...)."""

    @property
    def held(self) -> bool:
        """Whether the device ran only the code it trusts (and the trusted app ran)."""
        return not self.problems


def _write_app(
    directory: Path, out: Path, clientapp: str, files: dict[str, str], fab_name: str
) -> Path:
    import tomli_w

    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": fab_name,
            "version": "1.0.0",
            "description": "security probe app",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "probe",
                    "components": {"serverapp": "probe_server:app", "clientapp": clientapp},
                    "config": {"out": str(out)},
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    (directory / "probe_server.py").write_text(textwrap.dedent(_SERVER_APP), encoding="utf-8")
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return directory


def probe_untrusted_app_on_device(
    workdir: Path, *, warm_start: bool = True, timeout_s: float = 240.0
) -> TrustOutcome:
    """Submit the three bundles to a device and report what ran (see the module doc)."""
    workdir = Path(workdir).absolute()
    ca = FleetCA.create(workdir / "ca")
    server_cert = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    assert server_cert.key_path is not None
    fleet_key_line = create_app_signing_key(workdir / "server")
    fleet_key = load_app_signing_key(workdir / "server")
    assert fleet_key is not None
    state = workdir / "device"
    paths = prepare_enrollment("dev-trust", "lab", state).paths
    paths.ca.write_bytes(ca.cert_pem)
    markers = {
        "attacker": workdir / "attacker-marker",
        "shadow": workdir / "shadow-marker",
        "signed": workdir / "signed-ran",
    }
    outs = {name: workdir / f"{name}-replies.json" for name in markers}
    apps = workdir / "apps"
    attacker_app = _write_app(
        apps / "attacker",
        outs["attacker"],
        "attacker_app:app",
        {"attacker_app.py": _MARKING_APP.format(marker=str(markers["attacker"]))},
        "attacker-app",
    )
    # Signed, but by a key of the attacker's own: the device trusts only the fleet's.
    sign_app_dir(attacker_app, ed25519.Ed25519PrivateKey.generate())
    shadow_module = _MARKING_APP.format(marker=str(markers["shadow"]))
    _write_app(
        apps / "shadow",
        outs["shadow"],
        "edgefl.edge_agent.fl.clientapp:app",
        {
            "edgefl/__init__.py": "",
            "edgefl/edge_agent/__init__.py": "",
            "edgefl/edge_agent/fl/__init__.py": "",
            "edgefl/edge_agent/fl/clientapp.py": shadow_module,
        },
        "shadow-app",
    )
    signed_app = _write_app(
        apps / "signed",
        outs["signed"],
        "byo_app:app",
        {"byo_app.py": _MARKING_APP.format(marker=str(markers["signed"]))},
        "byo-app",
    )
    sign_app_dir(signed_app, fleet_key)
    outcome = TrustOutcome()
    link = SuperLink(
        SuperLinkConfig(
            port=0,
            tls=TlsFiles(
                ca_file=ca.cert_path,
                cert_file=server_cert.cert_path,
                key_file=server_cert.key_path,
            ),
            node_auth=True,
        ),
        workdir / "superlink",
    )
    link.start()
    sup: SuperNodeSupervisor | None = None
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        admin = link.admin()
        admin.register_node(paths.node_public_key, name="dev-trust")
        config = TrainingConfig.model_validate(
            {
                "superlink": link.address,
                "min_samples": 1,
                "warm_start": warm_start,
                "app_signing_keys": [fleet_key_line],
            }
        )
        sup = SuperNodeSupervisor(
            config, device_id="dev-trust", state_dir=state, data_store=state / "samples.db"
        )
        supervisor = sup

        def supervise() -> None:
            while not stop.wait(0.5):
                supervisor.poll(connected=True, samples=1)

        thread = threading.Thread(target=supervise, name="probe-supervisor", daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while sup.node_id is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if sup.node_id is None:
            outcome.problems.append(f"the device's SuperNode never connected: {sup.last_error}")
            return outcome
        for name in markers:
            admin.submit_run(apps / name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(p.exists() for p in outs.values()):
            time.sleep(0.5)
        time.sleep(1.0)  # one more supervisor poll reads the last lines of its log
        outcome.device_status = sup.status()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        if sup is not None:
            sup.close()
        link.stop()
    for name, out in outs.items():
        if not out.exists():
            outcome.problems.append(f"{name}: no reply within {timeout_s:.0f} s")
            continue
        outcome.replies[name] = list(json.loads(out.read_text())["replies"])
    outcome.markers = {name: path.exists() for name, path in markers.items()}
    _judge(outcome)
    return outcome


def _judge(outcome: TrustOutcome) -> None:
    problems = outcome.problems
    for name in ("attacker", "shadow"):
        if outcome.markers.get(name):
            problems.append(f"{name}: the bundle's own code ran on the device (marker written)")
    attack = outcome.replies.get("attacker")
    if attack is not None and (len(attack) != 1 or REFUSAL not in str(attack[0]["error"])):
        problems.append(f"attacker: the reply is not the device's refusal: {attack}")
    shadow = outcome.replies.get("shadow")
    if shadow is not None and (len(shadow) != 1 or REFUSAL in str(shadow[0]["error"] or "")):
        problems.append(f"shadow: edgefl's installed ClientApp did not take the message: {shadow}")
    signed = outcome.replies.get("signed")
    if signed is not None:
        if len(signed) != 1 or signed[0]["error"] is not None:
            problems.append(f"signed: the fleet-signed app did not run: {signed}")
        elif not outcome.markers.get("signed"):
            problems.append("signed: replied but its marker is missing")


def run_probes(workdir: Path) -> dict[str, dict[str, object]]:
    """The device-trust attack, as the security probe reports it."""
    try:
        outcome = probe_untrusted_app_on_device(workdir / "device-trust")
    except Exception as exc:  # a probe that breaks reports the attack as not held
        return {NAME: {"held": False, "detail": f"probe failed: {exc!r}"}}
    if outcome.held:
        reason = str(outcome.replies["attacker"][0]["error"])
        detail = (
            "attacker's bundle refused before its code ran (no marker); the server got: "
            f"{reason[reason.find(REFUSAL) :][:260]}; a bundle shadowing edgefl's package "
            "got the installed ClientApp; a fleet-signed bring-your-own app ran"
        )
    else:
        detail = "; ".join(outcome.problems)
    return {NAME: {"held": outcome.held, "detail": detail}}
