"""The device's privacy plan for a run, its accountant across rounds, and its lifetime budget.

**The plan (one per run).** The first time a device trains in a run it fixes everything
the accounting depends on, for every round the run plans:

- ``K = ceil(N0 / batch_size)`` batches per epoch, from ``N0``, the size of its training
  data at that moment; the Poisson sample rate ``q = 1 / K``; ``S = K × local_epochs``
  DP-SGD steps per round;
- the noise multiplier σ, the smallest that keeps ``rounds × S`` steps at rate ``q``
  within the run's target ε at δ (Opacus' ``get_noise_multiplier``, RDP accountant).

Every later round takes exactly ``S`` steps at rate ``q`` and noise σ, **whatever the data
store holds by then**: each step samples every sample of the *current* store
independently with probability ``q`` (Poisson sampling, so the expected batch is
``N_now × q``, a little larger as the store grows) and the accountant records
``(σ, q, S)``. The Poisson-subsampled Gaussian mechanism's RDP depends on σ, q and the
number of steps only, not on how many samples there are, so the accounting is exact for
any store size and the planned rounds end at ε <= target, as planned: a device whose store
grows during a run no longer runs out of budget before its last round (before, q and the
steps per round were recomputed from the growing store, and the last round would have
passed ε and was refused).

Why this and not the alternatives: drawing a fixed-size subset of ``N0`` samples from the
store each round would change the neighbouring relation (a sample added to the store
displaces another in the subset: substitution, not the add/remove relation Opacus'
accountant assumes); re-planning σ every round from the remaining budget is exact too, but
makes σ (the noise) change from round to round, costs a σ search per round, and the
server could no longer predict a device's next round from its last ledger row
(``next_round_epsilon``), which budget-aware selection relies on. A fixed plan keeps both.
Re-planning is used only where there is no plan to keep: a device whose state was lost
but whose spend the server's ledger floor shows, or a plan change mid-run, plans σ for the
rounds left from the budget left (:func:`edgefl.privacy.choose_sigma_after`).

Training takes its DataLoader from the plan (``batches_per_epoch``), so Opacus' own
``int(1 / q)`` (which gives ``K - 1`` for some ``K``: 93, 99, 105, ...) never changes the
steps behind the accountant's back.

**The accountant (one per run).** :class:`PrivacyState` holds the plan and the accountant
history ``[[σ, q, steps], ...]`` (Opacus' ``RDPAccountant.history``). Each round loads the
history into a fresh ``PrivacyEngine`` (a fresh module each time: Opacus refuses to hook a
module twice), and saves it back afterwards, so the ε it reports is the true running total.

**The lifetime accountant (across runs).** A device that joins many runs composes their
privacy loss: the per-run cap alone lets ε grow without bound over a device's life. The
device's lifetime ε is the RDP composition of every run's history it holds
(:func:`edgefl.privacy.compose`, exact, and never looser than summing the runs' ε) at the
lifetime δ; :class:`LifetimeBudget` is its cap (the agent config's
``training.privacy.lifetime_epsilon``, default 16, and ``lifetime_delta``, default 1e-5,
reaching the ClientApp as node config ``lifetime-epsilon`` / ``lifetime-delta``). A device
refuses, with status ``lifetime_budget_exhausted``, a run whose plan would take it past
the cap (checked once, when it plans the run: it never starts a run it cannot finish),
and any round that would (checked every round, whatever the server says about the run).
Runs without local DP are not accounted (they give no local guarantee to compose).

Where it lives (:class:`PrivacyStore`): in simulation, ``context.state`` (a ConfigRecord
holding JSON; that node knows only its current run); on a device, the JSON file
``<state_dir>/fl_privacy.json`` holding every run's state, replaced atomically. That file
is the device's lifetime accountant: deleting it forgets the device's past runs.

The pure accounting (:func:`epsilon_of`, :func:`choose_sigma`) lives in :mod:`edgefl.privacy`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

# The pure accounting moved to the shared layer (the server needs it too); the names stay
# importable from here.
from edgefl.privacy import (
    choose_sigma,
    choose_sigma_after,
    compose,
    epsilon_of,
    history_steps,
    merge_history,
    rdp_curves,
    seed_rdp_curves,
    steps_per_round,
)

__all__ = [
    "DEFAULT_LIFETIME_DELTA",
    "DEFAULT_LIFETIME_EPSILON",
    "LIFETIME_FILE",
    "ContextPrivacyStore",
    "FilePrivacyStore",
    "LifetimeBudget",
    "PrivacyState",
    "PrivacyStore",
    "RdpCurveCache",
    "choose_sigma",
    "epsilon_of",
    "history_steps",
    "lifetime_history",
    "merge_history",
    "plan_run",
    "read_lifetime",
    "steps_per_round",
    "write_lifetime",
]

_STATE_KEY = "edgefl.privacy"

LIFETIME_FILE = "fl_lifetime.json"
"""In the state dir: the device's lifetime ε after its last round (:func:`write_lifetime`)."""

DEFAULT_LIFETIME_EPSILON = 16.0
"""The agent config's default ``training.privacy.lifetime_epsilon``: twice the shipped
per-run target ε=8. Under RDP composition five runs of that plan (digits, 1,364 samples,
batch 32, 5 rounds) compose to ε ≈ 15.3 at δ=1e-5, so about five such runs fit."""

DEFAULT_LIFETIME_DELTA = 1e-5
"""The agent config's default ``training.privacy.lifetime_delta`` (the plans' default δ)."""


@dataclass
class PrivacyState:
    """One device's privacy plan and accountant in one run (see the module docstring).

    Attributes:
        run_id: The run.
        plan_key: Fingerprint of the plan the state was made for (a new plan re-plans).
        sigma: Noise multiplier, fixed for the run.
        sample_rate: Poisson sample rate ``q = 1 / batches_per_epoch``, fixed for the run.
        steps_per_round: DP-SGD steps per round, ``batches_per_epoch × local_epochs``.
        history: Opacus accountant history ``[[σ, q, steps], ...]``.
        batches_per_epoch: ``K`` of the plan (0 in states written before plans were kept:
            then derived from ``sample_rate``).
        plan_examples: Training samples the plan was sized on (``N0``).
        planned_rounds: Rounds σ was sized for.
        delta: δ of the run's guarantee.
        lifetime_refused_cap: The lifetime cap under which the device refused the run's
            plan (0: not refused). The refusal holds for the rest of the run unless the cap
            is raised.
    """

    run_id: str
    plan_key: str
    sigma: float
    sample_rate: float
    steps_per_round: int
    history: list[list[float]] = field(default_factory=list)
    batches_per_epoch: int = 0
    plan_examples: int = 0
    planned_rounds: int = 0
    delta: float = 0.0
    lifetime_refused_cap: float = 0.0

    @property
    def batches(self) -> int:
        """Batches per epoch of the plan."""
        if self.batches_per_epoch > 0:
            return self.batches_per_epoch
        return max(1, round(1.0 / self.sample_rate)) if self.sample_rate > 0 else 1

    def to_json(self) -> str:
        """Serialise."""
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyState:
        """Parse a stored state; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> PrivacyState:
        """Parse :meth:`to_json` output."""
        data = json.loads(text)
        return cls.from_dict(data)


def plan_run(
    *,
    run_id: str,
    plan_key: str,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    dp: bool,
    spent: list[list[float]],
) -> PrivacyState:
    """Fix the run's plan (K, q, steps per round, σ) from the data held now.

    Args:
        run_id: The run.
        plan_key: The plan's fingerprint.
        num_examples: Training samples in the store now (``N0``).
        batch_size: Expected batch size.
        local_epochs: Local epochs per round.
        rounds: Rounds σ must last for (the run's planned rounds, or the rounds left
            when re-planning).
        target_epsilon: The run's target ε.
        delta: The run's δ.
        dp: Whether the run uses local DP (σ = 0 without).
        spent: The accountant history already spent in this run (empty for a new plan).

    Returns:
        The new state, holding ``spent`` as its history.
    """
    q, steps = steps_per_round(num_examples, batch_size, local_epochs)
    batches = steps // local_epochs
    sigma = 0.0
    if dp:
        if not spent:
            sigma = choose_sigma(target_epsilon, delta, q, steps * rounds)
        else:
            try:
                sigma = choose_sigma_after(spent, target_epsilon, delta, q, steps * rounds)
            except ValueError:
                # Nothing left: any σ does, the budget check refuses the round.
                sigma = choose_sigma(target_epsilon, delta, q, steps * rounds)
    return PrivacyState(
        run_id=run_id,
        plan_key=plan_key,
        sigma=sigma,
        sample_rate=q,
        steps_per_round=steps,
        history=[list(h) for h in spent],
        batches_per_epoch=batches,
        plan_examples=num_examples,
        planned_rounds=rounds,
        delta=delta,
    )


@dataclass(frozen=True)
class LifetimeBudget:
    """A device's lifetime cap across runs (``epsilon`` None: no cap) and its δ."""

    epsilon: float | None = DEFAULT_LIFETIME_EPSILON
    delta: float = DEFAULT_LIFETIME_DELTA

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> LifetimeBudget:
        """``lifetime-epsilon`` (absent or <= 0: no cap) and ``lifetime-delta``.

        A node without ``lifetime-epsilon`` (a simulation, an agent older than the
        lifetime budget) has no cap; its lifetime ε is still computed and reported.

        Raises:
            EdgeflError: A value is not a number, or δ is not in (0, 1).
        """
        from edgefl.errors import EdgeflError

        try:
            cap = float(node_config.get("lifetime-epsilon", 0.0))
            delta = float(node_config.get("lifetime-delta", DEFAULT_LIFETIME_DELTA))
        except (TypeError, ValueError) as exc:
            raise EdgeflError(
                f"node config lifetime-epsilon/lifetime-delta is not a number: {exc}",
                hint="set training.privacy.lifetime_epsilon and lifetime_delta in the agent "
                "config to numbers",
            ) from exc
        if not (0.0 < delta < 1.0) or not math.isfinite(cap):
            raise EdgeflError(
                f"node config lifetime-delta={delta} must be in (0, 1) and "
                f"lifetime-epsilon={cap} finite",
                hint="fix training.privacy in the agent config",
            )
        return cls(cap if cap > 0 else None, delta)


