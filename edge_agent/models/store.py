"""The on-device model store: two slots, one pointer, and a swap that a crash cannot split.

Layout under ``<state_dir>/models/``::

    a/  b/        the slots: model.tflite, manifest.json (the signed manifest, byte for
                  byte) and slot.json, the seal written last (model, version, variant,
                  sha256, size)
    current       the pointer: JSON {slot, model, version, variant, sha256, since}
    staging/      downloads in progress; kept across restarts so a transfer resumes
    shadow/       the shadow release (evaluated beside the serving model, never serving):
                  the same three files as a slot
    shadow-staging/  the shadow's downloads in progress

Installing copies the verified files into the slot the pointer does *not* name, fsyncs
them and the slot folder, writes the seal, and only then replaces ``current`` with
``os.replace`` (the new pointer fsynced before, the folder after). The serving slot is
never written, so a ``kill -9`` (or a power cut) at any instant leaves the pointer naming
either the old, untouched slot or the new, complete one. The other slot keeps the
previous version for a rollback.

On open the store repairs: a pointer that is missing, unreadable, or names a slot whose
files do not match their seal and manifest (sha256 and size) falls back to the other
slot if that one is whole, else to no model. A slot is *whole* when its seal, its
manifest's ``sha256``/``size_bytes`` and the file on disk all agree. Leftovers in
``staging/`` are kept for resume.

The shadow folder is not a slot: the pointer can never name it (a pointer naming anything
but ``a`` or ``b`` is unusable and repaired), nothing is ever copied from it into a slot,
and on open a shadow folder that is not whole (an install a crash cut short) is emptied.
So a shadow never becomes the serving model by itself, whatever instant a crash hits.

The standard library only: the store checks files, not signatures (the manager does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from edgefl.errors import ArtifactError
from edgefl.files import fsync_dir, write_bytes_atomic, write_text_atomic

__all__ = [
    "ARTIFACT_FILE",
    "MANIFEST_FILE",
    "SEAL_FILE",
    "SLOTS",
    "InstalledModel",
    "ModelStore",
    "RepairReport",
]

logger = logging.getLogger(__name__)

Slot = Literal["a", "b"]
SLOTS: Final[tuple[Slot, Slot]] = ("a", "b")
SHADOW: Final = "shadow"
"""The shadow release's folder (not a slot)."""
ARTIFACT_FILE: Final = "model.tflite"
MANIFEST_FILE: Final = "manifest.json"
SEAL_FILE: Final = "slot.json"
POINTER_FILE: Final = "current"
STAGING_DIR: Final = "staging"
SHADOW_STAGING_DIR: Final = "shadow-staging"


@dataclass(frozen=True)
class InstalledModel:
    """One whole slot: what it holds and where.

    Attributes:
        slot: ``"a"`` or ``"b"``; ``"shadow"`` for the shadow release.
        model: Model name.
        version: Release version.
        variant: Variant name (``int8``, ``fp32``, ...).
        sha256: Hex sha256 of the artifact.
        size_bytes: Artifact size.
        since: Unix seconds when the pointer last moved to this slot (0 for a slot that
            is not current).
        path: The ``.tflite`` file.
        manifest_path: The signed manifest beside it.
    """

    slot: Slot | Literal["shadow"]
    model: str
    version: int
    variant: str
    sha256: str
    size_bytes: int
    since: int
    path: Path
    manifest_path: Path

    def manifest_bytes(self) -> bytes:
        """The manifest exactly as it was installed (the signature covers it)."""
        return self.manifest_path.read_bytes()

    def pointer(self) -> dict[str, Any]:
        """The pointer document naming this slot."""
        return {
            "slot": self.slot,
            "model": self.model,
            "version": self.version,
            "variant": self.variant,
            "sha256": self.sha256,
            "since": self.since,
        }


@dataclass(frozen=True)
class RepairReport:
    """What :meth:`ModelStore.repair` found and did.

    Attributes:
        current: The model the pointer names after the repair, or ``None``.
        fell_back: The pointer named a broken slot (or was unreadable) and was moved.
        reason: Why it fell back, empty when it did not.
        staged: Files left in ``staging/`` (kept for resume).
    """

    current: InstalledModel | None
    fell_back: bool
    reason: str
    staged: tuple[str, ...]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_sealed(
    folder: Path,
    artifact: Path,
    manifest: bytes,
    *,
    model: str,
    version: int,
    variant: str,
    sha256: str,
    size_bytes: int,
) -> None:
    """Unseal ``folder``, copy the artifact and manifest in (synced), then seal it."""
    (folder / SEAL_FILE).unlink(missing_ok=True)
    fsync_dir(folder)
    _copy_synced(artifact, folder / ARTIFACT_FILE)
    write_bytes_atomic(folder / MANIFEST_FILE, manifest, mode=0o644)
    fsync_dir(folder)
    seal = {
        "model": model,
        "version": version,
        "variant": variant,
        "sha256": sha256,
        "size_bytes": size_bytes,
    }
    write_text_atomic(folder / SEAL_FILE, json.dumps(seal, sort_keys=True) + "\n")
    fsync_dir(folder)


