"""Training on devices (issue 6): ClientApp cold start, agent/SuperNode memory, round time.

Run from the repository root with the venv active::

    python benchmarks/device_training_bench.py --json

Everything is real and local: a :class:`~edgefl.server.serve.Server` (mosquitto with the
shipped mutual-TLS config, a TLS SuperLink with node authentication, the ingest, a
SQLite registry) in this process, ``--devices`` enrolled agents (``edgefl agent run``
child processes, each collecting digits samples from its replay source and supervising
its own ``flower-supernode``) and one DP run of ``--rounds`` rounds of edgefl's apps.
Progress goes to stderr; the result to stdout.

What is measured:

* ``idle_rss_mb``: median VmRSS over ``--idle-s`` seconds, once every agent's SuperNode is
  connected and before the run: ``agent`` is the ``edgefl agent run`` process,
  ``supernode`` the SuperNode's whole process group (``flower-supernode`` and the
  ``flower-superexec`` it starts), per device, median over devices; ``agent_plus_supernode``
  their sum (the issue's 350 MB target).
* ``training_rss_mb``: the largest VmRSS seen while the run trains, sampled every 50 ms:
  the agent, the SuperNode group without its ClientApps, one ``flwr-clientapp`` process,
  and the device's total.
* ``clientapp_cold_start_s``: Flower starts a new ``flwr-clientapp`` process for every
  message. For each train message, the ClientApp process lifetime (its start time in
  ``/proc`` to the last sample it was seen alive) minus the local training time the
  device reported (``train-time-s`` in the ledger): process start, imports, fetching the
  message and the app, loading the local data, sending the reply. Median over the
  messages of rounds 2 and later; round 1 also includes each device's one-time σ search
  for the run (``clientapp_first_message_s``).

  With warm start (the agent's default, ``--no-warm-start`` turns it off) the process
  Flower starts is edgefl's launcher, still named ``flwr-clientapp``: it lives exactly as
  long as the child the zygote forks for the message (it waits for its exit status), so
  its lifetime is the message's. A launcher that finds no zygote execs the real
  ``flwr-clientapp`` in the same process (same pid and start time), a cold start.
  ``clientapp_messages`` lists each message with ``warm`` (served by a forked child);
  ``clientapp_cold_start_by_path_s`` gives the median of the warm and of the cold
  messages of rounds 2 and later. The zygote's forked children carry the zygote's
  command line; their RSS counts as ``clientapp``, the zygote's as ``zygote`` (RSS counts
  the pages a child shares with the zygote twice, so ``device_total`` overstates).
* ``clientapp_import_s``: a fresh interpreter importing what the ClientApp imports
  (``flwr.clientapp``, edgefl's ClientApp, torch, Opacus), median of three.
* ``round_time_s``: median wall time of the rounds (``fl_rounds.wall_s``: send, train on
  every device, aggregate, server-side evaluation, commit); ``rounds`` lists each.

``growing_data`` (a second deployment, ``--growing-devices`` agents, default 3): each
agent's replay source runs at ``--growing-rate-hz`` (default 5 Hz, no limit) for the
whole run, so every device's data store grows between rounds while a DP run of
``--growing-rounds`` (default 5) planned rounds trains at ε=8. Reported:
``rounds_planned``; ``rounds_fully_trained`` (rounds in which every device trained: one
ledger row each); ``epsilon_max`` (the largest final ε, recomputed from the ledger
history); ``target_epsilon``; ``ledger_recomputed_max_rel_error`` (ledger total against
its recomputation); ``refusals`` (device: reason) and, per device, the training samples,
steps and sample rate of every round (``devices``): the samples grow, the steps and rate
stay as planned. ``previous_rule_last_round_check``: the ε the rule devices followed
before (q and steps recomputed from the store each round, the next round checked as its
steps at the first round's q) computes for the last round from the same sample counts,
and the devices it would have refused. ``--only growing_data`` runs this section alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from edgefl.edge_agent.fl.warmstart import BIN_DIR
from edgefl.edge_agent.identity import install_bundle, prepare_enrollment
from edgefl.enrollment import IdentityPaths, write_json_document
from edgefl.federation import FederationPlan
from edgefl.process import ManagedProcess
from edgefl.server.enrollment import admit
from edgefl.server.fl.ledger import FlStore
from edgefl.server.fl.superlink import write_run_app
from edgefl.server.registry import make_engine
from edgefl.server.serve import Server, ServerConfig
from edgefl.testing import EdgeflProcesses, free_port, wait_for

_CLK = os.sysconf("SC_CLK_TCK")
_ZYGOTE = "edgefl.edge_agent.fl.warmstart serve"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def progress(message: str) -> None:
    print(f"[device-training-bench] {message}", file=sys.stderr, flush=True)


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


_BOOT = _boot_time()


def _proc_info(pid: int) -> tuple[int, float, float, str, int] | None:
    """(pgid, start time as epoch seconds, RSS MB, cmdline, ppid) of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    pgid = int(fields[2])
    start = _BOOT + int(fields[19]) / _CLK
    rss = int(statm[1]) * _PAGE / 2**20
    return pgid, start, rss, cmdline, int(fields[1])


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


