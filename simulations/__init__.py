"""Laptop simulation of an edgefl federation on Flower's simulation engine.

- :mod:`edgefl.simulations.scenario`: the scenario TOML schema (validated, converts to
  the core :class:`~edgefl.federation.FederationPlan`);
- :mod:`edgefl.simulations.runner`: :func:`~edgefl.simulations.runner.run_scenario` runs a
  scenario with the same ServerApp and ClientApp a deployment uses and writes the reports;
- :mod:`edgefl.simulations.report`, :mod:`edgefl.simulations.plots`: ``report.json``,
  ``report.md`` and PNG plots;
- :mod:`edgefl.simulations.accounting`: independent ε recomputation from (σ, q, steps);
- :mod:`edgefl.simulations.baseline`: stock Flower + per-round Opacus, for the benchmark;
- :mod:`edgefl.simulations.resources`: the process tree's memory (Ray workers included).

Submodules import torch, Flower and Ray only when they run; importing this package is
cheap (the ``edgefl`` CLI does it).
"""

__all__: list[str] = []
