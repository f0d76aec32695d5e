"""From a federated run to a signed model on every device: releases, delivery, faults.

Run from the repository root::

    .venv/bin/python benchmarks/release_bench.py --json [--agents 10] [--rounds 20] [--quick]

1. **Releases.** One DP federated run of ``digits-mlp``, the shipped scenario
   ``simulations/scenarios/digits-noniid-dp.toml`` (20 devices, Dirichlet α=0.5, DP-SGD
   ε=8, δ=1e-5; ``--rounds``, default its 30), and one short run of ``digits-cnn`` (2
   devices, no DP, ``--cnn-rounds``) on Flower's simulation engine, each recorded in the
   server's registry; then a release of each through
   :func:`edgefl.server.releases.create_release` (the code behind ``edgefl server
   release``, held-out calibration), signed with the server's release key. A release is
   all or nothing: when a variant fails verification the release is refused (recorded as
   failed); the bench then releases again without the refused variants and names them on
   stderr. The release's accuracy gate (its default, 1.5 points against the float model)
   leaves out the variants that lose more: the contract's ``variants`` are the published
   ones, and ``left_out`` (an addition to the contract) lists the others with their drop,
   so the "smallest variant" figure is the smallest *published* one. A run without DP
   carries no guarantee: its ``epsilon_max`` and ``delta`` are null. The mlp recipes
   include ``pruned40-int8`` and ``pruned25-int8-wo`` beside ``pruned50-int8``: on a
   64-16-10 MLP, halving the hidden layer costs a few points.
2. **Delivery.** A real ``edgefl server start`` (broker, SuperLink, ``Models`` service) on
   free loopback ports; ``--agents`` ``edgefl agent run`` processes, each enrolled through
   the real path (``agent enroll`` → ``server admit`` → ``agent enroll --install``, which
   pins the release-signing key) with ``models.enabled: true`` and the default health
   window. The fleet first runs an older release (the mlp run's mid-way checkpoint, fp32,
   released first so its version is lower); then ``edgefl server deploy digits-mlp
   VERSION --variant SMALLEST --fleet`` publishes the signed desired state of the final
   release's smallest variant, and each agent's time is from the start of that command (so
   it includes the command's own start-up: an upper bound) until its model status file
   reports the version running. The agents reach the ``Models`` service through a counting
   TCP relay: ``bytes_per_agent`` is what the service sent on the wire during the update
   (TLS handshake, gRPC framing, manifest with its golden vectors, artifact) over agents.
3. **Tamper.** Each tampered case of :data:`edgefl.release_tamper.ATTACKS` (the cases
   ``tests/security/test_tampered_release.py`` runs too) is applied to the real mlp
   release's fp32 and fp16 files through the real
   :class:`~edgefl.edge_agent.models.manager.ModelManager`
   (:func:`edgefl.release_tamper.run_tamper_case`): ``refused`` when the manager reports
   a failure with a reason while the installed v1 keeps serving, byte for byte, also
   after a restart. The bench needs no test framework: nothing here imports ``tests/``.
4. **kill -9.** :func:`model_store_bench.run_kill_trials` (``--kill-trials``, ≥ 20).
5. **Resume.** An enrolled device's identity downloads the cnn fp32 artifact over mutual
   TLS through a relay that resets the connection half-way; the download resumes from the
   partial file. ``bytes_moved`` is what the relay carried towards the device over both
   connections (wire bytes, handshakes included), against ``artifact_bytes``.

Progress goes to stderr; ``--json`` prints only the output contract on stdout::

    {"releases": {MODEL: {"version", "variants": {NAME: {"size_bytes", "accuracy"}},
                          "float_accuracy", "epsilon_max", "delta",
                          "max_accuracy_drop", "left_out": {NAME: {"size_bytes",
                          "accuracy", "accuracy_drop", "reason"}}}},
     "delivery": {"agents", "converged", "p50_s", "max_s", "bytes_per_agent"},
     "tamper": {CASE: "refused" | "accepted"},
     "kill9": {"trials", "half_installed"},
     "resume": {"artifact_bytes", "bytes_moved"}}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model_store_bench import run_kill_trials  # noqa: E402

from edgefl.config import Address  # noqa: E402
from edgefl.process import ManagedProcess  # noqa: E402
from edgefl.testing import CuttingRelay, edgefl_executable, free_port  # noqa: E402

MLP = "digits-mlp"
CNN = "digits-cnn"
FLEET = "bench"
DEVICE_CLASS = "generic"
RUNTIME = "ai-edge-litert"
MLP_RECIPES = (
    "fp32",
    "fp16",
    "int8-wo",
    "int8",
    "pruned25-int8-wo",
    "pruned40-int8",
    "pruned50-int8",
)
CNN_RECIPES = ("fp32", "fp16", "int8", "pruned50-int8", "pruned75-int8")
SCENARIO = ROOT / "simulations" / "scenarios" / "digits-noniid-dp.toml"
START = time.monotonic()


def log(message: str) -> None:
    """One progress line on stderr."""
    print(
        f"[release-bench {time.monotonic() - START:6.1f}s] {message}", file=sys.stderr, flush=True
    )


def run_cli(*args: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``edgefl ARGS`` and parse the JSON it prints."""
    proc = subprocess.run(
        [edgefl_executable(), *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"edgefl {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


# --- 1. releases ---------------------------------------------------------------------------


def _plan(model: str, rounds: int) -> Any:
    """The plan of a run: the shipped DP scenario for the mlp, a short plain run for the cnn."""
    from edgefl.federation import load_plan

    if model == MLP:
        doc = tomllib.loads(SCENARIO.read_text())
        doc.pop("simulation", None)
        return load_plan({**doc, "rounds": rounds})
    return load_plan(
        {
            "dataset": "digits",
            "model": model,
            "num_devices": 2,
            "dirichlet_alpha": 1.0,
            "rounds": rounds,
            "batch_size": 16,
            "lr": 0.05,
            "min_available_nodes": 2,
            "min_train_nodes": 2,
            "min_evaluate_nodes": 0,
            "node_wait_s": 60,
            "dp": {"enabled": False},
        }
    )


def train(db_url: str, model: str, rounds: int) -> str:
    """A federated run of ``model`` in simulation, recorded in the registry; its run id."""
    from edgefl.server.fl import run_simulation

    run_id = f"bench-{model}"
    began = time.monotonic()
    plan = _plan(model, rounds)
    result = run_simulation(plan, registry_url=db_url, run_id=run_id)
    log(
        f"{model}: {result.rounds_trained} rounds on {plan.num_devices} simulated devices "
        f"({'DP-SGD' if plan.dp.enabled else 'no DP'}) in {time.monotonic() - began:.0f}s"
    )
    if result.rounds_trained < rounds:
        # Releasing an untrained model would measure nothing (its accuracy is chance).
        raise RuntimeError(
            f"{model}: trained {result.rounds_trained} of {rounds} rounds; see the "
            "simulation's errors above"
        )
    return run_id


def make_release(
    db_url: str,
    state: Path,
    run_id: str,
    recipes: Sequence[str],
    *,
    round_: int | None = None,
) -> dict[str, Any]:
    """A published release of the run (the outcome's dict), without the refused variants.

    The release's accuracy gate (default limit) leaves out variants too far below the
    float model; they stay in ``variants`` with the status ``accuracy_drop``.
    """
    from edgefl.server.releases import ReleaseRequest, create_release

    wanted = list(recipes)
    refused: dict[str, list[str]] = {}
    while True:
        began = time.monotonic()
        outcome = create_release(
            db_url,
            state / "releases",
            state / "ca",
            ReleaseRequest(
                run_id=run_id, round=round_, recipes=wanted, by="release-bench", bench_iters=10
            ),
        ).to_dict()
        variants: dict[str, dict[str, Any]] = outcome["variants"]
        log(
            f"{outcome['model']} release v{outcome['version']} (round {outcome['round']}): "
            f"{outcome['status']} in {time.monotonic() - began:.0f}s; "
            + ", ".join(
                f"{n} {v['size_bytes']} B acc {v['accuracy']} "
                f"(drop {v['accuracy_drop']} pts) {v['status']}"
                for n, v in variants.items()
            )
        )
        if outcome["status"] == "published":
            break
        failed = [n for n, v in variants.items() if not v["passed"]]
        refused.update({n: variants[n]["reasons"] for n in failed})
        wanted = [n for n in wanted if n not in failed]
        if not failed or not wanted:
            raise RuntimeError(f"{run_id}: no release could be published: {outcome['reasons']}")
    for name, reasons in refused.items():
        log(f"{outcome['model']}: variant {name} refused by verification: {'; '.join(reasons)}")
    for name, v in variants.items():
        if v["status"] == "accuracy_drop":
            log(f"{outcome['model']}: variant {name} left out: {'; '.join(v['reasons'])}")
    outcome["refused"] = refused
    return outcome


def published(outcome: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The release's published variants (not those the accuracy gate left out)."""
    return {n: v for n, v in outcome["variants"].items() if v["status"] == "published"}


def release_figures(outcome: dict[str, Any]) -> dict[str, Any]:
    """The output contract's entry for one release.

    ``variants`` are the published ones; ``left_out`` (beside the contract's keys) the
    ones the accuracy gate left out, with their drop in points against the float model.
    """
    privacy = outcome["privacy"]
    return {
        "version": int(outcome["version"]),
        "variants": {
            name: {"size_bytes": int(v["size_bytes"]), "accuracy": float(v["accuracy"])}
            for name, v in published(outcome).items()
        },
        "float_accuracy": float(outcome["float_accuracy"]),
        # A run without DP carries no guarantee: null, not a misleading 0.
        "epsilon_max": None if privacy["epsilon_max"] is None else float(privacy["epsilon_max"]),
        "delta": None if privacy["delta"] is None else float(privacy["delta"]),
        "max_accuracy_drop": outcome["max_accuracy_drop"],
        "left_out": {
            name: {
                "size_bytes": int(v["size_bytes"]),
                "accuracy": float(v["accuracy"]),
                "accuracy_drop": float(v["accuracy_drop"]),
                "reason": "accuracy_drop",
            }
            for name, v in outcome["variants"].items()
            if v["status"] == "accuracy_drop"
        },
    }


# --- 2. delivery ---------------------------------------------------------------------------


def write_server_config(work: Path) -> Path:
    """A server config on free loopback ports, its registry in its state folder."""
    state = work / "server"
    config = work / "server.json"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(state),
                "db_url": f"sqlite:///{state / 'registry.db'}",
                "superlink": {"port": free_port()},
                "broker": {"port": free_port()},
                "models": {"port": free_port()},
            }
        )
    )
    return config


def start_server(work: Path, config: Path) -> tuple[ManagedProcess, dict[str, Any]]:
    """``edgefl server start --json``; its ready line."""
    server = ManagedProcess(
        [edgefl_executable(), "server", "start", "--config", str(config), "--json"],
        work / "server.log",
    )
    server.start()
    ready = server.wait_for_log(re.compile(r"^\{.*\}$", re.MULTILINE), 180, interval=0.2)
    info: dict[str, Any] = json.loads(ready.group(0))
    return server, info


def agent_config(work: Path, i: int, broker_port: int, models_port: int) -> Path:
    """An agent with model updates on; TLS is its enrolled identity."""
    from edgefl.enrollment import IdentityPaths

    state = work / f"agent{i}"
    ident = IdentityPaths(state)
    path = work / f"agent{i}.json"
    path.write_text(
        json.dumps(
            {
                "device_id": f"dev-{i:02d}",
                "fleet": FLEET,
                "state_dir": str(state),
                "status_interval_s": 0.5,
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": broker_port,
                    "tls": {
                        "ca_file": str(ident.ca),
                        "cert_file": str(ident.cert),
                        "key_file": str(ident.tls_key),
                    },
                },
                "models": {
                    "enabled": True,
                    "server": {"host": "127.0.0.1", "port": models_port},
                    "device_class": DEVICE_CLASS,
                    "runtime": RUNTIME,
                },
            }
        )
    )
    return path


