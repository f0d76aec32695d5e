"""Prometheus metrics of the server process (``/metrics`` on the admin API).

One :class:`ServerMetrics` per process holds a dedicated
:class:`prometheus_client.CollectorRegistry` (never the library's global one, so two
servers in one test process do not collide). :func:`render` returns the exposition text
of the process's instance and its content type; the admin API serves it at ``/metrics``.

What is counted where it happens (cheap: a few counter increments per ingest batch and
one histogram observation per stored record):

- ``edgefl_ingest_messages_total{kind}``: messages the ingest handled, by topic kind
  (``telemetry``, ``data``, ``result``, ``cmd-resp``, ``status``, ``state``, ``other``);
- ``edgefl_ingest_outcomes_total{outcome}``: what became of them (``stored``,
  ``duplicate``, ``status``, ``state_stored``, ``state_unchanged``, ``dead_lettered``);
- ``edgefl_ingest_dead_letters_total{reason}``: dead letters by reason code
  (:data:`edgefl.server.ingest.DEAD_LETTER_REASONS`);
- ``edgefl_ingest_lag_seconds``: histogram of the time from a record's device timestamp
  to its commit in the registry (a record that waited in the device's outbox while
  offline shows here);
- ``edgefl_inference_request_duration_seconds{outcome}`` and
  ``edgefl_inference_batch_size`` (samples per forward pass) of the cloud inference
  service, when it runs in this process; under ``edgefl server start`` it is a supervised
  child serving them on a loopback port (``inference.metrics_port``), and each scrape
  folds its ``edgefl_inference_*`` families in (``edgefl_child_metrics_up{child}`` says
  whether it answered within 0.5 s).

What is read when Prometheus scrapes (nothing on a hot path; a handful of small
aggregate queries on the registry):

- ``edgefl_devices{presence}``: admitted-or-seen devices by ``online``/``offline``;
- ``edgefl_fl_rounds_total`` and ``edgefl_fl_round_duration_seconds`` (histogram of the
  rounds' wall time, built from ``fl_rounds``: rounds run in the ServerApp's process);
- ``edgefl_fl_run_epsilon_max{run}`` (the largest device ε of the run so far) and
  ``edgefl_fl_run_epsilon_cap{run}`` (the cap a device refuses to train past), for runs
  still running or updated in the last 7 days: one series per run, set at round end;
- ``edgefl_rollouts{state}``, ``edgefl_rollout_devices{state}`` (devices of running
  rollouts) and ``edgefl_rollout_halted_timestamp_seconds`` (the latest halt);
- ``edgefl_child_restarts_total{child}``: restarts of the supervised children (and of the
  ingest by its watchdog);
- ``edgefl_certificate_expiry_timestamp_seconds{certificate}`` (the CA and the server's
  own certificates) and ``edgefl_crl_next_update_timestamp_seconds``.

No series carries a device id. ``metrics.enabled: false`` in the server config turns it
all off: the ingest then gets no hooks and ``/metrics`` answers an empty exposition.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from collections import Counter as _Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from edgefl.metrics_util import INFERENCE_LATENCY_BUCKETS

__all__ = [
    "CONTENT_TYPE",
    "INGEST_KINDS",
    "InferenceMetrics",
    "IngestMetrics",
    "ServerMetrics",
    "add_child_endpoint",
    "attach_server",
    "configure",
    "count_kinds",
    "current",
    "detach_server",
    "render",
    "topic_kind",
]

log = logging.getLogger(__name__)

# The *_created series double what a scrape carries and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
"""Content type of :func:`render`'s text: the Prometheus text format 0.0.4, which every
Prometheus 2.x reads (Debian 12 ships 2.42)."""

INGEST_KINDS: Final = ("telemetry", "data", "result", "cmd-resp", "status", "state", "other")
"""Values of the ``kind`` label of ``edgefl_ingest_messages_total`` (bounded)."""

LAG_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
ROUND_BUCKETS: Final = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RUN_WINDOW: Final = timedelta(days=7)
"""Finished runs stay in ``edgefl_fl_run_epsilon_*`` this long after their last change."""


class BatchHistogram(Collector):
    """A histogram observed a batch at a time: one lock per batch, not per value.

    ``prometheus_client``'s :class:`~prometheus_client.Histogram` takes a lock per
    observation; the ingest observes every stored record, so this one counts a batch's
    values into local buckets first and adds them under one lock.
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Iterable[float]) -> None:
        """Count these values (a negative one counts as 0)."""
        bounds, place = self._bounds, bisect.bisect_left
        counts = [0] * len(self._counts)
        total = 0.0
        for value in values:
            if value < 0.0:
                value = 0.0
            counts[place(bounds, value)] += 1  # the first bound >= value: le semantics
            total += value
        with self._lock:
            for i, n in enumerate(counts):
                if n:
                    self._counts[i] += n
            self._sum += total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, running = [], 0
        for bound, n in zip(self._bounds, counts, strict=False):
            running += n
            buckets.append((str(bound), float(running)))
        buckets.append(("+Inf", float(running + counts[-1])))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


