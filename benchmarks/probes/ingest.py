"""Probes of the MQTT ingest: poison messages, retained records, fleet spoofing, outbox resets.

Attacks (names as ``benchmarks/security_probe.py`` reports them), each from the position
of an enrolled device that holds only its own certificate and key:

- ``poison_seq_digits``: a JSON envelope whose ``seq`` has 5,000 digits (Python's
  int-digit limit raised a plain ``ValueError`` that escaped the decoder), then honest
  records. Held when the poison is dead-lettered (``malformed_envelope``), every honest
  record is stored, and after an ingest restart the poison does not come back (it was
  acknowledged).
- ``poison_surrogate``: the same with a lone surrogate in a string (``"kind":"d\\ud800"``),
  which used to pass the decoder and fail at the SQLite insert.
- ``retained_poison``: a retained poison and a retained well-formed envelope on the
  device's data topic. Held when both are dead-lettered as ``retained``, neither is
  stored, and after an ingest restart (a re-subscription) nothing of them is stored and
  the honest records are.
- ``fleet_spoof``: the device publishes a record and a status under another fleet's
  topic prefix (an ACL of patterns, ``edgefl/+/%u/...``, let it). Held only when both
  layers refuse it: the broker (its ACL names each admitted device with its enrolled
  fleet) answers PUBACK 0x87 and nothing reaches the ingest; and the ingest, tried alone
  in the window before the broker reloads a changed enrollment (the device is moved to
  another fleet in the registry and publishes under its old one, which the stale ACL
  still allows), dead-letters both (``fleet_mismatch``), stores nothing and leaves the
  device's fleet as it was.
- ``outbox_reset``: a real agent (``edgefl agent run``) sends records, is stopped, its
  ``outbox.db*`` deleted, and started again: its seqs begin again at 1. Held when every
  record of both lives is stored (two outbox incarnations), none twice, and nothing is
  dead-lettered.

``honest_devices`` comes from a flood: while three honest devices each send
:data:`HONEST_RECORDS` records at :data:`HONEST_RATE_HZ`, the attacker publishes
:data:`FLOOD_MESSAGES` bad messages of seven kinds (5,000-digit seqs, lone surrogates,
garbage, another device's id, conflicting duplicates of a stored key, retained records,
bad status payloads) as fast as the broker takes them. ``sent`` counts honest records
PUBACKed by the broker, ``stored`` the rows stored for them, ``duplicate_rows`` rows
beyond one per honest key, and ``p99_lag_s`` is the 99th percentile of each honest
record's ``received_at`` (set by the ingest at its write, just before the commit) minus
the ``ts_ms`` the device stamped right before publishing it. The flood holds only when
every bad message is dead-lettered with its reason, counted exactly, and a restarted
ingest is redelivered nothing (every message was acknowledged).

Everything runs on loopback: mosquitto on the shipped configuration (mutual TLS, ACL;
:class:`edgefl.server.serve.MosquittoBroker`) under a fleet CA made for the probe, the
real ingest in a child process (the server process shares no GIL with the devices), on
SQLite. Devices are enrolled by writing their ``enrollments`` row (the registry's record
of an admitted device and its fleet). ``tests/security/test_ingest_poison.py`` and
``tests/security/test_outbox_reset.py`` run these same functions.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
import sqlalchemy as sa
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefl.config import TlsFiles
from edgefl.process import ManagedProcess, ProcessNotReadyError
from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope, new_incarnation
from edgefl.proto.topics import ROOT, device_prefix
from edgefl.server.fleet_ca import SERVER_IDENTITY, FleetCA, IssuedCert
from edgefl.server.ingest import BrokerAddress, IngestConfig
from edgefl.server.registry import DeadLetter, Device, Enrollment, Record, make_engine, upgrade
from edgefl.server.serve import BrokerConfig, MosquittoBroker
from edgefl.testing import start_edgefl

__all__ = [
    "FLOOD_MESSAGES",
    "HONEST_RATE_HZ",
    "HONEST_RECORDS",
    "IngestRig",
    "ProbeResult",
    "ingest_rig",
    "probe_fleet_spoof",
    "probe_flood",
    "probe_outbox_reset",
    "probe_poison_seq_digits",
    "probe_poison_surrogate",
    "probe_retained_poison",
    "run_probes",
]

TIMEOUT: Final = 30.0
NOT_AUTHORIZED: Final = 0x87
"""MQTT 5 reason code of a PUBLISH the broker's ACL refuses."""
FLOOD_MESSAGES: Final = 1400
"""Bad messages the attacker sends during the flood (the issue asks for at least 1,000)."""
HONEST_DEVICES: Final = 3
HONEST_RECORDS: Final = 300
"""Records each honest device sends during the flood."""
HONEST_RATE_HZ: Final = 100.0
"""Records per second of each honest device during the flood."""
P99_LAG_LIMIT_S: Final = 2.0
_INGEST_MAIN: Final = """
import sys
from edgefl.logs import configure_logging
from edgefl.server.ingest import Ingest, IngestConfig
configure_logging("INFO")
Ingest(IngestConfig.model_validate_json(sys.argv[1])).run()
"""
_READY_LINE: Final = "ingest subscribed"


