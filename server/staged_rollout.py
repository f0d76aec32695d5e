"""Staged rollouts: a release goes to a canary cohort first, and to the rest only on evidence.

``edgefl server rollout MODEL VERSION`` (:mod:`edgefl.server.cli_rollout`) runs one
:class:`StagedRollout` in the foreground, recording every step in the registry (tables
``rollouts`` and ``rollout_devices``):

1. **Checks, before anything is published.** The options; the release (a *published*
   release and variant whose files match the registry, as ``server deploy`` requires:
   :func:`~edgefl.server.rollout.published_variants`,
   :func:`~edgefl.server.rollout.desired_state`); the targets (admitted devices, of
   ``--fleet`` and/or ``--devices``); the signing key; that at least one target is online;
   that each canary's previous model is a published release it can be rolled back to;
   and that no other running rollout holds one of the targets. A failed check is a
   :class:`~edgefl.errors.BadInputError` (or :class:`~edgefl.errors.ConfigError`) and
   nothing is published or recorded.
2. **Canaries.** ``ceil(--canary × online targets)`` devices, at least one, chosen among
   the *online* targets by the sorted hash of rollout id and device id (so a rollout's
   cohort is reproducible, and different rollouts spread over the fleet). Each gets its
   own signed desired state (``device`` = its id, not ``"*"``), retained on its
   ``state/desired`` topic.
3. **Watch.** The controller reads what the ingest stored: each canary's reported model
   state (``device_states``, from its own retained ``state/reported``), its presence
   (``devices.online``) and its newest inference report (``telemetry/inference``: per
   model version, evaluation samples answered, correct, errors; cumulative since the
   agent started). A canary *fails* when it reports the release ``rolled_back`` or
   refused (``failed`` with any reason but ``download_failed``, which the device
   retries), reports inference errors with it, or does not report it running within
   ``--install-timeout``. More failures than ``--max-failures`` × cohort halts at once.
4. **Soak.** Once every canary has settled, ``--soak`` seconds more of watching (a
   device's health window may still roll the release back). Then, with
   ``--min-accuracy`` or ``--max-accuracy-drop``, each installed canary's accuracy
   with the release on evaluation samples (a held-out split the agent never trains on)
   is judged on the device itself: below the floor, more points below the previous
   version's accuracy on the same device, or fewer than ``--min-evaluated`` samples
   answered by the deadline, and the canary fails.
5. **Pass.** The rest get their signed desired states (online or not: retained, so an
   offline device gets it when it reconnects and never blocks the rollout, marked
   ``offline``). The rollout waits for the online ones to report, then is
   ``completed`` (or ``failed`` when more than ``--max-failures`` of them failed; the
   controller does not roll the rest back by itself: ``server deploy --rollback`` does).
6. **Halt.** Each canary gets a signed rollback (``rollback=true``) to the version it ran
   before; the controller waits for it to report that version again (``restored``) and
   marks the rollout ``halted`` with the reason. The rest were never sent the release.

Every judgement is per device, from that device's own topics: the broker's ACL lets a
device write only its own subtree, and the ingest refuses a report or record whose body
names another device. A device that lies about itself (reports the release running, or a
perfect accuracy over a million samples) changes its own row only; it cannot hide
another canary's failure, and accuracy is never pooled across devices for a decision.

**Shadow** (``--shadow``). Before step 2, the canaries first run the release *beside*
their current model without serving its answers: each gets a signed desired state naming
the model it runs now and the release as its ``shadow``
(:class:`~edgefl.proto.desired.DesiredState`); its agent checks the shadow like any
release, keeps it outside its A/B slots, runs it on the same samples after answering them
and reports, per shadow version, its agreement with the served answers and, on evaluation
samples, its accuracy beside the served answers' accuracy on the very same samples
(``telemetry/inference``, ``shadow``). A canary fails the shadow stage when its agent
refuses the shadow (or the desired state: an agent that predates shadows refuses it as
malformed, and its reports have no ``shadow`` section), reports shadow errors, does not
run it within ``--install-timeout``, answers fewer than ``--min-evaluated`` samples with
it by ``--install-timeout`` after the soak, or misses a threshold: ``--min-agreement``
(agreement with the served answers), ``--min-accuracy`` (the shadow's own accuracy),
``--max-accuracy-drop`` (points below the served answers on the same samples). Too many
failures and the rollout **halts with no answer ever changed**: the canaries get a state
without the shadow (it is removed) and the rest get nothing. Otherwise it goes on with
step 2, which also removes the shadow (the release's state carries none). The canaries'
rows say ``shadow`` during that stage; the evidence (per canary: compared, agreement,
accuracy and served accuracy, errors, skipped) is kept in the rollout's evidence.

SIGINT or SIGTERM (the ``stop`` event) stops the watching and leaves the devices as they
are: the rollout is marked ``interrupted`` with what was published.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edgefl.errors import BadInputError, ConfigError, EdgeflError, ServiceUnavailableError
from edgefl.proto.desired import DesiredState
from edgefl.proto.ids import InvalidIdError, check_id
from edgefl.proto.topics import record_topic, state_desired_topic
from edgefl.server.device_states import ReportedModelState, read_model_states
from edgefl.server.registry.models import Device, Record, Rollout, RolloutDevice
from edgefl.server.rollout import (
    DEFAULT_EXPIRES_DAYS,
    desired_state,
    publish_retained,
    published_variants,
    rollout_identity,
)

__all__ = [
    "DEFAULT_CANARY",
    "DEFAULT_INSTALL_TIMEOUT_S",
    "DEFAULT_MAX_FAILURES",
    "DEFAULT_MIN_EVALUATED",
    "DEFAULT_SOAK_S",
    "INFERENCE_STREAM",
    "ModelRef",
    "RolloutOptions",
    "RolloutProgress",
    "StagedRollout",
    "choose_canaries",
    "classify",
    "list_rollouts",
    "parse_duration",
    "parse_share",
    "read_rollout",
    "results_by_version",
]

log = logging.getLogger(__name__)

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
_NOT_PUBLISHED: Final = "not published: the rollout stopped before the rest"


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


# --- what devices run ------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ModelRef:
    """One released model variant, as a device runs it."""

    model: str
    version: int
    variant: str
    sha256: str

    def label(self) -> str:
        """``digits-mlp v2 (fp16)``."""
        return f"{self.model} v{self.version} ({self.variant})"

    @classmethod
    def of(cls, reported: ReportedModelState | None) -> ModelRef | None:
        """What a reported state says runs, or ``None`` (no model, or not all of it)."""
        if reported is None:
            return None
        model, version = reported.model, reported.version
        variant, sha256 = reported.variant, reported.sha256
        if model is None or version is None or variant is None or sha256 is None:
            return None
        return cls(model, version, variant, sha256)


def classify(
    release: ModelRef, reported: ReportedModelState | None, since: datetime | None
) -> tuple[str, str] | None:
    """A device's verdict on ``release`` from its reported state, or ``None`` (not yet).

    ``("installed", "")`` when it reports the release running; ``("rolled_back", why)``
    or ``("failed", why)`` when it reports the release's version as its last failure, in
    a report stored at or after ``since`` (the publish time: an older failure of the same
    version belongs to an earlier desired state). ``download_failed`` is retried by the
    device and is no verdict.
    """
    if reported is None:
        return None
    if (
        reported.state == "running"
        and reported.sha256 == release.sha256
        and (reported.model, reported.version) == (release.model, release.version)
    ):
        return ("installed", "")
    failure = reported.last_failure
    if failure is None or failure.version != release.version:
        return None
    if since is not None and reported.reported_at < since:
        return None
    why = failure.reason
    if failure.detail:
        detail = failure.detail
        why = detail if detail.startswith(f"{why}:") else f"{why}: {detail}"
    if reported.state == "rolled_back":
        return ("rolled_back", why)
    if reported.state == "failed" and failure.reason not in RETRIED_REASONS:
        return ("failed", why)
    return None


def choose_canaries(rollout_id: str, online: Iterable[str], share: float) -> list[str]:
    """``ceil(share × online)`` devices, at least one, by the sorted hash of id and device."""
    candidates = sorted(set(online))
    if not candidates:
        return []
    count = max(1, math.ceil(round(share * len(candidates), 9)))

    def rank(device: str) -> str:
        return hashlib.sha256(f"{rollout_id}/{device}".encode()).hexdigest()

    return sorted(sorted(candidates, key=rank)[:count])


@dataclass(frozen=True)
class _Figures:
    """One model version's evaluation figures in a device's inference report."""

    evaluated: int
    correct: int
    errors: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.evaluated if self.evaluated else None


def _figures(doc: Mapping[str, Any], ref: ModelRef) -> _Figures | None:
    """The entry of ``ref`` in an inference report's ``versions``; ``None`` if none or bad.

    The report is the device's own data: anything not in the expected types is ignored.
    """
    versions = doc.get("versions")
    if not isinstance(versions, list):
        return None
    for entry in versions:
        if not isinstance(entry, dict):
            continue
        if (entry.get("model"), entry.get("version"), entry.get("variant")) != (
            ref.model,
            ref.version,
            ref.variant,
        ):
            continue
        values = [entry.get(k, 0) for k in ("evaluated", "correct", "errors")]
        if not all(type(v) is int and v >= 0 for v in values):
            return None
        evaluated, correct, errors = values
        if correct > evaluated:
            return None
        return _Figures(evaluated, correct, errors)
    return None


# --- progress --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutProgress:
    """What the foreground command shows after every look at the registry.

    Attributes:
        rollout_id: The rollout.
        phase: ``canary``, ``soak``, ``accuracy``, ``rest``, ``rollback`` or ``done``.
        canaries: Canary count per device state.
        rest: Rest count per device state.
        accuracy: The canaries' accuracy with the release on evaluation samples, all
            samples together (shown only; decisions are per device).
        previous_accuracy: The previous versions' on the same canaries.
        evaluated: Evaluation samples behind ``accuracy``.
        seconds_left: Of the soak, or of the current wait.
    """

    rollout_id: str
    phase: str
    canaries: dict[str, int]
    rest: dict[str, int]
    accuracy: float | None
    previous_accuracy: float | None
    evaluated: int
    seconds_left: float | None


@dataclass(frozen=True)
class _ShadowFigures:
    """One shadow version's figures in a device's inference report (``shadow.versions``)."""

    compared: int
    agreed: int
    evaluated: int
    correct: int
    served_correct: int
    errors: int
    skipped: int
    too_slow: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.evaluated if self.evaluated else None

    @property
    def served_accuracy(self) -> float | None:
        return self.served_correct / self.evaluated if self.evaluated else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": self.agreement,
            "evaluated": self.evaluated,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "served_correct": self.served_correct,
            "served_accuracy": self.served_accuracy,
            "errors": self.errors,
            "skipped": self.skipped,
            "too_slow": self.too_slow,
        }


@dataclass
class _Target:
    device: str
    fleet: str
    online: bool
    previous: ModelRef | None
    cohort: str = "rest"
    state: str = "pending"
    reason: str = ""
    published_at: datetime | None = None
    current: ModelRef | None = None
    new: _Figures | None = None
    old: _Figures | None = None
    online_at_start: bool = False
    ran_release: bool = False
    dirty: bool = True
    shadow_at: datetime | None = None
    shadow_running: bool = False
    shadow: _ShadowFigures | None = None
    shadow_verdict: str = ""

    def set(self, state: str, reason: str = "") -> bool:
        if (state, reason) == (self.state, self.reason):
            return False
        self.state, self.reason, self.dirty = state, reason, True
        return True


@dataclass
class _Plan:
    rollout_id: str
    release: ModelRef
    template: DesiredState
    rollbacks: dict[ModelRef, DesiredState]
    targets: dict[str, _Target]
    canaries: list[str]
    key_id: str
    key: Ed25519PrivateKey
    notes: list[str] = field(default_factory=list)
    shadows: dict[str, DesiredState] = field(default_factory=dict)
    """Canary -> its unsigned shadow state (its current model, the release as shadow)."""

    @property
    def rest(self) -> list[str]:
        return [d for d in self.targets if d not in set(self.canaries)]


class _InterruptedError(Exception):
    """The stop event was set while watching."""


class StagedRollout:
    """One staged rollout, run in the foreground (see the module docstring).

    Args:
        options: What to roll out and the thresholds.
        ca_dir: The fleet CA folder (release key, rollout identity).
        db_url: The registry.
        releases_dir: Published releases.
        broker_host: The broker to publish on.
        broker_port: Its port (mutual TLS).
        stop: Set it (SIGINT/SIGTERM) to stop watching: the rollout ends ``interrupted``.
        on_progress: Called after every look at the registry.
        on_event: Called with one line per step (published, halted, ...).
        poll_s: Seconds between looks at the registry.
        rollout_id: The id (a new random one by default; the canary choice depends on it).
        publish_timeout_s: Longest wait for the broker's acknowledgements.
    """

    def __init__(
        self,
        options: RolloutOptions,
        *,
        ca_dir: Path,
        db_url: str,
        releases_dir: Path,
        broker_host: str,
        broker_port: int,
        stop: threading.Event | None = None,
        on_progress: Callable[[RolloutProgress], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        poll_s: float = 0.5,
        rollout_id: str | None = None,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self.options = options
        self.ca_dir = ca_dir
        self.db_url = db_url
        self.releases_dir = releases_dir
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.stop = stop or threading.Event()
        self._on_progress = on_progress
        self._on_event = on_event
        self.poll_s = poll_s
        self.rollout_id = rollout_id or f"r-{secrets.token_hex(5)}"
        self.publish_timeout_s = publish_timeout_s
        self.plan: _Plan | None = None
        self._engine: Engine | None = None
        self._phase = "canary"
        self._last_issued = 0
        self._heartbeat = 0.0
        self._deadline: float | None = None

    # -- checks -----------------------------------------------------------------------------

    def prepare(self) -> _Plan:
        """Every check, the cohorts and the unsigned states; publishes and records nothing.

        Raises:
            BadInputError: A bad option, an unknown or unpublished release or variant, an
                unknown device or fleet, no online target, a canary that could not be
                rolled back, or a target held by another running rollout.
            ConfigError: No signing key, an unreadable CA or registry.
        """
        from edgefl.server.enrollment import admitted_fleets
        from edgefl.server.registry import make_engine, upgrade

        options = self.options
        options.check()
        try:
            check_id(self.rollout_id, "rollout id")
        except InvalidIdError as exc:
            raise BadInputError(str(exc)) from exc
        upgrade(self.db_url)
        engine = self._engine = make_engine(self.db_url)
        try:
            return self._prepare(engine, admitted_fleets(engine))
        except BaseException:
            engine.dispose()
            self._engine = None
            raise

    def _prepare(self, engine: Engine, admitted: Mapping[str, str]) -> _Plan:
        from edgefl.server.release_keys import current_signing_key, revoked_key_ids

        options = self.options
        published = published_variants(engine, options.model, options.version)
        chosen = self._targets(admitted)
        issued = int(time.time())
        expires = issued + int(options.expires_days * 86400)
        revoked = revoked_key_ids(self.ca_dir)
        first_fleet = next(iter(chosen.values()))
        template = desired_state(
            self.releases_dir,
            options.model,
            options.version,
            options.variant,
            fleet=first_fleet,
            device="*",
            issued_at=issued,
            expires_at=expires,
            revoked_keys=revoked,
        )
        assert template.model is not None
        desired = template.model
        published.check(desired.model, desired.version, desired.variant, desired.artifact_sha256)
        release = ModelRef(desired.model, desired.version, desired.variant, desired.artifact_sha256)
        kid, key = current_signing_key(self.ca_dir)
        try:
            with Session(engine) as session:
                reported = read_model_states(session, chosen)
                online = {
                    str(d): bool(o)
                    for d, o in session.execute(
                        select(Device.device_id, Device.online).where(
                            Device.device_id.in_(sorted(chosen))
                        )
                    )
                }
                busy = self._held_elsewhere(session, set(chosen))
        except SQLAlchemyError as exc:
            raise ConfigError(f"cannot read the registry: {exc}") from exc
        if busy:
            raise BadInputError(
                "another rollout is running on "
                + "; ".join(f"{rid}: {', '.join(devs)}" for rid, devs in sorted(busy.items())),
                hint="wait for it (`edgefl server rollout-status ID`) or leave those devices "
                "out with --devices",
            )
        targets = {
            device: _Target(
                device=device,
                fleet=fleet,
                online=online.get(device, False),
                online_at_start=online.get(device, False),
                previous=ModelRef.of(reported.get(device)),
            )
            for device, fleet in sorted(chosen.items())
        }
        for target in targets.values():
            target.current = target.previous
        live = [d for d, t in targets.items() if t.online]
        if not live:
            raise BadInputError(
                f"none of the {len(targets)} target device(s) is online: a rollout starts "
                "with online canaries",
                hint="see `edgefl server devices`; `edgefl server deploy` publishes to "
                "offline devices (retained) without a canary stage",
            )
        canaries = choose_canaries(self.rollout_id, live, options.canary)
        for device in canaries:
            targets[device].cohort = "canary"
        plan = _Plan(
            rollout_id=self.rollout_id,
            release=release,
            template=template,
            rollbacks={},
            targets=targets,
            canaries=canaries,
            key_id=kid,
            key=key,
        )
        self._rollbacks(plan, issued, expires, revoked)
        if options.shadow:
            self._shadow_states(plan)
        rollout_identity(self.ca_dir)  # issued now if missing: a CA problem fails here
        self.plan = plan
        return plan

    def _targets(self, admitted: Mapping[str, str]) -> dict[str, str]:
        """Device -> fleet of the admitted devices the options name."""
        options = self.options
        if options.devices is not None:
            unknown = sorted(d for d in set(options.devices) if d not in admitted)
            if unknown:
                raise BadInputError(
                    f"not admitted device(s) of the registry: {', '.join(unknown)}",
                    hint="see `edgefl server devices`; admit with `edgefl server admit`",
                )
            chosen = {d: admitted[d] for d in sorted(set(options.devices))}
            if options.fleet is not None:
                other = sorted(d for d, f in chosen.items() if f != options.fleet)
                if other:
                    raise BadInputError(
                        f"device(s) {', '.join(other)} are not in fleet {options.fleet!r}",
                        hint="drop --fleet, or name devices of that fleet",
                    )
            return chosen
        if options.fleet is not None:
            chosen = {d: f for d, f in admitted.items() if f == options.fleet}
            if not chosen:
                fleets = sorted(set(admitted.values()))
                raise BadInputError(
                    f"no admitted device in fleet {options.fleet!r}",
                    hint=f"fleets with admitted devices: {', '.join(fleets)}"
                    if fleets
                    else "admit devices with `edgefl server admit`",
                )
            return dict(sorted(chosen.items()))
        if not admitted:
            raise BadInputError("no admitted device in the registry: nothing to roll out to")
        return dict(sorted(admitted.items()))

    def _held_elsewhere(self, session: Session, devices: set[str]) -> dict[str, list[str]]:
        """Running rollouts with a recent heartbeat that hold one of ``devices``."""
        fresh = datetime.now(UTC) - timedelta(seconds=STALE_AFTER_S)
        rows = session.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.device_id)
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(Rollout.state == "running", Rollout.updated_at >= fresh)
            .where(RolloutDevice.device_id.in_(sorted(devices)))
        )
        busy: dict[str, list[str]] = {}
        for rid, device in rows:
            busy.setdefault(str(rid), []).append(str(device))
        return busy

    def _rollbacks(self, plan: _Plan, issued: int, expires: int, revoked: list[str]) -> None:
        """The rollback state of each canary's previous version, checked now."""
        for device in plan.canaries:
            previous = plan.targets[device].previous
            if previous is None:
                plan.notes.append(
                    f"canary {device} runs no model: a halt cannot roll it back to one"
                )
                continue
            if previous == plan.release or previous in plan.rollbacks:
                continue
            try:
                state = desired_state(
                    self.releases_dir,
                    previous.model,
                    previous.version,
                    previous.variant,
                    fleet=plan.template.fleet,
                    device="*",
                    issued_at=issued,
                    expires_at=expires,
                    rollback=True,
                    revoked_keys=revoked,
                )
                assert self._engine is not None
                assert state.model is not None
                published_variants(self._engine, previous.model, previous.version).check(
                    previous.model, previous.version, previous.variant, state.model.artifact_sha256
                )
                if state.model.artifact_sha256 != previous.sha256:
                    raise BadInputError(
                        f"the release's sha256 {state.model.artifact_sha256[:12]}… is not "
                        f"the {previous.sha256[:12]}… the device runs"
                    )
            except BadInputError as exc:
                raise BadInputError(
                    f"canary {device} runs {previous.label()}, which a halt could not roll it "
                    f"back to: {exc.message}",
                    hint="deploy a published release to it first, or leave it out with --devices",
                ) from exc
            plan.rollbacks[previous] = state

    def _shadow_states(self, plan: _Plan) -> None:
        """Each canary's shadow state: the model it runs now, with the release beside it.

        Raises:
            BadInputError: A canary runs no model (a shadow is judged against the answers
                of the model it serves).
        """
        for device in plan.canaries:
            previous = plan.targets[device].previous
            if previous is None:
                raise BadInputError(
                    f"canary {device} runs no model: a shadow is judged against the answers "
                    "of the model a device serves",
                    hint="deploy a published release to it first, or leave it out with --devices",
                )
            if previous == plan.release:
                plan.notes.append(
                    f"canary {device} runs {plan.release.label()} already: no shadow for it"
                )
                continue
            current = plan.rollbacks[previous]
            assert current.model is not None
            plan.shadows[device] = current.model_copy(
                update={
                    "model": current.model.model_copy(update={"rollback": False}),
                    "shadow": plan.template.model,
                }
            )

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Prepare (unless done), record, publish and watch until the rollout ends.

        Returns:
            The rollout as :func:`read_rollout` shows it.

        Raises:
            BadInputError: See :meth:`prepare` (nothing published then).
            ConfigError: Likewise.
            ServiceUnavailableError: The broker refused or did not acknowledge a publish;
                the rollout is recorded ``failed`` with what was published.
        """
        plan = self.plan or self.prepare()
        engine = self._engine
        assert engine is not None
        if self.stop.is_set():
            engine.dispose()
            raise KeyboardInterrupt  # before anything was published or recorded
        self._record(plan)
        try:
            try:
                self._run(plan)
            except _InterruptedError:
                self._finish(plan, "interrupted", self._interrupted_reason(plan))
            except KeyboardInterrupt:
                self._finish(plan, "interrupted", self._interrupted_reason(plan))
                raise
        except KeyboardInterrupt:
            engine.dispose()
            raise
        except BaseException as exc:
            what = exc.message if isinstance(exc, EdgeflError) else f"{type(exc).__name__}"
            self._finish(plan, "failed", f"stopped in the {self._phase} phase: {what}")
            engine.dispose()
            raise
        try:
            return read_rollout(engine, plan.rollout_id)
        finally:
            engine.dispose()

    def _run(self, plan: _Plan) -> None:
        options = self.options
        release = plan.release
        for note in plan.notes:
            self._event(f"note: {note}")
        self._event(
            f"rollout {plan.rollout_id}: {release.label()} to {len(plan.targets)} device(s); "
            f"canaries: {', '.join(plan.canaries)}"
        )
        if options.shadow and not self._shadow_stage(plan):
            return
        self._set_phase("canary")
        self._publish(plan, plan.canaries, plan.template)
        failures = self._settle(plan, plan.canaries, halt_early=True)
        if failures is None:
            self._soak(plan)
            failures = self._failures(plan, plan.canaries)
        if self._too_many(failures, len(plan.canaries)) is None and options.judges_accuracy:
            self._judge_accuracy(plan)
            failures = self._failures(plan, plan.canaries)
        verdict = self._too_many(failures, len(plan.canaries))
        if verdict is not None:
            self._halt(plan, verdict)
            return
        self._event(
            f"canaries passed ({len(failures)} failure(s) of {len(plan.canaries)}): "
            f"publishing to the {len(plan.rest)} other device(s)"
        )
        self._set_phase("rest")
        rest = plan.rest
        if rest:
            self._publish(plan, rest, plan.template)
            self._settle(plan, rest, halt_early=False)
        failed = self._failures(plan, rest)
        counts = Counter(plan.targets[d].state for d in plan.targets)
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        verdict = self._too_many(failed, len(rest))
        if verdict is not None:
            self._finish(
                plan,
                "failed",
                f"{verdict} among the rest ({summary}); the rest were not rolled back: "
                f"`edgefl server deploy` with --rollback does",
            )
            return
        offline = counts.get("offline", 0)
        self._finish(
            plan,
            "completed",
            f"{summary}"
            + (f"; the {offline} offline device(s) get it when they reconnect" if offline else ""),
        )

    # -- steps ------------------------------------------------------------------------------

    def _publish(
        self, plan: _Plan, devices: Sequence[str], template: DesiredState, *, kind: str = "release"
    ) -> None:
        """Sign one state per device and publish them retained; mark them published."""
        from edgefl.releasesign import sign

        issued = max(int(time.time()), self._last_issued + 1)
        self._last_issued = issued
        life = template.expires_at - template.issued_at
        messages: dict[str, bytes] = {}
        for device in devices:
            target = plan.targets[device]
            state = template.model_copy(
                update={
                    "fleet": target.fleet,
                    "device": device,
                    "issued_at": issued,
                    "expires_at": issued + life,
                }
            )
            messages[state_desired_topic(target.fleet, device)] = sign(state, plan.key).to_json()
        at = datetime.now(UTC)
        refused = publish_retained(
            messages,
            host=self.broker_host,
            port=self.broker_port,
            tls=rollout_identity(self.ca_dir),
            timeout_s=self.publish_timeout_s,
        )
        if refused:
            raise ServiceUnavailableError(
                f"the broker refused {len(refused)} desired state(s): "
                + ", ".join(f"{t} ({r})" for t, r in sorted(refused.items())),
                hint="the broker's ACL must let edgefl-rollout write state/desired",
            )
        if kind == "release":
            for device in devices:
                target = plan.targets[device]
                target.published_at = at
                if target.online:
                    target.set("published")
                else:
                    target.set(
                        "offline", "offline at publish: it gets the retained state on reconnect"
                    )
        self._write(plan)
        shadow = template.shadow
        self._event(
            f"published {kind} {template.model.version if template.model else '-'}"
            + (f" with shadow {shadow.version}" if shadow is not None else "")
            + f" (signed by {plan.key_id}) to {len(devices)} device(s): {', '.join(devices)}"
        )

    def _settle(
        self, plan: _Plan, devices: Sequence[str], *, halt_early: bool
    ) -> dict[str, str] | None:
        """Watch until every online device of ``devices`` settled or the timeout.

        Returns:
            With ``halt_early``, the failures as soon as there are too many (else
            ``None`` once all settled); without it, ``None``.
        """
        deadline = time.monotonic() + self.options.install_timeout_s
        self._deadline = deadline
        while True:
            self._observe(plan, devices)
            if halt_early:
                failures = self._failures(plan, devices)
                if self._too_many(failures, len(devices)) is not None:
                    return failures
            waiting = [
                d
                for d in devices
                if plan.targets[d].state == "published"
                or (plan.targets[d].cohort == "canary" and plan.targets[d].state == "offline")
            ]
            if not waiting:
                return None
            if time.monotonic() >= deadline:
                for device in waiting:
                    target = plan.targets[device]
                    last = (
                        f"it reports {target.current.label()}"
                        if target.current
                        else "it reports no model"
                    )
                    target.set(
                        "failed",
                        f"timeout: {plan.release.label()} not reported running within "
                        f"{self.options.install_timeout_s:g} s ({last}"
                        f"{'' if target.online else ', offline'})",
                    )
                self._write(plan)
                failures = self._failures(plan, devices)
                return failures if halt_early and self._too_many(failures, len(devices)) else None
            self._wait()

    def _soak(self, plan: _Plan) -> None:
        self._set_phase("soak")
        self._event(f"every canary settled; soaking {self.options.soak_s:g} s")
        end = time.monotonic() + self.options.soak_s
        self._deadline = end
        while time.monotonic() < end:
            self._observe(plan, plan.canaries)
            if self._too_many(self._failures(plan, plan.canaries), len(plan.canaries)):
                return
            self._wait(min(self.poll_s, max(0.0, end - time.monotonic())))
        self._observe(plan, plan.canaries)

    def _judge_accuracy(self, plan: _Plan) -> None:
        """Wait for ``min_evaluated`` samples on every installed canary, then judge each.

        A canary whose shadow passed is not judged again: its shadow stage compared the
        release with the served answers on the very same samples, where this compares
        figures of two versions on different samples, which only adds sampling noise.
        """
        options = self.options
        judged = [d for d in plan.canaries if plan.targets[d].shadow_verdict != "passed"]
        if not judged:
            return
        self._set_phase("accuracy")
        deadline = time.monotonic() + options.install_timeout_s
        self._deadline = deadline
        while True:
            self._observe(plan, plan.canaries)
            installed = [d for d in judged if plan.targets[d].state == "installed"]
            short = [
                d
                for d in installed
                if (plan.targets[d].new or _Figures(0, 0, 0)).evaluated < options.min_evaluated
            ]
            if not short or time.monotonic() >= deadline:
                break
            self._wait()
        for device in installed:
            target = plan.targets[device]
            why = _accuracy_failure(target, plan.release, options)
            if why is not None:
                target.set("failed", why)
        self._write(plan)

    def _halt(self, plan: _Plan, verdict: str) -> None:
        """Roll every canary back to its previous version and wait for it to say so."""
        self._set_phase("rollback")
        self._event(f"halting: {verdict}; rolling the canaries back")
        by_previous: dict[ModelRef, list[str]] = {}
        for device in plan.canaries:
            target = plan.targets[device]
            if target.previous is None:
                if target.current == plan.release:
                    target.set(
                        "failed",
                        f"{target.reason + '; ' if target.reason else ''}no previous model "
                        f"to roll back to: it keeps {plan.release.label()}",
                    )
                continue
            if target.previous == plan.release:
                continue
            by_previous.setdefault(target.previous, []).append(device)
        for previous, devices in sorted(by_previous.items()):
            self._publish(plan, devices, plan.rollbacks[previous], kind="rollback to")
        waiting = [d for devices in by_previous.values() for d in devices]
        deadline = time.monotonic() + self.options.install_timeout_s
        self._deadline = deadline
        while True:
            self._observe(plan, plan.canaries, restoring=True)
            left = [d for d in waiting if plan.targets[d].state != "restored"]
            if not left:
                break
            if time.monotonic() >= deadline:
                for device in left:
                    target = plan.targets[device]
                    assert target.previous is not None
                    target.set(
                        "failed",
                        f"{target.reason + '; ' if target.reason else ''}not back on "
                        f"{target.previous.label()} within {self.options.install_timeout_s:g} s",
                    )
                self._write(plan)
                break
            self._wait()
        for device in plan.rest:
            plan.targets[device].set("pending", _NOT_PUBLISHED)
        self._write(plan)
        restored = sum(plan.targets[d].state == "restored" for d in plan.canaries)
        self._finish(
            plan,
            "halted",
            f"{verdict}; {restored} of {len(plan.canaries)} canaries back on their previous "
            f"version; the {len(plan.rest)} other device(s) were never sent "
            f"{plan.release.label()}",
        )

    # -- the shadow stage ---------------------------------------------------------------------

    def _shadow_stage(self, plan: _Plan) -> bool:
        """Run the release beside the canaries' current model; whether to go on.

        On a halt the shadow is removed from the canaries and the rollout is finished
        (``halted``) here.
        """
        options = self.options
        release = plan.release
        devices = sorted(plan.shadows)
        if not devices:
            self._event("no canary to run the shadow on: going on without the shadow stage")
            return True
        self._set_phase("shadow")
        self._event(
            f"shadow stage: {release.label()} beside the current model of "
            f"{', '.join(devices)}; its answers are never served"
        )
        at = datetime.now(UTC)
        for group in _by_previous(plan, devices).values():
            self._publish(plan, group, plan.shadows[group[0]], kind="current model")
        for device in devices:
            target = plan.targets[device]
            target.shadow_at = at
            target.set(
                "shadow",
                f"runs {release.label()} as a shadow beside {_label(target.previous)}; its "
                "answers are never served",
            )
        self._write(plan)
        # Every canary runs the shadow (or has failed).
        deadline = time.monotonic() + options.install_timeout_s
        self._deadline = deadline
        verdict: str | None = None
        while True:
            self._observe_shadow(plan, devices, since=at)
            verdict = self._too_many(self._failures(plan, devices), len(devices))
            waiting = [
                d
                for d in devices
                if plan.targets[d].state == "shadow" and not plan.targets[d].shadow_running
            ]
            if verdict is not None or not waiting:
                break
            if time.monotonic() >= deadline:
                for device in waiting:
                    target = plan.targets[device]
                    target.set(
                        "failed",
                        f"timeout: the shadow {release.label()} not reported running within "
                        f"{options.install_timeout_s:g} s{'' if target.online else ' (offline)'}",
                    )
                self._write(plan)
                verdict = self._too_many(self._failures(plan, devices), len(devices))
                break
            self._wait()
        if verdict is None:
            self._event(f"every canary runs the shadow; soaking {options.soak_s:g} s")
            end = time.monotonic() + options.soak_s
            self._deadline = end
            while verdict is None and time.monotonic() < end:
                self._wait(min(self.poll_s, max(0.0, end - time.monotonic())))
                self._observe_shadow(plan, devices, since=at)
                verdict = self._too_many(self._failures(plan, devices), len(devices))
        if verdict is None:
            self._judge_shadow(plan, devices, since=at)
            verdict = self._too_many(self._failures(plan, devices), len(devices))
        for device in devices:
            target = plan.targets[device]
            target.shadow_verdict = target.reason if target.state == "failed" else "passed"
        if verdict is not None:
            self._halt_shadow(plan, devices, verdict)
            return False
        summary = "; ".join(f"{d}: {_shadow_summary(plan.targets[d].shadow)}" for d in devices)
        self._event(f"the shadow passed on the canaries ({summary})")
        for device in devices:
            target = plan.targets[device]
            target.set("pending", f"shadow passed: {_shadow_summary(target.shadow)}")
        self._write(plan)
        return True

    def _judge_shadow(self, plan: _Plan, devices: Sequence[str], *, since: datetime) -> None:
        """Wait for each canary's shadow evidence (``--min-evaluated``), then judge it."""
        options = self.options
        deadline = time.monotonic() + options.install_timeout_s
        self._deadline = deadline
        while True:
            self._observe_shadow(plan, devices, since=since)
            live = [d for d in devices if plan.targets[d].state == "shadow"]
            short = [d for d in live if not _shadow_enough(plan.targets[d].shadow, options)]
            if not short or time.monotonic() >= deadline:
                break
            self._wait()
        for device in live:
            why = _shadow_failure(plan.targets[device], plan.release, options)
            if why is not None:
                plan.targets[device].set("failed", why)
        self._write(plan)

    def _halt_shadow(self, plan: _Plan, devices: Sequence[str], verdict: str) -> None:
        """Remove the shadow from the canaries and end ``halted``: nothing else changed."""
        release = plan.release
        self._set_phase("remove-shadow")
        self._event(
            f"halting: {verdict}; removing the shadow from the canaries (it never served an answer)"
        )
        removed_at = datetime.now(UTC)
        for group in _by_previous(plan, devices).values():
            state = plan.shadows[group[0]].model_copy(update={"shadow": None})
            self._publish(plan, group, state, kind="current model")
        deadline = time.monotonic() + self.options.install_timeout_s
        self._deadline = deadline
        while True:
            reports = self._observe_shadow(plan, devices, since=removed_at)
            for device in devices:
                target = plan.targets[device]
                if target.state == "restored":
                    continue
                gone = (device in reports and not target.shadow_running) or not target.online
                if gone:
                    before = f" (was {target.state}: {target.reason})" if target.reason else ""
                    away = "" if target.online else "; offline: its retained state has no shadow"
                    target.set(
                        "restored",
                        f"shadow removed; {release.label()} never served an answer on it"
                        f"{away}{before}",
                    )
            left = [d for d in devices if plan.targets[d].state != "restored"]
            if not left:
                break
            if time.monotonic() >= deadline:
                for device in left:
                    target = plan.targets[device]
                    target.set(
                        "failed",
                        f"{target.reason + '; ' if target.reason else ''}the shadow not "
                        f"reported removed within {self.options.install_timeout_s:g} s",
                    )
                break
            self._wait()
        for device in plan.rest:
            plan.targets[device].set("pending", _NOT_PUBLISHED)
        self._write(plan)
        removed = sum(plan.targets[d].state == "restored" for d in devices)
        self._finish(
            plan,
            "halted",
            f"{verdict}; in the shadow stage, before any answer changed: the shadow was "
            f"removed from {removed} of {len(devices)} canaries; the {len(plan.rest)} other "
            f"device(s) were never sent {release.label()}",
        )

    def _observe_shadow(
        self, plan: _Plan, devices: Sequence[str], *, since: datetime
    ) -> dict[str, dict[str, Any]]:
        """One look at the shadow canaries; their inference reports stored since ``since``."""
        engine = self._engine
        assert engine is not None
        release = plan.release
        try:
            with Session(engine) as session:
                reported = read_model_states(session, devices)
                presence = {
                    str(d): bool(o)
                    for d, o in session.execute(
                        select(Device.device_id, Device.online).where(
                            Device.device_id.in_(sorted(devices))
                        )
                    )
                }
                reports = _inference_reports(
                    session, {d: plan.targets[d].fleet for d in devices}, since
                )
        except SQLAlchemyError as exc:
            log.warning("cannot read the registry (will look again): %s", exc)
            return {}
        for device in devices:
            target = plan.targets[device]
            target.online = presence.get(device, False)
            state = reported.get(device)
            current = ModelRef.of(state)
            if current != target.current:
                target.current, target.dirty = current, True
            if current == release:
                target.ran_release = True
            doc = reports.get(device)
            section = doc.get("shadow") if doc is not None else None
            if doc is not None:
                target.shadow_running = isinstance(section, dict) and _names(
                    section.get("model"), release
                )
                figures = _shadow_figures(section, release)
                if figures is not None and figures != target.shadow:
                    target.shadow, target.dirty = figures, True
                    target.new = _Figures(figures.evaluated, figures.correct, figures.errors)
                    target.old = _Figures(figures.evaluated, figures.served_correct, 0)
            if target.state != "shadow":
                continue
            why = _shadow_refusal(target, release, state, doc, section)
            if why is not None:
                target.set("failed", why)
        self._write(plan)
        self._progress(plan)
        return reports

    # -- watching ---------------------------------------------------------------------------

    def _observe(self, plan: _Plan, devices: Sequence[str], *, restoring: bool = False) -> None:
        """One look at the registry: reported states, presence, inference reports."""
        engine = self._engine
        assert engine is not None
        release = plan.release
        try:
            with Session(engine) as session:
                reported = read_model_states(session, devices)
                presence = {
                    str(d): bool(o)
                    for d, o in session.execute(
                        select(Device.device_id, Device.online).where(
                            Device.device_id.in_(sorted(devices))
                        )
                    )
                }
                sent = [plan.targets[d].published_at for d in devices]
                since = min((t for t in sent if t is not None), default=None)
                reports = (
                    _inference_reports(session, {d: plan.targets[d].fleet for d in devices}, since)
                    if since is not None
                    else {}
                )
        except SQLAlchemyError as exc:
            log.warning("cannot read the registry (will look again): %s", exc)
            return
        for device in devices:
            target = plan.targets[device]
            target.online = presence.get(device, False)
            state = reported.get(device)
            current = ModelRef.of(state)
            if current != target.current:
                target.current = current
                target.dirty = True
            if current == release:
                target.ran_release = True
            doc = reports.get(device)
            if doc is not None:
                new = _figures(doc, release)
                old = _figures(doc, target.previous) if target.previous else None
                if (new, old) != (target.new, target.old):
                    target.new, target.old, target.dirty = new, old, True
            if restoring:
                if target.state != "restored" and _back(target, state):
                    target.set("restored", _restored_reason(target))
                continue
            if target.state in ("failed", "rolled_back", "pending", "restored"):
                continue  # a verdict stands for the rest of the run
            verdict = classify(release, state, target.published_at)
            if verdict is not None:
                target.set(*verdict)
            elif target.state == "installed" and target.current != release:
                # It ran the release and now runs something else without a failure report
                # for it (e.g. a newer desired state from elsewhere).
                target.set("failed", f"no longer runs it: {_label(target.current)}")
            elif target.state == "published" and not target.online:
                target.set("offline", "went offline before reporting it")
            elif target.state == "offline" and target.online and target.published_at:
                target.set("published")
            if target.state == "installed" and target.new is not None and target.new.errors > 0:
                target.set(
                    "failed",
                    f"inference_error: {target.new.errors} inference error(s) with "
                    f"{release.label()}",
                )
        self._write(plan)
        self._progress(plan)

    def _failures(self, plan: _Plan, devices: Sequence[str]) -> dict[str, str]:
        return {
            d: plan.targets[d].reason
            for d in devices
            if plan.targets[d].state in ("failed", "rolled_back")
        }

    def _too_many(self, failures: Mapping[str, str], cohort: int) -> str | None:
        """Why the failures halt (or fail) the rollout, or ``None`` when within bounds."""
        allowed = self.options.max_failures * cohort
        if len(failures) <= allowed + 1e-9:
            return None
        first = next(iter(sorted(failures.items())))
        return (
            f"{len(failures)} of {cohort} device(s) failed, more than --max-failures "
            f"{self.options.max_failures:.0%} allows (first: {first[0]}: {first[1]})"
        )

    def _wait(self, seconds: float | None = None) -> None:
        if self.stop.wait(self.poll_s if seconds is None else seconds):
            raise _InterruptedError
        now = time.monotonic()
        if now - self._heartbeat >= HEARTBEAT_S:
            self._heartbeat = now
            self._touch()

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        self._touch()

    def _event(self, message: str) -> None:
        log.info("%s", message)
        if self._on_event is not None:
            self._on_event(message)

    def _progress(self, plan: _Plan) -> None:
        if self._on_progress is None:
            return
        canaries = [plan.targets[d] for d in plan.canaries]
        rest = [plan.targets[d] for d in plan.rest]
        with_new = [t for t in canaries if t.new is not None and t.new.evaluated]
        evaluated = sum(t.new.evaluated for t in with_new if t.new)
        correct = sum(t.new.correct for t in with_new if t.new)
        with_old = [t.old for t in with_new if t.old is not None and t.old.evaluated]
        old_n = sum(f.evaluated for f in with_old)
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        self._on_progress(
            RolloutProgress(
                rollout_id=plan.rollout_id,
                phase=self._phase,
                canaries=dict(Counter(t.state for t in canaries)),
                rest=dict(Counter(t.state for t in rest)),
                accuracy=correct / evaluated if evaluated else None,
                previous_accuracy=sum(f.correct for f in with_old) / old_n if old_n else None,
                evaluated=evaluated,
                seconds_left=left,
            )
        )

    # -- the registry -----------------------------------------------------------------------

    def _record(self, plan: _Plan) -> None:
        options = self.options
        now = datetime.now(UTC)
        engine = self._engine
        assert engine is not None
        with Session(engine) as session, session.begin():
            session.add(
                Rollout(
                    id=plan.rollout_id,
                    model=plan.release.model,
                    version=plan.release.version,
                    variant=plan.release.variant,
                    sha256=plan.release.sha256,
                    fleet=options.fleet,
                    canary_fraction=options.canary,
                    canaries=len(plan.canaries),
                    soak_s=options.soak_s,
                    max_failures=options.max_failures,
                    min_accuracy=options.min_accuracy,
                    max_accuracy_drop=options.max_accuracy_drop,
                    min_evaluated=options.min_evaluated,
                    install_timeout_s=options.install_timeout_s,
                    state="running",
                    phase="canary",
                    reason="",
                    evidence_json=json.dumps(
                        {
                            "notes": plan.notes,
                            "shadow": options.shadow,
                            "min_agreement": options.min_agreement,
                        }
                    ),
                    created_by=_created_by(options.by),
                    created_at=now,
                    updated_at=now,
                    finished_at=None,
                )
            )
            session.flush()
            for target in plan.targets.values():
                previous = target.previous
                session.add(
                    RolloutDevice(
                        rollout_id=plan.rollout_id,
                        device_id=target.device,
                        fleet=target.fleet,
                        cohort=target.cohort,
                        state=target.state,
                        reason=target.reason,
                        online_at_start=target.online_at_start,
                        previous_model=previous.model if previous else None,
                        previous_version=previous.version if previous else None,
                        previous_variant=previous.variant if previous else None,
                        previous_sha256=previous.sha256 if previous else None,
                        published_at=None,
                        updated_at=now,
                    )
                )
                target.dirty = False
        self._heartbeat = time.monotonic()

    def _write(self, plan: _Plan) -> None:
        """Store the devices whose row changed (and the heartbeat)."""
        dirty = [t for t in plan.targets.values() if t.dirty]
        if not dirty:
            return
        engine = self._engine
        assert engine is not None
        now = datetime.now(UTC)
        with Session(engine) as session, session.begin():
            for target in dirty:
                row = session.get(RolloutDevice, (plan.rollout_id, target.device))
                if row is None:
                    continue
                row.state = target.state
                row.reason = target.reason
                row.published_at = target.published_at
                if target.new is not None:
                    row.evaluated, row.accuracy = target.new.evaluated, target.new.accuracy
                if target.old is not None:
                    row.previous_evaluated = target.old.evaluated
                    row.previous_accuracy = target.old.accuracy
                row.updated_at = now
                target.dirty = False
            rollout = session.get(Rollout, plan.rollout_id)
            if rollout is not None:
                rollout.phase = self._phase
                rollout.updated_at = now

    def _touch(self) -> None:
        engine = self._engine
        if engine is None or self.plan is None:
            return
        try:
            with Session(engine) as session, session.begin():
                rollout = session.get(Rollout, self.plan.rollout_id)
                if rollout is not None:
                    rollout.phase = self._phase
                    rollout.updated_at = datetime.now(UTC)
        except SQLAlchemyError as exc:
            log.warning("cannot record the rollout's heartbeat: %s", exc)

    def _finish(self, plan: _Plan, state: str, reason: str) -> None:
        engine = self._engine
        assert engine is not None
        now = datetime.now(UTC)
        evidence = {
            "notes": plan.notes,
            "shadow": self.options.shadow,
            "min_agreement": self.options.min_agreement,
            "shadow_canaries": {
                d: {
                    "verdict": t.shadow_verdict or None,
                    **(t.shadow.as_dict() if t.shadow is not None else {}),
                }
                for d, t in plan.targets.items()
                if t.shadow_at is not None
            },
            "canaries": len(plan.canaries),
            "failures": self._failures(plan, plan.canaries),
            "rest_failures": self._failures(plan, plan.rest),
            "devices_ran_release": sorted(d for d, t in plan.targets.items() if t.ran_release),
            "accuracy": {
                d: {
                    "evaluated": t.new.evaluated if t.new else None,
                    "accuracy": t.new.accuracy if t.new else None,
                    "previous_evaluated": t.old.evaluated if t.old else None,
                    "previous_accuracy": t.old.accuracy if t.old else None,
                }
                for d, t in plan.targets.items()
                if t.cohort == "canary"
            },
        }
        try:
            self._write(plan)
            with Session(engine) as session, session.begin():
                rollout = session.get(Rollout, plan.rollout_id)
                if rollout is not None:
                    rollout.state = state
                    rollout.phase = self._phase if state != "completed" else "done"
                    rollout.reason = reason
                    rollout.evidence_json = json.dumps(evidence, sort_keys=True)
                    rollout.updated_at = now
                    rollout.finished_at = now
        except SQLAlchemyError as exc:
            log.error("cannot record the end of rollout %s (%s): %s", plan.rollout_id, state, exc)
        self._event(f"rollout {plan.rollout_id} {state}: {reason}")

    def _interrupted_reason(self, plan: _Plan) -> str:
        sent = [d for d, t in plan.targets.items() if t.published_at is not None]
        shadowed = [
            d
            for d, t in plan.targets.items()
            if t.shadow_at is not None and t.published_at is None and t.state != "restored"
        ]
        return (
            f"interrupted in the {self._phase} phase; {plan.release.label()} was published to "
            f"{len(sent)} device(s)"
            + (f" ({', '.join(sent)})" if sent else "")
            + (f", and as a shadow to {', '.join(shadowed)}" if shadowed else "")
            + "; the devices were left as they are"
        )