def count_kinds(topics: Iterable[str]) -> dict[str, int]:
    """Messages per ``kind`` label for these topics (a helper of the ingest's hook)."""
    return dict(_Counter(topic_kind(t) for t in topics))


class IngestMetrics:
    """The ingest's counters: called once per committed batch (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "edgefl_ingest_messages",
            "Messages the MQTT ingest handled, by topic kind.",
            ["kind"],
            registry=registry,
        )
        self.outcomes = Counter(
            "edgefl_ingest_outcomes",
            "What became of the messages the ingest handled.",
            ["outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "edgefl_ingest_dead_letters",
            "Messages the ingest wrote to dead_letters, by reason code.",
            ["reason"],
            registry=registry,
        )
        self.lag = BatchHistogram(
            "edgefl_ingest_lag_seconds",
            "Time from a record's device timestamp to its commit in the registry.",
            LAG_BUCKETS,
        )
        registry.register(self.lag)
        # Children made once: labels() costs a dict lookup under a lock each call.
        self._kind = {kind: self.messages.labels(kind) for kind in INGEST_KINDS}
        self._outcome: dict[str, Any] = {}
        for kind in INGEST_KINDS:
            self._kind[kind].inc(0)

    def record_batch(
        self,
        topics: Iterable[str],
        outcomes: Mapping[str, int],
        dead: Mapping[str, int],
        lags_s: Iterable[float],
    ) -> None:
        """Count one committed batch from its messages' topics (see :meth:`batch`)."""
        self.batch(count_kinds(topics), outcomes, dead, lags_s)

    def batch(
        self,
        kinds: Mapping[str, int],
        outcomes: Mapping[str, int],
        dead: Mapping[str, int],
        lags_s: Iterable[float],
    ) -> None:
        """Count one committed batch: messages by kind, outcomes, dead letters, lags."""
        for kind, n in kinds.items():
            child = self._kind.get(kind) or self._kind["other"]
            child.inc(n)
        for outcome, n in outcomes.items():
            if n:
                out = self._outcome.get(outcome)
                if out is None:
                    out = self._outcome[outcome] = self.outcomes.labels(outcome)
                out.inc(n)
        for reason, n in dead.items():
            self.dead_letters.labels(reason).inc(n)
        self.lag.observe_many(lags_s)


_HEADS: Final = frozenset(INGEST_KINDS) - {"other"}


def topic_kind(topic: str) -> str:
    """The ``kind`` label of a message on ``topic`` (one of :data:`INGEST_KINDS`)."""
    parts = topic.split("/", 4)
    if len(parts) < 4:
        return "other"
    head = parts[3]
    return head if head in _HEADS else "other"


