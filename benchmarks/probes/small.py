"""Probes of the smaller doors: the inference service's input limits and the run id.

Attacks (names as ``benchmarks/security_probe.py`` reports them):

- ``inference_huge_shape``: a device with a valid certificate sends tensors whose shape
  numpy cannot represent (``[0, 2**62, 2**62]``), negative or overflowing dimensions.
  Held when each is answered ``INVALID_ARGUMENT`` (never ``UNKNOWN`` with a traceback)
  and the service keeps answering.
- ``inference_oversized_batch``: the same device sends batches of 16,000 samples (just
  under the 4 MiB message limit) back to back while an honest device asks one sample at
  a time. Held when every oversized batch is refused before compute and the honest
  device is answered within :data:`HONEST_LATENCY_LIMIT_S` each time.
- ``run_id_dot``: ``edgefl server train --run-id`` with ``.``, ``..``, ``../x`` and other
  names that are not one safe path segment. Held when each is refused with exit code 2
  or 3 and nothing is written outside ``state_dir/runs``.

The inference service runs in this process (grpc.aio on its own thread, port 0), with
mutual TLS under a fleet CA made for the probe; the attacker holds only a device's
certificate and key. ``tests/security/`` runs these same functions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import numpy as np
import yaml

from edgefl.config import TlsFiles
from edgefl.proto import inference_pb2
from edgefl.proto.tensors import encode_tensor
from edgefl.server.fleet_ca import FleetCA, IssuedCert
from edgefl.server.inference import (
    SERVICE_NAME,
    InferenceServerConfig,
    RunningServer,
    load_or_train,
    start_in_thread,
)

__all__ = [
    "HONEST_LATENCY_LIMIT_S",
    "InferenceTarget",
    "inference_target",
    "probe_inference_huge_shape",
    "probe_inference_oversized_batch",
    "probe_run_id_dot",
    "run_probes",
]

HONEST_LATENCY_LIMIT_S: Final = 1.0
"""Longest an honest one-sample request may take while the attacker sends big batches.

A 16,000-sample forward pass of the digits CNN takes about 2 s on this class of machine,
so an honest request queued behind one would take longer than this."""

ATTACK_SAMPLES: Final = 16_000
"""Samples in the attacker's batch: 4,096,000 bytes of float32, under the 4 MiB limit."""

HUGE_SHAPES: Final[dict[str, tuple[list[int], int]]] = {
    "zero and two 2**62 dimensions": ([0, 2**62, 2**62], 0),
    "dimensions whose product overflows int64": ([2**40, 2**40, 1, 1], 0),
    "a negative dimension": ([-1, 1, 8, 8], 0),
    "the largest int64 dimension": ([2**63 - 1, 1, 8, 8], 256),
}
"""Attack shapes and the body length (bytes) sent with each."""

BAD_RUN_IDS: Final = (".", "..", "../x", "a/b", "", ".hidden", "run\n1", "x" * 65)


@dataclass
class InferenceTarget:
    """A running inference service with mutual TLS, and what the attacker holds."""

    running: RunningServer
    ca_pem: bytes
    attacker: IssuedCert
    honest: IssuedCert

    def channel(self, device: IssuedCert) -> grpc.Channel:
        """A mutual-TLS channel presenting ``device``'s certificate."""
        assert device.key_pem is not None
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=device.key_pem,
            certificate_chain=device.cert_pem,
        )
        return grpc.secure_channel(self.running.address, creds)


@contextlib.contextmanager
def inference_target(workdir: Path, *, weights: Path | None = None) -> Iterator[InferenceTarget]:
    """Start the real service (digits model, mutual TLS, port 0) for the probes.

    Args:
        workdir: Where the probe's CA (and, without ``weights``, a 1-epoch model) go.
        weights: An existing weights cache to serve from instead of training one.
    """
    ca = FleetCA.create(workdir / "ca")
    server_cert = ca.issue_server_cert([], ["127.0.0.1"])
    weights_dir = weights if weights is not None else workdir / "weights"
    model = load_or_train("digits", weights_dir, epochs=1)
    config = InferenceServerConfig(
        tls=TlsFiles(
            cert_file=server_cert.cert_path, key_file=server_cert.key_path, ca_file=ca.cert_path
        ),
        crl=ca.crl_path,
    )
    with start_in_thread(config, models=[model]) as running:
        yield InferenceTarget(
            running=running,
            ca_pem=ca.cert_pem,
            attacker=ca.issue_device_cert("mallory"),
            honest=ca.issue_device_cert("honest"),
        )


