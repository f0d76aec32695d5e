"""The fleet contract's MQTT topics: the one place that builds and splits them.

Every topic lives under ``edgefl/{fleet}/{device}/`` (see ``docs/fleet-contract.md``)::

    edgefl/{fleet}/{device}/telemetry/{stream}        device -> cloud   record
    edgefl/{fleet}/{device}/data/{stream}             device -> cloud   record
    edgefl/{fleet}/{device}/result/{stream}           device -> cloud   record
    edgefl/{fleet}/{device}/status                    device -> cloud   retained, last will
    edgefl/{fleet}/{device}/cmd/{name}                cloud -> device   command
    edgefl/{fleet}/{device}/cmd-resp/{correlation_id} device -> cloud   response
    edgefl/{fleet}/{device}/state/reported            device -> cloud   retained
    edgefl/{fleet}/{device}/state/desired             cloud -> device   retained
    edgefl/{fleet}/{device}/cert/request              device -> cloud   renewal request

``{fleet}``, ``{device}``, ``{stream}`` and ``{name}`` are ids (:mod:`edgefl.proto.ids`).
The builders do not check their arguments (some run per message, and a subscription
filter passes ``"+"`` for a level): callers pass validated ids, or :data:`ANY` in a
filter. :func:`split_topic` checks what it reads. The standard library only, like
:mod:`edgefl.proto.ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from edgefl.proto.ids import is_id

__all__ = [
    "ANY",
    "RECORD_KINDS",
    "ROOT",
    "TopicParts",
    "cert_request_filter",
    "cert_request_topic",
    "command_filter",
    "command_topic",
    "device_prefix",
    "record_topic",
    "response_topic",
    "split_topic",
    "state_desired_topic",
    "state_reported_topic",
    "status_topic",
]

ROOT: Final = "edgefl"
"""The first level of every fleet topic."""

ANY: Final = "+"
"""The single-level wildcard, for a fleet or device level in a subscription filter."""

RECORD_KINDS: Final = frozenset({"telemetry", "data", "result"})
"""The record streams: ``edgefl/{fleet}/{device}/{kind}/{stream}``, envelopes of that kind."""


def device_prefix(fleet: str, device_id: str) -> str:
    """``edgefl/{fleet}/{device}``: the subtree of one device (no trailing slash)."""
    return f"{ROOT}/{fleet}/{device_id}"


def record_topic(fleet: str, device_id: str, kind: str, stream: str) -> str:
    """``edgefl/{fleet}/{device}/{kind}/{stream}``, ``kind`` one of :data:`RECORD_KINDS`."""
    return f"{ROOT}/{fleet}/{device_id}/{kind}/{stream}"


def status_topic(fleet: str, device_id: str) -> str:
    """``edgefl/{fleet}/{device}/status``: retained ``online`` / ``offline`` (last will)."""
    return f"{ROOT}/{fleet}/{device_id}/status"


def command_topic(fleet: str, device_id: str, name: str) -> str:
    """``edgefl/{fleet}/{device}/cmd/{name}``."""
    return f"{ROOT}/{fleet}/{device_id}/cmd/{name}"


def command_filter(fleet: str, device_id: str) -> str:
    """The subscription that receives every command of a device: ``.../cmd/+``."""
    return f"{ROOT}/{fleet}/{device_id}/cmd/+"


def response_topic(fleet: str, device_id: str, correlation_id: str) -> str:
    """``edgefl/{fleet}/{device}/cmd-resp/{correlation_id}``."""
    return f"{ROOT}/{fleet}/{device_id}/cmd-resp/{correlation_id}"


def state_reported_topic(fleet: str, device_id: str) -> str:
    """``edgefl/{fleet}/{device}/state/reported``."""
    return f"{ROOT}/{fleet}/{device_id}/state/reported"


def state_desired_topic(fleet: str, device_id: str) -> str:
    """``edgefl/{fleet}/{device}/state/desired``."""
    return f"{ROOT}/{fleet}/{device_id}/state/desired"


def cert_request_topic(fleet: str, device_id: str) -> str:
    """``edgefl/{fleet}/{device}/cert/request``: where a device asks for a renewed cert."""
    return f"{ROOT}/{fleet}/{device_id}/cert/request"


def cert_request_filter(fleet: str = ANY) -> str:
    """The certificate service's subscription: ``edgefl/{fleet}/+/cert/request``."""
    return cert_request_topic(fleet, ANY)


@dataclass(frozen=True, slots=True)
class TopicParts:
    """A fleet topic split by :func:`split_topic`.

    Attributes:
        fleet: The ``{fleet}`` level (an id).
        device_id: The ``{device}`` level (an id).
        rest: The levels below the device, at least one (they may be empty strings).
    """

    fleet: str
    device_id: str
    rest: tuple[str, ...]


def split_topic(topic: str) -> TopicParts | None:
    """Split ``edgefl/{fleet}/{device}/...``.

    Returns:
        The parts, or ``None`` if the topic is not under ``edgefl/``, has no level below
        the device, or its fleet or device level is not an id.
    """
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT or not is_id(parts[1]) or not is_id(parts[2]):
        return None
    return TopicParts(parts[1], parts[2], tuple(parts[3:]))
