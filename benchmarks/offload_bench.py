"""Offload benchmark: local / cloud / adaptive under injected network conditions.

Run from the repository root::

    .venv/bin/python benchmarks/offload_bench.py --json

Workload: the digits held-out split (360 labelled samples), answered one after another by
the device model (the static-int8 ``digits-cnn`` artifact, pruned variant when present)
through :class:`edgefl.edge_agent.offload.Predictor`, with the heavy float32 ``digits``
model behind the real grpc.aio inference service. Every sample has the same latency
budget (``--budget-ms``, 60 ms by default): enough for the cloud on loopback and at 20 ms
RTT, not at 100 ms RTT. ``cloud`` mode always asks the cloud and falls back locally when
its deadline passes; a deadline miss is an answer later than the budget, in any mode.

Network conditions (``"injection": "proxy"``): ``tc netem`` is not available on this
kernel, so a userspace TCP relay (``benchmarks/netshape.py``) sits between the agent and
the server and shapes each direction:

- ``none``: no relay, direct loopback;
- ``rtt20``: 10 ms one-way delay each way;
- ``rtt100_5mbit``: 50 ms each way, and the uplink serialised at 5 Mbit/s (token bucket);
- ``loss5``: 5 % packet loss as TCP shows it to an application: each chunk, in either
  direction, is with probability 5 % delivered one retransmission timeout late
  (200 ms minimum RTO + RTT) and nothing overtakes it (head-of-line blocking), since
  TCP never drops bytes;
- ``cloud_down``: the server is stopped, connections are refused;
- ``trace``: the conditions change every few seconds as a network trace says
  (``--trace``, default ``benchmarks/traces/cellular.json``: 159 s of LTE, handovers,
  congestion and three outages of 5, 12 and 30 s; made up, modelled on stated cellular
  figures, see its ``about``), replayed by the same relay (outages are black holes with
  TCP's retransmission backoff, see ``netshape.py``). Here the samples are not answered
  by a bare predictor: the agent's own inference loop
  (:class:`edgefl.edge_agent.inference.loop.InferenceLoop`) answers a ``dataset-replay``
  evaluation source of the same held-out split at ``--trace-rate-hz`` (20 Hz), as the
  daemon runs it, in each of ``--trace-modes`` (``local`` and ``adaptive``). Besides
  the usual keys it reports a per-segment and a sliding-window time series, and the
  recovery after each outage (``trace_recovery_s``, the slowest; see
  ``benchmarks/trace_run.py`` for the definition).

Also measured, without a relay: the gRPC overhead on loopback (Predict round trip minus
the server's compute and queue time, for a 3,136-byte float32 tensor, 28×28, served by a
small model on the same server; a plain blocking call, with the agent client's figure
beside it), and server throughput at 32 concurrent clients with
micro-batching on (``max_batch`` 32) and off (``max_batch`` 1), two server instances in
the same run serving the same heavy model.

Processes: the agent (this process) runs alone; the inference servers and the shaping
relay run in a child process (``--child``, driven by JSON lines on stdin), so the agent's
timing never waits for the server's or the relay's Python threads, as on a real device.

``targets`` evaluates the issue's targets on the run; "where the budget allows the cloud"
means ``none``, ``rtt20`` and ``loss5``. ``--skip-server`` leaves out the overhead and
throughput measurements (and their targets), e.g. to run ``--conditions trace`` alone.
The heavy model's weights come from ``--weights`` (default: the inference service's
cache, trained once with the recipe's epochs if empty).

Progress goes to stderr; ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from netshape import (  # benchmarks/ is on sys.path (script or MYPYPATH)
    LinkShape,
    NetworkTrace,
    ShapingProxy,
    TraceError,
)
from torch import nn

from edgefl.datasets import load_dataset
from edgefl.edge_agent.offload import OffloadConfig, Predictor, load_runtime
from edgefl.edge_agent.offload.client import InferenceClient
from edgefl.edge_agent.offload.config import CloudConfig, CloudTarget
from edgefl.edge_agent.offload.engine import find_device_model
from edgefl.proto import inference_pb2
from edgefl.proto.tensors import encode_tensor
from edgefl.server.inference import (
    InferenceServerConfig,
    RunningServer,
    ServedModel,
    TorchServedModel,
    default_weights_dir,
    load_or_train,
    start_in_thread,
)

CONDITIONS: dict[str, LinkShape | None] = {
    "none": None,
    "rtt20": LinkShape(rtt_ms=20.0),
    "rtt100_5mbit": LinkShape(rtt_ms=100.0, uplink_bps=5e6),
    "loss5": LinkShape(loss=0.05, rto_ms=200.0),
    "trace": None,  # --trace: conditions that change on schedule
    "cloud_down": None,  # always last: it stops the server
}
MODES = ("local", "cloud", "adaptive")
DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "cellular.json"
RECOVERY_TARGET_S = 10.0
# Where the budget allows the cloud: its path fits the budget (loss5: except on loss events).
CLOUD_FITS = ("none", "rtt20", "loss5")
HEAVY = "digits"
OVERHEAD_MODEL = "overhead-3k"


def _target(address: str) -> CloudTarget:
    """``host:port`` as the offload config's ``{host, port}``."""
    host, _, port = address.rpartition(":")
    return CloudTarget(host=host, port=int(port))


