"""What the Prometheus metrics cost the MQTT ingest at saturating load.

A real mosquitto on a free loopback port and a SQLite registry in a temporary folder. Each
run queues ``--messages`` telemetry envelopes (QoS 1, fresh devices, a current device
timestamp) for the ingest's persistent session while the ingest is offline, then starts
an :class:`edgefl.server.ingest.Ingest` and times it from its first received message to
its last acknowledgement: the broker hands over the backlog as fast as the ingest's
Receive Maximum lets it, so the ingest is the bottleneck. Runs alternate metrics on
(:class:`edgefl.server.metrics.IngestMetrics` on a private registry) and off (no hooks),
in interleaved pairs (on/off, then off/on, ...), and the medians are reported.

Usage::

    python benchmarks/metrics_overhead.py [--messages 4000] [--rounds 3] [--json]

``admin_bench`` calls :func:`measure_ingest_overhead`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope, new_incarnation
from edgefl.server.ingest import Ingest, IngestConfig
from edgefl.server.metrics import IngestMetrics
from edgefl.server.registry import make_engine, upgrade
from edgefl.testing import Mosquitto

DEVICES = 50
"""Devices the messages of one run come from (round-robin)."""


def _publish_backlog(host: str, port: int, fleet: str, messages: int, tag: str) -> None:
    """Publish ``messages`` QoS 1 telemetry envelopes and wait for every PUBACK."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{tag}", protocol=mqtt.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    try:
        incarnation = new_incarnation()
        infos = []
        body = json.dumps({"cpu": 0.42, "temp_c": 51.5, "outbox": 0}).encode()
        for i in range(messages):
            device = f"bench-{tag}-{i % DEVICES}"
            env = Envelope(
                ENVELOPE_VERSION,
                device,
                i // DEVICES + 1,
                int(time.time() * 1000),
                "telemetry",
                "application/json",
                body,
                incarnation,
            )
            topic = f"edgefl/{fleet}/{device}/telemetry/system"
            infos.append(client.publish(topic, encode_envelope(env, "json"), qos=1))
        for info in infos:
            info.wait_for_publish(timeout=60)
            if not info.is_published():
                raise RuntimeError("the broker did not acknowledge a benchmark message")
    finally:
        client.disconnect()
        client.loop_stop()


def _drain(
    config: IngestConfig, messages: int, metrics: IngestMetrics | None
) -> tuple[float, float]:
    """Start an ingest on the queued backlog: (messages/s, CPU s per 10k) until all acked.

    The CPU time is the process's (the ingest's network and database threads; the polling
    here sleeps), from the first received message to the last acknowledgement.
    """
    ingest = Ingest(config, metrics=metrics)
    ingest.start()
    try:
        deadline = time.monotonic() + 300.0
        first: float | None = None
        cpu0 = 0.0
        while True:
            counters = ingest.metrics()
            now = time.perf_counter()
            if first is None and counters["received"] > 0:
                first = now
                cpu0 = time.process_time()
            if counters["acked"] >= messages:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ingest acknowledged {counters['acked']} of {messages}")
            time.sleep(0.002)
        cpu = time.process_time() - cpu0
        assert first is not None
        if counters["stored"] != messages:
            raise RuntimeError(f"stored {counters['stored']} of {messages} messages")
        return messages / max(now - first, 1e-9), cpu / messages * 10_000
    finally:
        ingest.stop()


def hook_cost_us(batch: int = 100, repeats: int = 200) -> float:
    """Microseconds per message the ingest's metrics hook costs (a batch of telemetry)."""
    hooks = IngestMetrics(CollectorRegistry(auto_describe=False))
    topics = [f"edgefl/f/d{i}/telemetry/system" for i in range(batch)]
    lags = [0.01 * i for i in range(batch)]
    outcomes = {"stored": batch, "duplicate": 0, "status": 0, "dead_lettered": 0}
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            hooks.record_batch(topics, outcomes, {}, lags)
        best = min(best, time.perf_counter() - start)
    return best / (repeats * batch) * 1e6


