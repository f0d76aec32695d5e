"""Prometheus metrics: the server's /metrics on the real admin API, an agent's local port,
the ingest's counters, the alert rules and the dashboard, checked by Debian's promtool and
scraped by a real Prometheus server whose HTTP API must return the series."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edgefl.config import load_config
from edgefl.edge_agent.daemon import AgentConfig
from edgefl.process import ManagedProcess
from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope, new_incarnation
from edgefl.server import metrics as server_metrics
from edgefl.server.config import ServerConfig
from edgefl.server.ingest import Ingest, IngestConfig
from edgefl.server.metrics import IngestMetrics, ServerMetrics
from edgefl.server.registry import make_engine, upgrade
from edgefl.testing import EdgeflProcesses, Mosquitto, prometheus_server, wait_for

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(_ROOT / "benchmarks"))

from admin_fleet import LiveAdminServer, Seeded, live_admin_server, seed_registry  # noqa: E402

RULES = _ROOT / "deploy" / "prometheus" / "edgefl.rules.yml"
RULE_TESTS = _ROOT / "tests" / "prometheus" / "edgefl.rules.test.yml"
SCRAPE_CONFIG = _ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = _ROOT / "deploy" / "grafana" / "edgefl.json"
AGENT_RECORDS = 20
DEVICES = 12

# Series an agent exports only with its inference loop on (the agent here has none).
AGENT_INFERENCE_NAMES = {
    "edgefl_agent_inference_latency_seconds",
    "edgefl_agent_inference_answers_total",
    "edgefl_agent_inference_offload_ratio",
    "edgefl_agent_inference_deadline_misses_total",
    "edgefl_agent_inference_dropped_total",
    "edgefl_agent_model_info",
}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing (scripts/setup installs prometheus)"
)


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, cwd=cwd, timeout=60, check=False
    )
    out = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


# -- rules, scrape config, dashboard (no processes) ---------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    out = promtool("check", "rules", str(RULES))
    assert "SUCCESS: 12 rules found" in out
    # Each alert fires on made-up series that should fire it, and stays quiet otherwise.
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for wanted in (
        "EdgeflIngestStalled",
        "EdgeflDeadLettersRising",
        "EdgeflDevicesWentOffline",
        "EdgeflCertificateExpiringSoon",
        "EdgeflCrlNearExpiry",
        "EdgeflEpsilonNearCap",
        "EdgeflRolloutHalted",
    ):
        assert wanted in names


@needs_promtool
def test_example_scrape_config_is_valid(tmp_path: Path) -> None:
    # The example names files under /etc/prometheus; promtool checks they exist.
    text = SCRAPE_CONFIG.read_text().replace("/etc/prometheus", str(tmp_path))
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(RULES, tmp_path / "edgefl.rules.yml")
    (tmp_path / "edgefl-token").write_text("efl_x_y\n")
    (tmp_path / "edgefl-ca.pem").write_text("")
    (tmp_path / "edgefl-agents").mkdir()
    out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert "SUCCESS: 12 rules found" in out


def test_metrics_off_counts_nothing_and_renders_nothing() -> None:
    assert ServerConfig.model_validate({"metrics": {"enabled": False}}).metrics.enabled is False
    assert ServerConfig.model_validate({}).metrics.enabled is True
    metrics = ServerMetrics(enabled=False)
    assert metrics.ingest is None
    assert metrics.inference is None
    assert metrics.render()[0] == b""
    on = ServerMetrics()
    assert on.ingest is not None
    assert b"edgefl_ingest_messages_total" in on.render()[0]


# -- the ingest's counters -----------------------------------------------------------------


@pytest.mark.slow
def test_ingest_counts_messages_outcomes_dead_letters_and_lag(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'edgefl.db'}"
    upgrade(db_url)
    fleet = f"m{uuid.uuid4().hex[:8]}"
    metrics = ServerMetrics(CollectorRegistry(auto_describe=False))
    assert metrics.ingest is not None
    with Mosquitto(tmp_path / "broker") as broker:
        config = IngestConfig.model_validate(
            {
                "broker": {"host": broker.host, "port": broker.port},
                "client_id": f"ingest-{fleet}",
                "db_url": db_url,
                "fleet": fleet,
                "migrate": False,
            }
        )
        ingest = Ingest(config, metrics=metrics.ingest)
        ingest.start()
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"p-{fleet}", protocol=mqtt.MQTTv5)
        try:
            assert ingest.wait_ready(30)
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            incarnation = new_incarnation()
            sent = []
            for seq in range(1, 6):
                # Stamped 2 s ago: the lag histogram must see about 2 s.
                env = Envelope(
                    ENVELOPE_VERSION,
                    "dev-1",
                    seq,
                    int(time.time() * 1000) - 2000,
                    "telemetry",
                    "application/json",
                    b"{}",
                    incarnation,
                )
                topic = f"edgefl/{fleet}/dev-1/telemetry/system"
                sent.append(pub.publish(topic, encode_envelope(env, "json"), qos=1))
            sent.append(pub.publish(f"edgefl/{fleet}/dev-1/telemetry/system", b"junk", qos=1))
            sent.append(pub.publish(f"edgefl/{fleet}/dev-1/status", b"online", qos=1))
            for info in sent:
                info.wait_for_publish(10)
            wait_for(lambda: ingest.metrics()["acked"] >= 7, 30, "7 messages acknowledged")
        finally:
            pub.disconnect()
            pub.loop_stop()
            ingest.stop()
    text = metrics.render()[0].decode()
    assert value(text, "edgefl_ingest_messages_total", kind="telemetry") == 6
    assert value(text, "edgefl_ingest_messages_total", kind="status") == 1
    assert value(text, "edgefl_ingest_outcomes_total", outcome="stored") == 5
    assert value(text, "edgefl_ingest_outcomes_total", outcome="status") == 1
    assert value(text, "edgefl_ingest_outcomes_total", outcome="dead_lettered") == 1
    assert value(text, "edgefl_ingest_dead_letters_total", reason="malformed_envelope") == 1
    assert value(text, "edgefl_ingest_lag_seconds_count") == 5
    assert value(text, "edgefl_ingest_lag_seconds_bucket", le="1.0") == 0
    assert value(text, "edgefl_ingest_lag_seconds_bucket", le="10.0") == 5


def test_ingest_hook_costs_little_per_message() -> None:
    """The hook alone, against a budget far below the ingest's ~100 us per message."""
    hooks = IngestMetrics(CollectorRegistry(auto_describe=False))
    topics = [f"edgefl/f/d{i}/telemetry/system" for i in range(100)]
    lags = [0.01 * i for i in range(100)]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(50):
            hooks.record_batch(topics, {"stored": 100}, {}, lags)
        best = min(best, time.perf_counter() - start)
    per_message_us = best / 5000 * 1e6
    assert per_message_us < 10, f"{per_message_us:.2f} us per message"