def _label(ref: ModelRef | None) -> str:
    return "no model" if ref is None else ref.label()


def _back(target: _Target, state: ReportedModelState | None) -> bool:
    """Whether a halted canary is back on its previous version.

    It must report that version running. A canary that gave a verdict (installed,
    refused, rolled back) changes its report when it takes the rollback, so that is
    enough. One that had not reported on the release yet must also have reported since
    the release was published (it may still be about to install it, and would then take
    the rollback after); or be offline, when the retained state it gets on reconnecting
    is the rollback.
    """
    if target.previous is None or state is None or ModelRef.of(state) != target.previous:
        return False
    if state.state != "running":
        return False
    if target.state not in ("published", "offline"):
        return True
    if not target.online:
        return True
    return target.published_at is not None and state.reported_at >= target.published_at


def _restored_reason(target: _Target) -> str:
    if target.state in ("published", "offline"):
        where = "" if target.online else "; offline: the retained state is the rollback"
        return f"on {_label(target.previous)}; it gave no verdict on the release{where}"
    before = f" (was {target.state}: {target.reason})" if target.reason else ""
    return f"back on {_label(target.previous)}{before}"


def _accuracy_failure(target: _Target, release: ModelRef, options: RolloutOptions) -> str | None:
    """Why one canary's accuracy with the release fails the thresholds, or ``None``."""
    new = target.new
    if new is None or new.evaluated < options.min_evaluated:
        n = 0 if new is None else new.evaluated
        return (
            f"no_accuracy_evidence: {n} evaluation sample(s) answered by {release.label()}, "
            f"fewer than --min-evaluated {options.min_evaluated} (does the agent have an "
            "evaluation source and inference.enabled?)"
        )
    accuracy = new.accuracy
    assert accuracy is not None
    if options.min_accuracy is not None and accuracy < options.min_accuracy:
        return (
            f"accuracy_below_floor: {accuracy:.1%} on {new.evaluated} evaluation samples, "
            f"below --min-accuracy {options.min_accuracy:.1%}"
        )
    old = target.old
    if (
        options.max_accuracy_drop is not None
        and old is not None
        and old.evaluated >= options.min_evaluated
        and old.accuracy is not None
    ):
        drop = (old.accuracy - accuracy) * 100.0
        if drop > options.max_accuracy_drop:
            return (
                f"accuracy_drop: {accuracy:.1%} is {drop:.1f} points below "
                f"{_label(target.previous)}'s {old.accuracy:.1%} on this device "
                f"(--max-accuracy-drop {options.max_accuracy_drop:g})"
            )
    return None


def _by_previous(plan: _Plan, devices: Sequence[str]) -> dict[ModelRef, list[str]]:
    """The devices grouped by the model they ran before the rollout (sorted)."""
    groups: dict[ModelRef, list[str]] = {}
    for device in sorted(devices):
        previous = plan.targets[device].previous
        assert previous is not None
        groups.setdefault(previous, []).append(device)
    return dict(sorted(groups.items()))


def _names(doc: Any, ref: ModelRef) -> bool:
    """Whether a report's ``{model, version, variant, sha256}`` names ``ref``."""
    return isinstance(doc, dict) and (
        doc.get("model"),
        doc.get("version"),
        doc.get("variant"),
        doc.get("sha256"),
    ) == (ref.model, ref.version, ref.variant, ref.sha256)


def _shadow_figures(section: Any, ref: ModelRef) -> _ShadowFigures | None:
    """The entry of ``ref`` in a report's ``shadow.versions``; ``None`` if none or bad.

    The report is the device's own data: anything not in the expected types is ignored.
    """
    if not isinstance(section, dict):
        return None
    versions = section.get("versions")
    if not isinstance(versions, list):
        return None
    keys = (
        "compared",
        "agreed",
        "evaluated",
        "correct",
        "served_correct",
        "errors",
        "skipped",
        "too_slow",
    )
    for entry in versions:
        if not isinstance(entry, dict) or (
            entry.get("model"),
            entry.get("version"),
            entry.get("variant"),
        ) != (ref.model, ref.version, ref.variant):
            continue
        values = [entry.get(k, 0) for k in keys]
        if not all(type(v) is int and v >= 0 for v in values):
            return None
        figures = _ShadowFigures(*values)
        if (
            figures.agreed > figures.compared
            or figures.too_slow > figures.skipped
            or figures.evaluated > figures.compared
            or max(figures.correct, figures.served_correct) > figures.evaluated
        ):
            return None
        return figures
    return None


