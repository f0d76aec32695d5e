"""The edgefl ClientApp (Flower Message API): DP-SGD training with a persistent accountant.

``app`` handles ``train`` and ``evaluate`` messages. Module-level imports are light (Flower
starts a new ClientApp process per message in deployment); torch and Opacus are imported
inside the handlers. See ``edgefl.federation`` for the privacy-accounting contract.

Node config: ``partition-id`` and ``num-partitions`` (set by the simulation engine or by
``flower-supernode --node-config``), optional ``device-id`` (default ``sim-NNN``) and
``state-dir`` (where the accountant lives on a device; without it, in ``context.state``).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

__all__ = ["app"]

app = ClientApp()
