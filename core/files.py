"""Small file helpers shared by every component."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Final

from edgefl.errors import BadInputError

__all__ = [
    "SAFE_NAME_PATTERN",
    "check_safe_name",
    "fsync_dir",
    "write_bytes_atomic",
    "write_text_atomic",
]

SAFE_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A name that is also one safe path segment (run ids, scenario names).

It starts with a letter or digit, so ``.``, ``..`` and hidden names are impossible, and it
holds no separator, space or control character.
"""
_SAFE_NAME: Final = re.compile(SAFE_NAME_PATTERN)


def check_safe_name(value: str, what: str) -> str:
    """Return ``value`` if it matches :data:`SAFE_NAME_PATTERN`.

    Raises:
        BadInputError: It does not; the message names ``what`` and the rule.
    """
    if _SAFE_NAME.fullmatch(value) is None:
        raise BadInputError(
            f"invalid {what} {value!r}: it becomes a folder name",
            hint="use 1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
        )
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write text so a reader sees either the old file or the whole new one, never a part."""
    _replace_atomically(path, text.encode("utf-8"), mode=None, sync_dir=False)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` atomically with ``mode`` set before a byte is written (keys, CRLs).

    The parent folder is created (mode 0700) if missing and fsynced after the rename, so
    the new file survives a crash once this returns.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace_atomically(path, data, mode=mode, sync_dir=True)


def _replace_atomically(path: Path, data: bytes, *, mode: int | None, sync_dir: bool) -> None:
    """Temporary file in the same folder (mkstemp: 0600 unless ``mode``), fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Flush a folder to disk, so the renames and new names in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
