"""The predictor: the local model answers every sample; the cloud only when it pays off.

For each sample :meth:`Predictor.predict_one`:

1. runs the device model (microseconds to a few milliseconds), giving the local answer
   and its confidence;
2. asks the :class:`~edgefl.edge_agent.offload.policy.OffloadPolicy` whether to offload;
3. if so, calls the cloud with the gRPC deadline ``budget - elapsed - fallback``;
   on ``DEADLINE_EXCEEDED``, ``UNAVAILABLE`` or any other failure it returns the local
   answer (``source="local_fallback"``), so the budget holds whatever the network does;
4. records where the answer was computed, how long it took and why, and commits the
   result to the outbox (kind ``result``) when one is given.

Because the local answer is computed first, the local fallback time is only the
``fallback_reserve_ms`` that covers handing it over. A background thread runs standard
gRPC health checks: they feed the RTT estimate and the circuit breaker.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from edgefl.edge_agent.outbox import Outbox, OutboxItem
from edgefl.edge_agent.runtimes import Runtime, create_runtime
from edgefl.errors import BadInputError
from edgefl.proto.serde import (
    ENVELOPE_VERSION,
    JSON_CONTENT_TYPE,
    Envelope,
    canonical_json_body,
    encode_envelope,
)
from edgefl.proto.topics import record_topic

from .breaker import CircuitBreaker
from .config import CloudOffloadConfig, OffloadConfig
from .estimators import OffloadEstimates, RollingEstimate
from .policy import OffloadPolicy

if TYPE_CHECKING:
    # grpc is loaded only by a predictor that has a cloud to call (.client imports it):
    # a device that answers locally keeps its memory for the model.
    from .client import InferenceClient

__all__ = [
    "PredictionResult",
    "Predictor",
    "Source",
    "describe_model",
    "find_device_model",
    "load_runtime",
    "softmax",
]

logger = logging.getLogger(__name__)

Source = Literal["local", "cloud", "local_fallback"]

# Preferred device variants in an artifacts folder: the smallest integer model first.
_VARIANT_PREFERENCE = ("pruned*-int8", "int8", "int8-wo", "fp16", "fp32")


@dataclass(frozen=True)
class PredictionResult:
    """One answered sample.

    Attributes:
        request_id: Unique id (also sent to the cloud).
        label: The answer's top-1 class.
        confidence: Its top-1 probability.
        source: ``local``, ``cloud`` or ``local_fallback`` (the cloud was tried and failed).
        latency_ms: From the sample's arrival to its answer.
        budget_ms: The sample's budget.
        deadline_met: ``latency_ms <= budget_ms``.
        reason: Why it was (not) offloaded, and the cloud error for a fallback.
        local_label: The local model's answer (equal to ``label`` unless from the cloud).
        local_confidence: The local model's top-1 probability.
        local_ms: Local inference time.
        cloud_ms: Cloud round trip when tried, else ``None``.
        probabilities: Class probabilities of the answer.
    """

    request_id: str
    label: int
    confidence: float
    source: Source
    latency_ms: float
    budget_ms: float
    deadline_met: bool
    reason: str
    local_label: int
    local_confidence: float
    local_ms: float
    cloud_ms: float | None
    probabilities: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the body of the ``result`` envelope)."""
        data = asdict(self)
        data["probabilities"] = [round(p, 6) for p in self.probabilities]
        return data


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Class probabilities of a 1-D output; outputs that already are probabilities stay."""
    values = np.asarray(logits, dtype=np.float64).ravel()
    if values.size and (values >= 0).all() and abs(values.sum() - 1.0) < 1e-3:
        return values
    shifted = np.exp(values - values.max())
    probs: npt.NDArray[np.float64] = shifted / shifted.sum()
    return probs


def find_device_model(path: Path) -> Path:
    """The ``.tflite`` to run: ``path`` itself, or the preferred variant in a folder.

    In a folder of built artifacts, the first match of pruned int8, int8, int8 weight-only,
    fp16, fp32 wins; when its manifest is present the file is checked against it.

    Raises:
        BadInputError: Nothing usable at ``path``.
        ArtifactError: The chosen file does not match its manifest.
    """
    if path.is_file():
        chosen = path
    elif path.is_dir():
        candidates: list[Path] = []
        for pattern in _VARIANT_PREFERENCE:
            candidates += sorted(path.glob(f"*.{pattern}.tflite"))
        candidates += sorted(p for p in path.glob("*.tflite") if p not in candidates)
        if not candidates:
            raise BadInputError(
                f"no .tflite model in {path}",
                hint="build one with: edgefl quantize build --model digits-cnn --out DIR",
            )
        chosen = candidates[0]
    else:
        raise BadInputError(f"device model {path} does not exist")
    from edgefl.manifest import (
        check_file_against_manifest,
        manifest_path_for,
        read_manifest,
    )

    manifest = manifest_path_for(chosen)
    if manifest.is_file():
        check_file_against_manifest(chosen, read_manifest(manifest))
    return chosen


def load_runtime(config: OffloadConfig) -> Runtime:
    """Load the configured device model on the configured (or best) runtime.

    Raises:
        BadInputError: No model configured, or nothing usable at the path.
        ArtifactError: The model file is corrupt or does not match its manifest.
        RuntimeUnavailableError: No runtime can run it here.
    """
    if config.model is None:
        raise BadInputError(
            "no device model given", hint="pass --model-dir DIR or set offload.model"
        )
    return create_runtime(config.runtime, find_device_model(config.model), threads=config.threads)


class Predictor:
    """Local-first inference with latency-budgeted offload.

    The runtime can be replaced between two predictions (:meth:`swap_runtime`): the
    inference loop moves to a newly installed model without losing the cloud channel, the
    estimates of the network or the breaker's state.

    Args:
        runtime: The device model, loaded.
        config: Policy, cloud endpoint and breaker settings (``offload:`` or
            ``inference:``).
        client: Client to use instead of building one from ``config.cloud`` (tests, or
            sharing a channel); the predictor closes only a client it built itself.
        outbox: Where results are committed; ``None`` keeps them in memory only.
        device_id: Device id in the result envelopes and topic.
        fleet: Fleet in the result topic.
        encoding: Envelope encoding (``json`` or ``protobuf``).

    Raises:
        BadInputError: A TLS file in ``config.cloud`` cannot be read.
    """

    def __init__(
        self,
        runtime: Runtime,
        config: CloudOffloadConfig,
        *,
        client: InferenceClient | None = None,
        outbox: Outbox | None = None,
        device_id: str = "device",
        fleet: str = "default",
        encoding: Literal["json", "protobuf"] = "json",
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.outbox = outbox
        self.device_id = device_id
        self.fleet = fleet
        self.encoding: Literal["json", "protobuf"] = encoding
        self._owns_client = client is None and config.cloud is not None
        self.client = client
        if self.client is None and config.cloud is not None and config.mode != "local":
            from .client import InferenceClient

            self.client = InferenceClient(config.cloud)
        self.estimates = OffloadEstimates(
            statistic=config.statistic,
            alpha=config.ewma_alpha,
            window=config.window,
            uplink_mbit_prior=config.uplink_mbit_prior,
        )
        self.breaker = CircuitBreaker(
            failure_threshold=config.breaker.failure_threshold,
            open_s=config.breaker.open_s,
            max_open_s=max(config.breaker.max_open_s, config.breaker.open_s),
        )
        self.policy = OffloadPolicy(
            config, self.estimates, self.breaker, cloud_available=self.client is not None
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        spec = runtime.inputs[0]
        self.input_shape: tuple[int, ...] = spec.shape[1:]
        self.counts: dict[str, int] = {"local": 0, "cloud": 0, "local_fallback": 0}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, seed the RTT estimate with a health check, start background checks.

        A service that cannot be reached is not an error: the breaker records the failure
        and every sample is answered locally until the service comes back.
        """
        if self.client is None or self.config.mode == "local" or self._health_thread:
            return
        cloud = self.config.cloud
        assert cloud is not None
        if cloud.connect_timeout_s > 0 and not self.client.wait_connected(cloud.connect_timeout_s):
            logger.warning("inference service %s not reachable yet", cloud.target)
        # The first check may include connection set-up, so only the second seeds the RTT.
        if self.check_health(record_rtt=False):
            self._check_cloud_model()
        self.check_health()
        self._health_thread = threading.Thread(
            target=self._health_loop, name="offload-health", daemon=True
        )
        self._health_thread.start()

    def close(self) -> None:
        """Stop the health checks and close the channel (if this predictor made it)."""
        self._stop.set()
        if self._health_thread is not None:
            self._health_thread.join(timeout=5)
            self._health_thread = None
        if self._owns_client and self.client is not None:
            self.client.close()

    def swap_runtime(self, runtime: Runtime) -> Runtime:
        """Serve the following samples with ``runtime``; returns the one it replaces.

        Call it between two predictions (the inference loop does, on its own thread): a
        prediction reads the runtime once, so none is answered by half of each. The local
        latency estimate starts again (it described the old model); the network estimates
        and the breaker stay. When the input shape changed, the cloud model is checked
        again in the background.
        """
        shape = runtime.inputs[0].shape[1:]
        with self._lock:
            old, self.runtime = self.runtime, runtime
            changed = shape != self.input_shape
            self.input_shape = shape
            self.estimates.local = RollingEstimate(
                alpha=self.config.ewma_alpha, window=self.config.window
            )
        if changed and self.client is not None and self.config.cloud is not None:
            threading.Thread(
                target=self._check_cloud_model, name="offload-model-check", daemon=True
            ).start()
        return old

    def __enter__(self) -> Predictor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check_health(self, *, record_rtt: bool = True) -> bool:
        """Run one health check now; feeds the breaker and (unless told not to) the RTT."""
        if self.client is None or self.config.cloud is None:
            return False
        from .client import CloudError  # loaded with the client

        start = time.perf_counter()
        try:
            serving = self.client.health(timeout_s=self.config.cloud.health_timeout_s)
        except CloudError as exc:
            logger.debug("health check failed: %s", exc)
            serving = False
        elapsed = (time.perf_counter() - start) * 1000.0
        with self._lock:
            if serving:
                if record_rtt:
                    self.estimates.observe_rtt(elapsed)
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
        return serving

    def _check_cloud_model(self) -> None:
        """Stop offloading if the served model cannot take this device's samples."""
        assert self.client is not None
        assert self.config.cloud is not None
        from .client import CloudError  # loaded with the client

        try:
            info = self.client.model_info(timeout_s=self.config.cloud.health_timeout_s)
        except CloudError as exc:
            if exc.code == "NOT_FOUND":
                self._disable_cloud(f"the service does not serve {self.config.cloud.model!r}")
            return  # anything else: requests will tell
        if info.input_shape != self.input_shape:
            self._disable_cloud(
                f"cloud model {info.model!r} takes input {info.input_shape}, the device model "
                f"{self.input_shape}"
            )

    def _disable_cloud(self, reason: str) -> None:
        logger.error("not offloading: %s", reason)
        with self._lock:
            self.policy.cloud_available = False
            self.policy.unavailable_reason = f"cloud unusable: {reason}"

    def _health_loop(self) -> None:
        assert self.config.cloud is not None
        while not self._stop.wait(self.config.cloud.health_interval_s):
            self.check_health()

    # -- prediction -----------------------------------------------------------------------

    def check_input(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Validate samples against the model: one sample or a batch, float, finite.

        Returns:
            The samples as a float32 batch ``(N, *input_shape)``.

        Raises:
            BadInputError: Wrong shape, non-numeric or non-finite values, or empty.
        """
        array = np.asarray(x)
        expected = "(" + ", ".join(map(str, self.input_shape)) + ")"
        if array.dtype.kind not in "fiub":
            raise BadInputError(f"input has dtype {array.dtype}; the model needs numbers")
        if array.shape == self.input_shape:
            array = array[None]
        if array.ndim != len(self.input_shape) + 1 or array.shape[1:] != self.input_shape:
            raise BadInputError(
                f"input of shape {array.shape} does not fit the model: give one sample of "
                f"shape {expected} or a batch (N, {expected[1:]}"
            )
        if array.shape[0] == 0:
            raise BadInputError("the input batch is empty")
        batch = array.astype(np.float32)
        if not np.isfinite(batch).all():
            raise BadInputError("input holds NaN or infinite values")
        return batch

    def predict(
        self, x: npt.ArrayLike, *, budget_ms: float | None = None
    ) -> list[PredictionResult]:
        """Answer every sample of a batch in turn, each within its own budget.

        Results are committed to the outbox in one transaction at the end.

        Raises:
            BadInputError: The input does not fit the model.
        """
        batch = self.check_input(x)
        results = [self._predict_checked(sample, budget_ms) for sample in batch]
        self._emit(results)
        return results

    def predict_one(
        self, sample: npt.ArrayLike, *, budget_ms: float | None = None
    ) -> PredictionResult:
        """Answer one sample within ``budget_ms`` (default: the configured budget).

        Raises:
            BadInputError: The sample does not fit the model.
        """
        batch = self.check_input(sample)
        if len(batch) != 1:
            raise BadInputError(f"predict_one takes one sample, got a batch of {len(batch)}")
        result = self._predict_checked(batch[0], budget_ms)
        self._emit([result])
        return result

    def _predict_checked(
        self, sample: npt.NDArray[np.float32], budget_ms: float | None
    ) -> PredictionResult:
        budget = self.config.budget_ms if budget_ms is None else budget_ms
        if budget <= 0:
            raise BadInputError(f"the budget must be > 0 ms, got {budget}")
        arrived = time.perf_counter()
        request_id = f"{self._prefix}-{next(self._ids)}"
        runtime = self.runtime  # read once: a swap between two samples never splits one
        local_probs = softmax(runtime.run(sample[None])[0])
        local_ms = (time.perf_counter() - arrived) * 1000.0
        local_label = int(local_probs.argmax())
        local_conf = float(local_probs[local_label])
        request_bytes = sample.nbytes + 64  # tensor body plus the message's framing
        with self._lock:
            self.estimates.observe_local(local_ms)
            decision = self.policy.decide(
                budget_ms=budget,
                elapsed_ms=(time.perf_counter() - arrived) * 1000.0,
                request_bytes=request_bytes,
                local_confidence=local_conf,
            )
        source: Source = "local"
        probs = local_probs
        reason = decision.reason
        cloud_ms: float | None = None
        if decision.offload and self.client is not None and decision.deadline_ms is not None:
            from .client import CloudError  # loaded with the client

            deadline_ms = decision.deadline_ms
            call_start = time.perf_counter()
            try:
                answer = self.client.predict(
                    sample[None], timeout_s=deadline_ms / 1000.0, request_id=request_id
                )
                cloud_probs = softmax(answer.output[0])
                if cloud_probs.shape != local_probs.shape:
                    raise CloudError(
                        "BAD_RESPONSE",
                        f"cloud answered {cloud_probs.size} classes, the device model has "
                        f"{local_probs.size}",
                    )
            except CloudError as exc:
                cloud_ms = (time.perf_counter() - call_start) * 1000.0
                source = "local_fallback"
                reason = f"{decision.reason}; cloud failed ({exc.code}), local answer used"
                with self._lock:
                    if exc.code == "DEADLINE_EXCEEDED":
                        self.estimates.observe_timeout(cloud_ms)
                    self.breaker.record_failure()
            else:
                cloud_ms = answer.round_trip_ms
                source = "cloud"
                probs = cloud_probs
                with self._lock:
                    self.estimates.observe_predict(
                        total_ms=answer.round_trip_ms,
                        server_ms=answer.compute_ms + answer.queue_ms,
                        request_bytes=answer.request_bytes,
                    )
                    if decision.explore:  # it fitted although the estimates said not
                        self.estimates.restart_network(
                            max(0.0, cloud_ms - answer.compute_ms - answer.queue_ms)
                        )
                    self.breaker.record_success()
        latency = (time.perf_counter() - arrived) * 1000.0
        label = int(probs.argmax())
        with self._lock:
            self.counts[source] += 1
        return PredictionResult(
            request_id=request_id,
            label=label,
            confidence=float(probs[label]),
            source=source,
            latency_ms=latency,
            budget_ms=budget,
            deadline_met=latency <= budget,
            reason=reason,
            local_label=local_label,
            local_confidence=local_conf,
            local_ms=local_ms,
            cloud_ms=cloud_ms,
            probabilities=tuple(float(p) for p in probs),
        )

    # -- results --------------------------------------------------------------------------

    @property
    def result_topic(self) -> str:
        """``edgefl/{fleet}/{device}/result/{stream}``."""
        return record_topic(self.fleet, self.device_id, "result", self.config.result_stream)

    def _emit(self, results: Sequence[PredictionResult]) -> None:
        if self.outbox is None or not results:
            return
        ts_ms = int(time.time() * 1000)
        incarnation = self.outbox.incarnation
        items = [
            OutboxItem(
                topic=self.result_topic, body=self._encoder(r, ts_ms, incarnation), kind="result"
            )
            for r in results
        ]
        self.outbox.put_many(items)

    def _encoder(
        self, result: PredictionResult, ts_ms: int, incarnation: str
    ) -> Callable[[int], bytes]:
        body = canonical_json_body(result.to_dict())

        def encode(seq: int) -> bytes:
            env = Envelope(
                version=ENVELOPE_VERSION,
                device_id=self.device_id,
                incarnation=incarnation,
                seq=seq,
                ts_ms=ts_ms,
                kind="result",
                content_type=JSON_CONTENT_TYPE,
                body=body,
            )
            return encode_envelope(env, self.encoding)

        return encode


def describe_model(runtime: Runtime) -> dict[str, Any]:
    """Model file, runtime and input spec, for reports, and the runtime's own details.

    onnxruntime adds the execution provider in use (:meth:`Runtime.details`).
    """
    spec = runtime.inputs[0]
    return {
        "model": str(runtime.model_path),
        "runtime": runtime.key,
        "input_shape": list(spec.shape[1:]),
        "input_dtype": spec.dtype,
        **runtime.details(),
    }
