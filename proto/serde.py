"""The MQTT payload envelope and its two encodings (the only code that touches its protobuf).

Everything else in edgefl works on :class:`Envelope`, a frozen dataclass of plain Python
values (the inference contract's tensors have their own module, :mod:`edgefl.proto.tensors`).
Two wire encodings exist (see ``proto/envelope.proto``):

* ``"protobuf"``: the binary ``edgefl.v1.Envelope`` message (compact);
* ``"json"``: one UTF-8 JSON object that ``mosquitto_sub`` shows as text::

      {"v":2,"device_id":"pi-01","incarnation":"9f0c...","seq":7,"ts_ms":1700000000000,
       "kind":"telemetry","content_type":"application/json","body":{"temp":21.5}}

  ``body`` is the JSON value itself when ``content_type`` is ``application/json`` and a
  base64 string otherwise. The version is the key ``v`` here (the protobuf field is
  ``version``); every key is required except ``incarnation``, which version 1 omits.

Two envelope versions exist and both are read. Version 2 (:data:`ENVELOPE_VERSION`, what
devices write) carries the *incarnation* of the sending outbox: 128 random bits created
with the outbox file. ``(device_id, incarnation, seq)`` is the idempotency key, so a
deleted or reflashed outbox, whose seqs start again at 1, never collides with what was
already stored. Version 1 is version 2 without the incarnation (it is the empty string),
sent by agents not yet upgraded.

:func:`decode_envelope` tells the encodings apart by the first non-whitespace byte (``{``
means JSON; a protobuf envelope starts with the tag of field 1, ``0x08``) and validates
every field. Whatever is wrong with a payload, including what the parsers themselves
raise (Python's int-digit limit, deep nesting, lone surrogates in strings), comes out as
:class:`EnvelopeError` with the reason and nothing else: one bad payload must never stop
a consumer.

A JSON body is stored in its compact form (``json.dumps`` with ``separators=(",", ":")``),
so bodies produced by :func:`canonical_json_body` survive both encodings byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal

from google.protobuf.message import DecodeError

from edgefl.errors import BadInputError
from edgefl.proto import envelope_pb2
from edgefl.proto.ids import ID_PATTERN, is_id

__all__ = [
    "ENVELOPE_VERSION",
    "ENVELOPE_VERSIONS",
    "JSON_CONTENT_TYPE",
    "MAX_ENVELOPE_BYTES",
    "Envelope",
    "EnvelopeError",
    "canonical_json_body",
    "decode_envelope",
    "encode_envelope",
    "new_incarnation",
    "salvage_json_body",
]

ENVELOPE_VERSION: Final = 2
"""The envelope version devices write: version 2, with the outbox incarnation."""

ENVELOPE_VERSIONS: Final = (1, 2)
"""The envelope versions :func:`decode_envelope` accepts."""

JSON_CONTENT_TYPE: Final = "application/json"
"""Content type whose body travels inline (not base64) in the JSON encoding."""

MAX_ENVELOPE_BYTES: Final = 256 * 1024
"""Largest encoded envelope (MQTT payload) the fleet carries: part of the wire contract.

