"""The cloud inference service: ``edgefl.v1.Inference`` on grpc.aio, with health checking.

Python API (what ``edgefl server inference``, tests and benchmarks use)::

    from edgefl.server.inference import InferenceServerConfig, start_in_thread

    config = InferenceServerConfig(model="digits", weights=Path("/var/cache/edgefl/inference"))
    with start_in_thread(config) as running:          # returns once the model is SERVING
        channel = grpc.insecure_channel(running.address)   # "127.0.0.1:<port>"
        ...                                                # running.port, running.version
    # leaving the block (or running.stop()) stops the server and its worker thread

- :class:`InferenceServerConfig` (strict pydantic): ``host`` (127.0.0.1), ``port``
  (0 = a free one), ``model`` (a name in ``HEAVY_MODELS``, default ``"digits"``),
  ``weights`` (cache folder; trained once if missing), ``train_epochs``, ``max_batch``
  (32; 1 = no batching), ``max_wait_ms`` (2), ``max_concurrency`` (in-flight requests,
  256), ``max_samples_per_request`` (256), ``max_message_bytes`` (4 MiB),
  ``torch_threads`` (1), ``tls`` (:class:`~edgefl.config.TlsFiles`: ``cert_file`` and
  ``key_file`` are the server certificate, e.g. ``FleetCA.issue_server_cert``;
  ``ca_file`` requires a client certificate from this CA: mutual TLS; the old keys
  ``tls_cert``/``tls_key``/``client_ca`` are accepted for one release), ``crl`` (refuse
  revoked devices; re-read when the file changes), ``registry_url`` (refuse devices the
  fleet registry does not list), ``grace_s`` (stop grace).
- :class:`InferenceServer` (asyncio): ``await start()`` → bound port, ``await stop()``,
  ``await wait_for_termination()``; ``models=[...]`` serves given :class:`ServedModel`
  objects instead of loading ``config.model`` (tests inject a slow model this way).
- :func:`start_in_thread` → :class:`RunningServer` (``port``, ``address``, ``version``,
  ``server``, ``stop()``; a context manager): the server on its own event loop thread.
- :func:`serve`: run in the foreground until SIGINT/SIGTERM (the CLI).

Status codes, in the order they are checked (see ``proto/inference.proto``):
UNAUTHENTICATED / PERMISSION_DENIED (revoked or unknown device, mutual TLS only),
UNAVAILABLE (model still loading, or stopping), RESOURCE_EXHAUSTED (over
``max_concurrency``: refused at once, never queued; an oversized message is refused by
gRPC itself with the same code), DEADLINE_EXCEEDED (already past on arrival, or passed
in the queue or during compute: the work is dropped or stopped, see
:mod:`~edgefl.server.inference.batcher`), INVALID_ARGUMENT (empty model name, bad dtype,
shape or byte length, more than ``max_samples_per_request`` samples), NOT_FOUND (unknown
model or version), INTERNAL (a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from edgefl.errors import BadInputError, ConfigError, EdgeflError, ExitCode
from edgefl.proto import inference_pb2
from edgefl.proto.tensors import TensorError, decode_tensor, encode_tensor
from edgefl.server.config import InferenceServerConfig
from edgefl.server.inference.batcher import BatcherStats, ComputeAbandonedError, MicroBatcher
from edgefl.server.inference.models import ServedModel, get_recipe, load_or_train
from edgefl.server.metrics import current as current_metrics
from edgefl.server.peer_auth import DeviceDirectory, PeerRefusedError, PeerVerifier

__all__ = [
    "SERVICE_NAME",
    "InferenceServer",
    "InferenceServerConfig",
    "RunningServer",
    "StartCancelledError",
    "default_weights_dir",
    "serve",
    "start_in_thread",
]

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
"""``edgefl.v1.Inference``: the name health checks ask about."""

_PredictContext = grpc.aio.ServicerContext[
    inference_pb2.PredictRequest, inference_pb2.PredictResponse
]
_InfoContext = grpc.aio.ServicerContext[inference_pb2.ModelInfoRequest, inference_pb2.ModelInfo]
_AnyContext = grpc.aio.ServicerContext[Any, Any]
Progress = Callable[[str, int, int], None]


def default_weights_dir() -> Path:
    """``$XDG_CACHE_HOME/edgefl/inference`` (``~/.cache/edgefl/inference``)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefl" / "inference"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_torch_threads_lock = threading.Lock()
_torch_threads_users = 0
_torch_threads_before = 0


