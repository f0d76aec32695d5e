"""Operating a fleet under load: dashboard, /metrics and admin API response times.

A server as ``edgefl server start`` runs it, on loopback:

- the registry (SQLite) holding what a server that ran for a while holds for ``--devices``
  devices (``benchmarks/admin_fleet.py``: a finished run with its rounds and every
  device's privacy-ledger rows, reported models, records, a release, a rollout, audit);
- a real mosquitto and the real MQTT ingest storing into that registry, with the
  process's Prometheus hooks (:mod:`edgefl.server.metrics`);
- simulated devices: each publishes its retained presence (``online``) and then one
  telemetry envelope per second (QoS 1), from a few MQTT connections;
- the real admin API (FastAPI on uvicorn, HTTPS) serving the API, ``/metrics`` and the
  dashboard.

While the devices publish, it times sequential HTTPS requests (keep-alive, a viewer's
API token) to the dashboard's fleet page, ``/metrics`` and ``GET /api/v1/devices``, and
reports each one's p95; checks a scrape with ``promtool check metrics``; and lets a real
Prometheus (Debian's) scrape the server and counts the ``edgefl_`` series its HTTP API
returns. Then, on its own broker and registry, the ingest's throughput at saturating load
with the metrics hooks on and off (``benchmarks/metrics_overhead.py``: interleaved
rounds, medians).

Usage::

    python benchmarks/admin_bench.py [--devices 200] [--requests 200] [--json]

Prints the figures (``--json``: the output contract of issue 16 plus ``details``).
Targets: fleet page p95 <= 300 ms, /metrics p95 <= 100 ms, API devices p95 <= 200 ms,
metrics cost <= 5 % of the ingest's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from admin_fleet import LiveAdminServer, device_name, live_admin_server, seed_registry
from metrics_overhead import measure_ingest_overhead
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope, new_incarnation
from edgefl.server import metrics as server_metrics
from edgefl.server.ingest import Ingest, IngestConfig
from edgefl.testing import Mosquitto, prometheus_server, wait_for

FLEET = "lab"
TARGETS_MS = {"dashboard_fleet": 300.0, "metrics_scrape": 100.0, "api_devices": 200.0}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Publishers:
    """Simulated devices: presence, then one telemetry envelope per device per second.

    ``connections`` MQTT clients share the devices; each sends its devices' messages
    spread evenly over every second (QoS 1, not waiting for the acknowledgements).
    """

    def __init__(
        self, host: str, port: int, devices: list[str], *, rate: float, connections: int = 4
    ) -> None:
        self.host = host
        self.port = port
        self.devices = devices
        self.rate = rate
        self.connections = connections
        self.sent = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        shares = [self.devices[i :: self.connections] for i in range(self.connections)]
        ready = threading.Barrier(self.connections + 1)
        for index, share in enumerate(shares):
            thread = threading.Thread(
                target=self._run, args=(index, share, ready), name=f"pub-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        ready.wait(timeout=60)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, index: int, devices: list[str], ready: threading.Barrier) -> None:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-devices-{index}", protocol=mqtt.MQTTv5
        )
        client.max_inflight_messages_set(200)
        client.connect(self.host, self.port)
        client.loop_start()
        try:
            for device in devices:
                client.publish(f"edgefl/{FLEET}/{device}/status", b"online", qos=1, retain=True)
            ready.wait(timeout=60)
            incarnation = {d: new_incarnation() for d in devices}
            seq = dict.fromkeys(devices, 0)
            gap = 1.0 / (self.rate * len(devices))
            next_at = time.monotonic()
            while not self._stop.is_set():
                for device in devices:
                    seq[device] += 1
                    body = json.dumps({"cpu": 0.3, "temp_c": 48.0, "seq": seq[device]}).encode()
                    envelope = Envelope(
                        ENVELOPE_VERSION,
                        device,
                        seq[device],
                        int(time.time() * 1000),
                        "telemetry",
                        "application/json",
                        body,
                        incarnation[device],
                    )
                    client.publish(
                        f"edgefl/{FLEET}/{device}/telemetry/system",
                        encode_envelope(envelope, "json"),
                        qos=1,
                    )
                    with self._lock:
                        self.sent += 1
                    next_at += gap
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    if self._stop.is_set():
                        break
        finally:
            client.disconnect()
            client.loop_stop()


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def time_requests(
    client: httpx.Client, path: str, count: int, check: Callable[[httpx.Response], None]
) -> dict[str, float]:
    """Time ``count`` sequential GETs of ``path`` (ms): p50, p95, max."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        response = client.get(path)
        elapsed = (time.perf_counter() - start) * 1000.0
        check(response)
        samples.append(elapsed)
    return {
        "p50_ms": round(statistics.median(samples), 1),
        "p95_ms": round(_p95(samples), 1),
        "max_ms": round(max(samples), 1),
        "requests": count,
    }


