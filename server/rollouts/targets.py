"""The targets of a rollout, checked before anything is published.

Which admitted devices the options name, whether another running rollout holds one,
and the states a halt or a shadow stage would send each canary (signed later).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from edgefl.errors import BadInputError
from edgefl.server.registry.models import Rollout, RolloutDevice
from edgefl.server.rollout import desired_state, published_variants
from edgefl.server.rollouts.options import STALE_AFTER_S, RolloutOptions
from edgefl.server.rollouts.plan import _Plan

__all__ = ["add_rollbacks", "add_shadow_states", "chosen_targets", "held_elsewhere"]


def chosen_targets(options: RolloutOptions, admitted: Mapping[str, str]) -> dict[str, str]:
    """Device -> fleet of the admitted devices the options name.

    Raises:
        BadInputError: An unknown device, a device of another fleet, or no device.
    """
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


def held_elsewhere(session: Session, devices: set[str]) -> dict[str, list[str]]:
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


def add_rollbacks(
    plan: _Plan,
    *,
    releases_dir: Path,
    engine: Engine,
    issued: int,
    expires: int,
    revoked: list[str],
) -> None:
    """The rollback state of each canary's previous version, checked now.

    Raises:
        BadInputError: A canary runs a model a halt could not roll it back to.
    """
    for device in plan.canaries:
        previous = plan.targets[device].previous
        if previous is None:
            plan.notes.append(f"canary {device} runs no model: a halt cannot roll it back to one")
            continue
        if previous == plan.release or previous in plan.rollbacks:
            continue
        try:
            state = desired_state(
                releases_dir,
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
            assert state.model is not None
            published_variants(engine, previous.model, previous.version).check(
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


def add_shadow_states(plan: _Plan) -> None:
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
