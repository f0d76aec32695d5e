"""The stages of ``edgefl demo`` and the processes they start.

Everything runs for real on loopback, each component as a process of its own started
through its command line, its output in ``<out>/logs/``:

1. **cloud model**: the inference service's heavy ``digits`` CNN is trained once and
   cached (``~/.cache/edgefl/inference``); a fresh machine trains it here, with progress.
2. **server**: ``edgefl server start`` (fleet CA made on the fly, SQLite registry,
   mosquitto with the shipped TLS config, SuperLink behind its nginx proxy, ingest, model
   service, admin API and dashboard, the inference service), ready when it prints its
   JSON line; then a release-signing key, so that devices pin it at enrollment.
3. **enroll**: per device ``edgefl agent enroll`` (keys and request), ``edgefl server
   admit`` (the real admit path: certificate, SuperLink node key, registry) and
   ``edgefl agent enroll --install``; then ``edgefl agent run``. Each agent replays its own
   label-skewed (Dirichlet) shard of the digits training split into its outbox and data
   store, and the held-out split as evaluation samples for the inference loop.
4. **collect**: until each agent's SuperNode runs (its data store holds ``min_samples``).
5. **train**: ``edgefl server train --wait`` of a DP-SGD plan (:data:`DEMO_PLAN`), with
   live accuracy and ε per device read from the registry.
6. **release**: ``edgefl server release`` builds, verifies and signs the float and the
   pruned int8 variants.
7. **rollout**: ``edgefl server rollout`` of the pruned int8 variant, a canary first,
   judged on its on-device accuracy after a soak; then every agent.
8. **serve**: the agents answer their evaluation samples with the release, offloading
   unsure ones to the cloud model; results flow through the outbox to the registry. The
   evaluation replays are then paused (the ``set-rate`` command) and the outboxes drained,
   so records sent and stored can be compared. With ``--chaos`` the faults of
   :mod:`edgefl.demo.chaos` happen while results flow.
9. **stop**: every process started is stopped (the agents first; the registry then gets a
   moment to store what they delivered as they left; then the server), and the machine
   is searched for any process still running from the demo's folder (the leftover count).
10. **report**: the registry's final figures (:mod:`edgefl.demo.figures`) and
    ``report.md`` with plots (:mod:`edgefl.demo.report`).

A stage that fails raises :class:`StageError` naming the component, its log's last
meaningful line and the log's path; :func:`run_demo` then stops everything it started and
raises :class:`DemoFailedError` with that message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from edgefl.errors import EdgeflError, ExitCode
from edgefl.netutil import free_port, port_open
from edgefl.process import ManagedProcess, ProcessNotReadyError, last_meaningful_line, read_tail
from edgefl.procs import ancestors, cmdline, cwd, end_process_group, pid_alive, start_ticks

__all__ = [
    "DEMO_PLAN",
    "DemoFailedError",
    "DemoOptions",
    "StageError",
    "run_demo",
]

FLEET: Final = "demo"
MODEL: Final = "digits-mlp"
"""The device model the plan trains and the release carries."""
SERVED_VARIANT: Final = "pruned50-int8"
RECIPES: Final = "fp32,pruned50-int8"
MAX_ACCURACY_DROP: Final = 5.0
"""Accuracy points a variant may lose against the float model (the server's default is 1.5:
the demo's DP-trained MLP loses 2-4 points when pruned by half and quantized)."""
ERROR_LINES: Final = re.compile(r"^error: |\bERROR\b|Error: ")
"""What marks a log line that names a cause."""
MARKER: Final = ".edgefl-demo"
"""File that marks a folder as a demo's output (so a new demo may replace it)."""

DEMO_PLAN: Final = """\
# The demo's federation plan (edgefl demo writes it as plan.toml): the shipped plan
# (deploy/plans/digits-dp.toml) on {devices} devices and {rounds} rounds, with more local
# work per round so that few rounds reach 80 % under DP-SGD at ε=8 per device.
name = "demo"
description = "edgefl demo: digits MLP, DP-SGD at ε=8 per device."
dataset = "digits"
model = "{model}"
num_devices = {devices}
dirichlet_alpha = {alpha}
seed = 0
rounds = {rounds}
local_epochs = {local_epochs}
batch_size = {batch_size}
lr = {lr}
momentum = 0.9
min_available_nodes = {devices}
min_train_nodes = {devices}
min_evaluate_nodes = 0
node_wait_s = 120
round_timeout_s = 300

[strategy]
name = "fedavg"

[dp]
enabled = true
target_epsilon = 8.0
delta = 1e-5
max_grad_norm = 1.0
"""


class StageError(Exception):
    """A stage failed: which component, the line that says why, and where its log is."""

    def __init__(self, component: str, line: str, log: Path | None) -> None:
        super().__init__(f"{component}: {line or 'no output'}")
        self.component = component
        self.line = line or "no output"
        self.log = log


class DemoFailedError(EdgeflError):
    """The demo stopped at a failed stage (exit 9); everything it started was stopped."""

    exit_code = ExitCode.RUN_FAILED


@dataclass(frozen=True)
class DemoOptions:
    """What ``edgefl demo`` runs (the CLI's flags) and the tuning it runs with.

    Args:
        devices: Agents to enroll.
        rounds: Federated rounds.
        out: Output folder (logs, state, report); a previous demo's folder is replaced.
        keep_running: After the report, keep everything running until Ctrl-C.
        chaos: Inject the faults of :mod:`edgefl.demo.chaos` while results flow.
        quiet: No progress display (``--json``: stdout carries only the JSON).
        broker_port: The broker's port (0: a free one).
        replay_hz: Training samples per second each agent replays.
        eval_hz: Evaluation samples per second each agent answers.
        soak_s: The rollout's soak after the canaries installed.
        served_per_device: Results on the release each agent must store before the end.
        alpha: Dirichlet concentration of the devices' shards (smaller: more skew).
        local_epochs: Local epochs per round.
        batch_size: DP-SGD batch size.
        lr: Learning rate.
    """

    devices: int = 4
    rounds: int = 5
    out: Path = Path("runs/demo")
    keep_running: bool = False
    chaos: bool = False
    quiet: bool = False
    broker_port: int = 0
    replay_hz: float = 25.0
    eval_hz: float = 5.0
    soak_s: float = 5.0
    served_per_device: int = 40
    alpha: float = 1.0
    local_epochs: int = 3
    batch_size: int = 32
    lr: float = 0.3

    def plan_text(self) -> str:
        """The federation plan the demo trains with."""
        return DEMO_PLAN.format(
            devices=self.devices,
            rounds=self.rounds,
            model=MODEL,
            alpha=self.alpha,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
        )


@dataclass
class StageRecord:
    """One stage's outcome as it is timed."""

    name: str
    ok: bool = False
    wall_s: float = 0.0
    detail: str = ""


@dataclass
class AgentHandle:
    """One device: its config, process and what the demo learned about it."""

    device_id: str
    config: Path
    state_dir: Path
    proc: ManagedProcess | None = None
    shard: int = 0
    data: dict[str, Any] = field(default_factory=dict)


def edgefl_cli() -> str:
    """The ``edgefl`` executable beside this Python (a venv's ``bin``), else on PATH."""
    here = Path(sys.executable).with_name("edgefl")
    if here.is_file():
        return str(here)
    found = shutil.which("edgefl")
    if found is None:
        raise EdgeflError("cannot find the edgefl command", hint="install edgefl[all]")
    return found


def component_of(line: str, default: str) -> str:
    """Which component a server log line blames (the server supervises several)."""
    lowered = line.lower()
    for words, name in (
        (("mosquitto", "broker"), "broker (mosquitto)"),
        (("nginx", "fleet api proxy", "fleet_proxy"), "Fleet API proxy (nginx)"),
        (("superlink",), "SuperLink (flower-superlink)"),
        (("ingest",), "ingest"),
        (("inference",), "inference service"),
        (("admin api", "uvicorn"), "admin API"),
        (("registry", "alembic", "sqlite"), "registry"),
    ):
        if any(w in lowered for w in words):
            return name
    return default


class Board:
    """The rich progress display: one line per stage, updated while it runs."""

    def __init__(self, console: Console, *, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        self._task: TaskID | None = None
        self._title = ""

    def __enter__(self) -> Board:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def begin(self, title: str) -> None:
        """A new stage line."""
        self._title = title
        self._task = self.progress.add_task(f"[bold]{title}[/]", total=1)

    def update(self, text: str) -> None:
        """The running stage's live detail."""
        if self._task is not None:
            self.progress.update(self._task, description=f"[bold]{self._title}[/]: {text}")

    def end(self, ok: bool, text: str) -> None:
        """Close the stage line with its outcome."""
        if self._task is None:
            return
        mark = "" if ok else "[red]FAILED[/] "
        self.progress.update(
            self._task, description=f"[bold]{self._title}[/]: {mark}{text}", completed=1
        )
        if not ok:
            self.progress.stop_task(self._task)
        self._task = None

    def note(self, text: str) -> None:
        """A line above the stages (a URL, a notice), on stderr even with ``--json``."""
        self.progress.console.print(text)


class Demo:
    """One run of the demo; :func:`run_demo` drives it."""

    def __init__(self, options: DemoOptions, board: Board) -> None:
        self.opts = options
        self.board = board
        self.out = options.out.expanduser().resolve()
        self.logs = self.out / "logs"
        self.cli = edgefl_cli()
        self.server_config = self.out / "server.json"
        self.server: ManagedProcess | None = None
        self.info: dict[str, Any] = {}
        self.agents: list[AgentHandle] = []
        self.stages: list[StageRecord] = []
        self.run_id = ""
        self.release: dict[str, Any] = {}
        self.rollout: dict[str, Any] = {}
        self.train_result: dict[str, Any] = {}
        self.dashboard: str | None = None
        self.chaos_outcome: dict[str, Any] = {}
        self.extra_procs: list[ManagedProcess] = []
        self.agents_on_release = 0
        self.served_variant = SERVED_VARIANT
        self.stop_codes: dict[str, int] = {}  # processes that did not exit 0 when stopped
        self.relay: Any = None  # a chaos.CutRelay in front of one agent's broker link
        self.figures: Any = None
        self._registry_engine: Any = None
        self.started_at = time.monotonic()
        self._stop_requested = threading.Event()

    # -- bookkeeping ------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str, title: str) -> Iterator[StageRecord]:
        """Time one stage and show it; a failure is recorded and raised on."""
        record = StageRecord(name)
        self.stages.append(record)
        self.board.begin(title)
        began = time.monotonic()
        try:
            yield record
        except BaseException as exc:
            record.wall_s = time.monotonic() - began
            record.detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.board.end(False, f"{record.detail} ({record.wall_s:.1f} s)")
            raise
        record.ok = True
        record.wall_s = time.monotonic() - began
        self.board.end(True, f"{record.detail} ({record.wall_s:.1f} s)")

    def prepare_out(self) -> None:
        """Make the output folder; a previous demo's is replaced, anything else refused."""
        if self.out.exists() and any(self.out.iterdir()):
            if not (self.out / MARKER).is_file():
                raise EdgeflError(
                    f"{self.out} exists and is not a demo's output folder",
                    hint="pass --out with a new or empty folder",
                )
            runtime = self.out / "server" / "server.json"
            if runtime.is_file():
                with contextlib.suppress(OSError, ValueError, TypeError):
                    pid = int(json.loads(runtime.read_text()).get("pids", {}).get("server", 0))
                    if pid and pid_alive(pid):
                        raise EdgeflError(
                            f"a demo is still running in {self.out} (server PID {pid})",
                            hint="stop it (Ctrl-C where it runs) or pass another --out",
                        )
            shutil.rmtree(self.out)
        # The logs hold what the commands printed: the dashboard's API token among them.
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(mode=0o700, exist_ok=True)
        self.logs.chmod(0o700)
        (self.out / MARKER).write_text("edgefl demo output; replaced by the next demo\n")

    # -- commands ---------------------------------------------------------------------

    def command(
        self,
        name: str,
        args: Sequence[str],
        *,
        component: str,
        timeout: float = 300.0,
        tick: Callable[[float], None] | None = None,
        ok_codes: Sequence[int] = (0,),
    ) -> dict[str, Any]:
        """Run ``edgefl ARGS --json`` to the end; its JSON answer.

        Its stderr goes to ``logs/<name>.log``, its stdout to ``logs/<name>.json``. It runs
        in its own process group, ended on a timeout or an interrupt. ``tick(elapsed)`` is
        called about every second while it runs.

        Raises:
            StageError: It exited with a code not in ``ok_codes``, timed out, or printed
                no JSON.
        """
        log = self.logs / f"{name}.log"
        answer = self.logs / f"{name}.json"
        argv = [self.cli, *args, "--json"]
        with log.open("ab") as err, answer.open("wb") as out:
            err.write(f"$ {' '.join(argv)}\n".encode())
            err.flush()
            proc = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
            )
            began = time.monotonic()
            try:
                while True:
                    try:
                        code = proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        elapsed = time.monotonic() - began
                        if elapsed > timeout:
                            end_process_group(proc.pid, timeout=10.0)
                            proc.wait()
                            raise StageError(
                                component, f"no answer within {timeout:.0f} s", log
                            ) from None
                        if tick is not None:
                            tick(elapsed)
            except BaseException:
                if proc.poll() is None:
                    end_process_group(proc.pid, timeout=10.0)
                    proc.wait()
                raise
        text = answer.read_text(encoding="utf-8", errors="replace")
        if code not in ok_codes:
            line = last_meaningful_line(read_tail(log), causes=ERROR_LINES)
            raise StageError(component, f"exited {code}: {line}", log)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise StageError(component, "printed no JSON answer", answer) from None
        if not isinstance(doc, dict):
            raise StageError(component, "printed no JSON object", answer)
        return doc

    def start_process(self, name: str, args: Sequence[str]) -> ManagedProcess:
        """Start a long-running ``edgefl`` process, its output in ``logs/<name>.log``.

        Its last meaningful line prefers an ``error:`` line (the CLI's own message, then
        its ``hint:``) or a logged error.
        """
        proc = ManagedProcess(
            [self.cli, *args], self.logs / f"{name}.log", name=name, causes=ERROR_LINES
        )
        proc.start()
        return proc

    def check_alive(self) -> None:
        """Fail the stage when the server or an agent exited."""
        if self.server is not None and self.server.poll() is not None:
            line = self.server.last_line()
            raise StageError(
                component_of(line, "server (edgefl server start)"),
                f"the server exited {self.server.returncode}: {line}",
                self.server.log_path,
            )
        for agent in self.agents:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise StageError(
                    f"agent {agent.device_id} (edgefl agent run)",
                    f"exited {agent.proc.returncode}: {agent.proc.last_line()}",
                    agent.proc.log_path,
                )

    def wait(
        self,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        component: str,
        log: Path | None = None,
        interval: float = 0.5,
    ) -> None:
        """Poll ``condition`` while everything runs; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            self.check_alive()
            if time.monotonic() > deadline:
                line = last_meaningful_line(read_tail(log)) if log is not None else ""
                detail = f"{what} did not happen within {timeout:.0f} s"
                raise StageError(component, f"{detail}; last log line: {line}", log)
            time.sleep(interval)

    # -- stage 1: the cloud model -----------------------------------------------------

    def cloud_model(self, record: StageRecord) -> None:
        """Train and cache the inference service's heavy model unless it is cached."""
        from edgefl.server.inference.service import default_weights_dir

        weights = default_weights_dir()
        self.weights_dir = weights
        if (weights / "digits.pt").is_file():
            record.detail = f"cached in {weights}"
            return
        self.board.note(
            f"The cloud model (the heavy digits CNN) is not cached yet: training it once into "
            f"{weights} (about a minute on 2 idle cores)."
        )
        from edgefl.server.inference.models import load_or_train

        def progress(what: str, done: int, total: int) -> None:
            self.board.update(f"{what} ({done}/{total})")

        model = load_or_train("digits", weights, progress=progress)
        record.detail = (
            f"trained and cached in {weights} (held-out accuracy {model.heldout_accuracy:.1%})"
        )

    # -- stage 2: the server ----------------------------------------------------------

    def start_server(self, record: StageRecord) -> None:
        """``edgefl server start`` with every service on loopback; its ready line."""
        broker_port = self.opts.broker_port or free_port()
        config = {
            "state_dir": str(self.out / "server"),
            "superlink": {"port": free_port()},
            "broker": {"port": broker_port},
            "inference": {"enabled": True, "model": "digits", "weights": str(self.weights_dir)},
        }
        self.server_config.write_text(json.dumps(config, indent=2) + "\n")
        self.board.update("CA, registry, mosquitto, SuperLink + nginx, ingest, services")
        self.server = self.start_process(
            "server", ["server", "start", "--config", str(self.server_config), "--json"]
        )
        try:
            ready = self.server.wait_for_log(
                re.compile(r"^\{.*\}$", re.MULTILINE), 180.0, interval=0.2
            )
        except ProcessNotReadyError as exc:
            line = self.server.last_line() or str(exc)
            raise StageError(
                component_of(line, "server (edgefl server start)"), line, self.server.log_path
            ) from None
        self.info = json.loads(ready.group(0))
        inference = str(self.info.get("inference") or "")
        if inference:
            host, _, port = inference.rpartition(":")
            self.board.update(f"waiting for the inference service on {inference}")
            self.wait(
                lambda: port_open(host, int(port)),
                180.0,
                "the inference service listening",
                component="inference service",
                log=self.out / "server" / "inference" / "inference.log",
            )
        self.command(
            "release-key",
            ["server", "release-key", "--create", "--config", str(self.server_config)],
            component="release signing key (edgefl server release-key)",
            timeout=120.0,
        )
        admin = self.info.get("admin") or {}
        if admin.get("url"):
            self.dashboard = str(admin["url"]).rstrip("/") + "/dashboard/"
        record.detail = (
            f"broker :{self.info['broker']['port']}, SuperLink {self.info['superlink']}, "
            f"inference {inference or 'off'}"
        )

    def dashboard_token(self) -> str | None:
        """A viewer API token for the dashboard's login form (printed once)."""
        try:
            doc = self.command(
                "admin-token",
                [
                    "server",
                    "admin-token",
                    "demo-viewer",
                    "--role",
                    "viewer",
                    "--expires",
                    "8h",
                    "--config",
                    str(self.server_config),
                ],
                component="admin API token (edgefl server admin-token)",
                timeout=120.0,
            )
        except StageError:
            return None
        token = doc.get("token") or doc.get("secret")
        return str(token) if token else None

    # -- stage 3: enrollment ----------------------------------------------------------

    def shard_sizes(self) -> list[int]:
        """How many training samples each device's shard holds (the replay's partition)."""
        from edgefl.datasets import load_dataset
        from edgefl.partition import dirichlet_partition

        data = load_dataset("digits", seed=0)
        parts = dirichlet_partition(data.y_train, self.opts.devices, self.opts.alpha, seed=0)
        return [len(p) for p in parts]

    def agent_config(self, agent: AgentHandle, mqtt_port: int | None = None) -> None:
        """Write the agent's config: identity, broker, replays, training, models, inference."""
        from edgefl.enrollment import IdentityPaths

        ident = IdentityPaths(agent.state_dir)
        tls = {
            "ca_file": str(ident.ca),
            "cert_file": str(ident.cert),
            "key_file": str(ident.tls_key),
        }
        models = str(self.info["models"])
        inference = str(self.info.get("inference") or "")
        m_host, _, m_port = models.rpartition(":")
        doc: dict[str, Any] = {
            "device_id": agent.device_id,
            "fleet": FLEET,
            "state_dir": str(agent.state_dir),
            "status_interval_s": 0.5,
            "agent_report_s": 10.0,
            "mqtt": {
                "host": "127.0.0.1",
                "port": mqtt_port or int(self.info["broker"]["port"]),
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 2.0,
                "tls": tls,
            },
            "sources": [
                {
                    "type": "dataset-replay",
                    "name": "train",
                    "dataset": "digits",
                    "rate_hz": self.opts.replay_hz,
                    "partition": agent.shard,
                    "num_partitions": self.opts.devices,
                    "alpha": self.opts.alpha,
                    "limit": agent.data["shard_size"],
                },
                {
                    "type": "dataset-replay",
                    "name": "eval",
                    "dataset": "digits",
                    "split": "test",
                    "evaluation": True,
                    "rate_hz": self.opts.eval_hz,
                },
            ],
            "training": {
                "superlink": _address(self.info["superlink"]),
                "min_samples": agent.data["min_samples"],
                "eval_fraction": 0.0,
            },
            "models": {
                "enabled": True,
                "server": {"host": m_host, "port": int(m_port)},
                "health_window_s": 3.0,
                "health_check_interval_s": 1.0,
            },
            "inference": {
                "enabled": True,
                "sources": ["eval"],
                "report_interval_s": 2.0,
                "mode": "adaptive",
                "budget_ms": 50.0,
                "confidence_threshold": 0.6,
            },
        }
        if inference:
            c_host, _, c_port = inference.rpartition(":")
            doc["inference"]["cloud"] = {
                "target": {"host": c_host, "port": int(c_port)},
                "model": "digits",
                "tls": tls,
            }
        agent.config.write_text(json.dumps(doc, indent=2) + "\n")

    def enroll(self, record: StageRecord) -> None:
        """Enroll, admit and start every agent."""
        sizes = self.shard_sizes()
        for i in range(self.opts.devices):
            device = f"dev-{i + 1:02d}"
            agent = AgentHandle(device, self.out / f"{device}.json", self.out / "agents" / device)
            agent.shard = i
            agent.data["shard_size"] = sizes[i]
            agent.data["min_samples"] = max(1, int(sizes[i] * 0.9))
            self.agents.append(agent)
            self.agent_config(agent)
        if self.opts.chaos:
            from edgefl.demo.chaos import CutRelay

            # The last agent reaches the broker through a relay that --chaos cuts.
            self.relay = CutRelay(int(self.info["broker"]["port"]))
            self.relay.start()
            self.agent_config(self.agents[-1], mqtt_port=self.relay.port)
        cfg = ["--config", str(self.server_config)]

        def request(agent: AgentHandle) -> str:
            doc = self.command(
                f"enroll-{agent.device_id}",
                ["agent", "enroll", "--config", str(agent.config)],
                component=f"agent {agent.device_id} (edgefl agent enroll)",
                timeout=120.0,
            )
            return str(doc["request"])

        self.board.update(f"{len(self.agents)} enrollment requests (keys, CSR, node key)")
        with ThreadPoolExecutor(2) as pool:
            requests = list(pool.map(request, self.agents))
        for n, (agent, req) in enumerate(zip(self.agents, requests, strict=True), 1):
            self.board.update(f"admitting {agent.device_id} ({n}/{len(self.agents)})")
            bundle = self.out / "agents" / f"{agent.device_id}-bundle.json"
            self.command(
                f"admit-{agent.device_id}",
                ["server", "admit", req, "--out", str(bundle), *cfg],
                component="server admit (edgefl server admit)",
                timeout=120.0,
            )
            agent.data["bundle"] = bundle

        def install(agent: AgentHandle) -> None:
            bundle = str(agent.data["bundle"])
            self.command(
                f"install-{agent.device_id}",
                [*("agent", "enroll", "--config", str(agent.config)), "--install", bundle],
                component=f"agent {agent.device_id} (edgefl agent enroll --install)",
                timeout=120.0,
            )

        self.board.update("installing the bundles")
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(install, self.agents))
        self.start_agents()
        self.board.update("agents connecting")
        self.wait(
            lambda: all(self.agent_status(a).get("connected") for a in self.agents),
            120.0,
            "every agent connected to the broker",
            component="agents (edgefl agent run)",
            log=self.agents[0].proc.log_path if self.agents[0].proc else None,
        )
        record.detail = f"{len(self.agents)} agents admitted and connected (mutual TLS)"

    def start_agents(self) -> None:
        """``edgefl agent run`` for every agent not running."""
        for agent in self.agents:
            if agent.proc is None or agent.proc.poll() is not None:
                agent.proc = self.start_process(
                    agent.device_id, ["agent", "run", "--config", str(agent.config)]
                )

    def agent_status(self, agent: AgentHandle) -> dict[str, Any]:
        """``edgefl agent status --json`` of the agent, read in this process."""
        from edgefl.config import load_config
        from edgefl.edge_agent.daemon import AgentConfig, read_status

        config = agent.data.get("loaded")
        if config is None:
            config = load_config(AgentConfig, agent.config)
            agent.data["loaded"] = config
        try:
            return read_status(config)
        except Exception:  # a status file being replaced: not yet
            return {}

    # -- stage 4: collection ----------------------------------------------------------

    def collect(self, record: StageRecord) -> None:
        """Wait until every agent's SuperNode runs with its samples collected."""

        def ready() -> bool:
            parts, done = [], 0
            for agent in self.agents:
                status = self.agent_status(agent)
                training = status.get("training") or {}
                supernode = training.get("supernode") or {}
                samples = int(training.get("samples") or 0)
                up = supernode.get("state") == "running" and bool(supernode.get("node_id"))
                done += up
                parts.append(f"{agent.device_id} {samples}/{agent.data['min_samples']}")
            self.board.update(f"samples {', '.join(parts)}; SuperNodes up {done}/{len(parts)}")
            return done == len(self.agents)

        self.wait(
            ready,
            180.0 + 2 * max(a.data["shard_size"] for a in self.agents) / self.opts.replay_hz,
            "every SuperNode running",
            component="SuperNodes (flower-supernode under edgefl agent run)",
            log=self.agents[0].proc.log_path if self.agents[0].proc else None,
            interval=1.0,
        )
        total = sum(int(a.data["shard_size"]) for a in self.agents)
        record.detail = (
            f"{total} training samples replayed at {self.opts.replay_hz:g} Hz; "
            f"{len(self.agents)} SuperNodes up"
        )

    def registry(self) -> Any:
        """The server registry's SQLAlchemy engine, made once (disposed by :meth:`stop_all`)."""
        if self._registry_engine is None:
            from edgefl.server.registry import make_engine

            self._registry_engine = make_engine(self.db_url)
        return self._registry_engine

    # -- stage 5: training ------------------------------------------------------------

    def live_rounds(self) -> str:
        """The registry's rounds so far: accuracy and each device's ε."""
        import sqlalchemy as sa

        from edgefl.server.registry.models import FlRound, PrivacyLedgerEntry

        with self.registry().connect() as conn:
            rows = conn.execute(
                sa.select(FlRound.round, FlRound.accuracy)
                .where(FlRound.run_id == self.run_id)
                .order_by(FlRound.round)
            ).all()
            if not rows:
                return "waiting for the first round"
            last = rows[-1]
            eps = conn.execute(
                sa.select(
                    PrivacyLedgerEntry.device_id, sa.func.max(PrivacyLedgerEntry.epsilon_total)
                )
                .where(PrivacyLedgerEntry.run_id == self.run_id)
                .group_by(PrivacyLedgerEntry.device_id)
                .order_by(PrivacyLedgerEntry.device_id)
            ).all()
        per_device = ", ".join(f"{d} {e:.2f}" for d, e in eps)
        return (
            f"round {last.round}/{self.opts.rounds}: accuracy {last.accuracy:.1%}; ε {per_device}"
        )

    @property
    def db_url(self) -> str:
        """The registry (SQLite in the server's state folder, as server.json names it)."""
        from edgefl.server.registry.db import DEFAULT_DB_FILENAME

        return str(
            self.info.get("db_url") or f"sqlite:///{self.out / 'server' / DEFAULT_DB_FILENAME}"
        )

    def train(self, record: StageRecord) -> None:
        """``edgefl server train --wait`` of the demo plan, with live progress."""
        plan = self.out / "plan.toml"
        plan.write_text(self.opts.plan_text(), encoding="utf-8")
        self.run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"

        def tick(elapsed: float) -> None:
            self.check_alive()
            try:
                self.board.update(self.live_rounds())
            except Exception:  # the registry being written: next time
                return

        doc = self.command(
            "train",
            [
                "server",
                "train",
                "--plan",
                str(plan),
                "--run-id",
                self.run_id,
                "--wait",
                "--poll-s",
                "1",
                "--config",
                str(self.server_config),
            ],
            component="federated run (edgefl server train)",
            timeout=900.0,
            tick=tick,
        )
        self.train_result = doc
        result = doc.get("result") or {}
        rounds = result.get("rounds") or []
        if not rounds:
            raise StageError("federated run (edgefl server train)", "no round trained", None)
        eps = result.get("epsilon_per_device") or {}
        record.detail = (
            f"{len(rounds)} DP rounds, final accuracy {rounds[-1]['accuracy']:.1%}, "
            f"ε max {max(eps.values()) if eps else float('nan'):.2f}"
        )

    # -- stage 6: release -------------------------------------------------------------

    def release_model(self, record: StageRecord) -> None:
        """``edgefl server release`` of the run: the float and the pruned int8 variant."""
        doc = self.command(
            "release",
            [
                "server",
                "release",
                "--run",
                self.run_id,
                "--recipes",
                RECIPES,
                "--max-accuracy-drop",
                f"{MAX_ACCURACY_DROP:g}",
                "--by",
                "edgefl-demo",
                "--config",
                str(self.server_config),
            ],
            component="release (edgefl server release)",
            timeout=900.0,
            tick=lambda s: self.board.update(f"building and verifying {RECIPES} ({s:.0f} s)"),
        )
        self.release = doc
        variants = doc.get("variants") or {}
        published = [n for n, v in variants.items() if v.get("status") == "published"]
        if doc.get("status") != "published" or not published:
            raise StageError(
                "release (edgefl server release)",
                f"release {doc.get('version')} is {doc.get('status')}: {doc.get('reasons')}",
                self.logs / "release.log",
            )
        # The compressed variant serves; should the accuracy gate leave it out, the float.
        self.served_variant = SERVED_VARIANT if SERVED_VARIANT in published else published[0]
        sizes = ", ".join(
            f"{name} {v.get('size_bytes', 0) / 1024:.1f} KiB "
            f"{_pct(v.get('accuracy'))} ({v.get('status')})"
            for name, v in variants.items()
        )
        record.detail = f"{MODEL} v{doc['version']} signed: {sizes}"

    # -- stage 7: rollout -------------------------------------------------------------

    def roll_out(self, record: StageRecord) -> None:
        """``edgefl server rollout`` with a canary; then every agent on the release."""
        version = int(self.release["version"])
        canary = max(1, round(0.25 * len(self.agents)))
        doc = self.command(
            "rollout",
            [
                "server",
                "rollout",
                MODEL,
                str(version),
                "--variant",
                self.served_variant,
                "--fleet",
                FLEET,
                "--canary",
                f"{canary / len(self.agents):.4f}",
                "--soak",
                f"{self.opts.soak_s:g}s",
                "--min-accuracy",
                "0.6",
                "--min-evaluated",
                "20",
                "--install-timeout",
                "2m",
                "--by",
                "edgefl-demo",
                "--config",
                str(self.server_config),
            ],
            component="rollout (edgefl server rollout)",
            timeout=600.0,
            tick=lambda s: self.board.update(f"canary {canary}, soak {self.opts.soak_s:g} s"),
        )
        self.rollout = doc
        if doc.get("state") != "completed":
            raise StageError(
                "rollout (edgefl server rollout)",
                f"rollout {doc.get('id')} ended {doc.get('state')}: {doc.get('reason')}",
                self.logs / "rollout.log",
            )
        self.board.update("waiting for every agent to run the release")
        self.wait(
            lambda: self.on_release() == len(self.agents),
            120.0,
            f"every agent serving v{version}",
            component="agents (model manager)",
            log=self.agents[0].proc.log_path if self.agents[0].proc else None,
        )
        record.detail = (
            f"v{version} {self.served_variant}: canary {canary}, then {len(self.agents)} agents"
        )

    def on_release(self) -> int:
        """Agents whose inference loop serves the release."""
        version = int(self.release.get("version") or -1)
        count = 0
        for agent in self.agents:
            model = (self.agent_status(agent).get("inference") or {}).get("model") or {}
            count += int(model.get("version") or -1) == version
        return count

    # -- stage 8: serve ---------------------------------------------------------------

    def stored_results(self) -> dict[str, int]:
        """Stored ``result`` records per device computed by the release."""
        import sqlalchemy as sa

        from edgefl.server.registry.models import Record

        with self.registry().connect() as conn:
            rows = conn.execute(
                sa.select(Record.device_id, sa.func.count())
                .where(
                    Record.kind == "result", Record.model_version == int(self.release["version"])
                )
                .group_by(Record.device_id)
            ).all()
        return {str(d): int(n) for d, n in rows}

    def serve(self, record: StageRecord) -> None:
        """Results on the release flow to the registry; then pause and drain."""
        from edgefl.demo import chaos

        want = self.opts.served_per_device

        def enough() -> bool:
            stored = self.stored_results()
            parts = [f"{a.device_id} {stored.get(a.device_id, 0)}/{want}" for a in self.agents]
            self.board.update(f"results stored on the release: {', '.join(parts)}")
            return all(stored.get(a.device_id, 0) >= want for a in self.agents)

        if self.opts.chaos:
            self.chaos_outcome = chaos.inject(self)
        self.wait(
            enough,
            120.0 + 2 * want / self.opts.eval_hz,
            f"{want} stored results per agent",
            component="results (agents -> broker -> ingest -> registry)",
            log=self.server.log_path if self.server else None,
            interval=1.0,
        )
        self.agents_on_release = self.on_release()
        self.pause_sources()
        self.drain()
        stored = self.stored_results()
        record.detail = (
            f"{sum(stored.values())} results on the release stored; "
            f"{self.agents_on_release}/{len(self.agents)} agents on it"
        )

    def pause_sources(self) -> None:
        """Slow every evaluation replay to one sample in 1000 s (the ``set-rate`` command)."""

        def pause(agent: AgentHandle) -> None:
            # Best effort: an answer that comes late (behind the agent's outbox backlog)
            # fails the command's --wait, not the pause; the counts are final after the
            # stop either way.
            with contextlib.suppress(StageError):
                self.pause_command(agent)

        self.board.update("pausing the evaluation replays (set-rate command)")
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(pause, self.agents))

    def pause_command(self, agent: AgentHandle) -> None:
        """``edgefl server command DEVICE set-rate`` slowing the agent's evaluation replay."""
        self.command(
            f"pause-{agent.device_id}",
            [
                "server",
                "command",
                agent.device_id,
                "set-rate",
                "--args",
                json.dumps({"rate_hz": 0.001, "source": "eval"}),
                "--wait",
                "--timeout",
                "20",
                "--config",
                str(self.server_config),
            ],
            component=f"agent {agent.device_id} (set-rate command)",
            timeout=120.0,
        )

    def drain(self) -> None:
        """Wait until every outbox is empty and the registry stored what they sent."""

        def drained() -> bool:
            depths = [
                int((self.agent_status(a).get("outbox") or {}).get("depth", -1))
                for a in self.agents
            ]
            self.board.update(f"draining the outboxes: {sum(max(d, 0) for d in depths)} queued")
            if any(d != 0 for d in depths):
                return False
            from edgefl.demo.figures import stored_records

            stored = stored_records(self.db_url, [a.device_id for a in self.agents])
            return sum(stored.values()) >= self.records_sent()

        # Best effort too: the counts that matter are taken after the stop.
        with contextlib.suppress(StageError):
            self.wait(
                drained,
                60.0,
                "the outboxes drained into the registry",
                component="ingest (records sent vs stored)",
                log=self.server.log_path if self.server else None,
                interval=1.0,
            )

    def records_sent(self) -> int:
        """Records the agents' outboxes committed and delivered (not dropped, not queued)."""
        return sum(self.sent_by_device().values())

    def sent_by_device(self) -> dict[str, int]:
        """Per agent: records its outbox committed and delivered.

        Each outbox numbers its records from 1 (``next_seq``); what it dropped or expired
        and what is still queued never reached the broker.
        """
        sent: dict[str, int] = {}
        for agent in self.agents:
            outbox = self.agent_status(agent).get("outbox") or {}
            committed = int(outbox.get("next_seq", 1)) - 1
            gone = int(outbox.get("dropped", 0)) + int(outbox.get("expired", 0))
            sent[agent.device_id] = committed - int(outbox.get("depth", 0)) - gone
        return sent

    # -- stage 9: report --------------------------------------------------------------

    def report(self, record: StageRecord, *, leftover: int) -> dict[str, Any]:
        """Write report.md and plots from the registry's figures (everything stopped).

        Returns:
            The ``--json`` summary.
        """
        from edgefl.demo.figures import read_figures
        from edgefl.demo.report import StageOutcome, write_report

        figures = read_figures(
            self.db_url,
            run_id=self.run_id,
            model=MODEL,
            release_version=int(self.release["version"]),
            devices=[a.device_id for a in self.agents],
        )
        self.figures = figures
        summary = self.summary(figures, leftover=leftover)
        path = write_report(
            self.out,
            figures=figures,
            stages=[StageOutcome(s.name, s.ok, s.wall_s, s.detail) for s in self.stages],
            summary=summary,
        )
        record.detail = str(path)
        return summary

    def summary(self, figures: Any, *, leftover: int | None) -> dict[str, Any]:
        """The ``--json`` object (leftover processes filled in after the stop)."""
        rounds = list(figures.rounds)
        version = int(self.release.get("version") or 0)
        by_device = self.sent_by_device()
        sent = sum(by_device.values())
        doc: dict[str, Any] = {
            "devices": self.opts.devices,
            "rounds": self.opts.rounds,
            "run_id": self.run_id,
            "final_accuracy": float(rounds[-1][1]) if rounds else 0.0,
            "epsilon_max": max(figures.epsilon_per_device.values(), default=0.0),
            "release_version": version,
            "agents_on_release": self.agents_on_release,
            "on_device_accuracy": figures.on_device_accuracy,
            "offload_fraction": figures.offload_fraction,
            "records": {
                "sent": sent,
                "stored": int(figures.records_stored),
                "duplicate_rows": int(figures.duplicate_rows),
                "sent_by_device": by_device,
                "stored_by_device": dict(figures.stored_by_device),
            },
            "stages": {s.name: {"ok": s.ok, "wall_s": round(s.wall_s, 2)} for s in self.stages},
            "wall_s": round(time.monotonic() - self.started_at, 2),
            "leftover_processes": leftover,
            "dashboard": self.dashboard,
            "out": str(self.out),
        }
        if self.opts.chaos:
            doc["chaos"] = self.chaos_outcome
        return doc

    # -- stopping ---------------------------------------------------------------------

    def stop_all(self, *, settle: bool = False) -> None:
        """Stop the agents, then the server (it stops its broker, SuperLink, services).

        With ``settle`` (the demo ran to the end), between the two the registry gets up to
        30 s to store what the stopped agents delivered as they left (their last reports),
        so that the final count compares finished outboxes with a finished registry.
        """
        procs = [a.proc for a in self.agents if a.proc is not None]
        procs += self.extra_procs
        for proc in procs:
            proc.signal_group(signal.SIGTERM)  # all at once; each stop then waits
        for proc in procs:
            # An agent stops its SuperNode (and its warm-start server) as it leaves, which
            # takes a while on a loaded machine: killed early, it would leave them running.
            with contextlib.suppress(Exception):
                code = proc.stop(grace=90.0)
                if code not in (0, None):
                    self.stop_codes[proc.name] = code
        if settle and self.server is not None and self.server.running():
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    from edgefl.demo.figures import stored_records

                    sent = self.sent_by_device()
                    stored = stored_records(self.db_url, list(sent))
                    if all(stored.get(d, 0) >= n for d, n in sent.items()):
                        break
                time.sleep(0.5)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop(grace=60.0)
        if self.relay is not None:
            self.relay.close()
        if self._registry_engine is not None:
            self._registry_engine.dispose()
            self._registry_engine = None

    def leftovers(self) -> list[int]:
        """PIDs of processes still running from the demo's folder (command line or cwd).

        Only what the demo can have started counts: processes that began after the demo
        did, never the demo itself or the processes it runs under (the user's shell may
        sit in the output folder, or name it on a wrapper's command line).
        """
        marker = str(self.out)
        mine = os.getpid()
        skip = {mine, *ancestors(mine)}
        began = start_ticks(mine) or 0
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            pid = int(entry.name)
            started = start_ticks(pid)
            if started is None or started <= began:
                continue
            try:
                line = " ".join(cmdline(pid))
                folder = cwd(pid)
            except Exception:  # gone meanwhile
                continue
            in_folder = folder is not None and str(folder).startswith(marker)
            if (marker in line or in_folder) and pid_alive(pid):
                found.append(pid)
        return found


