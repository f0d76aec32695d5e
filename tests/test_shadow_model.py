"""Shadow evaluation on the device: a release run beside the serving model, never serving it.

The wire first (a desired state's signed, optional ``shadow``, and what an agent that
predates it does), then the device's real model manager on the toolkit's real
``digits-mlp`` releases (signed with real Ed25519 keys, read from a folder laid out as
the server publishes them), then the real inference loop running the shadow after each
answer. The worse model is the fp32 model with the output rows of digits 0-4 rotated
(``benchmarks/rollout_fleet.py``), its golden vectors made from that model so it passes
every check a device makes: only its answers are worse.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from edgefl.edge_agent.inference import loop as loop_module
from edgefl.edge_agent.inference.config import InferenceConfig
from edgefl.edge_agent.inference.loop import InferenceLoop
from edgefl.edge_agent.models.manager import read_model_status
from edgefl.edge_agent.models.store import ModelStore
from edgefl.edge_agent.sources import SourceRecord
from edgefl.errors import BadInputError
from edgefl.proto.desired import DesiredModel, DesiredState, parse_desired
from edgefl.releasesign import (
    SIGNING_CONTEXT,
    ReleaseTrustError,
    TrustStore,
    key_id,
    public_key_pem,
    sign,
    verify,
)
from edgefl.runtimes.golden import golden_arrays
from edgefl.testing import wait_for

try:
    from tests.model_release_helpers import MODEL, RUNTIME, Built, Fleet, build_tiny_models
except ImportError:  # pragma: no cover - run from inside tests/
    from model_release_helpers import (  # type: ignore[import-not-found,no-redef]
        MODEL,
        RUNTIME,
        Built,
        Fleet,
        build_tiny_models,
    )

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(_BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(_BENCHMARKS))

from rollout_fleet import rotated_classes  # noqa: E402

NOW = 1_800_000_000
DAY = 86_400


# --- the wire ------------------------------------------------------------------------------


def _model(version: int, sha: str = "ab") -> DesiredModel:
    return DesiredModel(
        model=MODEL, version=version, variant="fp32", artifact_sha256=sha * 32, size_bytes=3472
    )


def _state(**fields: Any) -> DesiredState:
    doc: dict[str, Any] = {
        "fleet": "lab",
        "device": "pi-01",
        "issued_at": NOW,
        "expires_at": NOW + DAY,
        "model": _model(1),
    }
    doc.update(fields)
    return DesiredState(**doc)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trust(tmp_path: Path, key: Ed25519PrivateKey) -> TrustStore:
    (tmp_path / "release-signing.pub").write_text(public_key_pem(key.public_key()))
    store = TrustStore.load(tmp_path)
    store.clock = lambda: NOW
    return store


def test_a_state_without_a_shadow_keeps_the_bytes_and_signature_it_had_before(
    key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    """A signer that predates the field signed exactly these bytes: they still verify."""
    before = {
        "device": "pi-01",
        "expires_at": NOW + DAY,
        "fleet": "lab",
        "issued_at": NOW,
        "model": json.loads(_model(1).to_json()),
        "revoked_keys": [],
        "v": 1,
    }
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":")).encode()
    value = key.sign(SIGNING_CONTEXT + b"DesiredState\n" + canonical)
    payload = dict(
        before,
        signature={
            "alg": "ed25519",
            "key_id": key_id(key.public_key()),
            "value": base64.b64encode(value).decode(),
        },
    )
    old = parse_desired(json.dumps(payload))
    assert old.shadow is None
    assert verify(old, trust) == key_id(key.public_key())
    # Signed today, the same document has the same bytes and the same signature.
    signed = sign(_state(), key)
    assert signed.signature == old.signature
    assert b"shadow" not in signed.to_json()


def test_a_shadow_is_signed_and_any_edit_of_it_breaks_the_signature(
    key: Ed25519PrivateKey, trust: TrustStore
) -> None:
    signed = sign(_state(shadow=_model(2, "cd")), key)
    payload = json.loads(signed.to_json())
    assert payload["shadow"]["version"] == 2
    state = parse_desired(json.dumps(payload))
    assert state.shadow == _model(2, "cd")
    verify(state, trust)
    edits: list[tuple[str, Any]] = [
        ("version", 3),
        ("artifact_sha256", "ef" * 32),
        ("variant", "fp16"),
        ("size_bytes", 1),
        ("model", "other"),
    ]
    for field, value in edits:
        tampered = json.loads(signed.to_json())
        tampered["shadow"][field] = value
        with pytest.raises(ReleaseTrustError) as err:
            verify(parse_desired(json.dumps(tampered)), trust)
        assert err.value.reason == "bad_signature", field
    dropped = json.loads(signed.to_json())
    del dropped["shadow"]  # the shadow removed: the rollout would not see what it asked
    with pytest.raises(ReleaseTrustError, match="bad_signature"):
        verify(parse_desired(json.dumps(dropped)), trust)
    added = json.loads(sign(_state(), key).to_json())
    added["shadow"] = json.loads(_model(9, "99").to_json())  # a shadow slipped in
    with pytest.raises(ReleaseTrustError, match="bad_signature"):
        verify(parse_desired(json.dumps(added)), trust)


def test_a_shadow_is_never_a_rollback() -> None:
    payload = json.loads(_state(shadow=_model(2)).to_json())
    payload["shadow"]["rollback"] = True
    with pytest.raises(BadInputError, match="cannot be a rollback"):
        parse_desired(json.dumps(payload))


class _DesiredBeforeShadows(BaseModel):
    """The desired state as an agent that predates shadows parses it (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")

    v: int
    fleet: str
    device: str
    issued_at: int
    expires_at: int
    model: dict[str, Any] | None
    revoked_keys: list[str]
    signature: dict[str, Any] | None = None


def test_an_agent_before_shadows_refuses_a_state_with_one_and_takes_one_without(
    key: Ed25519PrivateKey,
) -> None:
    """Version skew: such an agent refuses a shadow state as malformed (and keeps what it
    runs: the rollout then has no shadow evidence and halts); the state that halts or
    proceeds carries no shadow, and it takes that one."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="shadow"):
        _DesiredBeforeShadows.model_validate_json(sign(_state(shadow=_model(2)), key).to_json())
    _DesiredBeforeShadows.model_validate_json(sign(_state(), key).to_json())


def test_the_fleet_contracts_shadow_examples_are_the_wire() -> None:
    """docs/fleet-contract.md: the shadow of a desired state and a shadow version's figures."""
    import re

    from edgefl.edge_agent.inference.stats import ModelKey, ShadowStats

    doc = (Path(__file__).resolve().parents[1] / "docs" / "fleet-contract.md").read_text("utf-8")
    blocks = [json.loads(b) for b in re.findall(r"^ *```json\n(.*?)^ *```", doc, re.M | re.S)]
    (shadow,) = [b for b in blocks if "artifact_sha256" in b and "issued_at" not in b]
    assert DesiredModel.model_validate(shadow).rollback is False
    sign(_state(shadow=DesiredModel.model_validate(shadow)), Ed25519PrivateKey.generate())
    (figures,) = [b for b in blocks if "served_correct" in b]
    stats = ShadowStats()
    stats.compared(
        ModelKey(MODEL, 4, "fp32"),
        agreed=True,
        agreed_local=True,
        correct=True,
        served_correct=True,
        latency_ms=0.01,
    )
    (live,) = stats.snapshot()
    assert set(figures) == set(live)
    assert figures["agreement"] == pytest.approx(figures["agreed"] / figures["compared"], abs=1e-6)


# --- the device's model manager -------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


@pytest.fixture
def fleet(tmp_path: Path, built: Built) -> Fleet:
    return Fleet(tmp_path, built)


def publish_worse(fleet: Fleet, version: int) -> DesiredModel:
    """The fp32 model answering digits 0-4 wrong, with golden vectors of its own."""
    from edgefl.edge_agent.runtimes import create_runtime

    path, base = fleet.built.variants["fp32"]
    artifact = rotated_classes(path.read_bytes())
    scratch = fleet.root / f"worse-{version}.tflite"
    scratch.write_bytes(artifact)
    x, _, _ = golden_arrays(base.golden)
    golden = base.golden.model_copy(
        update={"reference_outputs": create_runtime(RUNTIME, scratch).run(x).tolist()}
    )
    manifest = fleet.release_manifest(
        version,
        "fp32",
        sha256=hashlib.sha256(artifact).hexdigest(),
        size_bytes=len(artifact),
        golden=golden,
    )
    return fleet.publish(version, "fp32", manifest=manifest, artifact=artifact)


def _with_shadow(fleet: Fleet, model: DesiredModel | None, shadow: DesiredModel | None) -> Any:
    fleet.tick()
    state = fleet.desired(model, signed=False).model_copy(update={"shadow": shadow})
    return sign(state, fleet.key)


def _slots(fleet: Fleet) -> dict[str, bytes]:
    root = fleet.state_dir / "models"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for slot in ("a", "b")
        for p in sorted((root / slot).iterdir())
    } | {"current": (root / "current").read_bytes()}


