"""Certificate renewal over MQTT: devices ask with their current identity, the server answers.

Device and service certificates are issued for a year; nothing would renew them, and a
year after enrollment the fleet would go dark. The wire (``docs/fleet-contract.md``)::

    device --edgefl/{fleet}/{device}/cert/request (QoS 1)--> this service (CN edgefl-certs)
    this service --edgefl/{fleet}/{device}/cmd/install-cert (command, QoS 1)--> device

The request is a JSON document :class:`~edgefl.enrollment.RenewalRequest` holding a
CSR. The broker's ACL lets only the certificate whose CN is ``{device}`` write on that
topic, so the topic names the requester; :func:`~edgefl.server.enrollment.renew_device_cert`
then checks the CSR against the registry (admitted, same fleet, CN = device id, the
current key or a new one) and issues. The answer is an ordinary fleet command
(:func:`make_command`), so the device's command machinery gives it expiry, exactly-once
handling and an answer on ``cmd-resp``.

:class:`CertRenewalService` runs in ``edgefl server start`` beside the ingest, with its own
certificate (CN ``edgefl-certs``) and a persistent MQTT 5 session, so requests sent while
the server was down are answered when it comes back.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError
from sqlalchemy import Engine

from edgefl.config import TlsFiles
from edgefl.enrollment import INSTALL_CERT_COMMAND, RenewalRequest, renewal_request_topic
from edgefl.errors import EdgeflError
from edgefl.mqtt_client import build_client
from edgefl.proto.commands import make_command
from edgefl.proto.topics import ANY, cert_request_filter, split_topic
from edgefl.server.enrollment import renew_device_cert
from edgefl.server.fleet_ca import FleetCA

__all__ = [
    "INSTALL_COMMAND",
    "CertRenewalService",
    "RenewalRequest",
    "renewal_request_topic",
    "request_filter",
]

log = logging.getLogger(__name__)

INSTALL_COMMAND: Final = INSTALL_CERT_COMMAND
"""The command that carries a renewed certificate to the device."""

_MAX_REQUEST_BYTES: Final = 16 * 1024
_ANSWER_TTL_S: Final = 24 * 3600.0


def request_filter(fleet: str = ANY) -> str:
    """The topic filter the service subscribes to."""
    return cert_request_filter(fleet)


class CertRenewalService:
    """Answers renewal requests (see the module docstring).

    Args:
        host: Broker address.
        port: Broker port.
        ca_file: The fleet CA certificate (TLS trust).
        cert_file: This service's certificate (CN ``edgefl-certs``).
        key_file: Its key.
        load_ca: Returns the fleet CA, loaded afresh (admin commands write it too).
        engine: The registry.
        cert_days: Validity of renewed device certificates.
        fleet: The fleet to serve, or ``+`` for all.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        load_ca: Callable[[], FleetCA],
        engine: Engine,
        cert_days: float = 365,
        fleet: str = "+",
    ) -> None:
        self.host = host
        self.port = port
        self._load_ca = load_ca
        self._engine = engine
        self.cert_days = cert_days
        self.fleet = fleet
        self.issued = 0
        self.refused = 0
        self._queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(maxsize=10_000)
        self._subscribed = threading.Event()
        self._worker: threading.Thread | None = None
        self._client = build_client(
            "edgefl-certs",  # the broker uses the certificate CN anyway
            tls=TlsFiles(ca_file=ca_file, cert_file=cert_file, key_file=key_file),
            what="certificate service",
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    @property
    def pid(self) -> int | None:
        """Runs in the server's process: no PID of its own."""
        return None

    def running(self) -> bool:
        """Whether the worker runs."""
        return self._worker is not None and self._worker.is_alive()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the broker confirmed the subscription."""
        return self._subscribed.wait(timeout)

    def start(self) -> None:
        """Start the worker and connect in the background (retried until the broker answers)."""
        self._worker = threading.Thread(target=self._work, name="edgefl-certs", daemon=True)
        self._worker.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Requests published while the server is down wait in the broker for a day.
        props.SessionExpiryInterval = 24 * 3600
        self._client.connect_async(
            self.host, self.port, keepalive=30, clean_start=False, properties=props
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect and end the worker."""
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(10.0)
            self._worker = None

    # -- paho callbacks (network thread: hand over only) ----------------------------------

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            log.warning("certificate service: broker refused the connection: %s", rc)
            return
        client.subscribe(request_filter(self.fleet), qos=1)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        if all(not rc.is_failure for rc in rcs):
            self._subscribed.set()
        else:
            log.error("certificate service: subscription refused: %s", rcs)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            log.warning("certificate service: queue full, dropping a request (it is retried)")

    # -- worker -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                self.handle(message.topic, bytes(message.payload), retained=bool(message.retain))
            except Exception:  # one bad request must not end the service
                log.exception("certificate service: handling %s failed", message.topic)

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> bool:
        """Check one request, issue, and publish the ``install-cert`` command.

        Returns:
            Whether a certificate was sent.
        """
        parts = split_topic(topic)
        if parts is None or parts.rest != ("cert", "request") or retained:
            # The ACL lets no device retain here anyway; an old retained request is stale.
            return self._refuse(topic, "not a renewal topic, or retained")
        fleet, device_id = parts.fleet, parts.device_id
        if len(payload) > _MAX_REQUEST_BYTES:
            return self._refuse(topic, f"request of {len(payload)} bytes")
        try:
            request = RenewalRequest.model_validate(json.loads(payload))
        except (ValueError, ValidationError) as exc:
            return self._refuse(topic, f"malformed request: {str(exc).splitlines()[0]}")
        try:
            info = renew_device_cert(
                fleet,
                device_id,
                request.csr_pem,
                ca=self._load_ca(),
                engine=self._engine,
                cert_days=self.cert_days,
                reissue_after=timedelta(minutes=5),
            )
        except EdgeflError as exc:
            return self._refuse(topic, str(exc))
        cmd_topic, body = make_command(
            fleet,
            device_id,
            INSTALL_COMMAND,
            {
                "cert_pem": info.cert_pem,
                "serial": info.cert_serial,
                "request_id": request.request_id,
            },
            ttl_s=_ANSWER_TTL_S,
            correlation_id=f"cert-{info.cert_serial}",
        )
        self._client.publish(cmd_topic, body, qos=1)
        self.issued += 1
        log.info("certificate service: sent serial %s to %s/%s", info.cert_serial, fleet, device_id)
        return True

    def _refuse(self, topic: str, reason: str) -> bool:
        self.refused += 1
        log.warning("certificate service: refused %s: %s", topic, reason)
        return False
