"""The device's privacy state: σ chosen once and one Opacus RDP accountant kept across rounds.

A device keeps one :class:`PrivacyState` per run. It holds the noise multiplier σ the
device chose the first time it trained in the run (for its own sample rate, sized so that
``rounds × local_epochs`` epochs reach the target ε at δ) and its accountant history
``[[σ, q, steps], ...]`` (Opacus' ``RDPAccountant.history``). Each round loads the history
into a fresh ``PrivacyEngine`` (a fresh module each time: Opacus refuses to hook a module
twice), and saves it back afterwards, so the ε it reports is the true running total.

Where it lives (:class:`PrivacyStore`): in simulation, ``context.state`` (a ConfigRecord
holding JSON); on a device, a JSON file in the node's ``state-dir``, replaced atomically.

The pure accounting (:func:`epsilon_of`, :func:`choose_sigma`) imports Opacus lazily.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

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


def steps_per_round(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """Opacus' Poisson sample rate and the DP-SGD steps one round takes.

    ``DPDataLoader`` uses ``q = 1 / len(loader)`` with ``len(loader) = ceil(n / B)`` and
    takes ``len(loader)`` steps per epoch.
    """
    batches = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / batches, batches * local_epochs


def history_steps(history: list[list[float]]) -> int:
    """Total DP-SGD steps in an accountant history."""
    return int(sum(h[2] for h in history))


def merge_history(
    history: list[list[float]], sigma: float, q: float, steps: int
) -> list[list[float]]:
    """``history`` plus ``steps`` steps at (σ, q), merged like Opacus' ``RDPAccountant.step``."""
    out = [list(h) for h in history]
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1][2] = out[-1][2] + steps
    else:
        out.append([sigma, q, steps])
    return out


def epsilon_of(history: list[list[float]], delta: float) -> float:
    """ε of an RDP accountant history at δ (0 for an empty history).

    Exactly what Opacus' ``RDPAccountant.get_epsilon`` computes (same orders, same
    conversion), but the per-step RDP curve of each (σ, q) is cached: RDP composes
    linearly in the number of steps, and the server asks this for every device every
    round.
    """
    if not history:
        return 0.0
    import numpy as np
    from opacus.accountants.analysis import rdp as analysis

    orders = _orders()
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total = total + np.asarray(_rdp_per_step(float(sigma), float(q))) * int(steps)
    eps, _ = analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


@lru_cache(maxsize=1)
def _orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


@lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> tuple[float, ...]:
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_orders())
    return tuple(float(v) for v in curve)


@lru_cache(maxsize=256)
def choose_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (RDP accountant) reaching ``target_epsilon`` after ``steps`` steps.

    A pure function of its arguments and slow (a search over σ, seconds per call), so it
    is cached: devices with the same partition size share one search per process.
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    )
