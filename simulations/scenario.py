"""Simulation scenarios: one validated TOML file per experiment.

A scenario file is a federation plan (:class:`edgefl.federation.FederationPlan`, the
same keys ``edgefl server train --plan`` reads: data, training, strategy, ``[dp]``,
``[central_dp]``, ``[[profiles]]``, waits and timeouts) plus a ``[simulation]`` table for
what only the simulation engine uses (CPUs and GPUs per virtual device, the no-DP
comparison run). Every key is checked by a strict pydantic model, so a typo or a bad
value fails with the key path, the value and the reason. Keys of the older layout
(``[scenario]``, ``[data]``, ``[training]``, ``[privacy]``, ``share``, ``speed``, ...)
are still read for one release, each with a warning naming its new key.

:attr:`Scenario.plan` is the plan part (what a deployment would run), with nothing
translated.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field

from edgefl.config import StrictModel, validate_config
from edgefl.errors import ConfigError
from edgefl.federation import FederationPlan
from edgefl.files import SAFE_NAME_PATTERN
from edgefl.resources import package_path

__all__ = [
    "Scenario",
    "SimulationSection",
    "load_scenario",
    "parse_scenario",
    "shipped_scenarios",
]


class SimulationSection(StrictModel):
    """Settings of the simulation engine only (not part of the federation plan)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per virtual device.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per virtual device.")
    compare_no_dp: bool = Field(
        False, description="Also run the same scenario without DP (device-level and central)."
    )


class Scenario(FederationPlan):
    """A whole simulation scenario (the TOML file): a plan plus ``[simulation]``."""

    name: str = Field(  # required here, optional in a plan
        pattern=SAFE_NAME_PATTERN,
        description="Short name (letters, digits, . _ -), used in reports and run ids.",
    )
    simulation: SimulationSection = Field(
        default_factory=SimulationSection, description="Simulation engine settings."
    )

    @property
    def plan(self) -> FederationPlan:
        """The federation plan this scenario runs: every key but ``[simulation]``."""
        return FederationPlan.model_validate(self.model_dump(exclude={"simulation"}))

    def without_dp(self) -> Scenario:
        """The same scenario with device-level and central DP switched off."""
        data = self.model_dump()
        data["dp"]["enabled"] = False
        data["central_dp"]["enabled"] = False
        return Scenario.model_validate(data)


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """Validate already-parsed TOML data.

    Raises:
        ConfigError: A key is unknown or a value is invalid; the message names the key path.
    """
    return validate_config(Scenario, data, source=source)


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario TOML file (``name`` defaults to the file's stem).

    Raises:
        ConfigError: The file is missing, not TOML, or invalid (naming the key path).
    """
    if path.suffix != ".toml":
        raise ConfigError(f"{path}: a scenario is a .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read scenario {path}: {exc.strerror}",
            hint="shipped scenarios: " + ", ".join(str(p) for p in shipped_scenarios()),
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    old_name = isinstance(data.get("scenario"), dict) and "name" in data["scenario"]
    if "name" not in data and not old_name:
        data["name"] = path.stem  # a plan file without a name runs under its file's
    return parse_scenario(data, source=str(path))


def shipped_scenarios() -> list[Path]:
    """The scenario files installed with the package."""
    return sorted(package_path("edgefl.simulations", "scenarios").glob("*.toml"))
