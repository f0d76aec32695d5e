"""Configuration base: strict pydantic models validated once, at the program's edge.

Every edgefl config model derives from :class:`StrictModel`, which forbids unknown keys.
:func:`load_config` reads YAML, TOML or JSON and turns a pydantic ``ValidationError``
into a :class:`~edgefl.errors.ConfigError` whose message names each bad key path, the
value given and the reason.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from edgefl.errors import ConfigError

__all__ = ["StrictModel", "format_validation_error", "load_config", "validate_config"]

ModelT = TypeVar("ModelT", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for config models: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """Render a pydantic error as one line per problem: ``key.path: reason (got value)``."""
    lines = [f"{source}: {exc.error_count()} invalid value(s)"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown key (check the spelling; unknown keys are not allowed)"
        got = err.get("input")
        got_text = "" if err["type"] == "missing" else f" (got {got!r})"
        if len(got_text) > 120:
            got_text = got_text[:117] + "...)"
        lines.append(f"  {path}: {reason}{got_text}")
    return "\n".join(lines)


def validate_config(model: type[ModelT], data: Any, source: str = "config") -> ModelT:
    """Validate already-parsed data, raising :class:`ConfigError` with key paths."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def load_config(model: type[ModelT], path: Path) -> ModelT:
    """Read and validate a YAML, TOML or JSON config file.

    Raises:
        ConfigError: The file is missing, unparsable or has invalid values.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'yaml'}: {exc}") from exc
    if data is None:
        data = {}
    return validate_config(model, data, source=str(path))
