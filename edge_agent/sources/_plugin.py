"""The plugin source: a :class:`DataSource` subclass another package installs.

A package declares its source in the ``edgefl.sources`` entry-point group::

    [project.entry-points."edgefl.sources"]
    csv-tail = "edgefl_csv_source:CsvTailSource"

and an agent config names it with ``{type: plugin, entry_point: csv-tail, options:
{...}}``. The class has an ``Options`` attribute, a pydantic model that validates
``options`` (unknown keys are errors when it derives from
:class:`~edgefl.config.StrictModel`), and is built as ``cls(name, options)``. See
``docs/sources.md`` for the whole interface and the worked example in
``examples/source_plugin/``.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from edgefl.config import StrictModel, format_validation_error
from edgefl.edge_agent.sources._base import DataSource
from edgefl.errors import ConfigError, EdgeflError

__all__ = ["ENTRY_POINT_GROUP", "PluginConfig", "find_plugin", "load_plugin"]

ENTRY_POINT_GROUP = "edgefl.sources"


class PluginConfig(StrictModel):
    """A source from an installed package (entry-point group ``edgefl.sources``)."""

    type: Literal["plugin"] = "plugin"
    name: str = Field("plugin", description="Name of this source in logs and status.")
    entry_point: str = Field(
        min_length=1,
        max_length=200,
        description="Name of the entry point in the edgefl.sources group.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="The plugin's own settings (its Options model)."
    )


def find_plugin(name: str) -> type[DataSource]:
    """The source class installed under ``name`` in the ``edgefl.sources`` group.

    Raises:
        ConfigError: No such entry point, two packages claim the name, it does not load,
            or it is not a :class:`DataSource` subclass with an ``Options`` model.
    """
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    matches = {ep.value: ep for ep in found if ep.name == name}
    if not matches:
        installed = sorted({ep.name for ep in found}) or ["none"]
        raise ConfigError(
            f"no source plugin {name!r} is installed (entry-point group {ENTRY_POINT_GROUP}; "
            f"installed: {', '.join(installed)})",
            hint="install the package that provides it into the agent's environment",
        )
    if len(matches) > 1:
        raise ConfigError(
            f"source plugin {name!r} is claimed by {len(matches)} entry points "
            f"({', '.join(sorted(matches))})",
            hint="uninstall all but one of the packages that provide it",
        )
    entry: EntryPoint = next(iter(matches.values()))
    try:
        cls = entry.load()
    except Exception as exc:  # any import failure of someone else's package
        raise ConfigError(
            f"source plugin {name!r} ({entry.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, DataSource)):
        raise ConfigError(
            f"source plugin {name!r} ({entry.value}) is not a DataSource subclass",
            hint="the entry point must name a class deriving from "
            "edgefl.edge_agent.sources.DataSource",
        )
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise ConfigError(
            f"source plugin {name!r} ({entry.value}) has no Options model",
            hint="give the class an Options attribute: a pydantic model of its settings",
        )
    return cls


def load_plugin(config: PluginConfig) -> DataSource:
    """Build the source a plugin config names.

    Raises:
        ConfigError: See :func:`find_plugin`; also bad options, or a constructor that
            failed.
    """
    cls = find_plugin(config.entry_point)
    model: type[BaseModel] = cls.Options  # type: ignore[attr-defined]
    where = f"sources[{config.name}].options"
    try:
        options = model.model_validate(config.options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from exc
    try:
        source = cls(config.name, options)  # type: ignore[call-arg]
    except EdgeflError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"source plugin {config.entry_point!r} could not start: {type(exc).__name__}: {exc}"
        ) from exc
    source.name = config.name
    return source