def _ok(marker: bytes) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        if response.status_code != 200 or marker not in response.content:
            raise RuntimeError(
                f"{response.request.url}: {response.status_code} {response.text[:200]}"
            )

    return check


def promtool_check(body: bytes) -> tuple[bool, str]:
    """``promtool check metrics`` on an exposition: (ok, its output)."""
    exe = shutil.which("promtool")
    if exe is None:
        return False, "promtool is not installed (scripts/setup installs Debian's prometheus)"
    done = subprocess.run(
        [exe, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace").strip()


def prometheus_series(server: LiveAdminServer, folder: Path, token: str) -> int:
    """Start Debian's Prometheus scraping the server; the ``edgefl_`` series it stores."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(token)
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "edgefl-server",
                "scheme": "https",
                "authorization": {"type": "Bearer", "credentials_file": str(folder / "token")},
                "tls_config": {"ca_file": str(server.ca_file), "server_name": "127.0.0.1"},
                "static_configs": [{"targets": [urllib.parse.urlsplit(server.url).netloc]}],
            }
        ],
    }
    with prometheus_server(folder, config) as root:
        base = f"{root}/api/v1"

        def query(expr: str) -> list[dict[str, Any]]:
            try:
                doc = httpx.get(f"{base}/query", params={"query": expr}, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return []
            return list(doc.get("data", {}).get("result", [])) if doc.get("status") else []

        wait_for(
            lambda: [float(r["value"][1]) for r in query('up{job="edgefl-server"}')] == [1.0],
            60,
            "Prometheus scraping the server",
        )
        time.sleep(2.5)  # a few more scrapes
        doc = httpx.get(
            f"{base}/series", params={"match[]": '{__name__=~"edgefl_.+"}'}, timeout=10
        ).json()
        return len(doc.get("data", []))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark (see the module docstring)."""
    details: dict[str, Any] = {"load_average_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="edgefl-admin-bench-") as tmp:
        base = Path(tmp)
        with live_admin_server(base / "server") as server:
            _say(f"seeding the registry: {args.devices} devices, a finished 5-round run")
            seeded = seed_registry(server.engine, args.devices, rounds=5, fleet=FLEET)
            metrics = server_metrics.configure(True)
            server_metrics.attach_server(server.engine, ca_dir=base / "server" / "ca")
            broker = Mosquitto(base / "broker", extra_lines=["max_queued_messages 100000"])
            broker.start()
            ingest = Ingest(
                IngestConfig.model_validate(
                    {
                        "broker": {"host": broker.host, "port": broker.port},
                        "client_id": "ingest-admin-bench",
                        "db_url": str(server.engine.url.render_as_string(hide_password=False)),
                        "fleet": FLEET,
                        "migrate": False,
                    }
                ),
                metrics=metrics.ingest,
            )
            ingest.start()
            publishers: Publishers | None = None
            try:
                if not ingest.wait_ready(30.0):
                    raise RuntimeError("the ingest did not subscribe")
                publishers = Publishers(broker.host, broker.port, seeded.devices, rate=args.rate)
                publishers.start()
                _say(f"{args.devices} devices publishing {args.rate:g} msg/s each")
                started = time.monotonic()
                token = server.tokens["viewer"]
                client = httpx.Client(
                    base_url=server.url,
                    verify=str(server.ca_file),
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=60,
                )
                with client:
                    # Warm-up: the first requests import and cache what later ones reuse.
                    for path in ("/dashboard/", "/metrics", "/api/v1/devices"):
                        for _ in range(3):
                            client.get(path)
                    time.sleep(max(0.0, args.settle_s - (time.monotonic() - started)))
                    figures = {}
                    for name, path, marker in (
                        ("dashboard_fleet", "/dashboard/", device_name(args.devices - 1).encode()),
                        ("metrics_scrape", "/metrics", b"edgefl_ingest_messages_total"),
                        ("api_devices", "/api/v1/devices", device_name(0).encode()),
                    ):
                        figures[name] = time_requests(client, path, args.requests, _ok(marker))
                        _say(f"{name}: {figures[name]}")
                    scrape = client.get("/metrics").content
                promtool_ok, promtool_out = promtool_check(scrape)
                _say(f"promtool check metrics: {'ok' if promtool_ok else promtool_out}")
                series = prometheus_series(server, base / "prometheus", token)
                _say(f"Prometheus stores {series} edgefl_ series")
                counters = ingest.metrics()
                elapsed = time.monotonic() - started
                details["load"] = {
                    "sent": publishers.sent,
                    "stored": counters.get("stored"),
                    "acked": counters.get("acked"),
                    "seconds": round(elapsed, 1),
                    "offered_msgs_per_s": round(publishers.sent / elapsed, 1),
                }
            finally:
                if publishers is not None:
                    publishers.stop()
                ingest.stop()
                broker.kill()
                server_metrics.detach_server()
        details["load_average_mid"] = list(os.getloadavg())
        _say(
            f"ingest throughput with metrics on and off: {args.ingest_rounds} interleaved "
            f"rounds of {args.ingest_messages} messages"
        )
        overhead = measure_ingest_overhead(
            args.ingest_messages, args.ingest_rounds, workdir=base / "overhead", progress=_say
        )
    details["http"] = figures
    details["promtool"] = promtool_out
    details["ingest_overhead"] = overhead
    details["load_average_end"] = list(os.getloadavg())
    details["cores"] = os.cpu_count()
    result = {
        "devices": args.devices,
        "dashboard_fleet_p95_ms": figures["dashboard_fleet"]["p95_ms"],
        "metrics_scrape_p95_ms": figures["metrics_scrape"]["p95_ms"],
        "api_devices_p95_ms": figures["api_devices"]["p95_ms"],
        "ingest_msgs_per_s": {
            "metrics_on": overhead["metrics_on"],
            "metrics_off": overhead["metrics_off"],
        },
        "promtool_ok": promtool_ok,
        "prometheus_series": series,
    }
    details["targets_met"] = {
        name: figures[name]["p95_ms"] <= limit for name, limit in TARGETS_MS.items()
    } | {"metrics_overhead_le_5pct": overhead["overhead_pct"] <= 5.0}
    result["details"] = details
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1.0, help="messages/s per device")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per URL")
    parser.add_argument("--settle-s", type=float, default=5.0, help="load before timing")
    parser.add_argument("--ingest-messages", type=int, default=4000)
    parser.add_argument("--ingest-rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        details = result["details"]
        print(f"devices: {result['devices']} (load average {details['load_average_start']})")
        for name in TARGETS_MS:
            print(f"{name}: p95 {result[name + '_p95_ms']} ms (target {TARGETS_MS[name]} ms)")
        rates = result["ingest_msgs_per_s"]
        print(
            f"ingest: {rates['metrics_on']} msgs/s with metrics, {rates['metrics_off']} without "
            f"({details['ingest_overhead']['overhead_pct']} %)"
        )
        print(f"promtool ok: {result['promtool_ok']}")
        print(f"Prometheus series: {result['prometheus_series']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