@dataclass
class ProbeResult:
    """One attack's outcome: ``held``/``detail`` for the report, ``counts`` for tests."""

    held: bool
    detail: str
    counts: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, object]:
        """The ``{"held", "detail"}`` entry of the security probe's JSON."""
        return {"held": self.held, "detail": self.detail}


@dataclass(frozen=True)
class FleetDevice:
    """An enrolled device: its id, enrolled fleet and certificate."""

    name: str
    fleet: str
    cert: IssuedCert

    def topic(self, rest: str, fleet: str | None = None) -> str:
        """``edgefl/{fleet}/{name}/{rest}`` (its enrolled fleet unless given)."""
        return f"{device_prefix(fleet or self.fleet, self.name)}/{rest}"


class MqttDevice:
    """A device's paho MQTT 5 client over mutual TLS; callbacks only feed queues."""

    def __init__(self, port: int, ca: FleetCA, device: FleetDevice) -> None:
        assert device.cert.key_path is not None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device.name, protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(ca.cert_path),
            certfile=str(device.cert.cert_path),
            keyfile=str(device.cert.key_path),
        )
        self.client.max_inflight_messages_set(50)  # below the broker's Receive Maximum
        self._connects: queue.Queue[ReasonCode] = queue.Queue()
        self._acks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: self._connects.put(rc)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        rc = self._connects.get(timeout=TIMEOUT)
        if rc.is_failure:
            self.close()
            raise RuntimeError(f"{device.name}: connection refused: {rc}")

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        # Runs under paho's lock; a Condition of our own is never taken by paho.
        with self._acked:
            self._acks[mid] = rc
            self._acked.notify_all()

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish with QoS 1 without waiting; returns the message id."""
        return self.client.publish(topic, payload, qos=1, retain=retain).mid

    def wait(self, mids: list[int], timeout: float = TIMEOUT) -> dict[int, ReasonCode]:
        """The PUBACK reason code of each message id, waiting for all of them."""
        deadline = time.monotonic() + timeout
        with self._acked:
            while not all(mid in self._acks for mid in mids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sum(mid not in self._acks for mid in mids)
                    raise TimeoutError(f"{missing} of {len(mids)} PUBACKs missing")
                self._acked.wait(left)
            return {mid: self._acks.pop(mid) for mid in mids}

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish with QoS 1 and return the PUBACK's reason code."""
        mid = self.send(topic, payload, retain=retain)
        return self.wait([mid])[mid]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def envelope(
    device: str,
    seq: int,
    *,
    incarnation: str = "",
    body: bytes = b'{"v":1}',
    kind: str = "data",
    ts_ms: int | None = None,
) -> bytes:
    """A JSON envelope: version 2 with an incarnation, version 1 without."""
    env = Envelope(
        version=ENVELOPE_VERSION if incarnation else 1,
        device_id=device,
        incarnation=incarnation,
        seq=seq,
        ts_ms=ts_ms if ts_ms is not None else int(time.time() * 1000),
        kind=kind,
        content_type="application/json",
        body=body,
    )
    return encode_envelope(env, "json")


def raw_json_envelope(device: str, *, seq: str = "1", kind: str = '"data"') -> bytes:
    """A JSON envelope with fields as raw JSON text: what json.dumps cannot write."""
    return (
        f'{{"v":1,"device_id":"{device}","seq":{seq},"ts_ms":1700000000000,"kind":{kind},'
        '"content_type":"application/json","body":{"x":1}}'
    ).encode()


