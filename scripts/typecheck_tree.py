"""Build a link tree that mirrors the installed ``edgefl`` package for mypy.

The editable install maps folders (``core/``, ``quantize/``, ...) to ``edgefl.*`` with an
import hook that static tools cannot follow. This reads the mapping from pyproject.toml
and recreates it with symlinks: ``DEST/edgefl/<files of core/>``, ``DEST/edgefl/quantize``
→ ``quantize/`` and so on.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path


def main(dest: Path) -> None:
    """Create (or refresh) the link tree at ``dest``."""
    root = Path(__file__).resolve().parent.parent
    mapping: dict[str, str] = tomllib.loads((root / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-dir"]
    shutil.rmtree(dest, ignore_errors=True)
    top = dest / "edgefl"
    top.mkdir(parents=True)
    for entry in (root / mapping["edgefl"]).iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for package, folder in mapping.items():
        if package != "edgefl":
            (top / package.split(".", 1)[1]).symlink_to(root / folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