class InferenceMetrics:
    """The cloud inference service's request latency and batch sizes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "edgefl_inference_request_duration_seconds",
            "Time the inference service took to answer a request, by gRPC outcome.",
            ["outcome"],
            buckets=INFERENCE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "edgefl_inference_batch_size",
            "Samples per forward pass of the inference service's micro-batcher.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self._ok = self.latency.labels("ok")

    def request(self, seconds: float, outcome: str = "ok") -> None:
        """One answered (``ok``) or refused request (its status code, lower case)."""
        (self._ok if outcome == "ok" else self.latency.labels(outcome)).observe(seconds)


class _ServerSources:
    """What the scrape-time collector reads: the registry, the supervisor, the CA."""

    def __init__(
        self,
        engine: Any,
        *,
        restarts: Callable[[], Mapping[str, int]] | None = None,
        ca_dir: Path | None = None,
        cert_files: Mapping[str, Path] | None = None,
    ) -> None:
        self.engine = engine
        self.restarts = restarts
        self.ca_dir = ca_dir
        self.cert_files = dict(cert_files or {})
        self._not_after: dict[Path, tuple[float, float | None]] = {}  # path -> (mtime, ts)

    def not_after(self, path: Path, *, crl: bool = False) -> float | None:
        """A certificate's notAfter (a CRL's nextUpdate) as a Unix time, cached by mtime."""
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        cached = self._not_after.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        from cryptography import x509

        try:
            data = path.read_bytes()
            if crl:
                nxt = x509.load_pem_x509_crl(data).next_update_utc
                value = nxt.timestamp() if nxt is not None else None
            else:
                value = x509.load_pem_x509_certificate(data).not_valid_after_utc.timestamp()
        except (OSError, ValueError) as exc:
            log.warning("metrics: cannot read %s: %s", path, exc)
            value = None
        self._not_after[path] = (mtime, value)
        return value


class _ScrapeCollector(Collector):
    """Reads the registry, the supervisor and the CA when Prometheus scrapes."""

    def __init__(self, owner: ServerMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        sources = self._owner.sources
        if sources is not None:
            yield from _source_metrics(sources)
        children = self._owner.children
        if children:
            up = GaugeMetricFamily(
                "edgefl_child_metrics_up",
                "Whether the last scrape read the child's own metrics (1) or not (0).",
                labels=["child"],
            )
            families: list[Metric] = []
            for name, url in sorted(children.items()):
                got = _child_metrics(name, url)
                up.add_metric([name], 0.0 if got is None else 1.0)
                families += got or []
            yield up
            yield from families


def _source_metrics(sources: _ServerSources) -> Iterator[Metric]:
    if sources.engine is not None:
        try:
            yield from _registry_metrics(sources.engine)
        except Exception as exc:  # a scrape must not fail with the database
            log.warning("metrics: reading the registry failed: %s", exc)
    if sources.restarts is not None:
        fam = CounterMetricFamily(
            "edgefl_child_restarts",
            "Restarts of the server's supervised children after they died.",
            labels=["child"],
        )
        for child, n in sorted(sources.restarts().items()):
            fam.add_metric([child], float(n))
        yield fam
    yield from _expiry_metrics(sources)


CHILD_TIMEOUT_S: Final = 0.5
"""How long a scrape waits for a child's /metrics (a child still training may not answer)."""


