"""The Flower SuperLink as a supervised child process, and the ``flwr`` CLI that runs it.

:class:`SuperLink` starts one ``flower-superlink`` (Flower 1.41 serves its Fleet, Control
and runtime APIs over HTTP(S) on one port) with TLS, SuperNode authentication and an
on-disk ``--database``, so registered nodes and runs survive a restart. Its ServerApps run
in ``flwr-serverapp`` subprocesses that Flower starts by name, so the child's ``PATH``
starts with this interpreter's ``bin`` folder.

:class:`FlowerAdmin` drives ``flwr`` (``supernode register/unregister/list``, ``run``,
``ls``, ``stop``) against one SuperLink through a private ``FLWR_HOME`` holding a single
connection, and translates its JSON answers and failures (:class:`FlowerCommandError`).

:func:`write_run_app` writes the Flower app folder ``flwr run`` submits: a
``pyproject.toml`` whose components are edgefl's ServerApp and ClientApp (imported from
the installed package; runtime dependency installation is disabled) and whose
``[tool.flwr.app.config]`` is the flat plan (``FederationPlan.to_flat``) plus the
registry URL and run id (and ``admitted-nodes-only`` for ``edgefl server train``). Flower
only lets ``--run-config`` override keys that exist there, so the whole plan goes into the
file.

Deployed by ``edgefl server start``, the SuperLink listens on loopback only, behind the
nginx Fleet API proxy (:mod:`edgefl.server.fl.fleet_proxy`): :class:`FlowerAdmin` is for
the server host.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from edgefl.config import RenameMap, StrictModel, TlsFiles
from edgefl.errors import ConfigError, ServiceUnavailableError
from edgefl.federation import FederationPlan
from edgefl.netutil import free_port, port_open
from edgefl.process import ManagedProcess, ProcessNotReadyError, last_log_line

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "FlowerAdmin",
    "FlowerCommandError",
    "NodeInfo",
    "SuperLink",
    "SuperLinkConfig",
    "SuperLinkError",
    "flower_env",
    "write_run_app",
]

log = logging.getLogger(__name__)

CONNECTION = "edgefl"
"""Name of the one connection in the private ``FLWR_HOME``."""
_ERROR_WORDS = ("ERROR", "Error", "Failed", "error:", "refused")
"""What marks a line of a Flower log that names why it failed."""


class SuperLinkError(ServiceUnavailableError):
    """The SuperLink process did not start or died."""


class FlowerCommandError(ServiceUnavailableError):
    """A ``flwr`` command failed; the message carries Flower's own words."""


class SuperLinkConfig(StrictModel):
    """How to run the SuperLink (``edgefl server start``'s ``superlink:`` section)."""

    renamed_keys: ClassVar[RenameMap] = {
        "certfile": "tls.cert_file",
        "keyfile": "tls.key_file",
        "ca_file": "tls.ca_file",
    }

    host: str = Field("127.0.0.1", description="Address the SuperLink listens on.")
    port: int = Field(9092, ge=0, le=65535, description="Its one HTTP(S) port; 0 picks one.")
    public_address: str | None = Field(
        None, description="host:port devices dial (default: host:port)."
    )
    database: Path | None = Field(
        None, description="SQLite state file (default: <state_dir>/superlink.db)."
    )
    insecure: bool = Field(False, description="Plain HTTP and no node authentication (tests).")
    tls: TlsFiles = Field(
        default_factory=lambda: TlsFiles(),
        description="cert_file/key_file: the TLS server certificate and its key; ca_file: "
        "the CA that signed cert_file (all three, or none: edgefl server start fills them "
        "in from the fleet CA).",
    )
    node_auth: bool = Field(True, description="Only registered node keys may connect.")
    startup_timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _tls_complete(self) -> SuperLinkConfig:
        if self.insecure:
            if self.node_auth:
                # Flower refuses node authentication without TLS.
                self.node_auth = False
            return self
        t = self.tls
        given = [p for p in (t.cert_file, t.key_file, t.ca_file) if p is not None]
        if given and len(given) != 3:
            raise ValueError("tls.cert_file, tls.key_file and tls.ca_file go together")
        return self


@dataclass(frozen=True)
class NodeInfo:
    """One node as the SuperLink lists it."""

    node_id: int
    status: str
    owner: str
    raw: dict[str, Any]


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: private ``FLWR_HOME``, our ``bin`` first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{path}" if path else bin_dir,
        "PYTHONUNBUFFERED": "1",
    }


