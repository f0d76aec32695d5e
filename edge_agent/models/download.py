"""The device's download client for the server's ``Models`` service (``proto/models.proto``).

:func:`download_artifact` appends to a partial file and asks the server for the rest from
that file's size, so a transfer cut by the network costs only what was in flight: call it
again and it resumes. It checks the stream as it comes (every chunk starts where the file
ends, the total size never changes, nothing past it) and fsyncs the file before it returns
or raises, so what it reports as written is on disk. :func:`fetch_manifest` gets the
signed manifest. Neither trusts what it fetched: the model manager checks the signature,
the sha256 and size and the rest before anything is installed.

A network that drops silently (a Wi-Fi or cellular link gone: no FIN, no RST) is noticed
by a progress deadline, not by gRPC keepalive alone: a download that receives no chunk for
``stall_timeout_s`` is cancelled and raises :class:`DownloadError` with code ``STALLED``,
keeping the staged bytes. Keepalive cannot be relied on here: its ping is not sent while
another ping is in flight, and the BDP probe's ping, whose acknowledgement queues behind
the bulk data, is timed out only after gRPC's fixed 60 s ping timeout (measured: a drop
half-way through a 4 MiB download at 8 Mbit/s was noticed after 58 s).

Both dial with the agent's enrolled identity (mutual TLS: ``tls.ca_file`` the fleet CA,
``cert_file``/``key_file`` the device certificate); every failure is a
:class:`DownloadError` (a ``ReleaseTrustError`` with the machine reason
``download_failed``) carrying the gRPC status name, so callers never touch
``grpc.RpcError``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc

from edgefl.config import Address, TlsFiles
from edgefl.errors import BadInputError, ExitCode
from edgefl.manifest import Manifest
from edgefl.proto import models_pb2
from edgefl.releasesign import ReleaseTrustError

__all__ = ["DOWNLOAD_FAILED", "DownloadError", "download_artifact", "fetch_manifest"]

DOWNLOAD_FAILED: Final = "download_failed"
"""The machine reason of every download failure (``ReleaseTrustError`` reasons)."""

_GET_MANIFEST: Final = "/edgefl.models.v1.Models/GetManifest"
_DOWNLOAD: Final = "/edgefl.models.v1.Models/Download"
_MAX_MESSAGE: Final = 8 * 1024 * 1024
DEFAULT_STALL_TIMEOUT_S: Final = 30.0
"""No chunk for this long cancels a download (``models.stall_timeout_s``)."""

Progress = Callable[[int, int], None]
"""``progress(bytes_in_file, total_size)``, after each chunk written."""


class DownloadError(ReleaseTrustError):
    """A manifest or artifact could not be fetched (network cut, refused, bad stream).

    A :class:`~edgefl.releasesign.ReleaseTrustError` whose ``reason`` is always
    :data:`DOWNLOAD_FAILED`, so the model manager reports it like any other refusal.

    Attributes:
        code: gRPC status name (``"UNAVAILABLE"``, ``"PERMISSION_DENIED"`` ...), or
            ``"BAD_RESPONSE"`` when the server's stream breaks the contract, ``"IO"`` when
            the partial file cannot be written, ``"STALLED"`` when no chunk arrived for
            the stall timeout (a silent network drop).
        moved: Artifact bytes written by the failed call before it failed.
    """

    exit_code = ExitCode.SERVICE_UNAVAILABLE

    def __init__(self, code: str, message: str, *, moved: int = 0) -> None:
        super().__init__(DOWNLOAD_FAILED, f"{code}: {message}")
        self.code = code
        self.moved = moved


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise BadInputError(f"the model download needs the device's {what} (tls)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _channel(target: Address, tls: TlsFiles) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "fleet CA certificate"),
        private_key=_read(tls.key_file, "key"),
        certificate_chain=_read(tls.cert_file, "certificate"),
    )
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # No grpc.min_reconnect_backoff_ms: gRPC also takes it as the connect timeout
        # (default 20 s), and at 200 ms no TLS handshake over a link with a 100 ms round
        # trip (cellular, satellite) ever completed.
        ("grpc.enable_retries", 0),
        # Silence on an idle connection: ping after 10 s, give up 5 s later. During a
        # download the stall deadline (_StallWatch) is what notices a silent drop.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]
    return grpc.secure_channel(str(target), creds, options=options)


def _translate(exc: grpc.RpcError, what: str, moved: int = 0) -> DownloadError:
    if isinstance(exc, grpc.Call):
        code = exc.code()
        name = code.name if code is not None else "UNKNOWN"
        details = exc.details() or "no details"
    else:  # pragma: no cover - every RpcError gRPC raises is a Call
        name, details = "UNKNOWN", str(exc)
    return DownloadError(name, f"{what}: {details}", moved=moved)


def fetch_manifest_text(
    target: Address,
    tls: TlsFiles,
    model: str,
    version: int,
    variant: str,
    *,
    timeout_s: float = 30.0,
) -> str:
    """The signed manifest file of one release variant, exactly as published.

    Raises:
        DownloadError: The call failed (``code`` says how).
        BadInputError: A TLS file cannot be read.
    """
    with _channel(target, tls) as channel:
        call = channel.unary_unary(
            _GET_MANIFEST,
            request_serializer=models_pb2.ManifestRequest.SerializeToString,
            response_deserializer=models_pb2.ManifestReply.FromString,
        )
        request = models_pb2.ManifestRequest(model=model, version=version, variant=variant)
        try:
            reply: models_pb2.ManifestReply = call(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _translate(exc, f"manifest of {model} {version} {variant}") from exc
    return reply.manifest_json


def fetch_manifest(
    target: Address,
    tls: TlsFiles,
    model: str,
    version: int,
    variant: str,
    *,
    timeout_s: float = 30.0,
) -> Manifest:
    """The signed manifest of one release variant, parsed (not yet verified).

    Raises:
        DownloadError: The call failed, or the answer is not a manifest (``BAD_RESPONSE``).
        BadInputError: A TLS file cannot be read.
    """
    from pydantic import ValidationError

    text = fetch_manifest_text(target, tls, model, version, variant, timeout_s=timeout_s)
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise DownloadError(
            "BAD_RESPONSE", f"the manifest of {model} {version} {variant} is invalid: {exc}"
        ) from exc


def download_artifact(
    target: Address,
    tls: TlsFiles,
    model: str,
    version: int,
    variant: str,
    dest: Path,
    *,
    timeout_s: float = 300.0,
    stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S,
    progress: Progress | None = None,
    expected_size: int | None = None,
) -> int:
    """Download an artifact into ``dest``, resuming from the size ``dest`` already has.

    Args:
        target: The server's ``Models`` service.
        tls: The device's enrolled identity (mutual TLS).
        model: Model name.
        version: Release version.
        variant: Variant name.
        dest: The partial (or absent) file; appended to, fsynced before returning.
        timeout_s: Deadline of the whole call.
        stall_timeout_s: Cancel the call when no chunk has arrived for this long (from
            the call's start, then from the last chunk): a silent network drop fails the
            attempt here rather than at ``timeout_s``. ``None`` waits for ``timeout_s``.
        progress: Called after each chunk written.
        expected_size: The size the signed desired state names, if known: a ``dest``
            already that long costs no call, and a longer one is discarded (it cannot
            be this artifact) and downloaded again.

    Returns:
        Artifact bytes written by this call (0 when ``dest`` was already complete).

    Raises:
        DownloadError: The transfer failed, was cut or stalled (``code`` ``STALLED``);
            ``dest`` keeps what arrived (call again to resume), ``moved`` says how much
            this call wrote.
        BadInputError: A TLS file cannot be read.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        have = dest.stat().st_size
    except FileNotFoundError:
        have = 0
    if expected_size is not None:
        if have == expected_size:
            return 0
        if have > expected_size:
            dest.unlink()
            have = 0
    moved = 0
    with _channel(target, tls) as channel:
        call = channel.unary_stream(
            _DOWNLOAD,
            request_serializer=models_pb2.DownloadRequest.SerializeToString,
            response_deserializer=models_pb2.Chunk.FromString,
        )
        request = models_pb2.DownloadRequest(
            model=model, version=version, variant=variant, offset=have
        )
        what = f"download of {model} {version} {variant} from byte {have}"
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise DownloadError("IO", f"cannot write {dest}: {exc.strerror}") from exc
        watch: _StallWatch | None = None
        try:
            stream = call(request, timeout=timeout_s)
            if stall_timeout_s is not None:
                watch = _StallWatch(stream.cancel, stall_timeout_s)
            total: int | None = None
            position = have
            try:
                for chunk in stream:
                    if watch is not None:
                        watch.progressed()
                    if total is None:
                        total = chunk.total_size
                    if chunk.total_size != total or chunk.offset != position:
                        stream.cancel()
                        raise DownloadError(
                            "BAD_RESPONSE",
                            f"{what}: chunk at {chunk.offset} of {chunk.total_size} bytes, "
                            f"expected {position} of {total}",
                            moved=moved,
                        )
                    if position + len(chunk.data) > total:
                        stream.cancel()
                        raise DownloadError(
                            "BAD_RESPONSE", f"{what}: data past the end ({total})", moved=moved
                        )
                    _write_all(fd, chunk.data, dest)
                    position += len(chunk.data)
                    moved += len(chunk.data)
                    if progress is not None:
                        progress(position, total)
            except grpc.RpcError as exc:
                if watch is not None and watch.fired:
                    raise DownloadError(
                        "STALLED",
                        f"{what}: no data for {stall_timeout_s:g} s (the network dropped or "
                        f"the server stopped sending); the {position} bytes staged in {dest} "
                        "are kept and the next attempt resumes from there",
                        moved=moved,
                    ) from exc
                raise _translate(exc, what, moved) from exc
            finally:
                if watch is not None:
                    watch.stop()
            if total is not None and position != total:
                raise DownloadError(
                    "BAD_RESPONSE",
                    f"{what}: the stream ended at {position} of {total}",
                    moved=moved,
                )
            if expected_size is not None and position != expected_size:
                raise DownloadError(
                    "BAD_RESPONSE",
                    f"{what}: the file is {position} bytes, the desired state says {expected_size}",
                    moved=moved,
                )
        finally:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return moved


def _write_all(fd: int, data: bytes, dest: Path) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            raise DownloadError("IO", f"cannot write {dest}: {exc.strerror}") from exc
        view = view[n:]


class _StallWatch:
    """Call ``cancel()`` once no progress was reported for ``stall_s`` seconds.

    One daemon thread per download call; :meth:`progressed` after each chunk,
    :meth:`stop` when the call is over. :attr:`fired` tells a cancellation it caused
    from any other.
    """

    def __init__(self, cancel: Callable[[], object], stall_s: float) -> None:
        if stall_s <= 0:
            raise BadInputError(f"the download stall timeout must be > 0 s, got {stall_s}")
        self._cancel = cancel
        self._stall_s = stall_s
        self._last = time.monotonic()
        self._done = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="download-stall", daemon=True)
        self._thread.start()

    def progressed(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while True:
            remaining = self._last + self._stall_s - time.monotonic()
            if remaining <= 0:
                break
            if self._done.wait(remaining):
                return
        if not self._done.is_set():
            self.fired = True
            self._cancel()
