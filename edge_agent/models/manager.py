"""The device's model manager: from a signed desired state to a verified model swapped in.

The agent hands every payload of its ``state/desired`` topic to :meth:`ModelManager.submit`
(from the MQTT thread; it only queues). The manager's worker thread then:

1. accepts the desired state only if it is signed by a trusted, non-revoked release key,
   addressed to this device (or ``"*"``) in its fleet, not expired under the clock policy
   and not issued before the newest one accepted
   (:meth:`edgefl.releasesign.TrustStore.accept_desired`, which also applies its
   ``revoked_keys``);
2. fetches the release's manifest and downloads the artifact into ``models/staging/``
   through a :class:`ReleaseSource` (the server's ``Models`` service, :class:`GrpcSource`;
   a transfer cut short resumes from the staged file's size; a failed download is retried
   with backoff);
3. checks, in this order, each refusal with its machine reason
   (:class:`edgefl.releasesign.ReleaseTrustError`): the manifest's signature against a
   trusted key; the file's sha256 and size against the manifest; the device class and
   runtime; the signature's validity window under the clock policy
   (:meth:`~edgefl.releasesign.TrustStore.now`: never earlier than the newest signed time
   seen); the version, greater than the installed one unless the desired state is a
   signed rollback, and the release the desired state names (its sha256 and size); the
   golden vectors on the device's own runtime;
4. swaps atomically (:class:`~edgefl.edge_agent.models.store.ModelStore`) and puts the
   new model on probation (:mod:`edgefl.edge_agent.models.health`), rolling back to the
   previous slot if it fails.

A desired state with ``model: null`` installs nothing: the device keeps serving what it
has (removing a model is left to the serving loop's issue). A download that fails is
retried with backoff; a check that fails is a refusal. A refused or rolled-back version
is not tried again until a new desired state arrives (a later ``issued_at``): the
retained desired state the broker re-delivers on every reconnect changes nothing.
Throughout, the current model keeps serving
(:meth:`ModelManager.current`). What the device runs, and its last failure, is published
as a :class:`~edgefl.proto.desired.ReportedState` and written to
``<state_dir>/model-status.json`` for ``edgefl agent status``.

**Shadow.** A desired state may name a ``shadow`` release besides its model. The manager
fetches and checks it exactly as above (signature, sha256 and size, device class and
runtime, expiry, the release named, the golden vectors on the device's runtime), except
the version rule: a shadow never replaces anything, so it may be older or newer than
what runs. It goes into the store's shadow folder, never into an A/B slot, so it never
becomes the serving model by itself, and a crash cannot leave it serving either
(:class:`~edgefl.edge_agent.models.store.ModelStore`). :meth:`ModelManager.shadow` names
it to the inference loop, which runs it beside the serving model without serving its
answers. A desired state without a shadow removes the one installed. The shadow's state
and last failure (:meth:`ModelManager.shadow_status`) go into the status file and the
loop's ``telemetry/inference`` report, not into ``state/reported``, whose schema a
server that predates shadows would refuse.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeGuard

from pydantic import ValidationError

import edgefl
from edgefl.config import Address, TlsFiles
from edgefl.errors import ArtifactError, BadInputError, EdgeflError
from edgefl.files import write_text_atomic
from edgefl.manifest import Manifest, sha256_file
from edgefl.proto.desired import DesiredModel, DesiredState, LastFailure, ReportedState
from edgefl.proto.desired import parse_desired as _parse_desired
from edgefl.releasesign import ReleaseTrustError, TrustStore, verify
from edgefl.supervise import RestartBackoff

from .config import ModelsConfig, ModelsServer
from .health import HealthFailure, HealthPolicy, HealthWindow, ProbeError, golden_probe
from .health import load_runtime as _load_runtime
from .store import InstalledModel, ModelStore

__all__ = [
    "MODEL_STATUS_FILE",
    "CurrentModel",
    "FolderSource",
    "GrpcSource",
    "ModelManager",
    "ModelsConfig",
    "ModelsServer",
    "ReleaseSource",
    "read_model_status",
]

logger = logging.getLogger(__name__)

MODEL_STATUS_FILE: Final = "model-status.json"
"""In ``<state_dir>``: the manager's state, for ``edgefl agent status`` and restarts."""
MODELS_DIR: Final = "models"


