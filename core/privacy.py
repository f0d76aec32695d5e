"""Privacy accounting both roles share: RDP ε of an accountant history, σ for a budget.

A device spends its budget (:mod:`edgefl.edge_agent.fl.privacy` keeps its state); the
server checks what devices report against the plan's caps
(:mod:`edgefl.server.fl.strategy`). Both must compute the same number, so the arithmetic
lives here, below both. Histories are ``[[σ, q, steps], ...]`` as in Opacus'
``RDPAccountant.history``.

The accounting imports Opacus lazily: it is the reference implementation, and the
``server``, ``training`` and ``sim`` extras all install it.
"""

from __future__ import annotations

import math
from functools import lru_cache

__all__ = [
    "choose_sigma",
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