def _shadow_refusal(
    target: _Target,
    release: ModelRef,
    state: ReportedModelState | None,
    doc: Mapping[str, Any] | None,
    section: Any,
) -> str | None:
    """Why a canary fails its shadow stage right away, or ``None``."""
    if target.current == release:
        return (
            f"it reports {release.label()} serving during its shadow stage, which never installs it"
        )
    since = target.shadow_at
    failure = state.last_failure if state is not None else None
    if (
        state is not None
        and failure is not None
        and state.state == "failed"
        and since is not None
        and state.reported_at >= since
        and failure.version in (0, target.previous.version if target.previous else 0)
        and failure.reason not in RETRIED_REASONS
    ):
        why = f"desired_state_refused: {failure.reason}: {failure.detail}"
        if "shadow" in failure.detail:
            why += " (an agent older than shadow evaluation refuses a state naming a shadow)"
        return why
    if doc is not None and not isinstance(section, dict):
        return (
            "no_shadow_support: its inference report has no shadow section (an agent older "
            "than shadow evaluation: upgrade it, or leave it out with --devices)"
        )
    if isinstance(section, dict):
        last = section.get("last_failure")
        if (
            section.get("state") == "failed"
            and isinstance(last, dict)
            and last.get("version") == release.version
            and isinstance(last.get("reason"), str)
            and last["reason"] not in RETRIED_REASONS
        ):
            detail = str(last.get("detail", ""))[:500]
            return f"shadow_refused: {detail or last['reason']}"
    if target.shadow is not None and target.shadow.errors > 0:
        return (
            f"inference_error: {target.shadow.errors} shadow inference error(s) with "
            f"{release.label()}"
        )
    return None


