"""A typed client for the cloud inference service (``proto/inference.proto``) and its health.

The generated ``inference_pb2_grpc`` module is untyped, so the client builds its three
callables with ``channel.unary_unary`` and the generated message classes: the same wire
calls, checked by mypy. Every gRPC failure is translated into :class:`CloudError` with
the status code's name, so callers never touch ``grpc.RpcError``.

Channels are plaintext only when no :class:`~edgefl.edge_agent.offload.config.TlsConfig`
is given; with a certificate and key the channel does mutual TLS with the fleet CA's
device certificate. Requests never use ``wait_for_ready``: with the service down a call
fails with ``UNAVAILABLE`` at once instead of waiting out its deadline, so the local
answer is used immediately.

The channel is tuned for a mobile link (see :data:`CHANNEL_OPTIONS`): a refused
connection is retried within a second, but a connection attempt may take
:data:`CONNECT_TIMEOUT_S` (gRPC takes ``min_reconnect_backoff_ms`` as the connect
timeout too: at 200 ms a TLS handshake over a 300 ms round trip needed several attempts,
and over 700 ms none ever completed); and keepalive pings notice a connection that went
silent (an outage the connection survives leaves TCP retransmitting with a doubled
timeout each time, up to 20 s after a 30 s outage), so gRPC opens a new one instead of
waiting for the old one to come back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2

from edgefl.errors import BadInputError, EdgeflError
from edgefl.proto import inference_pb2
from edgefl.proto.tensors import TensorError, decode_tensor, encode_tensor

from .config import CloudConfig, TlsConfig

__all__ = [
    "CHANNEL_OPTIONS",
    "CONNECT_TIMEOUT_S",
    "KEEPALIVE_S",
    "CloudAnswer",
    "CloudError",
    "InferenceClient",
    "ModelInfo",
]

_PREDICT: Final = "/edgefl.v1.Inference/Predict"
_MODEL_INFO: Final = "/edgefl.v1.Inference/GetModelInfo"
_HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"
INFERENCE_SERVICE: Final = "edgefl.v1.Inference"

CONNECT_TIMEOUT_S: Final = 5.0
"""How long one connection attempt (TCP, TLS, HTTP/2 settings) may take."""
KEEPALIVE_S: Final = 2.0
"""Ping interval, and how long a ping may go unanswered before the connection is dropped."""
CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    # Notice a recovered service within about a second, not gRPC's default minutes...
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # ... while letting a handshake over a slow link finish: gRPC uses the minimum
    # backoff as the connect timeout as well.
    ("grpc.min_reconnect_backoff_ms", int(CONNECT_TIMEOUT_S * 1000)),
    # A connection that went silent while calls wait on it (the health checks keep one
    # waiting most of the time in an outage) is dropped within about 2 x KEEPALIVE_S.
    # gRPC times a ping out after grpc.http2.ping_timeout_ms (60 s by default), not after
    # the keepalive timeout. Pings only with calls in flight: the server counts pings on
    # an idle connection as abuse (GOAWAY too_many_pings after three); with calls, the
    # health checks' answers reset its count.
    ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_S * 1000)),
    ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # The BDP probe's ping would hold the keepalive ping back (one ping in flight at a
    # time); requests here are a few KiB.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.enable_retries", 0),
)


class CloudError(EdgeflError):
    """A call to the inference service failed.

    Attributes:
        code: gRPC status code name (``"UNAVAILABLE"``, ``"DEADLINE_EXCEEDED"`` ...), or
            ``"BAD_RESPONSE"`` when the answer itself is malformed.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class CloudAnswer:
    """One successful Predict.

    Attributes:
        output: The model output, float32, batch first.
        model: Model name the server answered with.
        version: Model version the server answered with.
        compute_ms: Server compute time.
        queue_ms: Time the request waited for a micro-batch.
        batch_size: Samples in the micro-batch it was computed in.
        round_trip_ms: Client-side duration of the call.
        request_bytes: Serialized request size.
    """

    output: npt.NDArray[np.float32]
    model: str
    version: str
    compute_ms: float
    queue_ms: float
    batch_size: int
    round_trip_ms: float
    request_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """What the service says about the model it serves."""

    model: str
    version: str
    input_dtype: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    heldout_accuracy: float


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """TLS credentials from files; mutual TLS when a certificate and key are configured.

    Raises:
        BadInputError: A file cannot be read.
    """
    ca = _read(tls.ca_file, "CA certificate")
    cert = key = None
    if tls.cert_file is not None and tls.key_file is not None:
        cert = _read(tls.cert_file, "client certificate")
        key = _read(tls.key_file, "client key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class InferenceClient:
    """One channel to the inference service.

    Args:
        config: Target, TLS and message size.

    Raises:
        BadInputError: A TLS file cannot be read.
    """

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            *CHANNEL_OPTIONS,
        ]
        if config.tls is None:
            self._channel = grpc.insecure_channel(str(config.target), options=options)
        else:
            if config.tls.server_name:
                options.append(("grpc.ssl_target_name_override", config.tls.server_name))
            self._channel = grpc.secure_channel(
                str(config.target), channel_credentials(config.tls), options=options
            )
        self._predict = self._channel.unary_unary(
            _PREDICT,
            request_serializer=inference_pb2.PredictRequest.SerializeToString,
            response_deserializer=inference_pb2.PredictResponse.FromString,
        )
        self._model_info = self._channel.unary_unary(
            _MODEL_INFO,
            request_serializer=inference_pb2.ModelInfoRequest.SerializeToString,
            response_deserializer=inference_pb2.ModelInfo.FromString,
        )
        self._health = self._channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def wait_connected(self, timeout_s: float) -> bool:
        """Try to connect within ``timeout_s``; ``False`` when the service is not reachable."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
        return True

    def predict(
        self, x: npt.NDArray[np.float32], *, timeout_s: float, request_id: str = ""
    ) -> CloudAnswer:
        """Run the cloud model on a batch.

        Args:
            x: Input batch, ``(N, *input_shape)``.
            timeout_s: The call's deadline, seconds from now.
            request_id: Echoed back by the server.

        Raises:
            CloudError: Any failure, with its gRPC status code name.
        """
        request = inference_pb2.PredictRequest(
            model=self.config.model,
            version=self.config.version,
            input=encode_tensor(np.ascontiguousarray(x, dtype=np.float32)),
            request_id=request_id,
        )
        size = request.ByteSize()
        timeout_s = max(timeout_s, 0.0)
        start = time.perf_counter()
        # gRPC's own deadline travels to the server (which stops work when it passes), but
        # the sync client reports it 3-7 ms late here; waiting on the future with our own
        # timeout hands control back on time, and cancelling tells the server as well.
        future = self._predict.future(request, timeout=timeout_s)
        try:
            response = future.result(timeout=timeout_s)
        except grpc.FutureTimeoutError as exc:
            future.cancel()
            raise CloudError(
                "DEADLINE_EXCEEDED", f"no answer within {timeout_s * 1000:.1f} ms"
            ) from exc
        except grpc.FutureCancelledError as exc:
            raise CloudError("CANCELLED", "the call was cancelled (channel closed)") from exc
        except grpc.RpcError as exc:
            raise _translate(exc) from exc
        elapsed = (time.perf_counter() - start) * 1000.0
        try:
            output = decode_tensor(response.output).astype(np.float32)
        except TensorError as exc:
            raise CloudError("BAD_RESPONSE", f"the output tensor is malformed: {exc}") from exc
        if output.ndim == 0 or output.shape[0] != x.shape[0]:
            raise CloudError(
                "BAD_RESPONSE", f"output shape {output.shape} does not match a batch of {len(x)}"
            )
        return CloudAnswer(
            output=output,
            model=response.model,
            version=response.version,
            compute_ms=response.compute_us / 1000.0,
            queue_ms=response.queue_us / 1000.0,
            batch_size=response.batch_size,
            round_trip_ms=elapsed,
            request_bytes=size,
        )

    def health(self, *, timeout_s: float, service: str = INFERENCE_SERVICE) -> bool:
        """Standard gRPC health check; ``True`` only for ``SERVING``.

        Raises:
            CloudError: The check itself failed (unreachable, deadline, unknown service).
        """
        try:
            reply = self._health(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _translate(exc) from exc
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def model_info(self, *, timeout_s: float) -> ModelInfo:
        """Ask which model the service serves and its tensor specs.

        Raises:
            CloudError: The call failed.
        """
        try:
            info = self._model_info(
                inference_pb2.ModelInfoRequest(model=self.config.model), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise _translate(exc) from exc
        return ModelInfo(
            model=info.model,
            version=info.version,
            input_dtype=info.input_spec.dtype,
            input_shape=tuple(int(d) for d in info.input_spec.shape),
            output_shape=tuple(int(d) for d in info.output_spec.shape),
            heldout_accuracy=float(info.heldout_accuracy),
        )

    def close(self) -> None:
        """Close the channel; calls in flight fail with ``CANCELLED``."""
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _translate(exc: grpc.RpcError) -> CloudError:
    if isinstance(exc, grpc.Call):
        code = exc.code()
        details = exc.details() or ""
        return CloudError(code.name if code is not None else "UNKNOWN", details)
    return CloudError("UNKNOWN", str(exc))
