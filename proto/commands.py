"""The command wire format: topics, ids and building a command message.

The server (certificate renewal, the admin CLI) builds commands and the device agent
(:mod:`edgefl.edge_agent.commands`) parses and answers them, so the format is a contract
between the two and lives here, below both. See ``docs/fleet-contract.md``.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any, Final, Literal

from edgefl.errors import BadInputError
from edgefl.proto.serde import (
    JSON_CONTENT_TYPE,
    Envelope,
    EnvelopeError,
    canonical_json_body,
    encode_envelope,
)

__all__ = [
    "CommandError",
    "command_filter",
    "command_topic",
    "make_command",
    "response_topic",
]

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CORRELATION_MAX: Final = 128


class CommandError(BadInputError):
    """A command message is malformed, or a command's arguments are invalid."""


def command_topic(fleet: str, device_id: str, name: str) -> str:
    """``edgefl/{fleet}/{device}/cmd/{name}``."""
    return f"edgefl/{fleet}/{device_id}/cmd/{name}"


def command_filter(fleet: str, device_id: str) -> str:
    """The subscription that receives every command of a device: ``.../cmd/+``."""
    return f"edgefl/{fleet}/{device_id}/cmd/+"


def response_topic(fleet: str, device_id: str, correlation_id: str) -> str:
    """``edgefl/{fleet}/{device}/cmd-resp/{correlation_id}``."""
    return f"edgefl/{fleet}/{device_id}/cmd-resp/{correlation_id}"


def _check_correlation_id(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _CORRELATION_MAX:
        raise CommandError(f"correlation_id must be a string of 1..{_CORRELATION_MAX} characters")
    # It becomes a topic level: no wildcards, separators or control characters.
    if any(c in value for c in "+#/") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise CommandError(f"correlation_id {value!r} contains '+', '#', '/' or control characters")
    return value


def make_command(
    fleet: str,
    device: str,
    name: str,
    args: dict[str, Any],
    ttl_s: float,
    correlation_id: str | None = None,
    *,
    encoding: Literal["json", "protobuf"] = "json",
    now_ms: int | None = None,
) -> tuple[str, bytes]:
    """Build a command for a device (server side, admin CLI, tests).

    The envelope's ``device_id`` is the *target* device (the topic's ``{device}``), and its
    ``seq`` is the current time in microseconds: commands are deduplicated by correlation
    id, never by ``(device_id, seq)``, so ``seq`` only has to be a valid positive number.

    Args:
        fleet: Fleet of the device.
        device: Target device id.
        name: Command name, ``[A-Za-z0-9_-]{1,64}``.
        args: JSON object of arguments.
        ttl_s: Seconds from now until the command expires.
        correlation_id: Id of this request; a random one when ``None``. Reuse it only to
            resend the same request: the device answers each id once.
        encoding: Envelope encoding.
        now_ms: Current Unix time in milliseconds; the wall clock when ``None``.

    Returns:
        ``(topic, payload)`` to publish with QoS 1.

    Raises:
        CommandError: A name, id or argument is invalid.
    """
    for label, value in (("fleet", fleet), ("device", device), ("name", name)):
        if not _ID.fullmatch(value):
            raise CommandError(f"{label} {value!r} does not match [A-Za-z0-9_-]{{1,64}}")
    if not isinstance(args, dict):
        raise CommandError("args must be a JSON object")
    if not math.isfinite(ttl_s):
        raise CommandError("ttl_s must be finite")
    cid = _check_correlation_id(correlation_id if correlation_id is not None else uuid.uuid4().hex)
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    body = {"correlation_id": cid, "expires_at_ms": now + int(ttl_s * 1000), "args": args}
    try:
        env = Envelope(
            version=1,
            device_id=device,
            seq=max(1, time.time_ns() // 1000),
            ts_ms=now,
            kind="command",
            content_type=JSON_CONTENT_TYPE,
            body=canonical_json_body(body),
        )
        payload = encode_envelope(env, encoding)
    except EnvelopeError as exc:
        raise CommandError(f"cannot encode command {name!r}: {exc.message}") from exc
    return command_topic(fleet, device, name), payload