def _copy_synced(source: Path, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    """The A/B model slots of one device (see the module docstring).

    Thread-safe: every method takes one lock, and :meth:`current` returns an immutable
    record whose files are never written while the pointer names their slot.

    Args:
        root: ``<state_dir>/models``; created if missing.
        clock: Unix seconds, for the pointer's ``since``.
    """

    def __init__(self, root: Path, *, clock: Any = time.time) -> None:
        self.root = root
        self._clock = clock
        self._lock = threading.RLock()
        for name in (*SLOTS, STAGING_DIR, SHADOW, SHADOW_STAGING_DIR):
            (root / name).mkdir(parents=True, exist_ok=True)
        self._current: InstalledModel | None = None
        self._shadow: InstalledModel | None = None
        self.last_repair = self.repair()
        self._open_shadow()

    @property
    def staging(self) -> Path:
        """``models/staging/``: where downloads land before they are checked."""
        return self.root / STAGING_DIR

    def staging_file(self, model: str, version: int, variant: str, suffix: str) -> Path:
        """The staging path of one release's file (``suffix`` ``.tflite`` or ``.manifest.json``)."""
        return self.staging / f"{model}-{version}-{variant}{suffix}"

    def clear_staging(self, keep: tuple[str, ...] = (), *, shadow: bool = False) -> None:
        """Delete staged files except those named in ``keep`` (the shadow's with ``shadow``)."""
        with self._lock:
            folder = self.shadow_staging if shadow else self.staging
            for path in folder.iterdir():
                if path.name not in keep:
                    with contextlib.suppress(OSError):
                        path.unlink()

    @property
    def shadow_staging(self) -> Path:
        """``models/shadow-staging/``: the shadow's downloads, apart from the slots' ones."""
        return self.root / SHADOW_STAGING_DIR

    def shadow_staging_file(self, model: str, version: int, variant: str, suffix: str) -> Path:
        """The shadow staging path of one release's file."""
        return self.shadow_staging / f"{model}-{version}-{variant}{suffix}"

    # -- reading ------------------------------------------------------------------------

    def current(self) -> InstalledModel | None:
        """The serving model, or ``None`` when there is none."""
        with self._lock:
            return self._current

    def previous(self) -> InstalledModel | None:
        """The whole model in the other slot (a rollback target), or ``None``."""
        with self._lock:
            if self._current is None:
                return None
            other: Slot = "a" if self._current.slot == "b" else "b"
            try:
                return self._whole(other, since=0)
            except ArtifactError:
                return None

    def _whole(self, slot: Slot | Literal["shadow"], *, since: int) -> InstalledModel:
        """The slot's model if its seal, manifest and file agree.

        Raises:
            ArtifactError: The slot is empty, half written or damaged (the message says how).
        """
        folder = self.root / slot
        try:
            seal = json.loads((folder / SEAL_FILE).read_text(encoding="utf-8"))
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
            model = InstalledModel(
                slot=slot,
                model=str(seal["model"]),
                version=int(seal["version"]),
                variant=str(seal["variant"]),
                sha256=str(seal["sha256"]),
                size_bytes=int(seal["size_bytes"]),
                since=since,
                path=folder / ARTIFACT_FILE,
                manifest_path=folder / MANIFEST_FILE,
            )
        except FileNotFoundError as exc:
            raise ArtifactError(f"slot {slot} is empty or unsealed ({exc.filename})") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"slot {slot} has an unreadable seal or manifest: {exc}") from exc
        if not isinstance(manifest, dict) or (
            manifest.get("sha256"),
            manifest.get("size_bytes"),
        ) != (model.sha256, model.size_bytes):
            raise ArtifactError(f"slot {slot}: its manifest does not describe its seal")
        try:
            size = model.path.stat().st_size
        except OSError as exc:
            raise ArtifactError(f"slot {slot}: {ARTIFACT_FILE} is missing") from exc
        if size != model.size_bytes:
            raise ArtifactError(f"slot {slot}: {size} bytes, the manifest says {model.size_bytes}")
        if _sha256(model.path) != model.sha256:
            raise ArtifactError(f"slot {slot}: the artifact's sha256 differs from its manifest")
        return model

    # -- repair -------------------------------------------------------------------------

    def repair(self) -> RepairReport:
        """Check the pointer's slot; fall back to the other whole slot, or to no model."""
        with self._lock:
            pointer_path = self.root / POINTER_FILE
            reason = ""
            named: Slot | None = None
            since = 0
            try:
                doc = json.loads(pointer_path.read_text(encoding="utf-8"))
                slot = doc["slot"]
                if slot not in SLOTS:
                    raise ValueError(f"slot {slot!r}")
                named = slot
                since = int(doc.get("since", 0))
                current = self._whole(slot, since=since)
                if current.sha256 != doc.get("sha256"):
                    raise ArtifactError(f"slot {slot} holds another artifact than the pointer")
            except FileNotFoundError:
                current = None
            except (OSError, ValueError, KeyError, TypeError, ArtifactError) as exc:
                current = None
                reason = f"pointer unusable: {exc}"
            if reason:
                others = [s for s in SLOTS if s != named] if named else list(SLOTS)
                for other in others:
                    try:
                        current = self._whole(other, since=int(self._clock()))
                    except ArtifactError:
                        continue
                    self._write_pointer(current)
                    break
                else:
                    pointer_path.unlink(missing_ok=True)
                    fsync_dir(self.root)
                logger.warning(
                    "model store repaired: %s; now serving %s",
                    reason,
                    "nothing" if current is None else f"{current.model} v{current.version}",
                )
            self._current = current
            # Temporary files of writes a crash cut short: never named by a seal or pointer.
            for folder in (self.root, *(self.root / slot for slot in SLOTS)):
                for leftover in folder.glob(".*.tmp"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            staged = tuple(sorted(p.name for p in self.staging.iterdir()))
            return RepairReport(current, bool(reason), reason, staged)

    # -- writing ------------------------------------------------------------------------

    def _write_pointer(self, model: InstalledModel) -> None:
        # fsync of the new file, rename over the old, fsync of the folder.
        write_text_atomic(
            self.root / POINTER_FILE, json.dumps(model.pointer(), sort_keys=True) + "\n"
        )
        fsync_dir(self.root)

    def install(
        self,
        artifact: Path,
        manifest: bytes,
        *,
        model: str,
        version: int,
        variant: str,
        sha256: str,
        size_bytes: int,
    ) -> InstalledModel:
        """Copy a checked artifact and its manifest into the free slot, then flip to it.

        The slot that held the previous-but-one version is overwritten; the one serving
        until now stays as the rollback target.

        Raises:
            ArtifactError: The copied file does not match ``sha256``/``size_bytes``
                (nothing changes: the pointer still names the old slot).
        """
        with self._lock:
            slot: Slot = "b" if self._current is not None and self._current.slot == "a" else "a"
            folder = self.root / slot
            # Unseal first: from here until the new seal the slot is not a rollback target.
            _write_sealed(
                folder,
                artifact,
                manifest,
                model=model,
                version=version,
                variant=variant,
                sha256=sha256,
                size_bytes=size_bytes,
            )
            installed = self._whole(slot, since=int(self._clock()))
            self._write_pointer(installed)
            self._current = installed
            return installed

    def activate_previous(self) -> InstalledModel:
        """Point back at the other slot (a rollback); the slot left keeps its files.

        Raises:
            ArtifactError: The other slot holds no whole model.
        """
        with self._lock:
            if self._current is None:
                raise ArtifactError("no model is installed, so there is nothing to roll back")
            other: Slot = "b" if self._current.slot == "a" else "a"
            target = self._whole(other, since=int(self._clock()))
            self._write_pointer(target)
            self._current = target
            return target

    # -- the shadow ---------------------------------------------------------------------

    def _open_shadow(self) -> None:
        """Keep a whole shadow; empty a shadow folder that an interrupted install left."""
        with self._lock:
            folder = self.root / SHADOW
            try:
                self._shadow = self._whole(SHADOW, since=0)
            except ArtifactError as exc:
                self._shadow = None
                if any(folder.iterdir()):
                    logger.warning("removed an incomplete shadow model: %s", exc)
                    self._empty_shadow()

    def _empty_shadow(self) -> None:
        folder = self.root / SHADOW
        (folder / SEAL_FILE).unlink(missing_ok=True)  # unsealed first: never half a shadow
        fsync_dir(folder)
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        fsync_dir(folder)

    def shadow(self) -> InstalledModel | None:
        """The shadow release, or ``None``."""
        with self._lock:
            return self._shadow

    def install_shadow(
        self,
        artifact: Path,
        manifest: bytes,
        *,
        model: str,
        version: int,
        variant: str,
        sha256: str,
        size_bytes: int,
    ) -> InstalledModel:
        """Copy a checked artifact and its manifest into the shadow folder (not a slot).

        The previous shadow is unsealed first, and :meth:`shadow` names no model until the
        new seal is written (the manager clears the old one and tells the loop before it
        calls this, so no reader takes the new file for the old release).

        Raises:
            ArtifactError: The copied file does not match ``sha256``/``size_bytes`` (the
                shadow folder is emptied).
        """
        with self._lock:
            folder = self.root / SHADOW
            self._shadow = None
            _write_sealed(
                folder,
                artifact,
                manifest,
                model=model,
                version=version,
                variant=variant,
                sha256=sha256,
                size_bytes=size_bytes,
            )
            try:
                installed = self._whole(SHADOW, since=int(self._clock()))
            except ArtifactError:
                self._empty_shadow()
                raise
            self._shadow = installed
            return installed

    def clear_shadow(self) -> bool:
        """Remove the shadow release (not its staged downloads); whether there was one.

        A runtime that loaded its file keeps working: the file is unlinked, not rewritten.
        """
        with self._lock:
            had = self._shadow is not None
            self._shadow = None
            self._empty_shadow()
            return had