def _flower_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class SuperLink:
    """One ``flower-superlink`` child process (see the module docstring).

    Args:
        config: How to run it; ``port=0`` picks a free port once, at construction.
        workdir: Folder for its ``FLWR_HOME``, log file and (by default) database.
    """

    def __init__(self, config: SuperLinkConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.port = config.port or free_port(config.host)
        self.database = config.database or self.workdir / "superlink.db"
        self.log_path = self.workdir / "superlink.log"
        self._proc: ManagedProcess | None = None
        if not config.insecure and config.tls.cert_file is None:
            raise ConfigError(
                "superlink: TLS needs tls.cert_file, tls.key_file and tls.ca_file",
                hint="issue a server certificate with the fleet CA, or set insecure: true "
                "(tests only)",
            )

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (Fleet and Control API)."""
        return f"{self.config.host}:{self.port}"

    @property
    def public_address(self) -> str:
        """What devices dial (``public_address``, else :attr:`address`)."""
        return self.config.public_address or self.address

    @property
    def pid(self) -> int | None:
        """PID of the running process."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The ``flower-superlink`` command line."""
        c = self.config
        cmd = [_flower_bin("flower-superlink")]
        if c.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-certfile",
                str(c.tls.cert_file),
                "--ssl-keyfile",
                str(c.tls.key_file),
                "--ssl-ca-certfile",
                str(c.tls.ca_file),
            ]
            if c.node_auth:
                cmd.append("--enable-supernode-auth")
        cmd += [
            "--database",
            str(self.database),
            "--host",
            c.host,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        return cmd

    def start(self) -> None:
        """Start the process and wait until its port accepts connections.

        Raises:
            SuperLinkError: The port is taken, or it exited or did not listen in time
                (the message quotes the end of its log).
        """
        if self.running():
            return
        if port_open(self.config.host, self.port):
            raise SuperLinkError(
                f"port {self.address} is already in use",
                hint="stop what listens there or choose another superlink.port",
            )
        # Its own process group: its ServerApp subprocesses go with it.
        self._proc = ManagedProcess(
            self.command(),
            self.log_path,
            name="flower-superlink",
            env=flower_env(self.home),
            cwd=self.workdir,
            causes=_ERROR_WORDS,
        )
        pid = self._proc.start()
        log.info("started flower-superlink pid %d on %s", pid, self.address)
        try:
            self._proc.wait_for_port(
                self.config.host, self.port, self.config.startup_timeout_s, interval=0.1
            )
        except ProcessNotReadyError as exc:
            raise SuperLinkError(exc.message, hint=exc.hint) from None

    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.running()

    def exit_code(self) -> int | None:
        """Its exit code once it has exited (``None`` while running or never started)."""
        return self._proc.poll() if self._proc is not None else None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds (its whole process group)."""
        if self._proc is not None:
            self._proc.stop(timeout)  # and its leftover ServerApp subprocesses

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, for fault tests)."""
        if self._proc is not None:
            self._proc.kill()

    def last_error(self) -> str:
        """The last line of its log that reads like an error (or the last line)."""
        return last_log_line(self.log_path, causes=_ERROR_WORDS)

    def admin(self) -> FlowerAdmin:
        """A :class:`FlowerAdmin` for this SuperLink."""
        return FlowerAdmin(
            self.address,
            self.home,
            root_certificates=None if self.config.insecure else self.config.tls.ca_file,
            insecure=self.config.insecure,
        )

    def __enter__(self) -> SuperLink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FlowerAdmin:
    """The ``flwr`` CLI against one SuperLink, through a private ``FLWR_HOME``.

    Args:
        address: ``host:port`` of the SuperLink's Control API.
        home: The ``FLWR_HOME`` folder; its ``config.toml`` is (re)written here.
        root_certificates: CA certificate to verify the SuperLink (TLS).
        insecure: Plain HTTP.
        timeout_s: Longest wait for one command.
    """

    def __init__(
        self,
        address: str,
        home: Path,
        *,
        root_certificates: Path | None = None,
        insecure: bool = False,
        timeout_s: float = 120.0,
    ) -> None:
        self.address = address
        self.home = Path(home)
        self.timeout_s = timeout_s
        self.home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f"address = {json.dumps(address)}")
        if insecure:
            lines.append("insecure = true")
        elif root_certificates is not None:
            lines.append(
                f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}"
            )
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _run(self, *args: str, timeout: float | None = None) -> dict[str, Any]:
        cmd = [_flower_bin("flwr"), *args, "--format", "json"]
        try:
            proc = subprocess.run(
                cmd,
                env=flower_env(self.home),
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise FlowerCommandError(
                f"`flwr {' '.join(args)}` did not answer within {exc.timeout:g} s",
                hint=f"is the SuperLink at {self.address} up?",
            ) from exc
        out = proc.stdout.strip()
        start = out.find("{")
        try:
            doc: dict[str, Any] = json.loads(out[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            doc = {}
        if proc.returncode != 0 or not doc.get("success", False):
            reason = str(doc.get("error-message") or proc.stderr.strip() or out)
            reason = " ".join(reason.split())
            raise FlowerCommandError(
                f"`flwr {' '.join(args)}` failed: {reason[-600:]}",
                hint=f"check the SuperLink at {self.address} (edgefl server start)",
            )
        return doc

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        """Register a node public key (OpenSSH ECDSA); returns the SuperLink's node id.

        Raises:
            FlowerCommandError: Flower refused it (already registered, bad key, no link).
        """
        args = ["supernode", "register", str(public_key), CONNECTION]
        if name:
            args += ["--name", name]
        doc = self._run(*args)
        return int(doc["node-id"])

    def unregister_node(self, node_id: int) -> None:
        """Remove a node: the SuperLink refuses its key from then on.

        Raises:
            FlowerCommandError: Flower refused (unknown node id, no link).
        """
        self._run("supernode", "unregister", str(node_id), CONNECTION)

    def list_nodes(self) -> list[NodeInfo]:
        """The nodes the SuperLink knows, with their status (``registered``, ``online`` ...)."""
        doc = self._run("supernode", "list", CONNECTION)
        nodes = doc.get("nodes", [])
        return [
            NodeInfo(
                node_id=int(n["node-id"]),
                status=str(n.get("status", "")),
                owner=str(n.get("owner-name", "")),
                raw=dict(n),
            )
            for n in nodes
        ]

    def submit_run(self, app_dir: Path) -> int:
        """Start a run of the app in ``app_dir``; returns Flower's run id (no waiting).

        Raises:
            FlowerCommandError: Flower refused the app or the SuperLink is unreachable.
        """
        doc = self._run("run", str(app_dir), CONNECTION)
        return int(doc["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """``flwr ls RUN_ID``: the run's row (``status`` among its keys)."""
        doc = self._run("ls", "--run-id", str(run_id), CONNECTION)
        runs = doc.get("runs", [])
        return dict(runs[0]) if runs else {}

    def stop_run(self, run_id: int) -> None:
        """Stop a run."""
        self._run("stop", str(run_id), CONNECTION)


def write_run_app(
    directory: Path,
    plan: FederationPlan,
    *,
    registry_url: str,
    run_id: str,
    clientapp: str = "edgefl.edge_agent.fl.clientapp:app",
    admitted_only: bool = False,
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write the Flower app folder for one run of ``plan`` (see the module docstring).

    Args:
        directory: The app folder (created).
        plan: The run's plan.
        registry_url: Registry the ServerApp writes the ledger and checkpoints to. Its
            password (if any) goes into a 0600 file beside ``directory``, never into the
            app: Flower ships the app's files and run_config to every SuperNode.
        run_id: edgefl's run id (resumable).
        clientapp: The ClientApp the SuperNodes run, ``module:attribute``. A stock Flower
            ClientApp of your own goes here (put its module in ``directory``, Flower ships
            the folder's Python files to the SuperNodes); without edgefl's privacy report
            its replies are only aggregated in runs without local DP.
        admitted_only: Write ``admitted-nodes-only = true``: the ServerApp uses only
            nodes that are admitted enrollments in the registry, even while it has none
            (``edgefl server train``). Without it the ServerApp still does so whenever the
            registry has any admitted enrollment.
        signing_key: The fleet's app-signing key (:mod:`edgefl.server.fl.app_signing`):
            the app is signed, so devices that trust the key may run its own ClientApp
            code (they run only their installed ClientApps from an unsigned app); without
            it an old signature in ``directory`` is removed.

    Returns:
        ``directory`` (holding ``pyproject.toml``).
    """
    import tomli_w

    directory.mkdir(parents=True, exist_ok=True)
    from edgefl.files import write_bytes_atomic
    from edgefl.server.fl.serverapp import REGISTRY_PASSWORD_FILE, REGISTRY_PASSWORD_KEY
    from edgefl.server.registry.db import split_password

    bare_url, password = split_password(registry_url)
    config: dict[str, Any] = {**plan.to_flat(), "registry-url": bare_url, "run-id": run_id}
    if password is not None:
        secret = directory.parent / REGISTRY_PASSWORD_FILE
        write_bytes_atomic(secret, password.encode("utf-8"), mode=0o600)
        config[REGISTRY_PASSWORD_KEY] = str(secret.resolve())
    if admitted_only:
        config["admitted-nodes-only"] = True
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "edgefl-run",
            "version": "1.0.0",
            "description": "An edgefl federated run (ServerApp and ClientApp from edgefl).",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "edgefl",
                    "components": {
                        "serverapp": "edgefl.server.fl.serverapp:app",
                        "clientapp": clientapp,
                    },
                    "config": config,
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    from edgefl.appsign import SIGNATURE_FILE
    from edgefl.server.fl.app_signing import sign_app_dir

    (directory / SIGNATURE_FILE).unlink(missing_ok=True)  # it would not match any more
    if signing_key is not None:
        sign_app_dir(directory, signing_key)
    return directory
