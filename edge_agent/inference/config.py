"""``inference:`` in the agent config: the daemon runs the device model on its sources.

Kept apart from the loop so that reading a config never imports numpy, grpc or the
runtimes. The section speaks the same keys as ``offload:`` (it builds on
:class:`~edgefl.edge_agent.offload.config.CloudOffloadConfig`: ``mode``, ``budget_ms``,
``confidence_threshold``, ``cloud: {target, model, tls, ...}``, ``breaker``, ...) and adds
what a loop needs. There is no ``model:`` key: the loop always serves the model manager's
current model (the ``models:`` section), so it needs ``models.enabled``.

A minimal section::

    inference:
      enabled: true
      sources: [camera]        # default: every source
      budget_ms: 50
      mode: adaptive
      cloud: {target: {host: 10.0.0.5, port: 50051}, model: digits-cnn}
"""

from __future__ import annotations

from typing import Final

from pydantic import Field

from edgefl.edge_agent.offload.config import CloudOffloadConfig
from edgefl.proto.ids import ID_REGEX

__all__ = ["TELEMETRY_STREAM", "InferenceConfig"]

TELEMETRY_STREAM: Final = "inference"
"""The loop's figures go out as ``edgefl/{fleet}/{device}/telemetry/inference``."""


class InferenceConfig(CloudOffloadConfig):
    """``inference:``: answer every sample of the chosen sources with the current model."""

    enabled: bool = Field(
        False,
        description="Run the model manager's current model on every sample the chosen "
        "sources produce (needs models.enabled).",
    )
    sources: list[str] | None = Field(
        None,
        description="Names of the sources whose samples are answered; default: every source.",
    )
    queue_size: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Samples waiting for the model at most; a sample that finds the queue "
        "full is dropped and counted (the shortfall), never queued without bound.",
    )
    report_interval_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Period of the telemetry/inference report (per model version: samples, "
        "accuracy on evaluation samples, p50/p99, offload fraction, deadline misses, dropped).",
    )
    result_stream: str = Field(
        "inference",
        pattern=ID_REGEX,
        description="Stream name in the result topic edgefl/{fleet}/{device}/result/{stream}.",
    )
    shadow_max_delay_ms: float | None = Field(
        None,
        gt=0,
        description="A shadow release (run beside the model, never serving) is run only "
        "while its median inference time stays at most this, and never while a sample "
        "waits, so a served answer waits at most one such inference for it; a slower "
        "shadow's samples are skipped and counted (too_slow), and it is timed again on one "
        "sample after 1 s, 2 s, 4 s, ... up to 60 s. Default: a tenth of budget_ms.",
    )

    @property
    def shadow_limit_ms(self) -> float:
        """``shadow_max_delay_ms``, or a tenth of ``budget_ms``."""
        if self.shadow_max_delay_ms is not None:
            return self.shadow_max_delay_ms
        return self.budget_ms / 10.0
