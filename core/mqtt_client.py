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

:func:`identity_session` keeps a host's short-lived publishers that share one client
certificate (the server's service identities) from taking over each other's session.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import SecretStr

from edgefl.errors import ConfigError, ServiceUnavailableError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from edgefl.config import TlsFiles

__all__ = ["SESSION_LOCK", "build_client", "identity_session"]

log = logging.getLogger(__name__)

SESSION_LOCK = "session.lock"
"""The lock file beside a client certificate that :func:`identity_session` holds."""
_LOCK_POLL_S = 0.05


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


@contextlib.contextmanager
def identity_session(
    tls: TlsFiles | None, *, wait_s: float, what: str = "MQTT publisher"
) -> Iterator[None]:
    """Hold, on this host, the one MQTT session of the client certificate in ``tls``.

    The shipped broker takes a client's id from its certificate's CN
    (``use_username_as_clientid``), so two connections under one certificate take over
    each other's session: the broker closes the older one, and whatever it waited for (a
    command's answer, a PUBACK) is lost. The server's short-lived publishers connect as
    shared service identities (``edgefl-commands``, ``edgefl-rollout``) from several
    processes at once: the CLI on the server host, the admin API's operations, rollout
    jobs. Each connects inside this context, which holds an exclusive ``flock`` on
    :data:`SESSION_LOCK` beside the certificate, so they take turns instead. A lock that
    cannot be created (a read-only folder) is logged and not held. Without a client
    certificate (a plain broker, where callers pick random client ids) nothing is locked.

    Args:
        tls: The client's TLS files.
        wait_s: How long to wait for another process's session to end.
        what: Names the publisher in the error.

    Raises:
        ServiceUnavailableError: Another connection held the identity for ``wait_s``.
    """
    cert = None if tls is None else tls.cert_file
    if cert is None:
        yield
        return
    path = Path(cert).parent / SESSION_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("%s: cannot create %s (%s): connecting without it", what, path, exc)
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServiceUnavailableError(
                        f"{what}: another process of this host stayed connected as "
                        f"{Path(cert).parent.name} for {wait_s:g} s (the broker allows one "
                        "connection per certificate)",
                        hint="it may be waiting for a device's answer (`server command "
                        "--wait`); try again when it is done",
                    ) from None
                time.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock
