"""The on-device inference loop: every sample of a source answered by the current model.

:class:`InferenceConfig` is the agent config's ``inference:`` section; the loop itself
(:mod:`edgefl.edge_agent.inference.loop`) and its figures
(:mod:`edgefl.edge_agent.inference.stats`) are imported on first use, so that reading a
config does not load numpy, grpc and the runtimes.
"""

from __future__ import annotations

from .config import TELEMETRY_STREAM, InferenceConfig

__all__ = ["TELEMETRY_STREAM", "InferenceConfig"]
