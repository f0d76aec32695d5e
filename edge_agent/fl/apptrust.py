"""The device's gate on ClientApp code: which app bundles it runs, checked before any runs.

Flower's SuperNode runs whatever ClientApp the app bundle (FAB) of a run names, with the
agent's user, beside the device's keys and outbox; whoever can start a run chooses it.
Flower's own ``--trusted-entities`` check needs Flower Hub verifications that a
self-hosted SuperLink never adds. So edgefl's ``flwr-clientapp`` (the launcher on the
SuperNode's ``PATH``, :mod:`edgefl.edge_agent.fl.warmstart`) runs Flower's ClientApp
process through :func:`run_gated`, which admits a bundle in one of two ways:

- **installed code**: the bundle's ``[tool.flwr.app.components] clientapp`` is edgefl's
  ClientApp (:data:`DEFAULT_CLIENTAPP`) or one the agent config allowlists
  (``training.trusted_clientapps``, for a bring-your-own app installed on the device).
  The bundle is then never extracted nor put on ``sys.path``: the ClientApp is imported
  from the device's installed packages, so files in the bundle (an ``edgefl/`` package,
  a ``torch.py``) cannot shadow it, and its dependencies are never installed;
- **a signed bundle**: its :data:`edgefl.appsign.SIGNATURE_FILE` verifies with one of the
  fleet app-signing keys the device trusts: those its enrollment bundle brought (pinned in
  ``<state_dir>/identity/app-signing.pub``; the config cannot remove them) and those in
  ``training.app_signing_keys`` (:mod:`edgefl.appsign`), and it is no rollback: not older
  than a bundle the device already accepted (:func:`edgefl.appsign.check_rollback`, its
  memory in ``<state_dir>/app-trust-seen.json``). Flower then installs and loads it as
  usual.

Anything else is refused, failing closed: an unreadable trust policy, a bundle that cannot
be read unambiguously, or hooks that no longer fit Flower's code all refuse. The refusal
is raised inside Flower's ``run_clientapp`` after the message was pulled, so Flower sends
the server an error reply whose reason carries the refusal (and the SuperNode's log the
traceback); no bundle code has run by then.

The policy reaches the gate as a JSON file the supervisor writes
(``<state_dir>/app-trust.json``, :func:`write_policy`); without the file only edgefl's
installed ClientApp and bundles signed by the pinned keys are admitted. The pinned keys
and the rollback memory are found beside it, in the same state dir.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefl.appsign import (
    PINNED_KEYS_FILE,
    BundleError,
    RollbackError,
    SignedBundle,
    check_rollback,
    key_id,
    load_public_key,
    load_public_keys,
    read_bundle,
    verify_bundle,
)
from edgefl.edge_agent.fl.warmstart import POLICY_FILE
from edgefl.files import write_bytes_atomic, write_text_atomic

__all__ = [
    "CLIENTAPP_REF",
    "DEFAULT_CLIENTAPP",
    "POLICY_FILE",
    "SEEN_FILE",
    "Admission",
    "AppTrustPolicy",
    "UntrustedAppError",
    "main",
    "run_gated",
    "write_policy",
]

logger = logging.getLogger(__name__)

DEFAULT_CLIENTAPP: Final = "edgefl.edge_agent.fl.clientapp:app"
CLIENTAPP_REF: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
"""``module.path:attribute``, as Flower's ``components.clientapp`` names a ClientApp."""
SEEN_FILE: Final = "app-trust-seen.json"
"""In the state dir: the signed bundles accepted so far (:func:`edgefl.appsign.check_rollback`)."""
_IDENTITY_DIR: Final = "identity"  # edgefl.enrollment.IDENTITY_DIR, not imported: cold start
_HOOKED: Final = (
    "pull_task_input",
    "install_from_fab",
    "install_app_dependencies",
    "get_load_client_app_fn",
)


class UntrustedAppError(Exception):
    """The device refused to run an app bundle's ClientApp (the reason says why)."""


@dataclass(frozen=True)
class Admission:
    """Why a bundle may run, and how its ClientApp is loaded."""

    kind: Literal["installed", "signed"]
    clientapp: str
    key_id: str = ""


