"""The model delivery service: devices download signed release artifacts over mutual TLS.

``edgefl.models.v1.Models`` (``proto/models.proto``) serves the published releases folder::

    <releases_dir>/<model>/<version>/<variant>.tflite          the artifact
    <releases_dir>/<model>/<version>/<variant>.manifest.json   its signed manifest

- ``GetManifest(model, version, variant)`` answers the manifest file as published;
- ``Download(model, version, variant, offset)`` streams the artifact from ``offset`` in
  chunks of ``chunk_bytes`` (64 KiB), each carrying the artifact's ``total_size``: a
  device that lost its connection asks again from its partial file's size, so a cut costs
  at most the chunks in flight, never the whole file again.

This service only moves bytes: the device trusts nothing it downloads until the manifest's
signature, the sha256 and size, and everything else the manifest says have been checked
(``edgefl.edge_agent.models``).

Who may call (checked on every call, before the request is looked at, and again every 16
chunks of a download, so a device revoked while it downloads is stopped there):

- the TLS handshake requires a client certificate from the fleet CA (``tls.ca_file``), so a
  certificate from any other CA, or none, never reaches a handler (``UNAVAILABLE`` on the
  client);
- a certificate whose serial the CA's CRL lists is refused with ``UNAUTHENTICATED``. The
  CRL's signature must verify with the CA and it must not have expired, or every call is
  refused with ``UNAVAILABLE`` (fail closed). The file is re-read when it changes, so
  ``edgefl server revoke`` takes effect on the next call;
- the certificate's CN must be a device whose enrollment is ``admitted`` in the registry,
  else ``PERMISSION_DENIED``. Only enrolled devices download: service and operator
  identities (``edgefl-...``) and devices listed without an enrollment are refused too,
  since nothing but an enrolled device needs an artifact (stricter than the inference
  service, which also accepts a device the ``devices`` table lists). An answer is reused
  for ``registry_ttl_s``; a name found not admitted is asked again after at most a
  second, so a device just admitted is not kept waiting.

The request is then checked as an attacker holding a device certificate would probe it:
model and variant must be ids of the fleet contract (:mod:`edgefl.proto.ids`: no ``/``,
``..``, absolute paths or NUL can reach a path), the version a positive integer, the
offset within ``[0, size]``; and the resolved file must lie inside ``releases_dir`` (a
symlink that leads out is ``NOT_FOUND``). Each mistake is ``INVALID_ARGUMENT`` with a
message naming it.

Both checks are :mod:`edgefl.server.peer_auth`'s (:class:`PeerVerifier` and
:class:`DeviceDirectory` with ``admitted_only``), which the inference service uses too;
importing this module does not import torch, which the ``server`` extra does not install.

Python API::

    service = ModelService(settings)   # settings: ModelServiceConfig with tls, crl,
    port = service.start()             #   registry_url and releases_dir filled in
    ...                                # (resolve_settings(server_config) does it)
    service.stop()
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, NoReturn

import grpc

from edgefl.errors import BadInputError, ConfigError
from edgefl.proto import models_pb2
from edgefl.proto.ids import ID_SYNTAX, is_id
from edgefl.server.config import ModelServiceConfig, ServerConfig
from edgefl.server.peer_auth import DeviceDirectory, PeerRefusedError, PeerVerifier

__all__ = [
    "ARTIFACT_SUFFIX",
    "MANIFEST_SUFFIX",
    "SERVICE_NAME",
    "ModelService",
    "ModelServiceConfig",
    "PeerRefusedError",
    "release_paths",
    "resolve_settings",
]

log = logging.getLogger(__name__)

SERVICE_NAME: Final = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
"""``edgefl.models.v1.Models``."""

ARTIFACT_SUFFIX: Final = ".tflite"
MANIFEST_SUFFIX: Final = ".manifest.json"
_MAX_VERSION: Final = 2**62
_MISS_REREAD_S: Final = 1.0
_RECHECK_CHUNKS: Final = 16
"""A download re-checks its caller every this many chunks (1 MiB at the default size)."""

_Context = grpc.ServicerContext


def resolve_settings(server: ServerConfig) -> ModelServiceConfig:
    """The ``models:`` section with what it leaves unset filled in from the server's config.

    ``tls`` (unless ``tls.ca_file`` is given): the server certificate and the fleet CA;
    ``crl``: the CA's; ``registry_url``: the server's registry; ``releases_dir``:
    ``<state_dir>/releases``.
    """
    cfg = server.models
    ca_dir = server.resolved_ca_dir
    update: dict[str, Any] = {}
    if cfg.tls.ca_file is None:
        update["tls"] = cfg.tls.model_copy(
            update={
                "ca_file": ca_dir / "ca.pem",
                "cert_file": cfg.tls.cert_file or ca_dir / "server" / "cert.pem",
                "key_file": cfg.tls.key_file or ca_dir / "server" / "key.pem",
            }
        )
        if cfg.crl is None:
            update["crl"] = ca_dir / "crl.pem"
    if cfg.registry_url is None:
        update["registry_url"] = server.resolved_db_url
    if cfg.releases_dir is None:
        update["releases_dir"] = server.resolved_state_dir / "releases"
    return cfg.model_copy(update=update)


def release_paths(releases_dir: Path, model: str, version: int, variant: str) -> tuple[Path, Path]:
    """``(artifact, manifest)`` of one variant of a release (names must be ids).

    Raises:
        BadInputError: ``model`` or ``variant`` is not an id, or ``version`` < 1.
    """
    for what, value in (("model", model), ("variant", variant)):
        if not is_id(value):
            raise BadInputError(f"{what} {value!r} is not a valid name", hint=f"use {ID_SYNTAX}")
    if not 1 <= version <= _MAX_VERSION:
        raise BadInputError(f"version {version} is not a positive integer")
    folder = releases_dir / model / str(version)
    return folder / f"{variant}{ARTIFACT_SUFFIX}", folder / f"{variant}{MANIFEST_SUFFIX}"


class ModelService:
    """The ``Models`` gRPC service on its own thread pool (see the module docstring).

    Args:
        config: Settings with ``tls`` (all three files), ``crl``, ``registry_url`` and
            ``releases_dir`` set (:func:`resolve_settings`).

    Raises:
        ConfigError: A setting is missing, or the CA, CRL or registry cannot be read.
    """

    def __init__(self, config: ModelServiceConfig) -> None:
        tls = config.tls
        if tls.ca_file is None or tls.cert_file is None or tls.key_file is None:
            raise ConfigError(
                "models: the service needs mutual TLS (tls.ca_file, tls.cert_file, "
                "tls.key_file): only enrolled devices may download"
            )
        if config.crl is None or config.registry_url is None or config.releases_dir is None:
            raise ConfigError("models: crl, registry_url and releases_dir must be set")
        self.config = config
        self.releases_dir = config.releases_dir.expanduser().resolve()
        self._tls = (tls.ca_file, tls.cert_file, tls.key_file)
        self._crl = config.crl
        self._verifier: PeerVerifier | None = None
        self._admitted: DeviceDirectory | None = None
        self._server: grpc.Server | None = None
        self._stats_lock = threading.Lock()
        self.port = 0
        self.bytes_sent = 0
        """Artifact bytes handed to gRPC for sending, over every call."""
        self.downloads = 0
        """Download calls that streamed to the end."""
        self.refused: Counter[str] = Counter()
        """Calls refused, by status code name."""

    @property
    def address(self) -> str:
        """``host:port`` the service listens on."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> int:
        """Load the CA, CRL and registry, bind and serve.

        Returns:
            The bound port.

        Raises:
            ConfigError: Unreadable TLS files, CRL or registry.
            BadInputError: The address cannot be bound.
        """
        ca_file, cert_file, key_file = self._tls
        creds = grpc.ssl_server_credentials(
            [(_read(key_file, "TLS key"), _read(cert_file, "TLS certificate"))],
            root_certificates=_read(ca_file, "fleet CA certificate"),
            require_client_auth=True,
        )
        cfg = self.config
        assert cfg.registry_url is not None
        try:
            self._verifier = PeerVerifier(ca_file, self._crl)
        except ConfigError as exc:
            raise ConfigError(
                f"models: {exc.message}", hint="models.crl must be the CA's CRL"
            ) from exc
        try:
            self._admitted = DeviceDirectory(
                cfg.registry_url,
                ttl_s=cfg.registry_ttl_s,
                miss_ttl_s=_MISS_REREAD_S,
                admitted_only=True,
            )
        except ConfigError as exc:
            raise ConfigError(f"models: {exc.message}", hint="check models.registry_url") from exc
        server = grpc.server(
            ThreadPoolExecutor(max_workers=cfg.max_downloads, thread_name_prefix="edgefl-models"),
            maximum_concurrent_rpcs=cfg.max_downloads,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.max_receive_message_length", 64 * 1024),
            ],
        )
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "GetManifest": grpc.unary_unary_rpc_method_handler(
                self._get_manifest,
                request_deserializer=models_pb2.ManifestRequest.FromString,
                response_serializer=models_pb2.ManifestReply.SerializeToString,
            ),
            "Download": grpc.unary_stream_rpc_method_handler(
                self._download,
                request_deserializer=models_pb2.DownloadRequest.FromString,
                response_serializer=models_pb2.Chunk.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        target = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        try:
            port = server.add_secure_port(target, creds)
        except RuntimeError as exc:
            self._close_registry()
            raise BadInputError(
                f"models: cannot listen on {target}: {exc}", hint="choose another models.port"
            ) from exc
        self.port = port
        self._server = server
        server.start()
        log.info("model delivery service on %s serving %s", self.address, self.releases_dir)
        return port

    def stop(self) -> None:
        """Stop serving (in-flight calls get ``grace_s``); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(self.config.grace_s).wait()
        self._close_registry()

    def _close_registry(self) -> None:
        if self._admitted is not None:
            self._admitted.close()
            self._admitted = None

    # -- checks -------------------------------------------------------------------------

    def _refuse(self, context: _Context, code: grpc.StatusCode, details: str) -> NoReturn:
        with self._stats_lock:
            self.refused[code.name] += 1
        log.info("models: answered %s to %s: %s", code.name, context.peer(), details)
        context.abort(code, details)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _check_peer(self, context: _Context) -> str:
        """The caller's device id, or the call is refused."""
        try:
            # The stubs say bytes; gRPC gives a list of PEMs per key.
            auth: Mapping[str, Iterable[bytes]] = context.auth_context()  # type: ignore[assignment]
            assert self._verifier is not None
            assert self._admitted is not None
            cn = self._verifier.check(auth)
            if not self._admitted.is_known(cn):
                raise PeerRefusedError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{cn!r} is not an admitted device of the fleet registry: only enrolled "
                    "devices may download models",
                )
        except PeerRefusedError as exc:
            log.warning("models: refused a call from %s: %s", context.peer(), exc)
            self._refuse(context, exc.code, str(exc))
        return cn

    def _paths(
        self, model: str, version: int, variant: str, context: _Context
    ) -> tuple[Path, Path]:
        try:
            artifact, manifest = release_paths(self.releases_dir, model, version, variant)
        except BadInputError as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return artifact, manifest

    def _open_inside(self, path: Path, what: str, context: _Context) -> int:
        """An fd on ``path`` if it is a regular file that resolves inside the releases."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            self._refuse(context, grpc.StatusCode.NOT_FOUND, f"no {what} {self._shown(path)}")
        if not real.is_relative_to(self.releases_dir):
            log.error("models: %s resolves outside the releases folder (%s)", path, real)
            self._refuse(context, grpc.StatusCode.NOT_FOUND, f"no {what} {self._shown(path)}")
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            self._refuse(context, grpc.StatusCode.NOT_FOUND, f"no {what} {self._shown(path)}")
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self._refuse(context, grpc.StatusCode.NOT_FOUND, f"no {what} {self._shown(path)}")
        return fd

    def _shown(self, path: Path) -> str:
        """``model/version/file``: what a device may see of a path."""
        return str(path.relative_to(self.releases_dir))

    # -- handlers -----------------------------------------------------------------------

    def _get_manifest(
        self, request: models_pb2.ManifestRequest, context: _Context
    ) -> models_pb2.ManifestReply:
        device = self._check_peer(context)
        _, manifest = self._paths(request.model, request.version, request.variant, context)
        fd = self._open_inside(manifest, "manifest", context)
        limit = self.config.max_manifest_bytes
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            self._refuse(context, grpc.StatusCode.INTERNAL, f"the manifest is over {limit} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(context, grpc.StatusCode.INTERNAL, "the manifest is not UTF-8")
        log.info("models: manifest %s to %s", self._shown(manifest), device)
        return models_pb2.ManifestReply(manifest_json=text)

    def _download(
        self, request: models_pb2.DownloadRequest, context: _Context
    ) -> Iterator[models_pb2.Chunk]:
        device = self._check_peer(context)
        artifact, _ = self._paths(request.model, request.version, request.variant, context)
        offset = request.offset
        if offset < 0:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"offset {offset} is negative")
        fd = self._open_inside(artifact, "artifact", context)
        with os.fdopen(fd, "rb") as fh:
            total = os.fstat(fh.fileno()).st_size
            if offset > total:
                self._refuse(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"offset {offset} is past the end of {self._shown(artifact)} "
                    f"({total} bytes): delete the partial file and start again",
                )
            log.info(
                "models: %s downloads %s from byte %d of %d",
                device,
                self._shown(artifact),
                offset,
                total,
            )
            fh.seek(offset)
            chunk = self.config.chunk_bytes
            sent = 0
            while offset < total and context.is_active():
                if sent and sent % _RECHECK_CHUNKS == 0:
                    self._check_peer(context)  # revoked while downloading: stop there
                data = fh.read(min(chunk, total - offset))
                if not data:  # the file shrank under us: a release is never rewritten
                    self._refuse(
                        context, grpc.StatusCode.INTERNAL, "the artifact changed while sent"
                    )
                with self._stats_lock:
                    self.bytes_sent += len(data)
                yield models_pb2.Chunk(offset=offset, data=data, total_size=total)
                offset += len(data)
                sent += 1
        if offset >= total:
            with self._stats_lock:
                self.downloads += 1


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"models: cannot read {what} {path}: {exc.strerror}") from exc
