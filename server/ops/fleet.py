"""Fleet operations: ``devices``, ``device-show``, ``dead-letters`` and ``command``.

``devices`` lists every device the ingest has seen: presence and last seen, the model it
reports (``state/reported``), the agent and envelope versions the ingest recorded, its
ε spent from the privacy ledger, and its outbox backlog: the one in the device's newest
report of it, ``telemetry/agent`` (every ``agent_report_s``, 60 s by default, while it is
connected) or an answer to the ``status`` command (``edgefl server command DEVICE
status``), with the time it was stored (``outbox.at``); ``None`` before either.

``command DEVICE NAME`` sends a command over the fleet's command contract
(``docs/fleet-contract.md``: ``cmd/{name}`` with a correlation id and an expiry, answered
once on ``cmd-resp/{correlation_id}``) as the ``edgefl-commands`` service identity. A
device that is offline gets it when it reconnects within its MQTT session's expiry (its
session is persistent), and only before the command's own expiry (``--ttl``, default
300 s): after that the device ignores it, as the contract says. ``--wait`` waits for the
answer (``--timeout``); an offline device's command comes back ``queued`` with its expiry.
An answer that the publisher's own subscription missed (its connection dropped while it
waited: a broker restart) but the ingest stored still counts: after a wait in vain the
registry is read for it for up to :data:`_STORED_ANSWER_WAIT_S`.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from pydantic import Field

from edgefl.server.ops import (
    InvalidError,
    NotFoundError,
    OpContext,
    Params,
    UnavailableError,
    operation,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

__all__ = ["device_list", "device_show", "new_correlation_id", "send_command"]

STATUS_COMMAND: Final = "status"
"""The command whose answer carries the agent's outbox figures."""

_NO_REPORT = (
    "model",
    "version",
    "variant",
    "sha256",
    "state",
    "since",
    "rollbacks",
    "last_failure",
    "reported_at",
)
_SESSION_WAIT_S: Final = 60.0
"""How long a command publisher waits for another one's ``edgefl-commands`` session (one
connection per certificate: :func:`edgefl.mqtt_client.identity_session`)."""

_STORED_ANSWER_WAIT_S: Final = 3.0
"""After a wait in vain, how long the registry is read for an answer the ingest stored."""

_BODY_SHOWN: Final = 4096
"""Largest record body shown decoded in ``device-show`` (bigger ones: their size)."""


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite gives naive datetimes back; they mean UTC)."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _json_body(content_type: str, body: bytes) -> Any:
    """A record's body as JSON when it is small JSON, else ``{"bytes": size}``."""
    if "json" in content_type and len(body) <= _BODY_SHOWN:
        try:
            return json.loads(body)
        except ValueError:
            pass
    return {"bytes": len(body), "content_type": content_type}


