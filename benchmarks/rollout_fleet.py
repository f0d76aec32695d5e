"""A fleet to roll models out to: the shipped broker, the ingest, the Models service, agents.

Shared by ``tests/test_staged_rollout.py`` and ``benchmarks/rollout_bench.py`` (which run
the same rollouts, the benchmark with more agents). Everything is real and on loopback:

- :class:`probes.ingest.IngestRig`: a fleet CA, mosquitto on the shipped configuration
  (mutual TLS, the ACL naming every admitted device), the ingest in a child process and
  a SQLite registry whose ``enrollments`` admit the devices;
- the server's release-signing key in the CA folder (``release_keys``), and releases of
  the toolkit's real ``digits-mlp`` variants written in the server's layout and recorded
  in the registry as published, as ``edgefl server release`` records them; among them a
  *broken* one (a model that disagrees with its own golden vectors: every device refuses
  it) and
  a *worse* one (the last layer's rows for digits 0-4 rotated, its golden vectors made
  from the rotated model: devices install it and it answers about half as well);
- the real ``Models`` gRPC service on port 0;
- ``edgefl agent run`` processes enrolled under their own certificates, each with the
  inference loop answering a held-out evaluation replay (the digits test split) and
  reporting its accuracy per model version as ``telemetry/inference``;
- a server config file naming the CA, registry, broker and releases, for the
  ``edgefl server rollout`` command.

Needs no test framework: nothing here imports ``tests/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import sqlalchemy as sa
from probes.ingest import FleetDevice, IngestRig
from sqlalchemy.orm import Session

from edgefl.config import TlsFiles
from edgefl.manifest import Manifest
from edgefl.process import ManagedProcess
from edgefl.proto.desired import DesiredModel, DesiredState
from edgefl.release_tamper import DEVICE_CLASS, MODEL, RUNTIME, Built, ReleaseFleet
from edgefl.releasesign import public_key_pem
from edgefl.runtimes.golden import golden_arrays
from edgefl.server.config import ModelServiceConfig
from edgefl.server.device_states import ReportedModelState, read_model_states
from edgefl.server.models_service import ModelService
from edgefl.server.registry import Device, make_engine
from edgefl.server.registry.models import Release, ReleaseVariant
from edgefl.server.release_keys import create_release_key, current_signing_key
from edgefl.server.rollout import publish_desired
from edgefl.testing import edgefl_executable

__all__ = ["RolloutFleet", "rollout_fleet", "rotated_classes"]

ROTATED: Final = (1, 2, 3, 4, 0, 5, 6, 7, 8, 9)
"""The worse model's output rows: digits 0-4 answered wrong, 5-9 right."""
SHIFTED: Final = (1, 2, 3, 4, 5, 6, 7, 8, 9, 0)
"""The broken model's output rows: every digit answered wrong."""


class _Releases(ReleaseFleet):
    """The server side of releases (keys, layout); no device manager here."""


