"""``edgefl demo``: the whole system on one machine, with embedded defaults.

A composition root like the CLI root and the simulation: it drives the real components
as processes through their own commands (``edgefl server start``, ``edgefl agent
enroll``, ``edgefl server admit``, ``edgefl agent run``, ``edgefl server train``,
``edgefl server release``, ``edgefl server rollout``) on loopback, reads the outcome from
the registry and writes a report. :mod:`edgefl.demo.run` holds the stages,
:mod:`edgefl.demo.chaos` the faults ``--chaos`` injects, :mod:`edgefl.demo.figures` the
registry queries and :mod:`edgefl.demo.report` the report.
"""

from __future__ import annotations

__all__ = ["DemoFailedError", "DemoOptions", "run_demo"]

from edgefl.demo.run import DemoFailedError, DemoOptions, run_demo
