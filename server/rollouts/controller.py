"""The staged rollout controller, :class:`StagedRollout` (the steps: :mod:`.staged_rollout`)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edgefl.errors import BadInputError, ConfigError, EdgeflError, ServiceUnavailableError
from edgefl.proto.desired import DesiredState
from edgefl.proto.ids import InvalidIdError, check_id
from edgefl.proto.topics import state_desired_topic
from edgefl.server.device_states import read_model_states
from edgefl.server.rollout import (
    desired_state,
    publish_retained,
    published_variants,
    rollout_identity,
)
from edgefl.server.rollouts.options import HEARTBEAT_S, RolloutOptions
from edgefl.server.rollouts.plan import (
    ModelRef,
    _by_previous,
    _Figures,
    _figures,
    _label,
    _names,
    _Plan,
    _shadow_figures,
    _Target,
)
from edgefl.server.rollouts.records import read_rollout, record_end, record_start, touch, write_rows
from edgefl.server.rollouts.targets import (
    add_rollbacks,
    add_shadow_states,
    chosen_targets,
    held_elsewhere,
)
from edgefl.server.rollouts.verdicts import (
    _accuracy_failure,
    _back,
    _restored_reason,
    _shadow_enough,
    _shadow_failure,
    _shadow_refusal,
    _shadow_summary,
    choose_canaries,
    classify,
)
from edgefl.server.rollouts.watch import look, presence

__all__ = ["RolloutProgress", "StagedRollout"]

log = logging.getLogger("edgefl.server.staged_rollout")

_NOT_PUBLISHED: Final = "not published: the rollout stopped before the rest"


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
        chosen = chosen_targets(options, admitted)
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
                online = presence(session, chosen)
                busy = held_elsewhere(session, set(chosen))
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
        add_rollbacks(
            plan,
            releases_dir=self.releases_dir,
            engine=engine,
            issued=issued,
            expires=expires,
            revoked=revoked,
        )
        if options.shadow:
            add_shadow_states(plan)
        rollout_identity(self.ca_dir)  # issued now if missing: a CA problem fails here
        self.plan = plan
        return plan

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
                    target.fail_also(
                        f"no previous model to roll back to: it keeps {plan.release.label()}"
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
                    target.fail_also(
                        f"not back on {target.previous.label()} within "
                        f"{self.options.install_timeout_s:g} s"
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
                    target.fail_also(
                        "the shadow not reported removed within "
                        f"{self.options.install_timeout_s:g} s"
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
        seen = look(engine, {d: plan.targets[d].fleet for d in devices}, since)
        if seen is None:
            return {}
        for device in devices:
            target = plan.targets[device]
            state = seen.reported.get(device)
            target.see(state, seen.online.get(device, False), release)
            doc = seen.reports.get(device)
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
        return seen.reports

    # -- watching ---------------------------------------------------------------------------

    def _observe(self, plan: _Plan, devices: Sequence[str], *, restoring: bool = False) -> None:
        """One look at the registry: reported states, presence, inference reports."""
        engine = self._engine
        assert engine is not None
        release = plan.release
        sent = [plan.targets[d].published_at for d in devices]
        since = min((t for t in sent if t is not None), default=None)
        seen = look(engine, {d: plan.targets[d].fleet for d in devices}, since)
        if seen is None:
            return
        for device in devices:
            target = plan.targets[device]
            state = seen.reported.get(device)
            target.see(state, seen.online.get(device, False), release)
            doc = seen.reports.get(device)
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
        engine = self._engine
        assert engine is not None
        record_start(engine, plan, self.options)
        self._heartbeat = time.monotonic()

    def _write(self, plan: _Plan) -> None:
        """Store the devices whose row changed (and the heartbeat)."""
        if not any(t.dirty for t in plan.targets.values()):
            return
        engine = self._engine
        assert engine is not None
        write_rows(engine, plan, self._phase)

    def _touch(self) -> None:
        engine = self._engine
        if engine is None or self.plan is None:
            return
        touch(engine, self.plan.rollout_id, self._phase)

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
            record_end(
                engine,
                plan.rollout_id,
                state=state,
                phase=self._phase if state != "completed" else "done",
                reason=reason,
                evidence=evidence,
                at=now,
            )
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
