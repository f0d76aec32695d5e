"""Build the wheel and run each role from a clean venv that has only its extra.

What a deployment installs is the wheel, not this source tree, so this is what CI runs
(``.ci/run``), in a temporary folder outside the repository:

1. ``python -m build --wheel`` on a copy of the tree (tracked and not-ignored files), and a
   look inside: the deployment configs, migrations, scenarios and protos must be there.
2. Two venvs with only the wheel and one extra each, pip pinned to the versions of
   ``.venv`` (a constraints file from its ``pip freeze``; torch 2.13.0 is the CPU build).
3. ``.[device]``: no torch; ``edgefl agent validate-config`` (also on the shipped
   ``agent.example.yaml``), ``edgefl agent predict`` on a small ``.tflite`` (converted
   with ``.venv``'s toolkit), results committed to the outbox, and ``edgefl agent run``
   delivering them to a plain local mosquitto.
4. ``.[server]``: ``edgefl server start`` (its mosquitto, nginx and SuperLink configs come
   from the wheel) with ε accounting beside it (``edgefl.privacy.epsilon_of``, the
   ServerApp's budget check), two devices enrolled and admitted, and ``edgefl server train`` of a
   two-round DP federated run. The devices (``edgefl agent run`` with their SuperNodes)
   come from ``.venv``: what is checked here is that the server side runs from the
   server-only venv.

Prints each step with its time and a summary; exits non-zero on the first failure.
Usage: ``.venv/bin/python scripts/wheel_check.py [--only server|device] [--keep]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Run by .venv's Python: the check uses the project's own process toolkit and test helpers.
from edgefl.process import ManagedProcess, ProcessNotReadyError, wait_until
from edgefl.testing import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
MAIN_BIN = ROOT / ".venv" / "bin"
DEVICES = 2
ROUNDS = 2
FLEET = "wheelcheck"

# Files a deployment needs, by their path in the wheel (globs).
WHEEL_MUST_HAVE = (
    "edgefl/deploy/mosquitto/edgefl.conf.template",
    "edgefl/deploy/mosquitto/acl",
    "edgefl/deploy/nginx/fleet-proxy.conf.template",
    "edgefl/deploy/systemd/edgefl-agent.service",
    "edgefl/deploy/agent.example.yaml",
    "edgefl/server/registry/migrations/env.py",
    "edgefl/server/registry/migrations/script.py.mako",
    "edgefl/server/registry/migrations/versions/0001_initial.py",
    "edgefl/simulations/scenarios/quick.toml",
    "edgefl/proto/envelope.proto",
    "edgefl/proto/inference.proto",
    "edgefl/proto/envelope_pb2.py",
)


class CheckFailedError(Exception):
    """A step of the check did not hold."""


class Steps:
    """Prints each step as it starts and its time when it ends; keeps them for the summary."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []
        self.start = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the step ``name``."""
        print(f"wheel-check: {name} ...", flush=True)
        began = time.monotonic()
        yield
        took = time.monotonic() - began
        self.done.append((name, took))
        print(f"wheel-check: {name}: ok ({took:.1f} s)", flush=True)

    def summary(self) -> str:
        """Each step's time and the total, one per line."""
        width = max(len(name) for name, _ in self.done) if self.done else 0
        lines = [f"  {name:<{width}}  {took:6.1f} s" for name, took in self.done]
        total = time.monotonic() - self.start
        return "\n".join(["wheel-check: summary", *lines, f"  {'total':<{width}}  {total:6.1f} s"])


class Children:
    """The long-running processes of the check (``edgefl.process``), stopped at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[ManagedProcess] = []

    def start(self, name: str, argv: list[str]) -> ManagedProcess:
        """Start ``argv`` in its own process group, its output in ``<work>/<name>.log``."""
        proc = ManagedProcess(argv, self.work / f"{name}.log", name=name)
        proc.start()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process still running, newest first."""
        for proc in reversed(self.procs):
            proc.stop(grace=30.0)
        self.procs.clear()


