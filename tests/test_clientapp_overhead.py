"""What a ClientApp message costs on a device: what the warm zygote preloads, and the
per-step RDP curves kept across messages (each message is a new process)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from edgefl import privacy
from edgefl.edge_agent.fl.privacy import RdpCurveCache
from edgefl.edge_agent.fl.warmstart import _task_heartbeat


@pytest.mark.slow  # imports Opacus
def test_rdp_curves_kept_across_processes_give_the_same_epsilon(tmp_path: Path) -> None:
    history = [[1.3, 1 / 46, 46], [1.3, 1 / 46, 92]]
    privacy._CURVES.clear()
    cache = RdpCurveCache(tmp_path)
    assert cache.load() == 0
    fresh = privacy.epsilon_of(history, 1e-5)
    cache.save()
    assert json.loads(cache.path.read_text())["curves"][0][:2] == [1.3, 1 / 46]
    privacy._CURVES.clear()
    assert RdpCurveCache(tmp_path).load() == 1
    assert privacy.epsilon_of(history, 1e-5) == fresh  # bit for bit

    # A file made for other orders (another Opacus) or garbage is ignored, not trusted.
    privacy._CURVES.clear()
    doc = json.loads(cache.path.read_text())
    doc["orders"] = doc["orders"][:-1]
    cache.path.write_text(json.dumps(doc))
    assert RdpCurveCache(tmp_path).load() == 0
    cache.path.write_text("{not json")
    assert RdpCurveCache(tmp_path).load() == 0
    assert privacy.epsilon_of(history, 1e-5) == fresh


@pytest.mark.slow
def test_the_zygote_preloads_what_a_training_message_imports() -> None:
    """After the zygote's preload, DP training imports nothing more (torch._dynamo, behind
    torch.optim's first optimizer, cost every warm message about 3 s)."""
    code = """
import importlib, sys
from edgefl.edge_agent.fl.warmstart import _PRELOAD, _PRELOAD_IF_PRESENT
for name in _PRELOAD + _PRELOAD_IF_PRESENT:
    importlib.import_module(name)
import threading
assert threading.active_count() == 1, threading.enumerate()
before = set(sys.modules)
import numpy as np
from edgefl.edge_agent.fl.trainer import build_trainable_model, train_local
model = build_trainable_model("digits-mlp")
state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
rng = np.random.default_rng(0)
x = rng.random((64, 64), dtype=np.float32)
y = rng.integers(0, 10, 64)
train_local("digits-mlp", state, x, y, epochs=1, batch_size=16, lr=0.1, momentum=0.0,
            optimizer="sgd", seed=1, dp=True, sigma=1.0, max_grad_norm=1.0, history=[])
print(sorted(m for m in set(sys.modules) - before if not m.startswith("encodings")))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    new = json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))
    heavy = [m for m in new if m.split(".")[0] in {"torch", "opacus", "httpx", "httpcore"}]
    assert heavy == [], heavy


def test_a_first_message_waiting_for_the_zygote_keeps_its_task_claimed() -> None:
    """The launcher's heartbeat is the request Flower's ClientApp sends: the task token on
    the runtime API's send-task-heartbeat route, an empty protobuf body."""
    seen: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
            self.send_response(200)
            self.send_header("content-type", "application/protobuf")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"\x08\x01")  # SendTaskHeartbeatResponse(success=True)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        _task_heartbeat(["flwr-clientapp", "--runtime-api-address", address, "--token", "t0"])
        # TLS to the runtime API (Flower's client needed), or no token: nothing is sent.
        _task_heartbeat(
            ["flwr-clientapp", "--runtime-api-address", address, "--token", "t1",
             "--root-certificates", "/x.pem"]
        )  # fmt: skip
        _task_heartbeat(["flwr-clientapp", "--runtime-api-address", address])
        # A SuperNode that is gone: ignored.
        server_port = server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
    _task_heartbeat(["flwr-clientapp", "--runtime-api-address", f"127.0.0.1:{server_port}",
                     "--token", "t2"])  # fmt: skip
    assert len(seen) == 1
    assert seen[0]["path"] == "/v1/runtime/send-task-heartbeat"
    assert seen[0]["headers"]["flwr-task-token"] == "t0"
    assert seen[0]["headers"]["content-type"] == "application/protobuf"
    assert seen[0]["body"] == b""


@pytest.mark.slow  # imports Opacus
@pytest.mark.parametrize(
    ("target", "delta", "sample_rate", "steps"),
    [
        (8.0, 1e-5, 0.1, 30),  # 320 samples, batch 32, 3 rounds (device_training_bench)
        (8.0, 1e-5, 1 / 43, 215),  # 1,364 samples, batch 32, 5 rounds
        (8.0, 1e-5, 0.008, 3750),
        (1.0, 1e-5, 0.1, 30),
        (0.3, 1e-6, 0.01, 1000),
        (3.0, 1e-3, 0.5, 5),
    ],
)
def test_the_sigma_search_gives_opacus_sigma_to_the_last_bit(
    target: float, delta: float, sample_rate: float, steps: int
) -> None:
    """The faster σ search replays Opacus' bisection: the same σ, so the same ε."""
    from opacus.accountants.utils import get_noise_multiplier

    expected = get_noise_multiplier(
        target_epsilon=target,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant="rdp",
        epsilon_tolerance=0.005,
    )
    privacy.choose_sigma.cache_clear()
    search = privacy._SigmaSearch(target, delta, sample_rate, steps)
    sigma = search.run()
    assert sigma == expected
    assert privacy.choose_sigma(target, delta, sample_rate, steps) == expected
    eps = privacy.epsilon_of([[sigma, sample_rate, steps]], delta)
    assert target - 0.005 <= eps <= target
    assert search.full_evaluations <= 2  # Opacus computes ε over every order 12 to 17 times