# -- the server's /metrics on the admin API, and an agent's port ------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveAdminServer, Seeded]]:
    """The real admin API over HTTPS on a seeded registry, its metrics reading it."""
    folder = tmp_path_factory.mktemp("server")
    with live_admin_server(folder / "state") as server:
        seeded = seed_registry(server.engine, DEVICES)
        server_metrics.configure(True)
        server_metrics.attach_server(
            server.engine,
            restarts=lambda: {"broker": 2, "superlink": 0},
            ca_dir=server.state_dir / "ca",
        )
        try:
            yield server, seeded
        finally:
            server_metrics.detach_server()


def _get(url: str, *, token: str | None = None, ca_file: Path | None = None) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return bytes(response.read())


@needs_promtool
@pytest.mark.slow
def test_server_metrics_on_the_admin_api_read_the_registry(
    live: tuple[LiveAdminServer, Seeded],
) -> None:
    server, seeded = live
    url = f"{server.url}/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(url, ca_file=server.ca_file)
    assert refused.value.code == 401
    started = time.perf_counter()
    body = _get(url, token=server.tokens["viewer"], ca_file=server.ca_file)
    took = time.perf_counter() - started
    promtool("check", "metrics", stdin=body)
    text = body.decode()
    assert value(text, "edgefl_devices", presence="online") == len(seeded.online)
    assert value(text, "edgefl_devices", presence="offline") == DEVICES - len(seeded.online)
    assert value(text, "edgefl_fl_rounds_total") == seeded.rounds
    assert value(text, "edgefl_fl_round_duration_seconds_count") == seeded.rounds
    top = max(max(series) for series in seeded.epsilon.values())
    assert value(text, "edgefl_fl_run_epsilon_max", run=seeded.run_id) == pytest.approx(top)
    assert value(text, "edgefl_fl_run_epsilon_cap", run=seeded.run_id) == 8.0  # the default
    assert value(text, "edgefl_rollouts", state="completed") == 1
    assert value(text, "edgefl_rollouts", state="halted") == 0
    assert value(text, "edgefl_rollout_halted_timestamp_seconds") == 0
    assert value(text, "edgefl_child_restarts_total", child="broker") == 2
    ca_expiry = value(text, "edgefl_certificate_expiry_timestamp_seconds", certificate="ca")
    assert ca_expiry > time.time() + 365 * 86400
    assert value(text, "edgefl_crl_next_update_timestamp_seconds") > time.time()
    # No device id anywhere: neither a label named so nor a device's id as a value.
    assert not [key for key in samples(text) if any("device" in k for k, _ in key[1])]
    assert not [d for d in seeded.devices if d in text]
    assert took < 2.0  # the 100 ms target is admin_bench's, under load


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``edgefl agent run`` with its metrics port on; yields its /metrics URL."""
    folder = tmp_path_factory.mktemp("agent")
    with Mosquitto(folder / "broker") as broker, EdgeflProcesses(folder) as procs:
        config = {
            "device_id": "dev-m",
            "fleet": "metrics",
            "state_dir": str(folder / "state"),
            "mqtt": {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "sources": [{"type": "dataset-replay", "rate_hz": 200, "limit": AGENT_RECORDS}],
            "status_interval_s": 0.2,
            "metrics": {"enabled": True, "port": 0},
        }
        path = folder / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        cfg = load_config(AgentConfig, path)
        proc: ManagedProcess = procs.start("agent", "run", "--config", str(path), log="agent.log")
        status = cfg.state_dir / "agent-status.json"

        def ready() -> bool:
            assert proc.poll() is None, f"the agent exited: {proc.last_line()}"
            if not status.exists():
                return False
            doc = json.loads(status.read_text())
            return bool(doc.get("metrics")) and doc["sender"]["acked"] >= AGENT_RECORDS

        wait_for(ready, 60, "the agent's metrics and its records acknowledged")
        yield str(json.loads(status.read_text())["metrics"])


@needs_promtool
@pytest.mark.slow
def test_agent_metrics_port_reports_its_outbox_and_link(agent: str) -> None:
    assert agent.startswith("http://127.0.0.1:")
    body = _get(agent)
    promtool("check", "metrics", stdin=body)
    text = body.decode()
    # Its records, and anything it sent after them (all acknowledged: the outbox is empty).
    assert value(text, "edgefl_agent_acked_total") >= AGENT_RECORDS
    assert value(text, "edgefl_agent_published_total") == value(text, "edgefl_agent_acked_total")
    assert value(text, "edgefl_agent_outbox_records") == 0
    assert value(text, "edgefl_agent_link_connected") == 1
    assert value(text, "edgefl_agent_outbox_dropped_total", reason="full") == 0
    assert value(text, "edgefl_agent_info", device="dev-m", fleet="metrics", version="0.1.0") == 1


# -- a real Prometheus server scraping both --------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory,
    live: tuple[LiveAdminServer, Seeded],
    agent: str,
) -> Iterator[str]:
    """Debian's Prometheus on a free loopback port scraping the server and the agent."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus missing (scripts/setup installs it)")
    server, _ = live
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "token").write_text(server.tokens["viewer"])
    shutil.copy(RULES, folder / "edgefl.rules.yml")
    server_target = urllib.parse.urlsplit(server.url).netloc
    agent_target = urllib.parse.urlsplit(agent).netloc
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["edgefl.rules.yml"],
        "scrape_configs": [
            {
                "job_name": "edgefl-server",
                "scheme": "https",
                "authorization": {"type": "Bearer", "credentials_file": str(folder / "token")},
                "tls_config": {"ca_file": str(server.ca_file), "server_name": "127.0.0.1"},
                "static_configs": [{"targets": [server_target]}],
            },
            {"job_name": "edgefl-agent", "static_configs": [{"targets": [agent_target]}]},
        ],
    }
    with prometheus_server(folder, config) as base:
        yield base


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    doc = json.loads(_get(url))
    assert doc["status"] == "success", doc
    return doc["data"]


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    return list(_api(base, "query", query=expr)["result"])


