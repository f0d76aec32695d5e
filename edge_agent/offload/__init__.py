"""Local inference with latency-budgeted offload to the cloud model over gRPC.

The device model answers every sample; :class:`Predictor` sends a sample to the cloud
only when the estimated upload + RTT + cloud time fits the budget minus the local
fallback time, the circuit breaker allows it, and the policy wants the cloud's answer.
"""

from __future__ import annotations

from .breaker import BreakerState, CircuitBreaker
from .client import CloudAnswer, CloudError, InferenceClient, ModelInfo
from .config import BreakerConfig, CloudConfig, Mode, OffloadConfig, PolicyConfig, TlsConfig
from .engine import PredictionResult, Predictor, Source, find_device_model, load_runtime
from .estimators import OffloadEstimates, RollingEstimate
from .policy import Decision, OffloadPolicy

__all__ = [
    "BreakerConfig",
    "BreakerState",
    "CircuitBreaker",
    "CloudAnswer",
    "CloudConfig",
    "CloudError",
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
