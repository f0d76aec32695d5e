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

from edgefl.appsign import SIGNATURE_FILE, public_key_line
from edgefl.edge_agent.fl import apptrust
from edgefl.edge_agent.fl.apptrust import (
    DEFAULT_CLIENTAPP,
    AppTrustPolicy,
    UntrustedAppError,
    write_policy,
)
from edgefl.edge_agent.fl.supernode import TrainingConfig
from edgefl.edge_agent.fl.warmstart import install_launcher
from edgefl.errors import ConfigError
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
    # No policy file at all: edgefl's installed ClientApp alone.
    assert AppTrustPolicy.load(tmp_path / "missing.json") == AppTrustPolicy()


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
    import os
    import signal
    import subprocess
    import time

    from edgefl.procs import cmdline

    bin_dir = install_launcher(tmp_path, warm=warm, first_wait_s=0.0, idle_exit_s=5.0)
    # A message whose Runtime API nobody serves: Flower's process keeps retrying, so
    # there is time to look at what the launcher became.
    proc = subprocess.Popen(
        [
            str(bin_dir / "flwr-clientapp"),
            "--runtime-api-address",
            "127.0.0.1:9",
            "--token",
            "ab" * 32,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "edgefl.edge_agent.fl.apptrust" not in cmdline(proc.pid):
            assert proc.poll() is None, "the launcher exited"
            assert time.monotonic() < deadline, cmdline(proc.pid)
            time.sleep(0.05)
        args = cmdline(proc.pid)
        assert args[1:3] == ["-I", "-m"]
        assert args[args.index("--policy") + 1] == str(tmp_path / "app-trust.json")
        assert not any(Path(a).name == "flwr-clientapp" and "warmstart-bin" not in a for a in args)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