@pytest.mark.slow
def test_a_shadow_is_checked_kept_apart_from_the_slots_and_never_serves(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    slots = _slots(fleet)
    reports = len(fleet.reports)
    v2 = fleet.publish(2, "fp16")
    manager.handle(_with_shadow(fleet, v1, v2))
    shadow = manager.shadow()
    assert shadow is not None
    assert (shadow.installed.version, shadow.installed.slot) == (2, "shadow")
    assert shadow.path == fleet.state_dir / "models" / "shadow" / "model.tflite"
    assert shadow.path.read_bytes() == fleet.built.variants["fp16"][0].read_bytes()
    assert shadow.manifest.release is not None
    assert shadow.manifest.release.version == 2
    # What serves did not change, nor did a byte of the slots or the pointer.
    current = manager.current()
    assert current is not None
    assert current.installed.version == 1
    assert _slots(fleet) == slots
    assert manager.generation == 1
    assert manager.shadow_generation >= 1
    # state/reported is about what serves; the shadow is in the status file.
    assert all(r.version == 1 and r.state == "running" for r in fleet.reports[reports:])
    status = read_model_status(fleet.state_dir)
    assert status["shadow"]["state"] == "running"
    assert status["shadow"]["installed"]["version"] == 2
    assert status["shadow"]["desired"]["sha256"] == v2.artifact_sha256
    assert status["desired"]["shadow"]["version"] == 2
    assert list((fleet.state_dir / "models" / "shadow-staging").iterdir()) == []
    # The same state again (the retained copy on a reconnect) changes nothing.
    generation = manager.shadow_generation
    manager.handle(parse_desired(json.dumps(status["desired"])))
    assert manager.shadow_generation == generation


@pytest.mark.slow
def test_a_shadow_may_be_older_than_the_serving_model(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    fleet.tick()
    v2 = fleet.publish(2, "fp16")
    manager.handle(fleet.desired(v2))
    manager.handle(_with_shadow(fleet, v2, v1))  # no downgrade rule: it replaces nothing
    shadow = manager.shadow()
    assert shadow is not None
    assert shadow.installed.version == 1
    current = manager.current()
    assert current is not None
    assert current.installed.version == 2
    assert fleet.reports[-1].last_failure is None


@pytest.mark.slow
def test_a_shadow_failing_a_check_is_refused_and_the_serving_model_goes_on(
    fleet: Fleet,
) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    good = fleet.built.variants["fp16"][0].read_bytes()
    v2 = fleet.publish(2, "fp16", artifact=bytes([good[0] ^ 1]) + good[1:])
    manager.handle(_with_shadow(fleet, v1, v2))
    assert manager.shadow() is None
    status = manager.shadow_status()
    assert status["state"] == "failed"
    assert status["last_failure"]["reason"] == "sha256_mismatch"
    assert status["last_failure"]["version"] == 2
    current = manager.current()
    assert current is not None
    assert current.installed.version == 1
    # The model's own report is not the shadow's: no failure there.
    assert fleet.reports[-1].last_failure is None
    assert fleet.reports[-1].state == "running"
    # Made for another device class: refused with that reason.
    v3 = fleet.publish(3, "fp16", device_class="jetson")
    manager.handle(_with_shadow(fleet, v1, v3))
    assert manager.shadow_status()["last_failure"]["reason"] == "wrong_device_class"
    assert manager.shadow() is None


@pytest.mark.slow
def test_a_state_without_a_shadow_removes_it_and_a_restart_keeps_one(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    v2 = fleet.publish(2, "fp16")
    manager.handle(_with_shadow(fleet, v1, v2))
    assert manager.shadow() is not None
    # A restart finds it whole and, with the same desired state, does nothing more.
    restarted = fleet.manager()
    shadow = restarted.shadow()
    assert shadow is not None
    assert shadow.installed.version == 2
    generation = restarted.shadow_generation
    restarted.step()
    assert restarted.shadow_generation == generation
    # A newer desired state without a shadow removes it.
    fleet.tick()
    restarted.handle(fleet.desired(v1))
    assert restarted.shadow() is None
    assert list((fleet.state_dir / "models" / "shadow").iterdir()) == []
    assert restarted.shadow_status()["state"] == "none"
    current = restarted.current()
    assert current is not None
    assert current.installed.version == 1


@pytest.mark.slow
def test_a_torn_shadow_is_removed_and_the_pointer_never_names_it(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    v2 = fleet.publish(2, "fp16")
    desired = _with_shadow(fleet, v1, v2)
    manager.handle(desired)
    root = fleet.state_dir / "models"
    # A crash during the shadow's install: its file written, its seal not yet.
    (root / "shadow" / "slot.json").unlink()
    store = ModelStore(root)
    assert store.shadow() is None
    assert list((root / "shadow").iterdir()) == []
    current = store.current()
    assert current is not None
    assert current.version == 1
    # The restarted manager installs it again from the desired state it had.
    restarted = fleet.manager()
    restarted.step()
    assert restarted.shadow() is not None
    assert restarted.shadow_status()["state"] == "running"
    # A pointer naming the shadow folder (forged, or a bug) is unusable: repaired.
    pointer = json.loads((root / "current").read_text())
    (root / "current").write_text(json.dumps({**pointer, "slot": "shadow"}))
    store = ModelStore(root)
    assert store.last_repair.fell_back
    current = store.current()
    assert current is not None
    assert (current.slot, current.version) == ("a", 1)


# --- the inference loop ---------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32) / 16.0, data.target.astype(int)


def _records(x: np.ndarray, y: np.ndarray, start: int) -> list[SourceRecord]:
    return [
        SourceRecord(
            stream="eval",
            kind="data",
            content_type="application/json",
            body=b"{}",
            source="eval",
            index=start + i,
            inputs=x[i],
            label=int(y[i]),
            evaluation=True,
        )
        for i in range(len(x))
    ]


def _loop(manager: Any, committed: list[SourceRecord], **config: Any) -> InferenceLoop:
    loop = InferenceLoop(
        InferenceConfig(enabled=True, queue_size=1000, **config),
        models=manager,
        runtime_key=RUNTIME,
        commit=committed.extend,
    )
    loop.start()
    return loop


@pytest.mark.slow
def test_the_loop_runs_the_shadow_after_each_answer_and_never_serves_it(fleet: Fleet) -> None:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    worse = publish_worse(fleet, 2)
    manager.handle(_with_shadow(fleet, v1, worse))
    committed: list[SourceRecord] = []
    loop = _loop(manager, committed)
    x, y = _digits()
    n = 400
    try:
        assert loop.status()["shadow"]["model"]["version"] == 2
        for start in range(0, n, 10):  # a source at a steady pace, not one burst
            loop.offer("eval", _records(x[start : start + 10], y[start : start + 10], start))
            time.sleep(0.01)
        wait_for(lambda: len(committed) >= n, 30, "every sample answered")
        wait_for(
            lambda: sum(v["compared"] + v["skipped"] for v in loop.shadow_stats.snapshot()) >= n,
            10,
            "the shadow's last pass",
        )
        bodies = [json.loads(r.body) for r in committed]
        # Every answer served is the serving model's: the shadow made no result.
        assert len(bodies) == n
        assert {(b["model"], b["version"], b["variant"]) for b in bodies} == {(MODEL, 1, "fp32")}
        assert sorted(b["index"] for b in bodies) == list(range(n))
        assert all(r.kind == "result" for r in committed)
        (figures,) = loop.shadow_stats.snapshot()
        assert (figures["model"], figures["version"]) == (MODEL, 2)
        assert figures["compared"] + figures["skipped"] + figures["rejected"] == n
        assert figures["compared"] >= n // 2
        assert figures["errors"] == 0
        assert figures["evaluated"] == figures["compared"]
        # Digits 0-4 answered wrong: it disagrees on about half the samples, and on the
        # very same samples the served answers are far better.
        assert figures["agreement"] < 0.7
        assert figures["accuracy"] < figures["served_accuracy"] - 0.25
        assert figures["agreement_local"] == figures["agreement"]  # no cloud here
        assert figures["latency_p99_ms"] is not None
        served = {(v["version"], v["variant"]): v for v in loop.status()["versions"]}
        assert set(served) == {(1, "fp32")}
        assert served[(1, "fp32")]["answered"] == n
        report = json.loads(loop.report().body)
        assert report["shadow"]["versions"][0]["compared"] == figures["compared"]
        assert report["shadow"]["state"] == "running"
        # A desired state without the shadow: the loop lets it go.
        fleet.tick()
        manager.handle(fleet.desired(v1))
        wait_for(lambda: loop.status()["shadow"]["model"] is None, 10, "the shadow dropped")
        loop.offer("eval", _records(x[n : n + 20], y[n : n + 20], n))
        wait_for(lambda: len(committed) >= n + 20, 10, "answers without a shadow")
        time.sleep(0.2)
        (after,) = loop.shadow_stats.snapshot()
        assert (after["compared"], after["skipped"]) == (figures["compared"], figures["skipped"])
        assert loop.status()["shadow"]["state"] == "none"
    finally:
        loop.stop()


class _Slow:
    """A fault: the shadow's runtime takes 20 ms per sample (until ``busy`` is cleared)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.inputs = inner.inputs
        self.busy = threading.Event()
        self.busy.set()
        self.calls = 0

    def run(self, x: Any) -> Any:
        self.calls += 1
        if self.busy.is_set():
            time.sleep(0.02)
        return self.inner.run(x)


@pytest.mark.slow
@pytest.mark.parametrize("limit_ms", [None, 50.0])
def test_a_shadow_that_cannot_keep_up_is_skipped_and_counted_never_waited_for(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, limit_ms: float | None
) -> None:
    """A 20 ms shadow: over the default limit (a tenth of the 100 ms budget) it never runs;
    under a 50 ms limit it runs only while no real sample waits."""
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    manager.handle(_with_shadow(fleet, v1, fleet.publish(2, "fp16")))
    real = loop_module.create_runtime  # type: ignore[attr-defined]

    def slow_shadow(key: str, path: Path, **kw: Any) -> Any:
        runtime = real(key, path, **kw)
        return _Slow(runtime) if Path(path).parent.name == "shadow" else runtime

    monkeypatch.setattr(loop_module, "create_runtime", slow_shadow)
    committed: list[SourceRecord] = []
    loop = _loop(manager, committed, shadow_max_delay_ms=limit_ms)
    x, y = _digits()
    n = 600
    try:
        assert loop.status()["shadow"]["model"]["version"] == 2
        # A burst: at 20 ms a sample the shadow could not keep up with it.
        assert loop.offer("eval", _records(x[:n], y[:n], 0)) == n
        started = time.monotonic()
        wait_for(lambda: len(committed) >= n, 30, "every sample answered")
        elapsed = time.monotonic() - started
        wait_for(
            lambda: sum(v["compared"] + v["skipped"] for v in loop.shadow_stats.snapshot()) >= n,
            10,
            "the shadow's last pass",
        )
        (figures,) = loop.shadow_stats.snapshot()
        assert figures["compared"] + figures["skipped"] == n  # counted exactly
        if limit_ms is None:
            # Skipped while samples waited, and too slow when none did, but for the few
            # samples it is timed again on (after 1 s, 2 s, 4 s, ...).
            assert figures["compared"] <= 3, figures
            assert figures["too_slow"] > 0
        else:
            assert figures["too_slow"] == 0
            assert 0 < figures["skipped"] < n
            assert figures["compared"] > 0
        # Waiting for every shadow inference would have taken n x 20 ms = 12 s.
        assert elapsed < n * 0.02 / 2, elapsed
        status = loop.status()
        assert (status["answered"], status["dropped"], status["errors"]) == (n, 0, 0)
        assert {json.loads(r.body)["version"] for r in committed} == {1}
    finally:
        loop.stop()


def _wait_counted(loop: InferenceLoop, samples: int) -> None:
    """Until the shadow's figures count ``samples`` samples (run on or skipped)."""

    def counted() -> bool:
        figures = loop.shadow_stats.snapshot()
        return int(sum(v["compared"] + v["skipped"] for v in figures)) >= samples

    wait_for(counted, 10, f"{samples} samples counted by the shadow")


@pytest.mark.slow
def test_a_shadow_timed_too_slow_on_a_busy_device_runs_again_once_it_is_fast(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device busy when the shadow was built and first run (20 ms a sample, over the
    10 ms limit) does not lock the shadow out for good: it is timed again on one sample
    after a wait, and once that time is under the limit it runs on every sample again."""
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    manager.handle(_with_shadow(fleet, v1, fleet.publish(2, "fp16")))
    real = loop_module.create_runtime  # type: ignore[attr-defined]
    shadows: list[_Slow] = []

    def slow_shadow(key: str, path: Path, **kw: Any) -> Any:
        runtime = real(key, path, **kw)
        if Path(path).parent.name != "shadow":
            return runtime
        shadows.append(_Slow(runtime))
        return shadows[-1]

    monkeypatch.setattr(loop_module, "create_runtime", slow_shadow)
    committed: list[SourceRecord] = []
    loop = _loop(manager, committed)
    x, y = _digits()

    def trickle(start: int, count: int) -> None:
        for i in range(start, start + count):  # one at a time: no sample ever waits
            loop.offer("eval", _records(x[i : i + 1], y[i : i + 1], i))
            _wait_counted(loop, i + 1)

    try:
        assert loop.status()["shadow"]["model"]["version"] == 2
        trickle(0, 20)  # timed at 20 ms when it was built: too slow
        (figures,) = loop.shadow_stats.snapshot()
        assert figures["compared"] == 0, figures
        assert figures["too_slow"] == 20, figures
        shadows[-1].busy.clear()  # the device is no longer busy
        time.sleep(1.1)  # past the first wait
        trickle(20, 40)
        (figures,) = loop.shadow_stats.snapshot()
        # The first sample after the wait timed it again, under the limit: it runs on
        # every sample from then on.
        assert figures["compared"] == 40, figures
        assert figures["too_slow"] == 20, figures
        assert {json.loads(r.body)["version"] for r in committed} == {1}
    finally:
        loop.stop()


@pytest.mark.slow
def test_a_shadow_that_stays_too_slow_is_timed_again_ever_less_often(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each re-timing that finds the shadow still over its limit doubles the wait (1 s,
    2 s, 4 s, ...): over 4 s of samples it runs on at most two of them."""
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    manager.handle(_with_shadow(fleet, v1, fleet.publish(2, "fp16")))
    real = loop_module.create_runtime  # type: ignore[attr-defined]

    def slow_shadow(key: str, path: Path, **kw: Any) -> Any:
        runtime = real(key, path, **kw)
        return _Slow(runtime) if Path(path).parent.name == "shadow" else runtime

    monkeypatch.setattr(loop_module, "create_runtime", slow_shadow)
    committed: list[SourceRecord] = []
    loop = _loop(manager, committed)
    x, y = _digits()
    try:
        started, i = time.monotonic(), 0
        while time.monotonic() - started < 4.0:  # one at a time: no sample ever waits
            loop.offer("eval", _records(x[i : i + 1], y[i : i + 1], i))
            _wait_counted(loop, i + 1)
            time.sleep(0.02)
            i += 1
        (figures,) = loop.shadow_stats.snapshot()
        # Timed again at about 1 s and 3 s (the next wait, 4 s, ends after the samples).
        assert 1 <= figures["compared"] <= 2, figures
        assert figures["compared"] + figures["too_slow"] == i, figures
    finally:
        loop.stop()