def _outboxes(session: Session, device_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each device's outbox figures from its newest report of them.

    An agent reports them every ``agent_report_s`` while connected (``telemetry/agent``)
    and in every answer to the ``status`` command; the newest stored one counts.
    """
    from sqlalchemy import select

    from edgefl.server.registry import Device, Record

    def newest(kind: str, topic: str) -> Any:
        # A backward scan of records (device_id, kind, id) that stops at the first match.
        return (
            select(Record.id)
            .where(
                Record.device_id == Device.device_id,
                Record.kind == kind,
                Record.topic.like(topic),
            )
            .order_by(Record.id.desc())
            .limit(1)
            .correlate(Device)
            .scalar_subquery()
        )

    latest = select(
        newest("telemetry", "%/telemetry/agent"),
        newest("response", f"%/cmd-resp/{STATUS_COMMAND}-%"),
    ).select_from(Device)
    if device_ids is not None:
        latest = latest.where(Device.device_id.in_(device_ids))
    ids = [
        max(i for i in row if i is not None)
        for row in session.execute(latest).all()
        if row[0] is not None or row[1] is not None
    ]
    out: dict[str, dict[str, Any]] = {}
    if not ids:
        return out
    for rec in session.scalars(select(Record).where(Record.id.in_(ids))):
        try:
            body = json.loads(rec.body)
            box = body["outbox"] if rec.kind == "telemetry" else body["result"]["outbox"]
        except (ValueError, KeyError, TypeError, RecursionError):
            continue  # a device's own report: never fail the listing for the others
        if isinstance(box, dict):
            out[rec.device_id] = {
                "depth": _figure(box.get("depth")),
                "bytes": _figure(box.get("bytes")),
                "oldest_age_s": _figure(box.get("oldest_age_s")),
                "at": iso(rec.received_at),
            }
    return out


def _figure(value: Any) -> int | float | None:
    """A reported count, size or age as shown: a finite number from 0 to 2**63, else None.

    The device wrote the report; NaN or text would also break the answer's JSON.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if 0 <= value <= 2**63 else None


def _epsilon_spent(session: Session, device_ids: list[str] | None = None) -> dict[str, float]:
    """Each device's ε over every run: the sum of its ledger ε in each run.

    Basic composition (an upper bound, exact for a device in one run), read with one
    query: the tighter RDP composition of every run's history (``edgefl server privacy``)
    needs the accountant, whose import costs seconds, too slow for a fleet listing.
    """
    from sqlalchemy import func, select

    from edgefl.server.registry.models import PrivacyLedgerEntry as Ledger

    query = select(Ledger.device_id, Ledger.run_id, func.max(Ledger.epsilon_total)).group_by(
        Ledger.device_id, Ledger.run_id
    )
    if device_ids is not None:
        query = query.where(Ledger.device_id.in_(device_ids))
    out: dict[str, float] = {}
    for device, _run, total in session.execute(query).all():
        out[device] = out.get(device, 0.0) + float(total)
    return out


def device_list(
    engine: Engine, *, fleet: str | None = None, device_ids: list[str] | None = None
) -> list[dict[str, Any]]:
    """The registry's devices, oldest id first (see :func:`devices`)."""
    from sqlalchemy import func, select

    from edgefl.server.device_states import read_model_states
    from edgefl.server.registry import Device, Record, session_factory

    with session_factory(engine)() as session:
        query = select(Device).order_by(Device.device_id)
        count_query = select(Record.device_id, func.count()).group_by(Record.device_id)
        if fleet is not None:
            query = query.where(Device.fleet == fleet)
        if device_ids is not None:
            query = query.where(Device.device_id.in_(device_ids))
            count_query = count_query.where(Record.device_id.in_(device_ids))
        rows = list(session.scalars(query))
        counts = dict(session.execute(count_query).all())
        states = read_model_states(session)
        outboxes = _outboxes(session, device_ids)
        epsilon = _epsilon_spent(session, device_ids)
    return [
        {
            "device_id": d.device_id,
            "fleet": d.fleet,
            "online": d.online,
            "presence": "online" if d.online else "offline",
            "last_seen": iso(d.last_seen),
            "status_changed_at": iso(d.status_changed_at),
            "records": int(counts.get(d.device_id, 0)),
            "agent_version": d.agent_version,
            "envelope_version": d.envelope_version,
            "epsilon": epsilon.get(d.device_id),
            "outbox": outboxes.get(d.device_id),
            **(
                states[d.device_id].to_json()
                if d.device_id in states
                else dict.fromkeys(_NO_REPORT)
            ),
        }
        for d in rows
    ]


class DevicesParams(Params):
    fleet: str | None = Field(None, description="Only devices of this fleet.")


@operation(
    "devices",
    role="viewer",
    params=DevicesParams,
    summary="List devices: presence, last seen, model, agent version, ε, outbox backlog.",
)
def devices(ctx: OpContext, params: DevicesParams) -> dict[str, Any]:
    """Every device the ingest has seen (``{"devices": [...]}``).

    Each row: ``device_id``, ``fleet``, ``online``, ``presence``, ``last_seen``,
    ``status_changed_at``, ``records``, ``agent_version``, ``envelope_version``,
    ``epsilon`` (ε spent over every run: the sum of its ledger ε per run, an upper bound;
    ``None`` if it never trained; ``privacy`` gives the RDP composition), ``outbox``
    (``{depth, bytes, oldest_age_s, at}`` from its newest report, or ``None``),
    and the reported model state (``model``, ``version``, ``variant``, ``state`` ...).
    """
    return {"devices": device_list(ctx.engine, fleet=params.fleet)}


class DeviceParams(Params):
    device: str = Field(min_length=1, max_length=64, description="The device id.")
    limit: int = Field(10, ge=1, le=500, description="Newest this many of each list.")


def device_show(engine: Engine, device: str, limit: int = 10) -> dict[str, Any]:
    """One device in detail (see :func:`device_show_op`).

    Raises:
        NotFoundError: The registry has no such device (neither seen nor enrolled).
    """
    from sqlalchemy import select

    from edgefl.server import audit
    from edgefl.server.enrollment import get_enrollment
    from edgefl.server.registry import Record, session_factory

    rows = device_list(engine, device_ids=[device])
    enrollment = get_enrollment(engine, device)
    if not rows and enrollment is None:
        raise NotFoundError(
            f"no device {device!r} in the registry",
            hint="`edgefl server devices` lists the devices the ingest has seen",
        )

    def recent(session: Session, kind: str) -> list[dict[str, Any]]:
        query = (
            select(Record)
            .where(Record.device_id == device, Record.kind == kind)
            .order_by(Record.id.desc())
            .limit(limit)
        )
        return [
            {
                "seq": r.seq,
                "topic": r.topic,
                "ts_ms": r.ts_ms,
                "received_at": iso(r.received_at),
                "body": _json_body(r.content_type, r.body),
                **(
                    {"model": r.model, "version": r.model_version, "variant": r.model_variant}
                    if kind == "result"
                    else {}
                ),
            }
            for r in session.scalars(query)
        ]

    with session_factory(engine)() as session:
        telemetry = recent(session, "telemetry")
        results = recent(session, "result")
        responses = {
            r["topic"].rsplit("/", 1)[-1]: r for r in recent(session, "response") if r["topic"]
        }
    sent = [
        e
        for e in audit.read(engine, limit=max(limit * 5, 50), action="command")
        if e["target"] == device
    ][:limit]
    commands: list[dict[str, Any]] = []
    # Oldest first, so that a command without a recorded correlation id (sent through the
    # API without one) takes the oldest unpaired answer to its name that can be its own:
    # the entry is written when the operation ends (after the answer, with --wait), so
    # an answer counts from the command's expiry before it.
    for entry in reversed(sent):
        name = entry["arguments"].get("name")
        cid = str(entry["arguments"].get("correlation_id") or "")
        if not cid and entry["outcome"] == "ok" and isinstance(name, str):
            ttl = entry["arguments"].get("ttl_s")
            at = datetime.fromisoformat(entry["at"]) - timedelta(
                seconds=float(ttl) if isinstance(ttl, int | float) else 300.0
            )
            later = sorted(
                (r["received_at"], c)
                for c, r in responses.items()
                if c.startswith(f"{name}-")
                and r["received_at"]
                and datetime.fromisoformat(r["received_at"]) >= at
            )
            cid = later[0][1] if later else ""
        answer = responses.pop(cid, None) if cid else None
        commands.insert(
            0,
            {
                "at": entry["at"],
                "actor": entry["actor"],
                "name": name,
                "args": entry["arguments"].get("args"),
                "outcome": entry["outcome"],
                "correlation_id": cid or None,
                "response": answer["body"] if answer else None,
                "answered_at": answer["received_at"] if answer else None,
            },
        )
    # Answers to commands sent by others (certificate renewal, scripts).
    others = [
        {
            "correlation_id": cid,
            "response": r["body"],
            "answered_at": r["received_at"],
        }
        for cid, r in responses.items()
    ]
    return {
        "device": rows[0] if rows else None,
        "enrollment": enrollment.to_dict() if enrollment is not None else None,
        "telemetry": telemetry,
        "results": results,
        "commands": commands,
        "other_responses": others,
    }


@operation(
    "device-show",
    role="viewer",
    params=DeviceParams,
    summary="Show one device: status, recent telemetry, results and commands.",
)
def device_show_op(ctx: OpContext, params: DeviceParams) -> dict[str, Any]:
    """One device in detail.

    Returns ``device`` (its ``devices`` row, or ``None`` when enrolled but never seen),
    ``enrollment``, the newest ``telemetry`` and ``results`` records, the ``commands``
    sent to it through ``command`` (from the audit log) with their answers, and
    ``other_responses`` (answers to commands sent otherwise).
    """
    return device_show(ctx.engine, params.device, params.limit)


class DeadLettersParams(Params):
    reason: str | None = Field(None, description="Only this reason (e.g. bad_envelope).")
    limit: int = Field(50, ge=1, le=10_000, description="Newest this many.")


@operation(
    "dead-letters",
    role="viewer",
    params=DeadLettersParams,
    summary="List messages the ingest refused, newest first, with counts by reason.",
)
def dead_letters(ctx: OpContext, params: DeadLettersParams) -> dict[str, Any]:
    """Dead letters, newest first, and their counts by reason.

    Returns ``{"counts": {reason: n}, "dead_letters": [{id, topic, reason, detail,
    payload_size, received_at}]}`` (the payload itself is not shown).
    """
    from sqlalchemy import func, select

    from edgefl.server.registry import DeadLetter, session_factory

    with session_factory(ctx.engine)() as session:
        counts = dict(
            session.execute(
                select(DeadLetter.reason, func.count()).group_by(DeadLetter.reason)
            ).all()
        )
        query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(params.limit)
        if params.reason is not None:
            query = query.where(DeadLetter.reason == params.reason)
        rows = [
            {
                "id": d.id,
                "topic": d.topic,
                "reason": d.reason,
                "detail": d.detail,
                "payload_size": d.payload_size,
                "received_at": iso(d.received_at),
            }
            for d in session.scalars(query)
        ]
    return {"counts": {str(k): int(v) for k, v in sorted(counts.items())}, "dead_letters": rows}


# -- command ------------------------------------------------------------------------------


class CommandParams(Params):
    device: str = Field(min_length=1, max_length=64, description="The target device id.")
    name: str = Field(min_length=1, max_length=64, description="The command (ping, status ...).")
    args: dict[str, Any] = Field(default_factory=dict, description="Its arguments (JSON object).")
    ttl_s: float = Field(
        300.0, gt=0, le=7 * 24 * 3600, description="Seconds until the command expires."
    )
    wait: bool = Field(False, description="Wait for the device's answer.")
    timeout_s: float = Field(30.0, gt=0, le=600, description="With wait: how long at most.")
    correlation_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The command's correlation id (default: NAME-<random>); kept in the audit "
        "log, so `device-show` pairs the command with its answer.",
    )