class ReleaseSource(Protocol):
    """Where releases come from: the server, or a folder (tests, offline installs)."""

    def fetch_manifest(self, model: str, version: int, variant: str) -> bytes:
        """The signed manifest file, byte for byte.

        Raises:
            EdgeflError: It cannot be fetched (reported as ``download_failed``).
        """

    def download(
        self, model: str, version: int, variant: str, dest: Path, *, expected_size: int
    ) -> int:
        """Append the rest of the artifact to ``dest`` (resume from its size); bytes moved.

        Raises:
            EdgeflError: The transfer failed (reported as ``download_failed``; retried).
        """


class FolderSource:
    """Releases in a folder, laid out as the server keeps them.

    ``ROOT/<model>/<version>/<variant>.tflite`` and ``<variant>.manifest.json``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _file(self, model: str, version: int, variant: str, suffix: str) -> Path:
        return self.root / model / str(version) / f"{variant}{suffix}"

    def fetch_manifest(self, model: str, version: int, variant: str) -> bytes:
        """The manifest file's bytes."""
        path = self._file(model, version, variant, ".manifest.json")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ReleaseTrustError("download_failed", f"{path}: {exc}") from exc

    def download(
        self, model: str, version: int, variant: str, dest: Path, *, expected_size: int
    ) -> int:
        """Copy the rest of the artifact after ``dest``'s current size."""
        path = self._file(model, version, variant, ".tflite")
        have = dest.stat().st_size if dest.exists() else 0
        try:
            with path.open("rb") as src, dest.open("ab") as out:
                src.seek(have)
                data = src.read()
                out.write(data)
        except OSError as exc:
            raise ReleaseTrustError("download_failed", f"{path}: {exc}") from exc
        return len(data)


class GrpcSource:
    """The server's ``Models`` service over mutual TLS (:mod:`.download`)."""

    def __init__(
        self,
        target: Address,
        tls: TlsFiles,
        *,
        timeout_s: float = 300.0,
        stall_timeout_s: float = 30.0,
    ) -> None:
        self.target = target
        self.tls = tls
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s

    def fetch_manifest(self, model: str, version: int, variant: str) -> bytes:
        """The signed manifest as published."""
        from .download import fetch_manifest_text

        text = fetch_manifest_text(self.target, self.tls, model, version, variant)
        return text.encode("utf-8")

    def download(
        self, model: str, version: int, variant: str, dest: Path, *, expected_size: int
    ) -> int:
        """Resume the artifact's download into ``dest``."""
        from .download import download_artifact

        return download_artifact(
            self.target,
            self.tls,
            model,
            version,
            variant,
            dest,
            timeout_s=self.timeout_s,
            stall_timeout_s=self.stall_timeout_s,
            expected_size=expected_size,
        )


@dataclass(frozen=True)
class CurrentModel:
    """The serving model: its file, its (signed) manifest and where it sits in the store."""

    path: Path
    manifest: Manifest
    installed: InstalledModel


def _is_release(
    installed: InstalledModel | None, target: DesiredModel
) -> TypeGuard[InstalledModel]:
    """Whether ``installed`` is the very release ``target`` names (its file too)."""
    return (
        installed is not None
        and installed.sha256 == target.artifact_sha256
        and (installed.model, installed.version, installed.variant)
        == (target.model, target.version, target.variant)
    )


def _manifest_from(raw: bytes) -> Manifest:
    """Parse a manifest; one that is not a valid manifest cannot be verified either."""
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ReleaseTrustError(
            "bad_signature", f"the manifest is malformed at {where}: {first['msg']}"
        ) from exc


