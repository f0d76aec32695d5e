"""Fleet commands on the device: decode, check expiry, run once, answer once.

A command arrives on ``edgefl/{fleet}/{device}/cmd/{name}`` as an :class:`Envelope` of
kind ``command`` with a JSON body::

    {"correlation_id": "c-42", "expires_at_ms": 1700000060000, "args": {...}}

and its answer leaves on ``edgefl/{fleet}/{device}/cmd-resp/{correlation_id}`` as an
envelope of kind ``response``::

    {"correlation_id": "c-42", "command": "ping", "ok": true, "result": {...}}
    {"correlation_id": "c-43", "command": "nope", "ok": false,
     "error": "unknown command 'nope'", "known": ["ping", "set-rate", "status"]}

What happens to each message (:meth:`CommandProcessor.handle`):

* **malformed** (not an envelope, wrong kind, bad body, a key misspelt): a warning with
  the reason and the ``malformed`` counter. Whenever a correlation id can still be read
  (:func:`edgefl.proto.serde.salvage_json_body`: the body of a payload whose envelope
  fields are wrong), the device answers ``ok: false`` once with the reason, so the sender
  learns what was wrong. Otherwise there is nobody to answer: counted as ``unanswered``.
* **already answered** (same correlation id; a QoS 1 redelivery or a second publish): not
  run again and not answered again; counted as ``duplicate``.
* **expired** (``now_ms > expires_at_ms``): an INFO log ``ignoring expired command NAME
  (correlation ID) expired X ms ago``, counted, no answer.
* **unknown name**: ``ok: false`` listing the known commands.
* a handler that raises: ``ok: false`` with the error text; otherwise ``ok: true``.

Whoever can publish on the command topics (the cloud, per the broker's ACL) must not be
able to turn the agent into a publisher of its choosing, so an answer to a malformed
command follows the rules of every answer, and a few more:

* it goes only to this device's own response topic,
  ``edgefl/{fleet}/{device}/cmd-resp/{correlation_id}``, built from the agent's own fleet
  and id (never from the message), and only for a message on the agent's own command
  topic; the correlation id is 1-128 characters without ``/``, ``+``, ``#`` or control
  characters, so it cannot add a topic level;
* one answer per correlation id (the ``answered`` table), like any command;
* a readable but expired ``expires_at_ms`` gets no answer, like any expired command;
* the error text is cut to :data:`_ERROR_MAX` characters;
* malformed messages are answered and logged at most :data:`_MALFORMED_BURST` at once and
  :data:`_MALFORMED_PER_S` per second on average; the rest are only counted
  (``rate_limited``, and ``unanswered``).

Exactly one answer per correlation id
-------------------------------------
Answered correlation ids live in their own SQLite file (``commands.db`` in the agent's
state dir), each with its response body. The order is:

1. run the handler and commit ``(correlation_id, response, outbox_seq=NULL)``;
2. acknowledge the MQTT message (the client uses manual acks, so until this point a
   crash makes the broker redeliver the command; a crash after the handler ran but
   before step 1 runs the handler a second time: handlers must be safe to repeat, which
   the built-in ones are);
3. put the response envelope into the outbox. The outbox calls back with the sequence
   number it is about to commit, and that number is written to ``outbox_seq`` before the
   outbox transaction commits.

On start-up (:meth:`CommandProcessor.recover`) a row whose ``outbox_seq`` is NULL, or
whose ``outbox_seq`` is not below the outbox's ``next_seq`` (so that outbox transaction
never committed), is put into the outbox again. A sequence number is handed out only by a
committed outbox transaction, so this re-enqueues exactly the responses that are not in
the outbox: each correlation id gets one response record, which the outbox then delivers
at least once with QoS 1 (a wire duplicate after a reconnect carries the same envelope
``seq``, so the server deduplicates it on ``(device_id, incarnation, seq)``).

Rows are pruned one day after their command expired.

The server side builds commands with :func:`make_command`.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from edgefl.edge_agent.mqtt_link import InboundMessage
from edgefl.edge_agent.outbox import Outbox, OutboxFullError, RecordTooLargeError

# The command wire format (topics, ids, building a command) is a contract the server
# shares; it lives in edgefl.proto and stays importable from here.
from edgefl.proto.commands import CommandError, check_correlation_id, make_command
from edgefl.proto.ids import check_id, is_id
from edgefl.proto.serde import (
    ENVELOPE_VERSION,
    JSON_CONTENT_TYPE,
    Envelope,
    EnvelopeError,
    canonical_json_body,
    decode_envelope,
    encode_envelope,
    salvage_json_body,
)
from edgefl.proto.topics import command_filter, command_topic, response_topic, split_topic

__all__ = [
    "COMMANDS_FILE",
    "CommandError",
    "CommandHandler",
    "CommandProcessor",
    "CommandStats",
    "ParsedCommand",
    "command_filter",
    "command_topic",
    "make_command",
    "parse_command",
    "ping_handler",
    "prewarm_handler",
    "response_topic",
    "set_rate_handler",
    "status_handler",
]

_log = logging.getLogger(__name__)

COMMANDS_FILE: Final = "commands.db"
"""File in the agent's state dir that remembers answered correlation ids."""