The shipped broker's ``message_size_limit`` and the ingest's default ``max_payload_bytes``
are this number. A device must never publish more: mosquitto 2.0 answers a larger QoS 1
PUBLISH with PUBACK reason 0x95, which paho 2.2 cannot parse, so the client drops the
connection and sends the message again on every reconnect. The device's outbox refuses
such a record when it is put (``edgefl.edge_agent.outbox.RecordTooLargeError``)."""

_INCARNATION = re.compile(r"[0-9a-f]{32}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Lone (unpaired) surrogates: valid in a Python str, but not encodable as UTF-8, so a
# database driver refuses them at the insert, long after the message was accepted.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_UINT64_MAX: Final = 2**64 - 1
_INT64_MAX: Final = 2**63 - 1
_KIND_MAX: Final = 64
_CONTENT_TYPE_MAX: Final = 255
_JSON_KEYS: Final = ("v", "device_id", "seq", "ts_ms", "kind", "content_type", "body")
_JSON_KEYS_V2: Final = (
    "v",
    "device_id",
    "incarnation",
    "seq",
    "ts_ms",
    "kind",
    "content_type",
    "body",
)
# JSON integers longer than this are refused before int() sees them: no field needs more
# than 20 digits, and Python refuses more than 4300 with a plain ValueError (and spends
# quadratic time below that). Bodies may hold long integers, but not absurd ones.
_JSON_INT_DIGITS_MAX: Final = 1000
_WHITESPACE: Final = b" \t\r\n"


class EnvelopeError(BadInputError):
    """A payload is not a valid envelope (or an envelope cannot be encoded)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One MQTT payload: who sent it, its idempotency key, and an opaque body.

    Instances are validated on construction, so an invalid envelope cannot exist.

    Attributes:
        version: Envelope schema version, one of :data:`ENVELOPE_VERSIONS`.
        device_id: Sender, an id (:mod:`edgefl.proto.ids`); equals the topic's ``{device}``.
        seq: Sequence number within the incarnation, ``1 <= seq < 2**64``;
            ``(device_id, incarnation, seq)`` is the idempotency key.
        ts_ms: Creation time on the device, Unix milliseconds, ``0 < ts_ms < 2**63``.
        kind: What the body is (``telemetry``, ``data``, ``result``, ...), 1-64
            characters without control characters.
        content_type: MIME type of ``body`` (may be empty), at most 255 characters.
        body: The payload bytes.
        incarnation: Version 2: the sending outbox's identity, 32 lowercase hex digits
            (:func:`new_incarnation`). Version 1: the empty string.

    Raises:
        EnvelopeError: A field is out of range or of the wrong type.
    """

    version: int
    device_id: str
    seq: int
    ts_ms: int
    kind: str
    content_type: str
    body: bytes
    incarnation: str = ""

    def __post_init__(self) -> None:
        _check_int("version", self.version)
        if self.version not in ENVELOPE_VERSIONS:
            raise EnvelopeError(
                f"unsupported envelope version {self.version} (this build reads versions "
                f"{', '.join(map(str, ENVELOPE_VERSIONS))})"
            )
        if not isinstance(self.incarnation, str):
            raise EnvelopeError(
                f"incarnation must be a string, got {type(self.incarnation).__name__}"
            )
        if self.version == 1 and self.incarnation:
            raise EnvelopeError("a version-1 envelope has no incarnation (use version 2)")
        if self.version >= 2 and not _INCARNATION.fullmatch(self.incarnation):
            raise EnvelopeError(
                f"incarnation {self.incarnation[:40]!r} is not 32 lowercase hex digits"
            )
        if not is_id(self.device_id):
            raise EnvelopeError(f"device_id {self.device_id!r} does not match {ID_PATTERN}")
        _check_int("seq", self.seq)
        if not 1 <= self.seq <= _UINT64_MAX:
            raise EnvelopeError(f"seq {self.seq} is out of range (1 .. 2**64-1)")
        _check_int("ts_ms", self.ts_ms)
        if not 0 < self.ts_ms <= _INT64_MAX:
            raise EnvelopeError(f"ts_ms {self.ts_ms} is out of range (1 .. 2**63-1)")
        _check_text("kind", self.kind, 1, _KIND_MAX)
        _check_text("content_type", self.content_type, 0, _CONTENT_TYPE_MAX)
        if not isinstance(self.body, bytes):
            raise EnvelopeError(f"body must be bytes, got {type(self.body).__name__}")

    @property
    def key(self) -> tuple[str, str, int]:
        """The idempotency key ``(device_id, incarnation, seq)``."""
        return (self.device_id, self.incarnation, self.seq)

    @property
    def has_json_body(self) -> bool:
        """Whether ``content_type`` says the body is JSON (parameters are ignored)."""
        return _is_json_type(self.content_type)


def new_incarnation() -> str:
    """A fresh outbox incarnation: 128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def canonical_json_body(value: Any) -> bytes:
    """Serialize a JSON value the way a JSON-encoded envelope's body is stored.

    Args:
        value: Any JSON-compatible value (no NaN or infinities).

    Returns:
        Compact UTF-8 JSON bytes.

    Raises:
        EnvelopeError: The value is not JSON-serializable.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise EnvelopeError(f"body is not serializable as JSON: {exc}") from exc


def encode_envelope(env: Envelope, encoding: Literal["json", "protobuf"]) -> bytes:
    """Encode an envelope for the wire.

    Args:
        env: The envelope.
        encoding: ``"protobuf"`` for the binary message, ``"json"`` for readable text.

    Returns:
        The payload bytes.

    Raises:
        EnvelopeError: ``encoding`` is unknown, or it is ``"json"`` and the content type
            is ``application/json`` but the body is not valid UTF-8 JSON.
    """
    if encoding == "protobuf":
        message = envelope_pb2.Envelope(
            version=env.version,
            device_id=env.device_id,
            seq=env.seq,
            ts_ms=env.ts_ms,
            kind=env.kind,
            content_type=env.content_type,
            body=env.body,
            incarnation=env.incarnation,
        )
        return message.SerializeToString(deterministic=True)
    if encoding == "json":
        body: Any
        if env.has_json_body:
            try:
                body = _strict_json_loads(env.body)
            except EnvelopeError as exc:
                raise EnvelopeError(
                    f"content type {env.content_type!r} but the body is not JSON: {exc.message}"
                ) from exc
        else:
            body = base64.b64encode(env.body).decode("ascii")
        document: dict[str, Any] = {"v": env.version, "device_id": env.device_id}
        if env.version >= 2:
            document["incarnation"] = env.incarnation
        document |= {
            "seq": env.seq,
            "ts_ms": env.ts_ms,
            "kind": env.kind,
            "content_type": env.content_type,
            "body": body,
        }
        return canonical_json_body(document)
    raise EnvelopeError(f"unknown envelope encoding {encoding!r} (use 'json' or 'protobuf')")


def decode_envelope(payload: bytes) -> Envelope:
    """Decode and validate a payload in either encoding.

    Args:
        payload: The MQTT payload.

    Returns:
        The validated envelope.

    Raises:
        EnvelopeError: The payload is empty, not parsable, has unknown or missing fields,
            trailing garbage, wrong types or out-of-range values. It is the only
            exception: whatever else a parser raises is turned into it.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise EnvelopeError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if not payload.strip(_WHITESPACE):
        raise EnvelopeError("empty payload")
    try:
        if payload.lstrip(_WHITESPACE)[:1] == b"{":
            return _from_json(payload)
        return _from_protobuf(payload)
    except EnvelopeError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        # A parser failure nobody foresaw is still one bad payload, not a crash: the
        # caller dead-letters it with this reason.
        raise EnvelopeError(f"undecodable payload: {type(exc).__name__}: {exc}"[:500]) from exc


