"""The agent's inference loop with the real parts: `edgefl agent run`, mosquitto, a tflite model.

The model is the toolkit's real ``digits-mlp`` (fp32 and fp16 variants, signed releases,
see ``model_release_helpers``), installed by the device's model manager and delivered by
the real ``Models`` gRPC service over mutual TLS; results are read from the broker and
counted by ``(source, index)``. Offload goes to a real inference server on port 0.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from edgefl.config import validate_config
from edgefl.edge_agent.daemon import AgentConfig, read_status
from edgefl.edge_agent.inference.loop import SampleRefusedError, model_input
from edgefl.edge_agent.inference.stats import (
    InferenceStats,
    ModelKey,
    SwapRecord,
    percentile_or_none,
)
from edgefl.edge_agent.sources import SourceRecord
from edgefl.errors import ConfigError
from edgefl.proto.serde import decode_envelope
from edgefl.proto.topics import state_desired_topic
from edgefl.releasesign import public_key_pem
from edgefl.testing import EdgeflProcesses, Mosquitto, edgefl_executable, wait_for

try:
    from tests.delivery_helpers import make_delivery, start_service, tls_of
    from tests.model_release_helpers import (
        DEVICE,
        DEVICE_CLASS,
        FLEET,
        MODEL,
        RUNTIME,
        Built,
        Fleet,
        build_tiny_models,
    )
except ImportError:  # pragma: no cover - run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        make_delivery,
        start_service,
        tls_of,
    )
    from model_release_helpers import (  # type: ignore[import-not-found,no-redef]
        DEVICE,
        DEVICE_CLASS,
        FLEET,
        MODEL,
        RUNTIME,
        Built,
        Fleet,
        build_tiny_models,
    )

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


# --- what reaches the broker ------------------------------------------------------------


class Results:
    """Every result and inference report the agent publishes, deduplicated by envelope."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self.results: dict[tuple[str, int], dict[str, Any]] = {}
        self.bodies: dict[tuple[str, int], dict[str, Any]] = {}
        self.reports: list[dict[str, Any]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"results-{port}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgefl/{FLEET}/{DEVICE}/result/#", qos=1)
        self.client.subscribe(f"edgefl/{FLEET}/{DEVICE}/telemetry/inference", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        env = decode_envelope(bytes(msg.payload))
        body = json.loads(env.body)
        with self._lock:
            if env.kind == "telemetry":
                self.reports.append(body)
            else:
                # QoS 1 may deliver one envelope twice; two envelopes are two answers.
                self.results[(env.incarnation, env.seq)] = body

    def answers(self) -> list[dict[str, Any]]:
        with self._lock:
            return sorted(self.results.values(), key=lambda b: (b["source"], b["index"]))

    def count(self, **match: Any) -> int:
        return sum(all(a.get(k) == v for k, v in match.items()) for a in self.answers())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextmanager
def results_on(broker: Mosquitto) -> Iterator[Results]:
    results = Results(broker.port)
    try:
        yield results
    finally:
        results.close()


def _exactly_once(answers: list[dict[str, Any]], source: str, n: int) -> None:
    per_index = Counter(a["index"] for a in answers if a["source"] == source)
    twice = sorted(i for i, c in per_index.items() if c > 1)
    missing = sorted(set(range(n)) - set(per_index))
    assert not twice, f"answered twice: {twice[:20]}"
    assert not missing, f"never answered: {missing[:20]} ({len(missing)} of {n})"
    assert set(per_index) == set(range(n))


# --- the device -------------------------------------------------------------------------


def _preinstall(fleet: Fleet, variant: str = "fp32") -> Any:
    """Install v1 with the device's own model manager, as an earlier update would have."""
    v1 = fleet.publish(1, variant)
    manager = fleet.manager()
    manager.handle(fleet.desired(v1))
    current = manager.current()
    assert current is not None
    assert current.installed.version == 1
    return v1


def _agent_yaml(
    tmp_path: Path,
    fleet: Fleet,
    broker: Mosquitto,
    models_port: int,
    tls: Any,
    *,
    sources: list[dict[str, Any]],
    inference: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    config = {
        "device_id": DEVICE,
        "fleet": FLEET,
        "state_dir": str(fleet.state_dir),
        "mqtt": {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "status_interval_s": 0.2,
        "sources": sources,
        "models": {
            "enabled": True,
            "server": {"host": "127.0.0.1", "port": models_port},
            "tls": {k: str(v) for k, v in tls.model_dump().items()},
            "device_class": DEVICE_CLASS,
            "runtime": RUNTIME,
            "release_signing_keys": [public_key_pem(fleet.key.public_key())],
            "health_window_s": 0,
        },
        "inference": {"enabled": True, "report_interval_s": 1.0, **(inference or {})},
        **extra,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _status(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [edgefl_executable(), "agent", "status", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


class Publisher:
    """The server's rollout identity: signed desired states, retained."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rollout")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def desire(self, fleet: Fleet, model: Any) -> None:
        fleet.clock = time.time() + 1
        self.client.publish(
            state_desired_topic(FLEET, DEVICE), fleet.desired(model).to_json(), qos=1, retain=True
        ).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_swap_under_load_at_50_hz_answers_every_sample_once(
    tmp_path: Path, built: Built, broker: Mosquitto, edgefl_procs: EdgeflProcesses
) -> None:
    """v1 -> v2 -> v1 (a signed rollback) while a replay source runs at 50 Hz."""
    total = 600
    delivery = make_delivery(tmp_path, size=4096)
    fleet = Fleet(tmp_path, built)
    v1 = _preinstall(fleet)
    v2 = fleet.publish(2, "fp16")
    source = {"type": "dataset-replay", "name": "cam", "rate_hz": 50, "limit": total}
    publisher = Publisher(broker.port)
    with results_on(broker) as results, start_service(delivery) as service:
        tls = tls_of(delivery, delivery.devices[DEVICE])
        path = _agent_yaml(tmp_path, fleet, broker, service.port, tls, sources=[source])
        edgefl_procs.start("agent", "run", "--config", str(path), log="agent.log")
        wait_for(lambda: results.count(version=1) >= 150, 60, "150 answers from v1")
        publisher.desire(fleet, v2)
        wait_for(lambda: results.count(version=2) >= 100, 60, "100 answers from v2")
        publisher.desire(fleet, v1.model_copy(update={"rollback": True}))
        wait_for(lambda: len(results.answers()) >= total, 60, f"all {total} answers")
        time.sleep(0.5)  # anything answered twice would arrive now
        answers = results.answers()
        _exactly_once(answers, "cam", total)
        assert len(answers) == total
        # In order of the samples: v1, then v2, then v1 again; never back and forth.
        versions = [a["version"] for a in answers]
        changes = [versions[0]] + [b for a, b in itertools.pairwise(versions) if a != b]
        assert changes == [1, 2, 1]
        assert {a["variant"] for a in answers if a["version"] == 2} == {"fp16"}
        assert {(a["model"], a["where"]) for a in answers} == {(MODEL, "local")}
        assert all(a["deadline_met"] and 0 <= a["prediction"] < 10 for a in answers)
        assert all("label" in a and a["evaluation"] is False for a in answers)
        assert set(answers[0]) == set(_contract_example()), "docs/fleet-contract.md drifted"

        def settled() -> bool:
            inference = read_status(AgentConfig.model_validate(yaml.safe_load(path.read_text())))
            doc = inference.get("inference") or {}
            return bool(doc.get("answered") == total and doc["swaps"]["count"] == 2)

        wait_for(settled, 10, "the status file to show every answer")
        status = _status(path)
        inference = status["inference"]
        assert inference["model"] == {"model": MODEL, "version": 1, "variant": "fp32"}
        assert (inference["dropped"], inference["rejected"], inference["errors"]) == (0, {}, 0)
        assert inference["swaps"]["count"] == 2
        pauses = [s["pause_ms"] for s in inference["swaps"]["recent"]]
        assert all(p is not None and p >= 0 for p in pauses)
        by_version = {(v["version"], v["variant"]): v for v in inference["versions"]}
        assert set(by_version) == {(1, "fp32"), (2, "fp16")}
        assert sum(v["answered"] for v in by_version.values()) == total
        assert by_version[(2, "fp16")]["answered"] == versions.count(2)
        for v in by_version.values():
            assert v["local_p50_ms"] is not None
            assert v["local_p99_ms"] >= v["local_p50_ms"]
            assert (v["offload_fraction"], v["deadline_misses"], v["dropped"]) == (0.0, 0, 0)
        text = subprocess.run(
            [edgefl_executable(), "agent", "status", "--config", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "inference: digits-mlp v1 (fp32)" in text
        assert "samples/s" in text
        assert "local p50" in text
        assert "offload 0.0%" in text
        assert "deadline misses 0" in text
        assert "swaps 2" in text
        # The reports went out as telemetry/inference too.
        wait_for(lambda: bool(results.reports), 10, "a telemetry/inference report")
        assert any(r["versions"] for r in results.reports)
    publisher.close()


def _contract_example() -> dict[str, Any]:
    """The result body docs/fleet-contract.md shows."""
    doc = (ROOT / "docs" / "fleet-contract.md").read_text(encoding="utf-8")
    section = doc.split("## Inference results", 1)[1]
    example: dict[str, Any] = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    return example


def _offline_accuracy(built: Built, variant: str, x: np.ndarray, y: np.ndarray) -> float:
    from edgefl.edge_agent.runtimes import create_runtime

    runtime = create_runtime(RUNTIME, built.variants[variant][0])
    shape = runtime.inputs[0].shape[1:]
    logits = runtime.run(x.reshape(len(x), *shape))
    return float((logits.argmax(axis=1) == y).mean())


@pytest.mark.slow
def test_evaluation_samples_are_scored_and_never_stored_for_training(
    tmp_path: Path, built: Built, broker: Mosquitto, edgefl_procs: EdgeflProcesses
) -> None:
    from edgefl.edge_agent.sources import DatasetReplayConfig, replay_arrays

    if "evaluation" not in DatasetReplayConfig.model_fields:
        pytest.skip("the replay source has no evaluation flag yet")
    n_train, n_eval = 60, 120
    delivery = make_delivery(tmp_path, size=4096)
    fleet = Fleet(tmp_path, built)
    _preinstall(fleet)
    train = {"type": "dataset-replay", "name": "train", "rate_hz": 40, "limit": n_train}
    held_out = {
        "type": "dataset-replay",
        "name": "holdout",
        "split": "test",
        "evaluation": True,
        "rate_hz": 40,
        "limit": n_eval,
    }
    with results_on(broker) as results, start_service(delivery) as service:
        tls = tls_of(delivery, delivery.devices[DEVICE])
        path = _agent_yaml(
            tmp_path,
            fleet,
            broker,
            service.port,
            tls,
            sources=[train, held_out],
            # The SuperNode never starts (min_samples is out of reach): only the store counts.
            training={"superlink": {"host": "127.0.0.1", "port": 1}, "min_samples": 100_000},
        )
        edgefl_procs.start("agent", "run", "--config", str(path), log="agent.log")
        wait_for(lambda: len(results.answers()) >= n_train + n_eval, 90, "every answer")
        answers = results.answers()
        _exactly_once(answers, "train", n_train)
        _exactly_once(answers, "holdout", n_eval)
        scored = [a for a in answers if a["source"] == "holdout"]
        assert all(a["evaluation"] and "label" in a for a in scored)

        def stored() -> int:
            training = read_status(validate_config(AgentConfig, yaml.safe_load(path.read_text())))
            return int((training.get("training") or {}).get("samples", -1))

        wait_for(lambda: stored() == n_train, 10, f"{n_train} stored samples")
        wait_for(
            lambda: (read_status(validate_config(AgentConfig, yaml.safe_load(path.read_text())))
                     .get("inference") or {}).get("answered") == n_train + n_eval,
            10,
            "the status file to catch up",
        )  # fmt: skip
        status = _status(path)
    # The data store holds the training source's samples, none of the held-out split.
    import sqlite3

    with sqlite3.connect(fleet.state_dir / "samples.db") as db:
        streams = Counter(row[0] for row in db.execute("SELECT stream FROM samples"))
    assert sum(streams.values()) == n_train
    assert status["training"]["samples"] == n_train
    (version,) = status["inference"]["versions"]
    assert (version["evaluated"], version["answered"]) == (n_eval, n_train + n_eval)
    # On-device accuracy is the offline accuracy of the same variant on the same samples.
    cfg = DatasetReplayConfig.model_validate(held_out)
    x, y = replay_arrays(cfg, fleet.state_dir / "cache")
    offline = _offline_accuracy(built, "fp32", x[:n_eval], y[:n_eval])
    on_device = sum(a["prediction"] == a["label"] for a in scored) / n_eval
    assert version["accuracy"] == pytest.approx(on_device)
    assert abs(on_device - offline) <= 0.01
    text = subprocess.run(
        [edgefl_executable(), "agent", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"% of {n_eval}" in text


@pytest.mark.slow
def test_cloud_down_answers_come_locally_within_the_budget(
    tmp_path: Path, built: Built, broker: Mosquitto, edgefl_procs: EdgeflProcesses
) -> None:
    import torch
    from torch import nn

    from edgefl.server.inference import InferenceServerConfig, TorchServedModel, start_in_thread

    total, budget_ms = 200, 250.0
    delivery = make_delivery(tmp_path, size=4096)
    fleet = Fleet(tmp_path, built)
    _preinstall(fleet)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    served = TorchServedModel("digits", net, input_shape=(1, 8, 8))
    server = start_in_thread(InferenceServerConfig(model="digits"), models=[served])
    source = {"type": "dataset-replay", "name": "cam", "rate_hz": 40, "limit": total}
    try:
        with results_on(broker) as results, start_service(delivery) as service:
            tls = tls_of(delivery, delivery.devices[DEVICE])
            inference = {
                "mode": "adaptive",
                "prefer_cloud": True,  # every sample goes to the cloud while it is healthy
                "budget_ms": budget_ms,
                "cloud": {
                    "target": {"host": "127.0.0.1", "port": server.port},
                    "model": "digits",
                    "health_interval_s": 0.2,
                    "connect_timeout_s": 5,
                },
                "breaker": {"failure_threshold": 2, "open_s": 0.5, "max_open_s": 1.0},
            }
            path = _agent_yaml(
                tmp_path,
                fleet,
                broker,
                service.port,
                tls,
                sources=[source],
                inference=inference,
                metrics={"enabled": True, "port": 0},
            )
            edgefl_procs.start("agent", "run", "--config", str(path), log="agent.log")
            wait_for(lambda: results.count(where="cloud") >= 20, 60, "20 answers from the cloud")
            server.stop()
            down_from = max(a["index"] for a in results.answers()) + 1
            wait_for(lambda: len(results.answers()) >= total, 60, f"all {total} answers")
            answers = results.answers()
            _exactly_once(answers, "cam", total)
            after = [a for a in answers if a["index"] > down_from + 2]
            assert len(after) > 80
            assert {a["where"] for a in after} <= {"local", "local_fallback"}
            assert "local" in {a["where"] for a in after}  # the breaker opened
            late = [a for a in answers if not a["deadline_met"] or a["latency_ms"] > budget_ms]
            assert not late, late[:3]
            assert {a["version"] for a in answers} == {1}
            wait_for(
                lambda: (_status(path)["inference"] or {}).get("answered") == total,
                10,
                "the status file to catch up",
            )
            (version,) = _status(path)["inference"]["versions"]
            assert 0 < version["offload_fraction"] < 1
            assert version["where"]["cloud"] == results.count(where="cloud")
            assert version["deadline_misses"] == 0
            # The agent's metrics port says the same (tests/test_metrics.py: the rest).
            with urllib.request.urlopen(_status(path)["metrics"], timeout=5) as response:
                scrape = {
                    (m.name, tuple(sorted(m.labels.items()))): m.value
                    for family in text_string_to_metric_families(response.read().decode())
                    for m in family.samples
                }
            answers_total = "edgefl_agent_inference_answers_total"
            assert scrape[(answers_total, (("where", "cloud"),))] == version["where"]["cloud"]
            assert (
                sum(
                    scrape.get((answers_total, (("where", w),)), 0)
                    for w in ("local", "cloud", "local_fallback")
                )
                == total
            )
            ratio = scrape[("edgefl_agent_inference_offload_ratio", ())]
            assert ratio == pytest.approx(version["offload_fraction"])
            assert scrape[("edgefl_agent_inference_deadline_misses_total", ())] == 0
            latency_count = "edgefl_agent_inference_latency_seconds_count"
            assert sum(v for (n, _), v in scrape.items() if n == latency_count) == total
            model = [k for k in scrape if k[0] == "edgefl_agent_model_info"]
            assert len(model) == 1
            assert ("version", "1") in model[0][1]
    finally:
        server.stop()


# --- pieces -----------------------------------------------------------------------------


def _record(**fields: Any) -> SourceRecord:
    return SourceRecord(
        stream="s", kind="data", content_type="application/json", body=b"{}", **fields
    )


def test_model_input_reshapes_flat_features_and_names_what_does_not_fit() -> None:
    shape = (1, 8, 8)
    flat = [float(i) for i in range(64)]
    x = model_input(_record(sample=(flat, 3)), shape)
    assert x.shape == shape
    assert x.dtype == np.float32
    assert x[0, 7, 7] == 63.0
    cases = {
        "bad_shape": _record(sample=(flat[:-1], 3)),
        "bad_dtype": _record(sample=(["a"] * 64, 3)),
        "not_finite": _record(sample=([float("nan")] * 64, 3)),
        "out_of_range": _record(sample=([1e300] * 64, 3)),
        "no_inputs": _record(),
    }
    for reason, record in cases.items():
        with pytest.raises(SampleRefusedError) as caught:
            model_input(record, shape)
        assert caught.value.reason == reason


def test_stats_keep_figures_per_model_version() -> None:
    now = [0.0]
    stats = InferenceStats(clock=lambda: now[0])
    v1, v2 = ModelKey(MODEL, 1, "fp32"), ModelKey(MODEL, 2, "fp16")
    stats.serving(v1, None)
    for i in range(10):
        now[0] = i * 0.1
        if i == 6:
            stats.serving(v2, SwapRecord(at=0.0, from_version="v1", to_version="v2", blocked_ms=0))
        stats.answered(
            v1 if i < 6 else v2,
            source="cam",
            where="cloud" if i % 2 else "local",
            local_ms=float(i),
            latency_ms=float(i) + 1,
            deadline_met=i != 9,
            correct=None if i < 2 else i % 3 == 0,
        )
    stats.drop("cam", v2)
    stats.reject("bad_shape", v2)
    doc = stats.snapshot()
    first, second = doc["versions"]
    assert (first["version"], first["answered"], second["answered"]) == (1, 6, 4)
    assert first["evaluated"] == 4
    assert first["correct"] == 1
    assert first["accuracy"] == 0.25
    assert first["local_p50_ms"] == pytest.approx(2.5)
    assert first["offload_fraction"] == pytest.approx(0.5)
    assert (second["deadline_misses"], second["dropped"], second["rejected"]) == (1, 1, 1)
    assert first["samples_per_s"] == pytest.approx(6 / 0.6)
    assert second["served_s"] == pytest.approx(0.3)
    assert doc["swaps"]["count"] == 1
    assert doc["dropped"] == 1
    assert doc["rejected"] == {"bad_shape": 1}
    assert percentile_or_none([], 50) is None


def _base(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "state_dir": str(tmp_path),
        "mqtt": {"port": 1883},
        "sources": [{"type": "dataset-replay", "name": "cam"}],
        **extra,
    }


def test_inference_config_is_off_by_default_and_checked(tmp_path: Path) -> None:
    assert AgentConfig.model_validate(_base(tmp_path)).inference.enabled is False
    models = {"enabled": True, "server": {"host": "127.0.0.1", "port": 1}}
    with pytest.raises(ConfigError, match=r"inference\.enabled needs models\.enabled"):
        validate_config(AgentConfig, _base(tmp_path, inference={"enabled": True}))
    with pytest.raises(ConfigError, match=r"\['nope'\], which are not sources"):
        validate_config(
            AgentConfig,
            _base(tmp_path, models=models, inference={"enabled": True, "sources": ["nope"]}),
        )
    with pytest.raises(ConfigError, match=r"inference\.budget_ms"):
        validate_config(
            AgentConfig, _base(tmp_path, models=models, inference={"enabled": True, "budget_ms": 0})
        )
    ok = validate_config(AgentConfig, _base(tmp_path, models=models, inference={"enabled": True}))
    assert (ok.inference.queue_size, ok.inference.result_stream) == (64, "inference")


def test_readme_inference_example_is_a_valid_agent_config(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The inference loop", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    data = _base(
        tmp_path,
        models={"enabled": True, "server": {"host": "127.0.0.1", "port": 1}},
        sources=[{"type": "dataset-replay", "name": "camera"}],
        **example,
    )
    config = validate_config(AgentConfig, data)
    assert config.inference.enabled
    assert config.inference.sources == ["camera"]
    assert config.inference.cloud is not None
