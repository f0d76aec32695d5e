"""The agent config's ``training:`` section and the SuperNode's ``--node-config`` string.

Node config passed to the ClientApp (``--node-config``, parsed by Flower as TOML, so
strings are double-quoted): ``device-id``, ``state-dir`` (the privacy accountant),
``data-store``, ``eval-fraction``, ``telemetry-dir``, the config's extra ``node_config``
entries, and ``lifetime-epsilon`` / ``lifetime-delta`` from ``training.privacy`` (last,
so an extra entry cannot change them).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from edgefl.config import Address, RenamedKeyWarning, RenameMap, StrictModel, TlsFiles
from edgefl.edge_agent.fl.apptrust import CLIENTAPP_REF, DEFAULT_CLIENTAPP
from edgefl.edge_agent.fl.privacy import DEFAULT_LIFETIME_DELTA, DEFAULT_LIFETIME_EPSILON
from edgefl.errors import ConfigError

__all__ = [
    "NodeConfigValue",
    "SuperLinkAddress",
    "TrainingConfig",
    "TrainingPrivacyConfig",
    "node_config_arg",
]

log = logging.getLogger(__name__)

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
NodeConfigValue = str | int | float | bool


class SuperLinkAddress(Address):
    """Where the SuperLink's Fleet API is (``training.superlink: {host, port}``).

    ``str()`` gives ``host:port``, what ``flower-supernode --superlink`` takes.
    """

    host: str = Field(
        min_length=1, pattern=r"^[^\s:]+$", description="Host name or IP of the SuperLink."
    )
    port: int = Field(ge=1, le=65535, description="Its Fleet API port.")

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class TrainingPrivacyConfig(StrictModel):
    """``training.privacy``: the device's privacy budget across all the runs it joins.

    A run's plan caps what one run spends (``dp.epsilon_cap``); this caps the device's
    lifetime: the RDP composition of every run it trained in (kept in
    ``<state_dir>/fl_privacy.json``). The device refuses a run whose plan would pass it,
    and any round that would, with status ``lifetime_budget_exhausted``.
    """

    lifetime_epsilon: float | None = Field(
        DEFAULT_LIFETIME_EPSILON,
        gt=0,
        description="Lifetime ε cap over all runs (RDP composition). The default, twice the "
        "shipped per-run target ε=8, fits about five such runs. null: no lifetime cap (ε "
        "then grows with every run).",
    )
    lifetime_delta: float = Field(
        DEFAULT_LIFETIME_DELTA,
        gt=0,
        lt=1,
        description="δ at which the lifetime ε is computed and capped.",
    )


class TrainingConfig(StrictModel):
    """The agent config's ``training:`` section: federated training on this device."""

    renamed_keys: ClassVar[RenameMap] = {
        "root_certificates": "tls.ca_file",
        "node_key": "auth_key_file",
    }

    superlink: SuperLinkAddress = Field(
        description="The SuperLink's Fleet API, {host, port} (the older 'host:port' text is "
        "accepted for one release, with a warning)."
    )
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="ca_file: the CA that signed the SuperLink's certificate (default: "
        "identity/ca.pem). The SuperNode presents no client certificate (Flower's HTTP "
        "client has none), so cert_file/key_file stay unset: the device proves who it is "
        "with auth_key_file.",
    )
    auth_key_file: Path | None = Field(
        None,
        description="Flower node authentication private key, which signs the SuperNode's "
        "requests (not a TLS key; default: identity/node.key).",
    )
    insecure: bool = Field(
        False,
        description="Plain HTTP and no node authentication. For tests only: anyone on the "
        "path can read the model updates and any process can pose as this device.",
    )
    min_samples: int = Field(32, ge=1, description="Local samples needed before training.")
    require_connected: bool = Field(
        True, description="Train only while the MQTT link is up (the network proxy)."
    )
    windows: list[str] = Field(
        default_factory=list,
        description='Local-time windows "HH:MM-HH:MM" (may wrap midnight); empty = always.',
    )
    max_load_per_cpu: float | None = Field(
        None, gt=0, description="Do not train above this 1-minute load average per CPU."
    )
    min_free_memory_mb: float | None = Field(
        None, gt=0, description="Do not train with less available memory than this."
    )
    restart_min_s: float = Field(1.0, gt=0, description="First restart delay (before jitter).")
    restart_max_s: float = Field(60.0, gt=0, description="Cap on the restart delay.")
    stable_after_s: float = Field(
        60.0, gt=0, description="A run this long resets the restart backoff."
    )
    stop_grace_s: float = Field(10.0, gt=0, description="SIGTERM to SIGKILL delay.")
    node_config: dict[str, NodeConfigValue] = Field(
        default_factory=dict, description="Extra --node-config entries for the ClientApp."
    )
    max_samples: int = Field(10_000, ge=1, description="Bound of the local data store.")
    privacy: TrainingPrivacyConfig = Field(
        default_factory=lambda: TrainingPrivacyConfig(),
        description="The device's lifetime privacy budget across runs: lifetime_epsilon "
        "(default 16; null: none) and lifetime_delta (default 1e-5).",
    )
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Held-out share of the store.")
    clientappio_port: int | None = Field(
        None, ge=1, le=65535, description="SuperNode's ClientApp API port (default: a free one)."
    )
    warm_start: bool = Field(
        True,
        description="Run each message's ClientApp in a process forked from a warm zygote "
        "(edgefl.edge_agent.fl.warmstart) instead of a fresh interpreter; the zygote exits "
        "when idle. False: Flower's plain flwr-clientapp for every message.",
    )
    light_superexec: bool = Field(
        True,
        description="Run the SuperNode's ClientApp task loop as edgefl's light stand-in for "
        "Flower's flower-superexec (edgefl.edge_agent.fl.superexec: standard library only, "
        "ClientApp tasks only; about 130 MB less resident). False: Flower's own.",
    )
    warm_start_prewarm: bool = Field(
        False,
        description="Start the warm zygote when the SuperNode starts instead of at a run's "
        "first message: that message then takes about as long as any other, but the "
        "zygote's memory (about 520 MB resident, 325 MB of it its own) is held from the "
        "SuperNode's start until warm_start_idle_exit_s without a message. Needs "
        "warm_start and light_superexec.",
    )
    warm_start_idle_exit_s: float = Field(
        600.0, gt=0, description="The warm zygote exits after this long without a message."
    )
    trusted_clientapps: list[str] = Field(
        default_factory=list,
        description="ClientApps installed on this device (module.path:attribute) that it "
        f"runs besides edgefl's own ({DEFAULT_CLIENTAPP}): a bring-your-own app is "
        "admitted by installing it and listing it here. Loaded from the installed "
        "packages, never from the app bundle's files.",
    )
    app_signing_keys: list[str] = Field(
        default_factory=list,
        description="Fleet app-signing public keys (an 'ssh-ed25519 AAAA...' line, or the "
        "path of a file holding one in OpenSSH or PEM form; `edgefl server app-key` prints "
        "it): an app bundle signed by one of them runs its own ClientApp code.",
    )

    @field_validator("windows")
    @classmethod
    def _windows_parse(cls, value: list[str]) -> list[str]:
        for window in value:
            if not _WINDOW.match(window):
                raise ValueError(f'{window!r} is not a window "HH:MM-HH:MM"')
        return value

    @field_validator("trusted_clientapps")
    @classmethod
    def _clientapp_refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not CLIENTAPP_REF.match(ref):
                raise ValueError(f"{ref!r} is not a ClientApp reference 'module.path:attribute'")
        return value

    @field_validator("app_signing_keys")
    @classmethod
    def _signing_keys_parse(cls, value: list[str]) -> list[str]:
        from edgefl.appsign import load_public_key

        texts = []
        for item in value:
            text = item.strip()
            if not text.startswith("ssh-"):
                try:
                    text = Path(text).expanduser().read_text(encoding="ascii").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ValueError(f"app signing key {item!r}: {exc}") from exc
            try:
                load_public_key(text)
            except ValueError as exc:
                raise ValueError(f"app signing key {item!r}: {exc}") from exc
            texts.append(text)
        return texts

    @field_validator("node_config")
    @classmethod
    def _node_config_quotable(cls, value: dict[str, NodeConfigValue]) -> dict[str, NodeConfigValue]:
        for key, item in value.items():
            _check_node_config_entry(key, item)
        return value

    @field_validator("superlink", mode="before")
    @classmethod
    def _superlink_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"([^\s:]+):(\d{1,5})", value)
        if match is None:
            raise ValueError(f"{value!r} is not host:port (write superlink: {{host, port}})")
        host, port = match.group(1), int(match.group(2))
        text = (
            f"training.superlink {value!r} is written superlink: {{host: {host}, port: "
            f"{port}}}; the 'host:port' form is accepted until the next release"
        )
        log.warning("%s", text)
        warnings.warn(text, RenamedKeyWarning, stacklevel=2)
        return {"host": host, "port": port}

    @model_validator(mode="after")
    def _no_client_certificate(self) -> TrainingConfig:
        if self.tls.cert_file is not None or self.tls.key_file is not None:
            raise ValueError(
                "tls.cert_file/tls.key_file: the SuperNode presents no client certificate; "
                "set tls.ca_file only (node authentication uses auth_key_file)"
            )
        return self

    @model_validator(mode="after")
    def _backoff_ordered(self) -> TrainingConfig:
        if self.restart_max_s < self.restart_min_s:
            raise ValueError("restart_max_s must be >= restart_min_s")
        return self


def _check_node_config_entry(key: str, value: NodeConfigValue) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"node config key {key!r}: use letters, digits, '_' and '-'")
    if isinstance(value, str) and any(c in value for c in '"\\\n\r'):
        # Flower's parser takes "..." up to the next quote and parses it as TOML.
        raise ValueError(f"node config value of {key!r} may not contain quotes or backslashes")


def node_config_arg(entries: dict[str, NodeConfigValue]) -> str:
    """The ``--node-config`` string: ``key="string" n=3 flag=true`` (TOML values).

    Raises:
        ConfigError: A key or string value Flower's parser cannot carry.
    """
    parts = []
    for key, value in entries.items():
        try:
            _check_node_config_entry(key, value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)