class Sampler(threading.Thread):
    """Samples the agents' and SuperNodes' processes every ``interval`` seconds."""

    def __init__(self, agents: dict[str, int], supernodes: dict[str, int], interval: float):
        super().__init__(daemon=True)
        self.agents = agents
        self.supernodes = supernodes  # device -> SuperNode pid (= its process group)
        self.interval = interval
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.clientapps: dict[int, dict[str, Any]] = {}  # pid -> device, start, last, rss
        self.series: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def sample(self) -> dict[str, Any]:
        now = time.time()
        groups = {pgid: dev for dev, pgid in self.supernodes.items()}
        snap: dict[str, Any] = {
            dev: {"agent": 0.0, "supernode": 0.0, "clientapp": 0.0, "zygote": 0.0}
            for dev in self.agents
        }
        for dev, pid in self.agents.items():
            info = _proc_info(pid)
            if info is not None:
                snap[dev]["agent"] = info[2]
        infos = {}
        for pid in _all_pids():
            info = _proc_info(pid)
            if info is not None and info[0] in groups:
                infos[pid] = info
        for pid, info in infos.items():
            dev = groups[info[0]]
            parent = infos.get(info[4])
            if "flwr-clientapp" in info[3]:
                if parent is not None and "flwr-clientapp" in parent[3]:
                    continue  # a launcher's short-lived fork that starts the zygote
                snap[dev]["clientapp"] += info[2]
                with self.lock:
                    entry = self.clientapps.setdefault(
                        pid,
                        {"device": dev, "start": info[1], "last": now, "rss": 0.0, "warm": True},
                    )
                    entry["last"] = now
                    entry["rss"] = max(entry["rss"], info[2])
                    # A launcher that found no zygote became the real flwr-clientapp.
                    entry["warm"] = entry["warm"] and f"/{BIN_DIR}/" in info[3]
            elif _ZYGOTE in info[3]:
                if parent is not None and _ZYGOTE in parent[3]:
                    snap[dev]["clientapp"] += info[2]  # a forked ClientApp child
                else:
                    snap[dev]["zygote"] += info[2]
            else:
                snap[dev]["supernode"] += info[2]
        with self.lock:
            self.series.append({"t": now, **snap})
        return snap


def _import_time() -> float:
    code = (
        "import time; t = time.perf_counter(); import flwr.clientapp, "
        "edgefl.edge_agent.fl.clientapp, torch, opacus; print(time.perf_counter() - t)"
    )
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def _agent_yaml(
    work: Path,
    i: int,
    server: Server,
    devices: int,
    warm_start: bool,
    *,
    rate_hz: float = 200.0,
    limit: int | None = 400,
    min_samples: int = 200,
) -> Path:
    state = work / f"agent{i}"
    ident = IdentityPaths(state)
    path = work / f"agent{i}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "device_id": f"bench-{i}",
                "fleet": "bench",
                "state_dir": str(state),
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": server.broker_port,
                    "tls": {
                        "ca_file": str(ident.ca),
                        "cert_file": str(ident.cert),
                        "key_file": str(ident.tls_key),
                    },
                },
                "sources": [
                    {
                        "type": "dataset-replay",
                        "dataset": "digits",
                        "rate_hz": rate_hz,
                        "partition": i,
                        "num_partitions": devices,
                        **({"limit": limit} if limit is not None else {}),
                    }
                ],
                "training": {
                    "superlink": server.superlink_address,
                    "min_samples": min_samples,
                    "warm_start": warm_start,
                },
            }
        )
    )
    return path


