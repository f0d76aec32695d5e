"""The inference loop: each sample a source produces, answered by the current model.

The daemon polls its sources on its main thread and :meth:`InferenceLoop.offer` s every
record of a served source to a bounded queue. It never waits: a sample that finds the
queue full is dropped and counted (``dropped``, the shortfall when the model cannot keep
up with the sources). The loop's own thread takes the samples in order and, for each:

1. turns it into one model input (``SourceRecord.inputs``, or a replay record's flat
   features reshaped to the model's input) and refuses, with a counted reason, what does
   not fit: ``bad_shape``, ``bad_dtype``, ``not_finite``, ``out_of_range`` (beyond
   float32), ``no_inputs``;
2. runs the model manager's current model through the
   :class:`~edgefl.edge_agent.offload.engine.Predictor`: the local answer first, then the
   offload policy (budget, estimates, circuit breaker) and the local fallback;
3. commits a ``result`` envelope (``edgefl/{fleet}/{device}/result/{result_stream}``) to
   the outbox with the source, the sample's index, the model, version and variant that
   answered and where it was computed, the label when known and the latency.

**Hot swap.** The loop always serves the model manager's current model. The manager calls
the loop's listener when it installs or rolls back a model; a loader thread then builds
the new interpreter (and runs it once, so the first real sample does not pay for a cold
start) while the loop keeps answering on the old one, and leaves it in a pending slot.
Between two samples the loop takes it and swaps one reference, so every sample is
answered exactly once, by one model, and none waits in the queue for the build. The
pause is measured (:class:`~edgefl.edge_agent.inference.stats.SwapRecord`).

Samples whose record says ``evaluation`` are answered and scored (on-device accuracy per
model version); the daemon never keeps them in the training data store.

**Shadow.** When the model manager holds a shadow release (a desired state's ``shadow``),
the loader builds its interpreter too, and the loop runs it on the same samples *after*
answering them with the serving model: a batch's results are committed to the outbox
first, then the shadow runs on the batch's samples. Its answers are only counted
(:class:`~edgefl.edge_agent.inference.stats.ShadowStats`: agreement with the served
answer, accuracy on evaluation samples beside the served answers' on the same samples,
errors, latency); they never make a result envelope, and a shadow's error is never
reported to the model manager (it would roll back the serving model on probation).
The bound on what the shadow costs the served answers: before each shadow inference the
loop looks at its queue, and a waiting sample ends the shadow's pass (the samples left
are counted ``skipped``); and the shadow runs only while its median inference time (the
loader times it when it builds it, then its last 32 inferences) is at most
``inference.shadow_max_delay_ms`` (default: a tenth of ``budget_ms``), its samples
skipped and counted ``too_slow`` otherwise. So a sample waits at most for the one shadow
inference in flight, typically no longer than that limit (the shadow's
``latency_p99_ms`` reports the tail); a loop that cannot keep up skips shadow
inferences, never real ones. A shadow found too slow is timed again on one sample after
1 s, then 2, 4, ... up to 60 s: a device that was busy when the shadow's first samples
were timed does not lock it out for good. A re-timed sample under the limit replaces the
stale times and the shadow runs again; one over it doubles the wait. So a shadow that is
really too slow costs at most one inference a minute once its waits have grown.
"""

from __future__ import annotations

import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from edgefl.edge_agent.offload.engine import PredictionResult, Predictor
from edgefl.edge_agent.runtimes import Runtime, create_runtime
from edgefl.edge_agent.sources import DataSource, InputSpec, SourceRecord
from edgefl.errors import BadInputError, EdgeflError
from edgefl.proto.serde import JSON_CONTENT_TYPE, canonical_json_body

from .config import TELEMETRY_STREAM, InferenceConfig
from .stats import InferenceStats, ModelKey, ShadowStats, SwapRecord

__all__ = ["InferenceLoop", "SampleRefusedError", "ServingModels", "model_input"]

logger = logging.getLogger(__name__)

