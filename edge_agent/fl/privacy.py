"""The device's privacy state: σ chosen once and one Opacus RDP accountant kept across rounds.

A device keeps one :class:`PrivacyState` per run. It holds the noise multiplier σ the
device chose the first time it trained in the run (for its own sample rate, sized so that
``rounds × local_epochs`` epochs reach the target ε at δ) and its accountant history
``[[σ, q, steps], ...]`` (Opacus' ``RDPAccountant.history``). Each round loads the history
into a fresh ``PrivacyEngine`` (a fresh module each time: Opacus refuses to hook a module
twice), and saves it back afterwards, so the ε it reports is the true running total.

Where it lives (:class:`PrivacyStore`): in simulation, ``context.state`` (a ConfigRecord
holding JSON); on a device, a JSON file in the node's ``state-dir``, replaced atomically.

The pure accounting (:func:`epsilon_of`, :func:`choose_sigma`) lives in :mod:`edgefl.privacy`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

# The pure accounting moved to the shared layer (the server needs it too); the names stay
# importable from here.
from edgefl.privacy import (
    choose_sigma,
    epsilon_of,
    history_steps,
    merge_history,
    steps_per_round,
)

__all__ = [
    "ContextPrivacyStore",
    "FilePrivacyStore",
    "PrivacyState",
    "PrivacyStore",
    "choose_sigma",
    "epsilon_of",
    "history_steps",
    "merge_history",
    "steps_per_round",
]

_STATE_KEY = "edgefl.privacy"


@dataclass
class PrivacyState:
    """One device's privacy state in one run (see the module docstring)."""

    run_id: str
    plan_key: str
    sigma: float
    sample_rate: float
    steps_per_round: int
    history: list[list[float]] = field(default_factory=list)

    def to_json(self) -> str:
        """Serialise."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PrivacyState:
        """Parse :meth:`to_json` output."""
        data = json.loads(text)
        return cls(**data)


class PrivacyStore(Protocol):
    """Where a device keeps its :class:`PrivacyState`."""

    def load(self, run_id: str) -> PrivacyState | None:
        """The state of ``run_id`` (None if the device never trained in it)."""
        ...

    def save(self, state: PrivacyState) -> None:
        """Persist ``state`` (before the reply leaves the device)."""
        ...


class ContextPrivacyStore:
    """Keeps the state in the Flower ``Context.state`` (simulation: it lives with the node)."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def load(self, run_id: str) -> PrivacyState | None:
        """The state of ``run_id`` from ``context.state``."""
        record = self._context.state.config_records.get(_STATE_KEY)
        if record is None or "json" not in record:
            return None
        state = PrivacyState.from_json(str(record["json"]))
        return state if state.run_id == run_id else None

    def save(self, state: PrivacyState) -> None:
        """Write the state into ``context.state``."""
        from flwr.app import ConfigRecord

        self._context.state[_STATE_KEY] = ConfigRecord({"json": state.to_json()})


class FilePrivacyStore:
    """Keeps the states of all runs in ``<state_dir>/fl_privacy.json`` (atomic replace)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "fl_privacy.json"

    def _all(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict):
            from edgefl.errors import BadInputError

            raise BadInputError(f"{self.path}: privacy state is not a JSON object")
        return data

    def load(self, run_id: str) -> PrivacyState | None:
        """The state of ``run_id`` from the file."""
        entry = self._all().get(run_id)
        return PrivacyState(**entry) if entry else None

    def save(self, state: PrivacyState) -> None:
        """Write the state (other runs' states are kept)."""
        from edgefl.files import write_text_atomic

        data = self._all()
        data[state.run_id] = asdict(state)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(data, indent=1))