def _hold_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads while a server runs (process-wide, so counted)."""
    import torch

    global _torch_threads_users, _torch_threads_before
    with _torch_threads_lock:
        if _torch_threads_users == 0:
            _torch_threads_before = torch.get_num_threads()
        _torch_threads_users += 1
        torch.set_num_threads(threads)


def _release_torch_threads() -> None:
    """The last server to stop gives torch back the thread count it had before."""
    import torch

    global _torch_threads_users
    with _torch_threads_lock:
        _torch_threads_users -= 1
        if _torch_threads_users == 0:
            torch.set_num_threads(_torch_threads_before)


class StartCancelledError(EdgeflError):
    """The server was stopped before its model had finished loading or training."""

    exit_code = ExitCode.INTERRUPTED


@dataclass
class _Served:
    model: ServedModel
    batcher: MicroBatcher


class InferenceServer:
    """One grpc.aio server with the inference and health services.

    Args:
        config: Validated settings.
        models: Serve these instead of loading ``config.model`` (tests, benchmarks).
        progress: Called as ``progress(what, done, total)`` while a model trains.
    """

    def __init__(
        self,
        config: InferenceServerConfig,
        *,
        models: Sequence[ServedModel] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self._given_models = list(models) if models is not None else None
        self._progress = progress
        self._stop_requested = threading.Event()
        self._served: dict[str, _Served] = {}
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._verifier: PeerVerifier | None = None
        self._directory: DeviceDirectory | None = None
        self._ready = False
        self._stopping = False
        self._inflight = 0
        self._holds_torch_threads = False
        self.port = 0
        self.refused: Counter[str] = Counter()
        """Requests refused, by status code name (a test and operator aid)."""
        self.completed = 0
        """Requests answered successfully."""
        self._metrics = current_metrics().inference

    # -- public ----------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        return _format_address(self.config.host, self.port)

    @property
    def models(self) -> dict[str, ServedModel]:
        """Served models by name (empty until loaded)."""
        return {name: s.model for name, s in self._served.items()}

    def batcher_stats(self, model: str) -> BatcherStats:
        """Micro-batching counters of one served model."""
        return self._served[model].batcher.stats

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._inflight

    async def start(self) -> int:
        """Bind, start answering (health NOT_SERVING), load the model, then SERVING.

        Returns:
            The bound port.

        Raises:
            ConfigError: Unreadable TLS files or CRL.
            BadInputError: The address cannot be bound, or the model is unknown.
        """
        cfg = self.config
        if self._given_models is None:
            get_recipe(cfg.model)  # an unknown name fails before anything is bound
        if cfg.tls.ca_file is not None:
            self._verifier = PeerVerifier(cfg.tls.ca_file, cfg.crl)
        if cfg.registry_url is not None:
            self._directory = DeviceDirectory(cfg.registry_url, ttl_s=cfg.registry_ttl_s)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                # Port 0 must give a port nobody else holds.
                ("grpc.so_reuseport", 0),
                # Find connections of devices that vanished (network cut, power loss), and
                # let devices keep their own connections warm with pings every >= 10 s.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ],
        )
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self._predict,
                request_deserializer=inference_pb2.PredictRequest.FromString,
                response_serializer=inference_pb2.PredictResponse.SerializeToString,
            ),
            "PredictStream": grpc.stream_stream_rpc_method_handler(
                self._predict_stream,
                request_deserializer=inference_pb2.PredictRequest.FromString,
                response_serializer=inference_pb2.PredictResponse.SerializeToString,
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self._model_info,
                request_deserializer=inference_pb2.ModelInfoRequest.FromString,
                response_serializer=inference_pb2.ModelInfo.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        server.add_generic_rpc_handlers((self._health_handler(),))
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        target = f"{cfg.host}:{cfg.port}" if ":" not in cfg.host else f"[{cfg.host}]:{cfg.port}"
        try:
            tls = cfg.tls
            if tls.cert_file is not None and tls.key_file is not None:
                creds = grpc.ssl_server_credentials(
                    [(_read(tls.key_file, "TLS key"), _read(tls.cert_file, "TLS certificate"))],
                    root_certificates=(
                        _read(tls.ca_file, "client CA") if tls.ca_file is not None else None
                    ),
                    require_client_auth=tls.ca_file is not None,
                )
                port = server.add_secure_port(target, creds)
            else:
                port = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise BadInputError(
                f"cannot listen on {target}: {exc}",
                hint="choose another --port (0 picks a free one) or --host",
            ) from exc
        if port == 0:
            raise BadInputError(f"cannot listen on {target}", hint="choose another --port")
        self.port = port
        self._server = server
        await server.start()
        logger.info("inference server listening on %s (loading models)", self.address)
        try:
            models = self._given_models
            if models is None:
                weights = cfg.weights if cfg.weights is not None else default_weights_dir()
                loaded = await asyncio.get_running_loop().run_in_executor(
                    None,
                    lambda: load_or_train(
                        cfg.model, weights, epochs=cfg.train_epochs, progress=self._on_progress
                    ),
                )
                models = [loaded]
            self._install(models)
        except BaseException:
            await self.stop(grace=0)
            raise
        self._ready = True
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        for served in self._served.values():
            m = served.model
            logger.warning(
                "serving %s version %s on %s (held-out accuracy %.4f, max_batch %d)",
                m.name,
                m.version,
                self.address,
                m.heldout_accuracy,
                served.batcher.max_batch,
            )
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish (``grace``), stop the workers."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_requested.set()
        self._ready = False
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.grace_s if grace is None else grace)
        batchers = [s.batcher for s in self._served.values()]

        def close_all() -> None:
            for batcher in batchers:
                batcher.close()

        if batchers:
            await asyncio.get_running_loop().run_in_executor(None, close_all)
        if self._directory is not None:
            self._directory.close()
        if self._holds_torch_threads:
            self._holds_torch_threads = False
            _release_torch_threads()
        logger.info("inference server on %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        """Wait until the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- internals -------------------------------------------------------------------

    def _on_progress(self, what: str, done: int, total: int) -> None:
        """Training progress; also where a stop during training takes effect (per epoch)."""
        if self._stop_requested.is_set():
            raise StartCancelledError("stopped while the model was training")
        if self._progress is not None:
            self._progress(what, done, total)

    def _install(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise BadInputError("no model to serve")
        if self.config.torch_threads is not None:
            _hold_torch_threads(self.config.torch_threads)
            self._holds_torch_threads = True
        for model in models:
            if model.name in self._served:
                raise BadInputError(f"model {model.name!r} is registered twice")
            self._served[model.name] = _Served(
                model,
                MicroBatcher(
                    model,
                    max_batch=self.config.max_batch,
                    max_wait_ms=self.config.max_wait_ms,
                    metrics=self._metrics,
                ),
            )

    def _health_handler(self) -> grpc.GenericRpcHandler:
        """The standard health service, behind the same peer checks as inference calls."""
        servicer = self._health

        async def check(
            request: health_pb2.HealthCheckRequest, context: _AnyContext
        ) -> health_pb2.HealthCheckResponse:
            await self._check_peer(context)
            return await servicer.Check(request, context)

        async def watch(request: health_pb2.HealthCheckRequest, context: _AnyContext) -> None:
            await self._check_peer(context)
            await servicer.Watch(request, context)

        return grpc.method_handlers_generic_handler(
            health.SERVICE_NAME,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    check,
                    request_deserializer=health_pb2.HealthCheckRequest.FromString,
                    response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    watch,
                    request_deserializer=health_pb2.HealthCheckRequest.FromString,
                    response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
                ),
            },
        )

    async def _refuse(
        self,
        context: _AnyContext,
        code: grpc.StatusCode,
        details: str,
    ) -> NoReturn:
        self.refused[code.name] += 1
        logger.info("answered %s to %s: %s", code.name, context.peer(), details)
        await context.abort(code, details)

    async def _gate(self, context: _AnyContext) -> None:
        """Checks every call passes before its request is looked at: peer, readiness."""
        await self._check_peer(context)
        if not self._ready:
            await self._refuse(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the server is stopping" if self._stopping else "the model is still loading",
            )

    async def _check_peer(self, context: _AnyContext) -> None:
        """Mutual TLS only: refuse revoked devices and, with a registry, unlisted ones."""
        if self._verifier is not None:
            try:
                device = self._verifier.check(context.auth_context())
                directory = self._directory
                if directory is not None:
                    known = directory.cached(device)
                    if known is None:
                        known = await asyncio.get_running_loop().run_in_executor(
                            None, directory.is_known, device
                        )
                    if not known:
                        raise PeerRefusedError(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"device {device!r} is not in the fleet registry",
                        )
            except PeerRefusedError as exc:
                logger.warning("refused a call from %s: %s", context.peer(), exc)
                await self._refuse(context, exc.code, str(exc))

    @contextlib.contextmanager
    def _slot(self) -> Iterator[bool]:
        """Admit one request if under ``max_concurrency``; yields whether it was admitted."""
        if self._inflight >= self.config.max_concurrency:
            yield False
            return
        self._inflight += 1
        try:
            yield True
        finally:
            self._inflight -= 1

    async def _predict(
        self, request: inference_pb2.PredictRequest, context: _PredictContext
    ) -> inference_pb2.PredictResponse:
        await self._gate(context)
        return await self._predict_one(request, context)

    async def _predict_stream(
        self,
        requests: AsyncIterator[inference_pb2.PredictRequest],
        context: _PredictContext,
    ) -> AsyncIterator[inference_pb2.PredictResponse]:
        async for request in requests:
            # Per message, so a revocation or a stop also ends a long-lived stream.
            await self._gate(context)
            yield await self._predict_one(request, context)

    async def _predict_one(
        self, request: inference_pb2.PredictRequest, context: _PredictContext
    ) -> inference_pb2.PredictResponse:
        metrics = self._metrics
        if metrics is None:
            return await self._answer(request, context)
        start = time.perf_counter()
        outcome = "error"
        try:
            response = await self._answer(request, context)
            outcome = "ok"
            return response
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.request(time.perf_counter() - start, outcome)

    async def _answer(
        self, request: inference_pb2.PredictRequest, context: _PredictContext
    ) -> inference_pb2.PredictResponse:
        with self._slot() as admitted:
            if not admitted:
                await self._refuse(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is at its limit of {self.config.max_concurrency} "
                    "in-flight requests; retry later or answer locally",
                )
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                await self._refuse(
                    context,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the deadline had passed when the request arrived",
                )
            served = await self._lookup(request.model, request.version, context)
            x = await self._decode(request.input, served.model, context)
            deadline = None if remaining is None else time.monotonic() + remaining
            try:
                result = await served.batcher.submit(x, deadline=deadline)
            except ComputeAbandonedError as exc:
                if self._stopping:
                    await self._refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc))
                await self._refuse(
                    context,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the deadline passed before the answer was ready ({exc})",
                )
            except asyncio.CancelledError:
                self.refused["CANCELLED"] += 1
                raise
            except Exception as exc:
                logger.exception("predict failed for model %s", served.model.name)
                await self._refuse(
                    context, grpc.StatusCode.INTERNAL, f"the model failed: {type(exc).__name__}"
                )
            self.completed += 1
            return inference_pb2.PredictResponse(
                model=served.model.name,
                version=served.model.version,
                output=encode_tensor(result.output),
                compute_us=result.compute_us,
                queue_us=result.queue_us,
                batch_size=result.batch_size,
                request_id=request.request_id,
            )

    async def _lookup(self, name: str, version: str, context: _AnyContext) -> _Served:
        if not name:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request names no model; this server serves {sorted(self._served)}",
            )
        served = self._served.get(name)
        if served is None:
            await self._refuse(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r}; this server serves {sorted(self._served)}",
            )
        if version and version != served.model.version:
            await self._refuse(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} has no version {version!r}; it serves version "
                f"{served.model.version!r} (leave version empty for the served one)",
            )
        return served

    async def _decode(
        self, tensor: inference_pb2.Tensor, model: ServedModel, context: _PredictContext
    ) -> np.typing.NDArray[np.float32]:
        want = f"{model.input_dtype} [N, {', '.join(map(str, model.input_shape))}]"
        try:
            x = decode_tensor(tensor)
        except TensorError as exc:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{exc.message}; {model.name} takes {want}",
            )
        if x.dtype.name != model.input_dtype:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input dtype {x.dtype.name} is wrong; {model.name} takes {want}",
            )
        if x.ndim != len(model.input_shape) + 1 or tuple(x.shape[1:]) != model.input_shape:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input shape {list(x.shape)} is wrong; {model.name} takes {want} "
                "(a single sample needs a batch dimension of 1)",
            )
        if x.shape[0] == 0:
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the input batch is empty (N = 0)"
            )
        cap = self.config.max_samples_per_request
        if x.shape[0] > cap:
            # INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: the same request is refused however
            # idle the server is, so retrying it unchanged is pointless; split it.
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the input batch has {x.shape[0]} samples; this server takes at most "
                f"{cap} per request (max_samples_per_request): send several requests",
            )
        if not np.isfinite(x).all():
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the input holds NaN or infinity"
            )
        return x.astype(np.float32, copy=False)

    async def _model_info(
        self, request: inference_pb2.ModelInfoRequest, context: _InfoContext
    ) -> inference_pb2.ModelInfo:
        await self._gate(context)
        served = await self._lookup(request.model, "", context)
        m = served.model
        return inference_pb2.ModelInfo(
            model=m.name,
            version=m.version,
            input_spec=inference_pb2.Tensor(dtype=m.input_dtype, shape=list(m.input_shape)),
            output_spec=inference_pb2.Tensor(dtype="float32", shape=list(m.output_shape)),
            heldout_accuracy=m.heldout_accuracy if math.isfinite(m.heldout_accuracy) else 0.0,
        )


