"""The device's broker connection settings: the agent config's ``mqtt:`` section."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from edgefl.config import RenameMap, StrictModel, TlsFiles

__all__ = ["MqttLinkConfig"]


class MqttLinkConfig(StrictModel):
    """Broker connection settings of a device (the agent's ``mqtt:`` section)."""

    renamed_keys: ClassVar[RenameMap] = {
        "ca_file": "tls.ca_file",
        "cert_file": "tls.cert_file",
        "key_file": "tls.key_file",
        "keepalive": "keepalive_s",
    }

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port.")
    client_id: str = Field(
        min_length=1,
        description="MQTT client id; the device id is usual. The shipped broker ignores it "
        "and uses the certificate's CN (use_username_as_clientid), which is the device id.",
    )
    keepalive_s: int = Field(
        default=30,
        ge=5,
        description="MQTT keepalive: the link pings after this long without traffic, and "
        "the broker drops it (publishing the offline last will) after 1.5 times this "
        "long without any packet.",
    )
    protocol: Literal["5", "3.1.1", "auto"] = Field(
        default="auto",
        description="MQTT version; auto tries 5 and falls back to 3.1.1 if the broker refuses.",
    )
    session_expiry_s: int = Field(
        default=3600,
        ge=0,
        description="MQTT 5 session expiry; the broker keeps the session this long offline.",
    )
    username: str | None = Field(default=None, description="User name, if the broker wants one.")
    password: SecretStr | None = Field(default=None, description="Password for username.")
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="ca_file: the fleet CA, setting it enables TLS; cert_file/key_file: the "
        "device certificate and key (mutual TLS).",
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(default=60.0, gt=0, description="Cap on reconnect delays.")
    flush_rate_per_s: float | None = Field(
        default=500.0,
        gt=0,
        description="Records per second replayed after a (re)connect; None is unlimited.",
    )
    max_inflight: int = Field(
        default=20,
        ge=1,
        description="Outbox records published with QoS 1 and awaiting PUBACK; the sender "
        "also stays below the broker's Receive Maximum.",
    )

    @model_validator(mode="after")
    def _check_pairs(self) -> MqttLinkConfig:
        tls = self.tls
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if tls.cert_file is not None and tls.ca_file is None:
            raise ValueError("a client certificate needs tls.ca_file (TLS)")
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self