def _predict(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[inference_pb2.PredictRequest, inference_pb2.PredictResponse]:
    return channel.unary_unary(
        f"/{SERVICE_NAME}/Predict",
        request_serializer=inference_pb2.PredictRequest.SerializeToString,
        response_deserializer=inference_pb2.PredictResponse.FromString,
    )


def _code(
    call: grpc.UnaryUnaryMultiCallable[inference_pb2.PredictRequest, inference_pb2.PredictResponse],
    request: inference_pb2.PredictRequest,
    timeout: float = 30.0,
) -> tuple[str, str]:
    """``("OK", "")`` or the status code's name and details of one call."""
    try:
        call(request, timeout=timeout)
    except grpc.RpcError as exc:
        if not isinstance(exc, grpc.Call):
            return "UNKNOWN", str(exc)
        return exc.code().name, exc.details() or ""
    return "OK", ""


def probe_inference_huge_shape(target: InferenceTarget) -> dict[str, object]:
    """Shapes numpy cannot represent must get INVALID_ARGUMENT, and service goes on."""
    outcomes: list[str] = []
    held = True
    with target.channel(target.attacker) as channel:
        predict = _predict(channel)
        for what, (shape, body) in HUGE_SHAPES.items():
            tensor = inference_pb2.Tensor(dtype="float32", shape=shape, data=bytes(body))
            code, details = _code(
                predict, inference_pb2.PredictRequest(model="digits", input=tensor)
            )
            held &= code == "INVALID_ARGUMENT"
            outcomes.append(f"{what}: {code} ({details[:90]})")
        good = inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(np.zeros((1, 1, 8, 8), np.float32))
        )
        after, _ = _code(predict, good)
        held &= after == "OK"
        outcomes.append(f"a good request afterwards: {after}")
    return {"held": held, "detail": "; ".join(outcomes)}


def probe_inference_oversized_batch(
    target: InferenceTarget, *, duration_s: float = 3.0
) -> dict[str, object]:
    """Big batches must be refused and must not delay an honest device's requests."""
    attack = inference_pb2.PredictRequest(
        model="digits",
        input=encode_tensor(np.zeros((ATTACK_SAMPLES, 1, 8, 8), np.float32)),
    )
    codes: list[str] = []
    first_sent = threading.Event()
    stop = threading.Event()

    def attacker() -> None:
        with target.channel(target.attacker) as channel:
            predict = _predict(channel)
            while not stop.is_set():
                first_sent.set()
                codes.append(_code(predict, attack, timeout=60.0)[0])

    thread = threading.Thread(target=attacker, name="oversized-batch-attacker", daemon=True)
    latencies: list[float] = []
    honest_codes: list[str] = []
    with target.channel(target.honest) as channel:
        predict = _predict(channel)
        sample = inference_pb2.PredictRequest(
            model="digits", input=encode_tensor(np.zeros((1, 1, 8, 8), np.float32))
        )
        _code(predict, sample)  # connect and warm up before the clock starts
        thread.start()
        first_sent.wait(10)
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            start = time.monotonic()
            honest_codes.append(_code(predict, sample, timeout=30.0)[0])
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    stop.set()
    thread.join(120)
    refused = [c for c in codes if c != "OK"]
    worst = max(latencies) if latencies else float("inf")
    held = (
        bool(codes)
        and len(refused) == len(codes)
        and set(honest_codes) == {"OK"}
        and worst <= HONEST_LATENCY_LIMIT_S
    )
    detail = (
        f"{len(codes)} batches of {ATTACK_SAMPLES} samples: "
        f"{len(refused)} refused ({', '.join(sorted(set(refused))) or '-'}); "
        f"honest device: {len(latencies)} requests, codes {sorted(set(honest_codes))}, "
        f"worst latency {worst:.3f} s (limit {HONEST_LATENCY_LIMIT_S} s)"
    )
    return {"held": held, "detail": detail}


def _outside_runs(state_dir: Path) -> list[str]:
    """Everything under ``state_dir`` that is not the CA, the registry or ``runs/``."""
    allowed = {"ca", "runs", "edgefl.db", "admin-flwr-home"}
    return sorted(
        str(p.relative_to(state_dir)) for p in state_dir.iterdir() if p.name not in allowed
    )


def probe_run_id_dot(workdir: Path) -> dict[str, object]:
    """``--run-id`` values that are not one safe folder name must be refused up front."""
    from typer.testing import CliRunner

    from edgefl.cli import app
    from edgefl.netutil import free_port

    state = workdir / "server-state"
    FleetCA.create(state / "ca")
    config = workdir / "server.yaml"
    # A SuperLink nobody listens on: a refused run id must never get that far.
    config.write_text(
        yaml.safe_dump(
            {"state_dir": str(state), "superlink": {"port": free_port(), "insecure": True}}
        )
    )
    plan = workdir / "plan.toml"
    plan.write_text("num_devices = 2\nrounds = 1\n")
    before = _outside_runs(state)
    outcomes: list[str] = []
    held = True
    runner = CliRunner()
    for rid in BAD_RUN_IDS:
        result = runner.invoke(
            app,
            ["server", "train", "--plan", str(plan), "--config", str(config), "--run-id", rid],
        )
        ok = result.exit_code in (2, 3) and "run id" in result.output
        held &= ok
        outcomes.append(f"{rid!r}: exit {result.exit_code}")
    written = sorted(set(_outside_runs(state)) - set(before))
    runs = state / "runs"
    inside = sorted(str(p.relative_to(state)) for p in runs.rglob("*")) if runs.exists() else []
    held &= not written and not inside
    outcomes.append(
        f"written outside runs/: {written or 'nothing'}; in runs/: {inside or 'nothing'}"
    )
    return {"held": held, "detail": "; ".join(outcomes)}


def run_probes(workdir: Path) -> dict[str, dict[str, object]]:
    """Run every attack of this area against real processes; see the module docstring."""
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, object]] = {}
    with inference_target(workdir / "inference") as target:
        results["inference_huge_shape"] = probe_inference_huge_shape(target)
        results["inference_oversized_batch"] = probe_inference_oversized_batch(target)
    results["run_id_dot"] = probe_run_id_dot(workdir / "run-id")
    return results