_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
_BATCH: Final = 32  # results committed per outbox transaction at most
_SERVICE_WINDOW: Final = 64  # recent per-sample times behind the swap pause's baseline
_SHADOW_WINDOW: Final = 32  # recent shadow times behind its median, checked against the limit
_SHADOW_PROBES: Final = 5  # timed runs of a shadow when it is built
_SHADOW_RETIME_S: Final = (1.0, 60.0)  # first and longest wait to re-time a slow shadow


class ServingModels(Protocol):
    """What the loop needs of the model manager.

    :class:`~edgefl.edge_agent.models.manager.ModelManager` is the one implementation.
    """

    @property
    def generation(self) -> int:
        """How many times the serving model changed."""

    def current(self) -> Any:
        """The serving model (``path``, ``installed``: model, version, variant, sha256)."""

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called after every change of the serving model."""

    def record_inference(self, *, error: str | None = None) -> None:
        """Report an inference error (it rolls back a model on probation)."""


class SampleRefusedError(Exception):
    """A sample that does not fit the model; ``reason`` is the counted reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def model_input(record: SourceRecord, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    """One float32 model input of ``shape`` (no batch dimension) from a record.

    ``record.inputs`` (an array) is used when the source gives one; a flat vector of the
    right size is reshaped. Otherwise a labelled sample's flat features are reshaped
    (dataset replay). Sizes are compared before anything is converted, so a huge sample
    costs nothing.

    Raises:
        SampleRefusedError: ``no_inputs``, ``bad_shape``, ``bad_dtype``, ``not_finite`` or
            ``out_of_range`` (a value beyond float32).
    """
    size = math.prod(shape)
    inputs: object = record.inputs
    if inputs is None:
        if record.sample is None:
            raise SampleRefusedError(
                "no_inputs", f"a {record.kind} record of {record.stream} has no inputs"
            )
        values = record.sample[0]
        if not isinstance(values, list | tuple):
            kind = type(values).__name__
            raise SampleRefusedError("bad_dtype", f"features are a {kind}, not a list")
        if len(values) != size:
            raise SampleRefusedError(
                "bad_shape", f"{len(values)} features; the model takes {size} {shape}"
            )
        try:
            array = np.asarray(values)
        except (TypeError, ValueError) as exc:  # ragged nesting
            raise SampleRefusedError("bad_shape", f"features are not a flat list: {exc}") from exc
        if array.dtype.kind not in "fiu":
            raise SampleRefusedError(
                "bad_dtype", f"features must be numbers, got {array.dtype} values"
            )
        if array.ndim != 1:
            raise SampleRefusedError("bad_shape", f"features must be flat, got shape {array.shape}")
        array = array.astype(np.float64)
        array = array.reshape(shape)
    else:
        if not isinstance(inputs, np.ndarray):
            kind = type(inputs).__name__
            raise SampleRefusedError("bad_dtype", f"inputs are a {kind}, not an array")
        if inputs.dtype.kind not in "fiu":
            raise SampleRefusedError(
                "bad_dtype", f"inputs have dtype {inputs.dtype}; the model needs numbers"
            )
        if inputs.shape != shape:
            if inputs.ndim == 1 and inputs.size == size:
                inputs = inputs.reshape(shape)
            else:
                raise SampleRefusedError(
                    "bad_shape", f"inputs of shape {inputs.shape}; the model takes {shape}"
                )
        array = np.asarray(inputs, dtype=np.float64)
    if not np.isfinite(array).all():
        raise SampleRefusedError("not_finite", "inputs hold NaN or infinite values")
    if array.size and float(np.abs(array).max()) > _FLOAT32_MAX:
        raise SampleRefusedError("out_of_range", "inputs hold values beyond float32")
    return array.astype(np.float32)


@dataclass(frozen=True)
class _Sample:
    record: SourceRecord
    source: str
    index: int
    arrived: float  # perf_counter at offer


@dataclass(frozen=True)
class _Built:
    """A model loaded off the loop thread, waiting to be swapped in."""

    key: ModelKey
    sha256: str
    runtime: Runtime
    probe_ms: float = 0.0  # a shadow's median time per sample, timed by the loader


@dataclass(frozen=True)
class _ShadowChange:
    """What the loop's shadow becomes at its next look: a built one, or none."""

    built: _Built | None


@dataclass(frozen=True)
class _ShadowWork:
    """An answered sample, for the shadow to answer after it."""

    sample: _Sample
    x: npt.NDArray[np.float32]
    served: int
    served_local: int
    label: int | None


class InferenceLoop:
    """Answers every sample of the served sources with the manager's current model.

    Args:
        config: The ``inference:`` section.
        models: The model manager (the one source of truth for what runs).
        runtime_key: The device runtime (``models.runtime``).
        commit: Commits records to the outbox (the agent's ``submit``); called from the
            loop's thread.
        sources: The agent's sources (told the model's input spec on every swap when
            they can take it: ``expect(spec)``).
        device_id: For the predictor's request ids and logs.
        fleet: Likewise.
    """

    def __init__(
        self,
        config: InferenceConfig,
        *,
        models: ServingModels,
        runtime_key: str,
        commit: Callable[[Sequence[SourceRecord]], object],
        sources: Sequence[DataSource] = (),
        device_id: str = "device",
        fleet: str = "default",
    ) -> None:
        self.config = config
        self.models = models
        self.runtime_key = runtime_key
        self._commit = commit
        self._sources = list(sources)
        self._served = None if config.sources is None else set(config.sources)
        self.device_id = device_id
        self.fleet = fleet
        self.stats = InferenceStats()
        self._queue: queue.Queue[_Sample] = queue.Queue(maxsize=config.queue_size)
        self._produced: dict[str, int] = {}
        self._predictor: Predictor | None = None  # the loop's (None until the first model)
        self._made: Predictor | None = None  # the loader's, handed over with the first model
        self._connected = False  # the predictor's cloud side started (on the loader)
        self._serving: _Built | None = None
        self._pending: _Built | None = None
        self._pending_lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._retired: list[Runtime] = []
        # For the swap pause: the old model's last answer and recent per-sample times.
        self._last_done = 0.0
        self._service: deque[float] = deque(maxlen=_SERVICE_WINDOW)
        self._open_swap: SwapRecord | None = None
        self._swap_baseline: tuple[float, float] = (0.0, 0.0)
        self._logged: set[str] = set()
        # The shadow (a release run beside the serving model, never serving).
        self.shadow_stats = ShadowStats()
        self._shadow: _Built | None = None
        self._pending_shadow: _ShadowChange | None = None
        self._shadow_work: list[_ShadowWork] = []
        self._shadow_failed: tuple[int, str] | None = None  # generation, sha256 not loadable
        self._shadow_recent: deque[float] = deque(maxlen=_SHADOW_WINDOW)
        self._shadow_retime_wait_s = _SHADOW_RETIME_S[0]
        self._shadow_retime_at: float | None = None  # monotonic; set while it is too slow

    # -- lifecycle ----------------------------------------------------------------------

    def serves(self, source: str) -> bool:
        """Whether samples of ``source`` are answered."""
        return self._served is None or source in self._served

    @property
    def serving(self) -> ModelKey | None:
        """The model answering now."""
        built = self._serving
        return None if built is None else built.key

    @property
    def queue_depth(self) -> int:
        """Samples waiting."""
        return self._queue.qsize()

    def start(self) -> None:
        """Load the current model (here, so the first samples find it), start the threads."""
        self.models.add_listener(self._changed.set)
        self._load()
        self._load_shadow()
        self._take_pending()
        for name, target in (("inference-loop", self._run), ("inference-loader", self._loader)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then stop the threads and the predictor."""
        self._stop.set()
        self._changed.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        if self._made is not None:
            self._made.close()

    # -- the sources' side --------------------------------------------------------------

    def offer(self, source: str, records: Sequence[SourceRecord]) -> int:
        """Queue the records of ``source`` in order, never waiting; returns how many fit.

        Each record gets its index: its own ``index`` when the source sets one, else a
        running count of that source's records.
        """
        accepted = 0
        for record in records:
            index = record.index
            if index < 0:
                index = self._produced.get(source, 0)
            self._produced[source] = index + 1
            sample = _Sample(record, record.source or source, index, time.perf_counter())
            try:
                self._queue.put_nowait(sample)
            except queue.Full:
                self.stats.drop(source, self.serving)
                continue
            accepted += 1
        return accepted

    # -- the loader (off the loop thread) -----------------------------------------------

    def _loader(self) -> None:
        while not self._stop.is_set():
            try:
                self._load()
                self._connect()
            except Exception:  # the loader must outlive any one model
                logger.exception("loading the serving model failed")
            try:
                self._load_shadow()
            except Exception:  # nor may a shadow stop it
                logger.exception("loading the shadow model failed")
            self._retired.clear()  # old interpreters are freed here, not on the loop
            self._changed.wait(1.0)  # also polls: a change is never missed for long
            self._changed.clear()

    def _connect(self) -> None:
        """Start the predictor's cloud side here, so that no sample waits for a network.

        Until its first health check the policy offloads within the deadline or not at
        all, so the samples in between are answered within the budget all the same.
        """
        made = self._made
        if made is not None and not self._connected:
            self._connected = True
            made.start()

    def _load(self) -> None:
        """Build the manager's current model if it is not the one served (or pending)."""
        while True:
            generation = self.models.generation
            current = self.models.current()
            if current is None:
                return
            installed = current.installed
            serving = self._serving
            with self._pending_lock:
                if serving is not None and serving.sha256 == installed.sha256:
                    self._pending = None  # back to what serves before the swap happened
                    return
                if self._pending is not None and self._pending.sha256 == installed.sha256:
                    return
            key = ModelKey(installed.model, int(installed.version), installed.variant)
            try:
                runtime = create_runtime(
                    self.runtime_key, current.path, threads=self.config.threads
                )
                # One run now, so that the first real sample does not pay for a cold start.
                runtime.run(np.zeros(runtime.inputs[0].shape, dtype=np.float32))
            except (EdgeflError, OSError) as exc:
                logger.error(
                    "the loop cannot load %s: %s; the previous model keeps serving",
                    key.label(),
                    exc,
                )
                self.models.record_inference(error=f"load_failed: {exc}")
                return
            if self.models.generation != generation:
                continue  # it changed while we built: build what serves now
            if self._made is None:
                # The first model: the predictor (cloud channel, estimates, breaker) is
                # made once, here, and then only ever gets new runtimes.
                self._made = Predictor(
                    runtime, self.config, device_id=self.device_id, fleet=self.fleet
                )
            with self._pending_lock:
                self._pending = _Built(key, installed.sha256, runtime)
            logger.info("built %s for the loop (sha256 %s...)", key.label(), installed.sha256[:12])
            return

    def _shadow_generation(self) -> int:
        return int(getattr(self.models, "shadow_generation", 0))

    def _load_shadow(self) -> None:
        """Build the manager's shadow if it is not the loop's (or pending); or drop it."""
        shadow_of = getattr(self.models, "shadow", None)
        if shadow_of is None:
            return  # a model source without shadows
        while True:
            generation = self._shadow_generation()
            wanted = shadow_of()
            want = None if wanted is None else str(wanted.installed.sha256)
            running = None if self._shadow is None else self._shadow.sha256
            with self._pending_lock:
                pending = self._pending_shadow
                if (
                    pending is not None
                    and (None if pending.built is None else pending.built.sha256) == want
                ):
                    return
                if running == want:
                    self._pending_shadow = None  # back to what runs before the change
                    return
                if wanted is None:
                    self._pending_shadow = _ShadowChange(None)
                    return
            assert want is not None
            if self._shadow_failed == (generation, want):
                return  # failed to load; tried again when the shadow changes
            installed = wanted.installed
            key = ModelKey(installed.model, int(installed.version), installed.variant)
            try:
                runtime = create_runtime(self.runtime_key, wanted.path, threads=self.config.threads)
                probe = np.zeros(runtime.inputs[0].shape, dtype=np.float32)
                runtime.run(probe)  # cold start, not timed
                times = []
                for _ in range(_SHADOW_PROBES):
                    started = time.perf_counter()
                    runtime.run(probe)
                    times.append((time.perf_counter() - started) * 1000.0)
            except (EdgeflError, OSError) as exc:
                if self._shadow_generation() != generation:
                    continue  # it changed while we built (its file may have gone)
                self._shadow_failed = (generation, want)
                self.shadow_stats.load_failed()
                logger.error("the loop cannot load the shadow %s: %s", key.label(), exc)
                return
            if self._shadow_generation() != generation:
                continue  # it changed while we built: what we read may be another file
            with self._pending_lock:
                self._pending_shadow = _ShadowChange(
                    _Built(key, want, runtime, probe_ms=statistics.median(times))
                )
            logger.info("built the shadow %s for the loop (sha256 %s...)", key.label(), want[:12])
            return

    # -- the loop -----------------------------------------------------------------------

    def _take_pending_shadow(self) -> None:
        """Move to the shadow the loader built, or drop it (on the loop's thread)."""
        if self._pending_shadow is None:
            return
        with self._pending_lock:
            change, self._pending_shadow = self._pending_shadow, None
        if change is None:
            return
        old, self._shadow = self._shadow, change.built
        self._shadow_recent.clear()
        self._shadow_retime_wait_s, self._shadow_retime_at = _SHADOW_RETIME_S[0], None
        if old is not None:
            self._retired.append(old.runtime)
        logger.info(
            "the loop runs %s",
            "no shadow" if change.built is None else f"the shadow {change.built.key.label()}",
        )

    def _take_pending(self) -> None:
        """Between two samples: move to the model the loader built, if there is one."""
        self._take_pending_shadow()
        if self._pending is None:
            return
        started = time.perf_counter()
        with self._pending_lock:
            built, self._pending = self._pending, None
        if built is None:
            return
        old = self._serving
        if self._predictor is None:
            self._predictor = self._made
        assert self._predictor is not None  # made with the first model built
        if self._predictor.runtime is not built.runtime:
            self._retired.append(self._predictor.swap_runtime(built.runtime))
        self._serving = built
        self._expect(built.runtime)
        blocked = (time.perf_counter() - started) * 1000.0
        record = SwapRecord(
            at=time.time(),
            from_version=None if old is None else old.key.label(),
            to_version=built.key.label(),
            blocked_ms=round(blocked, 4),
        )
        self.stats.serving(built.key, None if old is None else record)
        if old is not None:
            self._open_swap = record
            baseline = statistics.median(self._service) if self._service else 0.0
            self._swap_baseline = (self._last_done, baseline)
        logger.info(
            "the loop serves %s%s (swap step %.2f ms)",
            built.key.label(),
            "" if old is None else f" instead of {old.key.label()}",
            blocked,
        )

    def _expect(self, runtime: Runtime) -> None:
        """Tell the served sources the input the loop takes now.

        The dtype is float32 whatever the tensor's: the runtime quantizes float input for
        an integer model itself, so a source must not refuse float samples for it.
        """
        spec = InputSpec(shape=tuple(runtime.inputs[0].shape[1:]), dtype="float32")
        for source in self._sources:
            if self.serves(source.name):
                try:
                    source.expect(spec)
                except Exception:  # a source's problem is not the loop's
                    logger.exception("source %s refused the input spec", source.name)

    def _run(self) -> None:
        while True:
            self._take_pending()
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results: list[SourceRecord] = []
            for n, sample in enumerate(batch):
                if n:
                    self._take_pending()  # between two samples
                result = self._answer(sample)
                if result is not None:
                    results.append(result)
            if results:
                try:
                    self._commit(results)
                except Exception:  # the outbox logs and counts its own refusals
                    logger.exception("committing %d results failed", len(results))
            if self._shadow_work:
                work, self._shadow_work = self._shadow_work, []
                self._shadow_pass(work)

    def _shadow_pass(self, work: list[_ShadowWork]) -> None:
        """Run the shadow on answered samples while no real sample waits (see the docs)."""
        self._take_pending_shadow()
        built = self._shadow
        if built is None:
            return
        limit = self.config.shadow_limit_ms
        recent = self._shadow_recent
        for n, item in enumerate(work):
            if not self._queue.empty():
                self.shadow_stats.skip(built.key, len(work) - n)
                break
            typical = statistics.median(recent) if recent else built.probe_ms
            retime = typical > limit
            if retime and not self._shadow_retime_due():
                self.shadow_stats.skip(built.key, len(work) - n, too_slow=True)
                self._log_once(
                    "shadow_too_slow",
                    f"the shadow {built.key.label()} takes {typical:.1f} ms a sample, over "
                    f"inference.shadow_max_delay_ms {limit:g}: its samples are skipped "
                    "(it is timed again on one sample now and then)",
                )
                break
            timed = len(recent)
            self._shadow_one(built, item)
            if retime and recent and len(recent) != timed and recent[-1] <= limit:
                # Back under the limit: the times that locked it out are stale.
                latest = recent[-1]
                recent.clear()
                recent.append(latest)
                self._shadow_retime_wait_s, self._shadow_retime_at = _SHADOW_RETIME_S[0], None
                logger.info("the shadow %s is back under its time limit", built.key.label())
        # The swap pause measures the swap: the loop was busy with the shadow until now.
        self._last_done = time.perf_counter()

    def _shadow_retime_due(self) -> bool:
        """Whether a shadow over its time limit is to be timed again on the next sample.

        The first call after it went over starts the wait (1 s); each re-timing that
        finds it still too slow doubles the wait, up to 60 s.
        """
        now = time.monotonic()
        if self._shadow_retime_at is None:
            self._shadow_retime_at = now + self._shadow_retime_wait_s
            return False
        if now < self._shadow_retime_at:
            return False
        self._shadow_retime_wait_s = min(self._shadow_retime_wait_s * 2, _SHADOW_RETIME_S[1])
        self._shadow_retime_at = now + self._shadow_retime_wait_s
        return True

    def _shadow_one(self, built: _Built, item: _ShadowWork) -> None:
        started = time.perf_counter()
        try:
            shape = tuple(built.runtime.inputs[0].shape[1:])
            x = item.x if item.x.shape == shape else model_input(item.sample.record, shape)
        except SampleRefusedError:
            self.shadow_stats.reject(built.key)
            return
        try:
            logits = built.runtime.run(x[None])
            answer = int(np.argmax(np.asarray(logits)[0]))
        except Exception as exc:  # counted for the shadow; never the serving model's error
            self.shadow_stats.error(built.key)
            self._log_once("shadow", f"the shadow {built.key.label()} failed on a sample: {exc}")
            return
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._shadow_recent.append(latency_ms)
        label = item.label
        self.shadow_stats.compared(
            built.key,
            agreed=answer == item.served,
            agreed_local=answer == item.served_local,
            correct=None if label is None else answer == label,
            served_correct=None if label is None else item.served == label,
            latency_ms=latency_ms,
        )

    def _answer(self, sample: _Sample) -> SourceRecord | None:
        started = time.perf_counter()
        built, predictor = self._serving, self._predictor
        if built is None or predictor is None:
            self.stats.unanswered()
            return None
        shape = tuple(built.runtime.inputs[0].shape[1:])
        try:
            x = model_input(sample.record, shape)
        except SampleRefusedError as exc:
            self.stats.reject(exc.reason, built.key)
            self._log_once(exc.reason, f"refused a sample of {sample.source}: {exc}")
            return None
        try:
            answer = predictor.predict_one(x)
        except BadInputError as exc:
            self.stats.reject("bad_shape", built.key)
            self._log_once("bad_input", f"refused a sample of {sample.source}: {exc}")
            return None
        except Exception as exc:  # the model failed on a valid input
            self.stats.error(built.key)
            self._log_once("error", f"{built.key.label()} failed on a sample: {exc}")
            self.models.record_inference(error=f"{type(exc).__name__}: {exc}")
            return None
        done = time.perf_counter()
        self._timed(sample, started, done)
        result = self._result(sample, built.key, answer, (done - started) * 1000.0)
        if self._shadow is not None or self._pending_shadow is not None:
            label = sample.record.label
            if label is None and sample.record.sample is not None:
                label = sample.record.sample[1]
            self._shadow_work.append(
                _ShadowWork(
                    sample,
                    x,
                    answer.label,
                    answer.local_label,
                    int(label) if label is not None and sample.record.evaluation else None,
                )
            )
        return result

    def _timed(self, sample: _Sample, started: float, done: float) -> None:
        """Keep the per-sample time, and close the pause of a swap just made."""
        swap = self._open_swap
        if swap is not None:
            last_old, baseline = self._swap_baseline
            could_start = max(sample.arrived, last_old)
            swap.pause_ms = round(max(0.0, (done - could_start) * 1000.0 - baseline * 1000.0), 4)
            self._open_swap = None
        self._service.append(done - started)
        self._last_done = done

    def _result(
        self, sample: _Sample, key: ModelKey, answer: PredictionResult, latency_ms: float
    ) -> SourceRecord:
        record = sample.record
        label = record.label
        if label is None and record.sample is not None:
            label = record.sample[1]
        evaluation = record.evaluation
        correct = None if label is None or not evaluation else answer.label == int(label)
        self.stats.answered(
            key,
            source=sample.source,
            where=answer.source,
            local_ms=answer.local_ms,
            latency_ms=latency_ms,
            deadline_met=answer.deadline_met,
            correct=correct,
        )
        body: dict[str, Any] = {
            "source": sample.source,
            "index": sample.index,
            "stream": record.stream,
            "model": key.model,
            "version": key.version,
            "variant": key.variant,
            "where": answer.source,
            "prediction": answer.label,
            "confidence": round(answer.confidence, 6),
            "latency_ms": round(answer.latency_ms, 4),
            "local_ms": round(answer.local_ms, 4),
            "cloud_ms": None if answer.cloud_ms is None else round(answer.cloud_ms, 4),
            "budget_ms": answer.budget_ms,
            "deadline_met": answer.deadline_met,
            "reason": answer.reason,
            "request_id": answer.request_id,
            "evaluation": evaluation,
        }
        if label is not None:
            body["label"] = int(label)
        return SourceRecord(
            stream=self.config.result_stream,
            kind="result",
            content_type=JSON_CONTENT_TYPE,
            body=canonical_json_body(body),
        )

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning("%s (further ones are only counted)", message)

    # -- reports ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The loop's figures with the model it serves and its queue."""
        serving = self.serving
        doc = self.stats.snapshot()
        predictor = self._predictor
        return {
            "shadow": self._shadow_status(),
            "model": None
            if serving is None
            else {"model": serving.model, "version": serving.version, "variant": serving.variant},
            "queue": {"depth": self.queue_depth, "size": self.config.queue_size},
            "mode": self.config.mode,
            "budget_ms": self.config.budget_ms,
            "breaker": None
            if predictor is None or predictor.client is None
            else predictor.breaker.state,
            **doc,
        }

    def _shadow_status(self) -> dict[str, Any]:
        """The shadow: the one the loop runs, the manager's view of it, the figures.

        Present even without a shadow (``state`` ``none``), so a reader can tell an agent
        that evaluates shadows from one that predates them.
        """
        shadow = self._shadow
        status_of = getattr(self.models, "shadow_status", None)
        manager: dict[str, Any] = {}
        if status_of is not None:
            try:
                manager = dict(status_of())
            except Exception:  # the report must not fail for it
                logger.exception("the model manager could not report its shadow")
        return {
            "model": None
            if shadow is None
            else {
                "model": shadow.key.model,
                "version": shadow.key.version,
                "variant": shadow.key.variant,
                "sha256": shadow.sha256,
            },
            "state": manager.get("state", "none"),
            "desired": manager.get("desired"),
            "last_failure": manager.get("last_failure"),
            "load_failures": self.shadow_stats.load_failures,
            "versions": self.shadow_stats.snapshot(),
        }

    def report(self) -> SourceRecord:
        """The ``telemetry/inference`` record of the figures now."""
        doc = {"at": round(time.time(), 3), **self.status()}
        return SourceRecord(
            stream=TELEMETRY_STREAM,
            kind="telemetry",
            content_type=JSON_CONTENT_TYPE,
            body=canonical_json_body(doc),
        )