def measure_ingest_overhead(
    messages: int = 4000,
    rounds: int = 3,
    *,
    workdir: Path | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Ingest messages/s with metrics on and off, over ``rounds`` interleaved pairs.

    Args:
        messages: Messages per run (each run drains its own backlog).
        rounds: On/off pairs; the order alternates (on first, then off first, ...).
        workdir: Where the broker and the registry live (a temporary folder if ``None``).
        progress: Called with a line per run (e.g. ``print`` to stderr).

    Returns:
        ``{"metrics_on": median msgs/s, "metrics_off": median msgs/s, "overhead_pct":
        (off - on) / off * 100, "cpu_s_per_10k": {"metrics_on", "metrics_off"} (medians
        of the process's CPU seconds per 10k messages: steadier than msgs/s on a busy
        host), "cpu_overhead_pct", "hook_us_per_msg" (the hook alone), "messages",
        "rounds", "runs": [{"metrics", "msgs_per_s", "cpu_s_per_10k"}, ...]}``.
    """
    if rounds < 1 or messages < 1:
        raise ValueError("rounds and messages must be at least 1")
    with tempfile.TemporaryDirectory(prefix="edgefl-metrics-bench-") as tmp:
        base = workdir or Path(tmp)
        # Each run stores into a fresh copy of a migrated registry: a registry that grows
        # run after run would slow the later runs whatever their setting.
        template = base / "registry-template.db"
        upgrade(f"sqlite:///{template}")
        make_engine(f"sqlite:///{template}").dispose()
        db_url = f"sqlite:///{base / 'registry.db'}"
        shutil.copyfile(template, base / "registry.db")
        fleet = f"bench{uuid.uuid4().hex[:8]}"
        lines = ["max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 0"]
        broker = Mosquitto(base / "broker", extra_lines=lines)
        broker.start()
        try:
            config = IngestConfig.model_validate(
                {
                    "broker": {"host": broker.host, "port": broker.port},
                    "client_id": f"ingest-{fleet}",
                    "db_url": db_url,
                    "fleet": fleet,
                    "migrate": False,
                }
            )
            # The first start makes the persistent session the backlogs queue for.
            first = Ingest(config)
            first.start()
            if not first.wait_ready(30.0):
                raise RuntimeError("the ingest did not subscribe")
            first.stop()
            runs: list[dict[str, Any]] = []
            hooks = IngestMetrics(CollectorRegistry(auto_describe=False))
            for index in range(rounds):
                order = (True, False) if index % 2 == 0 else (False, True)
                for on in order:
                    tag = f"{index}{'on' if on else 'off'}"
                    _publish_backlog(broker.host, broker.port, fleet, messages, tag)
                    shutil.copyfile(template, base / "registry.db")
                    rate, cpu = _drain(config, messages, hooks if on else None)
                    runs.append(
                        {
                            "metrics": on,
                            "msgs_per_s": round(rate, 1),
                            "cpu_s_per_10k": round(cpu, 3),
                        }
                    )
                    if progress is not None:
                        progress(
                            f"round {index + 1}/{rounds} metrics {'on ' if on else 'off'}: "
                            f"{rate:.0f} msgs/s, {cpu:.2f} CPU s per 10k messages"
                        )
        finally:
            broker.kill()
    on_rates = [r["msgs_per_s"] for r in runs if r["metrics"]]
    off_rates = [r["msgs_per_s"] for r in runs if not r["metrics"]]
    on_median, off_median = statistics.median(on_rates), statistics.median(off_rates)
    on_cpu = statistics.median(r["cpu_s_per_10k"] for r in runs if r["metrics"])
    off_cpu = statistics.median(r["cpu_s_per_10k"] for r in runs if not r["metrics"])
    return {
        "metrics_on": round(on_median, 1),
        "metrics_off": round(off_median, 1),
        "overhead_pct": round((off_median - on_median) / off_median * 100.0, 2),
        "cpu_s_per_10k": {"metrics_on": on_cpu, "metrics_off": off_cpu},
        "cpu_overhead_pct": round((on_cpu - off_cpu) / off_cpu * 100.0, 2),
        "hook_us_per_msg": round(hook_cost_us(), 3),
        "messages": messages,
        "rounds": rounds,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="messages per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved on/off pairs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = measure_ingest_overhead(args.messages, args.rounds, progress=say)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"ingest msgs/s: metrics on {result['metrics_on']:.0f}, off "
            f"{result['metrics_off']:.0f} (median of {args.rounds}; overhead "
            f"{result['overhead_pct']:.2f} %); CPU s per 10k messages: on "
            f"{result['cpu_s_per_10k']['metrics_on']:.2f}, off "
            f"{result['cpu_s_per_10k']['metrics_off']:.2f} ({result['cpu_overhead_pct']:.2f} %); "
            f"the hook alone {result['hook_us_per_msg']:.2f} us per message"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