def _bug(demo: Demo, exc: BaseException) -> StageError:
    """A failure of the demo's own code: the traceback goes to ``logs/demo.log``."""
    import traceback

    log = demo.logs / "demo.log"
    with log.open("a", encoding="utf-8") as fh:
        traceback.print_exception(exc, file=fh)
    return StageError("edgefl demo", f"{type(exc).__name__}: {str(exc).splitlines()[0]}", log)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "?"


def _address(value: Any) -> dict[str, Any]:
    """``{host, port}`` from what ``server start --json`` prints for an address."""
    if isinstance(value, Mapping):
        return {"host": value["host"], "port": int(value["port"])}
    host, _, port = str(value).rpartition(":")
    return {"host": host, "port": int(port)}


def run_demo(options: DemoOptions, *, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; the ``--json`` summary.

    Raises:
        DemoFailedError: A stage failed (its component, log line and log path in the
            message); everything the demo started was stopped first.
    """
    console = console or Console(stderr=True)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM stops the demo like Ctrl-C: through the clean stop, never around it.
        signal.signal(signal.SIGTERM, _interrupt)
    with Board(console, quiet=options.quiet) as board:
        demo = Demo(options, board)
        demo.prepare_out()
        failure: StageError | None = None
        summary: dict[str, Any] = {}
        served = False
        left: list[int] = []
        try:
            with demo.stage("cloud-model", "Cloud model") as rec:
                demo.cloud_model(rec)
            with demo.stage("server", "Start the server") as rec:
                demo.start_server(rec)
            if demo.dashboard:
                token_file = demo.out / "dashboard-token.txt"
                board.note(f"Dashboard: {demo.dashboard} (log in with the token in {token_file})")
                with ThreadPoolExecutor(1) as pool:
                    token_job = pool.submit(demo.dashboard_token)
                    with demo.stage("enroll", f"Enroll {options.devices} agents") as rec:
                        demo.enroll(rec)
                    token = token_job.result()
                if token:
                    path = demo.out / "dashboard-token.txt"
                    path.write_text(token + "\n")
                    path.chmod(0o600)
            else:
                with demo.stage("enroll", f"Enroll {options.devices} agents") as rec:
                    demo.enroll(rec)
            with demo.stage("collect", "Collect samples") as rec:
                demo.collect(rec)
            with demo.stage("train", f"Train ({options.rounds} DP rounds)") as rec:
                demo.train(rec)
            with demo.stage("release", "Release") as rec:
                demo.release_model(rec)
            with demo.stage("rollout", "Roll out (canary first)") as rec:
                demo.roll_out(rec)
            with demo.stage("serve", "Serve" + (" under chaos" if options.chaos else "")) as rec:
                demo.serve(rec)
            served = True
            if options.keep_running:
                board.note(
                    f"Everything keeps running (dashboard {demo.dashboard}); Ctrl-C stops it."
                )
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        demo.check_alive()
                        time.sleep(1.0)
        except StageError as exc:
            failure = exc
        except Exception as exc:  # a bug of the demo itself: still stop everything
            failure = _bug(demo, exc)
        finally:
            with demo.stage("stop", "Stop everything") as rec:
                demo.stop_all(settle=served and failure is None)
                left = demo.leftovers()
                what = {pid: " ".join(cmdline(pid)[:2])[-60:] for pid in left}
                for pid in left:  # ours: started from the demo's folder
                    end_process_group(pid, timeout=5.0)
                rec.detail = f"{len(left)} leftover processes" + (
                    f" ({what}, ended now)" if left else ""
                )
                if demo.stop_codes:
                    rec.detail += f"; exit codes {demo.stop_codes}"
            (demo.out / "stages.json").write_text(
                json.dumps(
                    {s.name: {"ok": s.ok, "wall_s": round(s.wall_s, 2)} for s in demo.stages},
                    indent=2,
                )
                + "\n"
            )
        if served and failure is None:
            try:
                with demo.stage("report", "Report") as rec:
                    summary = demo.report(rec, leftover=len(left))
                summary["stages"] = {
                    s.name: {"ok": s.ok, "wall_s": round(s.wall_s, 2)} for s in demo.stages
                }
                summary["wall_s"] = round(time.monotonic() - demo.started_at, 2)
                (demo.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            except Exception as exc:
                failure = _bug(demo, exc)
        if failure is not None:
            stage = next((s.name for s in demo.stages if not s.ok), "?")
            where = f"; full log: {failure.log}" if failure.log else ""
            raise DemoFailedError(
                f"stage {stage} failed: {failure.component}: {failure.line}{where}",
                hint=f"everything the demo started was stopped ({len(left)} leftover processes); "
                f"all logs are in {demo.logs}",
            )
    return summary