def _shadow_enough(figures: _ShadowFigures | None, options: RolloutOptions) -> bool:
    """Whether a canary's shadow answered enough samples to be judged."""
    if figures is None or figures.compared < options.min_evaluated:
        return False
    return not options.judges_accuracy or figures.evaluated >= options.min_evaluated


def _shadow_failure(target: _Target, release: ModelRef, options: RolloutOptions) -> str | None:
    """Why one canary's shadow evidence fails the thresholds, or ``None``."""
    figures = target.shadow
    if figures is None or figures.compared < options.min_evaluated:
        n = 0 if figures is None else figures.compared
        why = (
            f"the device skipped {figures.too_slow} as too slow: its median time per sample "
            "is over the agent's inference.shadow_max_delay_ms"
            if figures is not None and figures.too_slow
            else "does the agent run inference.enabled on a source?"
        )
        return (
            f"no_shadow_evidence: {n} sample(s) answered by the shadow {release.label()}, "
            f"fewer than --min-evaluated {options.min_evaluated} ({why})"
        )
    agreement = figures.agreement
    assert agreement is not None
    if options.min_agreement is not None and agreement < options.min_agreement:
        return (
            f"shadow_disagreement: the shadow {release.label()} agrees with {agreement:.1%} "
            f"of {figures.compared} served answers, below --min-agreement "
            f"{options.min_agreement:.1%}"
        )
    if not options.judges_accuracy:
        return None
    if figures.evaluated < options.min_evaluated:
        return (
            f"no_shadow_evidence: {figures.evaluated} evaluation sample(s) answered by the "
            f"shadow {release.label()}, fewer than --min-evaluated {options.min_evaluated} "
            "(does the agent have an evaluation source?)"
        )
    accuracy, served = figures.accuracy, figures.served_accuracy
    assert accuracy is not None
    assert served is not None
    if options.min_accuracy is not None and accuracy < options.min_accuracy:
        return (
            f"accuracy_below_floor: the shadow {release.label()} scores {accuracy:.1%} on "
            f"{figures.evaluated} evaluation samples, below --min-accuracy "
            f"{options.min_accuracy:.1%} (the served answers: {served:.1%})"
        )
    drop = (served - accuracy) * 100.0
    if options.max_accuracy_drop is not None and drop > options.max_accuracy_drop:
        return (
            f"accuracy_drop: the shadow {release.label()} scores {accuracy:.1%}, {drop:.1f} "
            f"points below the served answers' {served:.1%} on the same "
            f"{figures.evaluated} evaluation samples (--max-accuracy-drop "
            f"{options.max_accuracy_drop:g})"
        )
    return None


