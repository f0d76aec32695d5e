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
  their sum (the issue's 300 MB target); ``zygote``: the warm zygote's, 0 unless
  ``--prewarm`` (``training.warm_start_prewarm``) started it with the SuperNode.
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
  ``clientapp_duplicate_launches`` counts ClientApp processes started for a task whose
  first process was still starting (Flower offers the task again; the second one is
  refused it and ends), which are not counted as messages;
  ``clientapp_cold_start_by_path_s`` gives the median of the warm and of the cold
  messages of rounds 2 and later. The zygote's forked children carry the zygote's
  command line; their RSS counts as ``clientapp``, the zygote's as ``zygote`` (RSS counts
  the pages a child shares with the zygote twice, so ``device_total`` overstates).
  Before it submits the run, the benchmark does what ``edgefl server train`` does: it
  sends ``prewarm-training`` to the online devices, whose agents start their zygotes then,
  so the imports overlap the run's start (``run_hint_devices``: how many were told;
  ``--no-run-hint`` submits without it).
* ``clientapp_import_s``: a fresh interpreter importing what the ClientApp imports
  (``flwr.clientapp``, edgefl's ClientApp, torch, Opacus), median of three.
* ``clientapp_cpu_s``: CPU seconds, which a busy machine does not inflate as it does wall
  time: each zygote's preload, the forked child of the first and of later train messages
  (training included), and ``first_message_critical_path`` (preload + first message, per
  device): a run's first message on a device with a core to itself.
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

``small_device`` (``--only small_device``): one device (its agent, SuperNode, zygote and
ClientApps) in a cgroup v1 ``cpu`` and ``memory`` group made for the run and removed after
it, standing for a Raspberry Pi 4 on this x86 machine: ``--small-cpu-quota`` CPUs (default
0.33: ``cpu.cfs_quota_us`` 33,000 per ``cpu.cfs_period_us`` 100,000, a Cortex-A72 at
1.5 GHz being about a third of an x86 server core per thread, and the ClientApp's
critical path one thread: imports, Opacus' per-sample steps) and ``--small-memory-mb``
(default 1024, with the same memory+swap limit: a 2 GB Pi 4 less its OS and other
services). The agent enters the cgroup right after it starts, before it starts its
SuperNode; the section checks that the SuperNode is in it. A DP run of
``--small-rounds`` rounds (default 5, round timeout ``--small-round-timeout-s``, default
180 s) as in the main section. Reported: ``cpu_quota``, ``cfs_period_us``,
``memory_limit_mb``; ``warm_message_s`` and ``first_message_s`` (the main section's
ClientApp overhead, rounds 2+ median and round 1); ``peak_rss_mb`` (the group's largest
``total_rss + total_mapped_file`` in ``memory.stat``, sampled every 0.1 s: each page
once); ``rounds_selected`` (rounds the run sent the device a train message: with one
device, every round run) and ``rounds_completed`` (rounds it trained in, one ledger row
each); ``cgroup`` (periods throttled by the quota, the memory limit's hits, OOM kills).
A quota caps the group's CPU time; it does not make a thread slower when the machine
is busy anyway (``nr_throttled`` low: the load, not the quota, set the pace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

import yaml

from edgefl.edge_agent.fl.warmstart import BIN_DIR, PREWARM_ARG
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
                if PREWARM_ARG in info[3]:
                    continue  # starts the zygote (training.warm_start_prewarm): no message
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
    prewarm: bool = False,
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
                    "warm_start_prewarm": prewarm,
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
    devices: int,
    rounds: int,
    idle_s: float,
    work: Path,
    warm_start: bool = True,
    *,
    prewarm: bool = False,
    run_hint: bool = True,
    cgroup: CgroupV1 | None = None,
    round_timeout_s: float = 300.0,
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
            yamls.append(_agent_yaml(work, i, server, devices, warm_start, prewarm=prewarm))
        progress(f"{devices} devices admitted; starting their agents")
        for i, path in enumerate(yamls):
            agents.append(
                agent_procs.start("agent", "run", "--config", str(path), log=f"agent{i}.log")
            )
            if cgroup is not None:
                # Still importing: it starts its SuperNode (which starts the zygote and the
                # ClientApps) only seconds later, and they all inherit the cgroup.
                cgroup.add(int(agents[-1].pid or 0))

        def ready() -> bool:
            for i in range(devices):
                sn = (_status(work / f"agent{i}").get("training") or {}).get("supernode") or {}
                if sn.get("state") != "running" or not sn.get("node_id"):
                    return False
            return True

        wait_for(ready, 300, "every agent's SuperNode connected")
        statuses = [_status(work / f"agent{i}") for i in range(devices)]
        if cgroup is not None:
            supernode = int(statuses[0]["training"]["supernode"]["pid"])
            if supernode not in cgroup.pids():
                raise RuntimeError("the SuperNode is not in the device's cgroup")
            cgroup.start_sampling()
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
        # Messages come with the run: a launcher seen before it (the prewarm one) is none.
        sampler.clientapps.clear()
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
                "round_timeout_s": round_timeout_s,
                "dp": {"enabled": True, "target_epsilon": 8.0},
            }
        )
        run_id = "bench-run"
        app = write_run_app(work / "app", plan, registry_url=server.db_url, run_id=run_id)
        hinted: list[str] = []
        if run_hint:
            # What `edgefl server train` does before it submits (prewarm-training).
            from edgefl.server.audit import Principal
            from edgefl.server.ops import OpContext
            from edgefl.server.ops.runs import prewarm_devices

            ctx = OpContext(Principal("local:bench", "admin", "cli"), config=server.config)
            try:
                hinted = prewarm_devices(ctx)
            finally:
                ctx.close()
            progress(f"told {len(hinted)} of {devices} device(s) that a run is starting")
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
    idle_zygote = med([med([s[d]["zygote"] for s in idle]) for d in devs])
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
    duplicates = 0
    for dev in devs:
        launched = sorted(
            (e for e in sampler.clientapps.values() if e["device"] == dev),
            key=lambda e: e["start"],
        )
        # A device has one train message at a time. Flower's SuperExec offers a task again
        # when its ClientApp has not started in time (a first message waiting for the
        # zygote on a busy machine); the second process is refused the task (401) and
        # ends. It is not a message: skip launches that start while one is alive.
        procs: list[dict[str, Any]] = []
        for entry in launched:
            if procs and entry["start"] < procs[-1]["last"]:
                duplicates += 1
                continue
            procs.append(entry)
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
    trained = {dev: sorted(r.round for r in ledger if r.device_id == dev) for dev in devs}
    cpu = _cpu_figures(work, devices)
    return {
        "devices": devices,
        "rounds_run": len(result.rounds),
        "run_status": result.status,
        "clientapp_cold_start_s": med(later),
        "clientapp_cold_start_max_s": max(later, default=float("nan")),
        "clientapp_first_message_s": med(cold.get(1, [])),
        "clientapp_messages_measured": sum(len(v) for v in cold.values()),
        "clientapp_duplicate_launches": duplicates,
        "warm_start": warm_start,
        "warm_start_prewarm": prewarm,
        "run_hint_devices": len(hinted),
        "clientapp_cold_start_by_path_s": by_path,
        "clientapp_messages": messages,
        "clientapp_import_s": import_s,
        "clientapp_cpu_s": cpu,
        "idle_rss_mb": {
            "agent": idle_agent,
            "supernode": idle_sn,
            "agent_plus_supernode": idle_agent + idle_sn,
            "zygote": idle_zygote,
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
        "trained_rounds": trained,
        "refusals": {r.round: r.refusals for r in result.rounds if r.refusals},
        "round_timeout_s": round_timeout_s,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }


_PRELOAD_CPU = re.compile(r"preloaded \d+ modules in [\d.]+ s \(([\d.]+) s CPU\)")


def _cpu_figures(work: Path, devices: int) -> dict[str, Any]:
    """CPU seconds of the warm path, which the machine's load leaves as they are.

    ``zygote_preload``: each zygote's imports (its ``warmstart.log``); ``first_message``
    and ``later_messages``: the CPU time of the forked child of each train message, round 1
    and rounds 2+ (``warmstart-forks.log``; training included); medians over devices.
    ``first_message_critical_path``: preload plus first message per device, median: what a
    run's first message costs a device that has a core to itself.
    """
    preload: list[float] = []
    first: list[float] = []
    later: list[float] = []
    critical: list[float] = []
    for i in range(devices):
        state = work / f"agent{i}"
        found: list[str] = []
        with contextlib.suppress(OSError):
            found = _PRELOAD_CPU.findall((state / "warmstart.log").read_text())
            preload += [float(v) for v in found[:1]]
        exits: list[float] = []
        with contextlib.suppress(OSError, ValueError):
            for line in (state / "warmstart-forks.log").read_text().splitlines():
                entry = json.loads(line)
                if entry.get("event") == "exit" and "cpu_s" in entry:
                    exits.append(float(entry["cpu_s"]))
        if exits:
            first.append(exits[0])
            later += exits[1:]
            if found:
                critical.append(float(found[0]) + exits[0])

    def med(values: list[float]) -> float | None:
        return float(statistics.median(values)) if values else None

    return {
        "zygote_preload": med(preload),
        "first_message": med(first),
        "later_messages": med(later),
        "first_message_critical_path": med(critical),
    }


CGROUP_V1: Final = Path("/sys/fs/cgroup")


class CgroupV1:
    """A cgroup v1 ``cpu`` and ``memory`` group for one device's processes (created here).

    ``cpu_quota`` CPUs: ``cpu.cfs_quota_us = cpu_quota × cpu.cfs_period_us``, the CPU time
    the group's processes may use together in each period; ``memory_mb``:
    ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``, no swap either).
    :meth:`close` removes both groups (their processes must have ended).
    """

    def __init__(self, name: str, cpu_quota: float, period_us: int, memory_mb: int) -> None:
        self.cpu = CGROUP_V1 / "cpu" / name
        self.memory = CGROUP_V1 / "memory" / name
        self.cpu_quota = cpu_quota
        self.period_us = period_us
        self.memory_mb = memory_mb
        self.peak_resident_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for folder in (self.cpu, self.memory):
            folder.mkdir()
        try:
            (self.cpu / "cpu.cfs_period_us").write_text(str(period_us))
            (self.cpu / "cpu.cfs_quota_us").write_text(str(round(cpu_quota * period_us)))
            limit = str(memory_mb * 2**20)
            (self.memory / "memory.limit_in_bytes").write_text(limit)
            memsw = self.memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(limit)
        except OSError:
            self.close()
            raise

    def add(self, pid: int) -> None:
        """Move ``pid`` into both groups (its later children inherit them)."""
        for folder in (self.cpu, self.memory):
            (folder / "cgroup.procs").write_text(str(pid))

    def pids(self) -> set[int]:
        """The processes in the memory group."""
        text = (self.memory / "cgroup.procs").read_text()
        return {int(p) for p in text.split()}

    def memory_stat(self) -> dict[str, int]:
        """``memory.stat`` of the group."""
        out = {}
        for line in (self.memory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            out[key] = int(value)
        return out

    def resident_mb(self) -> float:
        """The group's resident memory: anonymous plus mapped file pages, each page once."""
        stat = self.memory_stat()
        return (stat.get("total_rss", 0) + stat.get("total_mapped_file", 0)) / 2**20

    def start_sampling(self, interval: float = 0.1) -> None:
        """Track :meth:`resident_mb`'s peak until :meth:`stop_sampling`."""

        def loop() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(OSError):
                    self.peak_resident_mb = max(self.peak_resident_mb, self.resident_mb())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        """End the sampling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def figures(self) -> dict[str, Any]:
        """Throttling, the memory limit's hits and the cgroup's own peak usage."""
        cpu_stat = dict(
            (k, int(v))
            for k, _, v in (
                line.partition(" ") for line in (self.cpu / "cpu.stat").read_text().splitlines()
            )
        )
        oom = (self.memory / "memory.oom_control").read_text().split()
        return {
            "nr_periods": cpu_stat.get("nr_periods", 0),
            "nr_throttled": cpu_stat.get("nr_throttled", 0),
            "throttled_s": cpu_stat.get("throttled_time", 0) / 1e9,
            "memory_max_usage_mb": int((self.memory / "memory.max_usage_in_bytes").read_text())
            / 2**20,
            "memory_failcnt": int((self.memory / "memory.failcnt").read_text()),
            "oom_kills": int(oom[oom.index("oom_kill") + 1]) if "oom_kill" in oom else 0,
        }

    def close(self) -> None:
        """Remove both groups; leftover processes are moved back to the root group first."""
        self.stop_sampling()
        for folder in (self.cpu, self.memory):
            if not folder.exists():
                continue
            with contextlib.suppress(OSError):
                for pid in (folder / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (folder.parent / "cgroup.procs").write_text(pid)
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def run_small_device(
    work: Path,
    *,
    cpu_quota: float,
    period_us: int,
    memory_mb: int,
    rounds: int,
    round_timeout_s: float,
    idle_s: float,
) -> dict[str, Any]:
    """The ``small_device`` section (module docstring): one device in a cgroup."""
    name = f"edgefl-small-device-{os.getpid()}"
    progress(
        f"small device: cgroup {name}: cpu {cpu_quota:g} CPU "
        f"(cfs_quota_us {round(cpu_quota * period_us)} / cfs_period_us {period_us}), "
        f"memory {memory_mb} MB"
    )
    group = CgroupV1(name, cpu_quota, period_us, memory_mb)
    try:
        out = run(1, rounds, idle_s, work, True, cgroup=group, round_timeout_s=round_timeout_s)
        group.stop_sampling()
        figures = group.figures()
    finally:
        group.close()
    trained = out["trained_rounds"].get("bench-0", [])
    return {
        "cpu_quota": cpu_quota,
        "cfs_period_us": period_us,
        "cfs_quota_us": round(cpu_quota * period_us),
        "memory_limit_mb": memory_mb,
        "warm_message_s": out["clientapp_cold_start_s"],
        "warm_message_max_s": out["clientapp_cold_start_max_s"],
        "first_message_s": out["clientapp_first_message_s"],
        "peak_rss_mb": group.peak_resident_mb,
        "rounds_selected": out["rounds_run"],
        "rounds_completed": len(trained),
        "round_timeout_s": round_timeout_s,
        "round_time_s": [r["wall_s"] for r in out["rounds"]],
        "messages": out["clientapp_messages"],
        "duplicate_launches": out["clientapp_duplicate_launches"],
        "idle_rss_mb": out["idle_rss_mb"],
        "run_status": out["run_status"],
        "refusals": out["refusals"],
        "cgroup": figures,
        "load_average_at_end": out["load_average_at_end"],
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
    parser.add_argument(
        "--prewarm",
        action="store_true",
        help="training.warm_start_prewarm: each zygote starts with its SuperNode.",
    )
    parser.add_argument(
        "--no-run-hint",
        action="store_true",
        help="Submit the run without telling the devices first (server train's "
        "prewarm-training command).",
    )
    parser.add_argument("--growing-devices", type=int, default=3)
    parser.add_argument("--growing-rounds", type=int, default=5)
    parser.add_argument("--growing-rate-hz", type=float, default=5.0)
    parser.add_argument(
        "--small-cpu-quota",
        type=float,
        default=0.33,
        help="small_device: CPUs the device's cgroup may use (cpu.cfs_quota_us / period).",
    )
    parser.add_argument("--small-cfs-period-us", type=int, default=100_000)
    parser.add_argument("--small-memory-mb", type=int, default=1024)
    parser.add_argument("--small-rounds", type=int, default=5)
    parser.add_argument("--small-round-timeout-s", type=float, default=180.0)
    parser.add_argument(
        "--only",
        choices=["main", "growing_data", "small_device"],
        default=None,
        help="Run one section (default: all).",
    )
    args = parser.parse_args()
    warm = not args.no_warm_start

    def sections(work: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if args.only in (None, "main"):
            (work / "main").mkdir(parents=True, exist_ok=True)
            out.update(
                run(
                    args.devices,
                    args.rounds,
                    args.idle_s,
                    work / "main",
                    warm,
                    prewarm=args.prewarm,
                    run_hint=not args.no_run_hint,
                )
            )
        if args.only in (None, "growing_data"):
            (work / "growing").mkdir(parents=True, exist_ok=True)
            out["growing_data"] = run_growing_data(
                args.growing_devices, args.growing_rounds, args.growing_rate_hz, work / "growing"
            )
        if args.only in (None, "small_device"):
            (work / "small").mkdir(parents=True, exist_ok=True)
            out["small_device"] = run_small_device(
                work / "small",
                cpu_quota=args.small_cpu_quota,
                period_us=args.small_cfs_period_us,
                memory_mb=args.small_memory_mb,
                rounds=args.small_rounds,
                round_timeout_s=args.small_round_timeout_s,
                idle_s=args.idle_s,
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