SEQ_DIGITS_POISON: Final = "9" * 5000
SURROGATE_KIND: Final = '"d\\ud800"'


class IngestRig:
    """A fleet CA, the shipped broker, the ingest in a child process and its registry.

    Args:
        workdir: Folder for the CA, broker, database and logs.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca = FleetCA.create(workdir / "ca")
        server = self.ca.issue_server_cert(["localhost"], ["127.0.0.1"])
        assert server.key_path is not None
        self.service = self.ca.issue_service_cert(SERVER_IDENTITY)
        self.db_url = f"sqlite:///{workdir / 'registry.db'}"
        upgrade(self.db_url)
        self.engine = make_engine(self.db_url)
        # The broker's ACL names every admitted device with its fleet, read from the
        # registry as the running server does (Server.admitted_devices).
        self.broker = MosquittoBroker(
            workdir / "broker",
            self.ca,
            server.cert_path,
            server.key_path,
            BrokerConfig(port=0),
            devices=self.admitted,
        )
        self.fleet = f"f{uuid.uuid4().hex[:8]}"
        self.log = workdir / "ingest.log"
        self._ingest: ManagedProcess | None = None
        self._clients: list[MqttDevice] = []

    # -- processes ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and the ingest."""
        self.broker.start()
        self.start_ingest()

    def ingest_config(self) -> IngestConfig:
        """The ingest as ``edgefl server start`` configures it: every fleet, mutual TLS."""
        return IngestConfig(
            broker=BrokerAddress(host="127.0.0.1", port=self.broker.port),
            client_id=SERVER_IDENTITY,
            db_url=self.db_url,
            migrate=False,
            tls=TlsFiles(
                ca_file=self.ca.cert_path,
                cert_file=self.service.cert_path,
                key_file=self.service.key_path,
            ),
        )

    def start_ingest(self) -> None:
        """Start the ingest child and wait until its subscriptions are confirmed."""
        self._ingest = ManagedProcess(
            [sys.executable, "-c", _INGEST_MAIN, self.ingest_config().model_dump_json()],
            self.log,
            name="ingest",
        )
        self._ingest.start()
        try:
            self._ingest.wait_for_log(re.escape(_READY_LINE), TIMEOUT)
        except ProcessNotReadyError as exc:
            if exc.exit_code is None:  # killed by the wait
                raise TimeoutError(
                    f"timed out after {TIMEOUT:.0f} s waiting for the ingest's subscriptions"
                ) from None
            raise RuntimeError(f"the ingest exited: {self.log_tail()}") from None

    def stop_ingest(self) -> None:
        """SIGTERM the ingest child (it acknowledges what it stored), SIGKILL after 20 s."""
        proc, self._ingest = self._ingest, None
        if proc is not None:
            proc.stop(grace=20)

    def restart_ingest(self) -> None:
        """Stop and start the ingest (same client id: its persistent session resumes)."""
        self.stop_ingest()
        self.start_ingest()

    def ingest_alive(self) -> bool:
        """Whether the ingest child runs."""
        return self._ingest is not None and self._ingest.running()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the ingest's log."""
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def close(self) -> None:
        """Stop clients, the ingest and the broker."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self.stop_ingest()
        self.broker.stop()
        self.engine.dispose()

    # -- devices -----------------------------------------------------------------------

    def admitted(self) -> dict[str, str]:
        """Device id -> fleet of every admitted device in the rig's registry."""
        from edgefl.server.enrollment import admitted_fleets

        return admitted_fleets(self.engine)

    def reload_broker_acl(self) -> None:
        """What the running server does within a second of an admission: render the ACL
        again and SIGHUP mosquitto; wait until mosquitto has read it."""
        before = self._acl_reloads()
        if self.broker.reload_acl():
            wait(lambda: self._acl_reloads() > before, TIMEOUT, "mosquitto's ACL reload")
            time.sleep(0.1)  # the log line comes just before mosquitto reads the files

    def _acl_reloads(self) -> int:
        text = self.broker.log_path.read_text(encoding="utf-8", errors="replace")
        return text.count("Reloading config")

    def enroll(self, name: str, fleet: str | None = None, *, reload: bool = True) -> FleetDevice:
        """Issue a device certificate, record the enrollment (device id -> fleet) and
        reload the broker's ACL, which pins the device to that fleet (unless ``reload`` is
        false: the moment between an admission and the server's reload)."""
        cert = self.ca.issue_device_cert(name)
        device = FleetDevice(name, fleet or self.fleet, cert)
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(Enrollment).values(
                    device_id=name,
                    fleet=device.fleet,
                    status="admitted",
                    cert_serial=format(cert.serial, "x"),
                    cert_pem=cert.cert_pem.decode(),
                    node_public_key="",
                    node_id=str(uuid.uuid4().int % 2**63),
                    admitted_at=datetime.now(UTC),
                    revoked_at=None,
                    revoke_reason="",
                )
            )
        if reload:
            self.reload_broker_acl()
        return device

    def connect(self, device: FleetDevice) -> MqttDevice:
        """A connected MQTT client holding only ``device``'s certificate and key."""
        client = MqttDevice(self.broker.port, self.ca, device)
        self._clients.append(client)
        return client

    def disconnect(self, client: MqttDevice) -> None:
        """Close one client."""
        client.close()
        self._clients.remove(client)

    # -- what the registry holds ---------------------------------------------------------

    def records(self, device: str) -> list[Any]:
        """``(incarnation, seq, topic, ts_ms, received_at)`` of the device's rows."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(
                        Record.incarnation,
                        Record.seq,
                        Record.topic,
                        Record.ts_ms,
                        Record.received_at,
                    ).where(Record.device_id == device)
                )
            )

    def dead_letters(self, device: str) -> Counter[str]:
        """Dead letters per reason among those on ``device``'s topics (any fleet)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(DeadLetter.reason, sa.func.count())
                .where(DeadLetter.topic.like(f"{ROOT}/%/{device}/%"))
                .group_by(DeadLetter.reason)
            )
            return Counter({str(reason): int(n) for reason, n in rows})

    def device_fleet(self, device: str) -> str | None:
        """``devices.fleet`` of a device, or ``None`` when it was never seen."""
        with self.engine.connect() as conn:
            return conn.scalar(sa.select(Device.fleet).where(Device.device_id == device))