@needs_promtool
@pytest.mark.slow
def test_prometheus_scrapes_the_server_and_the_agent(
    prometheus: str, live: tuple[LiveAdminServer, Seeded], agent: str
) -> None:
    _, seeded = live

    def both_scraped() -> bool:
        got = _query(prometheus, 'up{job=~"edgefl-.*"} == 1')
        return {r["metric"]["job"] for r in got} == {"edgefl-server", "edgefl-agent"}

    wait_for(both_scraped, 30, "both targets up in Prometheus")
    wait_for(
        lambda: bool(_query(prometheus, "edgefl_agent_acked_total")), 10, "agent series stored"
    )
    online = _query(prometheus, 'edgefl_devices{job="edgefl-server",presence="online"}')
    assert [float(r["value"][1]) for r in online] == [len(seeded.online)]

    def same_as_the_agent() -> bool:
        direct = value(_get(agent).decode(), "edgefl_agent_acked_total")
        got = _query(prometheus, 'edgefl_agent_acked_total{job="edgefl-agent"}')
        return [float(r["value"][1]) for r in got] == [direct] and direct >= AGENT_RECORDS

    wait_for(same_as_the_agent, 10, "Prometheus's value of the agent's acked records")
    series = _api(prometheus, "series", **{"match[]": '{__name__=~"edgefl_.+"}'})
    names = {s["__name__"] for s in series}
    assert {"edgefl_ingest_messages_total", "edgefl_fl_run_epsilon_max"} <= names
    assert {"edgefl_agent_outbox_records", "edgefl_agent_link_connected"} <= names

    # The alert rules loaded and evaluate without errors.
    def rules_evaluated() -> bool:
        groups = _api(prometheus, "rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == 12 and all(r.get("lastEvaluation", "").startswith("2") for r in rules)

    wait_for(rules_evaluated, 15, "the rules evaluated")
    groups = _api(prometheus, "rules")["groups"]
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups

    # Every dashboard query is valid PromQL, and every metric it or the rules name exists
    # (the agent's inference series need an agent with its inference loop on).
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    for expr in exprs:
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace("$agent_job", "edgefl-agent")
            .replace("$job", ".*")
            .replace("$instance", ".*")
        )
        _query(prometheus, concrete)
    named = set(re.findall(r"edgefl_[a-z_]+", DASHBOARD.read_text() + RULES.read_text()))
    server, _ = live
    scraped = _get(f"{server.url}/metrics", token=server.tokens["viewer"], ca_file=server.ca_file)
    exported = set(re.findall(r"^# HELP (edgefl_[a-z_]+)", scraped.decode(), re.MULTILINE))
    exported |= set(re.findall(r"^# HELP (edgefl_[a-z_]+)", _get(agent).decode(), re.MULTILINE))
    exported |= AGENT_INFERENCE_NAMES
    # The inference service's families (a child process under edgefl server start).
    service = ServerMetrics(CollectorRegistry(auto_describe=False))
    assert service.inference is not None
    exported |= set(re.findall(r"^# HELP (edgefl_[a-z_]+)", service.render()[0].decode(), re.M))

    def family(name: str) -> str:
        return re.sub(r"_(bucket|count|sum)$", "", name)

    assert {family(n) for n in named} - exported == set()


