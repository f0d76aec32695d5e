"""Where the files shipped with edgefl are, in a source checkout and in an installed wheel.

The deployment files (``deploy/``: the mosquitto config and ACL, the nginx Fleet API proxy
template, the systemd unit) live at the repository's top, beside ``core/``; the wheel
installs them as ``edgefl/deploy`` (package ``edgefl.deploy`` in ``[tool.setuptools]``).
Files that sit inside a package (alembic migrations, scenarios, ``.proto`` sources) are
found next to its modules either way: :func:`package_path`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final

from edgefl.errors import ConfigError

__all__ = ["deploy_path", "package_path", "source_checkout"]

_PACKAGE: Final = Path(__file__).resolve().parent
"""The ``edgefl`` package's folder: ``core/`` in a checkout, ``.../site-packages/edgefl``."""


def source_checkout() -> Path | None:
    """The repository root when edgefl runs from a source checkout, else ``None``.

    A checkout (the editable install) keeps the ``edgefl`` package in ``core/``, next to
    ``pyproject.toml``; an installed wheel has neither, whatever folder its venv is in.
    """
    root = _PACKAGE.parent
    if _PACKAGE.name == "core" and (root / "pyproject.toml").is_file():
        return root
    return None


def deploy_path(*parts: str) -> Path:
    """A shipped deployment file or folder, e.g. ``deploy_path("mosquitto", "acl")``.

    Args:
        parts: The path below ``deploy/``; none for the folder itself.

    Raises:
        ConfigError: It is not there: an install that lacks its package data.
    """
    checkout = source_checkout()
    base = checkout / "deploy" if checkout is not None else _PACKAGE / "deploy"
    path = base.joinpath(*parts)
    if not path.exists():
        raise ConfigError(
            f"shipped file not found: {path}",
            hint="reinstall edgefl: its wheel ships deploy/ as edgefl/deploy",
        )
    return path


def package_path(package: str, *parts: str) -> Path:
    """A file or folder shipped inside an installed package, e.g. its migrations.

    Args:
        package: The dotted package name (``edgefl.simulations``).
        parts: The path below the package's folder.

    Raises:
        ConfigError: The package cannot be found, or the path is not in it.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(f"{package} is not an installed package")
    path = Path(locations[0]).joinpath(*parts)
    if not path.exists():
        raise ConfigError(
            f"shipped file not found: {path}",
            hint=f"reinstall edgefl: its wheel ships this file with {package}",
        )
    return path