def enroll(work: Path, server_config: Path, i: int, config: Path) -> None:
    """The real admit path: request, admit on the server, install the bundle."""
    request = run_cli("agent", "enroll", "--config", str(config), "--json")
    bundle = work / f"bundle{i}.json"
    admit = ["--out", str(bundle), "--config", str(server_config), "--json"]
    run_cli("server", "admit", str(request["request"]), *admit)
    run_cli("agent", "enroll", "--config", str(config), "--install", str(bundle), "--json")


def _agent_status(state: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((state / "agent-status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return doc


def _outcome(state: Path, version: int) -> str | None:
    """``running`` once the agent runs ``version``; the reason when it refused or rolled it back."""
    from edgefl.edge_agent.models.manager import read_model_status

    reported = read_model_status(state).get("reported") or {}
    if reported.get("state") == "running" and reported.get("version") == version:
        return "running"
    failure = reported.get("last_failure") or {}
    if failure.get("version") == version:
        return f"{reported.get('state')}: {failure.get('reason')} ({failure.get('detail')})"
    return None


def _times(times: dict[int, float]) -> str:
    return ", ".join(f"{t:.2f}" for t in sorted(times.values())) + " s after deploy started"


def deploy_and_wait(
    server_config: Path, states: list[Path], version: int, variant: str, timeout_s: float
) -> tuple[dict[int, float], dict[str, Any]]:
    """``edgefl server deploy digits-mlp VERSION --fleet``; seconds until each agent runs it.

    Timed from the start of the command (its own start-up included) while it runs.
    """
    where = ["--fleet", "--config", str(server_config), "--json"]
    argv = ["server", "deploy", MLP, str(version), "--variant", variant, *where]
    published = time.monotonic()
    deploy = subprocess.Popen(
        [edgefl_executable(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    times: dict[int, float] = {}
    failed: dict[int, str] = {}
    deadline = published + timeout_s
    while len(times) + len(failed) < len(states) and time.monotonic() < deadline:
        for i, state in enumerate(states):
            if i in times or i in failed:
                continue
            outcome = _outcome(state, version)
            if outcome == "running":
                times[i] = time.monotonic() - published
            elif outcome is not None:
                failed[i] = outcome
        if deploy.poll() is not None and deploy.returncode != 0:
            break
        time.sleep(0.05)
    out, err = deploy.communicate(timeout=60)
    if deploy.returncode != 0:
        raise RuntimeError(f"server deploy failed: {err[-2000:]!r}")
    deployed: dict[str, Any] = json.loads(out)
    log(
        f"deployed {MLP} v{version} ({variant}) to {len(deployed['topics'])} devices, "
        f"{deployed['size_bytes']} B, key {deployed['key_id']}"
    )
    for i, why in sorted(failed.items()):
        log(f"agent {i} does not run v{version}: {why}")
    return times, deployed


def measure_delivery(
    work: Path,
    server_config: Path,
    info: dict[str, Any],
    agents: int,
    version: int,
    variant: str,
    timeout_s: float,
    previous: int | None = None,
) -> dict[str, Any]:
    """Enroll and run ``agents`` agents; deploy ``previous`` fleet-wide and wait for it, then
    deploy ``version`` (both ``variant``) and time the update."""
    broker_port = int(info["broker"]["port"]) if isinstance(info["broker"], dict) else 0
    if not broker_port:
        broker_port = int(str(info["broker"]).rpartition(":")[2])
    models_port = json.loads(server_config.read_text())["models"]["port"]
    procs: list[ManagedProcess] = []
    states = [work / f"agent{i}" for i in range(agents)]
    with CuttingRelay(models_port, cut_after=None) as relay:
        try:
            began = time.monotonic()
            configs = [agent_config(work, i, broker_port, relay.port) for i in range(agents)]
            for i, config in enumerate(configs):
                enroll(work, server_config, i, config)
            log(f"{agents} agents enrolled and admitted in {time.monotonic() - began:.0f}s")
            for i, config in enumerate(configs):
                proc = ManagedProcess(
                    [edgefl_executable(), "agent", "run", "--config", str(config)],
                    work / f"agent{i}.log",
                )
                proc.start()
                procs.append(proc)
            deadline = time.monotonic() + 180
            while not all(_agent_status(s).get("connected") for s in states):
                for proc in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"an agent exited: {proc.log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the agents did not all connect in 180 s")
                time.sleep(0.5)
            log(f"{agents} agents connected")
            if previous is not None:
                first, _ = deploy_and_wait(server_config, states, previous, variant, timeout_s)
                log(f"v{previous} ({variant}) first installed in " + _times(first))
            before = relay.downstream
            times, _ = deploy_and_wait(server_config, states, version, variant, timeout_s)
            moved = relay.downstream - before
        finally:
            for proc in procs:
                proc.stop(grace=30.0)
    converged = sorted(times.values())
    log(f"{len(converged)}/{agents} agents run v{version} ({variant}) " + _times(times))
    return {
        "agents": agents,
        "converged": len(converged),
        "p50_s": round(statistics.median(converged), 2) if converged else -1.0,
        "max_s": round(max(converged), 2) if converged else -1.0,
        "bytes_per_agent": round(moved / agents, 1),
    }


# --- 3. tamper -----------------------------------------------------------------------------


def _tamper_fleet(root: Path, built: Any) -> Any:
    """The tamper cases' fleet, with the device's real model manager (as the test's)."""
    from edgefl.edge_agent.models.manager import FolderSource, ModelManager, ModelsConfig
    from edgefl.release_tamper import DEVICE, FLEET, ReleaseFleet

    class Fleet(ReleaseFleet):
        def manager(self, **config: object) -> ModelManager:
            return ModelManager(
                ModelsConfig.model_validate(self.manager_settings(**config)),
                state_dir=self.state_dir,
                trust=self.trust_store(),
                source=FolderSource(self.releases),
                device_id=DEVICE,
                fleet=FLEET,
                publish=self.reports.append,
                clock=lambda: self.clock,
            )

    return Fleet(root, built)


def measure_tamper(work: Path, release_dir: Path) -> dict[str, str]:
    """Every tampered case through the real manager, on the real release's files."""
    from edgefl.manifest import read_manifest
    from edgefl.release_tamper import ATTACKS, Built, run_tamper_case

    built = Built(
        {
            name: (
                release_dir / f"{name}.tflite",
                read_manifest(release_dir / f"{name}.manifest.json"),
            )
            for name in ("fp32", "fp16")
        }
    )
    results: dict[str, str] = {}
    for case in sorted(ATTACKS):
        trial = run_tamper_case(_tamper_fleet(work / case, built), case)
        results[case] = "refused" if trial.refused else "accepted"
        if trial.reason != trial.expected:
            log(f"tamper {case}: refused for {trial.reason}, not the expected {trial.expected}")
        kept = "kept" if trial.kept_installed and trial.kept_bytes else "NOT kept"
        log(
            f"tamper {case}: {results[case]} (reason {trial.reason}, expected "
            f"{trial.expected}; v1 {kept}, v{trial.restarted_version} after a restart)"
        )
    return results


# --- 5. resume -----------------------------------------------------------------------------


def measure_resume(work: Path, state: Path, device_state: Path, models_port: int) -> dict[str, int]:
    """Download the cnn fp32 artifact, cut half-way, resumed: wire bytes against its size."""
    from edgefl.config import TlsFiles
    from edgefl.edge_agent.models.download import DownloadError, download_artifact
    from edgefl.enrollment import IdentityPaths
    from edgefl.manifest import read_manifest

    folder = max((state / "releases" / CNN).iterdir(), key=lambda p: int(p.name))
    version = int(folder.name)
    size = read_manifest(folder / "fp32.manifest.json").size_bytes
    ident = IdentityPaths(device_state)
    tls = TlsFiles(ca_file=ident.ca, cert_file=ident.cert, key_file=ident.tls_key)
    dest = work / "resume.part"
    with CuttingRelay(models_port, cut_after=size // 2) as relay:
        target = Address(host="127.0.0.1", port=relay.port)
        try:
            first = download_artifact(target, tls, CNN, version, "fp32", dest, timeout_s=60)
        except DownloadError as cut:
            first = cut.moved
        second = download_artifact(target, tls, CNN, version, "fp32", dest, timeout_s=60)
    if dest.read_bytes() != (folder / "fp32.tflite").read_bytes():
        raise RuntimeError("the resumed download is not the artifact")
    log(
        f"resume: {CNN} v{version} fp32 {size} B; cut {relay.cuts}x; payload {first}+{second} B; "
        f"wire {relay.downstream} B ({relay.downstream / size:.3f}x)"
    )
    return {"artifact_bytes": size, "bytes_moved": relay.downstream}


# --- main ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every measurement, in order; the output contract."""
    from edgefl.server.release_keys import create_release_key

    server_config = write_server_config(work)
    state = work / "server"
    db_url = json.loads(server_config.read_text())["db_url"]
    create_release_key(state / "ca")
    mlp_run = train(db_url, MLP, args.rounds)
    # The model the fleet runs before the update: the run's mid-way checkpoint.
    old = make_release(db_url, state, mlp_run, MLP_RECIPES, round_=max(1, args.rounds // 2))
    mlp = make_release(db_url, state, mlp_run, MLP_RECIPES)
    cnn = make_release(db_url, state, train(db_url, CNN, args.cnn_rounds), CNN_RECIPES)
    releases = {MLP: release_figures(mlp), CNN: release_figures(cnn)}
    report: dict[str, Any] = {"releases": releases}

    tamper_dir = state / "releases" / MLP / str(mlp["version"])
    report["tamper"] = measure_tamper(work / "tamper", tamper_dir)

    kill_dir = work / "kill9"
    kill_dir.mkdir()
    kill9 = run_kill_trials(kill_dir, args.kill_trials)
    log(f"kill -9: {kill9}")
    report["kill9"] = {"trials": kill9["trials"], "half_installed": kill9["half_installed"]}

    # The update is like for like: the same variant of both releases (the final release's
    # smallest that the mid-way one also has), so the health window compares like models.
    common = [kv for kv in published(mlp).items() if kv[0] in published(old)]
    smallest = min(common, key=lambda kv: kv[1]["size_bytes"])[0]
    server, info = start_server(work, server_config)
    try:
        log(f"server up: {info}")
        report["delivery"] = measure_delivery(
            work,
            server_config,
            info,
            args.agents,
            int(mlp["version"]),
            smallest,
            args.timeout,
            previous=int(old["version"]),
        )
        models_port = int(json.loads(server_config.read_text())["models"]["port"])
        report["resume"] = measure_resume(work, state, work / "agent0", models_port)
    finally:
        server.stop(grace=60.0)
    return {key: report[key] for key in ("releases", "delivery", "tamper", "kill9", "resume")}


def targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets, met or not, one line each (published variants only)."""
    lines = []
    cnn = report["releases"][CNN]
    fp32 = cnn["variants"].get("fp32")
    pruned = cnn["variants"].get("pruned50-int8")
    if fp32 and pruned:
        ratio = fp32["size_bytes"] / pruned["size_bytes"]
        drop = (cnn["float_accuracy"] - pruned["accuracy"]) * 100
        ok = ratio >= 8 and drop <= 1.5
        lines.append(f"cnn pruned50-int8 {ratio:.1f}x smaller, accuracy drop {drop:+.2f} pts: {ok}")
    elif "pruned50-int8" in cnn["left_out"]:
        drop = cnn["left_out"]["pruned50-int8"]["accuracy_drop"]
        lines.append(f"cnn pruned50-int8 left out by the accuracy gate ({drop:+.2f} pts): False")
    else:
        lines.append("cnn pruned50-int8 not in the release (refused by verification): False")
    mlp = report["releases"][MLP]
    base = mlp["variants"]["fp32"]["size_bytes"]
    smallest = min(mlp["variants"].items(), key=lambda kv: kv[1]["size_bytes"])
    name, v = smallest
    drop = (mlp["float_accuracy"] - v["accuracy"]) * 100
    lines.append(
        f"mlp smallest published variant {name} {v['size_bytes'] / base:.3f}x of fp32, "
        f"accuracy drop {drop:+.2f} pts: {v['size_bytes'] <= 0.55 * base and drop <= 1.5}"
    )
    for name, v in sorted(mlp["variants"].items(), key=lambda kv: kv[1]["size_bytes"]):
        drop = (mlp["float_accuracy"] - v["accuracy"]) * 100
        lines.append(
            f"  mlp {name} (published) {v['size_bytes'] / base:.3f}x of fp32, "
            f"accuracy drop {drop:+.2f} pts"
        )
    for name, v in sorted(mlp["left_out"].items(), key=lambda kv: kv[1]["size_bytes"]):
        lines.append(
            f"  mlp {name} (LEFT OUT: accuracy_drop) {v['size_bytes'] / base:.3f}x of fp32, "
            f"accuracy drop {v['accuracy_drop']:+.2f} pts"
        )
    d = report["delivery"]
    lines.append(
        f"delivery {d['converged']}/{d['agents']} max {d['max_s']} s: "
        f"{d['converged'] == d['agents'] and d['max_s'] <= 60}"
    )
    refused = sum(v == "refused" for v in report["tamper"].values())
    lines.append(
        f"tamper {refused}/{len(report['tamper'])} refused: {refused == len(report['tamper'])}"
    )
    k = report["kill9"]
    lines.append(
        f"kill9 {k['half_installed']}/{k['trials']} half-installed: {k['half_installed'] == 0}"
    )
    r = report["resume"]
    lines.append(
        f"resume {r['bytes_moved'] / r['artifact_bytes']:.3f}x: "
        f"{r['bytes_moved'] <= 1.1 * r['artifact_bytes']}"
    )
    return lines


def main() -> int:
    """Parse the flags, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON on stdout")
    parser.add_argument("--agents", type=int, default=10, help="agent processes (default 10)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=30,
        help="DP rounds of digits-mlp (default 30, the scenario's)",
    )
    parser.add_argument("--cnn-rounds", type=int, default=3, help="rounds of digits-cnn")
    parser.add_argument("--kill-trials", type=int, default=20, help="kill -9s (default 20)")
    parser.add_argument("--timeout", type=float, default=120.0, help="delivery wait, seconds")
    parser.add_argument(
        "--quick", action="store_true", help="smaller: 4 DP rounds, 1 cnn round, 3 agents"
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C: the agents and the server are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.rounds, args.cnn_rounds = min(args.rounds, 4), 1
        args.agents = min(args.agents, 3)
    if args.kill_trials < 20:
        parser.error("--kill-trials must be at least 20")
    # Everything the run prints (Flower, the converter's native logs) goes to stderr: the
    # JSON is the only thing on stdout.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            report = run(args, args.keep)
        else:
            tmp = tempfile.mkdtemp(prefix="release-bench-")
            try:
                report = run(args, Path(tmp))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    for line in targets(report):
        log(f"target: {line}")
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