def test_scrape_threads_do_not_block_each_other() -> None:
    """render() is safe from several threads at once (the admin API may run it in a pool)."""
    metrics = ServerMetrics()
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            for _ in range(20):
                assert metrics.render()[0]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


CHILD_SCRIPT = """
import sys, time
from prometheus_client import start_http_server
from edgefl.server.metrics import current
hooks = current().inference
hooks.request(0.004)
hooks.request(0.2, "error")
hooks.batch_size.observe(8)
server, _ = start_http_server(0, addr="127.0.0.1", registry=current().registry)
print(server.server_port, flush=True)
time.sleep(120)
"""


@needs_promtool
@pytest.mark.slow
def test_a_child_process_metrics_are_folded_into_the_server_scrape(tmp_path: Path) -> None:
    """The supervised inference service is a child: its families come through /metrics."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        metrics = ServerMetrics(CollectorRegistry(auto_describe=False))
        metrics.children = {"inference": f"http://127.0.0.1:{port}/metrics"}
        body = metrics.render()[0]
        promtool("check", "metrics", stdin=body)
        text = body.decode()
        assert value(text, "edgefl_child_metrics_up", child="inference") == 1
        count = "edgefl_inference_request_duration_seconds_count"
        assert value(text, count, outcome="ok") == 1
        assert value(text, count, outcome="error") == 1
        assert value(text, "edgefl_inference_batch_size_bucket", le="8.0") == 1
    finally:
        child.kill()
        child.wait(10)
    # A child that does not answer costs the scrape nothing but its flag.
    text = metrics.render()[0].decode()
    assert value(text, "edgefl_child_metrics_up", child="inference") == 0
    assert "edgefl_inference_request_duration_seconds" not in text


@pytest.mark.slow
def test_registry_series_on_sqlite_and_postgresql(db_url: str) -> None:
    """The scrape's queries on both registry databases, against what was seeded."""
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        seeded = seed_registry(engine, 30, running=True)
        server_metrics.attach_server(engine)
        try:
            text = server_metrics.render()[0].decode()
        finally:
            server_metrics.detach_server()
    finally:
        engine.dispose()
    assert value(text, "edgefl_devices", presence="online") == len(seeded.online)
    assert value(text, "edgefl_fl_rounds_total") == seeded.rounds
    top = max(max(series) for series in seeded.epsilon.values())
    assert value(text, "edgefl_fl_run_epsilon_max", run=seeded.run_id) == pytest.approx(top)
    assert value(text, "edgefl_fl_run_epsilon_cap", run=seeded.run_id) == 8.0
    assert value(text, "edgefl_rollouts", state="completed") == 1