CommandHandler = Callable[[dict[str, Any]], dict[str, Any]]
"""A command implementation: takes the ``args`` object, returns the ``result`` object."""

_BODY_KEYS: Final = frozenset({"correlation_id", "expires_at_ms", "args"})
_RETENTION_MS: Final = 24 * 3600 * 1000
_RESPONSE_PRIORITY: Final = 10
_PRUNE_EVERY_S: Final = 3600.0
_RETRY_PENDING_S: Final = 2.0
_ERROR_MAX: Final = 500
"""Longest error text in an answer to a malformed command."""
_MALFORMED_BURST: Final = 20.0
"""Malformed messages answered (and logged) at once before the rate limit applies."""
_MALFORMED_PER_S: Final = 1.0
"""Malformed messages answered (and logged) per second on average."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answered (
    correlation_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    answered_at_ms INTEGER NOT NULL,
    response BLOB NOT NULL,
    outbox_seq INTEGER
);
CREATE INDEX IF NOT EXISTS answered_expiry ON answered (expires_at_ms);
"""


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """A valid command message.

    Attributes:
        name: Command name (last topic segment).
        correlation_id: Id the response carries, 1-128 printable characters.
        expires_at_ms: Unix milliseconds after which the command must be ignored.
        args: The arguments object.
    """

    name: str
    correlation_id: str
    expires_at_ms: int
    args: dict[str, Any]


