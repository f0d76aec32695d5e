"""Tampered releases, from the attacker's position: each refused with its reason.

The attacker controls what the device downloads (the server's releases folder, or the
path to it) and can replay anything the fleet ever signed, but holds no trusted
release-signing key. The device runs a signed v1; for each attack it is offered a v2 (or
an older one) and must refuse it with the machine reason while v1 keeps serving, its
files untouched. The cases are :data:`edgefl.release_tamper.ATTACKS`, which the release
benchmark runs too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.proto.desired import DesiredState
from edgefl.release_tamper import ATTACKS, DeviceManager, ReleaseFleet, run_tamper_case

try:
    from tests.model_release_helpers import Built, Fleet, build_tiny_models
except ImportError:  # pragma: no cover - run from inside tests/
    from model_release_helpers import (  # type: ignore[import-not-found,no-redef]
        Built,
        Fleet,
        build_tiny_models,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampered_release_is_refused_and_the_old_model_keeps_serving(
    tmp_path: Path, built: Built, attack: str
) -> None:
    trial = run_tamper_case(Fleet(tmp_path, built), attack)

    assert trial.reason is not None, attack
    assert trial.reason == trial.expected, trial.detail
    assert trial.state == "failed"
    assert trial.kept_installed
    assert trial.kept_bytes
    assert trial.reported == trial.v1
    # A restarted device still serves v1.
    assert trial.restarted_version == 1
    assert trial.refused


def test_the_trial_counts_an_accepted_attack_as_accepted(tmp_path: Path, built: Built) -> None:
    # The benchmark's "refused" must be able to say "accepted": a genuine, newer v2 offered
    # through the same trial is installed, and the trial says so.
    def genuine(fleet: ReleaseFleet, manager: DeviceManager) -> DesiredState:
        return fleet.desired(fleet.publish(2, "fp16"))

    cases = {"genuine_update": (genuine, "none")}
    trial = run_tamper_case(Fleet(tmp_path, built), "genuine_update", cases)
    assert trial.reason is None
    assert trial.state == "running"
    assert trial.reported[0] == 2
    assert trial.restarted_version == 2
    assert not trial.refused


def test_an_older_version_named_without_rollback_is_a_downgrade(
    tmp_path: Path, built: Built
) -> None:
    fleet = Fleet(tmp_path, built)
    manager = fleet.manager()
    v1 = fleet.publish(1, "fp32")
    manager.handle(fleet.desired(v1))
    fleet.tick()
    manager.handle(fleet.desired(fleet.publish(2, "fp16")))
    fleet.tick()
    # A new, genuinely signed desired state naming v1, but not as a rollback.
    manager.handle(fleet.desired(v1))
    report = fleet.reports[-1]
    assert report.last_failure is not None
    assert report.last_failure.reason == "downgrade"
    assert report.version == 2
