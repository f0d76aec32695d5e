"""Resident memory of this process and all its descendants, sampled from ``/proc``.

Flower's simulation engine runs virtual clients in Ray worker processes that descend
from this process (the driver starts Ray's GCS and raylet, which start the workers), so
the memory a simulation costs is the sum over the process tree, not the driver's own
RSS. :class:`TreeRssSampler` polls that sum in a background thread and keeps the peak
of each window (one window per round). Summed RSS counts shared pages (torch's
libraries, mapped by every worker) once per process, so it over-states what the machine
loses; it is the figure ``top`` would show added up.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Final

__all__ = ["RSS_METHOD", "TreeRssSampler", "tree_rss_mb"]

RSS_METHOD: Final = "sum of VmRSS over this process and all descendants (/proc), sampled 4/s"
_PROC = Path("/proc")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name (field 2) may hold spaces and parentheses: split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _rss_kb(pid: int) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss_mb(root: int | None = None) -> float:
    """Summed resident memory (MB) of ``root`` (default: this process) and its descendants.

    Returns 0.0 where ``/proc`` is not available.
    """
    if not _PROC.is_dir():
        return 0.0
    pid0 = os.getpid() if root is None else root
    children = _children_map()
    total, stack, seen = 0, [pid0], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_kb(pid)
        stack.extend(children.get(pid, []))
    return total / 1024.0


class TreeRssSampler:
    """Samples :func:`tree_rss_mb` in a daemon thread; use as a context manager.

    ``take_window_peak()`` returns the highest value since the previous call (and starts
    a new window); ``peak_mb`` is the highest value seen overall.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self._interval = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._window = 0.0
        self.peak_mb = 0.0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        value = tree_rss_mb()
        with self._lock:
            self._window = max(self._window, value)
            self.peak_mb = max(self.peak_mb, value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def take_window_peak(self) -> float:
        """Peak of the current window (sampling once more now), then start a new one."""
        self._sample()
        with self._lock:
            value, self._window = self._window, 0.0
        return value

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