def _commands_identity(ca_dir: Any) -> Any:
    """The ``edgefl-commands`` client certificate, issued when missing."""
    from edgefl.config import TlsFiles
    from edgefl.server.fleet_ca import COMMANDS_IDENTITY, FleetCA

    folder = ca_dir / "services" / COMMANDS_IDENTITY
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    if not (cert_file.is_file() and key_file.is_file()):
        FleetCA.load(ca_dir).issue_service_cert(COMMANDS_IDENTITY)
    return TlsFiles(ca_file=ca_dir / "ca.pem", cert_file=cert_file, key_file=key_file)


def _stored_answer(engine: Engine, fleet: str, device: str, cid: str) -> dict[str, Any] | None:
    """The answer to ``cid`` as the ingest stored it (``.../cmd-resp/{cid}``), if it comes.

    Read for up to :data:`_STORED_ANSWER_WAIT_S` (the ingest stores within a batch). The
    topic is the device's own (the broker's ACL lets only that device write it): the same
    trust as the answer the publisher's subscription would have had.
    """
    from sqlalchemy import select

    from edgefl.proto.topics import response_topic
    from edgefl.server.registry import Record, session_factory

    topic = response_topic(fleet, device, cid)
    query = (
        select(Record.body)
        .where(Record.device_id == device, Record.kind == "response", Record.topic == topic)
        .order_by(Record.id.desc())
        .limit(1)
    )
    deadline = time.monotonic() + _STORED_ANSWER_WAIT_S
    while True:
        with session_factory(engine)() as session:
            body = session.scalars(query).first()
        if body is not None:
            try:
                doc = json.loads(bytes(body))
            except (ValueError, RecursionError):
                return None
            return doc if isinstance(doc, dict) and doc.get("correlation_id") == cid else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def new_correlation_id(name: str) -> str:
    """``NAME-<16 hex>``: the command's name first, so answers to ``status`` can be found."""
    return f"{name}-{secrets.token_hex(8)}"