@dataclass(frozen=True)
class AppTrustPolicy:
    """Which ClientApps the device runs: installed ones by name, others signed."""

    trusted_clientapps: tuple[str, ...] = (DEFAULT_CLIENTAPP,)
    signing_keys: Mapping[str, ed25519.Ed25519PublicKey] = field(default_factory=dict)
    seen_path: Path | None = None
    """The rollback memory (:data:`SEEN_FILE`); ``None``: no rollback check (tests)."""

    @classmethod
    def build(
        cls,
        trusted_clientapps: list[str],
        signing_keys: list[str],
        *,
        pinned_keys: list[ed25519.Ed25519PublicKey] | None = None,
        seen_path: Path | None = None,
    ) -> AppTrustPolicy:
        """A policy of edgefl's ClientApp plus ``trusted_clientapps``, and keys (OpenSSH/PEM).

        Args:
            trusted_clientapps: Installed ClientApps admitted by name.
            signing_keys: The config's app-signing keys.
            pinned_keys: The keys the enrollment bundle brought (trusted as well).
            seen_path: Where the rollback memory is kept (``None``: not checked).

        Raises:
            ValueError: A malformed ClientApp reference or key.
        """
        for ref in trusted_clientapps:
            if not CLIENTAPP_REF.match(ref):
                raise ValueError(f"{ref!r} is not a ClientApp reference 'module.path:attribute'")
        keys = [*(pinned_keys or []), *(load_public_key(k) for k in signing_keys)]
        refs = tuple(dict.fromkeys([DEFAULT_CLIENTAPP, *trusted_clientapps]))
        return cls(refs, {key_id(k): k for k in keys}, seen_path)

    @classmethod
    def load(cls, path: Path | None) -> AppTrustPolicy:
        """The policy in ``path``, the pinned keys and rollback memory of its state dir.

        ``path`` is ``<state_dir>/app-trust.json``. Without the file: edgefl's ClientApp
        and bundles signed by the keys pinned in ``<state_dir>/identity/`` alone.

        Raises:
            ValueError: The file or the pinned keys exist but cannot be read or parsed
                (fail closed).
        """
        if path is None:
            return cls()
        pinned_path = path.parent / _IDENTITY_DIR / PINNED_KEYS_FILE
        try:
            pinned = (
                load_public_keys(pinned_path.read_text(encoding="ascii"))
                if pinned_path.exists()
                else []
            )
        except (OSError, ValueError) as exc:
            raise ValueError(f"unreadable pinned app-signing keys {pinned_path}: {exc}") from exc
        seen = path.parent / SEEN_FILE
        if not path.exists():
            return cls.build([], [], pinned_keys=pinned, seen_path=seen)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return cls.build(
                list(doc.get("trusted_clientapps", [])),
                list(doc.get("app_signing_keys", [])),
                pinned_keys=pinned,
                seen_path=seen,
            )
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"unreadable app trust policy {path}: {exc}") from exc

    def admit(self, fab: bytes, fab_id: str = "", run_id: str = "") -> Admission:
        """Admit the bundle ``fab`` or refuse it; nothing of it is executed here.

        A signed bundle is also checked against, and recorded in, the rollback memory
        (:attr:`seen_path`) before this returns.

        Args:
            fab: The bundle's bytes.
            fab_id: Its Flower name, for the reason.
            run_id: The run that sent it (rollback rule 1 of :mod:`edgefl.appsign`).

        Raises:
            UntrustedAppError: The bundle names a ClientApp that is neither installed and
                trusted nor in a bundle signed by a trusted key, or its signature is
                older than a bundle this device already accepted (a rollback).
        """
        name = f"app bundle {fab_id[:48]}" if fab_id else "app bundle"
        try:
            entries = read_bundle(fab)
            config = tomllib.loads(entries["pyproject.toml"].decode("utf-8"))
            ref = config["tool"]["flwr"]["app"]["components"]["clientapp"]
            if not isinstance(ref, str):
                raise TypeError("components.clientapp is not a string")
        except (BundleError, KeyError, TypeError, ValueError) as exc:
            raise UntrustedAppError(f"edgefl refused the {name}: unreadable ({exc})") from None
        if ref in self.trusted_clientapps:
            return Admission("installed", ref)
        try:
            signed = verify_bundle(entries, self.signing_keys)
        except BundleError as exc:
            raise UntrustedAppError(
                f"edgefl refused the {name}: its ClientApp {ref[:80]!r} is not installed code "
                f"this device trusts (training.trusted_clientapps) and {exc}"
            ) from None
        if self.seen_path is not None:
            try:
                _remember(self.seen_path, signed, run_id)
            except RollbackError as exc:
                raise UntrustedAppError(f"edgefl refused the {name}: {exc}") from None
            except (OSError, ValueError) as exc:
                raise UntrustedAppError(
                    f"edgefl refused the {name}: its rollback memory {self.seen_path} "
                    f"cannot be used ({exc}); remove the file to start it again"
                ) from None
        return Admission("signed", ref, signed.key_id)


