"""The fleet contract's one id syntax: fleets, device ids, command names, stream names.

Every name that becomes an MQTT topic level (``edgefl/{fleet}/{device}/...``), a
certificate CN or an MQTT username is 1 to 64 characters from ``A-Z``, ``a-z``, ``0-9``,
``_`` and ``-`` (see ``docs/fleet-contract.md``). Such a name can never add a topic level
(``/``), a wildcard (``+``, ``#``), a space or a newline (an ACL line of its own) to
whatever it is written into.

This module is the only place that spells the syntax out; pydantic fields use
:data:`ID_REGEX` (``Field(pattern=ID_REGEX)``), code checks with :func:`is_id` or
:func:`check_id`. It imports the standard library only, so the base install (no protobuf)
can use it.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "ID_CHARS",
    "ID_MAX_LEN",
    "ID_PATTERN",
    "ID_RE",
    "ID_REGEX",
    "ID_SYNTAX",
    "InvalidIdError",
    "check_id",
    "is_id",
]

ID_CHARS: Final = "[A-Za-z0-9_-]"
"""One character of an id (a regex character class)."""

ID_MAX_LEN: Final = 64
"""Longest id: a topic level, a certificate CN and an MQTT username all hold it."""

ID_PATTERN: Final = f"{ID_CHARS}{{1,{ID_MAX_LEN}}}"
"""An id, unanchored (:data:`ID_CHARS` 1 to 64 times): for building larger patterns."""

ID_REGEX: Final = f"^{ID_PATTERN}$"
"""An id, anchored: the ``pattern`` of a pydantic field."""

ID_RE: Final = re.compile(ID_PATTERN)
""":data:`ID_PATTERN` compiled; use ``ID_RE.fullmatch``."""

ID_SYNTAX: Final = f"1 to {ID_MAX_LEN} characters from A-Z, a-z, 0-9, '_' and '-'"
"""The syntax in words, for error messages and hints."""


class InvalidIdError(ValueError):
    """A fleet, device id or other name is not an id of the fleet contract."""


def is_id(value: object) -> bool:
    """Whether ``value`` is a string in the id syntax."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is an id.

    Args:
        value: The name to check.
        what: What it names (``"fleet"``, ``"device id"``, ...), for the message.

    Returns:
        ``value``, unchanged.

    Raises:
        InvalidIdError: It is not a string of :data:`ID_SYNTAX`.
    """
    if not is_id(value):
        raise InvalidIdError(f"{what} {value!r} does not match {ID_PATTERN} ({ID_SYNTAX})")
    assert isinstance(value, str)
    return value
