"""The on-device model store: two slots, one pointer, and a swap that a crash cannot split.

Layout under ``<state_dir>/models/``::

    a/  b/        the slots: model.tflite, manifest.json (the signed manifest, byte for
                  byte) and slot.json, the seal written last (model, version, variant,
                  sha256, size)
    current       the pointer: JSON {slot, model, version, variant, sha256, since}
    staging/      downloads in progress; kept across restarts so a transfer resumes

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
ARTIFACT_FILE: Final = "model.tflite"
MANIFEST_FILE: Final = "manifest.json"
SEAL_FILE: Final = "slot.json"
POINTER_FILE: Final = "current"
STAGING_DIR: Final = "staging"


@dataclass(frozen=True)
class InstalledModel:
    """One whole slot: what it holds and where.

    Attributes:
        slot: ``"a"`` or ``"b"``.
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

    slot: Slot
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
        for name in (*SLOTS, STAGING_DIR):
            (root / name).mkdir(parents=True, exist_ok=True)
        self._current: InstalledModel | None = None
        self.last_repair = self.repair()

    @property
    def staging(self) -> Path:
        """``models/staging/``: where downloads land before they are checked."""
        return self.root / STAGING_DIR

    def staging_file(self, model: str, version: int, variant: str, suffix: str) -> Path:
        """The staging path of one release's file (``suffix`` ``.tflite`` or ``.manifest.json``)."""
        return self.staging / f"{model}-{version}-{variant}{suffix}"

    def clear_staging(self, keep: tuple[str, ...] = ()) -> None:
        """Delete staged files except those named in ``keep``."""
        with self._lock:
            for path in self.staging.iterdir():
                if path.name not in keep:
                    with contextlib.suppress(OSError):
                        path.unlink()

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

    def _whole(self, slot: Slot, *, since: int) -> InstalledModel:
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