def lifetime_history(
    runs: dict[str, PrivacyState], run_id: str, current: list[list[float]]
) -> list[list[float]]:
    """Every other run's history in ``runs`` composed with ``current`` (this run's)."""
    others = [s.history for rid, s in sorted(runs.items()) if rid != run_id]
    return compose([*others, current])


class PrivacyStore(Protocol):
    """Where a device keeps its :class:`PrivacyState` of each run."""

    def load(self, run_id: str) -> PrivacyState | None:
        """The state of ``run_id`` (None if the device never trained in it)."""
        ...

    def save(self, state: PrivacyState) -> None:
        """Persist ``state`` (before the reply leaves the device)."""
        ...

    def runs(self) -> dict[str, PrivacyState]:
        """The state of every run the store knows (the lifetime accountant's input)."""
        ...


class ContextPrivacyStore:
    """Keeps the state in the Flower ``Context.state`` (simulation: it lives with the node).

    It holds the current run only, so its lifetime is that run.
    """

    def __init__(self, context: Any) -> None:
        self._context = context

    def _state(self) -> PrivacyState | None:
        record = self._context.state.config_records.get(_STATE_KEY)
        if record is None or "json" not in record:
            return None
        return PrivacyState.from_json(str(record["json"]))

    def load(self, run_id: str) -> PrivacyState | None:
        """The state of ``run_id`` from ``context.state``."""
        state = self._state()
        return state if state is not None and state.run_id == run_id else None

    def save(self, state: PrivacyState) -> None:
        """Write the state into ``context.state``."""
        from flwr.app import ConfigRecord

        self._context.state[_STATE_KEY] = ConfigRecord({"json": state.to_json()})

    def runs(self) -> dict[str, PrivacyState]:
        """The one run this node's context holds."""
        state = self._state()
        return {state.run_id: state} if state is not None else {}


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

    def _parse(self, run_id: str, entry: Any) -> PrivacyState:
        try:
            if not isinstance(entry, dict):
                raise TypeError("not a JSON object")
            return PrivacyState.from_dict(entry)
        except TypeError as exc:
            from edgefl.errors import BadInputError

            raise BadInputError(
                f"{self.path}: the privacy state of run {run_id!r} is unreadable: {exc}",
                hint="restore the file from a backup; the device refuses to train without "
                "its accountant (deleting it would forget the privacy its past runs spent)",
            ) from exc

    def load(self, run_id: str) -> PrivacyState | None:
        """The state of ``run_id`` from the file."""
        entry = self._all().get(run_id)
        return self._parse(run_id, entry) if entry else None

    def save(self, state: PrivacyState) -> None:
        """Write the state (other runs' states are kept)."""
        from edgefl.files import write_text_atomic

        data = self._all()
        data[state.run_id] = asdict(state)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(data, indent=1))

    def runs(self) -> dict[str, PrivacyState]:
        """Every run's state in the file."""
        return {rid: self._parse(rid, entry) for rid, entry in self._all().items() if entry}


