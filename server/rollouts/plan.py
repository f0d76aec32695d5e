"""What a rollout knows of each target: the models it runs, its reported figures, its row.

The reports are the devices' own data: a figure not of the expected type or range is
ignored (``None``), never trusted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.proto.desired import DesiredState
from edgefl.server.device_states import ReportedModelState

__all__ = ["ModelRef"]

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
    values = _entry(doc.get("versions"), ref, ("evaluated", "correct", "errors"))
    if values is None:
        return None
    evaluated, correct, errors = values
    if correct > evaluated:
        return None
    return _Figures(evaluated, correct, errors)


def _entry(versions: Any, ref: ModelRef, keys: Sequence[str]) -> list[int] | None:
    """The ``keys`` (0 if left out) of ``ref``'s entry in a report's ``versions`` list.

    ``None`` when there is no such entry, or one of its figures is not a whole number
    of 0 or more.
    """
    if not isinstance(versions, list):
        return None
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
        return values
    return None


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

    def fail_also(self, why: str) -> None:
        """Fail, keeping the reason it had (``reason; why``)."""
        self.set("failed", f"{self.reason + '; ' if self.reason else ''}{why}")

    def see(self, state: ReportedModelState | None, online: bool, release: ModelRef) -> None:
        """Take one look's presence and reported model (and whether it ran ``release``)."""
        self.online = online
        current = ModelRef.of(state)
        if current != self.current:
            self.current, self.dirty = current, True
        if current == release:
            self.ran_release = True


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


def _label(ref: ModelRef | None) -> str:
    return "no model" if ref is None else ref.label()


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
    values = _entry(section.get("versions"), ref, keys)
    if values is None:
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


def _by_previous(plan: _Plan, devices: Sequence[str]) -> dict[ModelRef, list[str]]:
    """The devices grouped by the model they ran before the rollout (sorted)."""
    groups: dict[ModelRef, list[str]] = {}
    for device in sorted(devices):
        previous = plan.targets[device].previous
        assert previous is not None
        groups.setdefault(previous, []).append(device)
    return dict(sorted(groups.items()))