def exited(proc: ManagedProcess) -> CheckFailedError:
    """The failure of a process that exited too early, with the end of its log."""
    return CheckFailedError(f"{proc.name} exited {proc.returncode}:\n{proc.tail()[-3000:]}")


def run(args: list[str], *, timeout: float = 300.0, env: dict[str, str] | None = None) -> str:
    """Run a command to completion; its stdout. Raises CheckFailedError on a non-zero exit."""
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if proc.returncode != 0:
        raise CheckFailedError(
            f"{' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stderr[-4000:]}{proc.stdout[-2000:]}"
        )
    return proc.stdout


def run_json(args: list[str], *, timeout: float = 300.0) -> dict[str, Any]:
    """Run an ``edgefl ... --json`` command; its JSON answer (all it prints on stdout)."""
    doc: dict[str, Any] = json.loads(run([*args, "--json"], timeout=timeout))
    return doc


def scratch_parent() -> str | None:
    """Where the venvs go: tmpfs when it has room, else the system's temp folder.

    Writing, and deleting, the 1 GB of a torch venv takes about a minute each way on this
    machine's disk, and seconds in memory.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 6 << 30:
        return str(shm)
    return None


# --- build -----------------------------------------------------------------------------


def source_files(root: Path) -> list[str]:
    """The files a checkout holds: tracked ones and new ones git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def build_wheel(root: Path, work: Path) -> Path:
    """Build the wheel from a copy of the tree (no build/ or egg-info left in it)."""
    src = work / "src"
    for name in source_files(root):
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest)
    dist = work / "dist"
    run(
        [str(MAIN_BIN / "python"), "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
        timeout=600,
    )
    wheels = sorted(dist.glob("edgefl-*.whl"))
    if len(wheels) != 1:
        raise CheckFailedError(f"expected one wheel in {dist}, found {wheels}")
    return wheels[0]


def wheel_contents(wheel: Path) -> dict[str, int]:
    """Check the wheel carries what a deployment needs; file counts by kind."""
    names = zipfile.ZipFile(wheel).namelist()
    missing = [must for must in WHEEL_MUST_HAVE if must not in names]
    if missing:
        raise CheckFailedError(f"{wheel.name} lacks {missing}")
    return {
        "files": len(names),
        "python modules": sum(n.endswith(".py") for n in names),
        "deploy files": sum(n.startswith("edgefl/deploy/") for n in names),
        "migrations": sum("/migrations/versions/0" in n for n in names),
        "scenarios": sum(n.startswith("edgefl/simulations/scenarios/") for n in names),
        "protos": sum(n.endswith(".proto") for n in names),
    }


# --- venvs -----------------------------------------------------------------------------


def constraints_file(work: Path) -> Path:
    """Pins from ``.venv`` so the clean venvs resolve to the versions CI tests."""
    frozen = run([str(MAIN_BIN / "python"), "-m", "pip", "freeze", "--exclude-editable"])
    pins = [line for line in frozen.splitlines() if "==" in line and " @ " not in line]
    path = work / "constraints.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


def make_venv(path: Path, wheel: Path, extra: str, constraints: Path) -> Path:
    """A venv holding only the wheel with ``extra``; its bin folder.

    ``.venv``'s pip installs into it (``--python``), so the venv needs no pip of its own;
    ``--no-compile`` skips byte-compiling torch, most of the install time.
    """
    base = subprocess.run(
        [str(MAIN_BIN / "python"), "-c", "import sys; print(sys._base_executable)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    run([base, "-m", "venv", "--without-pip", str(path)])
    run(
        [
            str(MAIN_BIN / "python"),
            "-m",
            "pip",
            "--python",
            str(path / "bin" / "python"),
            "install",
            "--quiet",
            "--no-compile",
            "--constraint",
            str(constraints),
            f"{wheel}[{extra}]",
        ],
        timeout=900,
    )
    return path / "bin"


# --- device ----------------------------------------------------------------------------


def make_tflite(work: Path) -> tuple[Path, Path]:
    """A small ``.tflite`` and an input batch, made with ``.venv``'s toolkit."""
    model, batch = work / "tiny.tflite", work / "batch.npy"
    code = (
        "import sys, numpy as np, torch, litert_torch\n"
        "torch.manual_seed(0)\n"
        "net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()\n"
        "litert_torch.convert(net, (torch.randn(1, 1, 8, 8),)).export(sys.argv[1])\n"
        "np.save(sys.argv[2], np.random.default_rng(0).random((4, 1, 8, 8), np.float32))\n"
    )
    run([str(MAIN_BIN / "python"), "-c", code, str(model), str(batch)], timeout=300)
    return model, batch


class Collector:
    """Counts the messages a plain paho subscriber receives on one topic filter."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topics: list[str] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"wheel-check-{port}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.topics.append(str(msg.topic))

    def count(self, suffix: str) -> int:
        """How many messages came on topics with ``/suffix/`` in them."""
        with self._lock:
            return sum(1 for topic in self.topics if f"/{suffix}/" in topic)

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def device_checks(
    bin_dir: Path, work: Path, steps: Steps, children: Children, tflite: tuple[Path, Path]
) -> None:
    """The agent from the ``.[device]`` venv: no torch; config, predict, run."""
    python, edgefl = str(bin_dir / "python"), str(bin_dir / "edgefl")
    with steps("device: torch, flwr and opacus are absent"):
        code = (
            "import importlib.util as u\n"
            "found = [m for m in ('torch', 'flwr', 'opacus', 'sqlalchemy') if u.find_spec(m)]\n"
            "assert not found, found\n"
            "import ai_edge_litert, paho.mqtt, grpc\n"
        )
        run([python, "-c", code])

    state = work / "device-state"
    broker = Mosquitto(work / "device-broker")
    broker.start()
    try:
        config = work / "device-agent.yaml"
        config.write_text(
            json.dumps(
                {
                    "device_id": "pi-01",
                    "fleet": FLEET,
                    "state_dir": str(state),
                    "mqtt": {"host": "127.0.0.1", "port": broker.port},
                    "sources": [],
                    "status_interval_s": 1.0,
                }
            )
        )
        with steps("device: edgefl agent validate-config (the shipped example, this config)"):
            find = "from edgefl.resources import deploy_path as d; print(d('agent.example.yaml'))"
            example = run([python, "-c", find]).strip()
            if "site-packages" not in example:
                raise CheckFailedError(f"the example was found outside the wheel: {example}")
            for path in (example, str(config)):
                checked = run_json([edgefl, "agent", "validate-config", "--config", path])
                if not checked["valid"]:
                    raise CheckFailedError(f"validate-config {path}: {checked}")
        model, batch = tflite
        with steps("device: edgefl agent predict (ai-edge-litert, results to the outbox)"):
            report = run_json(
                [
                    edgefl,
                    "agent",
                    "predict",
                    "--input",
                    str(batch),
                    "--mode",
                    "local",
                    "--model-dir",
                    str(model),
                    "--config",
                    str(config),
                ]
            )
            committed = int(report["outbox"]["committed"])
            if committed != 4 or any(row["source"] != "local" for row in report["results"]):
                raise CheckFailedError(f"predict answered {report}")
        with steps("device: edgefl agent run delivers the outbox to mosquitto"):
            collector = Collector(broker.port, f"edgefl/{FLEET}/pi-01/#")
            try:
                agent = children.start(
                    "device-agent", [edgefl, "agent", "run", "--config", str(config)]
                )

                def delivered() -> bool:
                    if agent.poll() is not None:
                        raise exited(agent)
                    return collector.count("result") >= committed

                wait_until(delivered, 60, f"{committed} results from the agent", interval=0.2)
                if agent.stop(grace=30.0) != 0:
                    raise exited(agent)
            finally:
                collector.close()
    finally:
        broker.kill()


# --- server ----------------------------------------------------------------------------


def _address(value: Any) -> dict[str, Any]:
    """``{host, port}`` from what ``server start --json`` prints for an address."""
    if isinstance(value, dict):
        return {"host": value["host"], "port": int(value["port"])}
    host, _, port = str(value).rpartition(":")
    return {"host": host, "port": int(port)}


def _agent_config(work: Path, i: int, info: dict[str, Any]) -> Path:
    from edgefl.enrollment import IdentityPaths

    state = work / f"agent{i}"
    ident = IdentityPaths(state)
    path = work / f"agent{i}.json"
    path.write_text(
        json.dumps(
            {
                "device_id": f"dev-{i}",
                "fleet": FLEET,
                "state_dir": str(state),
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": int(info["broker"]["port"]),
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
                        "rate_hz": 200,
                        "partition": i,
                        "num_partitions": DEVICES,
                        "limit": 300,
                    }
                ],
                "training": {"superlink": _address(info["superlink"]), "min_samples": 200},
            }
        )
    )
    return path


PLAN = f"""\
# Two devices, {ROUNDS} DP rounds of the digits MLP: the shortest run that aggregates twice.
name = "wheel-check"
dataset = "digits"
model = "digits-mlp"
num_devices = {DEVICES}
rounds = {ROUNDS}
lr = 0.3
min_available_nodes = {DEVICES}
min_train_nodes = {DEVICES}
node_wait_s = 120
round_timeout_s = 240

[dp]
enabled = true
target_epsilon = 8.0
delta = 1e-5
"""


def server_checks(bin_dir: Path, work: Path, steps: Steps, children: Children) -> None:
    """The server side of a DP federated run from the ``.[server]`` venv."""
    python, edgefl = str(bin_dir / "python"), str(bin_dir / "edgefl")
    agent_cli = str(MAIN_BIN / "edgefl")
    # The ServerApp's budget check, on its own: it runs beside the server's start.
    code = (
        "import importlib.util as u\n"
        "assert u.find_spec('ai_edge_litert') is None\n"
        "from edgefl.privacy import epsilon_of\n"
        "eps = epsilon_of([[1.1, 0.01, 500]], 1e-5)\n"
        "assert 0 < eps < 10, eps\n"
        "print(eps)\n"
    )
    accounting = subprocess.Popen(
        [python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    config = work / "server.json"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(work / "server"),
                "superlink": {"port": free_port()},
                "broker": {"port": free_port()},
            }
        )
    )
    with steps("server: edgefl server start (configs from the wheel)"):
        server = children.start(
            "server", [edgefl, "server", "start", "--config", str(config), "--json"]
        )
        # Ready: the one JSON line it prints (its progress lines go to the same log).
        ready = server.wait_for_log(re.compile(r"^\{.*\}$", re.MULTILINE), 180, interval=0.2)
        info: dict[str, Any] = json.loads(ready.group(0))
    with steps("server: ε accounting (edgefl.privacy.epsilon_of) without the device stack"):
        out, err = accounting.communicate(timeout=300)
        if accounting.returncode != 0:
            raise CheckFailedError(f"epsilon_of in the server venv: {err[-3000:]}")
        print(f"wheel-check: ε of 500 steps at σ=1.1, q=0.01: {float(out):.2f}", flush=True)

    agents: list[ManagedProcess] = []
    configs = [_agent_config(work, i, info) for i in range(DEVICES)]
    with steps(f"server: {DEVICES} devices enrolled, admitted, running (.venv agents)"):
        for i, agent_config in enumerate(configs):
            request = run_json([agent_cli, "agent", "enroll", "--config", str(agent_config)])
            bundle = work / f"bundle{i}.json"
            run_json(
                [
                    edgefl,
                    "server",
                    "admit",
                    str(request["request"]),
                    "--out",
                    str(bundle),
                    "--config",
                    str(config),
                ]
            )
            install = ["--install", str(bundle)]
            run_json([agent_cli, "agent", "enroll", "--config", str(agent_config), *install])
            agents.append(
                children.start(
                    f"agent{i}", [agent_cli, "agent", "run", "--config", str(agent_config)]
                )
            )

        def supernodes_up() -> bool:
            for proc in [server, *agents]:
                if proc.poll() is not None:
                    raise exited(proc)
            for agent_config in configs:
                status = run_json([agent_cli, "agent", "status", "--config", str(agent_config)])
                supernode = (status.get("training") or {}).get("supernode") or {}
                if not (
                    status["connected"]
                    and supernode["state"] == "running"
                    and supernode.get("node_id")
                ):
                    return False
            return True

        wait_until(supernodes_up, 180, "connected agents with their SuperNode", interval=1.0)

    plan = work / "plan.toml"
    plan.write_text(PLAN)
    wait = ["--run-id", "wheel-check", "--wait", "--poll-s", "2"]
    with steps(f"server: edgefl server train, {ROUNDS} DP rounds"):
        result = run_json(
            [edgefl, "server", "train", "--plan", str(plan), "--config", str(config), *wait],
            timeout=600,
        )
        rounds = result["result"]["rounds"]
        epsilons = result["result"]["epsilon_per_device"]
        if (
            result["flower_status"] != "finished:completed"
            or [r["round"] for r in rounds] != list(range(1, ROUNDS + 1))
            or any(r["num_replies"] != DEVICES for r in rounds)
            or sorted(epsilons) != [f"dev-{i}" for i in range(DEVICES)]
            or not all(0 < eps <= 8.0 for eps in epsilons.values())
        ):
            raise CheckFailedError(f"the run did not complete as planned: {result}")
        accuracy = ", ".join(f"{r['accuracy']:.2f}" for r in rounds)
        eps = ", ".join(f"{d} {e:.2f}" for d, e in sorted(epsilons.items()))
        print(f"wheel-check: accuracy per round {accuracy}; ε {eps}", flush=True)

    with steps("server: SIGTERM stops the agents and the server"):
        for proc in [*agents, server]:
            proc.signal_group(signal.SIGTERM)  # all at once; each stop then waits
        for agent in agents:
            agent.stop(grace=60.0)
        if server.stop(grace=60.0) != 0:
            raise exited(server)


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 when every step held."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--only", choices=["server", "device"], help="Check one role only.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = parser.parse_args(argv)

    steps = Steps()
    work = Path(tempfile.mkdtemp(prefix="edgefl-wheel-check-", dir=scratch_parent()))
    children = Children(work)
    try:
        with steps("build the wheel (python -m build --wheel)"):
            wheel = build_wheel(ROOT, work)
            contents = wheel_contents(wheel)
        print(f"wheel-check: {wheel.name}: {contents}", flush=True)
        constraints = constraints_file(work)
        if args.only != "server":
            with ThreadPoolExecutor(1) as pool:
                # Converting the test model takes a while: it runs beside the install.
                tflite = pool.submit(make_tflite, work)
                with steps("device venv: pip install 'edgefl-*.whl[device]' (+ a .tflite)"):
                    device_bin = make_venv(work / "venv-device", wheel, "device", constraints)
                    model = tflite.result()
            device_checks(device_bin, work, steps, children, model)
        if args.only != "device":
            with steps("server venv: pip install 'edgefl-*.whl[server]'"):
                server_bin = make_venv(work / "venv-server", wheel, "server", constraints)
            server_checks(server_bin, work, steps, children)
    except Exception as exc:
        if not isinstance(exc, CheckFailedError | ProcessNotReadyError | TimeoutError):
            traceback.print_exc()
        print(f"wheel-check: FAILED: {exc}", file=sys.stderr, flush=True)
        print(f"wheel-check: logs in {work}", file=sys.stderr, flush=True)
        args.keep = True
        return 1
    finally:
        children.stop_all()
        print(steps.summary(), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
