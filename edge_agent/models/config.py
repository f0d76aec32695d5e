"""``models:`` in the agent config: signed model updates on the device.

Kept apart from the manager so that loading a config never imports the runtimes.
Defaults (stated here and in the README): off (``enabled: false``); a health window of
60 s after a swap, probed every 10 s, rolling back on a load failure, an inference error,
a golden mismatch, or a median latency over 3x the previous model's; a download that
receives nothing for 30 s (``stall_timeout_s``) is abandoned and resumed on a retry.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, model_validator

from edgefl.config import Address, StrictModel, TlsFiles

__all__ = ["HealthPolicy", "ModelsConfig", "ModelsServer"]


@dataclass(frozen=True)
class HealthPolicy:
    """The health window's settings (``models:`` in the agent config).

    Attributes:
        window_s: How long a new model stays on probation.
        check_interval_s: Time between golden-vector probes during the window.
        max_latency_ratio: Roll back when the new model's median latency is over this
            multiple of the previous model's...
        latency_slack_us: ...and more than this much over it: a model of a few thousand
            parameters answers in microseconds, where timing noise alone exceeds the ratio.
        golden_repeats: Golden-set runs per probe (the latency is their median).
    """

    window_s: float = 60.0
    check_interval_s: float = 10.0
    max_latency_ratio: float = 3.0
    latency_slack_us: float = 1000.0
    golden_repeats: int = 5


class ModelsServer(Address):
    """The server's ``Models`` gRPC service (``edgefl server start`` prints its port)."""

    port: int = Field(ge=1, le=65535, description="Models service TCP port.")


class ModelsConfig(StrictModel):
    """``models:`` in the agent config: signed model updates (off unless enabled)."""

    enabled: bool = Field(
        False, description="Follow the signed desired state and install the models it names."
    )
    server: ModelsServer | None = Field(
        None, description="The server's Models service (required when enabled)."
    )
    tls: TlsFiles | None = Field(
        None,
        description="Mutual TLS to the Models service; defaults to mqtt.tls (the device's "
        "enrolled identity).",
    )
    device_class: str = Field(
        "generic",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="The device class releases must be made for (manifest release.device_class).",
    )
    runtime: str = Field(
        "ai-edge-litert",
        description="The device runtime: releases must name it (release.runtime) and their "
        "golden vectors run on it before a swap.",
    )
    release_signing_keys: list[str] = Field(
        default_factory=list,
        description="Release-signing public keys (PEM text or file paths) trusted besides "
        "those pinned at enrollment (never instead of them).",
    )
    health_window_s: float = Field(
        60.0, ge=0, description="Probation after a swap; a failure in it rolls back."
    )
    health_check_interval_s: float = Field(
        10.0, gt=0, description="Golden-vector probe period during the health window."
    )
    max_latency_ratio: float = Field(
        3.0,
        gt=1,
        description="Roll back when the new model's median latency exceeds this multiple "
        "of the previous model's.",
    )
    latency_slack_ms: float = Field(
        1.0,
        ge=0,
        description="A latency regression also needs the new median this much over the "
        "previous model's: microsecond models vary by more than max_latency_ratio from "
        "timing noise alone, which no latency budget notices.",
    )
    download_timeout_s: float = Field(300.0, gt=0, description="Deadline of one download call.")
    stall_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A download that receives nothing for this long is abandoned (a silent "
        "network drop) and retried, resuming from the staged bytes. 30 s: one 64 KiB chunk "
        "takes 16 s at 32 kbit/s, and gRPC keepalive alone can take 60 s to notice.",
    )
    retry_min_s: float = Field(2.0, gt=0, description="First retry delay of a failed download.")
    retry_max_s: float = Field(300.0, gt=0, description="Longest retry delay of a download.")

    @model_validator(mode="after")
    def _server_when_enabled(self) -> ModelsConfig:
        if self.enabled and self.server is None:
            raise ValueError("models.enabled needs models.server: {host, port}")
        return self

    def health_policy(self) -> HealthPolicy:
        """The health window's settings."""
        return HealthPolicy(
            window_s=self.health_window_s,
            check_interval_s=self.health_check_interval_s,
            max_latency_ratio=self.max_latency_ratio,
            latency_slack_us=self.latency_slack_ms * 1000.0,
        )
