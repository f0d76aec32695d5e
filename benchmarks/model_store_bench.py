"""Model store kill -9 benchmark: half-installed models over many random kills.

Run from the repository root::

    .venv/bin/python benchmarks/model_store_bench.py --trials 100 --json

A child process installs versions into a device model store
(:class:`edgefl.edge_agent.models.store.ModelStore`) in a loop, alternating two artifacts
of 2 and 3 MiB, and announces each install before and after it. The benchmark SIGKILLs
it at a random instant (0-250 ms after its first install started), then opens the store
as a restarted agent would (the store repairs itself) and counts a *half-installed*
state when the store serves no model, a version other than the last one finished or the
one in progress, or a file whose sha256 is not that version's. ``killed_mid_install``
counts the kills that landed while an install was running. The store never serves half
of anything, so ``half_installed`` must be 0.

Output (``--json``): ``{"kill9": {"trials": int, "half_installed": int,
"killed_mid_install": int}, "seconds": float}``. ``tests/test_model_store.py`` runs it
with 20 trials.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefl.edge_agent.models.store import ModelStore
from edgefl.process import ManagedProcess

__all__ = ["run_kill_trials"]

MIB = 1 << 20


def _release(folder: Path, name: str, size: int, seed: int) -> tuple[Path, bytes, str]:
    """Random bytes as an artifact (the store checks files, not models) and a manifest."""
    data = random.Random(seed).randbytes(size)
    artifact = folder / f"{name}.tflite"
    artifact.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    manifest = json.dumps({"sha256": sha, "size_bytes": size, "artifact": name}).encode()
    (folder / f"{name}.json").write_bytes(manifest)
    return artifact, manifest, sha


def _install(store: ModelStore, artifact: Path, manifest: bytes, version: int) -> None:
    doc = json.loads(manifest)
    store.install(
        artifact,
        manifest,
        model="m",
        version=version,
        variant="int8",
        sha256=doc["sha256"],
        size_bytes=doc["size_bytes"],
    )


def _child(root: Path, releases: Path) -> None:
    """Install v2, v3, ... alternating the two artifacts, announcing each on stdout."""
    store = ModelStore(root)
    blobs = [(releases / f"r{i}.tflite", (releases / f"r{i}.json").read_bytes()) for i in (0, 1)]
    current = store.current()
    version = (current.version if current is not None else 0) + 1
    while True:
        artifact, manifest = blobs[version % 2]
        print(f"installing {version}", flush=True)
        _install(store, artifact, manifest, version)
        print(f"installed {version}", flush=True)
        version += 1


def run_kill_trials(workdir: Path, trials: int, *, seed: int = 0) -> dict[str, int]:
    """``trials`` installing children killed at random instants (see the docstring)."""
    rng = random.Random(seed)
    releases = workdir / "releases"
    releases.mkdir(parents=True)
    shas = {i: _release(releases, f"r{i}", (2 + i) * MIB, seed + i)[2] for i in (0, 1)}
    root = workdir / "models"
    _install(ModelStore(root), releases / "r1.tflite", (releases / "r1.json").read_bytes(), 1)
    half = mid_install = 0
    for trial in range(trials):
        log = workdir / f"child-{trial}.log"
        child = ManagedProcess([sys.executable, __file__, "--child", str(root), str(releases)], log)
        child.start()
        deadline = time.monotonic() + 30
        while "installing" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        child.kill()
        text = log.read_text()
        started = [int(v) for v in re.findall(r"^installing (\d+)$", text, re.M)]
        done = [int(v) for v in re.findall(r"^installed (\d+)$", text, re.M)]
        if not started:
            raise RuntimeError(f"the child never started an install: {text[-2000:]}")
        in_progress = max(started)
        acceptable = {in_progress, max(done, default=in_progress - 1)}
        current = ModelStore(root).current()
        if (
            current is None
            or current.version not in acceptable
            or current.sha256 != shas[current.version % 2]
            or hashlib.sha256(current.path.read_bytes()).hexdigest() != current.sha256
        ):
            half += 1
        if not done or done[-1] != in_progress:
            mid_install += 1
    leftovers = [p.name for p in root.rglob(".*.tmp")]
    if leftovers:
        raise RuntimeError(f"the store left temporary files behind: {leftovers}")
    return {"trials": trials, "half_installed": half, "killed_mid_install": mid_install}


def main() -> int:
    """Run the trials and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="kills (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "RELEASES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]))
        return 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        kill9 = run_kill_trials(Path(tmp), args.trials, seed=args.seed)
    report: dict[str, Any] = {"kill9": kill9, "seconds": round(time.monotonic() - start, 1)}
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{kill9['trials']} kill -9s ({kill9['killed_mid_install']} mid-install): "
            f"{kill9['half_installed']} half-installed states"
        )
    return 0 if kill9["half_installed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
