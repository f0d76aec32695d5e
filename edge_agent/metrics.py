"""The agent's optional Prometheus endpoint (``metrics:`` in the agent config; off by default).

With ``metrics.enabled`` the agent serves ``http://{host}:{port}/metrics`` (loopback by
default; ``port: 0`` picks a free one, written to the status file as ``metrics``) from
:func:`prometheus_client.start_http_server`'s thread, on its own
:class:`~prometheus_client.CollectorRegistry`. Everything but the inference latency is
read when Prometheus scrapes, from what ``agent status`` already reads (one outbox query),
so the agent's loops pay nothing for it:

- ``edgefl_agent_info{device, fleet, version}`` (1): which device this endpoint is (one
  series per agent, never a hot one);
- ``edgefl_agent_outbox_records``, ``edgefl_agent_outbox_bytes``,
  ``edgefl_agent_outbox_oldest_age_seconds``: the store-and-forward backlog;
- ``edgefl_agent_outbox_dropped_total{reason}``: records lost on the device:
  ``full`` (deleted oldest-first by the drop policy), ``expired`` (past their TTL),
  ``oversized`` (refused as larger than the fleet carries, or set aside from an older
  version), ``refused`` (the outbox was full and refused a new record);
- ``edgefl_agent_link_connected`` and ``edgefl_agent_link_subscribed`` (1/0),
  ``edgefl_agent_published_total``, ``edgefl_agent_acked_total``,
  ``edgefl_agent_publish_failures_total``;
- with the inference loop: ``edgefl_agent_inference_latency_seconds{where}`` (histogram
  from taking a sample off the queue to its answer, observed per answer; ``where`` is
  ``local``, ``cloud`` or ``local_fallback``), ``edgefl_agent_inference_answers_total
  {where}``, ``edgefl_agent_inference_offload_ratio`` (share answered by the cloud),
  ``edgefl_agent_inference_deadline_misses_total``,
  ``edgefl_agent_inference_dropped_total`` (samples that found the queue full) and
  ``edgefl_agent_model_info{model, version, variant}`` (the model it serves).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import Field

import edgefl
from edgefl.config import StrictModel
from edgefl.metrics_util import INFERENCE_LATENCY_BUCKETS

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ["AgentMetrics", "AgentMetricsConfig"]

logger = logging.getLogger(__name__)


class AgentMetricsConfig(StrictModel):
    """The ``metrics:`` section of the agent config."""

    enabled: bool = Field(False, description="Serve Prometheus metrics on host:port.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on: loopback by default (a local Prometheus or "
        "node-exporter-style relay scrapes it); the endpoint has no authentication.",
    )
    port: int = Field(9464, ge=0, le=65535, description="Port; 0 picks a free one.")


class _AgentCollector(Collector):
    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        info = InfoMetricFamily("edgefl_agent", "Which device this agent is.")
        info.add_metric(
            [],
            {
                "device": agent.config.device_id,
                "fleet": agent.config.fleet,
                "version": edgefl.__version__,
            },
        )
        yield info
        try:
            stats = agent.outbox.stats()
        except Exception as exc:  # a scrape must not fail with the outbox
            logger.warning("metrics: reading the outbox failed: %s", exc)
        else:
            yield _gauge("edgefl_agent_outbox_records", "Records in the outbox.", stats.depth)
            yield _gauge("edgefl_agent_outbox_bytes", "Payload bytes in the outbox.", stats.bytes)
            yield _gauge(
                "edgefl_agent_outbox_oldest_age_seconds",
                "Age of the oldest record in the outbox (0 when empty).",
                stats.oldest_age_s,
            )
            dropped = CounterMetricFamily(
                "edgefl_agent_outbox_dropped",
                "Records lost on the device before they were sent, by reason.",
                labels=["reason"],
            )
            dropped.add_metric(["full"], float(stats.dropped))
            dropped.add_metric(["expired"], float(stats.expired))
            dropped.add_metric(
                ["oversized"], float(stats.oversized_refused + stats.oversized_set_aside)
            )
            dropped.add_metric(["refused"], float(max(0, agent.rejected - agent.oversized)))
            yield dropped
        link, sender = agent.link, agent.sender
        yield _gauge(
            "edgefl_agent_link_connected",
            "Whether the MQTT link is up (1) or not (0).",
            float(bool(link.connected)),
        )
        yield _gauge(
            "edgefl_agent_link_subscribed",
            "Whether the broker confirmed the agent's subscriptions (1) or not (0).",
            float(bool(link.subscribed)),
        )
        yield _counter("edgefl_agent_published", "Records published.", sender.published)
        yield _counter("edgefl_agent_acked", "Records the broker acknowledged.", sender.acked)
        yield _counter(
            "edgefl_agent_publish_failures", "Publishes that failed (retried).", sender.failed
        )
        loop = agent.inference
        if loop is not None:
            yield from _inference_metrics(loop)


def _inference_metrics(loop: Any) -> Iterator[Metric]:
    snapshot = loop.stats.snapshot()
    where: dict[str, int] = {"local": 0, "cloud": 0, "local_fallback": 0}
    misses = 0
    for version in snapshot["versions"]:
        for key, n in (version.get("where") or {}).items():
            where[key] = where.get(key, 0) + int(n)
        misses += int(version.get("deadline_misses") or 0)
    answers = CounterMetricFamily(
        "edgefl_agent_inference_answers",
        "Samples the inference loop answered, by where the answer came from.",
        labels=["where"],
    )
    for key, n in sorted(where.items()):
        answers.add_metric([key], float(n))
    yield answers
    total = sum(where.values())
    yield _gauge(
        "edgefl_agent_inference_offload_ratio",
        "Share of the inference loop's answers that came from the cloud (0 to 1).",
        where["cloud"] / total if total else 0.0,
    )
    yield _counter(
        "edgefl_agent_inference_deadline_misses",
        "Answers later than the inference budget.",
        misses,
    )
    yield _counter(
        "edgefl_agent_inference_dropped",
        "Samples that found the inference queue full.",
        snapshot["dropped"],
    )
    serving = loop.serving
    if serving is not None:
        info = InfoMetricFamily("edgefl_agent_model", "The model the inference loop serves.")
        info.add_metric(
            [],
            {
                "model": str(serving.model),
                "version": str(serving.version),
                "variant": str(serving.variant),
            },
        )
        yield info


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))


class AgentMetrics:
    """The agent's registry and its HTTP endpoint.

    Args:
        agent: The :class:`~edgefl.edge_agent.daemon.Agent` whose figures are read.
        config: The ``metrics:`` section.
    """

    def __init__(self, agent: Any, config: AgentMetricsConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_AgentCollector(agent))
        self.latency = Histogram(
            "edgefl_agent_inference_latency_seconds",
            "Time from taking a sample off the inference queue to its answer.",
            ["where"],
            buckets=INFERENCE_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[str, Any] = {}  # made at the first answer from each place
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def observe_answer(self, where: str, latency_ms: float) -> None:
        """One answer of the inference loop (called on the loop's thread)."""
        child = self._children.get(where)
        if child is None:
            child = self._children[where] = self.latency.labels(where)
        child.observe(latency_ms / 1000.0)

    @property
    def address(self) -> str | None:
        """``http://host:port/metrics`` once started."""
        if self._server is None:
            return None
        host = self.config.host
        return (
            f"http://[{host}]:{self.port}/metrics"
            if ":" in host
            else (f"http://{host}:{self.port}/metrics")
        )

    def start(self) -> None:
        """Listen on ``host:port`` (a thread of its own).

        Raises:
            OSError: The address cannot be bound (in use, not an address of this host).
        """
        server, thread = start_http_server(
            self.config.port, addr=self.config.host, registry=self.registry
        )
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        logger.info("metrics on %s", self.address)

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
