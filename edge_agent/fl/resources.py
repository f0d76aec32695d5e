"""Resource readings the training policy compares with its thresholds (Linux ``/proc``)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Resources", "read_resources"]


@dataclass(frozen=True)
class Resources:
    """Resource readings the policy compares with its thresholds (``None``: unknown)."""

    load_per_cpu: float | None = None
    free_memory_mb: float | None = None


def read_resources() -> Resources:
    """The 1-minute load average per CPU and ``MemAvailable`` from ``/proc/meminfo``."""
    try:
        load: float | None = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = None
    free: float | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) / 1024.0
                break
    return Resources(load, free)
