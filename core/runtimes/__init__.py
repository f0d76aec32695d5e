"""Device runtimes: run models on whichever interpreter this device has.

Backends, in preference order: ``ai-edge-litert``, ``tflite-runtime`` and ``edgetpu``
(the Coral delegate) for ``.tflite`` models, and ``onnxruntime`` for ``.onnx`` models (a
Jetson-class device; its execution providers are probed). Each lives in its own module;
one that cannot be imported here is logged and skipped. :func:`create_runtime` loads a
model on a runtime by key, and :class:`RemoteRuntime` reaches a runtime installed in
another Python environment.

This package is in the shared layer: the device agent runs models on it, the model toolkit
and the server's release verification check artifacts on it. It imports no interpreter
package itself; each backend module does, when :func:`available_runtimes` or
:func:`create_runtime` first looks for it. ``edgefl.edge_agent.runtimes`` re-exports every
public name for the code that imports it from there.
"""

from __future__ import annotations

from ._registry import (
    available_runtimes,
    create_runtime,
    default_runtime_key,
    register_runtime,
    runtime_keys,
)
from .base import Runtime, TensorSpec
from .quant import dequantize, quantize
from .remote import RemoteResult, RemoteRuntime, find_tflite_python

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
