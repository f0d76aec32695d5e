"""Per-call checks of the client certificate under mutual TLS: revocation and admission.

Shared by the gRPC services devices call with their fleet certificate: the inference
service (:mod:`edgefl.server.inference.service`) and the model delivery service
(:mod:`edgefl.server.models_service`). It needs grpc and cryptography only (SQLAlchemy
when a registry is asked), so a service that must not import torch can use it.

The TLS handshake (``require_client_auth`` with the fleet CA as root) already refuses a
certificate from another CA. gRPC's Python API cannot load a CRL into the handshake, so
each call's peer certificate (``context.auth_context()["x509_pem_cert"]``) is checked here
against the fleet CA's CRL (``FleetCA.crl_path``) by :class:`PeerVerifier`:

- the CRL's signature must verify with the CA and its nextUpdate must not have passed,
  otherwise every call is refused (fail closed, as OpenSSL and mosquitto do) with a
  message telling the operator to refresh it;
- the CRL file is re-read when its size or mtime changes, so ``FleetCA.revoke`` takes
  effect on the next call without a restart;
- a revoked serial gets ``UNAUTHENTICATED``; a call without a client certificate (cannot
  happen with ``require_client_auth``, but checked anyway) too.

With a registry (:class:`DeviceDirectory`), a device must also be known to it, or the
service answers ``PERMISSION_DENIED``: a certificate alone is not enough once a device has
been removed from the fleet. A device enrolled with ``edgefl server admit`` is known while
its enrollment is ``admitted`` (a revoked one is refused even before the CRL reaches this
server). A device without an enrollment row is known if the ``devices`` table lists it,
unless the directory was made with ``admitted_only=True``: then only an admitted
enrollment counts, so service and operator identities and devices that were never
enrolled are refused. Answers are cached for ``ttl_s`` (a "not known" answer for
``miss_ttl_s``, so a device admitted a moment ago need not wait out ``ttl_s``).

Both classes may be called from many threads at once (the model service's pool) or from
an event loop (the inference service; :meth:`DeviceDirectory.is_known` blocks, so it runs
off the loop when :meth:`DeviceDirectory.cached` has no answer).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from edgefl.errors import ConfigError

__all__ = ["DeviceDirectory", "PeerRefusedError", "PeerVerifier"]

logger = logging.getLogger(__name__)

_CACHE_LIMIT = 4096


class PeerRefusedError(Exception):
    """The caller's certificate is not acceptable.

    Attributes:
        code: The gRPC status to answer with.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _CrlState:
    """The CRL as last read, replaced as a whole so a check never mixes two readings."""

    revoked: frozenset[int] = frozenset()
    next_update: dt.datetime | None = None
    problem: str | None = None


class PeerVerifier:
    """Checks the peer certificate of each call against the CA's CRL.

    Args:
        ca_cert: The fleet CA certificate (PEM) the TLS handshake trusts.
        crl: The CA's CRL (PEM), or ``None`` to skip revocation checks.

    Raises:
        ConfigError: The CA certificate or the CRL cannot be read or parsed, or the CRL
            was not signed by this CA.
    """

    def __init__(self, ca_cert: Path, crl: Path | None) -> None:
        try:
            self._ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load client CA certificate {ca_cert}: {exc}") from exc
        self._crl_path = Path(crl) if crl is not None else None
        self._crl_stamp: tuple[int, int] | None = None
        self._state = _CrlState()
        self._peers: dict[bytes, tuple[int, str]] = {}
        self._lock = threading.Lock()
        if self._crl_path is not None:
            self._refresh(strict=True)

    @property
    def revoked_serials(self) -> frozenset[int]:
        """Serials listed in the CRL as last read."""
        return self._state.revoked

    def check(self, auth_context: Mapping[str, Iterable[bytes]]) -> str:
        """Accept or refuse one call.

        Args:
            auth_context: ``context.auth_context()`` of the call.

        Returns:
            The device id (certificate CN) of the caller.

        Raises:
            PeerRefusedError: No client certificate, an unusable CRL, or a revoked
                certificate.
        """
        pems = list(auth_context.get("x509_pem_cert", ()))
        if not pems:
            raise PeerRefusedError(
                grpc.StatusCode.UNAUTHENTICATED, "no client certificate was presented"
            )
        serial, cn = self._identify(pems[0])
        if self._crl_path is None:
            return cn
        self._refresh(strict=False)
        state = self._state
        if state.problem is not None:
            raise PeerRefusedError(
                grpc.StatusCode.UNAVAILABLE,
                f"the server cannot check revocation: {state.problem}",
            )
        if state.next_update is not None and state.next_update < dt.datetime.now(dt.UTC):
            raise PeerRefusedError(
                grpc.StatusCode.UNAVAILABLE,
                "the server's CRL has expired; the operator must publish a fresh one "
                "(FleetCA.crl_pem)",
            )
        if serial in state.revoked:
            raise PeerRefusedError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the certificate of device {cn!r} (serial {serial:x}) has been revoked",
            )
        return cn

    def _identify(self, pem: bytes) -> tuple[int, str]:
        known = self._peers.get(pem)
        if known is not None:
            return known
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise PeerRefusedError(
                grpc.StatusCode.UNAUTHENTICATED, f"unreadable client certificate: {exc}"
            ) from exc
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else "?"
        with self._lock:
            if len(self._peers) >= _CACHE_LIMIT:
                self._peers.clear()
            self._peers[pem] = (cert.serial_number, cn)
        return cert.serial_number, cn

    def _refresh(self, *, strict: bool) -> None:
        """Re-read the CRL when the file changed; ``strict`` raises instead of failing closed."""
        assert self._crl_path is not None
        try:
            st = os.stat(self._crl_path)
        except OSError as exc:
            with self._lock:  # never interleaved with a load: the last writer's stamp holds
                self._fail(f"cannot read CRL {self._crl_path}: {exc.strerror}", strict)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._crl_stamp:
            return
        with self._lock:
            if stamp == self._crl_stamp:
                return
            try:
                crl = x509.load_pem_x509_crl(self._crl_path.read_bytes())
            except (OSError, ValueError) as exc:
                self._fail(f"cannot load CRL {self._crl_path}: {exc}", strict)
                return
            public_key = self._ca.public_key()
            if not isinstance(
                public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
            ) or (crl.issuer != self._ca.subject or not crl.is_signature_valid(public_key)):
                self._fail(f"CRL {self._crl_path} was not signed by the client CA", strict)
                return
            revoked = frozenset(r.serial_number for r in crl)
            self._state = _CrlState(revoked, crl.next_update_utc)
            self._crl_stamp = stamp
            logger.info("loaded CRL %s: %d revoked serial(s)", self._crl_path, len(revoked))

    def _fail(self, problem: str, strict: bool) -> None:
        """Record why the CRL is unusable (called with ``_lock`` held)."""
        if strict:
            raise ConfigError(problem, hint="pass the CRL of the CA in tls.ca_file")
        state = self._state
        if problem != state.problem:
            logger.error("%s; refusing every call until it is fixed", problem)
        self._state = _CrlState(state.revoked, state.next_update, problem)
        self._crl_stamp = None


