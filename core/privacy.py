"""Privacy accounting both roles share: RDP ε of an accountant history, σ for a budget.

A device spends its budget (:mod:`edgefl.edge_agent.fl.privacy` keeps its state); the
server checks what devices report against the plan's caps
(:mod:`edgefl.server.fl.strategy`). Both must compute the same number, so the arithmetic
lives here, below both. Histories are ``[[σ, q, steps], ...]`` as in Opacus'
``RDPAccountant.history``.

The accounting imports Opacus lazily: it is the reference implementation, and the
``server``, ``training`` and ``sim`` extras all install it.

Composition across runs (a device's lifetime, :func:`compose`): RDP composes by adding
the per-step RDP curves of every mechanism, whatever run it belonged to, so a device's
lifetime guarantee is :func:`epsilon_of` over the concatenation of all its runs'
histories, converted once at the lifetime δ. That is exact for what the device ran (each
run's δ is only a conversion parameter and plays no part) and never looser than summing
the runs' ε (basic composition): two runs at ε=8 compose to about 10.3, not 16.
"""

from __future__ import annotations

import math
from functools import lru_cache

__all__ = [
    "choose_sigma",
    "choose_sigma_after",
    "compose",
    "epsilon_of",
    "history_steps",
    "merge_history",
    "steps_per_round",
]


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


def compose(histories: list[list[list[float]]]) -> list[list[float]]:
    """One accountant history holding every history in ``histories`` (RDP composition).

    The entries are kept apart (never merged across histories), so each run's part stays
    visible; :func:`epsilon_of` of the result is the composed ε.
    """
    return [list(h) for history in histories for h in history]


def choose_sigma_after(
    spent: list[list[float]],
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
) -> float:
    """The smallest σ with which ``steps`` more steps at ``sample_rate`` keep ε <= target.

    ``spent`` is what the accountant already holds (a re-plan after lost state, or after
    a plan change). The search is a bisection on the exact :func:`epsilon_of` of the
    composed history, so the answer is never over the target (to 1e-6 relative in σ,
    always on the safe side).

    Raises:
        ValueError: ``spent`` alone is already at or past ``target_epsilon``, or even σ =
            10,000 does not fit.
    """
    if epsilon_of(spent, delta) >= target_epsilon:
        raise ValueError(
            f"the spent budget (ε={epsilon_of(spent, delta):.4f}) leaves nothing of "
            f"ε={target_epsilon}"
        )

    def fits(sigma: float) -> bool:
        return epsilon_of([*spent, [sigma, sample_rate, steps]], delta) <= target_epsilon

    hi = 1.0
    while not fits(hi):
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"no σ up to 10,000 keeps ε <= {target_epsilon}")
    lo = hi / 2.0 if hi > 1.0 else 0.0
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2.0
        if mid > 0 and fits(mid):
            hi = mid
        else:
            lo = mid
    return hi
