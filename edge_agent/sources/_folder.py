"""The folder source: a watched folder of ``.npy`` and ``.json`` sample files.

A sensor process writes each file atomically (to a dotfile or a ``*.tmp`` name, then
renamed to ``NAME.npy`` or ``NAME.json``); the source polls the folder, checks every file
whole like the endpoint checks a request (same formats, same reasons), hands out its
samples, and moves it to ``done/``, or to ``rejected/`` beside a ``NAME.reason.json``
saying why. A file in ``done/`` or ``rejected/`` is never read again, so a restarted
agent carries on with what is left.

Files are moved after their samples were handed out: on the agent's next poll of the
source (which comes after the agent committed them to its outbox), or on :meth:`close`.
An agent killed in between reads those files again when it restarts: a sample may come
twice after a crash, never zero times.

The folder is reached through directory descriptors opened once: each file is opened
relative to the folder with ``O_NOFOLLOW`` and moved with ``renameat`` into ``done/`` or
``rejected/`` as they were when the source started, so a symlink in the folder (refused,
whatever it points at), a hard link to another file (refused) or a ``done/`` swapped for
a symlink cannot make the agent read or write outside the folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from edgefl.config import StrictModel
from edgefl.edge_agent.sources._base import PushSource, SourceRecord
from edgefl.edge_agent.sources._samples import (
    RawSample,
    SampleError,
    read_json,
    read_npy,
    split_batch,
)
from edgefl.errors import ConfigError
from edgefl.proto.ids import ID_REGEX

__all__ = ["FolderConfig", "FolderSource"]

logger = logging.getLogger("edgefl.edge_agent.sources")

DONE = "done"
REJECTED = "rejected"
SUFFIXES = (".npy", ".json")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FolderConfig(StrictModel):
    """A watched folder: each ``.npy`` / ``.json`` file is read once, then moved."""

    type: Literal["folder"] = "folder"
    name: str = Field("folder", description="Name of this source in logs and status.")
    path: Path = Field(description="The watched folder (created if missing).")
    poll_interval_s: float = Field(0.5, gt=0, le=3600, description="Seconds between scans.")
    shape: list[int] | None = Field(
        None, min_length=1, description="Shape of one sample, checked besides the model's."
    )
    dtype: Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32"] | None = (
        Field(None, description="Values must fit this dtype, besides the model's.")
    )
    stream: str = Field("samples", pattern=ID_REGEX)
    kind: Literal["data", "telemetry"] = "data"
    evaluation: bool = Field(
        False, description="Labelled held-out samples: scored, never stored for training."
    )
    max_file_bytes: int = Field(
        16 << 20, ge=64, le=1 << 30, description="Larger files are rejected unread."
    )
    max_samples_per_file: int = Field(1000, ge=1, le=1_000_000)
    max_files_per_poll: int = Field(
        100, ge=1, le=100_000, description="Files read per scan; the rest wait for the next."
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(d < 1 for d in value):
            raise ValueError(f"every dimension is at least 1, got {value}")
        return value


class FolderSource(PushSource):
    """Polls a folder; see the module docstring for the contract with the writer."""

    def __init__(self, config: FolderConfig, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(
            config.name,
            stream=config.stream,
            kind=config.kind,
            queue_size=config.max_samples_per_file,
            shape=config.shape,
            dtype=config.dtype,
            evaluation=config.evaluation,
        )
        self.config = config
        self.path = config.path.absolute()
        self._fds: list[int] = []
        self._pending: list[str] = []  # handed out, moved to done/ on the next poll
        self._stuck: set[str] = set()  # could not be moved: skipped while this runs
        self.done = 0
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._root = self._open_dir(self.path)
            self._done = self._subdir(DONE)
            self._rejected = self._subdir(REJECTED)
        except OSError as exc:
            self.close()
            raise ConfigError(
                f"source {self.name}: cannot use the folder {self.path}: {exc.strerror}",
                hint="check the path and that the agent's user may write there",
            ) from exc
        except BaseException:
            self.close()
            raise
        self._next_poll = clock()

    def _open_dir(self, path: Path, dir_fd: int | None = None) -> int:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
        self._fds.append(fd)
        return fd

    def _subdir(self, name: str) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=self._root)
        try:
            return self._open_dir(Path(name), dir_fd=self._root)
        except OSError as exc:
            raise ConfigError(
                f"source {self.name}: {self.path / name} is not a plain folder "
                f"({exc.strerror}); a symlink there is refused",
                hint=f"replace it with a folder: rm {self.path / name}",
            ) from exc

    # ---- polling -----------------------------------------------------------------------

    def due(self, now: float) -> list[SourceRecord]:
        """Moves what the last poll handed out; every ``poll_interval_s``, reads new files."""
        self._settle()
        if now < self._next_poll:
            return []
        self._next_poll = now + self.config.poll_interval_s
        out: list[SourceRecord] = []
        for name in self._candidates():
            try:
                samples = self._read(name)
            except FileNotFoundError:
                continue  # removed by its writer meanwhile
            except SampleError as exc:
                self.reject(exc.reason)
                self._move_rejected(name, exc)
                continue
            try:
                self.offer(samples)  # counts its own refusals
            except SampleError as exc:
                self._move_rejected(name, exc)
                continue
            out += super().due(now)  # one file at a time through the queue
            self._pending.append(name)
        return out

    def close(self) -> None:
        """Move what was handed out, then close the folder (idempotent)."""
        if self._fds:
            self._settle()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def _candidates(self) -> list[str]:
        found: list[tuple[int, str]] = []
        with os.scandir(self._root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(".tmp") or name in self._stuck:
                    continue
                if not name.lower().endswith(SUFFIXES):
                    continue  # not ours: left alone
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((info.st_mtime_ns, name))
        found.sort()
        return [name for _, name in found[: self.config.max_files_per_poll]]

    def _read(self, name: str) -> list[RawSample]:
        """One file's samples, parsed (not checked against the spec yet)."""
        symlink = SampleError(
            "symlink", "a symlink (it could point anywhere); put the file itself here"
        )
        mode = os.stat(name, dir_fd=self._root, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise symlink
        if not stat.S_ISREG(mode):
            raise SampleError("not_regular", "not a regular file")
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self._root)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # swapped for a symlink since the stat
                raise symlink from None
            raise SampleError("unreadable", f"cannot open it: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SampleError("not_regular", "not a regular file")
            if info.st_nlink != 1:
                raise SampleError(
                    "hardlink",
                    f"it has {info.st_nlink} hard links; write a file of its own here",
                )
            limit = self.config.max_file_bytes
            if info.st_size > limit:
                raise SampleError(
                    "too_large", f"{info.st_size} bytes is over max_file_bytes ({limit})"
                )
            data = _read_at_most(fd, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise SampleError("too_large", f"it grew past max_file_bytes ({limit}) while read")
        most = self.config.max_samples_per_file
        if name.lower().endswith(".json"):
            return read_json(data, max_samples=most)
        shapes, _ = self.constraints()
        return split_batch(read_npy(data), shapes, max_samples=most)

    # ---- moving files ------------------------------------------------------------------

    def _settle(self) -> None:
        if not self._pending:
            return
        for name in self._pending:
            if self._move(name, self._done) is not None:
                self.done += 1
        self._pending = []
        self._sync()

    def _move_rejected(self, name: str, error: SampleError) -> None:
        target = self._move(name, self._rejected)
        if target is None:
            return
        logger.warning("source %s rejected %s (%s): %s", self.name, name, error.reason, error)
        reason = {
            "file": name,
            "reason": error.reason,
            "detail": error.message,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with contextlib.suppress(OSError):
            fd = os.open(
                f"{target}.reason.json",
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=self._rejected,
            )
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(reason, fh, indent=2)
                fh.write("\n")
        self._sync()

    def _move(self, name: str, into: int) -> str | None:
        """Rename ``name`` into the folder ``into`` under a free name; ``None`` if it failed."""
        target = name
        for attempt in range(1, 1000):
            if not any(_exists(n, into) for n in (target, f"{target}.reason.json")):
                break
            stem, dot, suffix = name.rpartition(".")
            target = f"{stem}.{attempt}{dot}{suffix}"
        try:
            os.rename(name, target, src_dir_fd=self._root, dst_dir_fd=into)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._stuck.add(name)
            logger.error(
                "source %s cannot move %s out of %s (%s); it is skipped until the agent restarts",
                self.name,
                name,
                self.path,
                exc.strerror,
            )
            return None
        return target

    def _sync(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.fsync(fd)

    def status(self) -> dict[str, Any]:
        """Adds the folder and how many files were done."""
        return {**super().status(), "path": str(self.path), "done": self.done}


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
