"""The on-device model store: A/B slots, an atomic pointer, repair, and real ``kill -9``s.

The kill test runs this file as a child process that installs versions in a loop and is
SIGKILLed at random instants; after each kill the store must hold exactly one whole
model, the old one or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import pytest

from edgefl.edge_agent.models.store import (
    ARTIFACT_FILE,
    MANIFEST_FILE,
    SEAL_FILE,
    InstalledModel,
    ModelStore,
)
from edgefl.errors import ArtifactError
from edgefl.process import ManagedProcess

KILL_TRIALS = 20


def _release(folder: Path, name: str, size: int, seed: int) -> tuple[Path, bytes, str]:
    """A fake artifact (random bytes: the store checks files, not models) and its manifest."""
    data = random.Random(seed).randbytes(size)
    artifact = folder / f"{name}.tflite"
    artifact.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    manifest = json.dumps({"sha256": sha, "size_bytes": size, "artifact": name}).encode()
    return artifact, manifest, sha


def _install(store: ModelStore, artifact: Path, manifest: bytes, version: int) -> InstalledModel:
    doc = json.loads(manifest)
    return store.install(
        artifact,
        manifest,
        model="m",
        version=version,
        variant="int8",
        sha256=doc["sha256"],
        size_bytes=doc["size_bytes"],
    )


def _assert_whole(model: InstalledModel) -> None:
    data = model.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == model.sha256
    assert len(data) == model.size_bytes
    assert json.loads(model.manifest_bytes())["sha256"] == model.sha256


def test_install_flips_to_the_other_slot_and_keeps_the_previous(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", clock=lambda: 1000)
    assert store.current() is None
    assert store.previous() is None
    a1, m1, sha1 = _release(tmp_path, "v1", 5000, 1)
    a2, m2, sha2 = _release(tmp_path, "v2", 7000, 2)
    first = _install(store, a1, m1, 1)
    assert (first.slot, first.version, first.sha256, first.since) == ("a", 1, sha1, 1000)
    second = _install(store, a2, m2, 2)
    assert (second.slot, second.version, second.sha256) == ("b", 2, sha2)
    previous = store.previous()
    assert previous is not None
    assert previous.version == 1
    _assert_whole(second)
    pointer = json.loads((tmp_path / "models" / "current").read_text())
    assert pointer == {
        "slot": "b",
        "model": "m",
        "version": 2,
        "variant": "int8",
        "sha256": sha2,
        "since": 1000,
    }
    # A restarted store serves the same model.
    again = ModelStore(tmp_path / "models").current()
    assert again is not None
    assert (again.slot, again.version) == ("b", 2)
    # Rollback points back at slot a; slot b keeps its files.
    back = store.activate_previous()
    assert (back.slot, back.version) == ("a", 1)
    assert (tmp_path / "models" / "b" / ARTIFACT_FILE).is_file()


def test_a_mismatching_copy_is_refused_and_the_old_model_stays(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    a1, m1, _ = _release(tmp_path, "v1", 3000, 1)
    _install(store, a1, m1, 1)
    a2, m2, _ = _release(tmp_path, "v2", 3000, 2)
    with pytest.raises(ArtifactError):
        store.install(
            a2, m2, model="m", version=2, variant="int8", sha256="0" * 64, size_bytes=3000
        )
    current = store.current()
    assert current is not None
    assert current.version == 1
    assert ModelStore(tmp_path / "models").current() == current


@pytest.mark.parametrize("damage", ["flip", "truncate", "unseal", "manifest", "pointer"])
def test_repair_falls_back_to_the_other_whole_slot(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "models"
    store = ModelStore(root)
    a1, m1, _ = _release(tmp_path, "v1", 4000, 1)
    a2, m2, _ = _release(tmp_path, "v2", 4000, 2)
    _install(store, a1, m1, 1)
    _install(store, a2, m2, 2)
    slot = root / "b"
    if damage == "flip":
        data = bytearray((slot / ARTIFACT_FILE).read_bytes())
        data[100] ^= 0x01
        (slot / ARTIFACT_FILE).write_bytes(bytes(data))
    elif damage == "truncate":
        (slot / ARTIFACT_FILE).write_bytes((slot / ARTIFACT_FILE).read_bytes()[:1000])
    elif damage == "unseal":
        (slot / SEAL_FILE).unlink()
    elif damage == "manifest":
        (slot / MANIFEST_FILE).write_text("{not json")
    else:
        (root / "current").write_text('{"slot": "c"}')
    repaired = ModelStore(root)
    assert repaired.last_repair.fell_back
    assert repaired.last_repair.reason
    current = repaired.current()
    assert current is not None
    assert (current.slot, current.version) == ("a", 1)
    _assert_whole(current)
    # The repair is durable: the pointer now names slot a.
    assert json.loads((root / "current").read_text())["slot"] == "a"


def test_repair_with_no_whole_slot_serves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root)
    a1, m1, _ = _release(tmp_path, "v1", 2000, 1)
    _install(store, a1, m1, 1)
    (root / "a" / ARTIFACT_FILE).write_bytes(b"x")
    repaired = ModelStore(root)
    assert repaired.current() is None
    assert not (root / "current").exists()


def test_staging_leftovers_are_kept_for_resume(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    part = store.staging_file("m", 3, "int8", ".tflite")
    part.write_bytes(b"partial")
    again = ModelStore(tmp_path / "models")
    assert again.last_repair.staged == (part.name,)
    assert part.read_bytes() == b"partial"
    again.clear_staging()
    assert not part.exists()


# --- kill -9 at random instants --------------------------------------------------------


def _child(root: Path, releases: Path) -> None:
    """Install v2, v3, ... alternating two artifacts, announcing each on stdout."""
    store = ModelStore(root)
    blobs = [(releases / f"r{i}.tflite", (releases / f"r{i}.json").read_bytes()) for i in (0, 1)]
    version = (store.current().version if store.current() else 0) + 1  # type: ignore[union-attr]
    while True:
        artifact, manifest = blobs[version % 2]
        print(f"installing {version}", flush=True)
        _install(store, artifact, manifest, version)
        print(f"installed {version}", flush=True)
        version += 1


def run_kill_trials(tmp_path: Path, trials: int, *, seed: int = 0) -> dict[str, int]:
    """``trials`` children killed at random instants; counts whole and half-installed states."""
    rng = random.Random(seed)
    releases = tmp_path / "releases"
    releases.mkdir()
    shas = {}
    for i in (0, 1):
        _artifact, manifest, sha = _release(releases, f"r{i}", (1 << 20) * (2 + i), seed + i)
        (releases / f"r{i}.json").write_bytes(manifest)
        shas[i] = sha
    root = tmp_path / "models"
    store = ModelStore(root)
    _install(store, releases / "r1.tflite", (releases / "r1.json").read_bytes(), 1)
    half = 0
    mid_install = 0
    for trial in range(trials):
        log = tmp_path / f"child-{trial}.log"
        child = ManagedProcess(
            [sys.executable, __file__, str(root), str(releases)],
            log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        child.start()
        deadline = time.monotonic() + 10
        while "installing" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        child.kill()
        text = log.read_text()
        started = [int(v) for v in re.findall(r"^installing (\d+)$", text, re.M)]
        done = [int(v) for v in re.findall(r"^installed (\d+)$", text, re.M)]
        last_started = max(started)
        acceptable = {last_started, max(done, default=last_started - 1)}
        current = ModelStore(root).current()
        if current is None or current.version not in acceptable:
            half += 1
            continue
        data = current.path.read_bytes()
        if (
            hashlib.sha256(data).hexdigest() != current.sha256
            or current.sha256 != shas[current.version % 2]
        ):
            half += 1
        if not done or done[-1] != last_started:
            mid_install += 1
    return {"trials": trials, "half_installed": half, "killed_mid_install": mid_install}


def test_kill_9_at_random_instants_leaves_one_whole_model(tmp_path: Path) -> None:
    result = run_kill_trials(tmp_path, KILL_TRIALS)
    assert result["half_installed"] == 0, result
    # The kills must land inside installs, or the test proves nothing.
    assert result["killed_mid_install"] >= KILL_TRIALS // 2, result


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