def _shadow_summary(figures: _ShadowFigures | None) -> str:
    if figures is None:
        return "no figures"
    agreement = "-" if figures.agreement is None else f"{figures.agreement:.1%}"
    accuracy = "-" if figures.accuracy is None else f"{figures.accuracy:.1%}"
    served = "-" if figures.served_accuracy is None else f"{figures.served_accuracy:.1%}"
    return (
        f"agreement {agreement} of {figures.compared}, accuracy {accuracy} (served {served}) "
        f"on {figures.evaluated}"
    )


def _inference_reports(
    session: Session, fleets: Mapping[str, str], since: datetime
) -> dict[str, dict[str, Any]]:
    """Each device's newest ``telemetry/inference`` report stored at or after ``since``."""
    topics = [record_topic(f, d, "telemetry", INFERENCE_STREAM) for d, f in fleets.items()]
    newest = (
        select(func.max(Record.id))
        .where(
            Record.device_id.in_(sorted(fleets)),
            Record.kind == "telemetry",
            Record.topic.in_(topics),
            Record.received_at >= since,
        )
        .group_by(Record.device_id)
    )
    docs: dict[str, dict[str, Any]] = {}
    for device, body in session.execute(
        select(Record.device_id, Record.body).where(Record.id.in_(newest))
    ):
        try:
            doc = json.loads(bytes(body))
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict):
            docs[str(device)] = doc
    return docs


