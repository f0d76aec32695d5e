"""Logging set-up shared by every edgefl process.

Library modules only call ``logging.getLogger(__name__)``; processes call
:func:`configure_logging` once. Logs go to stderr so that ``--json`` output on stdout
stays machine-readable.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["configure_logging"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Third-party libraries that log at INFO about every conversion step.
_NOISY = ("absl", "jax", "ray", "urllib3", "matplotlib", "litert_torch", "torch")


def configure_logging(level: str | int | None = None) -> None:
    """Configure the root logger once for a process.

    Args:
        level: A level name or number. Defaults to ``$EDGEFL_LOG_LEVEL`` or ``WARNING``.
    """
    chosen = level if level is not None else os.environ.get("EDGEFL_LOG_LEVEL", "WARNING")
    if isinstance(chosen, str):
        chosen = chosen.upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_edgefl", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._edgefl = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(chosen)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