class DeviceDirectory:
    """Which device ids the fleet registry knows, cached (lookups block: run them off-loop).

    Args:
        db_url: SQLAlchemy URL of the registry (``edgefl.server.registry``).
        ttl_s: How long an answer is reused before the registry is asked again.
        miss_ttl_s: How long a "not known" answer is reused (default: ``ttl_s``). A short
            one lets a device admitted a moment ago in, at one lookup per name per
            ``miss_ttl_s`` for a name that stays unknown.
        admitted_only: Only an enrollment whose status is ``admitted`` makes a device
            known; without it a device that has no enrollment row is known when the
            ``devices`` table lists it.

    Raises:
        ConfigError: The registry cannot be reached or lacks the tables it needs.
    """

    def __init__(
        self,
        db_url: str,
        *,
        ttl_s: float = 30.0,
        miss_ttl_s: float | None = None,
        admitted_only: bool = False,
    ) -> None:
        from sqlalchemy import select
        from sqlalchemy.exc import SQLAlchemyError

        from edgefl.server.registry import Device, Enrollment, make_engine
        from edgefl.server.registry.db import display_url

        self._engine = make_engine(db_url)
        self._ttl_s = ttl_s
        self._miss_ttl_s = ttl_s if miss_ttl_s is None else min(miss_ttl_s, ttl_s)
        self._admitted_only = admitted_only
        self._cache: dict[str, tuple[bool, float]] = {}
        self._select = select(Device.device_id)
        self._device = Device
        self._enrollment = select(Enrollment.status)
        self._enrolled = Enrollment
        self._errors = SQLAlchemyError
        try:
            with self._engine.connect() as conn:
                conn.execute(self._enrollment.limit(1)).all()
                if not admitted_only:
                    conn.execute(self._select.limit(1)).all()
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise ConfigError(
                f"cannot read the device registry at {display_url(db_url)}: "
                f"{str(exc).splitlines()[0]}",
                hint="start `edgefl server ingest` once to create it, or fix registry_url",
            ) from exc

    def cached(self, device_id: str) -> bool | None:
        """The cached answer for ``device_id``, or ``None`` when it must be looked up."""
        hit = self._cache.get(device_id)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def is_known(self, device_id: str) -> bool:
        """Whether the registry knows ``device_id`` (blocking; cached, see the class).

        An enrollment row decides (``admitted``); without one, the ``devices`` table does,
        unless ``admitted_only``.

        Raises:
            PeerRefusedError: The registry cannot be read (``UNAVAILABLE``: fail closed).
        """
        hit = self.cached(device_id)
        if hit is not None:
            return hit
        try:
            with self._engine.connect() as conn:
                enrolled = conn.execute(
                    self._enrollment.where(self._enrolled.device_id == device_id)
                ).first()
                if enrolled is not None:
                    known = enrolled[0] == "admitted"
                elif self._admitted_only:
                    known = False
                else:
                    row = conn.execute(
                        self._select.where(self._device.device_id == device_id)
                    ).first()
                    known = row is not None
        except self._errors as exc:
            logger.error("device registry lookup failed: %s", str(exc).splitlines()[0])
            raise PeerRefusedError(
                grpc.StatusCode.UNAVAILABLE, "the server cannot check the device registry"
            ) from exc
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        ttl = self._ttl_s if known else self._miss_ttl_s
        self._cache[device_id] = (known, time.monotonic() + ttl)
        return known

    def close(self) -> None:
        """Release the registry's connections."""
        self._engine.dispose()