def salvage_json_body(payload: bytes) -> dict[str, Any] | None:
    """The JSON object body of a payload that may not be a valid envelope, if readable.

    For a consumer that answers even a malformed message (a command whose correlation id
    can still be read, see ``edgefl.edge_agent.commands``): the payload is parsed as
    :func:`decode_envelope` parses it (the same limits on size, depth and integers) but
    the envelope's own fields are not checked. A JSON envelope's ``body`` must be an
    object inline; a protobuf envelope's ``body`` must be UTF-8 JSON of an object.

    Returns:
        The body object, or ``None`` when there is none to read. Never raises.
    """
    try:
        payload = bytes(payload)
        if payload.lstrip(_WHITESPACE)[:1] == b"{":
            document = _strict_json_loads(payload)
            body = document.get("body") if isinstance(document, dict) else None
        else:
            message = envelope_pb2.Envelope()
            message.ParseFromString(payload)
            body = _strict_json_loads(message.body) if message.body else None
    except (EnvelopeError, DecodeError, ValueError, TypeError, OverflowError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _from_protobuf(payload: bytes) -> Envelope:
    message = envelope_pb2.Envelope()
    try:
        consumed = message.ParseFromString(payload)
    except DecodeError as exc:
        raise EnvelopeError(f"not a protobuf envelope: {exc}") from exc
    if consumed is not None and consumed != len(payload):
        raise EnvelopeError(f"protobuf envelope has {len(payload) - consumed} trailing bytes")
    envelope = Envelope(
        version=message.version,
        device_id=message.device_id,
        seq=message.seq,
        ts_ms=message.ts_ms,
        kind=message.kind,
        content_type=message.content_type,
        body=message.body,
        incarnation=message.incarnation,
    )
    # Protobuf parsing is lenient: unknown fields are kept, a repeated field silently
    # overrides the first, so appended garbage that happens to parse would pass. An
    # envelope is exactly its known fields, each once, in canonical form.
    if len(payload) != len(encode_envelope(envelope, "protobuf")):
        raise EnvelopeError(
            "protobuf envelope has unknown, repeated or non-canonically encoded fields "
            "(trailing garbage or a newer schema)"
        )
    return envelope


def _from_json(payload: bytes) -> Envelope:
    document = _strict_json_loads(payload)
    if not isinstance(document, dict):
        raise EnvelopeError("JSON envelope must be an object")
    # The version says which keys belong: a version-1 envelope has no incarnation.
    keys = _JSON_KEYS_V2 if document.get("v") == 2 else _JSON_KEYS
    unknown = sorted(set(document) - set(keys))
    if unknown:
        hint = ""
        if "version" in unknown and "v" not in document:
            hint = " (the version key is 'v'; 'version' is the protobuf field's name)"
        raise EnvelopeError(f"JSON envelope has unknown key(s) {unknown}{hint}")
    missing = [key for key in keys if key not in document]
    if missing:
        raise EnvelopeError(f"JSON envelope is missing key(s) {missing}")
    for key in ("v", "seq", "ts_ms"):
        _check_int(key, document[key])
    for key in ("device_id", "kind", "content_type", "incarnation"):
        if key not in document:
            continue
        if not isinstance(document[key], str):
            raise EnvelopeError(
                f"JSON envelope key {key!r} must be a string, got {_json_type(document[key])}"
            )
    content_type: str = document["content_type"]
    raw_body = document["body"]
    if _is_json_type(content_type):
        body = canonical_json_body(raw_body)
    elif isinstance(raw_body, str):
        try:
            body = base64.b64decode(raw_body.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error) as exc:
            raise EnvelopeError(
                f"JSON envelope body must be base64 for content type {content_type!r}: {exc}"
            ) from exc
    else:
        raise EnvelopeError(
            f"JSON envelope body must be a base64 string for content type {content_type!r}, "
            f"got {_json_type(raw_body)}"
        )
    return Envelope(
        version=document["v"],
        device_id=document["device_id"],
        seq=document["seq"],
        ts_ms=document["ts_ms"],
        kind=document["kind"],
        content_type=content_type,
        body=body,
        incarnation=document.get("incarnation", ""),
    )


def _strict_json_loads(data: bytes) -> Any:
    """Parse UTF-8 JSON, refusing NaN/Infinity and duplicate object keys."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise EnvelopeError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:
        raise EnvelopeError("invalid JSON: nested too deeply") from exc


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > _JSON_INT_DIGITS_MAX:
        raise EnvelopeError(
            f"invalid JSON: an integer has {digits} digits (at most {_JSON_INT_DIGITS_MAX})"
        )
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise EnvelopeError(f"invalid JSON: {name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise EnvelopeError(f"invalid JSON: duplicate key {key!r}")
        result[key] = value
    return result


def _check_int(name: str, value: object) -> None:
    # bool is an int subclass; true/false are not numbers on the wire.
    if isinstance(value, bool) or not isinstance(value, int):
        raise EnvelopeError(f"{name} must be an integer, got {_json_type(value)}")


def _check_text(name: str, value: object, min_len: int, max_len: int) -> None:
    if not isinstance(value, str):
        raise EnvelopeError(f"{name} must be a string, got {type(value).__name__}")
    if not min_len <= len(value) <= max_len:
        raise EnvelopeError(f"{name} must have {min_len}..{max_len} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise EnvelopeError(f"{name} {value!r} contains control characters")
    if _SURROGATE.search(value):
        raise EnvelopeError(f"{name} {value!r} contains a lone surrogate (not UTF-8)")


def _is_json_type(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == JSON_CONTENT_TYPE


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return names.get(type(value), type(value).__name__)
