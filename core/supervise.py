"""Restarting child processes that die: one backoff state, one supervisor loop.

:class:`RestartBackoff` is the restart state of one child on the project's one retry
curve (:func:`edgefl.backoff.backoff_delay`, exponential with equal jitter): the delay
before the next start, reset once a start has stayed up ``stable_after_s``, and the count
of restarts. The agent's SuperNode supervisor, which decides itself when its one child
should run, keeps one; :class:`Supervisor` keeps one per child for the server, whose
children (broker, SuperLink, Fleet API proxy) should always run.

Both are polled (no threads of their own) and take the time as an argument, so tests
drive them with any clock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefl.backoff import backoff_delay
from edgefl.errors import EdgeflError

__all__ = ["Child", "RestartBackoff", "Supervised", "Supervisor"]

log = logging.getLogger(__name__)


@dataclass
class RestartBackoff:
    """When to start a child again after it exited (see the module docstring).

    Args:
        min_s: First restart delay, before jitter.
        max_s: Cap on the delay, before jitter.
        stable_after_s: A start that stayed up this long resets the delay.
        rng: Uniform ``[0, 1)`` numbers for the jitter (tests inject their own).
    """

    min_s: float
    max_s: float
    stable_after_s: float
    rng: Callable[[], float] = random.random
    attempt: int = 0
    """Failed starts in a row: the exponent of the next delay."""
    restarts: int = 0
    """How often the child was restarted (counted by :meth:`count_restart`)."""
    started_at: float = 0.0
    next_at: float | None = None
    """When the scheduled restart is due (``None``: none scheduled)."""
    last_error: str = ""
    history: list[float] = field(default_factory=list)
    """Wall-clock times of the restarts."""

    def started(self, now: float) -> None:
        """The child was (re)started at ``now``."""
        self.started_at = now
        self.next_at = None

    def note_running(self, now: float) -> None:
        """The child still runs (or just exited) at ``now``: reset the delay once stable."""
        if self.attempt and now - self.started_at >= self.stable_after_s:
            self.attempt = 0

    def schedule(self, now: float) -> float:
        """Schedule the next start after the exit seen at ``now``; the delay in seconds."""
        delay = backoff_delay(self.attempt, self.min_s, self.max_s, self.rng)
        self.attempt += 1
        self.next_at = now + delay
        return delay

    def due(self, now: float) -> bool:
        """Whether no restart is scheduled, or the scheduled one is due."""
        return self.next_at is None or now >= self.next_at

    def count_restart(self) -> None:
        """Count one restart (at the wall-clock time now)."""
        self.restarts += 1
        self.history.append(time.time())

    def state(self) -> dict[str, Any]:
        """Counters for status output."""
        return {
            "attempt": self.attempt,
            "restarts": self.restarts,
            "next_at": self.next_at,
            "last_error": self.last_error,
        }


class Child(Protocol):
    """What :class:`Supervisor` needs of a child (e.g. a wrapper of a ManagedProcess)."""

    @property
    def pid(self) -> int | None:
        """PID of its process, if any."""
        ...

    def running(self) -> bool:
        """Whether it is alive."""
        ...

    def start(self) -> None:
        """Start it and wait until it is ready (raises an EdgeflError if it is not)."""
        ...

    def stop(self) -> None:
        """Stop it and reap it (idempotent)."""
        ...


@dataclass
class Supervised:
    """One child of a :class:`Supervisor`, with its restart state."""

    name: str
    child: Child
    backoff: RestartBackoff

    @property
    def restarts(self) -> int:
        """How often it was restarted after it died."""
        return self.backoff.restarts


class Supervisor:
    """Keeps named children running: a dead one is restarted after a backoff delay.

    Args:
        min_s: First restart delay of a child.
        max_s: Cap on the delay.
        stable_after_s: A child up this long has its delay reset.
        lock: Held while a child is stopped and started (shared with other code that
            restarts children, e.g. on a certificate change).
        on_restart: Called after each successful restart.
    """

    def __init__(
        self,
        min_s: float,
        max_s: float,
        stable_after_s: float,
        *,
        lock: threading.RLock | None = None,
        on_restart: Callable[[Supervised], None] | None = None,
    ) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.stable_after_s = stable_after_s
        self.lock = lock or threading.RLock()
        self._on_restart = on_restart
        self._children: list[Supervised] = []

    def add(self, name: str, child: Child, now: float | None = None) -> Supervised:
        """Supervise ``child`` (already started) from now on."""
        backoff = RestartBackoff(self.min_s, self.max_s, self.stable_after_s)
        backoff.started(time.monotonic() if now is None else now)
        entry = Supervised(name, child, backoff)
        with self.lock:
            self._children.append(entry)
        return entry

    def children(self) -> list[Supervised]:
        """The supervised children, in the order they were added."""
        with self.lock:
            return list(self._children)

    def pids(self) -> dict[str, int | None]:
        """PID of every child."""
        return {s.name: s.child.pid for s in self.children()}

    def restarts(self) -> dict[str, int]:
        """How often each child was restarted after it died."""
        return {s.name: s.restarts for s in self.children()}

    def check(self, now: float, stopping: Callable[[], bool] = lambda: False) -> None:
        """One pass: schedule a restart for each dead child, restart those that are due.

        A restart that fails (an :class:`~edgefl.errors.EdgeflError`) is logged and
        tried again on the next, longer delay.
        """
        for sup in self.children():
            if stopping():
                return
            b = sup.backoff
            if sup.child.running():
                b.note_running(now)
                continue
            if b.next_at is None:
                delay = b.schedule(now)
                log.error("%s (pid %s) died; restarting in %.1f s", sup.name, sup.child.pid, delay)
                continue
            if not b.due(now):
                continue
            b.next_at = None
            try:
                with self.lock:
                    sup.child.stop()  # reap it, close its log, kill leftovers
                    sup.child.start()
                b.started(time.monotonic())
                b.count_restart()
                log.warning("restarted %s (pid %s)", sup.name, sup.child.pid)
                if self._on_restart is not None:
                    self._on_restart(sup)
            except EdgeflError as exc:
                b.last_error = str(exc)
                log.error("restarting %s failed: %s", sup.name, exc)

    def stop_all(self) -> None:
        """Stop every child, the last added first (errors are logged, not raised)."""
        for sup in reversed(self.children()):
            try:
                sup.child.stop()
            except Exception:
                log.exception("stopping %s failed", sup.name)