# -- running it ----------------------------------------------------------------------


class RunningServer:
    """A server running on its own event-loop thread (from :func:`start_in_thread`).

    Attributes:
        server: The server object (read counters and models from the caller's thread).
        port: The bound port.
        address: ``host:port`` to connect to.
        version: Version of the (first) served model.
    """

    def __init__(
        self,
        server: InferenceServer,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        stop_event: asyncio.Event,
    ) -> None:
        self.server = server
        self.port = server.port
        self.address = server.address
        self.version = next(iter(server.models.values())).version
        self._loop = loop
        self._thread = thread
        self._stop_event = stop_event

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (grace ``config.grace_s``) and join its thread; idempotent."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    config: InferenceServerConfig,
    *,
    models: Sequence[ServedModel] | None = None,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> RunningServer:
    """Start a server on a new thread with its own event loop; return once it is SERVING.

    Args:
        config: Settings.
        models: Serve these instead of loading ``config.model``.
        progress: Training progress callback (``what, done, total``).
        timeout: Longest wait for start-up, or ``None`` to wait as long as it takes
            (training a missing model can take minutes on a busy machine).

    Returns:
        The running server; call ``stop()`` (or use it as a context manager).

    Raises:
        EdgeflError: Start-up failed (bad TLS files, port in use, unknown model...).
        TimeoutError: It did not become ready within ``timeout``.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    outcome: dict[str, object] = {}
    server = InferenceServer(config, models=models, progress=progress)

    async def main() -> None:
        stop_event = asyncio.Event()
        outcome["stop_event"] = stop_event
        try:
            await server.start()
        except BaseException as exc:
            outcome["error"] = exc
            ready.set()
            return
        ready.set()
        await stop_event.wait()
        await server.stop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="edgefl-inference-server", daemon=True)
    thread.start()
    if not ready.wait(timeout):
        # Don't leak it: stop training at the next epoch, or the server once it has started.
        server._stop_requested.set()
        stopper = outcome.get("stop_event")
        if isinstance(stopper, asyncio.Event):
            loop.call_soon_threadsafe(stopper.set)
        raise TimeoutError(f"the inference server did not start within {timeout} s")
    error = outcome.get("error")
    if isinstance(error, BaseException):
        thread.join(10)
        raise error
    stop_event = outcome["stop_event"]
    assert isinstance(stop_event, asyncio.Event)
    return RunningServer(server, loop, thread, stop_event)


def serve(
    config: InferenceServerConfig,
    *,
    on_ready: Callable[[InferenceServer], None] | None = None,
    progress: Progress | None = None,
) -> None:
    """Run a server in the foreground until SIGINT or SIGTERM, then stop it cleanly.

    Args:
        config: Settings.
        on_ready: Called once the model is SERVING (the CLI prints the address).
        progress: Training progress callback (``what, done, total``).
    """
    endpoint = None
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        endpoint, _ = start_http_server(
            config.metrics_port, addr="127.0.0.1", registry=current_metrics().registry
        )
        logger.info("metrics on http://127.0.0.1:%d/metrics", endpoint.server_port)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop_event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_event.set)
        server = InferenceServer(config, progress=progress)
        start = asyncio.ensure_future(server.start())
        stopper = asyncio.ensure_future(stop_event.wait())
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():  # a signal while the model loads or trains
            logger.warning("stopping the inference server before its model was ready")
            await server.stop(grace=0)  # the training thread stops at its next epoch
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartCancelledError):
                await start
            return
        start.result()  # raises a start-up error
        if on_ready is not None:
            on_ready(server)
        await stopper
        logger.warning("stopping the inference server on %s", server.address)
        await server.stop()

    try:
        asyncio.run(main())
    finally:
        if endpoint is not None:
            endpoint.shutdown()
            endpoint.server_close()
