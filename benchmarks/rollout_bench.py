"""Staged rollouts across a fleet of agent processes: a good one, a bad one, a swap under load.

Run from the repository root::

    .venv/bin/python benchmarks/rollout_bench.py --json [--agents 10] [--rate-hz 10] \\
        [--skip-swap]

The fleet is :mod:`rollout_fleet`'s (the one ``tests/test_staged_rollout.py`` uses): the
shipped mosquitto (mutual TLS, ACL), the ingest in a child process, a SQLite registry,
the ``Models`` gRPC service and ``--agents`` ``edgefl agent run`` processes, each
enrolled under its own certificate and answering a held-out evaluation replay (the
digits test split at ``--rate-hz``) with the inference loop. The releases are the
toolkit's ``digits-mlp`` built into fp32 and fp16 (cached in ``--models-dir``), signed
with the server's release key. Every agent first runs v1 (fp32, a fleet-wide ``server
deploy``).

**good**: one agent is stopped (offline), then ``edgefl server rollout digits-mlp 2
--variant fp16`` (a real command, ``--canary 10%``, ``--soak``, ``--min-accuracy 0.6``,
``--max-accuracy-drop 20``) runs to its end; ``wall_s`` is the command's wall time,
``online`` the agents online when it started, ``converged`` those reporting v2 running
when it returned. The offline agent is then started again and its catch-up time (to v2
running, from the retained desired state) goes to stderr.

**bad**: a worse v3 (the fp32 model with digits 0-4 answered wrong, golden vectors made
from it, so devices install it: about half the accuracy) rolled out with ``--canary 20%``
and the same accuracy thresholds. ``max_devices_on_bad`` is the number of devices ever
seen running v3 (the registry's ``device_states`` sampled every 0.2 s, together with the
devices that have a stored result computed by v3); ``canaries_restored`` the canaries that
report their previous version running again when the rollout returned ``halted``.

**swap** and ``agent_rss_mb``: :func:`swap_bench.run_swap` and
:func:`swap_bench.measure_agent_rss` (hot swap at 50 Hz; the RSS of an agent with the
loop at 20 Hz), after the fleet is stopped; ``--skip-swap`` leaves them ``null``.

**accuracy_match_pts**: for v1 and v2, the agents' on-device accuracy as they report it
(``telemetry/inference``, newest report, summed over agents) against the same variant
evaluated offline (the same ``.tflite`` on this host's LiteRT) on the samples those
agents answered with it (from the stored results: source index modulo the split size);
the larger gap of the two, in points.

Progress goes to stderr; ``--json`` prints only::

    {"agents": int, "good": {"converged": int, "online": int, "wall_s": float},
     "bad": {"halted": bool, "max_devices_on_bad": int, "canaries": int,
             "canaries_restored": int},
     "swap": {...} | null, "agent_rss_mb": float | null, "accuracy_match_pts": float,
     "seconds": float}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from rollout_fleet import RolloutFleet, rollout_fleet  # noqa: E402

from edgefl.release_tamper import MODEL, RUNTIME, Built  # noqa: E402
from edgefl.server.registry import Record  # noqa: E402
from edgefl.testing import edgefl_executable  # noqa: E402

START = time.monotonic()
ACCURACY = ("--min-accuracy", "0.6", "--max-accuracy-drop", "20")


def log(message: str) -> None:
    """One progress line on stderr."""
    print(
        f"[rollout-bench {time.monotonic() - START:6.1f}s] {message}", file=sys.stderr, flush=True
    )


def rollout(fleet: RolloutFleet, version: int, variant: str, *args: str) -> dict[str, Any]:
    """``edgefl server rollout`` to its end; the status it prints (``--json``)."""
    proc = subprocess.run(
        [
            edgefl_executable(),
            "server",
            "rollout",
            MODEL,
            str(version),
            "--variant",
            variant,
            "--fleet",
            fleet.fleet,
            *args,
            "-c",
            str(fleet.server_config),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in proc.stderr.splitlines():
        log(f"  {line}")
    if proc.returncode not in (0, 9):
        raise RuntimeError(f"server rollout exited {proc.returncode}: {proc.stderr[-2000:]}")
    status: dict[str, Any] = json.loads(proc.stdout)
    return status


class BadWatch:
    """Samples which devices report ``version`` running, every 0.2 s, in a thread."""

    def __init__(self, fleet: RolloutFleet, version: int) -> None:
        self.fleet = fleet
        self.version = version
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, state in self.fleet.states().items():
                if state.version == self.version and state.state == "running":
                    self.seen.add(name)

    def __enter__(self) -> BadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def good_rollout(fleet: RolloutFleet, args: argparse.Namespace) -> dict[str, Any]:
    offline = fleet.names[-1]
    fleet.stop_agent(offline)
    fleet.wait(lambda: not fleet.online().get(offline), 60, f"{offline} offline")
    online = sum(bool(v) for n, v in fleet.online().items() if n in fleet.names)
    began = time.monotonic()
    status = rollout(
        fleet,
        2,
        "fp16",
        "--canary",
        "10%",
        "--soak",
        f"{args.soak_s}s",
        "--min-evaluated",
        str(args.min_evaluated),
        *ACCURACY,
    )
    wall = time.monotonic() - began
    converged = sum(
        1
        for name, state in fleet.states().items()
        if name != offline and state.version == 2 and state.state == "running"
    )
    log(f"good rollout {status['id']}: {status['state']} in {wall:.1f} s: {status['reason']}")
    back = time.monotonic()
    fleet.start_agent(offline)
    fleet.wait(lambda: fleet.running([offline], 2), 180, f"{offline} on v2")
    log(f"{offline} came back and ran v2 {time.monotonic() - back:.1f} s after its start")
    return {"converged": converged, "online": online, "wall_s": round(wall, 2)}


def bad_rollout(fleet: RolloutFleet, args: argparse.Namespace) -> dict[str, Any]:
    fleet.publish_worse(3)
    with BadWatch(fleet, 3) as watch:
        status = rollout(
            fleet,
            3,
            "fp32",
            "--canary",
            "20%",
            "--soak",
            f"{args.soak_s}s",
            "--min-evaluated",
            str(args.min_evaluated),
            *ACCURACY,
        )
    canaries = [d for d in status["devices"] if d["cohort"] == "canary"]
    with fleet.engine.connect() as conn:
        answered = {
            str(d)
            for (d,) in conn.execute(
                sa.select(Record.device_id)
                .where(Record.model == MODEL, Record.model_version == 3)
                .distinct()
            )
        }
    ran = watch.seen | answered | set(status["evidence"].get("devices_ran_release", []))
    log(
        f"bad rollout {status['id']}: {status['state']}: {status['reason']}; devices that ran "
        f"v3: {sorted(ran)}"
    )
    return {
        "halted": status["state"] == "halted",
        "max_devices_on_bad": len(ran),
        "canaries": len(canaries),
        "canaries_restored": sum(d["state"] == "restored" for d in canaries),
    }


def accuracy_match(fleet: RolloutFleet, built: Built) -> float:
    """The larger gap, in points, between reported and offline accuracy of v1 and v2."""
    from edgefl.edge_agent.runtimes import create_runtime
    from edgefl.edge_agent.sources import DatasetReplayConfig, replay_arrays

    x, y = replay_arrays(DatasetReplayConfig(split="test", evaluation=True))
    gaps = []
    with fleet.engine.connect() as conn:
        newest = (
            sa.select(sa.func.max(Record.id))
            .where(Record.kind == "telemetry", Record.topic.like("%/telemetry/inference"))
            .group_by(Record.device_id)
        )
        reports = [
            json.loads(bytes(b))
            for (b,) in conn.execute(sa.select(Record.body).where(Record.id.in_(newest)))
        ]
        for version, variant in ((1, "fp32"), (2, "fp16")):
            evaluated = correct = 0
            for doc in reports:
                for entry in doc.get("versions", []):
                    if (entry["model"], entry["version"]) == (MODEL, version):
                        evaluated += entry["evaluated"]
                        correct += entry["correct"]
            rows = [
                json.loads(bytes(b))["index"] % len(y)
                for (b,) in conn.execute(
                    sa.select(Record.body).where(
                        Record.kind == "result",
                        Record.model == MODEL,
                        Record.model_version == version,
                    )
                )
            ]
            if not evaluated or not rows:
                continue
            runtime = create_runtime(RUNTIME, built.variants[variant][0])
            shape = runtime.inputs[0].shape[1:]
            picked = np.asarray(rows)
            predictions = runtime.run(x[picked].reshape(len(picked), *shape)).argmax(axis=1)
            offline = float((predictions == y[picked]).mean())
            reported = correct / evaluated
            gaps.append(abs(reported - offline) * 100)
            log(
                f"v{version} ({variant}): reported {reported:.2%} on {evaluated} evaluation "
                f"samples; offline {offline:.2%} on the {len(rows)} samples stored as answered"
            )
    return round(max(gaps), 2) if gaps else -1.0


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10, help="agent processes")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="evaluation samples/s each")
    parser.add_argument("--soak-s", type=float, default=5.0, help="soak of both rollouts")
    parser.add_argument("--min-evaluated", type=int, default=30, help="samples per canary")
    parser.add_argument("--skip-swap", action="store_true", help="no swap or RSS run")
    parser.add_argument("--swaps", type=int, default=10, help="model changes in the swap run")
    parser.add_argument("--rss-seconds", type=float, default=15.0, help="RSS sampling time")
    parser.add_argument("--models-dir", type=Path, default=None, help="cache of the built model")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    from swap_bench import build_models

    models = args.models_dir or Path(tempfile.gettempdir()) / "edgefl-swap-bench-models"
    models.mkdir(parents=True, exist_ok=True)
    built = build_models(models)
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        work = Path(tmp)
        with rollout_fleet(
            work / "fleet", built, agents=args.agents, rate_hz=args.rate_hz
        ) as fleet:
            fleet.publish(1, "fp32")
            fleet.publish(2, "fp16")
            for name in fleet.names:
                fleet.start_agent(name)
            fleet.wait(
                lambda: all(fleet.online().get(n) for n in fleet.names), 300, "agents online"
            )
            log(f"{args.agents} agents online")
            fleet.deploy(1, "fp32")
            fleet.wait(lambda: fleet.running(fleet.names, 1), 300, "v1 on every agent")
            log("v1 runs on every agent")
            good = good_rollout(fleet, args)
            bad = bad_rollout(fleet, args)
            match = accuracy_match(fleet, built)
        swap: dict[str, Any] | None = None
        rss: float | None = None
        if not args.skip_swap:
            from swap_bench import measure_agent_rss, run_swap

            from edgefl.testing import Mosquitto

            with Mosquitto(work, extra_lines=["max_queued_messages 100000"]) as broker:
                swap = run_swap(work, built, broker, swaps=args.swaps, rate_hz=50.0)
                rss = measure_agent_rss(
                    work, built, broker, rate_hz=20.0, seconds=args.rss_seconds
                )["rss_max_mb"]
            log(f"swap: {swap}; agent RSS {rss} MB")
    report = {
        "agents": args.agents,
        "good": good,
        "bad": bad,
        "swap": None
        if swap is None
        else {
            "rate_hz": swap["rate_hz"],
            "pause_p99_ms": _rounded(swap["pause_p99_ms"]),
            "dropped": swap["dropped"],
            "duplicated": swap["duplicated"],
        },
        "agent_rss_mb": rss,
        "accuracy_match_pts": match,
        "seconds": round(time.monotonic() - START, 1),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