class ModelManager:
    """Follows the signed desired state and keeps one verified model serving.

    Args:
        config: The ``models:`` section.
        state_dir: The agent's state folder (``models/`` and the status file go there).
        trust: The device's trusted release keys and clock floor.
        source: Where manifests and artifacts come from.
        device_id: This device.
        fleet: Its fleet.
        publish: Called with each new reported state (the agent publishes it retained on
            ``state/reported``); ``None`` to only write the status file.
        clock: Unix seconds, for report times.
    """

    def __init__(
        self,
        config: ModelsConfig,
        *,
        state_dir: Path,
        trust: TrustStore,
        source: ReleaseSource,
        device_id: str,
        fleet: str,
        publish: Callable[[ReportedState], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.trust = trust
        self.source = source
        self.device_id = device_id
        self.fleet = fleet
        self._publish = publish
        self._clock = clock
        self.store = ModelStore(state_dir / MODELS_DIR, clock=clock)
        self._lock = threading.RLock()
        self._inbox: queue.Queue[bytes | DesiredState] = queue.Queue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._manifests: dict[str, Manifest] = {}
        self._window: HealthWindow | None = None
        # What persists across restarts (the status file).
        self._desired: DesiredState | None = None
        self._refused: set[tuple[int, str]] = set()
        self._state = "none"
        self._last_failure: LastFailure | None = None
        self._last_swap: dict[str, Any] | None = None
        self._rollbacks = 0
        # A failed download is started again on the project's one backoff curve.
        self._retry = RestartBackoff(config.retry_min_s, config.retry_max_s, float("inf"))
        self._probation: dict[str, Any] | None = None
        # Whoever serves the model (the inference loop) hears of every change of it.
        self._listeners: list[Callable[[], None]] = []
        self.generation = 0
        # The shadow release: evaluated beside the serving model, never serving.
        self.shadow_generation = 0
        self._shadow_state = "none"
        self._shadow_failure: LastFailure | None = None
        self._shadow_refused: set[tuple[int, str]] = set()
        self._shadow_retry = RestartBackoff(config.retry_min_s, config.retry_max_s, float("inf"))
        self._load_status()
        self._resume_probation()

    # -- what serves ----------------------------------------------------------------------

    def current(self) -> CurrentModel | None:
        """The serving model (file and manifest), or ``None``. Thread-safe."""
        return self._with_manifest(self.store.current(), "the installed manifest")

    def shadow(self) -> CurrentModel | None:
        """The shadow release (file and manifest), or ``None``. Thread-safe."""
        return self._with_manifest(self.store.shadow(), "the shadow's manifest")

    def _with_manifest(self, installed: InstalledModel | None, what: str) -> CurrentModel | None:
        """``installed`` with its manifest (parsed once, then cached), or ``None``."""
        if installed is None:
            return None
        with self._lock:
            manifest = self._manifests.get(installed.sha256)
            if manifest is None:
                try:
                    manifest = Manifest.model_validate_json(installed.manifest_bytes())
                except (OSError, ValidationError) as exc:
                    logger.error("%s cannot be read: %s", what, exc)
                    return None
                self._manifests[installed.sha256] = manifest
        return CurrentModel(installed.path, manifest, installed)

    def shadow_status(self) -> dict[str, Any]:
        """The shadow: what the desired state names, what is installed, state, last failure.

        ``state`` is ``none`` (no shadow desired), ``downloading``, ``verifying``,
        ``running`` (installed: the loop runs it beside the serving model) or ``failed``
        (refused, or a download that is retried).
        """
        installed = self.store.shadow()
        with self._lock:
            desired = self._desired.shadow if self._desired is not None else None
            failure = self._shadow_failure
            return {
                "state": self._shadow_state,
                "desired": None
                if desired is None
                else {
                    "model": desired.model,
                    "version": desired.version,
                    "variant": desired.variant,
                    "sha256": desired.artifact_sha256,
                },
                "installed": None
                if installed is None
                else {
                    "model": installed.model,
                    "version": installed.version,
                    "variant": installed.variant,
                    "sha256": installed.sha256,
                    "since": installed.since,
                },
                "last_failure": None if failure is None else failure.model_dump(mode="json"),
            }

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change of the serving model or of the shadow.

        It runs on the manager's thread right after the pointer moved (or the shadow
        changed), so it must only take note (set an event); :meth:`current` then names
        the new model and :attr:`generation` has grown by one (:meth:`shadow` and
        :attr:`shadow_generation` for the shadow).
        """
        with self._lock:
            self._listeners.append(callback)

    def _serving_changed(self) -> None:
        self._changed(shadow=False)

    def _shadow_changed(self) -> None:
        self._changed(shadow=True)

    def _changed(self, *, shadow: bool) -> None:
        with self._lock:
            if shadow:
                self.shadow_generation += 1
            else:
                self.generation += 1
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback()
            except Exception:  # a listener must never stop an update
                logger.exception("a %s listener failed", "shadow" if shadow else "serving-model")

    def record_inference(self, *, error: str | None = None) -> None:
        """The serving loop reports an inference; an error during probation rolls back."""
        window = self._window
        if window is not None and error is not None:
            window.record(error=error)
            self._wake.set()

    # -- the worker -------------------------------------------------------------------------

    def submit(self, payload: bytes | DesiredState) -> None:
        """Queue a desired state (a ``state/desired`` payload); never blocks the caller."""
        self._inbox.put(payload)
        self._wake.set()

    def start(self) -> None:
        """Start the worker thread and publish the reported state once."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker (a probe or download in flight finishes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        self._report()
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the worker must outlive any one bad update
                logger.exception("model manager step failed")
            self._wake.wait(self._idle_wait())
            self._wake.clear()

    def _idle_wait(self) -> float:
        waits = [1.0]
        if self._window is not None:
            waits.append(
                max(0.05, min(self._window.ends_at, time.monotonic() + 1) - time.monotonic())
            )
        if self._retry.next_at is not None:
            waits.append(max(0.05, self._retry.next_at - time.monotonic()))
        return min(waits)

    def step(self) -> None:
        """Do what is due: the newest queued desired state, a probe, a download retry."""
        newest: bytes | DesiredState | None = None
        while True:
            try:
                newest = self._inbox.get_nowait()
            except queue.Empty:
                break
        if newest is not None:
            self.handle(newest)
        window = self._window
        if window is not None and window.due():
            self._poll_window(window)
        if self._retry.next_at is not None and self._retry.due(time.monotonic()):
            self._retry.started(time.monotonic())
            with self._lock:
                desired = self._desired
            if desired is not None and desired.model is not None:
                self._apply(desired.model)
        if self._shadow_retry.next_at is not None and self._shadow_retry.due(time.monotonic()):
            self._shadow_retry.started(time.monotonic())
            with self._lock:
                desired = self._desired
            if desired is not None and desired.shadow is not None:
                self._apply_shadow(desired.shadow)

    # -- desired state ----------------------------------------------------------------------

    def handle(self, payload: bytes | DesiredState) -> None:
        """Verify a desired state and act on it (synchronously; the worker calls this)."""
        try:
            desired = payload if isinstance(payload, DesiredState) else _parse_desired(payload)
        except BadInputError as exc:
            logger.error("ignored a malformed desired state: %s", exc)
            self._fail(0, ReleaseTrustError("unsigned", str(exc)))
            return
        with self._lock:
            again = self._desired is not None and desired == self._desired
        if (
            again
            and (desired.model is None or self._settled(desired.model))
            and self._shadow_settled(desired.shadow)
        ):
            # The retained state again (every reconnect and restart), already acted on: not
            # verified again, so one that has expired since is not reported as a failure.
            return
        version = desired.model.version if desired.model is not None else 0
        try:
            self.trust.accept_desired(desired, fleet=self.fleet, device=self.device_id)
        except ReleaseTrustError as exc:
            logger.warning("refused a desired state: %s", exc)
            self._fail(version, exc)
            return
        with self._lock:
            previous = self._desired
            if (
                previous is None
                or desired.issued_at != previous.issued_at
                or desired.model != previous.model
            ):
                # A new desired state: what was refused may be tried again.
                self._refused.clear()
                self._retry = RestartBackoff(
                    self.config.retry_min_s, self.config.retry_max_s, float("inf")
                )
            if (
                previous is None
                or desired.issued_at != previous.issued_at
                or desired.shadow != previous.shadow
            ):
                self._shadow_refused.clear()
                self._shadow_retry = RestartBackoff(
                    self.config.retry_min_s, self.config.retry_max_s, float("inf")
                )
            self._desired = desired
        if desired.model is None:
            self._set_state("running" if self.store.current() else "none")
        else:
            self._apply(desired.model)
        self._apply_shadow(desired.shadow)

    def _installed(self, target: DesiredModel) -> bool:
        return _is_release(self.store.current(), target)

    def _settled(self, target: DesiredModel) -> bool:
        """Whether ``target`` runs already, or was refused under this desired state."""
        with self._lock:
            refused = (target.version, target.artifact_sha256) in self._refused
        return refused or self._installed(target)

    def _shadow_installed(self, target: DesiredModel) -> bool:
        return _is_release(self.store.shadow(), target)

    def _shadow_settled(self, target: DesiredModel | None) -> bool:
        """Whether the shadow is as ``target`` says: installed, refused, or none."""
        if target is None:
            return self.store.shadow() is None
        with self._lock:
            refused = (target.version, target.artifact_sha256) in self._shadow_refused
        return refused or self._shadow_installed(target)

    def _apply_shadow(self, target: DesiredModel | None) -> None:
        """Install the shadow the desired state names, or remove the one installed."""
        if target is None:
            self._shadow_retry = RestartBackoff(
                self.config.retry_min_s, self.config.retry_max_s, float("inf")
            )
            shadow = self.store.shadow()
            self.store.clear_staging(shadow=True)
            if shadow is not None:
                # The loop's interpreter keeps its copy: unlinked files stay readable.
                self.store.clear_shadow()
                self._shadow_changed()
                logger.info("removed the shadow %s v%d", shadow.model, shadow.version)
            with self._lock:
                self._shadow_failure = None
            self._set_shadow_state("none")
            return
        if self._shadow_installed(target):
            self._set_shadow_state("running")
            return
        fetched = self._fetch_checked(target, shadow=True)
        if fetched is None:
            return
        artifact, raw_manifest, manifest, _ = fetched
        # The old shadow goes first and the loop is told, so a loader that read its name
        # before never takes the new file for it (it sees the generation move and looks
        # again).
        if self.store.clear_shadow():
            self._shadow_changed()
        try:
            installed = self.store.install_shadow(
                artifact,
                raw_manifest,
                model=target.model,
                version=target.version,
                variant=target.variant,
                sha256=manifest.sha256,
                size_bytes=manifest.size_bytes,
            )
        except (ArtifactError, OSError) as exc:
            self._shadow_changed()
            self._shadow_fail(target.version, ReleaseTrustError("sha256_mismatch", str(exc)))
            return
        self.store.clear_staging(shadow=True)
        with self._lock:
            self._manifests[installed.sha256] = manifest
            self._shadow_failure = None
        logger.info(
            "shadow %s v%d (%s) installed beside the serving model",
            installed.model,
            installed.version,
            installed.variant,
        )
        self._shadow_changed()
        self._set_shadow_state("running")

    def _apply(self, target: DesiredModel) -> None:
        if self._installed(target):
            self._set_state("running")
            return
        fetched = self._fetch_checked(target, shadow=False)
        if fetched is None:
            return
        artifact, raw_manifest, manifest, probe_p50 = fetched
        baseline = self._baseline_p50()
        previous = self.store.current()
        try:
            installed = self.store.install(
                artifact,
                raw_manifest,
                model=target.model,
                version=target.version,
                variant=target.variant,
                sha256=manifest.sha256,
                size_bytes=manifest.size_bytes,
            )
        except (ArtifactError, OSError) as exc:
            self._fail(target.version, ReleaseTrustError("sha256_mismatch", str(exc)))
            return
        self.store.clear_staging()
        with self._lock:
            self._manifests[installed.sha256] = manifest
            self._last_swap = {
                "at": installed.since,
                "from_version": previous.version if previous else None,
                "to_version": installed.version,
                "rollback": target.rollback,
            }
        logger.info(
            "swapped in %s v%d (%s) from slot %s; golden p50 %.0f us",
            installed.model,
            installed.version,
            installed.variant,
            installed.slot,
            probe_p50,
        )
        self._serving_changed()
        self._open_window(installed, manifest, baseline)
        self._set_state("running")

    def _fetch_checked(
        self, target: DesiredModel, *, shadow: bool
    ) -> tuple[Path, bytes, Manifest, float] | None:
        """Download and check ``target`` (the serving path's or the shadow's).

        ``None`` when it was refused before, the download failed, or the check refuses
        it now (then it is remembered as refused, its staging emptied and the failure
        reported). Otherwise the staged artifact, its manifest (raw and parsed) and the
        golden probe's p50.
        """
        refused = self._shadow_refused if shadow else self._refused
        with self._lock:
            if (target.version, target.artifact_sha256) in refused:
                return None
        staged = self._download(target, shadow=shadow)
        if staged is None:
            return None
        artifact, raw_manifest = staged
        if shadow:
            self._set_shadow_state("verifying")
        else:
            self._set_state("verifying")
        try:
            manifest, probe_p50 = self.check(target, artifact, raw_manifest, shadow=shadow)
        except ReleaseTrustError as exc:
            logger.warning(
                "refused %s%s v%d (%s): %s",
                "the shadow " if shadow else "",
                target.model,
                target.version,
                target.variant,
                exc,
            )
            with self._lock:
                refused.add((target.version, target.artifact_sha256))
            self.store.clear_staging(shadow=shadow)
            if shadow:
                self._shadow_fail(target.version, exc)
            else:
                self._fail(target.version, exc)
            return None
        return artifact, raw_manifest, manifest, probe_p50

    def _download(self, target: DesiredModel, *, shadow: bool = False) -> tuple[Path, bytes] | None:
        """Fetch the manifest and the artifact into staging; ``None`` after a failure.

        With ``shadow``, into the shadow's own staging folder (a model's partial
        download there stays for its resume), retried on the shadow's backoff.
        """
        store = self.store
        staging_file = store.shadow_staging_file if shadow else store.staging_file
        artifact = staging_file(target.model, target.version, target.variant, ".tflite")
        manifest_file = staging_file(target.model, target.version, target.variant, ".manifest.json")
        keep = (artifact.name, manifest_file.name)
        store.clear_staging(keep=keep, shadow=shadow)
        previous = store.previous()
        if shadow:
            self._set_shadow_state("downloading")
        else:
            self._set_state("downloading")
        retry = self._shadow_retry if shadow else self._retry
        try:
            if not shadow and _is_release(previous, target):
                # A rollback to the version in the other slot: no download needed. The
                # release must be the same one: the same file re-released under a newer
                # version has its own manifest, fetched like any other.
                raw = previous.manifest_bytes()
                shutil.copyfile(previous.path, artifact)
            else:
                raw = self.source.fetch_manifest(target.model, target.version, target.variant)
                self.source.download(
                    target.model,
                    target.version,
                    target.variant,
                    artifact,
                    expected_size=target.size_bytes,
                )
            write_text_atomic(manifest_file, raw.decode("utf-8", errors="replace"))
        except (EdgeflError, OSError) as exc:
            delay = retry.schedule(time.monotonic())
            logger.warning(
                "download of %s%s v%d failed (retry in %.0f s): %s",
                "the shadow " if shadow else "",
                target.model,
                target.version,
                delay,
                exc,
            )
            failure = ReleaseTrustError("download_failed", str(exc))
            if shadow:
                self._shadow_fail(target.version, failure)
            else:
                self._fail(target.version, failure)
            return None
        retry.attempt = 0
        return artifact, raw

    # -- the checks -------------------------------------------------------------------------

    def check(
        self, target: DesiredModel, artifact: Path, raw_manifest: bytes, *, shadow: bool = False
    ) -> tuple[Manifest, float]:
        """Every check before a swap, in the documented order; the manifest and golden p50.

        With ``shadow`` (a release to run beside the serving model) every check but the
        version rule: a shadow replaces nothing, so it may be older than what runs.

        Raises:
            ReleaseTrustError: The first check that failed, with its reason.
        """
        manifest = _manifest_from(raw_manifest)
        # 1. signature against a trusted, non-revoked key
        verify(manifest, self.trust)
        release = manifest.release
        if release is None:
            raise ReleaseTrustError("unsigned", "the manifest has no release section")
        # 2. sha256 and size of the file against the manifest
        size = artifact.stat().st_size
        if size != manifest.size_bytes:
            raise ReleaseTrustError(
                "size_mismatch", f"{size} bytes, the manifest says {manifest.size_bytes}"
            )
        digest = sha256_file(artifact)
        if digest != manifest.sha256:
            raise ReleaseTrustError(
                "sha256_mismatch",
                f"sha256 {digest[:16]}... differs from the manifest's {manifest.sha256[:16]}...",
            )
        # 3. device class and runtime
        if release.device_class != self.config.device_class:
            raise ReleaseTrustError(
                "wrong_device_class",
                f"made for {release.device_class!r}, this device is {self.config.device_class!r}",
            )
        if release.runtime != self.config.runtime:
            raise ReleaseTrustError(
                "wrong_runtime",
                f"made for {release.runtime!r}, this device runs {self.config.runtime!r}",
            )
        # 4. not expired (clock policy: never earlier than the newest signed time seen)
        self.trust.check_fresh(release.created_at, release.expires_at)
        # 5. version: newer than installed unless a signed rollback, and the one named
        current = self.store.current()
        if not shadow and (
            release.version < target.version
            or (
                current is not None
                and current.model == release.model
                and release.version <= current.version
                and not target.rollback
            )
        ):
            raise ReleaseTrustError(
                "downgrade",
                f"{release.model} v{release.version} does not replace v"
                f"{current.version if current is not None else 0} installed (desired v"
                f"{target.version}{', rollback' if target.rollback else ''})",
            )
        if (release.model, release.version, release.variant) != (
            target.model,
            target.version,
            target.variant,
        ) or manifest.sha256 != target.artifact_sha256:
            raise ReleaseTrustError(
                "sha256_mismatch",
                f"the release {release.model} v{release.version} ({release.variant}, sha256 "
                f"{manifest.sha256[:16]}...) is not the one the desired state names",
            )
        if manifest.size_bytes != target.size_bytes:
            raise ReleaseTrustError(
                "size_mismatch",
                f"{manifest.size_bytes} bytes, the desired state says {target.size_bytes}",
            )
        # 6. golden vectors on the device's own runtime
        try:
            runtime = _load_runtime(self.config.runtime, artifact)
            result = golden_probe(runtime, manifest, 1)
        except ProbeError as exc:
            reason = "load_failed" if exc.reason == "load_failed" else "golden_mismatch"
            raise ReleaseTrustError(reason, exc.detail) from exc
        if not result.passed:
            raise ReleaseTrustError(
                "golden_mismatch",
                f"on {self.config.runtime}: " + "; ".join(result.reasons),
            )
        return manifest, result.p50_us

    # -- health window ----------------------------------------------------------------------

    def _baseline_p50(self) -> float | None:
        """The serving model's median latency on its own golden set, before a swap."""
        current = self.current()
        if current is None:
            return None
        try:
            runtime = _load_runtime(self.config.runtime, current.path)
            return golden_probe(runtime, current.manifest, HealthPolicy().golden_repeats).p50_us
        except ProbeError as exc:
            logger.warning("no latency baseline from the serving model: %s", exc)
            return None

    def _open_window(
        self, installed: InstalledModel, manifest: Manifest, baseline: float | None
    ) -> None:
        if self.config.health_window_s <= 0:
            return
        self._window = HealthWindow(
            installed.path,
            manifest,
            self.config.runtime,
            baseline,
            self.config.health_policy(),
        )
        with self._lock:
            self._probation = {
                "sha256": installed.sha256,
                "version": installed.version,
                "baseline_p50_us": baseline,
            }
        self._write_status()

    def _resume_probation(self) -> None:
        """A restart during a health window starts the window again."""
        probation = self._probation
        current = self.current()
        if not probation or current is None or probation.get("sha256") != current.installed.sha256:
            self._probation = None
            return
        self._window = HealthWindow(
            current.path,
            current.manifest,
            self.config.runtime,
            probation.get("baseline_p50_us"),
            self.config.health_policy(),
        )

    def _poll_window(self, window: HealthWindow) -> None:
        outcome = window.poll()
        if outcome is False:
            return
        self._window = None
        with self._lock:
            self._probation = None
        if outcome is True:
            logger.info("%s passed its health window", window.artifact)
            self._write_status()
            return
        assert isinstance(outcome, HealthFailure)
        self.rollback(outcome)

    def rollback(self, failure: HealthFailure) -> None:
        """Point back at the previous slot after a failed health window, and report why."""
        bad = self.store.current()
        if bad is None:
            return
        with self._lock:
            self._refused.add((bad.version, bad.sha256))
        try:
            back = self.store.activate_previous()
        except ArtifactError as exc:
            logger.error(
                "%s v%d failed its health window (%s) and there is no previous model to "
                "roll back to: %s",
                bad.model,
                bad.version,
                failure.reason,
                exc,
            )
            self._record_failure(bad.version, failure.reason, failure.detail, "failed")
            return
        with self._lock:
            self._rollbacks += 1
            self._last_swap = {
                "at": back.since,
                "from_version": bad.version,
                "to_version": back.version,
                "rollback": True,
            }
        self._serving_changed()
        logger.warning(
            "rolled back %s v%d to v%d: %s (%s)",
            bad.model,
            bad.version,
            back.version,
            failure.reason,
            failure.detail,
        )
        self._record_failure(bad.version, failure.reason, failure.detail, "rolled_back")

    # -- reporting --------------------------------------------------------------------------

    def _fail(self, version: int, exc: ReleaseTrustError) -> None:
        self._record_failure(version, exc.reason, str(exc), "failed")

    def _shadow_fail(self, version: int, exc: ReleaseTrustError) -> None:
        with self._lock:
            self._shadow_failure = LastFailure(
                version=version, reason=exc.reason, detail=str(exc)[:2000], at=int(self._clock())
            )
        self._set_shadow_state("failed")

    def _set_shadow_state(self, state: str) -> None:
        with self._lock:
            changed = state != self._shadow_state
            self._shadow_state = state
        if changed or state == "failed":
            self._write_status()

    def _record_failure(self, version: int, reason: str, detail: str, state: str) -> None:
        with self._lock:
            self._last_failure = LastFailure(
                version=version, reason=reason, detail=detail[:2000], at=int(self._clock())
            )
        self._set_state(state)

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state
        self._report()

    def reported(self) -> ReportedState:
        """What the device runs now, as published on ``state/reported``."""
        current = self.store.current()
        with self._lock:
            state = self._state
            if current is None and state == "running":
                state = "none"
            return ReportedState(
                device=self.device_id,
                model=current.model if current else None,
                version=current.version if current else None,
                variant=current.variant if current else None,
                sha256=current.sha256 if current else None,
                since=current.since if current else None,
                state=state,
                last_failure=self._last_failure,
                rollbacks=self._rollbacks,
                agent=edgefl.__version__,
            )

    def _report(self) -> None:
        self._write_status()
        if self._publish is not None:
            try:
                self._publish(self.reported())
            except Exception:  # reporting must never stop an update
                logger.exception("publishing the reported state failed")

    def status(self) -> dict[str, Any]:
        """The status file's document."""
        reported = self.reported()
        window = self._window
        with self._lock:
            desired = self._desired
            return {
                "updated_at": self._clock(),
                "reported": json.loads(reported.to_json()),
                "last_swap": self._last_swap,
                "probation": self._probation,
                "health_window_ends_in_s": (
                    max(0.0, window.ends_at - time.monotonic()) if window is not None else None
                ),
                "desired": json.loads(desired.to_json()) if desired is not None else None,
                "refused": sorted([v, sha] for v, sha in self._refused),
                "shadow": self.shadow_status(),
                "shadow_refused": sorted([v, sha] for v, sha in self._shadow_refused),
            }

    def _write_status(self) -> None:
        try:
            write_text_atomic(
                self.state_dir / MODEL_STATUS_FILE, json.dumps(self.status(), indent=2) + "\n"
            )
        except OSError as exc:
            logger.error("cannot write the model status file: %s", exc)

    def _load_status(self) -> None:
        doc = read_model_status(self.state_dir)
        if not doc:
            self._probation = None
            self._state = "running" if self.store.current() else "none"
            return
        reported = doc.get("reported") or {}
        with contextlib.suppress(ValidationError, TypeError, BadInputError):
            if doc.get("desired"):
                self._desired = _parse_desired(json.dumps(doc["desired"]))
            if reported.get("last_failure"):
                self._last_failure = LastFailure.model_validate(reported["last_failure"])
        self._rollbacks = int(reported.get("rollbacks", 0) or 0)
        self._last_swap = doc.get("last_swap")
        self._refused = {(int(v), str(sha)) for v, sha in doc.get("refused", [])}
        with contextlib.suppress(ValueError, TypeError):
            self._shadow_refused = {(int(v), str(sha)) for v, sha in doc.get("shadow_refused", [])}
        shadow_doc = doc.get("shadow")
        if not isinstance(shadow_doc, dict):
            shadow_doc = {}
        with contextlib.suppress(ValidationError, TypeError):
            if shadow_doc.get("last_failure"):
                self._shadow_failure = LastFailure.model_validate(shadow_doc["last_failure"])
        self._shadow_state = "running" if self.store.shadow() is not None else "none"
        self._probation = doc.get("probation")
        state = str(reported.get("state", "none"))
        # A download or check cut by a restart is done again from the desired state.
        self._state = state if state in ("failed", "rolled_back") else "running"
        if self._desired is not None and (
            self._desired.model is not None or self._desired.shadow is not None
        ):
            self._inbox.put(self._desired)


def read_model_status(state_dir: Path) -> dict[str, Any]:
    """The manager's last status document, or ``{}`` (read-only, for ``agent status``)."""
    path = state_dir / MODEL_STATUS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}