def _child_metrics(name: str, url: str) -> list[Metric] | None:
    """A child's ``edgefl_<name>_*`` families from its loopback endpoint (``None``: no answer)."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=CHILD_TIMEOUT_S) as response:
            text = response.read().decode("utf-8")
        # Only the child's own families: it registers the ingest's too, never counted there.
        prefix = f"edgefl_{name}_"
        return [f for f in text_string_to_metric_families(text) if f.name.startswith(prefix)]
    except (OSError, ValueError, urllib.error.URLError) as exc:
        log.debug("metrics: %s at %s did not answer: %s", name, url, exc)
        return None


_statements: dict[str, Any] = {}
_caps: dict[tuple[str, str], float | None] = {}  # (run, plan key) -> the plan's ε cap


def _queries() -> dict[str, Any]:
    """The scrape's registry queries, built once.

    Building them costs more than running them on a small registry.
    """
    if _statements:
        return _statements
    from sqlalchemy import bindparam, case, func, select

    from edgefl.server.registry.models import Device, FlRound, FlRun, Rollout, RolloutDevice

    cols: list[Any] = [func.count(), func.coalesce(func.sum(FlRound.wall_s), 0.0)]
    cols += [func.sum(case((FlRound.wall_s <= b, 1), else_=0)) for b in ROUND_BUCKETS]
    _statements.update(
        presence=select(Device.online, func.count()).group_by(Device.online),
        rounds=select(*cols),
        runs=select(FlRun.run_id, FlRun.plan_key, FlRun.plan_json, func.max(FlRound.epsilon_max))
        .outerjoin(FlRound, FlRound.run_id == FlRun.run_id)
        .where((FlRun.status == "running") | (FlRun.updated_at >= bindparam("since")))
        .group_by(FlRun.run_id, FlRun.plan_key, FlRun.plan_json),
        rollouts=select(Rollout.state, func.count()).group_by(Rollout.state),
        rollout_devices=select(RolloutDevice.state, func.count())
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(Rollout.state == "running")
        .group_by(RolloutDevice.state),
        halted=select(func.max(func.coalesce(Rollout.finished_at, Rollout.updated_at))).where(
            Rollout.state == "halted"
        ),
    )
    return _statements


def _registry_metrics(engine: Any) -> Iterator[Metric]:
    from edgefl.server.registry.models import ROLLOUT_STATES

    q = _queries()
    now = datetime.now(UTC)
    with engine.connect() as conn:
        presence = dict.fromkeys(("online", "offline"), 0)
        for online, n in conn.execute(q["presence"]):
            presence["online" if online else "offline"] += int(n)
        devices = GaugeMetricFamily(
            "edgefl_devices", "Devices in the registry by presence.", labels=["presence"]
        )
        for key, n in presence.items():
            devices.add_metric([key], float(n))
        yield devices

        row = conn.execute(q["rounds"]).one()
        count, total = int(row[0]), float(row[1])
        yield CounterMetricFamily(
            "edgefl_fl_rounds", "Federated rounds committed (every run).", value=float(count)
        )
        buckets = [(str(b), float(row[2 + i] or 0)) for i, b in enumerate(ROUND_BUCKETS)]
        buckets.append(("+Inf", float(count)))
        yield HistogramMetricFamily(
            "edgefl_fl_round_duration_seconds",
            "Wall time of the committed federated rounds.",
            buckets=buckets,
            sum_value=total,
        )

        eps_max = GaugeMetricFamily(
            "edgefl_fl_run_epsilon_max",
            "Largest device ε of the run after its latest committed round.",
            labels=["run"],
        )
        eps_cap = GaugeMetricFamily(
            "edgefl_fl_run_epsilon_cap",
            "The ε a device of the run refuses to train past (dp.epsilon_cap).",
            labels=["run"],
        )
        for run_id, plan_key, plan_json, top in conn.execute(
            q["runs"], {"since": now - RUN_WINDOW}
        ):
            if top is not None:
                eps_max.add_metric([run_id], float(top))
            run_key = (str(run_id), str(plan_key))
            if run_key not in _caps:
                _caps[run_key] = _epsilon_cap(plan_json)
            cap = _caps[run_key]
            if cap is not None:
                eps_cap.add_metric([run_id], cap)
        yield eps_max
        yield eps_cap

        states = GaugeMetricFamily("edgefl_rollouts", "Staged rollouts by state.", labels=["state"])
        by_state = dict.fromkeys(ROLLOUT_STATES, 0)
        for state, n in conn.execute(q["rollouts"]):
            by_state[str(state)] = int(n)
        for state, n in sorted(by_state.items()):
            states.add_metric([state], float(n))
        yield states

        dev_states = GaugeMetricFamily(
            "edgefl_rollout_devices",
            "Devices of the running staged rollouts by their state in the rollout.",
            labels=["state"],
        )
        for state, n in conn.execute(q["rollout_devices"]):
            dev_states.add_metric([str(state)], float(n))
        yield dev_states

        halted = conn.execute(q["halted"]).scalar()
        fam = GaugeMetricFamily(
            "edgefl_rollout_halted_timestamp_seconds",
            "When the latest staged rollout halted (Unix time; 0: none ever halted).",
        )
        fam.add_metric([], _timestamp(halted))
        yield fam


def _timestamp(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, str):  # SQLite through a bare select may hand back text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def _epsilon_cap(plan_json: str) -> float | None:
    """The plan's per-device ε cap (``dp.epsilon_cap``, else ``dp.target_epsilon``)."""
    from edgefl.federation import DPPlan

    try:
        dp = json.loads(plan_json).get("dp") or {}
        return float(DPPlan.model_validate(dp).cap)
    except (ValueError, TypeError, AttributeError):
        return None


