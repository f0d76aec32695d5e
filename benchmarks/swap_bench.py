"""Hot swap under load: the agent's inference loop moving between models at 50 Hz.

Run from the repository root::

    .venv/bin/python benchmarks/swap_bench.py --json [--swaps 10] [--rate-hz 50] \\
        [--rss-rate-hz 20] [--rss-seconds 30]

Real parts throughout: ``edgefl agent run`` processes, a mosquitto on a free loopback
port, the server's ``Models`` gRPC service with mutual TLS under a fleet CA (the device
admitted in a SQLite registry), and the toolkit's ``digits-mlp`` built into fp32 and
fp16 ``.tflite`` variants (cached in ``--models-dir``), released as signed versions.

**swap**: the agent runs v1 (installed by its model manager before it starts) with a
dataset replay at ``--rate-hz`` feeding its inference loop; the benchmark then publishes
``--swaps`` signed desired states in turn, each once the loop answered a second on the
previous one: v2 (fp16, an upgrade), back to v1 (fp32, a signed rollback), v2 again, ...
(two artifacts; a re-release of v1's bytes as v3 would be refused by the manager as a
downgrade, see the report), and waits until every sample is answered. From the broker it counts
each sample ``(source, index)``: ``dropped`` are samples never answered (plus what the
loop counted as dropped), ``duplicated`` samples answered by more than one result
envelope. Pauses are the loop's own measurement (see
:class:`edgefl.edge_agent.inference.stats.SwapRecord`): ``pause_ms``, how much later than
usual the first sample on the new model was answered, and ``blocked_ms``, the time the
loop's thread spent in the swap step.

**rss**: a second agent, the loop at ``--rss-rate-hz`` on a pre-built replay cache (the
agent process never imports scikit-learn or torch; its memory map is checked), its model
delivered over the air after it started (so the download client is loaded, as on a
device that was updated), sampled every second for ``--rss-seconds``. ``mapped`` lists
the big native libraries in its memory (torch, scikit-learn, scipy, tensorflow,
onnxruntime, grpc).

Output (``--json``): ``{"swap": {"rate_hz", "swaps", "samples", "answered", "dropped",
"duplicated", "pause_p50_ms", "pause_p99_ms", "pause_max_ms", "blocked_p50_ms",
"blocked_p99_ms", "versions"}, "agent_rss_mb": float, "rss": {...}, "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.config import TlsFiles
from edgefl.edge_agent.models.manager import FolderSource, ModelManager, ModelsConfig
from edgefl.manifest import read_manifest
from edgefl.proto.desired import DesiredModel
from edgefl.proto.serde import decode_envelope
from edgefl.proto.topics import state_desired_topic
from edgefl.release_tamper import DEVICE, FLEET, MODEL, RUNTIME, Built, ReleaseFleet
from edgefl.releasesign import public_key_pem
from edgefl.testing import EdgeflProcesses, Mosquitto, wait_for

__all__ = ["measure_agent_rss", "run_swap"]

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[swap_bench] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --- the model, the releases, the delivery service ----------------------------------------


def build_models(folder: Path) -> Built:
    """digits-mlp fp32 + fp16 with golden vectors (built once, then reused)."""
    out = folder / MODEL
    if not (folder / "done").exists():
        from edgefl.quantize.build import BuildOptions, build_artifacts
        from edgefl.quantize.recipes import parse_variants

        log(f"building {MODEL} fp32 and fp16 into {out}")
        build_artifacts(
            BuildOptions(
                model=MODEL,
                variants=parse_variants("fp32,fp16"),
                out=out,
                runtimes=[RUNTIME],
                epochs=1,
                bench_iters=2,
            )
        )
        (folder / "done").touch()
    variants = {}
    for variant in ("fp32", "fp16"):
        artifact = out / f"{MODEL}.{variant}.tflite"
        variants[variant] = (artifact, read_manifest(artifact.with_suffix(".manifest.json")))
    return Built(variants)


class BenchFleet(ReleaseFleet):
    """The fleet's signed releases; the device's own model manager reads them from disk."""

    def manager(self, **config: object) -> ModelManager:
        trust = self.trust_store()
        return ModelManager(
            ModelsConfig.model_validate(self.manager_settings(**config)),
            state_dir=self.state_dir,
            trust=trust,
            source=FolderSource(self.releases),
            device_id=DEVICE,
            fleet=FLEET,
            clock=lambda: self.clock,
        )

    def preinstall(self) -> DesiredModel:
        """v1 (fp32) installed as an earlier update would have left it."""
        v1 = self.publish(1, "fp32")
        self.manager().handle(self.desired(v1))
        return v1


class Delivery:
    """A fleet CA, the device admitted in a SQLite registry, the Models service on port 0."""

    def __init__(self, root: Path) -> None:
        from edgefl.server.config import ModelServiceConfig
        from edgefl.server.fleet_ca import FleetCA
        from edgefl.server.models_service import ModelService
        from edgefl.server.registry import Enrollment, make_engine, session_factory, upgrade

        self.ca = FleetCA.create(root / "ca")
        server = self.ca.issue_server_cert(["localhost"], ["127.0.0.1"])
        self.device = self.ca.issue_device_cert(DEVICE)
        db_url = f"sqlite:///{root / 'registry.db'}"
        upgrade(db_url)
        engine = make_engine(db_url)
        try:
            with session_factory(engine).begin() as session:
                session.add(
                    Enrollment(
                        device_id=DEVICE,
                        fleet=FLEET,
                        status="admitted",
                        cert_serial=f"{self.device.serial:x}",
                        cert_pem=self.device.cert_pem.decode(),
                        node_public_key="",
                        node_id="1",
                        admitted_at=datetime.now(UTC),
                        revoked_at=None,
                    )
                )
        finally:
            engine.dispose()
        assert server.key_path is not None
        self.releases = root / "fleet" / "releases"
        self.releases.mkdir(parents=True, exist_ok=True)
        self.service = ModelService(
            ModelServiceConfig(
                host="127.0.0.1",
                port=0,
                tls=TlsFiles(
                    ca_file=self.ca.cert_path, cert_file=server.cert_path, key_file=server.key_path
                ),
                crl=self.ca.crl_path,
                registry_url=db_url,
                registry_ttl_s=0.0,
                releases_dir=self.releases,
            )
        )
        self.port = self.service.start()

    def tls(self) -> dict[str, str]:
        """The device's enrolled identity, as its agent config names it."""
        assert self.device.key_path is not None
        return {
            "ca_file": str(self.ca.cert_path),
            "cert_file": str(self.device.cert_path),
            "key_file": str(self.device.key_path),
        }

    def stop(self) -> None:
        self.service.stop()


