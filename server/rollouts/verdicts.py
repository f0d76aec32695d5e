"""Verdicts on one device at a time: installed, failed, restored, and why.

Every judgement reads one device's own reports: accuracy is never pooled across devices.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from edgefl.server.device_states import ReportedModelState
from edgefl.server.rollouts.options import RETRIED_REASONS, RolloutOptions
from edgefl.server.rollouts.plan import ModelRef, _label, _ShadowFigures, _Target

__all__ = ["choose_canaries", "classify"]


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
