"""What the server's and the agent's Prometheus metrics share.

Both time inference requests (the server's inference service, the agent's local
inference queue) in the same histogram buckets, so their latencies read alike on one
dashboard.
"""

from __future__ import annotations

from typing import Final

__all__ = ["INFERENCE_LATENCY_BUCKETS"]

INFERENCE_LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
"""Histogram buckets (seconds) of an inference request's latency, 1 ms to 2.5 s."""
