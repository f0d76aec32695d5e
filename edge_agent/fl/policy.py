"""Whether the device may train now: :class:`TrainingPolicy`, pure, tested with any clock.

Connected (the MQTT link is up, the agent's proxy for the network), enough samples in
the local data store, inside the optional time windows and under the optional resource
thresholds.
"""

from __future__ import annotations

import datetime as dt

from edgefl.edge_agent.fl.resources import Resources
from edgefl.edge_agent.fl.supernode_config import TrainingConfig

__all__ = ["TrainingPolicy"]


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class TrainingPolicy:
    """Whether the device may train now; pure, so it is tested with any clock and readings.

    Args:
        config: The training section.
    """

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self._windows = [
            (_minutes(w.split("-")[0]), _minutes(w.split("-")[1])) for w in config.windows
        ]

    def in_window(self, now: dt.datetime) -> bool:
        """Whether local time ``now`` is inside a window (always, without windows)."""
        if not self._windows:
            return True
        minute = now.hour * 60 + now.minute
        for start, end in self._windows:
            if start <= end:
                if start <= minute < end:
                    return True
            elif minute >= start or minute < end:  # wraps midnight
                return True
        return False

    def evaluate(
        self,
        now: dt.datetime,
        connected: bool,
        samples: int,
        resources: Resources | None = None,
    ) -> tuple[bool, str]:
        """Decide, naming the first reason that forbids training.

        Args:
            now: Local wall-clock time.
            connected: Whether the agent's MQTT link is up.
            samples: Samples in the local data store.
            resources: Current readings (thresholds are skipped for unknown values).

        Returns:
            ``(allowed, reason)``; the reason says why (or, when allowed, that it is).
        """
        c = self.config
        if c.require_connected and not connected:
            return False, "not connected (the MQTT link is down)"
        if samples < c.min_samples:
            return False, f"{samples} of {c.min_samples} samples collected"
        if not self.in_window(now):
            return False, f"outside the training windows {', '.join(c.windows)} ({now:%H:%M})"
        r = resources or Resources()
        load, free = r.load_per_cpu, r.free_memory_mb
        if c.max_load_per_cpu is not None and load is not None and load > c.max_load_per_cpu:
            return False, f"load {load:.2f} per CPU is above {c.max_load_per_cpu:g}"
        if c.min_free_memory_mb is not None and free is not None and free < c.min_free_memory_mb:
            return False, f"{free:.0f} MB free memory is below {c.min_free_memory_mb:g} MB"
        return True, "policy allows training"