def _status(state_dir: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((state_dir / "agent-status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return doc


def run(
    devices: int, rounds: int, idle_s: float, work: Path, warm_start: bool = True
) -> dict[str, Any]:
    progress("importing the ClientApp's modules in fresh interpreters")
    import_s = _import_time()
    config = ServerConfig.model_validate(
        {
            "state_dir": str(work / "server"),
            "superlink": {"port": free_port()},
            "broker": {"port": free_port()},
        }
    )
    server = Server(config)
    progress("starting the server (broker, SuperLink, ingest)")
    server.start()
    agents: list[ManagedProcess] = []
    engine = make_engine(server.db_url)
    # Every agent gets SIGTERM at once when the run ends, then 60 s to exit.
    agent_procs = EdgeflProcesses(work, grace=60.0)
    try:
        admin = server.admin()
        yamls = []
        for i in range(devices):
            state = work / f"agent{i}"
            ident = prepare_enrollment(f"bench-{i}", "bench", state)
            bundle = admit(
                ident.request,
                ca=server.ca,
                admin=admin,
                engine=engine,
                superlink_address=server.superlink_address,
            )
            write_json_document(work / f"bundle{i}.json", bundle)
            install_bundle(work / f"bundle{i}.json", f"bench-{i}", "bench", state)
            yamls.append(_agent_yaml(work, i, server, devices, warm_start))
        progress(f"{devices} devices admitted; starting their agents")
        for i, path in enumerate(yamls):
            agents.append(
                agent_procs.start("agent", "run", "--config", str(path), log=f"agent{i}.log")
            )

        def ready() -> bool:
            for i in range(devices):
                sn = (_status(work / f"agent{i}").get("training") or {}).get("supernode") or {}
                if sn.get("state") != "running" or not sn.get("node_id"):
                    return False
            return True

        wait_for(ready, 300, "every agent's SuperNode connected")
        statuses = [_status(work / f"agent{i}") for i in range(devices)]
        sampler = Sampler(
            {f"bench-{i}": int(agents[i].pid or 0) for i in range(devices)},
            {
                f"bench-{i}": int(statuses[i]["training"]["supernode"]["pid"])
                for i in range(devices)
            },
            interval=0.05,
        )
        progress(f"idle for {idle_s:g} s (memory)")
        idle: list[dict[str, Any]] = []
        t_end = time.monotonic() + idle_s
        while time.monotonic() < t_end:
            idle.append(sampler.sample())
            time.sleep(0.25)
        sampler.series.clear()
        sampler.start()
        plan = FederationPlan.model_validate(
            {
                "dataset": "digits",
                "model": "digits-mlp",
                "num_devices": devices,
                "rounds": rounds,
                "lr": 0.3,
                "min_train_nodes": devices,
                "min_available_nodes": devices,
                "node_wait_s": 120,
                "round_timeout_s": 300,
                "dp": {"enabled": True, "target_epsilon": 8.0},
            }
        )
        run_id = "bench-run"
        app = write_run_app(work / "app", plan, registry_url=server.db_url, run_id=run_id)
        progress(f"submitting {rounds} DP rounds")
        flower_run = admin.submit_run(app)
        t0 = time.monotonic()
        while True:
            status = str(admin.run_info(flower_run).get("status", ""))
            if status.startswith("finished"):
                break
            if time.monotonic() - t0 > 1800:
                raise TimeoutError("the run did not finish in 30 minutes")
            time.sleep(2.0)
        sampler.stop_event.set()
        sampler.join()
        progress(f"run {status} in {time.monotonic() - t0:.1f} s")
        store = FlStore(server.db_url)
        try:
            result = store.result(run_id)
            ledger = store.ledger(run_id)
        finally:
            store.close()
    finally:
        agent_procs.stop_all()
        engine.dispose()
        server.stop()

    def med(values: list[float]) -> float:
        return float(statistics.median(values)) if values else float("nan")

    devs = [f"bench-{i}" for i in range(devices)]
    idle_agent = med([med([s[d]["agent"] for s in idle]) for d in devs])
    idle_sn = med([med([s[d]["supernode"] for s in idle]) for d in devs])
    series = sampler.series
    peak = {
        key: max((s[d][key] for s in series for d in devs), default=0.0)
        for key in ("agent", "supernode", "clientapp", "zygote")
    }
    peak_total = max(
        (
            s[d]["agent"] + s[d]["supernode"] + s[d]["clientapp"] + s[d]["zygote"]
            for s in series
            for d in devs
        ),
        default=0.0,
    )
    train_time = {(r.device_id, r.round): r.train_time_s for r in ledger}
    cold: dict[int, list[float]] = {}
    messages: list[dict[str, Any]] = []
    for dev in devs:
        procs = sorted(
            (e for e in sampler.clientapps.values() if e["device"] == dev),
            key=lambda e: e["start"],
        )
        for rnd, entry in enumerate(procs, start=1):
            if (dev, rnd) in train_time:
                lifetime = entry["last"] - entry["start"]
                value = lifetime - train_time[(dev, rnd)]
                cold.setdefault(rnd, []).append(value)
                messages.append(
                    {
                        "device": dev,
                        "round": rnd,
                        "warm": bool(entry["warm"]),
                        "cold_start_s": value,
                        "lifetime_s": lifetime,
                        "train_time_s": train_time[(dev, rnd)],
                    }
                )
    later = [v for rnd, values in cold.items() if rnd >= 2 for v in values]
    by_path = {
        path: med([m["cold_start_s"] for m in messages if m["round"] >= 2 and m["warm"] == w])
        for path, w in (("warm", True), ("cold", False))
    }
    round_times = [r.wall_s for r in result.rounds]
    return {
        "devices": devices,
        "rounds_run": len(result.rounds),
        "run_status": result.status,
        "clientapp_cold_start_s": med(later),
        "clientapp_cold_start_max_s": max(later, default=float("nan")),
        "clientapp_first_message_s": med(cold.get(1, [])),
        "clientapp_messages_measured": sum(len(v) for v in cold.values()),
        "warm_start": warm_start,
        "clientapp_cold_start_by_path_s": by_path,
        "clientapp_messages": messages,
        "clientapp_import_s": import_s,
        "idle_rss_mb": {
            "agent": idle_agent,
            "supernode": idle_sn,
            "agent_plus_supernode": idle_agent + idle_sn,
        },
        "training_rss_mb": {
            "agent": peak["agent"],
            "supernode": peak["supernode"],
            "clientapp": peak["clientapp"],
            "zygote": peak["zygote"],
            "device_total": peak_total,
        },
        "round_time_s": med(round_times),
        "rounds": [
            {
                "round": r.round,
                "wall_s": r.wall_s,
                "accuracy": r.accuracy,
                "epsilon_max": r.epsilon_max,
                "replies": r.num_replies,
            }
            for r in result.rounds
        ],
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }


def run_growing_data(devices: int, rounds: int, rate_hz: float, work: Path) -> dict[str, Any]:
    """The ``growing_data`` section (module docstring): a DP run while the stores grow."""
    from edgefl.privacy import epsilon_of, steps_per_round

    config = ServerConfig.model_validate(
        {
            "state_dir": str(work / "server"),
            "superlink": {"port": free_port()},
            "broker": {"port": free_port()},
        }
    )
    server = Server(config)
    progress(f"growing data: starting the server; {devices} agents replay at {rate_hz:g} Hz")
    server.start()
    engine = make_engine(server.db_url)
    agent_procs = EdgeflProcesses(work, grace=60.0)
    target = 8.0
    run_id = "growing-run"
    try:
        admin = server.admin()
        for i in range(devices):
            state = work / f"agent{i}"
            ident = prepare_enrollment(f"bench-{i}", "bench", state)
            bundle = admit(
                ident.request,
                ca=server.ca,
                admin=admin,
                engine=engine,
                superlink_address=server.superlink_address,
            )
            write_json_document(work / f"bundle{i}.json", bundle)
            install_bundle(work / f"bundle{i}.json", f"bench-{i}", "bench", state)
            path = _agent_yaml(
                work, i, server, devices, True, rate_hz=rate_hz, limit=None, min_samples=200
            )
            agent_procs.start("agent", "run", "--config", str(path), log=f"agent{i}.log")

        def ready() -> bool:
            for i in range(devices):
                sn = (_status(work / f"agent{i}").get("training") or {}).get("supernode") or {}
                if sn.get("state") != "running" or not sn.get("node_id"):
                    return False
            return True

        wait_for(ready, 600, "every agent collected its first samples and connected")
        plan = FederationPlan.model_validate(
            {
                "dataset": "digits",
                "model": "digits-mlp",
                "num_devices": devices,
                "rounds": rounds,
                "lr": 0.3,
                "min_train_nodes": devices,
                "min_available_nodes": devices,
                "node_wait_s": 120,
                "round_timeout_s": 300,
                "dp": {"enabled": True, "target_epsilon": target},
            }
        )
        app = write_run_app(work / "app", plan, registry_url=server.db_url, run_id=run_id)
        progress(f"growing data: submitting {rounds} DP rounds")
        flower_run = admin.submit_run(app)
        t0 = time.monotonic()
        while True:
            status = str(admin.run_info(flower_run).get("status", ""))
            if status.startswith("finished"):
                break
            if time.monotonic() - t0 > 1800:
                raise TimeoutError("the run did not finish in 30 minutes")
            time.sleep(2.0)
        progress(f"growing data: run {status} in {time.monotonic() - t0:.1f} s")
        store = FlStore(server.db_url)
        try:
            result = store.result(run_id)
            ledger = store.ledger(run_id)
        finally:
            store.close()
    finally:
        agent_procs.stop_all()
        engine.dispose()
        server.stop()
    devs = [f"bench-{i}" for i in range(devices)]
    per_round = {
        r.round: {row.device_id for row in ledger if row.round == r.round} for r in result.rounds
    }
    final = {
        d: max((r for r in ledger if r.device_id == d), key=lambda r: r.round)
        for d in devs
        if any(r.device_id == d for r in ledger)
    }
    recomputed = {d: epsilon_of(row.history, row.delta) for d, row in final.items()}
    errors = [
        abs(row.epsilon_total - epsilon_of(row.history, row.delta)) / max(row.epsilon_total, 1e-12)
        for row in ledger
    ]
    # The rule devices followed before the plan was kept: q and the steps recomputed from
    # the store every round, the last round checked as its steps at the first round's q.
    previous: dict[str, float] = {}
    for d in devs:
        rows = sorted((r for r in ledger if r.device_id == d), key=lambda r: r.round)
        if len(rows) < 2:
            continue
        sigma, q0 = rows[0].sigma, rows[0].sample_rate
        before = [[sigma, *steps_per_round(r.num_examples, plan.batch_size, 1)] for r in rows]
        previous[d] = epsilon_of([*before[:-1], [sigma, q0, before[-1][2]]], plan.dp.delta)
    return {
        "rounds_planned": rounds,
        "rounds_fully_trained": sum(1 for trained in per_round.values() if trained >= set(devs)),
        "epsilon_max": max(recomputed.values(), default=0.0),
        "target_epsilon": target,
        "run_status": result.status,
        "rate_hz": rate_hz,
        "ledger_recomputed_max_rel_error": max(errors, default=0.0),
        "epsilon_per_device": recomputed,
        "previous_rule_last_round_check": {
            "epsilon_per_device": previous,
            "would_refuse": sorted(d for d, e in previous.items() if e > target * (1 + 1e-9)),
        },
        "refusals": {f"round {r.round}": r.refusals for r in result.rounds if r.refusals},
        "devices": {
            d: [
                {
                    "round": row.round,
                    "num_examples": row.num_examples,
                    "steps": row.steps,
                    "sample_rate": row.sample_rate,
                    "sigma": row.sigma,
                    "epsilon_total": row.epsilon_total,
                }
                for row in sorted((r for r in ledger if r.device_id == d), key=lambda r: r.round)
            ]
            for d in devs
        },
        "rounds": [
            {"round": r.round, "accuracy": r.accuracy, "replies": r.num_replies, "wall_s": r.wall_s}
            for r in result.rounds
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep files here.")
    parser.add_argument(
        "--no-warm-start", action="store_true", help="Plain flwr-clientapp for every message."
    )
    parser.add_argument("--growing-devices", type=int, default=3)
    parser.add_argument("--growing-rounds", type=int, default=5)
    parser.add_argument("--growing-rate-hz", type=float, default=5.0)
    parser.add_argument(
        "--only",
        choices=["main", "growing_data"],
        default=None,
        help="Run one section (default: all).",
    )
    args = parser.parse_args()
    warm = not args.no_warm_start

    def sections(work: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if args.only in (None, "main"):
            (work / "main").mkdir(parents=True, exist_ok=True)
            out.update(run(args.devices, args.rounds, args.idle_s, work / "main", warm))
        if args.only in (None, "growing_data"):
            (work / "growing").mkdir(parents=True, exist_ok=True)
            out["growing_data"] = run_growing_data(
                args.growing_devices, args.growing_rounds, args.growing_rate_hz, work / "growing"
            )
        return out

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        out = sections(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="edgefl-devbench-") as tmp:
            out = sections(Path(tmp))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
