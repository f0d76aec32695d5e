"""Local inference with latency-budgeted offload to the cloud model over gRPC.

The device model answers every sample; :class:`Predictor` sends a sample to the cloud
only when the estimated upload + RTT + cloud time fits the budget minus the local
fallback time, the circuit breaker allows it, and the policy wants the cloud's answer.

The gRPC client and the predictor are imported on first use, so that reading an agent
config (which embeds :class:`OffloadConfig`) does not load grpc, numpy and the runtimes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .breaker import BreakerState, CircuitBreaker
from .config import (
    BreakerConfig,
    CloudConfig,
    CloudOffloadConfig,
    CloudTarget,
    Mode,
    OffloadConfig,
    PolicyConfig,
    TlsConfig,
)
from .estimators import OffloadEstimates, RollingEstimate
from .policy import Decision, OffloadPolicy

if TYPE_CHECKING:
    from .client import CloudAnswer, CloudError, InferenceClient, ModelInfo
    from .engine import PredictionResult, Predictor, Source, find_device_model, load_runtime

__all__ = [
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "CloudAnswer",
    "CloudConfig",
    "CloudError",
    "CloudOffloadConfig",
    "CloudTarget",
    "Decision",
    "InferenceClient",
    "Mode",
    "ModelInfo",
    "OffloadConfig",
    "OffloadEstimates",
    "OffloadPolicy",
    "PolicyConfig",
    "PredictionResult",
    "Predictor",
    "RollingEstimate",
    "Source",
    "TlsConfig",
    "find_device_model",
    "load_runtime",
]

_LAZY = {
    "CloudAnswer": "client",
    "CloudError": "client",
    "InferenceClient": "client",
    "ModelInfo": "client",
    "PredictionResult": "engine",
    "Predictor": "engine",
    "Source": "engine",
    "find_device_model": "engine",
    "load_runtime": "engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