class RdpCurveCache:
    """The per-step RDP curves a device computed, kept in ``<state_dir>/fl_rdp_curves.json``.

    Each message runs in a new process (forked or cold), so the curves
    :func:`edgefl.privacy.epsilon_of` caches in memory were computed again for every
    message: a few tenths of a second of Opacus arithmetic each time, on the same (σ, q)
    every round of a run. :meth:`load` seeds them from the file before the accounting,
    :meth:`save` writes the file again when the message computed new ones. The values are
    the same floats (JSON round-trips them exactly), so ε is unchanged to the last bit; a
    file that is unreadable or made for other orders is ignored (the curves are computed).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "fl_rdp_curves.json"
        self._known = 0

    def load(self) -> int:
        """Seed the in-memory curves from the file; returns how many were loaded."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
        self._known = seed_rdp_curves(doc)
        return self._known

    def save(self) -> None:
        """Write the curves back if this process computed new ones (never raises)."""
        doc = rdp_curves()
        curves = doc["curves"]
        if not isinstance(curves, list) or len(curves) <= self._known:
            return
        from edgefl.files import write_text_atomic

        try:
            write_text_atomic(self.path, json.dumps(doc))
            self._known = len(curves)
        except OSError:
            pass  # a cache: the next message computes them again


def write_lifetime(
    state_dir: Path, epsilon: float, delta: float, cap: float | None, runs: int
) -> None:
    """Record the lifetime ε after a round, for ``edgefl agent status`` (never raises).

    The agent's status reads this small file instead of recomputing the composition
    (which would import Opacus and torch into a status command).
    """
    from edgefl.files import write_text_atomic

    doc = {
        "lifetime_epsilon": epsilon,
        "lifetime_delta": delta,
        "lifetime_cap": cap,
        "runs": runs,
        "updated_at": time.time(),
    }
    # On failure, status recomputes it from fl_privacy.json.
    with contextlib.suppress(OSError):
        write_text_atomic(Path(state_dir) / LIFETIME_FILE, json.dumps(doc) + "\n")


def read_lifetime(state_dir: Path, cap: float | None, delta: float) -> dict[str, Any] | None:
    """The device's lifetime privacy spend for its status; ``None`` before it ever trained.

    ``lifetime_epsilon`` is what the ClientApp recorded after its last round
    (:data:`LIFETIME_FILE`) when that was at ``delta``; otherwise (an older agent, another
    δ in the config now) it is recomputed from every run's accountant in
    ``fl_privacy.json`` (exact, the same composition the device enforces). ``lifetime_cap``
    and ``lifetime_delta`` are the config's now. A damaged accountant file is reported as
    ``error``.
    """
    from edgefl.errors import BadInputError

    state_dir = Path(state_dir)
    store = FilePrivacyStore(state_dir)
    out: dict[str, Any] = {"lifetime_cap": cap, "lifetime_delta": delta}
    try:
        recorded = json.loads((state_dir / LIFETIME_FILE).read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            recorded = {}
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("lifetime_delta") == delta and isinstance(
        recorded.get("lifetime_epsilon"), int | float
    ):
        out.update(
            lifetime_epsilon=float(recorded["lifetime_epsilon"]),
            runs=int(recorded.get("runs") or 0),
            updated_at=recorded.get("updated_at"),
            source="last round",
        )
    else:
        if not store.path.exists():
            return None
        try:
            runs = store.runs()
        except (BadInputError, ValueError, OSError) as exc:
            return {**out, "error": str(exc)}
        history = compose([r.history for _, r in sorted(runs.items())])
        out.update(
            lifetime_epsilon=epsilon_of(history, delta),
            runs=sum(1 for r in runs.values() if r.history),
            updated_at=None,
            source="recomputed",
        )
    eps = out["lifetime_epsilon"]
    out["lifetime_remaining"] = None if cap is None else max(0.0, cap - eps)
    return out