def rotated_classes(artifact: bytes, order: Sequence[int] = ROTATED) -> bytes:
    """``artifact`` with the last dense layer's rows reordered (``order``): a worse model.

    The weights and bias of the 10-way layer are found by their values (each occurs once
    in the flatbuffer) and written back permuted: a real model that runs fine and answers
    the digits whose rows moved wrong.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=artifact)
    interpreter.allocate_tensors()
    found: dict[tuple[int, ...], np.ndarray] = {}
    for detail in interpreter.get_tensor_details():
        shape = tuple(int(s) for s in detail["shape"])
        if shape in ((10,), (10, 16)) and detail["dtype"] == np.float32:
            with contextlib.suppress(ValueError):
                found[shape] = interpreter.get_tensor(detail["index"]).copy()
    out = artifact
    for shape in ((10,), (10, 16)):
        tensor = found[shape]
        assert artifact.count(tensor.tobytes()) == 1, f"the {shape} tensor is not unique"
        out = out.replace(tensor.tobytes(), tensor[list(order)].tobytes())
    return out


class RolloutFleet:
    """The fleet (see the module docstring); :meth:`start` it, :meth:`close` it.

    Args:
        workdir: Folder for everything (CA, broker, registry, releases, agents, logs).
        built: The toolkit's ``fp32`` and ``fp16`` digits-mlp variants.
        agents: How many devices (``dev-00``, ``dev-01``, ...).
        rate_hz: Evaluation samples per second each agent answers.
        health_window_s: The agents' health window after a swap.
        report_interval_s: Period of their inference reports.
    """

    def __init__(
        self,
        workdir: Path,
        built: Built,
        *,
        agents: int = 4,
        rate_hz: float = 25.0,
        health_window_s: float = 1.0,
        report_interval_s: float = 0.5,
    ) -> None:
        self.workdir = workdir
        self.built = built
        self.rig = IngestRig(workdir / "rig")
        self.names = [f"dev-{i:02d}" for i in range(agents)]
        self.devices: dict[str, FleetDevice] = {}
        self.rate_hz = rate_hz
        self.health_window_s = health_window_s
        self.report_interval_s = report_interval_s
        self.releases_dir = workdir / "releases"
        self.releases: _Releases | None = None
        self.service: ModelService | None = None
        self.agents: dict[str, ManagedProcess] = {}
        self.server_config = workdir / "server.json"
        self.engine = make_engine(self.rig.db_url)

    # -- set up -------------------------------------------------------------------------

    @property
    def fleet(self) -> str:
        """The fleet every device enrolled in."""
        return self.rig.fleet

    @property
    def ca_dir(self) -> Path:
        """The fleet CA folder (with the release-signing key)."""
        return self.rig.ca.directory

    @property
    def db_url(self) -> str:
        """The registry."""
        return self.rig.db_url

    @property
    def broker_port(self) -> int:
        """The broker's port (mutual TLS)."""
        return self.rig.broker.port

    def start(self) -> None:
        """Broker, ingest, enrollments, release key, the Models service, server config."""
        self.rig.start()
        for name in self.names:
            self.devices[name] = self.rig.enroll(name, reload=False)
        # A read-only operator certificate to watch the retained desired states with.
        self.operator = self.rig.ca.issue_operator_cert("rollout-watch")
        self.rig.reload_broker_acl()
        create_release_key(self.ca_dir)
        _, key = current_signing_key(self.ca_dir)
        self.releases = _Releases(self.workdir, self.built, key=key)
        server = self.rig.ca.issue_server_cert(["localhost"], ["127.0.0.1"])
        assert server.key_path is not None
        self.service = ModelService(
            ModelServiceConfig(
                host="127.0.0.1",
                port=0,
                tls=TlsFiles(
                    ca_file=self.rig.ca.cert_path,
                    cert_file=server.cert_path,
                    key_file=server.key_path,
                ),
                crl=self.rig.ca.crl_path,
                registry_url=self.db_url,
                registry_ttl_s=0.0,
                releases_dir=self.releases_dir,
            )
        )
        self.service.start()
        self.server_config.write_text(
            json.dumps(
                {
                    "state_dir": str(self.workdir / "server"),
                    "ca_dir": str(self.ca_dir),
                    "db_url": self.db_url,
                    "broker": {"host": "127.0.0.1", "port": self.broker_port},
                    "models": {"releases_dir": str(self.releases_dir)},
                }
            )
        )

    def close(self) -> None:
        """Stop the agents, the service, the ingest and the broker."""
        for proc in self.agents.values():
            with contextlib.suppress(Exception):
                proc.stop(grace=20.0)
        self.agents.clear()
        if self.service is not None:
            self.service.stop()
            self.service = None
        self.engine.dispose()
        self.rig.close()

    # -- releases -------------------------------------------------------------------------

    def publish(
        self,
        version: int,
        variant: str = "fp32",
        *,
        manifest: Manifest | None = None,
        artifact: bytes | None = None,
    ) -> DesiredModel:
        """Write a signed release in the server's layout and record it as published."""
        assert self.releases is not None
        model = self.releases.publish(
            version, variant, manifest=manifest, artifact=artifact, created_at=int(time.time())
        )
        self._record(version, variant, model.artifact_sha256, model.size_bytes)
        return model

    def publish_broken(self, version: int) -> DesiredModel:
        """A release whose model disagrees with its own golden vectors: devices refuse it.

        The fp32 model with every output row moved by one, under the manifest (and golden
        reference outputs) of the model as trained: what a corrupted export looks like.
        """
        assert self.releases is not None
        path, _ = self.built.variants["fp32"]
        artifact = rotated_classes(path.read_bytes(), SHIFTED)
        manifest = self.releases.release_manifest(
            version,
            "fp32",
            created_at=int(time.time()),
            sha256=hashlib.sha256(artifact).hexdigest(),
            size_bytes=len(artifact),
        )
        return self.publish(version, "fp32", manifest=manifest, artifact=artifact)

    def publish_worse(self, version: int, order: Sequence[int] = ROTATED) -> DesiredModel:
        """A release of the fp32 model with its output rows reordered (``order``; by
        default digits 0-4 answered wrong), its golden vectors made from that model, so it
        installs. Each order gives other bytes: a release never shares an artifact with
        another version (a device reuses the bytes it holds by sha256)."""
        from edgefl.edge_agent.runtimes import create_runtime

        assert self.releases is not None
        path, base = self.built.variants["fp32"]
        artifact = rotated_classes(path.read_bytes(), order)
        scratch = self.workdir / f"worse-{version}.tflite"
        scratch.write_bytes(artifact)
        x, _, _ = golden_arrays(base.golden)
        outputs = create_runtime(RUNTIME, scratch).run(x)
        golden = base.golden.model_copy(update={"reference_outputs": outputs.tolist()})
        manifest = self.releases.release_manifest(
            version,
            "fp32",
            created_at=int(time.time()),
            sha256=hashlib.sha256(artifact).hexdigest(),
            size_bytes=len(artifact),
            golden=golden,
        )
        return self.publish(version, "fp32", manifest=manifest, artifact=artifact)

    def _record(self, version: int, variant: str, sha256: str, size: int) -> None:
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            release_id = conn.execute(
                sa.insert(Release)
                .values(
                    model=MODEL,
                    version=version,
                    run_id="rollout-fleet",
                    round=1,
                    plan_hash="0" * 16,
                    epsilon_max=None,
                    delta=None,
                    dp_mode="none",
                    calibration="held-out",
                    float_accuracy=None,
                    device_class=DEVICE_CLASS,
                    key_id=None,
                    created_by="rollout-fleet",
                    created_at=now,
                    expires_at=now,
                    status="published",
                    reasons_json="[]",
                )
                .returning(Release.id)
            ).scalar_one()
            conn.execute(
                sa.insert(ReleaseVariant).values(
                    release_id=release_id,
                    variant=variant,
                    recipe=variant,
                    prune_ratio=None,
                    sha256=sha256,
                    size_bytes=size,
                    accuracy=None,
                    float_accuracy=None,
                    latency_json="{}",
                    device_class=DEVICE_CLASS,
                    runtime=RUNTIME,
                    path=f"{MODEL}/{version}/{variant}.tflite",
                    passed=True,
                    reasons_json="[]",
                )
            )

    def deploy(self, version: int, variant: str) -> None:
        """``server deploy`` to the whole fleet (what the devices run before a rollout)."""
        publish_desired(
            ca_dir=self.ca_dir,
            db_url=self.db_url,
            releases_dir=self.releases_dir,
            broker_host="127.0.0.1",
            broker_port=self.broker_port,
            model=MODEL,
            version=version,
            variant=variant,
        )

    # -- agents ---------------------------------------------------------------------------

    def agent_config(self, name: str) -> Path:
        """The agent's config: its enrolled identity, models on, the loop on evaluation."""
        device = self.devices[name]
        cert = device.cert
        assert cert.key_path is not None
        tls = {
            "ca_file": str(self.rig.ca.cert_path),
            "cert_file": str(cert.cert_path),
            "key_file": str(cert.key_path),
        }
        assert self.service is not None
        assert self.releases is not None
        path = self.workdir / f"{name}.json"
        path.write_text(
            json.dumps(
                {
                    "device_id": name,
                    "fleet": self.fleet,
                    "state_dir": str(self.workdir / name),
                    "status_interval_s": 0.5,
                    "mqtt": {
                        "host": "127.0.0.1",
                        "port": self.broker_port,
                        "reconnect_min_s": 0.2,
                        "reconnect_max_s": 1.0,
                        "tls": tls,
                    },
                    "sources": [
                        {
                            "type": "dataset-replay",
                            "name": "eval",
                            "split": "test",
                            "evaluation": True,
                            "rate_hz": self.rate_hz,
                        }
                    ],
                    "models": {
                        "enabled": True,
                        "server": {"host": "127.0.0.1", "port": self.service.port},
                        "tls": tls,
                        "device_class": DEVICE_CLASS,
                        "runtime": RUNTIME,
                        "release_signing_keys": [public_key_pem(self.releases.key.public_key())],
                        "health_window_s": self.health_window_s,
                        "health_check_interval_s": 0.5,
                    },
                    "inference": {
                        "enabled": True,
                        "report_interval_s": self.report_interval_s,
                    },
                }
            )
        )
        return path

    def start_agent(self, name: str) -> ManagedProcess:
        """``edgefl agent run`` for one device (its log in the work folder)."""
        proc = ManagedProcess(
            [edgefl_executable(), "agent", "run", "--config", str(self.agent_config(name))],
            self.workdir / f"{name}.log",
            name=name,
        )
        proc.start()
        self.agents[name] = proc
        return proc

    def stop_agent(self, name: str) -> None:
        """SIGTERM one agent (it publishes ``offline`` as it leaves) and wait for it."""
        proc = self.agents.pop(name)
        proc.stop(grace=20.0)

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every agent's log (for a failure message)."""
        parts = []
        for name in self.names:
            log = self.workdir / f"{name}.log"
            if log.exists():
                text = log.read_text(encoding="utf-8", errors="replace")[-chars:]
                parts.append(f"--- {name}:\n{text}")
        return "\n".join(parts)

    # -- what the registry says ----------------------------------------------------------

    def states(self, names: Sequence[str] | None = None) -> dict[str, ReportedModelState]:
        """Each device's reported model state (``device_states``)."""
        with Session(self.engine) as session:
            return read_model_states(session, names or self.names)

    def online(self) -> dict[str, bool]:
        """Each device's presence (``devices.online``)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(Device.device_id, Device.online))
            return {str(d): bool(o) for d, o in rows}

    def retained_desired(self, wait_s: float = 1.0) -> dict[str, DesiredState]:
        """The retained ``state/desired`` of every device that has one, as the broker
        holds it (read with the operator certificate, which may only read)."""
        import queue

        from edgefl.mqtt_client import build_client
        from edgefl.proto.desired import parse_desired
        from edgefl.proto.topics import state_desired_topic

        assert self.operator.key_path is not None
        got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        client = build_client(
            "rollout-watch",
            tls=TlsFiles(
                ca_file=self.rig.ca.cert_path,
                cert_file=self.operator.cert_path,
                key_file=self.operator.key_path,
            ),
        )

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(state_desired_topic(self.fleet, "+"), qos=1)

        client.on_connect = on_connect
        client.on_message = lambda _c, _u, msg: got.put((msg.topic, bytes(msg.payload)))
        client.connect("127.0.0.1", self.broker_port, keepalive=30)
        client.loop_start()
        states: dict[str, DesiredState] = {}
        deadline = time.monotonic() + wait_s
        try:
            while time.monotonic() < deadline:
                try:
                    topic, payload = got.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if payload:
                    states[topic.split("/")[2]] = parse_desired(payload)
        finally:
            client.disconnect()
            client.loop_stop()
        return states

    def running(self, names: Sequence[str], version: int) -> bool:
        """Whether every device of ``names`` reports ``version`` running."""
        states = self.states(names)
        return all(
            (s := states.get(n)) is not None and s.state == "running" and s.version == version
            for n in names
        )

    def wait(self, condition: Any, timeout: float, what: str) -> None:
        """Poll ``condition()`` until true; raise with the agents' logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            for name, proc in self.agents.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"agent {name} exited:\n{self.log_tails()}")
            time.sleep(0.1)


@contextlib.contextmanager
def rollout_fleet(workdir: Path, built: Built, **kwargs: Any) -> Iterator[RolloutFleet]:
    """A started :class:`RolloutFleet`, closed after."""
    fleet = RolloutFleet(workdir, built, **kwargs)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()