@contextlib.contextmanager
def ingest_rig(workdir: Path) -> Iterator[IngestRig]:
    """An :class:`IngestRig`, started, and closed after."""
    rig = IngestRig(workdir)
    try:
        rig.start()
        yield rig
    finally:
        rig.close()


def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _settle(check: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Whether ``check`` comes to hold within ``timeout`` (then stays so for 0.5 s)."""
    with contextlib.suppress(TimeoutError):
        wait(check, timeout, "the expected outcome")
        time.sleep(0.5)  # anything still in flight would show up now
        return check()
    return False


def _honest_batch(device: FleetDevice, client: MqttDevice, count: int) -> int:
    """Send ``count`` honest records (version 2, a fresh incarnation); return how many
    the broker acknowledged."""
    incarnation = new_incarnation()
    mids = [
        client.send(device.topic("data/s"), envelope(device.name, seq, incarnation=incarnation))
        for seq in range(1, count + 1)
    ]
    return sum(not rc.is_failure for rc in client.wait(mids).values())


# -- the attacks ------------------------------------------------------------------------


def _poison_then_honest(
    rig: IngestRig, make_poison: Callable[[str], bytes], label: str
) -> ProbeResult:
    """One poison from an attacker among honest records, then an ingest restart.

    The attacker signs the poison with its own id, on its own topic: nothing a topic or
    device check could catch before the envelope is decoded.
    """
    attacker = rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}")
    honest = rig.enroll(f"honest-{uuid.uuid4().hex[:6]}")
    bad = rig.connect(attacker)
    good = rig.connect(honest)
    sent = _honest_batch(honest, good, 20)
    rc = bad.publish(attacker.topic("data/s"), make_poison(attacker.name))
    sent += _honest_batch(honest, good, 20)
    expected_letters = Counter() if rc.is_failure else Counter({"malformed_envelope": 1})
    settled = _settle(
        lambda: (
            len(rig.records(honest.name)) == sent
            and rig.dead_letters(attacker.name) == expected_letters
        )
    )
    # A poison left unacknowledged would come back when the ingest's session resumes.
    rig.restart_ingest()
    sent += _honest_batch(honest, good, 20)
    _settle(lambda: len(rig.records(honest.name)) == sent)
    stored = len(rig.records(honest.name))
    letters = rig.dead_letters(attacker.name)
    poison_rows = len(rig.records(attacker.name))
    rig.disconnect(bad)
    rig.disconnect(good)
    held = (
        settled
        and not rc.is_failure
        and stored == sent
        and letters == Counter({"malformed_envelope": 1})
        and poison_rows == 0
    )
    return ProbeResult(
        held,
        f"{label}: PUBACK {rc}; dead letters {dict(letters)} (expected malformed_envelope: 1, "
        f"also after an ingest restart); honest records stored {stored}/{sent}",
        {
            "sent": sent,
            "stored": stored,
            "dead_letters": dict(letters),
            "poison_rows": poison_rows,
        },
    )


def probe_poison_seq_digits(rig: IngestRig) -> ProbeResult:
    """See the module docstring."""
    return _poison_then_honest(
        rig, lambda me: raw_json_envelope(me, seq=SEQ_DIGITS_POISON), "a 5,000-digit seq"
    )


def probe_poison_surrogate(rig: IngestRig) -> ProbeResult:
    """See the module docstring."""
    return _poison_then_honest(
        rig, lambda me: raw_json_envelope(me, kind=SURROGATE_KIND), "a lone surrogate in kind"
    )


def probe_retained_poison(rig: IngestRig) -> ProbeResult:
    """See the module docstring."""
    attacker = rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}")
    honest = rig.enroll(f"honest-{uuid.uuid4().hex[:6]}")
    bad = rig.connect(attacker)
    codes = [
        bad.publish(
            attacker.topic("data/s"),
            raw_json_envelope(attacker.name, seq=SEQ_DIGITS_POISON),
            retain=True,
        ),
        bad.publish(attacker.topic("data/t"), envelope(attacker.name, 1), retain=True),
    ]
    rig.disconnect(bad)
    delivered = sum(not rc.is_failure for rc in codes)
    expected = Counter({"retained": delivered}) if delivered else Counter()
    live = _settle(lambda: rig.dead_letters(attacker.name) == expected)
    # A re-subscription (the ingest restarted) must not store them, nor stall on them.
    rig.restart_ingest()
    good = rig.connect(honest)
    sent = _honest_batch(honest, good, 30)
    _settle(lambda: len(rig.records(honest.name)) == sent)
    rig.disconnect(good)
    stored = len(rig.records(honest.name))
    letters = rig.dead_letters(attacker.name)
    poison_rows = len(rig.records(attacker.name))
    held = (
        live
        and poison_rows == 0
        and stored == sent
        and set(letters) <= {"retained"}
        and letters["retained"] >= delivered
    )
    return ProbeResult(
        held,
        f"2 retained messages on data topics (PUBACKs {[str(rc) for rc in codes]}): dead "
        f"letters {dict(letters)}, rows stored from them {poison_rows}; after an ingest "
        f"restart honest records stored {stored}/{sent}",
        {
            "delivered": delivered,
            "dead_letters": dict(letters),
            "poison_rows": poison_rows,
            "sent": sent,
            "stored": stored,
        },
    )


def probe_fleet_spoof(rig: IngestRig) -> ProbeResult:
    """See the module docstring."""
    attacker = rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}")
    other = f"g{uuid.uuid4().hex[:8]}"
    bad = rig.connect(attacker)
    # First a record of its own, so the device is known in its enrolled fleet.
    own = bad.publish(attacker.topic("data/s"), envelope(attacker.name, 1))
    # 1. The broker: the ACL names the device's enrolled fleet, so these are refused.
    spoofed = [
        bad.publish(attacker.topic("data/s", fleet=other), envelope(attacker.name, 2)),
        bad.publish(attacker.topic("status", fleet=other), b"online"),
    ]
    refused = all(rc.value == NOT_AUTHORIZED for rc in spoofed)
    delivered = sum(not rc.is_failure for rc in spoofed)
    expected = Counter({"fleet_mismatch": delivered}) if delivered else Counter()
    settled = _settle(
        lambda: (
            rig.dead_letters(attacker.name) == expected
            and len(rig.records(attacker.name)) == (0 if own.is_failure else 1)
        )
    )
    rows = rig.records(attacker.name)
    under_other = [r for r in rows if r.topic.startswith(f"{ROOT}/{other}/")]
    fleet = rig.device_fleet(attacker.name)
    letters = rig.dead_letters(attacker.name)
    # 2. The ingest, behind it: the device is moved to another fleet in the registry (a
    # readmission into another fleet) and publishes under its old one before the broker
    # has reloaded its ACL, which still allows that. The ingest must refuse it alone.
    moved = f"m{uuid.uuid4().hex[:8]}"
    with rig.engine.begin() as conn:
        conn.execute(
            sa.update(Enrollment).where(Enrollment.device_id == attacker.name).values(fleet=moved)
        )
    stale = [
        bad.publish(attacker.topic("data/s"), envelope(attacker.name, 3)),
        bad.publish(attacker.topic("status"), b"online"),
    ]
    rig.disconnect(bad)
    stale_delivered = sum(not rc.is_failure for rc in stale)
    stale_expected = letters + Counter({"fleet_mismatch": stale_delivered})
    ingest_settled = _settle(lambda: rig.dead_letters(attacker.name) == stale_expected)
    ingest_rows = len(rig.records(attacker.name)) - len(rows)
    ingest_fleet = rig.device_fleet(attacker.name)
    stale_letters = rig.dead_letters(attacker.name) - letters
    rig.reload_broker_acl()  # what the server does within a second: pinned to "moved"
    broker_held = (
        refused
        and settled
        and not own.is_failure
        and not under_other
        and fleet == attacker.fleet
        and letters == expected
    )
    ingest_held = (
        stale_delivered == len(stale)
        and ingest_settled
        and ingest_rows == 0
        and ingest_fleet == attacker.fleet
    )
    return ProbeResult(
        broker_held and ingest_held,
        f"enrolled in {attacker.fleet}, published a record and a status under fleet {other}: "
        f"broker PUBACKs {[f'0x{rc.value:02x}' for rc in spoofed]}, rows under {other} "
        f"{len(under_other)}, dead letters {dict(letters)}, devices.fleet {fleet}; "
        f"moved to fleet {moved} in the registry and published under {attacker.fleet} "
        f"before the broker reloaded (PUBACKs {[f'0x{rc.value:02x}' for rc in stale]}): "
        f"ingest dead letters {dict(stale_letters)}, rows stored {ingest_rows}, "
        f"devices.fleet {ingest_fleet}",
        {
            "delivered": delivered,
            "rows_under_other_fleet": len(under_other),
            "dead_letters": dict(letters),
            "device_fleet": fleet,
            "broker_refused": refused,
            "stale_acl_delivered": stale_delivered,
            "stale_acl_dead_letters": dict(stale_letters),
            "stale_acl_rows": ingest_rows,
        },
    )


def _flood_messages(attacker: FleetDevice) -> list[tuple[str, bytes, bool, str]]:
    """``(topic, payload, retain, reason it must be dead-lettered with)`` of the flood."""
    me = attacker.name

    def forged_duplicate(i: int) -> bytes:
        # The key of the attacker's stored record (version 1, seq 1) with another body.
        return envelope(me, 1, body=json.dumps({"forged": i}).encode(), ts_ms=1)

    kinds: list[tuple[str, Callable[[int], bytes], bool, str]] = [
        (
            "data/s",
            lambda i: raw_json_envelope(me, seq=SEQ_DIGITS_POISON),
            False,
            "malformed_envelope",
        ),
        (
            "data/s",
            lambda i: raw_json_envelope(me, kind=SURROGATE_KIND),
            False,
            "malformed_envelope",
        ),
        (
            "telemetry/t",
            lambda i: b"\x08\x01\x12\xff" + i.to_bytes(4, "big"),
            False,
            "malformed_envelope",
        ),
        ("data/s", lambda i: envelope("someone-else", i + 1), False, "device_mismatch"),
        ("data/s", forged_duplicate, False, "conflicting_duplicate"),
        ("result/r", lambda i: envelope(me, 10_000 + i), True, "retained"),
        ("status", lambda i: b"sleeping %d" % i, False, "bad_status"),
    ]
    messages = []
    for i in range(FLOOD_MESSAGES):
        rest, build, retain, reason = kinds[i % len(kinds)]
        messages.append((attacker.topic(rest), build(i), retain, reason))
    return messages


def _honest_stream(
    device: FleetDevice, client: MqttDevice, count: int, rate_hz: float, out: dict[str, int]
) -> None:
    """Send ``count`` records at ``rate_hz``, each stamped right before it is published."""
    incarnation = new_incarnation()
    mids: list[int] = []
    start = time.monotonic()
    for seq in range(1, count + 1):
        time.sleep(max(0.0, start + (seq - 1) / rate_hz - time.monotonic()))
        payload = envelope(device.name, seq, incarnation=incarnation, kind="telemetry")
        mids.append(client.send(device.topic("telemetry/t"), payload))
    codes = client.wait(mids, timeout=60.0)
    out[device.name] = sum(not rc.is_failure for rc in codes.values())


def probe_flood(rig: IngestRig) -> tuple[ProbeResult, dict[str, Any]]:
    """The poison flood with honest devices beside it; see the module docstring.

    Returns:
        The attack's result (held when every bad message is dead-lettered with its reason
        and every honest record is stored once within the lag limit) and the
        ``honest_devices`` figures.
    """
    attacker = rig.enroll(f"mallory-{uuid.uuid4().hex[:6]}")
    honest = [rig.enroll(f"honest-{uuid.uuid4().hex[:6]}") for _ in range(HONEST_DEVICES)]
    bad = rig.connect(attacker)
    original = bad.publish(attacker.topic("data/s"), envelope(attacker.name, 1))
    wait(lambda: len(rig.records(attacker.name)) == 1, TIMEOUT, "the attacker's own record")
    clients = [rig.connect(device) for device in honest]
    messages = _flood_messages(attacker)
    acked: dict[str, int] = {}
    streams = [
        threading.Thread(
            target=_honest_stream,
            args=(device, client, HONEST_RECORDS, HONEST_RATE_HZ, acked),
            daemon=True,
        )
        for device, client in zip(honest, clients, strict=True)
    ]
    for stream in streams:
        stream.start()
    time.sleep(0.3)  # the flood starts while the honest devices are sending
    flood_start = time.monotonic()
    mids = [bad.send(topic, payload, retain=retain) for topic, payload, retain, _ in messages]
    codes = bad.wait(mids, timeout=120.0)
    flood_s = time.monotonic() - flood_start
    for stream in streams:
        stream.join(timeout=120.0)
    expected = Counter(
        reason
        for mid, (*_, reason) in zip(mids, messages, strict=True)
        if not codes[mid].is_failure
    )
    sent = sum(acked.values())

    def honest_rows() -> int:
        return sum(len(rig.records(device.name)) for device in honest)

    settled = _settle(
        lambda: honest_rows() == sent and rig.dead_letters(attacker.name) == expected, 60.0
    )
    lags: list[float] = []
    keys: set[tuple[str, str, int]] = set()
    rows = 0
    for device in honest:
        for row in rig.records(device.name):
            rows += 1
            keys.add((device.name, row.incarnation, row.seq))
            received = row.received_at.replace(tzinfo=UTC).timestamp()
            lags.append(received - row.ts_ms / 1000.0)
    p99 = statistics.quantiles(lags, n=100)[98] if len(lags) >= 2 else float("nan")
    letters = rig.dead_letters(attacker.name)
    attacker_rows = len(rig.records(attacker.name))
    # Every message was acknowledged: a restarted ingest (its session resumed) is
    # redelivered nothing, so nothing more is dead-lettered or stored.
    rig.restart_ingest()
    time.sleep(1.5)
    redelivered = sum(rig.dead_letters(attacker.name).values()) - sum(letters.values())
    redelivered += honest_rows() - rows
    for client in [bad, *clients]:
        rig.disconnect(client)
    figures: dict[str, Any] = {
        "sent": sent,
        "stored": len(keys),
        "duplicate_rows": rows - len(keys),
        "p99_lag_s": round(p99, 4),
    }
    held = (
        settled
        and not original.is_failure
        and sent == HONEST_DEVICES * HONEST_RECORDS
        and figures["stored"] == sent
        and figures["duplicate_rows"] == 0
        and p99 <= P99_LAG_LIMIT_S
        and letters == expected
        and sum(expected.values()) >= 1000
        and attacker_rows == 1
        and redelivered == 0
    )
    return (
        ProbeResult(
            held,
            f"{sum(expected.values())} bad messages in {flood_s:.1f} s "
            f"(dead letters {dict(letters)}, expected {dict(expected)}) beside "
            f"{HONEST_DEVICES} honest devices x {HONEST_RECORDS} records: stored "
            f"{figures['stored']}/{sent}, duplicate rows {figures['duplicate_rows']}, "
            f"p99 lag {p99:.3f} s (limit {P99_LAG_LIMIT_S} s); redelivered after an ingest "
            f"restart: {redelivered}",
            {
                "expected": dict(expected),
                "dead_letters": dict(letters),
                "attacker_rows": attacker_rows,
                "redelivered": redelivered,
                "flood_s": flood_s,
                **figures,
            },
        ),
        figures,
    )


def probe_outbox_reset(rig: IngestRig, records: int = 150) -> ProbeResult:
    """See the module docstring."""
    device = rig.enroll(f"agent-{uuid.uuid4().hex[:6]}")
    assert device.cert.key_path is not None
    state = rig.workdir / device.name
    config = {
        "device_id": device.name,
        "fleet": device.fleet,
        "state_dir": str(state),
        "mqtt": {
            "host": "127.0.0.1",
            "port": rig.broker.port,
            "tls": {
                "ca_file": str(rig.ca.cert_path),
                "cert_file": str(device.cert.cert_path),
                "key_file": str(device.cert.key_path),
            },
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
        },
        "sources": [{"type": "dataset-replay", "rate_hz": 300, "limit": records}],
        "status_interval_s": 0.5,
    }
    path = rig.workdir / f"{device.name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = rig.workdir / f"{device.name}.log"

    def life(total: int) -> bool:
        agent = start_edgefl(["agent", "run", "--config", str(path)], log)
        try:
            return _settle(lambda: len(rig.records(device.name)) >= total, 90.0)
        finally:
            agent.stop(grace=30)

    first = life(records)
    for suffix in ("", "-wal", "-shm"):  # the outbox is deleted while the agent is down
        Path(f"{state / 'outbox.db'}{suffix}").unlink(missing_ok=True)
    second = life(2 * records) if first else False
    rows = rig.records(device.name)
    keys = {(r.incarnation, r.seq) for r in rows}
    incarnations = Counter(r.incarnation for r in rows)
    letters = rig.dead_letters(device.name)
    held = (
        first
        and second
        and len(rows) == len(keys) == 2 * records
        and sorted(incarnations.values()) == [records, records]
        and "" not in incarnations
        and not letters
    )
    return ProbeResult(
        held,
        f"an agent sent {records} records, was stopped, its outbox deleted, and sent "
        f"{records} more from seq 1: {len(rows)}/{2 * records} stored under "
        f"{len(incarnations)} incarnation(s), dead letters {dict(letters)}",
        {
            "rows": len(rows),
            "keys": len(keys),
            "per_incarnation": sorted(incarnations.values()),
            "dead_letters": dict(letters),
            "expected": 2 * records,
        },
    )


def run_probes(workdir: Path) -> dict[str, Any]:
    """Run every attack of this area against real processes; see the module docstring.

    Returns:
        ``{"attacks": {NAME: {"held", "detail"}}, "honest_devices": {...}}``.
    """
    attacks: dict[str, dict[str, object]] = {}
    with ingest_rig(workdir / "ingest") as rig:
        attacks["poison_seq_digits"] = probe_poison_seq_digits(rig).report()
        attacks["poison_surrogate"] = probe_poison_surrogate(rig).report()
        attacks["retained_poison"] = probe_retained_poison(rig).report()
        attacks["fleet_spoof"] = probe_fleet_spoof(rig).report()
        attacks["outbox_reset"] = probe_outbox_reset(rig).report()
        flood, honest = probe_flood(rig)
    # The flood is no attack name of its own: its outcome is part of the poison attacks.
    if not flood.held:
        for name in ("poison_seq_digits", "poison_surrogate"):
            attacks[name] = {
                "held": False,
                "detail": f"{attacks[name]['detail']}; flood: {flood.detail}",
            }
    else:
        attacks["poison_seq_digits"]["detail"] = (
            f"{attacks['poison_seq_digits']['detail']}; flood: {flood.detail}"
        )
    return {"attacks": attacks, "honest_devices": honest}