@contextlib.contextmanager
def _publisher_session(
    client: Any,
    host: str,
    port: int,
    connected: threading.Event,
    state: dict[str, Any],
    *,
    tls: Any,
    session_wait_s: float,
) -> Iterator[None]:
    """Connect ``client`` (one connection as ``tls``'s identity on this host) and end it after.

    ``connected`` is set and ``state["rc"]`` holds the reason code by its ``on_connect``.

    Raises:
        UnavailableError: The broker cannot be reached or refuses the publisher, or
            another process held the identity's session for ``session_wait_s``.
    """
    from edgefl.errors import ServiceUnavailableError
    from edgefl.mqtt_client import identity_session

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                identity_session(tls, wait_s=session_wait_s, what="the command publisher")
            )
        except ServiceUnavailableError as exc:
            raise UnavailableError(exc.message, hint=exc.hint) from exc
        try:
            client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise UnavailableError(
                f"cannot reach the broker at {host}:{port}: {exc}",
                hint="is `edgefl server start` running?",
            ) from exc
        client.loop_start()
        try:
            if not connected.wait(10) or state["rc"].is_failure:
                raise UnavailableError(
                    f"the broker at {host}:{port} did not accept the command publisher: "
                    f"{state.get('rc', 'no answer')}"
                )
            yield
        finally:
            client.disconnect()
            client.loop_stop()


