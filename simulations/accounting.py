"""Independent check of reported ε: recompute it from the recorded (σ, q, steps) history.

A device's privacy loss under DP-SGD with Poisson sampling depends only on the noise
multiplier σ, the sample rate q and the number of steps of every round it trained in.
Feeding that history (one ``(σ, q, steps)`` entry per round, as recorded in the ledger)
to a fresh Opacus ``RDPAccountant`` gives the true cumulative ε, whatever the device
itself claimed. Pure functions; Opacus is imported when called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["EpsilonCheck", "check_reported_epsilon", "recompute_epsilon"]

HistoryEntry = tuple[float, float, int]


def recompute_epsilon(history: Iterable[Sequence[float]], delta: float) -> float:
    """True cumulative ε of one device from its per-round ``(σ, q, steps)`` entries.

    Args:
        history: One ``(noise multiplier, sample rate, steps)`` per round trained.
        delta: δ of the guarantee.

    Returns:
        ε at ``delta`` by Opacus' RDP accountant; 0.0 for an empty history.

    Raises:
        ValueError: An entry is not three finite numbers with σ > 0, 0 < q ≤ 1, steps ≥ 0.
    """
    from opacus.accountants import RDPAccountant

    entries: list[HistoryEntry] = []
    for item in history:
        if len(item) != 3:
            raise ValueError(f"history entry {item!r}: expected (sigma, sample_rate, steps)")
        sigma, q, steps = float(item[0]), float(item[1]), int(item[2])
        if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1 and steps >= 0):
            raise ValueError(f"history entry {item!r}: need sigma > 0, 0 < q <= 1, steps >= 0")
        if not steps:
            continue
        # RDP composes additively over steps, so consecutive rounds with the same (σ, q)
        # are one entry with their steps summed: the same ε, computed once per (σ, q).
        if entries and entries[-1][:2] == (sigma, q):
            entries[-1] = (sigma, q, entries[-1][2] + steps)
        else:
            entries.append((sigma, q, steps))
    if not entries:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = entries
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class EpsilonCheck:
    """Reported vs recomputed ε of every device."""

    reported: dict[str, float]
    true: dict[str, float]

    @property
    def relative_errors(self) -> dict[str, float]:
        """``|reported - true| / true`` per device (devices with true ε of 0 skipped)."""
        return {
            d: abs(self.reported[d] - t) / t
            for d, t in self.true.items()
            if t > 0 and d in self.reported
        }

    @property
    def max_relative_error(self) -> float:
        """The worst device's relative error (0.0 when nothing to compare)."""
        return max(self.relative_errors.values(), default=0.0)

    @property
    def ratios(self) -> dict[str, float]:
        """``reported / true`` per device."""
        return {
            d: self.reported[d] / t for d, t in self.true.items() if t > 0 and d in self.reported
        }

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        ratios = list(self.ratios.values())
        return {
            "devices": len(self.true),
            "max_relative_error": self.max_relative_error,
            "mean_reported_over_true": sum(ratios) / len(ratios) if ratios else math.nan,
        }


def check_reported_epsilon(
    reported: Mapping[str, float],
    histories: Mapping[str, Iterable[Sequence[float]]],
    delta: float,
) -> EpsilonCheck:
    """Recompute every device's ε from its history and pair it with what it reported."""
    true = {device: recompute_epsilon(h, delta) for device, h in histories.items()}
    return EpsilonCheck(reported=dict(reported), true=true)
