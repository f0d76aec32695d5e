"""edgefl: edge-cloud federated learning with a device agent.

The shared core (this package) holds what every component uses: the exception tree and
exit codes, the configuration base, logging, the CLI root, the model zoo and the bundled
datasets. Components live in sub-packages: ``edgefl.edge_agent``, ``edgefl.server``,
``edgefl.quantize``, ``edgefl.simulations`` and ``edgefl.proto``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