def send_command(
    *,
    host: str,
    port: int,
    tls: Any,
    fleet: str,
    device: str,
    name: str,
    args: dict[str, Any],
    ttl_s: float,
    wait_s: float | None,
    correlation_id: str | None = None,
    session_wait_s: float = _SESSION_WAIT_S,
) -> dict[str, Any]:
    """Publish one command (QoS 1) and, with ``wait_s``, wait for its answer.

    The connection (and so the wait) holds this host's ``edgefl-commands`` session: another
    publisher waits up to ``session_wait_s`` for it to end.

    Returns:
        ``correlation_id``, ``topic``, ``expires_at`` (ISO 8601), and ``response`` (the
        answer's body, or ``None`` when none came within ``wait_s`` or not waiting).

    Raises:
        UnavailableError: The broker cannot be reached or refuses the publisher.
    """
    from edgefl.mqtt_client import build_client
    from edgefl.proto.commands import make_command
    from edgefl.proto.serde import EnvelopeError, decode_envelope
    from edgefl.proto.topics import response_topic
    from edgefl.server.fleet_ca import COMMANDS_IDENTITY

    cid = correlation_id or new_correlation_id(name)
    now_ms = int(time.time() * 1000)
    topic, payload = make_command(fleet, device, name, args, ttl_s, cid, now_ms=now_ms)
    answer_topic = response_topic(fleet, device, cid)
    # A client id of its own: two commands at once must not take over each other's session.
    client = build_client(
        f"{COMMANDS_IDENTITY}-{secrets.token_hex(4)}" if tls is None else COMMANDS_IDENTITY,
        tls=tls,
        what="command publisher",
    )
    connected = threading.Event()
    subscribed = threading.Event()
    published = threading.Event()
    answered = threading.Event()
    state: dict[str, Any] = {}

    def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        state["rc"] = rc
        connected.set()
        if not rc.is_failure and wait_s is not None:
            c.subscribe(answer_topic, qos=1)

    def on_subscribe(*_a: Any) -> None:
        subscribed.set()

    def on_publish(_c: Any, _u: Any, _mid: int, rc: Any, _p: Any) -> None:
        state["pub_rc"] = rc
        published.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            body = json.loads(decode_envelope(bytes(msg.payload)).body)
        except (EnvelopeError, ValueError):
            return
        if isinstance(body, dict) and body.get("correlation_id") == cid:
            state["response"] = body
            answered.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    with _publisher_session(
        client, host, port, connected, state, tls=tls, session_wait_s=session_wait_s
    ):
        if wait_s is not None and not subscribed.wait(10):
            raise UnavailableError(f"the broker at {host}:{port} did not confirm a subscription")
        client.publish(topic, payload, qos=1)
        if not published.wait(10) or getattr(state.get("pub_rc"), "is_failure", False):
            raise UnavailableError(
                f"the broker at {host}:{port} did not accept the command: "
                f"{state.get('pub_rc', 'no acknowledgement')}"
            )
        if wait_s is not None:
            answered.wait(wait_s)
    return {
        "correlation_id": cid,
        "topic": topic,
        "expires_at": datetime.fromtimestamp((now_ms + int(ttl_s * 1000)) / 1000, UTC).isoformat(),
        "response": state.get("response"),
    }


