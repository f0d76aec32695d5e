"""The one paho client builder: every MQTT client edgefl runs is set up here.

The device's link (:mod:`edgefl.edge_agent.mqtt_link`), the server's ingest
(:mod:`edgefl.server.ingest`) and its certificate service
(:mod:`edgefl.server.cert_renewal`) all want the same thing from paho 2.x: callback API
v2, MQTT 5 (or 3.1.1 with a persistent session), TLS from a ``tls:`` section
(:class:`~edgefl.config.TlsFiles`), an optional user name and password, and perhaps
manual acknowledgement. :func:`build_client` does it once; callbacks, the will and the
connection stay with each caller.

paho-mqtt is not a base dependency (the ``device`` and ``server`` extras install it), so
it is imported when a client is built, never when this module is imported.
"""

from __future__ import annotations

import functools
import logging
import ssl
from typing import TYPE_CHECKING, Any, Literal

from pydantic import SecretStr

from edgefl.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from edgefl.config import TlsFiles

__all__ = ["build_client"]


@functools.cache
def _quiet_client_class() -> type[mqtt.Client]:
    """Paho's client, whose per-packet DEBUG lines cost nothing unless they are logged.

    paho formats nothing but still makes two calls into :mod:`logging` for every packet it
    sends or receives (``Sending PUBLISH ...``, ``Received PUBACK ...``), on its own thread,
    which is the one that bounds a link's message rate. Those lines are dropped unless the
    client's logger is enabled for DEBUG when the line comes; warnings and errors always
    go through.
    """
    import paho.mqtt.client as mqtt

    class QuietClient(mqtt.Client):
        def _easy_log(self, level: int, fmt: str, *args: Any) -> None:
            if level == mqtt.MQTT_LOG_DEBUG:
                logger = self._logger
                if logger is None or not logger.isEnabledFor(logging.DEBUG):
                    return
            super()._easy_log(level, fmt, *args)  # type: ignore[arg-type]

    return QuietClient


def build_client(
    client_id: str,
    *,
    protocol: Literal["5", "3.1.1"] = "5",
    tls: TlsFiles | None = None,
    username: str | None = None,
    password: SecretStr | str | None = None,
    manual_ack: bool = False,
    logger: logging.Logger | None = None,
    what: str = "MQTT client",
    tls_hint: str = "",
) -> mqtt.Client:
    """A paho client set up but not connected (no callbacks, no will).

    Args:
        client_id: The MQTT client id.
        protocol: ``"5"``, or ``"3.1.1"`` with a persistent session (``clean_session``
            false, which needs a fixed client id).
        tls: TLS is on when ``tls.ca_file`` is set; ``cert_file``/``key_file`` make it
            mutual TLS.
        username: Broker user name, if the broker wants one.
        password: Its password (a ``SecretStr`` is read only here).
        manual_ack: Inbound QoS 1 messages are acknowledged by the caller
            (``client.ack``), not by paho when ``on_message`` returns.
        logger: paho logs through it, its per-packet DEBUG lines only when it is enabled
            for DEBUG; without it paho logs nothing.
        what: Names the client in errors (``"ingest"``).
        tls_hint: What to do about unusable TLS files, shown with the error.

    Raises:
        ConfigError: A TLS file cannot be read or is not a certificate or key.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    cls = _quiet_client_class() if logger is not None else mqtt.Client
    if protocol == "5":
        client = cls(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
    else:
        client = cls(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
            manual_ack=manual_ack,
        )
    if logger is not None:
        client.enable_logger(logger)
    if username is not None:
        secret = password.get_secret_value() if isinstance(password, SecretStr) else password
        client.username_pw_set(username, secret)
    if tls is not None and tls.ca_file is not None:
        try:
            client.tls_set(
                ca_certs=str(tls.ca_file),
                certfile=str(tls.cert_file) if tls.cert_file is not None else None,
                keyfile=str(tls.key_file) if tls.key_file is not None else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{what} TLS files unusable ({tls.ca_file}, {tls.cert_file}, {tls.key_file}): "
                f"{exc}",
                hint=tls_hint,
            ) from exc
    return client
