"""Options of a staged rollout: the defaults, duration and share parsing, and their checks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from edgefl.errors import BadInputError
from edgefl.proto.ids import InvalidIdError, check_id
from edgefl.server.rollout import (
    DEFAULT_EXPIRES_DAYS,
)

__all__ = [
    "DEFAULT_CANARY",
    "DEFAULT_INSTALL_TIMEOUT_S",
    "DEFAULT_MAX_FAILURES",
    "DEFAULT_MIN_EVALUATED",
    "DEFAULT_SOAK_S",
    "HEARTBEAT_S",
    "INFERENCE_STREAM",
    "RETRIED_REASONS",
    "STALE_AFTER_S",
    "RolloutOptions",
    "parse_duration",
    "parse_share",
]

DEFAULT_CANARY: Final = 0.10
DEFAULT_SOAK_S: Final = 30.0
"""Short enough for a demo; set it to at least the devices' ``models.health_window_s``."""
DEFAULT_MAX_FAILURES: Final = 0.05
DEFAULT_MIN_EVALUATED: Final = 50
DEFAULT_INSTALL_TIMEOUT_S: Final = 120.0
INFERENCE_STREAM: Final = "inference"
"""The agent's inference loop reports on ``edgefl/{fleet}/{device}/telemetry/inference``
(``edgefl.edge_agent.inference.TELEMETRY_STREAM``; the server does not import the agent)."""
RETRIED_REASONS: Final = frozenset({"download_failed"})
"""Failure reasons a device retries by itself: not a verdict on the release."""
HEARTBEAT_S: Final = 5.0
STALE_AFTER_S: Final = 60.0
"""A ``running`` rollout without a heartbeat for this long no longer holds its devices
(its controller was killed)."""


# --- options ---------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h)?\s*$")
_UNITS: Final = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str, option: str) -> float:
    """Seconds from ``30``, ``30s``, ``2m``, ``1.5min``, ``500ms`` or ``1h``.

    Raises:
        BadInputError: Not a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise BadInputError(
            f"{option} {text!r} is not a duration",
            hint="write seconds or minutes, e.g. 30s, 90, 2m",
        )
    return float(match[1]) * _UNITS[match[2]]


def parse_share(text: str, option: str) -> float:
    """A share in [0, 1] from ``10%`` or ``0.1``.

    Raises:
        BadInputError: Not a number, a percentage above 100, or a bare number above 1.
    """
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        value = math.nan
    if percent:
        value /= 100.0
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise BadInputError(
            f"{option} {text!r} is not a share between 0 and 1",
            hint="write a percentage (10%) or a fraction (0.1)",
        )
    return value


@dataclass(frozen=True)
class RolloutOptions:
    """What to roll out, where, and the thresholds.

    Attributes:
        model: The released model.
        version: The release version.
        variant: Its variant (may be left out when the release has only one).
        fleet: Only admitted devices of this fleet (``None``: every fleet).
        devices: Only these admitted devices (``None``: every admitted device).
        canary: Share of the online targets in the canary cohort (at least one device).
        soak_s: Seconds of watching after every canary settled.
        max_failures: Share of a cohort that may fail without halting (failures must be
            strictly more than ``max_failures`` × cohort to halt).
        min_accuracy: Floor of each canary's on-device accuracy (0 to 1), or ``None``.
        max_accuracy_drop: Most points (0-100) a canary's accuracy may fall below the
            previous version's on the same device, or ``None``.
        min_evaluated: Evaluation samples a canary must answer with the release before
            its accuracy is judged (only with an accuracy threshold).
        install_timeout_s: How long a device may take to report the release running;
            also how long past the soak the accuracy evidence is waited for.
        expires_days: Validity of the signed desired states.
        by: Operator name recorded beside the OS user.
        shadow: Run the release beside the canaries' current model first, without
            serving its answers, and go on only on that evidence.
        min_agreement: With ``shadow``: floor of each canary's agreement between the
            shadow's answers and the served ones (0 to 1), or ``None``.
    """

    model: str
    version: int
    variant: str | None = None
    fleet: str | None = None
    devices: tuple[str, ...] | None = None
    canary: float = DEFAULT_CANARY
    soak_s: float = DEFAULT_SOAK_S
    max_failures: float = DEFAULT_MAX_FAILURES
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    min_evaluated: int = DEFAULT_MIN_EVALUATED
    install_timeout_s: float = DEFAULT_INSTALL_TIMEOUT_S
    expires_days: float = DEFAULT_EXPIRES_DAYS
    by: str | None = None
    shadow: bool = False
    min_agreement: float | None = None

    def check(self) -> None:
        """Refuse names and numbers that cannot be used.

        Raises:
            BadInputError: The first bad option, named.
        """
        try:
            check_id(self.model, "model")
            if self.variant is not None:
                check_id(self.variant, "variant")
            if self.fleet is not None:
                check_id(self.fleet, "fleet")
            for device in self.devices or ():
                check_id(device, "device id")
        except InvalidIdError as exc:
            raise BadInputError(str(exc)) from exc
        if self.devices is not None and not self.devices:
            raise BadInputError("--devices names no device", hint="e.g. --devices pi-01,pi-02")
        checks: list[tuple[bool, str]] = [
            (self.version >= 1, f"version {self.version} is not a positive integer"),
            (0.0 < self.canary <= 1.0, f"--canary {self.canary} must be above 0 and at most 1"),
            (math.isfinite(self.soak_s) and self.soak_s >= 0, "--soak must be 0 or more"),
            (0.0 <= self.max_failures < 1.0, "--max-failures must be below 100%"),
            (
                self.min_accuracy is None or 0.0 <= self.min_accuracy <= 1.0,
                "--min-accuracy must be between 0 and 1 (or 0% and 100%)",
            ),
            (
                self.max_accuracy_drop is None or 0.0 <= self.max_accuracy_drop <= 100.0,
                "--max-accuracy-drop is in points, between 0 and 100",
            ),
            (self.min_evaluated >= 1, "--min-evaluated must be at least 1"),
            (
                math.isfinite(self.install_timeout_s) and self.install_timeout_s > 0,
                "--install-timeout must be positive",
            ),
            (self.expires_days > 0, "--expires-days must be positive"),
            (
                self.min_agreement is None or 0.0 <= self.min_agreement <= 1.0,
                "--min-agreement must be between 0 and 1 (or 0% and 100%)",
            ),
            (
                self.min_agreement is None or self.shadow,
                "--min-agreement judges a shadow: add --shadow",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)

    @property
    def judges_accuracy(self) -> bool:
        """Whether the canaries' accuracy is part of the decision."""
        return self.min_accuracy is not None or self.max_accuracy_drop is not None
