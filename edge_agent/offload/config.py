"""Configuration of local inference and cloud offload (the agent config's ``offload:``).

A minimal section::

    offload:
      model: /var/lib/edgefl/models/digits-cnn      # a .tflite file or an artifacts folder
      mode: adaptive                                 # local | cloud | adaptive
      budget_ms: 60
      cloud:
        target: {host: inference.example.org, port: 50051}
        model: digits-cnn
        tls: {ca_file: ca.pem, cert_file: device.pem, key_file: device.key}
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from edgefl.config import Address, StrictModel, TlsFiles
from edgefl.proto.ids import ID_REGEX

from .estimators import Statistic

__all__ = [
    "BreakerConfig",
    "CloudConfig",
    "CloudOffloadConfig",
    "CloudTarget",
    "Mode",
    "OffloadConfig",
    "PolicyConfig",
    "TlsConfig",
]

Mode = Literal["local", "cloud", "adaptive"]
"""``local``: never offload. ``cloud``: always ask the cloud (the budget still holds
through the deadline). ``adaptive``: offload when it fits, is healthy and is wanted."""


class TlsConfig(TlsFiles):
    """TLS towards the inference service: the shared ``tls:`` files, ``ca_file`` required.

    With ``cert_file`` and ``key_file`` (this device's certificate and key) it is mutual TLS.
    """

    ca_file: Path = Field(description="CA certificate (PEM) that signed the server's certificate.")
    server_name: str | None = Field(
        None, description="Name to check the server certificate against, if not the host."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (both for mTLS, or neither)")
        return self


class CloudTarget(Address):
    """The inference service's address, ``{host, port}`` (``str()`` gives ``host:port``).

    The older ``"host:port"`` text is still read, with a warning, for one release.
    """

    text_form_accepted: ClassVar[bool] = True

    host: str = Field(
        min_length=1, pattern=r"^[^\s:]+$", description="Host name or IP of the service."
    )
    port: int = Field(ge=1, le=65535, description="Its port.")


class CloudConfig(StrictModel):
    """Where the cloud model is and how to reach it."""

    target: CloudTarget = Field(description="The inference service, {host, port}.")
    model: str = Field(min_length=1, description="Model name the service serves.")
    version: str = Field("", description="Model version to require; empty takes the served one.")
    tls: TlsConfig | None = Field(None, description="TLS settings; omit for plaintext (tests).")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Largest request or response the channel accepts."
    )
    health_interval_s: float = Field(
        0.5, gt=0, le=3600, description="Seconds between background health checks."
    )
    health_timeout_s: float = Field(1.0, gt=0, le=60, description="Deadline of a health check.")
    connect_timeout_s: float = Field(
        1.0, ge=0, le=60, description="How long start-up waits for the first connection."
    )


class BreakerConfig(StrictModel):
    """Circuit breaker thresholds (see :mod:`edgefl.edge_agent.offload.breaker`)."""

    failure_threshold: int = Field(3, ge=1, description="Consecutive failures that open it.")
    open_s: float = Field(2.0, gt=0, description="First wait before the half-open probe.")
    max_open_s: float = Field(30.0, gt=0, description="Longest wait after failed probes.")


class PolicyConfig(StrictModel):
    """The offload decision (see :mod:`edgefl.edge_agent.offload.policy`)."""

    mode: Mode = Field("adaptive", description="local, cloud or adaptive.")
    budget_ms: float = Field(100.0, gt=0, description="End-to-end latency budget per sample.")
    confidence_threshold: float = Field(
        0.9, ge=0, le=1, description="adaptive: offload when the local top-1 probability is below."
    )
    prefer_cloud: bool = Field(
        False, description="adaptive: want the cloud answer whatever the local confidence."
    )
    margin_ms: float = Field(2.0, ge=0, description="Safety margin added to the cloud estimate.")
    fallback_reserve_ms: float = Field(
        3.0,
        ge=0,
        description=(
            "Time kept back to hand over the local answer after the cloud deadline (thread "
            "wake-up, bookkeeping); part of the local fallback time."
        ),
    )
    statistic: Statistic = Field("p90", description="p90 (conservative) or ewma estimates.")
    ewma_alpha: float = Field(0.2, gt=0, le=1, description="EWMA weight of a new sample.")
    window: int = Field(32, ge=1, le=10000, description="Samples the p90 looks at.")
    uplink_mbit_prior: float = Field(5.0, gt=0, description="Uplink assumed before measuring.")
    explore_interval_s: float = Field(
        5.0,
        ge=0,
        description=(
            "adaptive: when the estimate says the cloud does not fit, still try one sample "
            "this often so the estimates can recover (the deadline keeps the budget); 0 = never."
        ),
    )


class CloudOffloadConfig(PolicyConfig):
    """The policy, the cloud and the breaker: what a predictor needs besides its model.

    ``offload:`` (:class:`OffloadConfig`, for ``edgefl agent predict``) and ``inference:``
    (the daemon's loop, :mod:`edgefl.edge_agent.inference.config`) both build on it, so
    the two sections speak the same keys.
    """

    threads: int = Field(1, ge=1, le=64, description="Interpreter CPU threads.")
    cloud: CloudConfig | None = Field(None, description="The inference service; None = local only.")
    breaker: BreakerConfig = Field(default_factory=lambda: BreakerConfig())
    result_stream: str = Field(
        "predict",
        pattern=ID_REGEX,
        description="Stream name in the result topic edgefl/{fleet}/{device}/result/{stream}.",
    )


class OffloadConfig(CloudOffloadConfig):
    """Everything ``edgefl agent predict`` needs: the device model, the policy and the cloud."""

    model: Path | None = Field(
        None, description="Device model: a .tflite file or a folder of built artifacts."
    )
    runtime: str | None = Field(None, description="Device runtime key; default: the best here.")
