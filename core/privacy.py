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
    "rdp_curves",
    "seed_rdp_curves",
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


_CURVES: dict[tuple[float, float], tuple[float, ...]] = {}
_MAX_CURVES = 4096


def _rdp_per_step(sigma: float, q: float) -> tuple[float, ...]:
    curve = _CURVES.get((sigma, q))
    if curve is None:
        from opacus.accountants.analysis import rdp as analysis

        computed = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_orders())
        curve = tuple(float(v) for v in computed)
        if len(_CURVES) >= _MAX_CURVES:
            _CURVES.clear()
        _CURVES[(sigma, q)] = curve
    return curve


def rdp_curves() -> dict[str, object]:
    """The per-step RDP curves computed (or seeded) so far, as a JSON-able document.

    :func:`epsilon_of` computes one curve per (σ, q) with Opacus (a few tenths of a second
    each, over 151 orders); a process that lives for one message (a device's ClientApp)
    keeps them across messages with :func:`seed_rdp_curves`. The document names the
    orders, so curves computed for other orders are never reused.
    """
    return {
        "orders": _orders(),
        "curves": [[s, q, list(c)] for (s, q), c in _CURVES.items()],
    }


def seed_rdp_curves(doc: object) -> int:
    """Load curves :func:`rdp_curves` produced (exact: floats round-trip through JSON).

    A document for other orders, or one that is not of that shape, is ignored.

    Returns:
        How many curves were loaded.
    """
    if not isinstance(doc, dict) or doc.get("orders") != _orders():
        return 0
    entries = doc.get("curves")
    if not isinstance(entries, list):
        return 0
    size = len(_orders())
    loaded = 0
    for entry in entries[-_MAX_CURVES:]:
        try:
            sigma, q, values = float(entry[0]), float(entry[1]), entry[2]
            curve = tuple(float(v) for v in values)
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if len(curve) == size:
            _CURVES[(sigma, q)] = curve
            loaded += 1
    return loaded


_OPACUS_TOLERANCE = 0.005
"""The ε tolerance of the σ search (Opacus' ``get_noise_multiplier(epsilon_tolerance=...)``)."""
_MAX_SIGMA = 1e6  # Opacus' MAX_SIGMA
_MARGIN = 1e-6  # ε slack under which a pruned value is not relied on
_CUT = 0.01  # orders whose offset c_α is over target + this are not computed
_CLOSE = 1e-9  # relative distance to a decision's level under which ε is computed in full


@lru_cache(maxsize=256)
def choose_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (RDP accountant) reaching ``target_epsilon`` after ``steps`` steps.

    The same σ, to the last bit, as Opacus' ``get_noise_multiplier(target_epsilon,
    target_delta, sample_rate, steps, accountant="rdp", epsilon_tolerance=0.005)``: its
    bisection is replayed statement by statement (:class:`_SigmaSearch`), each step taking
    the same decision from the same ε. Only the orders that can hold ε's minimum are
    computed: ε is the minimum over the RDP orders α of ``steps·RDP_α(σ, q) + c_α`` with
    ``c_α = -(log δ + log α)/(α - 1) + log((α - 1)/α)`` and RDP >= 0, so an order whose
    ``c_α`` alone is over the target + 0.01 can never decide a step at the target (those are
    the orders just above 1, whose series are the slow part of Opacus' computation: about
    three quarters of it). A step whose ε comes within 1e-9 of its threshold computes ε
    over every order, exactly as Opacus does. Cached per process: devices with the same
    partition size share one search.

    Raises:
        ValueError: No σ up to Opacus' limit reaches the target (as Opacus raises).
    """
    return _SigmaSearch(target_epsilon, delta, sample_rate, steps).run()


class _SigmaSearch:
    """Opacus' σ bisection, with ε computed over the orders that can decide its steps."""

    def __init__(self, target: float, delta: float, q: float, steps: int) -> None:
        self.target, self.delta, self.q, self.steps = target, delta, q, steps
        orders = _orders()
        offset = [
            -(math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in orders
        ]
        cut = target + 1.0
        self.subset = [a for a, c in zip(orders, offset, strict=True) if c < cut]
        self.floor = min((c for c in offset if c >= cut), default=math.inf)
        self.full_evaluations = 0
        self.evaluations = 0

    def value(self, sigma: float) -> float:
        """ε(σ) where it is under the pruned orders' floor; a value above the target else.

        Every decision at a level <= the target takes the same answer from it as from the
        full ε (module docstring of :func:`choose_sigma`).
        """
        self.evaluations += 1
        if not self.subset:
            return self.floor - _MARGIN
        import warnings

        from opacus.accountants.analysis import rdp as analysis

        rdp = analysis.compute_rdp(
            q=self.q, noise_multiplier=sigma, steps=self.steps, orders=self.subset
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha"
            eps, _ = analysis.get_privacy_spent(orders=self.subset, rdp=rdp, delta=self.delta)
        eps = float(eps)
        if eps <= self.floor - _MARGIN:
            return eps  # the minimum is among the subset's orders: ε itself
        return min(eps, self.floor) - _MARGIN  # ε is at least this, over the target

    def full(self, sigma: float) -> float:
        self.full_evaluations += 1
        return epsilon_of([[sigma, self.q, self.steps]], self.delta)

    def eps(self, sigma: float, level: float) -> float:
        """ε(σ) for a decision at ``level``: in full when it comes close to the level."""
        value = self.value(sigma)
        if abs(value - level) <= _CLOSE * max(abs(level), 1.0):
            return self.full(sigma)
        return value

    def run(self) -> float:
        """Opacus' ``get_noise_multiplier`` loop, statement by statement."""
        target, tol = self.target, _OPACUS_TOLERANCE
        eps_high = math.inf
        sigma_low: float = 0
        sigma_high: float = 10
        while eps_high > target:
            sigma_high = 2 * sigma_high
            eps_high = self.eps(sigma_high, target)
            if sigma_high > _MAX_SIGMA:
                raise ValueError("The privacy budget is too low.")
        # eps_high decides `target - eps_high > tol` from here on: near that level, in full.
        eps_high = self.eps_at_tolerance(sigma_high, eps_high)
        while target - eps_high > tol:
            sigma = (sigma_low + sigma_high) / 2
            eps = self.eps(sigma, target)
            if eps < target:
                sigma_high = sigma
                eps_high = self.eps_at_tolerance(sigma, eps)
            else:
                sigma_low = sigma
        return float(sigma_high)

    def eps_at_tolerance(self, sigma: float, eps: float) -> float:
        level = self.target - _OPACUS_TOLERANCE
        if abs(eps - level) <= _CLOSE * max(abs(level), 1.0):
            return self.full(sigma)
        return eps


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