def log(message: str) -> None:
    print(f"[offload-bench] {message}", file=sys.stderr, flush=True)


# --- set-up -----------------------------------------------------------------------------


def device_model(model_dir: Path | None) -> Path:
    """The device artifact; built (int8 + pruned50-int8, cached) when no folder is given."""
    if model_dir is None:
        model_dir = Path.home() / ".cache" / "edgefl" / "bench" / "digits-cnn"
    if not model_dir.exists():
        from edgefl.quantize.build import BuildOptions, build_artifacts
        from edgefl.quantize.recipes import parse_variants

        log(f"building the device model into {model_dir} (once)")
        build_artifacts(
            BuildOptions(
                model="digits-cnn",
                variants=parse_variants("int8,pruned50-int8"),
                out=model_dir,
                runtimes=["ai-edge-litert"],
                bench_iters=20,
            ),
            progress=lambda what, _n: log(f"  {what}"),
        )
    return find_device_model(model_dir)


def overhead_model() -> ServedModel:
    """A 28×28 float32 input (3,136 bytes), so the message is the 3 KB of the target."""
    torch.manual_seed(0)
    return TorchServedModel(
        OVERHEAD_MODEL, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), input_shape=(1, 28, 28)
    )


# --- measurements -----------------------------------------------------------------------


def grpc_overhead(address: str, iters: int) -> dict[str, float]:
    """Predict round trip minus the server's compute and queue time, 3 KB tensor, loopback.

    Measured twice, interleaved: with a plain blocking gRPC call (gRPC's own cost, what
    the target is about) and through the agent's :class:`InferenceClient`, which also
    encodes, waits on a future with its own timeout and decodes the output.
    """
    x = np.random.default_rng(0).random((1, 1, 28, 28)).astype(np.float32)
    request = inference_pb2.PredictRequest(model=OVERHEAD_MODEL, input=encode_tensor(x))
    plain: list[float] = []
    agent: list[float] = []
    round_trips: list[float] = []
    with (
        grpc.insecure_channel(address) as channel,
        InferenceClient(CloudConfig(target=_target(address), model=OVERHEAD_MODEL)) as client,
    ):
        call = channel.unary_unary(
            "/edgefl.v1.Inference/Predict",
            request_serializer=inference_pb2.PredictRequest.SerializeToString,
            response_deserializer=inference_pb2.PredictResponse.FromString,
        )
        for i in range(iters + 50):
            start = time.perf_counter()
            response = call(request, timeout=5.0)
            elapsed = (time.perf_counter() - start) * 1000.0
            answer = client.predict(x, timeout_s=5.0)
            if i >= 50:  # warm-up: connection, first batches
                server_ms = (response.compute_us + response.queue_us) / 1000.0
                plain.append(elapsed - server_ms)
                round_trips.append(elapsed)
                agent.append(answer.round_trip_ms - answer.compute_ms - answer.queue_ms)
    return {
        "overhead_p50_ms": float(np.percentile(plain, 50)),
        "agent_client_overhead_p50_ms": float(np.percentile(agent, 50)),
        "round_trip_p50_ms": float(np.percentile(round_trips, 50)),
        "request_bytes": float(request.ByteSize()),
    }


