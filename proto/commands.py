"""The command wire format: correlation ids and building a command message.

The server (certificate renewal, the admin CLI) builds commands and the device agent
(:mod:`edgefl.edge_agent.commands`) parses and answers them, so the format is a contract
between the two and lives here, below both. See ``docs/fleet-contract.md``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Final, Literal

from edgefl.errors import BadInputError
from edgefl.proto.ids import ID_PATTERN, is_id
from edgefl.proto.serde import (
    JSON_CONTENT_TYPE,
    Envelope,
    EnvelopeError,
    canonical_json_body,
    encode_envelope,
)
from edgefl.proto.topics import command_filter, command_topic, response_topic

__all__ = [
    "CORRELATION_ID_MAX_LEN",
    "PREWARM_TRAINING_COMMAND",
    "CommandError",
    "check_correlation_id",
    "command_filter",
    "command_topic",
    "make_command",
    "response_topic",
]

CORRELATION_ID_MAX_LEN: Final = 128
"""Longest correlation id (it is a topic level of the response)."""

PREWARM_TRAINING_COMMAND: Final = "prewarm-training"
"""``server train`` sends it to the admitted online devices before it submits a run: the
agent starts its ClientApp's warm zygote then, so the imports overlap the run's start.
No arguments; the answer is ``{"prewarmed": bool}`` with a ``reason`` when false."""


class CommandError(BadInputError):
    """A command message is malformed, or a command's arguments are invalid."""


def check_correlation_id(value: object) -> str:
    """Return ``value`` if it is a usable correlation id.

    It becomes the last level of the response topic, so it is 1 to 128 characters with no
    ``+``, ``#``, ``/`` or control character.

    Raises:
        CommandError: It is not.
    """
    if not isinstance(value, str) or not 1 <= len(value) <= CORRELATION_ID_MAX_LEN:
        raise CommandError(
            f"correlation_id must be a string of 1..{CORRELATION_ID_MAX_LEN} characters"
        )
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
        name: Command name, an id (:mod:`edgefl.proto.ids`).
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
        if not is_id(value):
            raise CommandError(f"{label} {value!r} does not match {ID_PATTERN}")
    if not isinstance(args, dict):
        raise CommandError("args must be a JSON object")
    if not math.isfinite(ttl_s):
        raise CommandError("ttl_s must be finite")
    cid = check_correlation_id(correlation_id if correlation_id is not None else uuid.uuid4().hex)
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