# --- the agent ----------------------------------------------------------------------------


def agent_yaml(
    folder: Path,
    fleet: BenchFleet,
    broker: Mosquitto,
    delivery: Delivery,
    *,
    rate_hz: float,
    limit: int | None,
    inference: bool = True,
) -> Path:
    source: dict[str, Any] = {"type": "dataset-replay", "name": "cam", "rate_hz": rate_hz}
    if limit is not None:
        source["limit"] = limit
    config = {
        "device_id": DEVICE,
        "fleet": FLEET,
        "state_dir": str(fleet.state_dir),
        "mqtt": {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "status_interval_s": 0.2,
        "sources": [source],
        "models": {
            "enabled": True,
            "server": {"host": "127.0.0.1", "port": delivery.port},
            "tls": delivery.tls(),
            "device_class": "rpi4",
            "runtime": RUNTIME,
            "release_signing_keys": [public_key_pem(fleet.key.public_key())],
            "health_window_s": 0,
        },
        "inference": {"enabled": inference, "report_interval_s": 1.0},
    }
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Answers:
    """Result envelopes from the broker, deduplicated by envelope (QoS 1 may repeat one)."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self._by_envelope: dict[tuple[str, int], tuple[int, int]] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"swap-bench-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgefl/{FLEET}/{DEVICE}/result/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        env = decode_envelope(bytes(msg.payload))
        body = json.loads(env.body)
        with self._lock:
            self._by_envelope[(env.incarnation, env.seq)] = (int(body["index"]), body["version"])

    def indices(self) -> Counter[int]:
        with self._lock:
            return Counter(i for i, _ in self._by_envelope.values())

    def by_version(self) -> Counter[int]:
        with self._lock:
            return Counter(v for _, v in self._by_envelope.values())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _status(fleet: BenchFleet) -> dict[str, Any]:
    try:
        doc = json.loads((fleet.state_dir / "agent-status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _swapped(fleet: BenchFleet, count: int) -> bool:
    """Whether the loop made ``count`` swaps (its status file says)."""
    swaps = (_status(fleet).get("inference") or {}).get("swaps") or {}
    return int(swaps.get("count", 0)) >= count


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    wait_for(condition, timeout, what)


def run_swap(
    work: Path, built: Built, broker: Mosquitto, *, swaps: int, rate_hz: float
) -> dict[str, Any]:
    """One agent, ``swaps`` model changes under a replay at ``rate_hz``; the figures."""
    folder = work / "swap"
    delivery = Delivery(folder)
    fleet = BenchFleet(folder / "fleet", built)
    v1 = fleet.preinstall()
    v2 = fleet.publish(2, "fp16")
    back = v1.model_copy(update={"rollback": True})
    targets = [v2 if k % 2 == 0 else back for k in range(swaps)]
    limit = int(rate_hz * (6.0 + 2.5 * swaps))
    config = agent_yaml(folder, fleet, broker, delivery, rate_hz=rate_hz, limit=limit)
    answers = Answers(broker.port)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="swap-bench-rollout")
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    began = time.monotonic()
    try:
        with EdgeflProcesses(folder) as procs:
            procs.start("agent", "run", "--config", str(config), log="agent.log")
            _wait(lambda: answers.by_version()[1] >= 2 * rate_hz, 120, "answers from v1")
            for done, target in enumerate(targets, 1):
                fleet.clock = max(time.time(), fleet.clock + 1)
                publisher.publish(
                    state_desired_topic(FLEET, DEVICE),
                    fleet.desired(target).to_json(),
                    qos=1,
                    retain=True,
                ).wait_for_publish(5)
                _wait(partial(_swapped, fleet, done), 120, f"swap {done} to v{target.version}")
                log(f"swap {done}: v{target.version} ({target.variant}) answering")
                time.sleep(1.0)  # a second of answers on it before the next change
            _wait(lambda: len(answers.indices()) >= limit, 120, f"all {limit} samples answered")
            time.sleep(1.0)  # a sample answered twice would arrive now
            _wait(
                lambda: (_status(fleet).get("inference") or {}).get("answered", 0) >= limit,
                20,
                "the status file to catch up",
            )
            status = _status(fleet)["inference"]
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        answers.close()
        delivery.stop()
    seen = answers.indices()
    missing = sum(1 for i in range(limit) if i not in seen)
    duplicated = sum(c - 1 for c in seen.values() if c > 1)
    recent = status["swaps"]["recent"]
    pauses = [float(s["pause_ms"]) for s in recent if s["pause_ms"] is not None]
    blocked = [float(s["blocked_ms"]) for s in recent]
    return {
        "rate_hz": rate_hz,
        "swaps": int(status["swaps"]["count"]),
        "samples": limit,
        "answered": len(seen),
        "dropped": missing + int(status["dropped"]),
        "duplicated": duplicated,
        "pause_p50_ms": percentile(pauses, 50),
        "pause_p99_ms": percentile(pauses, 99),
        "pause_max_ms": max(pauses, default=None),
        "blocked_p50_ms": percentile(blocked, 50),
        "blocked_p99_ms": percentile(blocked, 99),
        "versions": {str(v): n for v, n in sorted(answers.by_version().items())},
        "wall_s": round(time.monotonic() - began, 1),
    }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for {pid}")


def _mapped(pid: int, *names: str) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [n for n in names if f"/{n}/" in maps or f"/{n}." in maps]


def measure_agent_rss(
    work: Path, built: Built, broker: Mosquitto, *, rate_hz: float, seconds: float
) -> dict[str, Any]:
    """The resident memory of an agent whose loop runs at ``rate_hz``, once per second."""
    folder = work / "rss"
    delivery = Delivery(folder)
    fleet = BenchFleet(folder / "fleet", built)
    fleet.pin()
    v1 = fleet.publish(1, "fp32")
    config = agent_yaml(folder, fleet, broker, delivery, rate_hz=rate_hz, limit=None)
    answers = Answers(broker.port)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="swap-bench-rss-rollout")
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    samples: list[float] = []
    try:
        with EdgeflProcesses(folder) as procs:
            agent = procs.start("agent", "run", "--config", str(config), log="agent.log")
            fleet.clock = time.time()
            publisher.publish(
                state_desired_topic(FLEET, DEVICE), fleet.desired(v1).to_json(), qos=1, retain=True
            ).wait_for_publish(5)
            _wait(lambda: len(answers.indices()) >= 2 * rate_hz, 120, "the loop answering")
            pid = agent.pid
            assert pid is not None
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                samples.append(_rss_mb(pid))
                time.sleep(1.0)
            heavy = _mapped(pid, "torch", "sklearn", "scipy", "tensorflow", "onnxruntime", "grpc")
            answered = len(answers.indices())
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        answers.close()
        delivery.stop()
    return {
        "rate_hz": rate_hz,
        "seconds": seconds,
        "rss_max_mb": round(max(samples), 1),
        "rss_median_mb": round(statistics.median(samples), 1),
        "rss_last_mb": round(samples[-1], 1),
        "mapped": heavy,
        "answered": answered,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10, help="model changes under load")
    parser.add_argument("--rate-hz", type=float, default=50.0, help="replay rate of the swap run")
    parser.add_argument("--rss-rate-hz", type=float, default=20.0, help="loop rate of the RSS run")
    parser.add_argument("--rss-seconds", type=float, default=30.0, help="RSS sampling time")
    parser.add_argument("--models-dir", type=Path, default=None, help="cache of the built model")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        work = Path(tmp)
        models = args.models_dir or Path(tempfile.gettempdir()) / "edgefl-swap-bench-models"
        models.mkdir(parents=True, exist_ok=True)
        built = build_models(models)
        with Mosquitto(work, extra_lines=["max_queued_messages 100000"]) as broker:
            swap = run_swap(work, built, broker, swaps=args.swaps, rate_hz=args.rate_hz)
            log(f"swap: {swap}")
            rss = measure_agent_rss(
                work, built, broker, rate_hz=args.rss_rate_hz, seconds=args.rss_seconds
            )
            log(f"rss: {rss}")
    report = {
        "swap": swap,
        "agent_rss_mb": rss["rss_max_mb"],
        "rss": rss,
        "seconds": round(time.monotonic() - began, 1),
    }
    if args.json:
        print(json.dumps(report))
    else:
        s = swap
        print(
            f"swap at {s['rate_hz']:g} Hz: {s['swaps']} swaps, {s['samples']} samples, "
            f"dropped {s['dropped']}, duplicated {s['duplicated']}, pause p50 "
            f"{s['pause_p50_ms']} ms p99 {s['pause_p99_ms']} ms (loop blocked p99 "
            f"{s['blocked_p99_ms']} ms)\nagent RSS with the loop at {rss['rate_hz']:g} Hz: "
            f"max {rss['rss_max_mb']} MB, median {rss['rss_median_mb']} MB; mapped: "
            f"{', '.join(rss['mapped']) or 'none of torch, sklearn, scipy, onnxruntime'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