@dataclass(slots=True)
class CommandStats:
    """Counters of a :class:`CommandProcessor` since it started.

    Attributes:
        received: Messages taken from the command topics.
        executed: Handlers run (including unknown commands answered with an error).
        answered: Responses committed (one per correlation id).
        malformed: Messages that were not valid commands (answered when possible).
        unanswered: Malformed messages that got no answer: no readable correlation id,
            not on this device's command topic, expired, already answered, or over the
            rate limit.
        rate_limited: Malformed messages over the rate limit (neither answered nor logged).
        expired: Commands ignored because they had expired.
        duplicate: Commands whose correlation id was already answered.
        unknown: Commands with no handler.
        failed: Handlers that raised.
        response_retries: Responses the outbox refused at first (full) and were retried.
    """

    received: int = 0
    executed: int = 0
    answered: int = 0
    malformed: int = 0
    unanswered: int = 0
    rate_limited: int = 0
    expired: int = 0
    duplicate: int = 0
    unknown: int = 0
    failed: int = 0
    response_retries: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a JSON-ready dict."""
        return {name: int(getattr(self, name)) for name in self.__slots__}


def parse_command(topic: str, payload: bytes, device_id: str) -> ParsedCommand:
    """Validate one message from a command topic.

    Args:
        topic: ``edgefl/{fleet}/{device}/cmd/{name}``.
        payload: The envelope bytes.
        device_id: This device; the envelope must be addressed to it.

    Returns:
        The command.

    Raises:
        CommandError: Anything is wrong; the message says what.
    """
    levels = topic.split("/")
    if len(levels) != 5 or levels[3] != "cmd" or not is_id(levels[4]):
        raise CommandError(f"not a command topic: {topic!r}")
    name = levels[4]
    try:
        env = decode_envelope(payload)
    except EnvelopeError as exc:
        raise CommandError(f"not an envelope: {exc.message}") from exc
    if env.kind != "command":
        raise CommandError(f"envelope kind is {env.kind!r}, not 'command'")
    if env.device_id != device_id:
        raise CommandError(f"envelope is addressed to {env.device_id!r}, not {device_id!r}")
    if not env.has_json_body:
        raise CommandError(f"content type {env.content_type!r} is not application/json")
    try:
        body = json.loads(env.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise CommandError("body must be a JSON object")
    unknown = sorted(set(body) - _BODY_KEYS)
    missing = sorted(_BODY_KEYS - set(body))
    if unknown or missing:
        raise CommandError(f"body has unknown key(s) {unknown} / missing key(s) {missing}")
    cid = check_correlation_id(body["correlation_id"])
    expires = body["expires_at_ms"]
    if isinstance(expires, bool) or not isinstance(expires, int):
        raise CommandError("expires_at_ms must be an integer")
    if not isinstance(body["args"], dict):
        raise CommandError("args must be a JSON object")
    return ParsedCommand(name=name, correlation_id=cid, expires_at_ms=expires, args=body["args"])


@dataclass(frozen=True, slots=True)
class _Salvaged:
    """What can be read of a malformed command: enough to answer it, or nothing."""

    correlation_id: str
    expires_at_ms: int | None


def _salvage(payload: bytes) -> _Salvaged | None:
    """The correlation id (and expiry, if readable) of a malformed command, or ``None``."""
    body = salvage_json_body(payload)
    if body is None:
        return None
    try:
        cid = check_correlation_id(body.get("correlation_id"))
    except CommandError:
        return None
    expires = body.get("expires_at_ms")
    if isinstance(expires, bool) or not isinstance(expires, int):
        expires = None
    return _Salvaged(cid, expires)


class CommandProcessor:
    """Runs device commands from the link's inbound queue and answers through the outbox.

    Handlers run on the processor's own thread, one command at a time.

    Args:
        state_dir: Folder of ``commands.db``.
        fleet: This device's fleet.
        device_id: This device.
        outbox: Where responses are committed.
        encoding: Envelope encoding of responses.
        ack: Acknowledges a handled MQTT message (:meth:`MqttLink.ack`).
        wake: Called after a response was put into the outbox (``OutboxSender.wake``).
        clock_ms: Wall clock in Unix milliseconds; tests inject their own.
        synchronous: SQLite synchronous mode of ``commands.db`` (match the outbox).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        fleet: str,
        device_id: str,
        outbox: Outbox,
        encoding: Literal["json", "protobuf"] = "json",
        ack: Callable[[InboundMessage], object] | None = None,
        wake: Callable[[], None] | None = None,
        clock_ms: Callable[[], int] | None = None,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.outbox = outbox
        self.encoding: Literal["json", "protobuf"] = encoding
        self.stats = CommandStats()
        self._ack = ack
        self._wake = wake
        self._clock_ms = clock_ms if clock_ms is not None else lambda: int(time.time() * 1000)
        self._handlers: dict[str, CommandHandler] = {}
        self._pending: list[str] = []  # correlation ids whose response the outbox refused
        self._malformed_tokens = _MALFORMED_BURST
        self._malformed_at_ms: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the SQLite connection; never taken in paho callbacks
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / COMMANDS_FILE
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)

    # -- registry -------------------------------------------------------------------------

    def register(self, name: str, handler: CommandHandler) -> None:
        """Add a command.

        Args:
            name: Command name, an id (:mod:`edgefl.proto.ids`).
            handler: Takes ``args``, returns the ``result`` object; raise to answer
                ``ok: false`` with the error text.

        Raises:
            ValueError: The name is invalid or already registered.
        """
        check_id(name, "command name")
        if name in self._handlers:
            raise ValueError(f"command {name!r} is already registered")
        self._handlers[name] = handler

    @property
    def known(self) -> list[str]:
        """Registered command names, sorted."""
        return sorted(self._handlers)

    # -- lifecycle ------------------------------------------------------------------------

    def recover(self) -> int:
        """Put into the outbox every recorded response that is not in it; prune old rows.

        Call once at start-up, before the sender runs. Returns how many were re-enqueued.
        """
        next_seq = self.outbox.stats().next_seq
        with self._lock:
            rows = self._db.execute(
                "SELECT correlation_id, response FROM answered "
                "WHERE outbox_seq IS NULL OR outbox_seq >= ? ORDER BY answered_at_ms",
                (next_seq,),
            ).fetchall()
        for cid, response in rows:
            _log.warning("re-enqueueing the response to command %s (not in the outbox)", cid)
            self._enqueue(str(cid), bytes(response))
        # Pruned only now: a row whose response never reached the outbox is kept however
        # old it is, so a device that was off for days still answers once.
        self.prune()
        return len(rows)

    def start(self, messages: queue.SimpleQueue[InboundMessage]) -> None:
        """Start the processor thread on ``messages`` (the link's inbound queue)."""
        self._thread = threading.Thread(
            target=self._run, args=(messages,), name="command-processor", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after the command it is running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Close ``commands.db``."""
        with self._lock:
            self._db.close()

    def _run(self, messages: queue.SimpleQueue[InboundMessage]) -> None:
        next_prune = time.monotonic() + _PRUNE_EVERY_S
        next_retry = time.monotonic() + _RETRY_PENDING_S
        while not self._stop.is_set():
            try:
                message = messages.get(timeout=0.1)
            except queue.Empty:
                message = None
            try:
                if message is not None:
                    self.handle(message)
                now = time.monotonic()
                if self._pending and now >= next_retry:
                    next_retry = now + _RETRY_PENDING_S
                    self._retry_pending()
                if now >= next_prune:
                    next_prune = now + _PRUNE_EVERY_S
                    self.prune()
            except Exception:  # the processor must outlive any one bad message
                _log.exception("command processing failed")

    # -- one message ----------------------------------------------------------------------

    def handle(self, message: InboundMessage) -> None:
        """Process one inbound message completely (see the module docstring)."""
        self.stats.received += 1
        now_ms = self._clock_ms()
        try:
            command = parse_command(message.topic, message.payload, self.device_id)
        except CommandError as exc:
            self._malformed(message, exc.message, now_ms)
            return
        cid = command.correlation_id
        if self._answered(cid):
            self.stats.duplicate += 1
            _log.info("command %s (correlation %s) was already answered", command.name, cid)
            self._do_ack(message)
            return
        if now_ms > command.expires_at_ms:
            self.stats.expired += 1
            _log.info(
                "ignoring expired command %s (correlation %s) expired %d ms ago",
                command.name,
                cid,
                now_ms - command.expires_at_ms,
            )
            self._do_ack(message)
            return
        response = self._execute(command)
        self._answer(cid, command.name, command.expires_at_ms, response, now_ms, message)

    def _malformed(self, message: InboundMessage, reason: str, now_ms: int) -> None:
        """Answer a malformed command ``ok: false`` if it can be (see the module docstring)."""
        self.stats.malformed += 1
        if not self._take_malformed_token(now_ms):
            self.stats.rate_limited += 1
            self.stats.unanswered += 1
            self._do_ack(message)
            return
        topic = message.topic
        parts = split_topic(topic)
        own = (
            parts is not None
            and (parts.fleet, parts.device_id) == (self.fleet, self.device_id)
            and len(parts.rest) == 2
            and parts.rest[0] == "cmd"
        )
        salvaged = _salvage(message.payload) if own else None
        _log.warning(
            "malformed command on %r (correlation %s): %s",
            topic[:200],
            salvaged.correlation_id if salvaged is not None else None,
            reason,
        )
        if salvaged is None:
            self.stats.unanswered += 1
            self._do_ack(message)
            return
        cid = salvaged.correlation_id
        if salvaged.expires_at_ms is not None and now_ms > salvaged.expires_at_ms:
            _log.info("not answering malformed command %s: it expired", cid)
            self.stats.unanswered += 1
            self._do_ack(message)
            return
        if self._answered(cid):
            self.stats.unanswered += 1
            self._do_ack(message)
            return
        assert parts is not None
        name = parts.rest[1] if is_id(parts.rest[1]) else ""
        error = f"malformed command: {reason}"
        response = {
            "correlation_id": cid,
            "command": name,
            "ok": False,
            "error": error if len(error) <= _ERROR_MAX else error[: _ERROR_MAX - 3] + "...",
        }
        self._answer(cid, name, now_ms + _RETENTION_MS, response, now_ms, message)

    def _take_malformed_token(self, now_ms: int) -> bool:
        """The rate limit of answers to malformed commands (a token bucket)."""
        if self._malformed_at_ms is not None:
            elapsed_s = max(0, now_ms - self._malformed_at_ms) / 1000
            self._malformed_tokens = min(
                _MALFORMED_BURST, self._malformed_tokens + elapsed_s * _MALFORMED_PER_S
            )
        self._malformed_at_ms = now_ms
        if self._malformed_tokens < 1:
            return False
        self._malformed_tokens -= 1
        return True

    def _execute(self, command: ParsedCommand) -> dict[str, Any]:
        base: dict[str, Any] = {"correlation_id": command.correlation_id, "command": command.name}
        handler = self._handlers.get(command.name)
        self.stats.executed += 1
        if handler is None:
            self.stats.unknown += 1
            _log.warning(
                "unknown command %r (correlation %s)", command.name, command.correlation_id
            )
            return {
                **base,
                "ok": False,
                "error": f"unknown command {command.name!r}",
                "known": self.known,
            }
        try:
            result = handler(command.args)
            canonical_json_body(result)  # a result that cannot be sent is a handler error
        except Exception as exc:  # a handler's failure is the command's answer
            self.stats.failed += 1
            _log.warning("command %s (%s) failed: %s", command.name, command.correlation_id, exc)
            return {**base, "ok": False, "error": str(exc) or type(exc).__name__}
        return {**base, "ok": True, "result": result}

    def _answer(
        self,
        cid: str,
        name: str,
        expires_at_ms: int,
        response: dict[str, Any],
        now_ms: int,
        message: InboundMessage,
    ) -> None:
        body = canonical_json_body(response)
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO answered (correlation_id, name, expires_at_ms, answered_at_ms, "
                "response, outbox_seq) VALUES (?, ?, ?, ?, ?, NULL)",
                (cid, name, expires_at_ms, now_ms, body),
            )
        self.stats.answered += 1
        self._do_ack(message)
        self._enqueue(cid, body)

    def _enqueue(self, cid: str, body: bytes) -> None:
        ts_ms = self._clock_ms()

        def encode(seq: int) -> bytes:
            # Runs inside the outbox transaction, before it commits (see module docstring).
            with self._lock:
                self._db.execute(
                    "UPDATE answered SET outbox_seq = ? WHERE correlation_id = ?", (seq, cid)
                )
            env = Envelope(
                version=ENVELOPE_VERSION,
                device_id=self.device_id,
                incarnation=self.outbox.incarnation,
                seq=seq,
                ts_ms=ts_ms,
                kind="response",
                content_type=JSON_CONTENT_TYPE,
                body=body,
            )
            return encode_envelope(env, self.encoding)

        try:
            self.outbox.put(
                response_topic(self.fleet, self.device_id, cid),
                encode,
                priority=_RESPONSE_PRIORITY,
                kind="response",
            )
        except RecordTooLargeError as exc:
            # Retrying cannot help, and the broker refuses it: answer with the reason instead.
            _log.warning("the response to %s is too large to send: %s", cid, exc)
            small = canonical_json_body(
                {
                    "correlation_id": cid,
                    "ok": False,
                    "error": f"response too large to send ({exc.size} bytes, "
                    f"limit {exc.limit}); ask for less",
                }
            )
            with self._lock:
                self._db.execute(
                    "UPDATE answered SET response = ?, outbox_seq = NULL WHERE correlation_id = ?",
                    (small, cid),
                )
            self._enqueue(cid, small)
            return
        except OutboxFullError as exc:
            with self._lock:
                self._db.execute(
                    "UPDATE answered SET outbox_seq = NULL WHERE correlation_id = ?", (cid,)
                )
            self.stats.response_retries += 1
            _log.warning("outbox refused the response to %s; will retry: %s", cid, exc)
            if cid not in self._pending:
                self._pending.append(cid)
            return
        if self._wake is not None:
            self._wake()

    def _retry_pending(self) -> None:
        waiting, self._pending = self._pending, []
        for cid in waiting:
            with self._lock:
                row = self._db.execute(
                    "SELECT response FROM answered WHERE correlation_id = ? AND outbox_seq IS NULL",
                    (cid,),
                ).fetchone()
            if row is not None:
                self._enqueue(cid, bytes(row[0]))

    def _do_ack(self, message: InboundMessage) -> None:
        if self._ack is not None:
            self._ack(message)

    def _answered(self, cid: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM answered WHERE correlation_id = ?", (cid,)
            ).fetchone()
        return row is not None

    def prune(self) -> int:
        """Forget correlation ids whose command expired more than a day ago.

        Rows whose response is not yet in the outbox are kept. Returns how many went.
        """
        cutoff = self._clock_ms() - _RETENTION_MS
        with self._lock, self._transaction():
            cursor = self._db.execute(
                "DELETE FROM answered WHERE expires_at_ms < ? AND outbox_seq IS NOT NULL",
                (cutoff,),
            )
        return int(cursor.rowcount)

    def response_for(self, correlation_id: str) -> dict[str, Any] | None:
        """The recorded response to a correlation id, or ``None`` if it was not answered."""
        with self._lock:
            row = self._db.execute(
                "SELECT response FROM answered WHERE correlation_id = ?", (correlation_id,)
            ).fetchone()
        if row is None:
            return None
        value: dict[str, Any] = json.loads(bytes(row[0]))
        return value

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def ping_handler(args: dict[str, Any]) -> dict[str, Any]:
    """``ping``: echo the arguments."""
    return dict(args)


def status_handler(status: Callable[[], dict[str, Any]]) -> CommandHandler:
    """``status``: the agent's status document (takes no arguments)."""

    def handler(args: dict[str, Any]) -> dict[str, Any]:
        return status()

    return handler


def prewarm_handler(prewarm: Callable[[], dict[str, Any]]) -> CommandHandler:
    """``prewarm-training``: start the ClientApp's warm zygote now (takes no arguments)."""

    def handler(args: dict[str, Any]) -> dict[str, Any]:
        if args:
            raise CommandError(f"unknown argument(s) {sorted(args)}; prewarm-training takes none")
        return prewarm()

    return handler


def set_rate_handler(
    set_rate: Callable[[str | None, float], tuple[str, float]],
) -> CommandHandler:
    """``set-rate``: change a replay source's rate.

    Args:
        set_rate: Sets ``(source name or None for the only source, rate_hz)`` and returns
            ``(source name, previous rate_hz)``; raises ``ValueError`` if either is invalid.

    Returns:
        A handler taking ``{"rate_hz": number, "source": name?}``.
    """

    def handler(args: dict[str, Any]) -> dict[str, Any]:
        extra = sorted(set(args) - {"rate_hz", "source"})
        if extra:
            raise CommandError(f"unknown argument(s) {extra}; set-rate takes rate_hz, source")
        rate = args.get("rate_hz")
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise CommandError("rate_hz must be a number")
        if not math.isfinite(rate):
            raise CommandError("rate_hz must be finite")
        source = args.get("source")
        if source is not None and not isinstance(source, str):
            raise CommandError("source must be a string")
        name, previous = set_rate(source, float(rate))
        return {"source": name, "rate_hz": float(rate), "previous_rate_hz": previous}

    return handler
