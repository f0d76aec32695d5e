"""Attacks through a desired state's shadow: it is trusted exactly as much as any release.

The attacker holds no release-signing key. It can put any bytes where the device reads its
desired states and releases (a broker or a proxy it controls), sign with a key of its own,
and, from a canary it stole, report any figures about itself. A shadow is a way in if the
device checks it less than the model it serves: it runs on the device's data, beside the
serving model. So a shadow signed by an untrusted key, a genuine state whose shadow was
swapped, and a shadow release whose manifest the attacker signed must each be refused
with the machine reason of any other refusal, fetch nothing the state did not authorise,
and change nothing that serves; and a canary's impossible shadow figures earn it no pass.

Real parts: the device's model manager on the toolkit's ``digits-mlp`` releases, real
Ed25519 keys, the device's trust store on its identity folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.edge_agent.models.manager import FolderSource, read_model_status
from edgefl.proto.desired import DesiredModel, parse_desired
from edgefl.releasesign import sign
from edgefl.server.staged_rollout import (
    ModelRef,
    RolloutOptions,
    _shadow_failure,
    _shadow_figures,
    _Target,
)
from tests.model_release_helpers import MODEL, Built, Fleet, build_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


class CountingSource(FolderSource):
    """The folder source, counting what the device fetches."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetched: list[tuple[str, int, str]] = []

    def fetch_manifest(self, model: str, version: int, variant: str) -> bytes:
        self.fetched.append((model, version, variant))
        return super().fetch_manifest(model, version, variant)


def _device(fleet: Fleet) -> tuple[Any, DesiredModel, CountingSource]:
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    source = CountingSource(fleet.releases)
    manager.source = source
    return manager, v1, source


def _with_shadow(fleet: Fleet, model: DesiredModel, shadow: DesiredModel, key: Any) -> Any:
    fleet.tick()
    state = fleet.desired(model, signed=False).model_copy(update={"shadow": shadow})
    return sign(state, key)


def _unchanged(fleet: Fleet, manager: Any, source: CountingSource) -> None:
    current = manager.current()
    assert current is not None
    assert current.installed.version == 1
    assert manager.shadow() is None
    assert source.fetched == []
    assert list((fleet.state_dir / "models" / "shadow").iterdir()) == []
    desired = read_model_status(fleet.state_dir)["desired"]
    assert desired["model"]["version"] == 1
    assert "shadow" not in desired  # the state it acts on is still the genuine one


def test_a_shadow_signed_by_an_untrusted_key_is_refused_like_any_state(
    tmp_path: Path, built: Built
) -> None:
    fleet = Fleet(tmp_path, built)
    manager, v1, source = _device(fleet)
    shadow = fleet.publish(2, "fp16")  # a real release, so only the key is wrong
    forged = _with_shadow(fleet, v1, shadow, Ed25519PrivateKey.generate())
    manager.handle(forged.to_json())
    assert fleet.reports[-1].last_failure is not None
    assert fleet.reports[-1].last_failure.reason == "untrusted_key"
    _unchanged(fleet, manager, source)


def test_a_genuine_state_whose_shadow_was_swapped_is_refused(tmp_path: Path, built: Built) -> None:
    fleet = Fleet(tmp_path, built)
    manager, v1, source = _device(fleet)
    genuine = _with_shadow(fleet, v1, fleet.publish(2, "fp16"), fleet.key)
    payload = json.loads(genuine.to_json())
    bad = fleet.publish(3, "fp16", artifact=b"\x00" * 64)  # the attacker's file on the path
    payload["shadow"] = json.loads(bad.to_json())
    manager.handle(json.dumps(payload).encode())
    assert fleet.reports[-1].last_failure is not None
    assert fleet.reports[-1].last_failure.reason == "bad_signature"
    _unchanged(fleet, manager, source)
    # Nor may the attacker drop a shadow the server asked for, or add one it did not.
    dropped = json.loads(genuine.to_json())
    del dropped["shadow"]
    manager.handle(json.dumps(dropped).encode())
    assert fleet.reports[-1].last_failure.reason == "bad_signature"
    added = json.loads(sign(fleet.desired(v1, signed=False), fleet.key).to_json())
    added["shadow"] = json.loads(bad.to_json())
    assert parse_desired(json.dumps(added)).shadow is not None
    manager.handle(json.dumps(added).encode())
    assert fleet.reports[-1].last_failure.reason == "bad_signature"
    _unchanged(fleet, manager, source)


def test_a_shadow_release_signed_by_the_attacker_is_refused_and_nothing_serves_it(
    tmp_path: Path, built: Built
) -> None:
    """The state is genuine; the manifest served for its shadow is the attacker's."""
    fleet = Fleet(tmp_path, built)
    manager, v1, source = _device(fleet)
    genuine = fleet.publish(2, "fp16")
    desired = _with_shadow(fleet, v1, genuine, fleet.key)
    # On the path: the same release name, signed by the attacker's key.
    fleet.publish(2, "fp16", key=Ed25519PrivateKey.generate())
    manager.handle(desired)
    status = manager.shadow_status()
    assert status["state"] == "failed"
    assert status["last_failure"]["reason"] == "untrusted_key"
    assert manager.shadow() is None
    current = manager.current()
    assert current is not None
    assert current.installed.version == 1
    assert fleet.reports[-1].state == "running"
    assert source.fetched == [(MODEL, 2, "fp16")]
    assert list((fleet.state_dir / "models" / "shadow").iterdir()) == []
    assert list((fleet.state_dir / "models" / "shadow-staging").iterdir()) == []


def test_a_canary_claiming_impossible_shadow_figures_gets_no_pass() -> None:
    """A stolen canary reports about itself; figures that cannot be true are ignored, so
    the canary has no shadow evidence and fails its stage instead of passing it."""
    release = ModelRef(MODEL, 2, "fp32", "2" * 64)
    options = RolloutOptions(MODEL, 2, shadow=True, min_agreement=0.9, min_evaluated=30)
    base = {"model": MODEL, "version": 2, "variant": "fp32", "errors": 0, "skipped": 0}
    lies: list[dict[str, Any]] = [
        {"compared": 100, "agreed": 1_000_000, "evaluated": 100, "correct": 90},
        {"compared": 100, "agreed": 100, "evaluated": 100, "correct": 101},
        {"compared": 100, "agreed": 100, "evaluated": 500, "correct": 90},
        {"compared": 100, "agreed": 100, "evaluated": 100, "correct": 90, "served_correct": -1},
        {"compared": 1e9, "agreed": 1e9, "evaluated": 100, "correct": 90},
        {"compared": "100", "agreed": "100", "evaluated": 100, "correct": 90},
        {"compared": 100, "agreed": 100, "evaluated": 100, "correct": 90, "too_slow": 5},
    ]
    for lie in lies:
        section = {"versions": [{**base, "served_correct": 90, **lie}]}
        assert _shadow_figures(section, release) is None, lie
        target = _Target(device="pi-01", fleet="lab", online=True, previous=None)
        target.shadow = _shadow_figures(section, release)
        why = _shadow_failure(target, release, options)
        assert why is not None
        assert why.startswith("no_shadow_evidence"), lie
    honest = {
        "versions": [
            {**base, "compared": 100, "agreed": 95, "evaluated": 100, "correct": 90}
            | {"served_correct": 91}
        ]
    }
    figures = _shadow_figures(honest, release)
    assert figures is not None
    assert figures.agreement == 0.95