def _expiry_metrics(sources: _ServerSources) -> Iterator[Metric]:
    certs = GaugeMetricFamily(
        "edgefl_certificate_expiry_timestamp_seconds",
        "When the CA's and the server's own certificates expire (Unix time, notAfter).",
        labels=["certificate"],
    )
    for name, path in sorted(sources.cert_files.items()):
        ts = sources.not_after(path)
        if ts is not None:
            certs.add_metric([name], ts)
    yield certs
    if sources.ca_dir is not None:
        ts = sources.not_after(sources.ca_dir / "crl.pem", crl=True)
        if ts is not None:
            crl = GaugeMetricFamily(
                "edgefl_crl_next_update_timestamp_seconds",
                "The fleet CA's CRL nextUpdate (Unix time): relying parties refuse it after.",
            )
            crl.add_metric([], ts)
            yield crl


class ServerMetrics:
    """The metrics of one server process (see the module docstring).

    Args:
        registry: Where the metrics register (default: a new one, never the global).
        enabled: False: :meth:`ingest`/:meth:`inference` hooks are ``None`` and
            :meth:`render` returns an empty exposition.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.enabled = enabled
        self._ingest = IngestMetrics(self.registry)
        # Registered when an inference service runs in this process: under edgefl server
        # start it is a child whose own families are folded in (add_child_endpoint).
        self._inference: InferenceMetrics | None = None
        self._inference_lock = threading.Lock()
        self.sources: _ServerSources | None = None
        self.children: dict[str, str] = {}
        """Child name -> its loopback /metrics URL, folded into this one's scrape."""
        self.registry.register(_ScrapeCollector(self))

    @property
    def ingest(self) -> IngestMetrics | None:
        """The ingest's hooks, or ``None`` when metrics are off."""
        return self._ingest if self.enabled else None

    @property
    def inference(self) -> InferenceMetrics | None:
        """The inference service's hooks, or ``None`` when metrics are off."""
        if not self.enabled:
            return None
        with self._inference_lock:
            if self._inference is None:
                self._inference = InferenceMetrics(self.registry)
            return self._inference

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if not self.enabled:
            return b"", CONTENT_TYPE
        return generate_latest(self.registry), CONTENT_TYPE


_lock = threading.Lock()
_current: ServerMetrics | None = None


def current() -> ServerMetrics:
    """This process's :class:`ServerMetrics` (made on first use, enabled)."""
    global _current
    with _lock:
        if _current is None:
            _current = ServerMetrics()
        return _current


def configure(enabled: bool) -> ServerMetrics:
    """Turn this process's metrics on or off (the server config's ``metrics.enabled``)."""
    metrics = current()
    metrics.enabled = enabled
    return metrics


def attach_server(
    engine: Any,
    *,
    restarts: Callable[[], Mapping[str, int]] | None = None,
    ca_dir: Path | None = None,
) -> None:
    """Let scrapes read this registry engine, these restart counts and this CA folder."""
    cert_files: dict[str, Path] = {}
    if ca_dir is not None:
        cert_files = {"ca": ca_dir / "ca.pem", "server": ca_dir / "server" / "cert.pem"}
        services = ca_dir / "services"
        if services.is_dir():
            for folder in sorted(services.iterdir()):
                cert_files[folder.name] = folder / "cert.pem"
        admin = ca_dir / "admin" / "ca.pem"
        if admin.exists():
            cert_files["admin_ca"] = admin
    current().sources = _ServerSources(
        engine, restarts=restarts, ca_dir=ca_dir, cert_files=cert_files
    )


def detach_server() -> None:
    """Forget what :func:`attach_server` and :func:`add_child_endpoint` named."""
    metrics = current()
    metrics.sources = None
    metrics.children = {}


def add_child_endpoint(name: str, url: str) -> None:
    """Fold a child process's ``edgefl_<name>_*`` families (loopback ``url``) into the scrape."""
    metrics = current()
    metrics.children = {**metrics.children, name: url}


def render() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format, and the content type."""
    return current().render()
