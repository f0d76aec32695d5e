"""Attack: make devices run the attacker's ClientApp code (``untrusted_app_on_device``).

The attacker can start runs on the SuperLink (its Control API, or a compromised server)
but holds no fleet app-signing key. End to end (slow): real SuperLink and a SuperNode
supervised as the agent does, through ``probes.device_trust``. The rest checks the
device's gate directly on bundles Flower's own build makes, with no processes.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.cli.build import build_fab_from_disk
from probes.device_trust import REFUSAL, probe_untrusted_app_on_device
from pydantic import ValidationError

from edgefl.appsign import SIGNATURE_FILE, key_id, public_key_line
from edgefl.edge_agent.fl import apptrust
from edgefl.edge_agent.fl.apptrust import (
    DEFAULT_CLIENTAPP,
    AppTrustPolicy,
    UntrustedAppError,
    write_policy,
)
from edgefl.edge_agent.fl.supernode import TrainingConfig
from edgefl.edge_agent.fl.warmstart import install_launcher
from edgefl.errors import BadInputError, ConfigError
from edgefl.server.fl.app_signing import (
    app_signing_key_path,
    create_app_signing_key,
    load_app_signing_key,
    sign_app_dir,
)


@pytest.mark.slow
def test_a_device_runs_only_clientapp_code_it_trusts(tmp_path: Path) -> None:
    outcome = probe_untrusted_app_on_device(tmp_path)
    assert outcome.problems == []
    # The attacker's module never ran, not even its import; the server got the refusal.
    assert outcome.markers == {"attacker": False, "shadow": False, "signed": True}
    [attack] = outcome.replies["attacker"]
    assert REFUSAL in attack["error"]
    assert "'attacker_app:app'" in attack["error"]
    assert "which this device does not trust" in attack["error"]
    assert len(attack["error"]) <= 300  # the ServerApp keeps 300 characters of a reason
    # The bundle that shadows edgefl's package got the installed ClientApp, which
    # answered the probe's bare message as edgefl's does (its train config is missing).
    [shadow] = outcome.replies["shadow"]
    assert "train config from the server is incomplete" in shadow["error"]
    [signed] = outcome.replies["signed"]
    assert signed == {"error": None, "keys": ["result"]}
    supernode_log = (tmp_path / "device" / "supernode.log").read_text(errors="replace")
    assert "edgefl app trust: edgefl refused the app bundle probe/attacker-app" in supernode_log
    # The agent counts the refusal and shows it in its status.
    assert outcome.device_status["refused_apps"] == 1
    assert outcome.device_status["last_refusal"].startswith(
        "edgefl refused the app bundle probe/attacker-app"
    )


# ------------------------------------------------------------- the gate, no processes


def _app(directory: Path, clientapp: str, files: dict[str, str] | None = None) -> Path:
    import tomli_w

    directory.mkdir(parents=True)
    doc: dict[str, Any] = {
        "project": {"name": "some-app", "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "someone",
                    "components": {"serverapp": "server:app", "clientapp": clientapp},
                    "config": {},
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(doc))
    (directory / "server.py").write_text("app = None\n")
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def fleet_key(tmp_path: Path) -> tuple[ed25519.Ed25519PrivateKey, str]:
    line = create_app_signing_key(tmp_path / "server")
    key = load_app_signing_key(tmp_path / "server")
    assert key is not None
    return key, line


def test_the_app_signing_key_is_kept_apart_from_the_ca_key(tmp_path: Path) -> None:
    line = create_app_signing_key(tmp_path)
    path = app_signing_key_path(tmp_path)
    assert path.parent.name == "app-signing"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert line.startswith("ssh-ed25519 ")
    with pytest.raises(ConfigError, match="already exists"):
        create_app_signing_key(tmp_path)


def test_a_tampered_fleet_signed_bundle_is_refused(
    tmp_path: Path, fleet_key: tuple[ed25519.Ed25519PrivateKey, str]
) -> None:
    key, line = fleet_key
    app = _app(tmp_path / "app", "byo:app", {"byo.py": "app = 1\n"})
    sign_app_dir(app, key)
    policy = AppTrustPolicy.build([], [line])
    assert policy.admit(build_fab_from_disk(app)).kind == "signed"
    (app / "byo.py").write_text("import os; os.system('id')\n")  # after signing
    with pytest.raises(UntrustedAppError, match="does not match the bundle's files"):
        policy.admit(build_fab_from_disk(app))
    (app / "extra.py").write_text("x = 1\n")  # a file nobody signed
    with pytest.raises(UntrustedAppError, match="does not match"):
        policy.admit(build_fab_from_disk(app))


def test_an_unsigned_or_foreign_bundle_is_refused_and_names_its_clientapp(
    tmp_path: Path, fleet_key: tuple[ed25519.Ed25519PrivateKey, str]
) -> None:
    _, line = fleet_key
    policy = AppTrustPolicy.build([], [line])
    unsigned = _app(tmp_path / "a", "evil:app", {"evil.py": "app = 1\n"})
    with pytest.raises(UntrustedAppError, match=r"'evil:app'.*the bundle is not signed"):
        policy.admit(build_fab_from_disk(unsigned))
    foreign = _app(tmp_path / "b", "evil:app", {"evil.py": "app = 1\n"})
    sign_app_dir(foreign, ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(UntrustedAppError, match="which this device does not trust"):
        policy.admit(build_fab_from_disk(foreign))
    # A device with no keys at all trusts no signature.
    with pytest.raises(UntrustedAppError):
        AppTrustPolicy().admit(build_fab_from_disk(foreign))


def test_an_allowlisted_installed_app_is_loaded_from_the_installed_packages(
    tmp_path: Path,
) -> None:
    app = _app(
        tmp_path / "app",
        "edgefl_byo.client:app",
        {"edgefl_byo.py": "raise SystemExit('bundle code ran')\n"},
    )
    fab = build_fab_from_disk(app)
    with pytest.raises(UntrustedAppError):
        AppTrustPolicy().admit(fab)
    policy = AppTrustPolicy.build(["edgefl_byo.client:app"], [])
    admission = policy.admit(fab)
    assert (admission.kind, admission.clientapp) == ("installed", "edgefl_byo.client:app")
    # Admitted by name, it is imported from the device's packages, where it is not:
    # the bundle's own module is never a candidate.
    with pytest.raises(UntrustedAppError, match="not installed on this device"):
        apptrust._load_installed(admission.clientapp)
    assert apptrust._load_installed(DEFAULT_CLIENTAPP).__class__.__name__ == "ClientApp"


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buf.getvalue()


def test_ambiguous_or_broken_bundles_are_refused(tmp_path: Path) -> None:
    import warnings

    pyproject = b'[tool.flwr.app.components]\nclientapp = "edgefl.edge_agent.fl.clientapp:app"\n'
    policy = AppTrustPolicy()
    assert policy.admit(_zip([("pyproject.toml", pyproject)])).kind == "installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        duplicate = _zip([("pyproject.toml", pyproject), ("pyproject.toml", pyproject)])
    for bad in (
        b"not a zip",
        _zip([("x.py", b"")]),  # no pyproject
        duplicate,
        _zip([("pyproject.toml", pyproject), ("../evil.py", b"")]),
        _zip([("pyproject.toml", pyproject), ("/abs.py", b"")]),
        _zip([("pyproject.toml", b"[tool.flwr.app.components]\nclientapp = 3\n")]),
    ):
        with pytest.raises(UntrustedAppError, match="unreadable"):
            policy.admit(bad)


def test_the_gate_fails_closed(tmp_path: Path) -> None:
    bad = tmp_path / "app-trust.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable app trust policy"):
        AppTrustPolicy.load(bad)
    gate = apptrust._Gate(None, "unreadable app trust policy")
    with pytest.raises(UntrustedAppError, match="refused every app bundle"):
        gate._admit(b"")

    class NotFlower:
        pull_task_input = install_from_fab = get_load_client_app_fn = print

    with pytest.raises(RuntimeError, match="install_app_dependencies"):
        apptrust._Gate(AppTrustPolicy()).install(NotFlower())
    # No policy file at all: edgefl's installed ClientApp alone (no key is pinned here).
    alone = AppTrustPolicy.load(tmp_path / "missing.json")
    assert (alone.trusted_clientapps, dict(alone.signing_keys)) == ((DEFAULT_CLIENTAPP,), {})
    # Pinned keys that cannot be read refuse everything, as a bad policy does.
    (tmp_path / "identity").mkdir()
    (tmp_path / "identity" / "app-signing.pub").write_text("ssh-ed25519 garbage\n")
    with pytest.raises(ValueError, match="unreadable pinned app-signing keys"):
        AppTrustPolicy.load(tmp_path / "missing.json")


def test_the_config_validates_and_writes_the_policy(
    tmp_path: Path, fleet_key: tuple[ed25519.Ed25519PrivateKey, str]
) -> None:
    key, line = fleet_key
    pub_file = tmp_path / "fleet.pub"
    pub_file.write_text(public_key_line(key.public_key()))
    config = TrainingConfig.model_validate(
        {
            "superlink": "127.0.0.1:9",
            "trusted_clientapps": ["mypkg.client:app"],
            "app_signing_keys": [line, str(pub_file)],
        }
    )
    path = tmp_path / "app-trust.json"
    write_policy(path, config.trusted_clientapps, config.app_signing_keys)
    policy = AppTrustPolicy.load(path)
    assert policy.trusted_clientapps == (DEFAULT_CLIENTAPP, "mypkg.client:app")
    assert len(policy.signing_keys) == 1  # the same key twice
    assert json.loads(path.read_text())["trusted_clientapps"] == ["mypkg.client:app"]
    for bad, why in (
        ({"trusted_clientapps": ["not a ref"]}, "not a ClientApp reference"),
        ({"app_signing_keys": ["ssh-rsa AAAA"]}, "not a public key"),
        ({"app_signing_keys": [str(tmp_path / "nope.pub")]}, "No such file"),
    ):
        with pytest.raises(ValidationError, match=why):
            TrainingConfig.model_validate({"superlink": "127.0.0.1:9", **bad})
    assert SIGNATURE_FILE.endswith(".json")  # Flower's build packs .json files


@pytest.mark.parametrize("warm", [False, True])
def test_a_cold_start_runs_behind_the_gate_never_the_stock_clientapp(
    tmp_path: Path, warm: bool
) -> None:
    import time

    from edgefl.process import ManagedProcess
    from edgefl.procs import cmdline

    bin_dir = install_launcher(tmp_path, warm=warm, first_wait_s=0.0, idle_exit_s=5.0)
    # A message whose Runtime API nobody serves: Flower's process keeps retrying, so
    # there is time to look at what the launcher became.
    proc = ManagedProcess(
        [
            str(bin_dir / "flwr-clientapp"),
            "--runtime-api-address",
            "127.0.0.1:9",
            "--token",
            "ab" * 32,
        ],
        tmp_path / "launcher.log",
    )
    pid = proc.start()
    try:
        deadline = time.monotonic() + 30
        while "edgefl.edge_agent.fl.apptrust" not in cmdline(pid):
            assert proc.poll() is None, "the launcher exited"
            assert time.monotonic() < deadline, cmdline(pid)
            time.sleep(0.05)
        args = cmdline(pid)
        assert args[1:3] == ["-I", "-m"]
        assert args[args.index("--policy") + 1] == str(tmp_path / "app-trust.json")
        assert not any(Path(a).name == "flwr-clientapp" and "warmstart-bin" not in a for a in args)
    finally:
        proc.kill()


# ------------------------------------------------- the key pinned at enrollment


def test_the_gate_trusts_the_key_pinned_by_the_installed_enrollment_bundle(
    tmp_path: Path, fleet_key: tuple[ed25519.Ed25519PrivateKey, str]
) -> None:
    """The device's config lists no app-signing key: the one its enrollment bundle
    brought is trusted all the same, and a config cannot take it away."""
    from cryptography import x509

    from edgefl.edge_agent.identity import install_bundle, prepare_enrollment
    from edgefl.enrollment import EnrollmentBundle, IdentityPaths, write_json_document
    from edgefl.server.fl.app_signing import app_signing_public_keys
    from edgefl.server.fleet_ca import FleetCA

    key, line = fleet_key
    # What `edgefl server admit` writes, as far as the device can tell (the SuperLink's
    # node registration is left out: tests/test_enrollment.py runs the real one).
    ca = FleetCA.create(tmp_path / "ca")
    state = tmp_path / "device"
    request = prepare_enrollment("pi-app", "lab", state).request
    issued = ca.issue_device_cert("pi-app", csr=x509.load_pem_x509_csr(request.csr_pem.encode()))
    bundle = EnrollmentBundle(
        device_id="pi-app",
        fleet="lab",
        cert_pem=issued.cert_pem.decode(),
        ca_pem=ca.cert_pem.decode(),
        cert_serial=f"{issued.serial:x}",
        node_id="7",
        app_signing_keys=app_signing_public_keys(tmp_path / "server"),
    )
    assert bundle.app_signing_keys == [line]
    write_json_document(tmp_path / "bundle.json", bundle)
    install_bundle(tmp_path / "bundle.json", "pi-app", "lab", state)
    pinned = IdentityPaths(state).app_signing_keys
    assert pinned.read_text() == line + "\n"

    app = _app(tmp_path / "app", "byo:app", {"byo.py": "app = 1\n"})
    sign_app_dir(app, key)
    fab = build_fab_from_disk(app)
    write_policy(state / apptrust.POLICY_FILE, [], [])  # the config adds nothing
    policy = AppTrustPolicy.load(state / apptrust.POLICY_FILE)
    admission = policy.admit(fab, "someone/some-app", "1")
    assert (admission.kind, admission.key_id) == ("signed", key_id(key.public_key()))
    # Another key in the config adds to the pinned one, it does not replace it.
    other = public_key_line(ed25519.Ed25519PrivateKey.generate().public_key())
    write_policy(state / apptrust.POLICY_FILE, [], [other])
    assert AppTrustPolicy.load(state / apptrust.POLICY_FILE).admit(fab, "", "1").kind == "signed"
    # A bundle without keys, installed later, leaves none pinned: the gate refuses.
    write_json_document(
        tmp_path / "bundle.json", bundle.model_copy(update={"app_signing_keys": []})
    )
    install_bundle(tmp_path / "bundle.json", "pi-app", "lab", state)
    assert not pinned.exists()
    with pytest.raises(UntrustedAppError, match="which this device does not trust"):
        AppTrustPolicy.load(state / apptrust.POLICY_FILE).admit(fab, "", "1")


def test_a_bundle_with_a_malformed_app_signing_key_is_refused_on_install(
    tmp_path: Path,
) -> None:
    from edgefl.enrollment import read_bundle

    doc = {
        "device_id": "pi-app",
        "fleet": "lab",
        "cert_pem": "x",
        "ca_pem": "x",
        "cert_serial": "1",
        "node_id": "7",
        "app_signing_keys": ["ssh-rsa AAAAB3NzaC1yc2E"],
    }
    path = tmp_path / "bundle.json"
    for bad in (["ssh-rsa AAAAB3NzaC1yc2E"], ["ssh-ed25519 AAAA\nssh-ed25519 BBBB"]):
        path.write_text(json.dumps({**doc, "app_signing_keys": bad}))
        with pytest.raises(BadInputError, match="app_signing_keys"):
            read_bundle(path)


# --------------------------------------------------------- rollback and replay


def test_an_older_signed_bundle_replayed_after_a_newer_one_is_refused(
    tmp_path: Path, fleet_key: tuple[ed25519.Ed25519PrivateKey, str]
) -> None:
    """The attacker starts runs (but holds no key) and sends a bundle the fleet signed
    before it signed a newer one: validly signed, and refused as a rollback."""
    key, line = fleet_key
    state = tmp_path / "device"
    state.mkdir()
    write_policy(state / apptrust.POLICY_FILE, [], [line])

    def policy() -> AppTrustPolicy:  # each ClientApp process loads it anew
        return AppTrustPolicy.load(state / apptrust.POLICY_FILE)

    t0 = 1_700_000_000
    old = _app(tmp_path / "v1", "byo:app", {"byo.py": "app = 'v1, with the bug'\n"})
    sign_app_dir(old, key, signed_at=t0)
    new = _app(tmp_path / "v2", "byo:app", {"byo.py": "app = 'v2, fixed'\n"})
    sign_app_dir(new, key, signed_at=t0 + 3600)
    old_fab, new_fab = build_fab_from_disk(old), build_fab_from_disk(new)

    assert policy().admit(old_fab, "someone/app", "101").kind == "signed"
    assert policy().admit(new_fab, "someone/app", "102").kind == "signed"
    # Every round of a run sends its bundle again: run 101 keeps running.
    assert policy().admit(old_fab, "someone/app", "101").kind == "signed"
    # The old bundle in a new run is a rollback, refused with the reason.
    with pytest.raises(UntrustedAppError) as refused:
        policy().admit(old_fab, "someone/app", "666")
    reason = str(refused.value)
    assert "someone/app" in reason
    assert f"by key {key_id(key.public_key())} is a rollback" in reason
    assert (
        "signed at 2023-11-14T22:13:20Z, older than the newest accepted 2023-11-14T23:13:20Z"
        in reason
    )
    assert len(reason) <= 300  # what the ServerApp keeps of a reason
    # Also without a run id; the memory is on disk, so every new process refuses it.
    with pytest.raises(UntrustedAppError, match="rollback"):
        policy().admit(old_fab, "", "")
    seen = state / apptrust.SEEN_FILE
    assert seen.stat().st_mode & 0o777 == 0o600
    # The same (newest) bundle re-run under a new run id is accepted.
    assert policy().admit(new_fab, "someone/app", "103").kind == "signed"
    # Signed a little before the newest (two runs started close together): accepted.
    close = _app(tmp_path / "v3", "byo:app", {"byo.py": "app = 'v3'\n"})
    sign_app_dir(close, key, signed_at=t0 + 3600 - 60)
    assert policy().admit(build_fab_from_disk(close), "someone/app", "104").kind == "signed"
    # Nothing the attacker can do to the run id helps: a replayed run id with another
    # bundle is judged by its timestamp.
    with pytest.raises(UntrustedAppError, match="rollback"):
        policy().admit(old_fab, "someone/app", "102")


def test_a_rollback_memory_that_cannot_be_read_refuses_signed_bundles(
    tmp_path: Path, fleet_key: tuple[ed25519.Ed25519PrivateKey, str]
) -> None:
    key, line = fleet_key
    state = tmp_path / "device"
    state.mkdir()
    write_policy(state / apptrust.POLICY_FILE, [], [line])
    app = _app(tmp_path / "app", "byo:app", {"byo.py": "app = 1\n"})
    sign_app_dir(app, key)
    (state / apptrust.SEEN_FILE).write_text("[1, 2]")
    policy = AppTrustPolicy.load(state / apptrust.POLICY_FILE)
    with pytest.raises(UntrustedAppError, match=r"rollback memory .* cannot be used"):
        policy.admit(build_fab_from_disk(app), "", "1")
    # Installed code does not depend on it.
    installed = _app(tmp_path / "inst", DEFAULT_CLIENTAPP)
    assert policy.admit(build_fab_from_disk(installed)).kind == "installed"


def test_the_rollback_rule_keeps_a_bounded_memory_per_key() -> None:
    from edgefl.appsign import MAX_REMEMBERED_RUNS, SignedBundle, check_rollback

    state: dict[str, Any] = {}
    for run in range(MAX_REMEMBERED_RUNS + 10):
        state = check_rollback(state, SignedBundle("k1", 1000 + run, f"d{run}"), str(run))
    runs = state["keys"]["k1"]["runs"]
    assert len(runs) == MAX_REMEMBERED_RUNS
    assert "0" not in runs
    assert str(MAX_REMEMBERED_RUNS + 9) in runs
    # Another key's memory starts on its own (a new key after a clock accident).
    state = check_rollback(state, SignedBundle("k2", 5, "x"), "1")
    assert state["keys"]["k2"]["newest"] == 5
    with pytest.raises(ValueError, match="malformed"):
        check_rollback({"keys": {"k1": {"newest": "soon"}}}, SignedBundle("k1", 1, "d"), "")


def _admit_runs(policy_path: str, fab: bytes, runs: list[str]) -> None:
    policy = AppTrustPolicy.load(Path(policy_path))
    for run in runs:
        policy.admit(fab, "someone/app", run)


def test_clientapp_processes_admitting_at_once_lose_no_run(
    tmp_path: Path, fleet_key: tuple[ed25519.Ed25519PrivateKey, str]
) -> None:
    """One ClientApp process per message: their check-and-record must not lose updates
    (a lost run would be refused as a rollback on its next round)."""
    import multiprocessing

    key, line = fleet_key
    state = tmp_path / "device"
    state.mkdir()
    write_policy(state / apptrust.POLICY_FILE, [], [line])
    app = _app(tmp_path / "app", "byo:app", {"byo.py": "app = 1\n"})
    sign_app_dir(app, key)
    fab = build_fab_from_disk(app)
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_admit_runs,
            args=(str(state / apptrust.POLICY_FILE), fab, [f"{w}-{i}" for i in range(15)]),
        )
        for w in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    [memory] = json.loads((state / apptrust.SEEN_FILE).read_text())["keys"].values()
    assert len(memory["runs"]) == 60