def publish_commands(
    *,
    host: str,
    port: int,
    tls: Any,
    targets: dict[str, str],
    name: str,
    args: dict[str, Any],
    ttl_s: float,
    session_wait_s: float = _SESSION_WAIT_S,
) -> list[str]:
    """Publish one command (QoS 1) to each device of ``targets``, waiting for no answer.

    ``targets`` maps device id -> fleet. One connection carries them all; it waits up to
    ``session_wait_s`` for another publisher's ``edgefl-commands`` session to end.

    Returns:
        The devices whose command the broker acknowledged.

    Raises:
        UnavailableError: The broker cannot be reached or refuses the publisher.
    """
    from edgefl.mqtt_client import build_client
    from edgefl.proto.commands import make_command
    from edgefl.server.fleet_ca import COMMANDS_IDENTITY

    client = build_client(
        f"{COMMANDS_IDENTITY}-{secrets.token_hex(4)}" if tls is None else COMMANDS_IDENTITY,
        tls=tls,
        what="command publisher",
    )
    connected = threading.Event()
    lock = threading.Lock()
    pending: dict[int, str] = {}
    acked: list[str] = []
    done = threading.Event()
    state: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        state["rc"] = rc
        connected.set()

    def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with lock:
            device = pending.pop(mid, None)
            if device is not None and not getattr(rc, "is_failure", False):
                acked.append(device)
            if not pending and state.get("all_sent"):
                done.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    now_ms = int(time.time() * 1000)
    with _publisher_session(
        client, host, port, connected, state, tls=tls, session_wait_s=session_wait_s
    ):
        for device, fleet in sorted(targets.items()):
            cid = new_correlation_id(name)
            topic, payload = make_command(fleet, device, name, args, ttl_s, cid, now_ms=now_ms)
            with lock:
                pending[client.publish(topic, payload, qos=1).mid] = device
        with lock:
            state["all_sent"] = True
            if not pending:
                done.set()
        done.wait(10)
    return sorted(acked)


@operation(
    "command",
    role="operator",
    params=CommandParams,
    summary="Send a command to a device over the command contract; optionally wait.",
    mutating=True,
    target=lambda p: p.device,
)
def command(ctx: OpContext, params: CommandParams) -> dict[str, Any]:
    """Send ``name`` with ``args`` to ``device`` (see the module docstring).

    Returns ``device``, ``name``, ``correlation_id``, ``expires_at``, ``online`` (presence
    when sent), ``status`` (``answered``, ``no_answer`` (waited in vain), ``queued`` (the
    device is offline: the broker keeps it for the device's session) or ``sent``) and
    ``response`` (the answer's body: ``ok``, ``result`` or ``error``).

    Raises:
        NotFoundError: The device is neither in the registry nor enrolled.
        InvalidError: The command name is not an id of the contract.
        UnavailableError: The broker cannot be reached.
    """
    from edgefl.proto.commands import CommandError, check_correlation_id
    from edgefl.proto.ids import is_id
    from edgefl.server.enrollment import get_enrollment
    from edgefl.server.registry import Device, session_factory
    from edgefl.server.rollout import broker_address

    if params.correlation_id is not None:
        try:
            check_correlation_id(params.correlation_id)
        except CommandError as exc:
            raise InvalidError(str(exc)) from exc
    if not is_id(params.name):
        raise InvalidError(
            f"command name {params.name!r} is not a command name ([A-Za-z0-9_-], 1-64)"
        )
    enrollment = get_enrollment(ctx.engine, params.device)
    with session_factory(ctx.engine)() as session:
        row = session.get(Device, params.device)
        fleet = row.fleet if row is not None else None
        online = bool(row.online) if row is not None else False
    if enrollment is not None:
        fleet = enrollment.fleet
    if fleet is None:
        raise NotFoundError(
            f"no device {params.device!r} in the registry",
            hint="`edgefl server devices` lists the devices the ingest has seen",
        )
    if enrollment is not None and enrollment.status != "admitted":
        raise InvalidError(f"device {params.device!r} is {enrollment.status}: it gets no commands")
    host, port = broker_address(ctx.config)
    sent = send_command(
        host=host,
        port=port,
        tls=_commands_identity(ctx.config.resolved_ca_dir),
        fleet=fleet,
        device=params.device,
        name=params.name,
        args=params.args,
        ttl_s=params.ttl_s,
        # An offline device answers only once it is back: do not wait for it here.
        wait_s=params.timeout_s if params.wait and online else None,
        correlation_id=params.correlation_id,
    )
    if sent["response"] is None and params.wait and online:
        sent["response"] = _stored_answer(ctx.engine, fleet, params.device, sent["correlation_id"])
    if sent["response"] is not None:
        status = "answered"
    elif not online:
        status = "queued"
    elif params.wait:
        status = "no_answer"
    else:
        status = "sent"
    return {
        "device": params.device,
        "fleet": fleet,
        "name": params.name,
        "online": online,
        "status": status,
        **sent,
    }