def _remember(seen_path: Path, signed: SignedBundle, run_id: str) -> None:
    """Check ``signed`` against the rollback memory and record it, under a lock.

    The lock makes the check and the write one step for the ClientApp processes that
    admit messages at the same time (one per message, forked or cold).

    Raises:
        RollbackError: The bundle is a rollback (nothing is written).
        OSError: The memory cannot be read, locked or written.
        ValueError: The memory is not JSON this gate wrote.
    """
    fd = os.open(seen_path.with_name(seen_path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            state: Any = json.loads(seen_path.read_bytes())
        except FileNotFoundError:
            state = {}
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        updated = check_rollback(state, signed, run_id)
        if updated != state:
            # fsynced before the code runs: a crash cannot make the device forget it.
            data = (json.dumps(updated, indent=1, sort_keys=True) + "\n").encode()
            write_bytes_atomic(seen_path, data, mode=0o600)
    finally:
        os.close(fd)  # releases the lock


def write_policy(path: Path, trusted_clientapps: list[str], signing_keys: list[str]) -> None:
    """Write the policy file the gate reads (keys as their OpenSSH or PEM text)."""
    doc = {"trusted_clientapps": trusted_clientapps, "app_signing_keys": signing_keys}
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def _load_installed(ref: str) -> Any:
    """Import an admitted ClientApp from the installed packages, never from a bundle."""
    from flwr.clientapp.client_app import ClientApp

    module_name, _, attributes = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attribute in attributes.split("."):
            target = getattr(target, attribute)
    except (ImportError, AttributeError) as exc:
        raise UntrustedAppError(
            f"edgefl: the trusted ClientApp {ref!r} is not installed on this device ({exc})"
        ) from None
    if not isinstance(target, ClientApp):
        raise UntrustedAppError(f"edgefl: {ref!r} is not a Flower ClientApp")
    return target


class _Gate:
    """Wraps four functions of Flower's ``run_clientapp`` module for one process."""

    def __init__(self, policy: AppTrustPolicy | None, policy_error: str = "") -> None:
        self.policy = policy
        self.policy_error = policy_error
        self.fab_id = ""
        self.run_id = ""
        self.admission: Admission | None = None

    def install(self, module: Any) -> None:
        missing = [name for name in _HOOKED if not callable(getattr(module, name, None))]
        if missing:  # Flower changed: refuse to run rather than run unchecked
            raise RuntimeError(f"cannot gate Flower's ClientApp process: no {missing}")
        pull = module.pull_task_input
        install_fab = module.install_from_fab
        install_deps = module.install_app_dependencies
        load_fn = module.get_load_client_app_fn

        def pull_task_input(*args: Any, **kwargs: Any) -> Any:
            message, context, run, fab = pull(*args, **kwargs)
            self.fab_id = f"{run.fab_id}=={run.fab_version}" if run.fab_id else ""
            self.run_id = str(getattr(run, "run_id", "") or "")
            return message, context, run, fab

        def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
            self.admission = self._admit(fab_file)
            if self.admission.kind == "installed":
                return None  # never extracted: nothing of the bundle reaches sys.path
            return install_fab(fab_file, *args, **kwargs)

        def install_app_dependencies(*args: Any, **kwargs: Any) -> Any:
            if self.admission is None or self.admission.kind != "signed":
                return None  # installed code brings its own dependencies
            return install_deps(*args, **kwargs)

        def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Callable[..., Any]:
            flower_load = load_fn(*args, **kwargs)

            def load(*largs: Any, **lkwargs: Any) -> Any:
                admission = self.admission
                if admission is None:
                    raise UntrustedAppError("edgefl: no app bundle was admitted")
                if admission.kind == "installed":
                    return _load_installed(admission.clientapp)
                return flower_load(*largs, **lkwargs)

            return load

        module.pull_task_input = pull_task_input
        module.install_from_fab = install_from_fab
        module.install_app_dependencies = install_app_dependencies
        module.get_load_client_app_fn = get_load_client_app_fn

    def _admit(self, fab_file: Any) -> Admission:
        if self.policy is None:
            raise UntrustedAppError(f"edgefl refused every app bundle: {self.policy_error}")
        if not isinstance(fab_file, bytes):
            raise UntrustedAppError("edgefl refused an app bundle that is not in memory")
        try:
            admission = self.policy.admit(fab_file, self.fab_id, self.run_id)
        except UntrustedAppError as exc:
            print(f"edgefl app trust: {exc}", file=sys.stderr, flush=True)
            raise
        how = f"signed by {admission.key_id}" if admission.key_id else "installed code"
        print(
            f"edgefl app trust: admitted {self.fab_id or 'app bundle'} "
            f"(ClientApp {admission.clientapp}, {how})",
            file=sys.stderr,
            flush=True,
        )
        return admission


_FLWR_CLI: Final = "flwr.supernode.cli"


def flwr_clientapp_entry() -> Callable[[], None]:
    """Flower's ``flwr-clientapp`` entry point, imported without the rest of its package.

    ``flwr/supernode/cli/__init__.py`` also imports the SuperNode's own command
    (``flower_supernode``: FastAPI, SQLAlchemy's object store and more), which a ClientApp
    process never runs: about 1 s of CPU on every cold start and in every zygote. The
    package stands in as an empty module only while its ``flwr_clientapp`` module is
    imported; a later ``import flwr.supernode.cli`` runs the real package, which finds
    that module already imported.
    """
    module_name = f"{_FLWR_CLI}.flwr_clientapp"
    if module_name not in sys.modules and _FLWR_CLI not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec(_FLWR_CLI)
        if spec is not None and spec.submodule_search_locations is not None:
            stand_in = importlib.util.module_from_spec(spec)
            sys.modules[_FLWR_CLI] = stand_in
            try:
                importlib.import_module(module_name)
            finally:
                if sys.modules.get(_FLWR_CLI) is stand_in:
                    del sys.modules[_FLWR_CLI]
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    entry: Callable[[], None] = module.flwr_clientapp
    return entry


def run_gated(policy_path: str | None) -> None:
    """Run Flower's ``flwr-clientapp`` (arguments from ``sys.argv``) behind the gate.

    Raises:
        RuntimeError: Flower's ClientApp process no longer has the functions gated here.
    """
    import flwr.supernode.runtime.run_clientapp as flower_process

    flwr_clientapp = flwr_clientapp_entry()
    try:
        policy: AppTrustPolicy | None = AppTrustPolicy.load(
            Path(policy_path) if policy_path else None
        )
        error = ""
    except ValueError as exc:
        policy, error = None, str(exc)
    _Gate(policy, error).install(flower_process)
    flwr_clientapp()


def main(argv: list[str] | None = None) -> None:
    """``python -I -m edgefl.edge_agent.fl.apptrust --policy FILE -- FLWR_CLIENTAPP_ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    rest = args[args.index("--") + 1 :] if "--" in args else []
    head = args[: args.index("--")] if "--" in args else args
    parser = argparse.ArgumentParser(description="Flower's flwr-clientapp behind edgefl's gate")
    parser.add_argument("--policy", default=None, help="The device's app trust policy file.")
    known = parser.parse_args(head)
    sys.argv = ["flwr-clientapp", *rest]
    run_gated(known.policy)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the refusal's class name
    # (part of the reason the server records) is then edgefl's, as in a forked child.
    from edgefl.edge_agent.fl.apptrust import main as _main

    _main()
