"""A staged rollout attacked from an enrolled device: it cannot make a halting rollout go on.

The attacker holds one device's certificate and key (``dev-a``). Everything else is real
and on loopback: the shipped broker (mutual TLS, the ACL naming each admitted device),
the ingest in a child process, SQLite, the server's release key and a published release,
and the rollout controller (:class:`~edgefl.server.staged_rollout.StagedRollout`) running
as ``edgefl server rollout`` runs it. The other devices speak through their own
certificates too; the test writes what they report (the wire documents an agent sends),
so each one's behaviour is exact.

What a rollout trusts, and why the attacker gets nowhere:

- a device's *reported state* (``device_states``): the ingest writes a device's row only
  from its own ``state/reported`` topic, which only its certificate may write (else
  PUBACK 0x87), and only when the document names that device (else ``device_mismatch``);
- a device's *inference report* (``records``, ``telemetry/inference``): likewise from its
  own topic only, with the envelope's ``device_id`` equal to the topic's;
- its presence (``status``): the same;
- and every judgement is per device: one canary's failure halts the rollout whatever
  another canary claims, and accuracy is never pooled across devices, so a liar's
  "a million evaluation samples, all correct" changes its own row only.

The desired state itself is written only by the rollout identity: a device cannot write
another device's ``state/desired`` (0x87), nor its own
(``tests/security/test_broker_identity.py``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from probes.ingest import (
    NOT_AUTHORIZED,
    FleetDevice,
    IngestRig,
    MqttDevice,
    envelope,
    ingest_rig,
    wait,
)

from edgefl.errors import BadInputError
from edgefl.proto.desired import LastFailure, ReportedState
from edgefl.proto.serde import new_incarnation
from edgefl.server.registry import make_engine
from edgefl.server.release_keys import create_release_key
from edgefl.server.staged_rollout import (
    RolloutOptions,
    StagedRollout,
    choose_canaries,
    read_rollout,
)
from edgefl.testing import mosquitto_executable, wait_for

try:
    from tests.delivery_helpers import MODEL, VARIANT, write_release
except ImportError:  # run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        MODEL,
        VARIANT,
        write_release,
    )

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_executable() is None, reason="mosquitto is not installed"),
]

ATTACKER = "dev-a"
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")
TIMEOUT = 30.0


class Lab:
    """The rig, four enrolled devices online on v1, releases v1 and v2."""

    def __init__(self, rig: IngestRig, root: Path) -> None:
        self.rig = rig
        self.releases = root / "releases"
        self.devices: dict[str, FleetDevice] = {}
        self.clients: dict[str, MqttDevice] = {}
        self.seq: dict[str, int] = {}
        self.incarnation = {d: new_incarnation() for d in DEVICES}
        for name in DEVICES:
            self.devices[name] = rig.enroll(name, reload=False)
        rig.reload_broker_acl()
        create_release_key(rig.ca.directory)
        self.sha: dict[int, str] = {}
        for version in (1, 2):
            artifact = write_release(self.releases, size=4096, version=version, db_url=rig.db_url)
            self.sha[version] = hashlib.sha256(artifact).hexdigest()
        for name in DEVICES:
            client = self.clients[name] = rig.connect(self.devices[name])
            online = client.publish(self.devices[name].topic("status"), b"online", retain=True)
            assert online.value == 0, online
            self.report(name, version=1)

    def report(self, name: str, *, version: int, about: str | None = None, **kw: Any) -> Any:
        """``name`` publishes on its own ``state/reported`` a report about ``about``."""
        doc = ReportedState(
            device=about or name,
            model=MODEL,
            version=version,
            variant=VARIANT,
            sha256=self.sha[version],
            since=1,
            state=kw.pop("state", "running"),
            **kw,
        )
        return self.clients[name].publish(
            self.devices[name].topic("state/reported"), doc.to_json(), retain=True
        )

    def telemetry(
        self, name: str, *, evaluated: int, correct: int, about: str | None = None
    ) -> Any:
        """``name`` sends an inference report for v2 (with an envelope naming ``about``)."""
        self.seq[name] = self.seq.get(name, 0) + 1
        body = {
            "versions": [
                {
                    "model": MODEL,
                    "version": 2,
                    "variant": VARIANT,
                    "evaluated": evaluated,
                    "correct": correct,
                    "errors": 0,
                }
            ]
        }
        payload = envelope(
            about or name,
            self.seq[name],
            incarnation=self.incarnation[name],
            body=json.dumps(body).encode(),
            kind="telemetry",
        )
        return self.clients[name].publish(self.devices[name].topic("telemetry/inference"), payload)

    def rollout(self, rollout_id: str, **options: Any) -> tuple[threading.Thread, dict[str, Any]]:
        """Run a rollout of v2 in a thread; its outcome lands in the returned dict."""
        controller = StagedRollout(
            RolloutOptions(MODEL, 2, variant=VARIANT, **options),
            ca_dir=self.rig.ca.directory,
            db_url=self.rig.db_url,
            releases_dir=self.releases,
            broker_host="127.0.0.1",
            broker_port=self.rig.broker.port,
            rollout_id=rollout_id,
            poll_s=0.1,
        )
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["status"] = controller.run()
            except BaseException as exc:  # reported to the test
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, outcome

    def status(self, rollout_id: str) -> dict[str, Any] | None:
        engine = make_engine(self.rig.db_url)
        try:
            return read_rollout(engine, rollout_id)
        except BadInputError:  # not recorded yet
            return None
        finally:
            engine.dispose()

    def wait_published(self, rollout_id: str, devices: list[str]) -> None:
        def published() -> bool:
            status = self.status(rollout_id)
            return status is not None and all(
                d["published_at"] for d in status["devices"] if d["device_id"] in devices
            )

        wait(published, TIMEOUT, f"the rollout to publish to {devices}")


def _rollout_id(canary_attacker: bool) -> str:
    """An id whose two canaries (of four) include the attacker or not."""
    for n in range(1000):
        rid = f"r-sec{n:04d}"
        if (ATTACKER in choose_canaries(rid, DEVICES, 0.5)) == canary_attacker:
            return rid
    raise AssertionError("no such rollout id")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("rollout-control")
    with ingest_rig(root / "rig") as rig:
        yield Lab(rig, root)


def test_forged_reports_do_not_make_a_failing_canary_cohort_proceed(lab: Lab) -> None:
    rid = _rollout_id(canary_attacker=False)
    canaries = choose_canaries(rid, DEVICES, 0.5)
    failing, healthy = canaries
    rest = [d for d in DEVICES if d not in canaries]
    thread, outcome = lab.rollout(rid, canary=0.5, soak_s=0.5, install_timeout_s=5.0)
    lab.wait_published(rid, canaries)
    # The honest canaries: one refuses v2 (its golden vectors), one installs it.
    failure = LastFailure(version=2, reason="golden_mismatch", detail="top-1 0%", at=1)
    assert lab.report(failing, version=1, state="failed", last_failure=failure).value == 0
    assert lab.report(healthy, version=2).value == 0
    # The attacker: the failing canary's report, on its topic and on its own...
    forged = lab.clients[ATTACKER].publish(
        lab.devices[failing].topic("state/reported"),
        ReportedState(
            device=failing,
            model=MODEL,
            version=2,
            variant=VARIANT,
            sha256=lab.sha[2],
            state="running",
        ).to_json(),
        retain=True,
    )
    assert forged.value == NOT_AUTHORIZED
    assert lab.report(ATTACKER, version=2, about=failing).value == 0  # accepted by the broker...
    # ...a desired state of its own making for a device of the rest...
    other = next(d for d in rest if d != ATTACKER)
    desired = lab.clients[ATTACKER].publish(
        lab.devices[other].topic("state/desired"), b'{"forged": true}', retain=True
    )
    assert desired.value == NOT_AUTHORIZED
    # ...and its own lie: it runs v2 already.
    assert lab.report(ATTACKER, version=2).value == 0
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    status = outcome["status"]
    assert status["state"] == "halted", status["reason"]
    assert f"{failing}: golden_mismatch" in status["reason"]
    devices = {d["device_id"]: d for d in status["devices"]}
    assert devices[failing]["state"] != "installed"
    assert devices[failing]["now"]["version"] == 1  # the forged v2 never reached its row
    for name in rest:
        # Never published to: the attacker's own lie moved nothing but its own row.
        assert (devices[name]["state"], devices[name]["published_at"]) == ("pending", None)
    assert devices[ATTACKER]["now"]["version"] == 2
    # The report naming another device was dead-lettered by the ingest.
    assert lab.rig.dead_letters(ATTACKER)["device_mismatch"] >= 1


def test_a_liars_accuracy_is_its_own_and_cannot_outvote_an_honest_canary(lab: Lab) -> None:
    rid = _rollout_id(canary_attacker=True)
    canaries = choose_canaries(rid, DEVICES, 0.5)
    (honest,) = [d for d in canaries if d != ATTACKER]
    rest = [d for d in DEVICES if d not in canaries]
    for name in DEVICES:  # back on v1 after the first attack
        assert lab.report(name, version=1).value == 0
    thread, outcome = lab.rollout(
        rid, canary=0.5, soak_s=0.5, min_accuracy=0.8, min_evaluated=20, install_timeout_s=5.0
    )
    lab.wait_published(rid, canaries)
    # Both canaries install v2; the honest one measures 40% on 50 held-out samples.
    assert lab.report(honest, version=2).value == 0
    assert lab.report(ATTACKER, version=2).value == 0
    assert lab.telemetry(honest, evaluated=50, correct=20).value == 0
    # The attacker claims a million samples, all correct (pooled, it would be 99.997%),
    # and tries to speak for the honest canary: on its topic, and in its own envelope.
    assert lab.telemetry(ATTACKER, evaluated=1_000_000, correct=1_000_000).value == 0
    assert lab.telemetry(ATTACKER, evaluated=50, correct=50, about=honest).value == 0
    forged = lab.clients[ATTACKER].publish(
        lab.devices[honest].topic("telemetry/inference"),
        envelope(honest, 99, incarnation=new_incarnation(), body=b"{}", kind="telemetry"),
    )
    assert forged.value == NOT_AUTHORIZED
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    status = outcome["status"]
    assert status["state"] == "halted", status["reason"]
    assert f"{honest}: accuracy_below_floor: 40.0%" in status["reason"]
    devices = {d["device_id"]: d for d in status["devices"]}
    assert (devices[honest]["accuracy"], devices[honest]["evaluated"]) == (0.4, 50)
    assert devices[ATTACKER]["accuracy"] == 1.0  # its lie, on its own row
    assert devices[ATTACKER]["evaluated"] == 1_000_000
    for name in rest:
        assert (devices[name]["state"], devices[name]["published_at"]) == ("pending", None)
    # The refused telemetry is dead-lettered by the ingest, which may still be storing it.
    wait_for(
        lambda: lab.rig.dead_letters(ATTACKER)["device_mismatch"] >= 2,
        TIMEOUT,
        "the attacker's mismatched telemetry dead-lettered",
    )
