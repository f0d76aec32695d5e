"""The device runtimes, as the agent has always imported them.

The runtimes live in the shared layer (:mod:`edgefl.runtimes`) because the model toolkit
and the server's release verification run artifacts on them too, and the server never
imports the agent. This module re-exports every public name, so
``from edgefl.edge_agent.runtimes import create_runtime`` keeps working.
"""

from __future__ import annotations

from edgefl.runtimes import (
    RemoteResult,
    RemoteRuntime,
    Runtime,
    TensorSpec,
    available_runtimes,
    create_runtime,
    default_runtime_key,
    dequantize,
    find_tflite_python,
    quantize,
    register_runtime,
    runtime_keys,
)

__all__ = [
    "RemoteResult",
    "RemoteRuntime",
    "Runtime",
    "TensorSpec",
    "available_runtimes",
    "create_runtime",
    "default_runtime_key",
    "dequantize",
    "find_tflite_python",
    "quantize",
    "register_runtime",
    "runtime_keys",
]