def _created_by(by: str | None) -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry and no $USER (containers)
        user = f"uid {os.getuid()}"
    return f"{by} (os user {user})" if by else user


# --- reading rollouts back -------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; they mean UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    value = _utc(value)
    return value.isoformat() if value is not None else None


def _evidence(row: Rollout) -> dict[str, Any]:
    try:
        doc = json.loads(row.evidence_json or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _rollout_doc(row: Rollout) -> dict[str, Any]:
    evidence = _evidence(row)
    return {
        "shadow": bool(evidence.get("shadow")),
        "min_agreement": evidence.get("min_agreement"),
        "id": row.id,
        "model": row.model,
        "version": row.version,
        "variant": row.variant,
        "sha256": row.sha256,
        "fleet": row.fleet,
        "state": row.state,
        "phase": row.phase,
        "reason": row.reason,
        "canary_fraction": row.canary_fraction,
        "canaries": row.canaries,
        "soak_s": row.soak_s,
        "max_failures": row.max_failures,
        "min_accuracy": row.min_accuracy,
        "max_accuracy_drop": row.max_accuracy_drop,
        "min_evaluated": row.min_evaluated,
        "install_timeout_s": row.install_timeout_s,
        "created_by": row.created_by,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "finished_at": _iso(row.finished_at),
        "stale": row.state == "running"
        and (_utc(row.updated_at) or datetime.now(UTC))
        < datetime.now(UTC) - timedelta(seconds=STALE_AFTER_S),
    }


def list_rollouts(engine: Engine, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest rollouts first, each with its device counts per state.

    Raises:
        ConfigError: The registry cannot be read.
    """
    try:
        with Session(engine) as session:
            rows = list(
                session.scalars(select(Rollout).order_by(Rollout.created_at.desc()).limit(limit))
            )
            counts: dict[str, dict[str, int]] = {}
            if rows:
                for rid, state, n in session.execute(
                    select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
                    .where(RolloutDevice.rollout_id.in_([r.id for r in rows]))
                    .group_by(RolloutDevice.rollout_id, RolloutDevice.state)
                ):
                    counts.setdefault(str(rid), {})[str(state)] = int(n)
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot read the rollouts in the registry: {exc}",
            hint="`edgefl server start` (or `edgefl server rollout`) migrates the registry",
        ) from exc
    return [
        {
            **_rollout_doc(r),
            "devices": sum(counts.get(r.id, {}).values()),
            "device_states": counts.get(r.id, {}),
        }
        for r in rows
    ]


def read_rollout(engine: Engine, rollout_id: str) -> dict[str, Any]:
    """One rollout with each device's state, reason, what it runs now and its results.

    ``now`` is the device's current reported model; ``results`` counts the stored result
    records the rollout's release computed on it (``records.model_version``), so a device
    that ever answered with the release shows it.

    Raises:
        BadInputError: No such rollout.
        ConfigError: The registry cannot be read.
    """
    try:
        with Session(engine) as session:
            row = session.get(Rollout, rollout_id)
            if row is None:
                raise BadInputError(
                    f"no rollout {rollout_id!r} in the registry",
                    hint="list them with `edgefl server rollouts`",
                )
            devices = list(
                session.scalars(
                    select(RolloutDevice)
                    .where(RolloutDevice.rollout_id == rollout_id)
                    .order_by(RolloutDevice.cohort, RolloutDevice.device_id)
                )
            )
            ids = [d.device_id for d in devices]
            now = read_model_states(session, ids)
            presence = {
                str(d): bool(o)
                for d, o in session.execute(
                    select(Device.device_id, Device.online).where(Device.device_id.in_(ids))
                )
            }
            results = {
                str(d): int(n)
                for d, n in session.execute(
                    select(Record.device_id, func.count())
                    .where(
                        Record.model == row.model,
                        Record.model_version == row.version,
                        Record.device_id.in_(ids),
                    )
                    .group_by(Record.device_id)
                )
            }
            doc = _rollout_doc(row)
            doc["evidence"] = _evidence(row)
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot read rollout {rollout_id} from the registry: {exc}",
            hint="`edgefl server start` (or `edgefl server rollout`) migrates the registry",
        ) from exc
    doc["devices"] = [
        {
            "device_id": d.device_id,
            "fleet": d.fleet,
            "cohort": d.cohort,
            "state": d.state,
            "reason": d.reason,
            "online": presence.get(d.device_id, False),
            "online_at_start": d.online_at_start,
            "previous": None
            if d.previous_model is None
            else {
                "model": d.previous_model,
                "version": d.previous_version,
                "variant": d.previous_variant,
                "sha256": d.previous_sha256,
            },
            "now": None
            if d.device_id not in now
            else {
                "model": now[d.device_id].model,
                "version": now[d.device_id].version,
                "variant": now[d.device_id].variant,
                "state": now[d.device_id].state,
            },
            "published_at": _iso(d.published_at),
            "evaluated": d.evaluated,
            "accuracy": d.accuracy,
            "previous_evaluated": d.previous_evaluated,
            "previous_accuracy": d.previous_accuracy,
            "results": results.get(d.device_id, 0),
            "shadow": (doc["evidence"].get("shadow_canaries") or {}).get(d.device_id),
            "updated_at": _iso(d.updated_at),
        }
        for d in devices
    ]
    return doc


def results_by_version(
    engine: Engine,
    *,
    model: str | None = None,
    version: int | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Stored ``result`` records per device and the model version that computed them.

    Rows are ``{device_id, model, version, variant, results, first_received,
    last_received}``; results whose body named no model have ``model`` ``None``.

    Raises:
        ConfigError: The registry cannot be read.
    """
    query = select(
        Record.device_id,
        Record.model,
        Record.model_version,
        Record.model_variant,
        func.count(),
        func.min(Record.received_at),
        func.max(Record.received_at),
    ).where(Record.kind == "result")
    if model is not None:
        query = query.where(Record.model == model)
    if version is not None:
        query = query.where(Record.model_version == version)
    if device is not None:
        query = query.where(Record.device_id == device)
    query = query.group_by(
        Record.device_id, Record.model, Record.model_version, Record.model_variant
    ).order_by(Record.device_id, Record.model, Record.model_version, Record.model_variant)
    try:
        with Session(engine) as session:
            rows = list(session.execute(query))
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the results in the registry: {exc}") from exc
    return [
        {
            "device_id": str(d),
            "model": m,
            "version": None if v is None else int(v),
            "variant": var,
            "results": int(n),
            "first_received": _iso(first),
            "last_received": _iso(last),
        }
        for d, m, v, var, n, first, last in rows
    ]