async def _load(address: str, clients: int, seconds: float, x: np.ndarray) -> tuple[int, int]:
    request = inference_pb2.PredictRequest(model=HEAVY, input=encode_tensor(x))
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/edgefl.v1.Inference/Predict",
            request_serializer=inference_pb2.PredictRequest.SerializeToString,
            response_deserializer=inference_pb2.PredictResponse.FromString,
        )
        await call(request, timeout=10.0)  # connect outside the timed window
        done = errors = 0
        stop_at = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done, errors
            while time.monotonic() < stop_at:
                try:
                    await call(request, timeout=10.0)
                    done += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        return done, errors


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    unbatched: str,
    batched: str,
    clients: int,
    seconds: float,
    rounds: int,
    x: np.ndarray,
    server_pid: int,
) -> dict[str, Any]:
    """Alternate windows on the two servers; report medians and the median paired ratio.

    Other work on a shared machine comes and goes: alternating short windows exposes both
    configurations to the same background, and each round's batched/unbatched ratio
    compares neighbours. Requests per CPU-second of the server process are reported too,
    a figure that background load on other cores barely moves.
    """
    windows: dict[str, list[float]] = {"unbatched": [], "batched": []}
    per_cpu: dict[str, list[float]] = {"unbatched": [], "batched": []}
    errors = {"unbatched": 0, "batched": 0}
    for _ in range(rounds):
        for name, address in (("unbatched", unbatched), ("batched", batched)):
            cpu0 = process_cpu_s(server_pid)
            start = time.monotonic()
            done, failed = asyncio.run(_load(address, clients, seconds / rounds, x))
            windows[name].append(done / (time.monotonic() - start))
            per_cpu[name].append(done / max(process_cpu_s(server_pid) - cpu0, 1e-3))
            errors[name] += failed
    ratios = [b / u for b, u in zip(windows["batched"], windows["unbatched"], strict=True)]
    return {
        "rps": {k: float(np.median(v)) for k, v in windows.items()},
        "ratio": float(np.median(ratios)),
        "per_server_cpu_s": {k: float(np.median(v)) for k, v in per_cpu.items()},
        "windows": windows,
        "errors": errors,
    }


def run_mode(
    runtime: Any,
    settings: OffloadConfig,
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, Any]:
    with Predictor(runtime, settings) as predictor:
        results = [predictor.predict_one(sample) for sample in x]
    latency = np.array([r.latency_ms for r in results])
    sources = [r.source for r in results]
    labels = np.array([r.label for r in results])
    return {
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
        "deadline_miss_rate": float(np.mean(latency > settings.budget_ms)),
        "accuracy": float(np.mean(labels == y)),
        "offload_fraction": sources.count("cloud") / len(results),
        "fallback_fraction": sources.count("local_fallback") / len(results),
        "max_ms": float(latency.max()),
        "samples": len(results),
    }


# --- the child process: servers and relays -----------------------------------------------


def child(weights: Path) -> int:
    """Serve commands from stdin, one JSON object per line; answer each on stdout."""
    heavy = load_or_train(HEAVY, weights)
    servers: dict[str, RunningServer] = {}
    proxies: dict[int, ShapingProxy] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        reply: dict[str, Any] = {}
        if cmd["cmd"] == "start":
            models = [heavy, overhead_model()] if cmd.get("overhead") else [heavy]
            config = InferenceServerConfig(model=HEAVY, max_batch=cmd.get("max_batch", 32))
            running = start_in_thread(config, models=models)
            servers[cmd["name"]] = running
            reply = {"port": running.port, "address": running.address}
        elif cmd["cmd"] == "stats":
            stats = servers[cmd["name"]].server.batcher_stats(HEAVY)
            reply = {k: v for k, v in vars(stats).items() if isinstance(v, int | float)}
        elif cmd["cmd"] == "stop":
            servers.pop(cmd["name"]).stop()
        elif cmd["cmd"] == "proxy":
            trace = cmd.get("trace")
            proxy = ShapingProxy(
                cmd["upstream"],
                LinkShape(**cmd["shape"]),
                seed=cmd["seed"],
                trace=None if trace is None else NetworkTrace.from_dict(trace),
            )
            proxy.start()
            proxies[proxy.port] = proxy
            reply = {"port": proxy.port, "address": proxy.address}
        elif cmd["cmd"] == "start_trace":
            reply = {"origin": proxies[cmd["port"]].start_trace()}
        elif cmd["cmd"] == "stop_proxy":
            proxy = proxies.pop(cmd["port"])
            reply = {"chunks": proxy.chunks, "held_as_lost": proxy.held_chunks}
            if proxy.trace is not None:
                reply.update(
                    lost_to_outages=proxy.outage_lost_chunks,
                    resets=proxy.resets,
                    syn_delayed=proxy.syn_delayed,
                )
            proxy.stop()
        elif cmd["cmd"] == "exit":
            break
        print(json.dumps(reply), flush=True)
    for proxy in proxies.values():
        proxy.stop()
    for running in servers.values():
        running.stop()
    return 0


