"""The on-device model store: A/B slots, an atomic pointer, repair, and real ``kill -9``s.

The kill test runs ``benchmarks/model_store_bench.py`` with 20 trials: a child process
installing versions in a loop is SIGKILLed at random instants, and after each kill the
store must hold exactly one whole model, the old one or the new one.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
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


def test_kill_9_at_random_instants_leaves_one_whole_model() -> None:
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "model_store_bench.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--trials", str(KILL_TRIALS), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])["kill9"]
    assert result["trials"] == KILL_TRIALS
    assert result["half_installed"] == 0, result
    # The kills must land inside installs, or the test proves nothing.
    assert result["killed_mid_install"] >= KILL_TRIALS // 2, result