class Child:
    """The parent's handle on the child process."""

    def __init__(self, weights: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", "--weights", str(weights)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process died during {cmd!r}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError):
                self.call("exit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--budget-ms", type=float, default=60.0)
    parser.add_argument("--samples", type=int, default=0, help="0: the whole held-out split")
    parser.add_argument("--model-dir", type=Path, default=None, help="device artifacts folder")
    parser.add_argument("--weights", type=Path, default=None, help="heavy model weights cache")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--throughput-s", type=float, default=9.0, help="per configuration")
    parser.add_argument("--rounds", type=int, default=6, help="alternating throughput windows")
    parser.add_argument("--overhead-iters", type=int, default=500)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace file (JSON)")
    parser.add_argument("--trace-rate-hz", type=float, default=20.0, help="loop sample rate")
    parser.add_argument("--trace-modes", default="local,adaptive")
    parser.add_argument(
        "--trace-window-s", type=float, default=5.0, help="sliding window of the recovery"
    )
    parser.add_argument("--trace-plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument(
        "--skip-server", action="store_true", help="leave out overhead and throughput"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    weights = args.weights or default_weights_dir()
    if args.child:
        return child(weights)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        parser.error(f"unknown conditions {sorted(unknown)}; choose from {list(CONDITIONS)}")
    conditions = sorted(set(conditions), key=list(CONDITIONS).index)  # cloud_down last
    trace_modes = [m.strip() for m in args.trace_modes.split(",") if m.strip()]
    if not trace_modes or set(trace_modes) - set(MODES):
        parser.error(f"--trace-modes takes some of {list(MODES)}, got {args.trace_modes!r}")
    args.trace_modes = trace_modes
    trace: NetworkTrace | None = None
    if "trace" in conditions:
        try:
            trace = NetworkTrace.load(args.trace)
        except TraceError as exc:
            parser.error(f"{exc} (see benchmarks/traces/cellular.json for the format)")
    started = time.monotonic()

    data = load_dataset("digits")
    x, y = data.x_test, data.y_test
    if args.samples:
        x, y = x[: args.samples], y[: args.samples]
    model_path = device_model(args.model_dir)
    log(f"heavy model {HEAVY!r} from {weights} (trained once if missing)")
    heavy = load_or_train(HEAVY, weights, progress=lambda what, d, t: log(f"  {what} {d}/{t}"))
    setup_s = time.monotonic() - started
    report: dict[str, Any] = {
        "injection": "proxy",
        "budget_ms": args.budget_ms,
        "samples": len(x),
        "device_model": model_path.name,
        "cloud_model": {
            "name": HEAVY,
            "version": heavy.version,
            "heldout_accuracy": heavy.heldout_accuracy,
        },
    }
    del heavy
    child_proc = Child(weights)
    try:
        if not args.skip_server:
            measure_server(child_proc, args, x[:1].astype(np.float32), report)
        report["conditions"], report["proxy_counters"] = measure_conditions(
            child_proc, args, conditions, model_path, x, y, trace, report
        )
    finally:
        child_proc.close()
    if args.trace_plot is not None and "trace" in report:
        plot_trace(report["trace"], args.trace_plot)
    report["targets"] = targets(report)
    report["setup_s"] = setup_s
    report["wall_s"] = time.monotonic() - started
    log(f"done in {report['wall_s']:.0f} s (set-up {setup_s:.0f} s)")
    print(json.dumps(report if args.json else report["targets"], indent=2))
    return 0


def measure_server(
    child_proc: Child, args: argparse.Namespace, one: np.ndarray, report: dict[str, Any]
) -> None:
    log("gRPC overhead on loopback (3 KB tensor) and throughput with / without micro-batching")
    batched = child_proc.call("start", name="batched", max_batch=32, overhead=True)["address"]
    unbatched = child_proc.call("start", name="unbatched", max_batch=1)["address"]
    overhead = grpc_overhead(batched, args.overhead_iters)
    load = throughput(
        unbatched, batched, args.clients, args.throughput_s, args.rounds, one, child_proc.pid
    )
    stats = child_proc.call("stats", name="batched")
    child_proc.call("stop", name="batched")
    child_proc.call("stop", name="unbatched")
    rps = load["rps"]
    report["grpc_overhead_p50_ms"] = overhead["overhead_p50_ms"]
    report["grpc_round_trip_p50_ms"] = overhead["round_trip_p50_ms"]
    report["agent_client_overhead_p50_ms"] = overhead["agent_client_overhead_p50_ms"]
    report["grpc_request_bytes"] = int(overhead["request_bytes"])
    report["throughput_rps"] = rps
    report["throughput"] = {
        "clients": args.clients,
        "seconds_each": args.throughput_s,
        "ratio": load["ratio"],
        "requests_per_server_cpu_s": load["per_server_cpu_s"],
        "windows_rps": load["windows"],
        "errors": load["errors"],
        "batcher": stats,
    }
    log(
        f"  overhead p50 {overhead['overhead_p50_ms']:.3f} ms (agent client "
        f"{overhead['agent_client_overhead_p50_ms']:.3f} ms); throughput {rps['unbatched']:.0f} "
        f"-> {rps['batched']:.0f} req/s ({report['throughput']['ratio']:.2f}x)"
    )


def measure_conditions(
    child_proc: Child,
    args: argparse.Namespace,
    conditions: Sequence[str],
    model_path: Path,
    x: np.ndarray,
    y: np.ndarray,
    trace: NetworkTrace | None,
    report: dict[str, Any],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    server = child_proc.call("start", name="main", max_batch=32)
    runtime = None
    results: dict[str, dict[str, Any]] = {}
    counters: dict[str, Any] = {}
    for condition in conditions:
        if condition == "trace":
            assert trace is not None
            results["trace"], counters["trace"], report["trace"] = measure_trace(
                child_proc, args, server["port"], model_path, trace
            )
            report["trace_recovery_s"] = report["trace"]["recovery_s"]
            continue
        shape = CONDITIONS[condition]
        proxy_port = None
        target = server["address"]
        if condition == "cloud_down":
            child_proc.call("stop", name="main")  # the port refuses connections from now on
        elif shape is not None:
            proxy = child_proc.call("proxy", upstream=server["port"], shape=vars(shape), seed=1)
            proxy_port, target = proxy["port"], proxy["address"]
        results[condition] = {}
        for mode in MODES:
            settings = OffloadConfig.model_validate(
                {
                    "model": model_path,
                    "mode": mode,
                    "budget_ms": args.budget_ms,
                    "cloud": {"target": _target(target).model_dump(), "model": HEAVY},
                }
            )
            if runtime is None:
                runtime = load_runtime(settings)
            t0 = time.monotonic()
            m = run_mode(runtime, settings, x, y)
            results[condition][mode] = m
            log(
                f"{condition:>13} {mode:>8}: p50 {m['p50_ms']:6.2f} ms  p99 "
                f"{m['p99_ms']:6.2f} ms  miss {m['deadline_miss_rate']:.3f}  acc "
                f"{m['accuracy']:.4f}  offload {m['offload_fraction']:.2f}  fallback "
                f"{m['fallback_fraction']:.2f}  ({time.monotonic() - t0:.1f} s)"
            )
        if proxy_port is not None:
            counters[condition] = child_proc.call("stop_proxy", port=proxy_port)
    if "cloud_down" not in conditions:
        child_proc.call("stop", name="main")
    return results, counters


# --- the trace condition -----------------------------------------------------------------


def measure_trace(
    child_proc: Child,
    args: argparse.Namespace,
    upstream_port: int,
    model_path: Path,
    trace: NetworkTrace,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Each of ``--trace-modes`` through the whole trace, the agent's loop answering.

    Returns the per-mode keys (as the other conditions), the relay's counters and the
    trace report (series, per-segment rows, recoveries).
    """
    # Imported here: the loop and the sources are only needed by this condition.
    from trace_run import FixedModel, analyse, run_through_trace, summary

    from edgefl.edge_agent.inference.config import InferenceConfig
    from edgefl.edge_agent.runtimes import create_runtime, default_runtime_key
    from edgefl.edge_agent.sources import DatasetReplayConfig, DatasetReplaySource, replay_arrays

    replay = DatasetReplayConfig(
        name="eval",
        dataset="digits",
        split="test",
        rate_hz=args.trace_rate_hz,
        stream="eval",
        evaluation=True,
    )
    runtime_key = default_runtime_key()
    wanted = unsure_rows(create_runtime(runtime_key, model_path), replay_arrays(replay)[0])
    threshold = InferenceConfig.model_fields["confidence_threshold"].default
    log(
        f"trace {trace.name!r}: {trace.duration_s:.0f} s, {len(trace.segments)} segments, "
        f"outages {[(a, b) for a, b, _ in trace.outages()]}; {len(wanted)} of "
        f"{wanted.rows} replayed samples are unsure locally (confidence < {threshold:g})"
    )
    model = FixedModel(model_path, model="digits-cnn", variant=model_path.name)
    results: dict[str, dict[str, Any]] = {}
    counters: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for mode in args.trace_modes:
        first = trace.segments[0]
        proxy = child_proc.call(
            "proxy",
            upstream=upstream_port,
            shape=vars(first.shape),
            seed=1,
            trace=trace.to_dict(),
        )
        config = InferenceConfig.model_validate(
            {
                "enabled": True,
                "mode": mode,
                "budget_ms": args.budget_ms,
                "cloud": {"target": _target(proxy["address"]).model_dump(), "model": HEAVY},
            }
        )
        log(f"trace {mode:>8}: {trace.duration_s:.0f} s at {args.trace_rate_hz:g} Hz")
        port = int(proxy["port"])

        def start_trace(port: int = port) -> float:
            return float(child_proc.call("start_trace", port=port)["origin"])

        def progress(t: float, mode: str = mode) -> None:
            log(f"  {mode} {t:.0f} s")

        run = run_through_trace(
            config,
            model=model,
            runtime_key=runtime_key,
            make_source=lambda: DatasetReplaySource(replay),
            source_name=replay.name,
            start_trace=start_trace,
            duration_s=trace.duration_s,
            rate_hz=args.trace_rate_hz,
            progress=progress,
        )
        counters[mode] = child_proc.call("stop_proxy", port=port)
        found = analyse(run, trace, args.budget_ms, window_s=args.trace_window_s, wanted=wanted)
        results[mode] = summary(run.answers, args.budget_ms)
        detail[mode] = found
        m = results[mode]
        log(
            f"trace {mode:>8}: p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms  miss "
            f"{m['deadline_miss_rate']:.4f}  acc {m['accuracy']:.4f}  offload "
            f"{m['offload_fraction']:.3f}  fallback {m['fallback_fraction']:.3f}  answered "
            f"{found['answered']}/{found['expected']}  recovery {found['recovery_s']} s"
        )
        for outage in found["outages"]:
            log(
                f"    outage {outage['start_s']:.0f}-{outage['end_s']:.0f} s: before "
                f"{outage['pre_level']}, during {outage['during']}, back in "
                f"{outage['recovery_s']} s (all samples: {outage['recovery_all_samples_s']} s)"
            )
    adaptive = detail.get("adaptive")
    report = {
        "name": trace.name,
        "file": str(args.trace),
        "duration_s": trace.duration_s,
        "rate_hz": args.trace_rate_hz,
        "window_s": args.trace_window_s,
        "outages": [{"start_s": a, "end_s": b, "reset": r} for a, b, r in trace.outages()],
        "unsure_samples": len(wanted),
        "replayed_samples": wanted.rows,
        "recovery_s": None if adaptive is None else adaptive["recovery_s"],
        "recovery_all_samples_s": None if adaptive is None else adaptive["recovery_all_samples_s"],
        "modes": detail,
    }
    return results, counters, report


class UnsureRows:
    """Replayed sample indices whose local answer is unsure (the policy wants the cloud)."""

    def __init__(self, unsure: set[int], rows: int) -> None:
        self.unsure = unsure
        self.rows = rows

    def __call__(self, index: int) -> bool:
        return index % self.rows in self.unsure

    def __len__(self) -> int:
        return len(self.unsure)


def unsure_rows(runtime: Any, x: np.ndarray) -> UnsureRows:
    """Rows of the replay whose local top-1 probability is under the default threshold."""
    from edgefl.edge_agent.inference.config import InferenceConfig
    from edgefl.edge_agent.offload.engine import softmax

    threshold = InferenceConfig.model_fields["confidence_threshold"].default
    shape = tuple(runtime.inputs[0].shape[1:])
    unsure = set()
    for i, row in enumerate(x):
        probs = softmax(runtime.run(row.reshape(1, *shape).astype(np.float32))[0])
        if float(probs.max()) < threshold:
            unsure.add(i)
    return UnsureRows(unsure, len(x))


def plot_trace(trace_report: dict[str, Any], path: Path) -> None:
    """The trace's RTT and outages above the adaptive mode's offload fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = trace_report["modes"].get("adaptive")
    if adaptive is None:
        log("no adaptive run to plot")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for row in adaptive["segments"]:
        if row["outage"]:
            for ax in (top, bottom):
                ax.axvspan(row["start_s"], row["end_s"], color="0.85")
        else:
            top.hlines(row["rtt_ms"], row["start_s"], row["end_s"], color="C0")
    top.set_ylabel("added RTT (ms)")
    top.set_title(f"trace {trace_report['name']}: grey = outage")
    points = adaptive["series"]
    t = [p["t_s"] for p in points]
    for key, label in (
        ("wanted_offload_fraction", "offloaded / wanted"),
        ("offload_fraction", "offloaded / all"),
    ):
        bottom.plot(t, [np.nan if p[key] is None else p[key] for p in points], label=label)
    bottom.set_ylabel(f"fraction ({trace_report['window_s']:g} s window)")
    bottom.set_xlabel("seconds into the trace")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot written to {path}")


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, evaluated on this run."""
    conds = report["conditions"]
    adaptive_miss = {
        c: m["adaptive"]["deadline_miss_rate"] for c, m in conds.items() if "adaptive" in m
    }
    vs_local = {
        c: m["adaptive"]["accuracy"] >= m["local"]["accuracy"]
        for c, m in conds.items()
        if "adaptive" in m and "local" in m
    }
    allowed = [c for c in CLOUD_FITS if c in conds]
    vs_cloud = {
        c: conds[c]["adaptive"]["accuracy"] / conds[c]["cloud"]["accuracy"] for c in allowed
    }
    found: dict[str, Any] = {}
    if "trace" in conds and "adaptive" in conds["trace"]:
        recovery = report.get("trace_recovery_s")
        found["trace_adaptive_deadline_miss_le_1pct"] = adaptive_miss["trace"] <= 0.01
        if "trace" in vs_local:
            found["trace_adaptive_accuracy_ge_local"] = vs_local["trace"]
        found["trace_recovery_le_10s"] = recovery is not None and recovery <= RECOVERY_TARGET_S
    server = "grpc_overhead_p50_ms" in report
    return {
        **found,
        "adaptive_deadline_miss_le_1pct": all(v <= 0.01 for v in adaptive_miss.values()),
        "adaptive_accuracy_ge_local": all(vs_local.values()),
        "adaptive_accuracy_ge_95pct_of_cloud_where_cloud_fits": all(
            v >= 0.95 for v in vs_cloud.values()
        ),
        "adaptive_over_cloud_accuracy": vs_cloud,
        "grpc_overhead_p50_le_1_5ms": report["grpc_overhead_p50_ms"] <= 1.5 if server else None,
        "batching_ge_1_5x": report["throughput"]["ratio"] >= 1.5 if server else None,
    }


if __name__ == "__main__":
    sys.exit(main())
