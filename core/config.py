"""Configuration base: strict pydantic models validated once, at the program's edge.

Every edgefl config model derives from :class:`StrictModel`, which forbids unknown keys.
:func:`load_config` reads YAML, TOML or JSON and turns a pydantic ``ValidationError``
into a :class:`~edgefl.errors.ConfigError` whose message names each bad key path, the
value given and the reason.

The config language
-------------------
Every model speaks the same vocabulary:

- TLS material is a ``tls:`` section of :class:`TlsFiles` (``ca_file``, ``cert_file``,
  ``key_file``);
- an address is a ``{host, port}`` section (:class:`Address`, subclassed for defaults);
- durations and sizes carry their unit: ``_s``, ``_ms``, ``_mb`` (``keepalive_s``);
- a secret is a ``SecretStr`` (never printed, ``model_dump`` shows ``**********``).

Renamed keys
------------
A key that changes name keeps working for one release. A model declares its renames in
the ``renamed_keys`` class variable, old key -> new key *relative to that model*; the new
key may be a dotted path, into a new sub-section or out of one::

    class IngestConfig(StrictModel):
        renamed_keys: ClassVar[RenameMap] = {
            "broker_host": "broker.host",      # into the broker: {host, port} section
            "broker_port": "broker.port",
            "ca_file": "tls.ca_file",          # into the tls: section
            "keepalive": "keepalive_s",        # a plain rename
            "timeout_ms": Rename("timeout_s", lambda v: v / 1000),  # with a new unit
        }
        broker: BrokerAddress = Field(default_factory=BrokerAddress)
        tls: TlsFiles = Field(default_factory=TlsFiles)
        keepalive_s: int = 30

Before validation an old key is moved to its new place (sub-sections are created as
needed), a :class:`RenamedKeyWarning` is issued with ``warnings.warn`` and the same text is
logged at WARNING, naming the source (file), the old key path and the new one. Giving both
the old and the new key is an error that says so. Renames apply at every depth:
:func:`validate_config` and :func:`load_config` walk the data alongside the model (nested
models, ``X | None``, ``list[X]``, ``dict[str, X]`` and discriminated unions), so the
reported paths are full (``ingest.broker_host``); constructing a model directly in code
(``IngestConfig(broker_host=...)``) is rewritten too, with a path relative to that model.

An address that used to be ``"host:port"`` text and is now a ``{host, port}`` section is
handled the same way when its :class:`Address` subclass sets ``text_form_accepted = True``:
the text is split, warned about and reported (``key cloud.target is written {host, port}
now...``).

The renames found are kept on the returned instance: :func:`config_renames` gives them
as :class:`KeyRename` records, which ``validate-config`` commands print with
:meth:`KeyRename.message`::

    cfg = load_config(AgentConfig, path)
    for rename in config_renames(cfg):
        print(rename.message())   # "key mqtt.keepalive is renamed mqtt.keepalive_s; ..."
"""

from __future__ import annotations

import json
import logging
import tomllib
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from edgefl.errors import ConfigError

__all__ = [
    "Address",
    "KeyRename",
    "Rename",
    "RenameMap",
    "RenamedKeyWarning",
    "StrictModel",
    "TlsFiles",
    "config_renames",
    "format_validation_error",
    "load_config",
    "read_config_data",
    "validate_config",
]

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound="StrictModel")


class RenamedKeyWarning(DeprecationWarning):
    """A config file used a key's old name; it is accepted until the next release."""


class Rename(NamedTuple):
    """A renamed key whose value changes too (``convert`` maps the old value to the new)."""

    new: str
    convert: Callable[[Any], Any] | None = None


RenameMap = Mapping[str, "str | Rename"]
"""``StrictModel.renamed_keys``: old key -> new key path (dotted), relative to the model."""


@dataclass(frozen=True)
class KeyRename:
    """One old key name found in a config, and where its value went."""

    old: str
    """The old key's full path (``ingest.broker_host``)."""
    new: str
    """The new key's full path (``ingest.broker.host``)."""
    source: str = "config"
    """Where it was read (the file name)."""
    text_address: bool = False
    """Not a new name: an address given as ``"host:port"`` text, now ``{host, port}``."""

    def message(self) -> str:
        """The line ``validate-config`` prints: ``key X is renamed Y; accepted until ...``."""
        if self.text_address:
            return (
                f"key {self.old} is written {{host, port}} now, not 'host:port' text; "
                "accepted until the next release"
            )
        return f"key {self.old} is renamed {self.new}; accepted until the next release"

    def warning_text(self) -> str:
        """The warning issued when the old key is read."""
        return f"{self.source}: {self.message()}" if self.source else self.message()


class _ConflictError(ValueError):
    """Both a key's old and new name were given."""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _as_dict(value: Any) -> Any:
    """A sub-section given as a model instance becomes the dict of what was set in it."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    return value


def _rewrite_level(
    model: type[StrictModel], data: dict[str, Any], prefix: str
) -> tuple[dict[str, Any], list[KeyRename]]:
    """Move this model's renamed keys (not nested ones) to their new place in ``data``."""
    found: list[KeyRename] = []
    renames = model.renamed_keys
    if not renames or not any(old in data for old in renames):
        return data, found
    data = dict(data)
    for old, spec in renames.items():
        if old not in data:
            continue
        rename = spec if isinstance(spec, Rename) else Rename(spec)
        value = data.pop(old)
        if rename.convert is not None:
            value = rename.convert(value)
        *parents, last = rename.new.split(".")
        node = data
        walked = ""
        for part in parents:
            walked = _join(walked, part)
            child = _as_dict(node.get(part, {}))
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise _ConflictError(
                    f"{_join(prefix, old)} is renamed {_join(prefix, rename.new)}, but "
                    f"{_join(prefix, walked)} is not a section"
                )
            child = dict(child)
            node[part] = child
            node = child
        if last in node:
            raise _ConflictError(
                f"both {_join(prefix, old)} (its old name) and {_join(prefix, rename.new)} "
                "are given; keep only the new one"
            )
        node[last] = value
        found.append(KeyRename(_join(prefix, old), _join(prefix, rename.new)))
    return data, found


def _model_args(annotation: Any) -> list[Any]:
    """The member types of a union annotation, or the annotation itself."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_args(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_model_args(arg))
        return out
    return [annotation]


def _pick_model(annotation: Any, value: Any, discriminator: Any) -> type[StrictModel] | None:
    """The StrictModel a dict ``value`` of a field typed ``annotation`` validates as."""
    models = [
        a for a in _model_args(annotation) if isinstance(a, type) and issubclass(a, StrictModel)
    ]
    if len(models) == 1:
        return models[0]
    if models and isinstance(discriminator, str) and isinstance(value, dict):
        for candidate in models:
            field = candidate.model_fields.get(discriminator)
            if field is not None and value.get(discriminator) in typing.get_args(field.annotation):
                return candidate
    return None


def _walk(model: type[StrictModel], data: Any, prefix: str) -> tuple[Any, list[KeyRename]]:
    """Rewrite renamed keys in ``data`` (validated as ``model``) at every depth."""
    if not isinstance(data, dict):
        return data, []
    data, found = _rewrite_level(model, data, prefix)
    copied = False
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        value = data[name]
        annotation = field.annotation
        path = _join(prefix, name)
        new_value: Any = value
        sub_found: list[KeyRename] = []
        origin = typing.get_origin(annotation)
        args = [a for a in _model_args(annotation) if a is not type(None)]
        container = typing.get_origin(args[0]) if len(args) == 1 else origin
        if container in (list, tuple) and isinstance(value, list):
            (item_type, *_) = typing.get_args(args[0])
            items = []
            for i, item in enumerate(value):
                sub = _pick_model(item_type, item, _discriminator(item_type))
                item, item_found = _walk(sub, item, f"{path}.{i}") if sub else (item, [])
                items.append(item)
                sub_found.extend(item_found)
            if sub_found:
                new_value = items
        elif container is dict and isinstance(value, dict):
            (_, item_type) = typing.get_args(args[0])
            entries = {}
            for key, item in value.items():
                sub = _pick_model(item_type, item, _discriminator(item_type))
                item, item_found = _walk(sub, item, f"{path}.{key}") if sub else (item, [])
                entries[key] = item
                sub_found.extend(item_found)
            if sub_found:
                new_value = entries
        else:
            sub = _pick_model(annotation, value, field.discriminator)
            if sub is not None and isinstance(value, str) and _takes_text(sub):
                new_value = _address_from_text(value)
                sub_found = [KeyRename(path, path, text_address=True)]
            elif sub is not None:
                new_value, sub_found = _walk(sub, value, path)
        if sub_found:
            if not copied:
                data = dict(data)
                copied = True
            data[name] = new_value
            found.extend(sub_found)
    return data, found


def _takes_text(model: type[StrictModel]) -> bool:
    return issubclass(model, Address) and model.text_form_accepted


def _address_from_text(value: str) -> Any:
    """``"host:port"`` (``"[v6]:port"``) as ``{host, port}``; other text is left to fail."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        return value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return {"host": host, "port": int(port)}


def _discriminator(annotation: Any) -> Any:
    """The discriminator of an ``Annotated[..., Field(discriminator=...)]`` item type."""
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in typing.get_args(annotation)[1:]:
            discriminator = getattr(meta, "discriminator", None)
            if discriminator is not None:
                return discriminator
    return None


def _announce(renames: list[KeyRename], source: str) -> list[KeyRename]:
    out = []
    for rename in renames:
        rename = KeyRename(rename.old, rename.new, source, rename.text_address)
        text = rename.warning_text()
        log.warning("%s", text)
        warnings.warn(text, RenamedKeyWarning, stacklevel=4)
        out.append(rename)
    return out


class StrictModel(BaseModel):
    """Base for config models: unknown keys are errors, values are validated on assignment.

    ``renamed_keys`` declares keys that changed name (see the module docstring).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    renamed_keys: ClassVar[RenameMap] = {}
    """Old key -> new key path (dotted, relative to this model), accepted for one release."""

    _key_renames: list[KeyRename] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _accept_renamed_keys(cls, data: Any) -> Any:
        # Data that came through validate_config/load_config is already rewritten (with
        # full key paths); this catches models built directly from old keys in code.
        if not cls.renamed_keys or not isinstance(data, dict):
            return data
        try:
            data, found = _rewrite_level(cls, data, "")
        except _ConflictError as exc:
            raise ValueError(str(exc)) from None
        _announce(found, cls.__name__)
        return data


def config_renames(config: StrictModel) -> list[KeyRename]:
    """The old key names :func:`load_config`/:func:`validate_config` found for ``config``."""
    return list(config._key_renames)


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
    """Validate already-parsed data, raising :class:`ConfigError` with key paths.

    Renamed keys are moved to their new names first, with a warning each; the list is
    kept on the result (:func:`config_renames`).
    """
    try:
        data, found = _walk(model, data, "")
    except _ConflictError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    renames = _announce(found, source)
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc
    config._key_renames = renames
    return config


def load_config(model: type[ModelT], path: Path) -> ModelT:
    """Read and validate a YAML, TOML or JSON config file.

    Old key names are accepted with a warning (see the module docstring); the renames
    found are kept on the result: :func:`config_renames`.

    Raises:
        ConfigError: The file is missing, unparsable or has invalid values.
    """
    return validate_config(model, read_config_data(path), source=str(path))


def read_config_data(path: Path) -> Any:
    """Parse a YAML, TOML or JSON file (by suffix; YAML otherwise) without validating it.

    Raises:
        ConfigError: The file is missing or unparsable.
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
    return {} if data is None else data


class TlsFiles(StrictModel):
    """TLS material (the ``tls:`` section of every model that configures a TLS peer).

    Which files a use needs (all three for mutual TLS, or only ``ca_file`` for a client
    that just checks its server) is checked by the model that contains the section.
    """

    ca_file: Path | None = Field(
        None,
        description="CA certificate(s) (PEM) the peer's certificate is checked against; "
        "on a listener, the CA that must have signed client certificates (mutual TLS).",
    )
    cert_file: Path | None = Field(
        None, description="This side's certificate (PEM; a chain may follow it)."
    )
    key_file: Path | None = Field(None, description="Private key of cert_file (PEM).")

    @property
    def configured(self) -> bool:
        """Whether any TLS file is set."""
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))


class Address(StrictModel):
    """A ``{host, port}`` address; subclass it to give a use its defaults.

    For example::


    class BrokerAddress(Address):
        host: str = Field("127.0.0.1", min_length=1, description="Broker host name.")
        port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    """

    text_form_accepted: ClassVar[bool] = False
    """Whether a ``"host:port"`` text (the older form of some addresses) is still read,
    with a warning, for one release; :func:`config_renames` reports it."""

    host: str = Field("127.0.0.1", min_length=1, description="Host name or IP address.")
    port: int = Field(ge=0, le=65535, description="TCP port (0: pick a free one, listeners).")

    @model_validator(mode="before")
    @classmethod
    def _accept_text(cls, data: Any) -> Any:
        # Data that came through validate_config/load_config is already a dict (with the
        # key's full path reported); this catches an address built from text in code.
        if not cls.text_form_accepted or not isinstance(data, str):
            return data
        parsed = _address_from_text(data)
        if isinstance(parsed, dict):
            _announce([KeyRename(f"{cls.__name__} {data!r}", "", text_address=True)], "")
        return parsed

    def __str__(self) -> str:
        """``host:port`` (``[host]:port`` for an IPv6 address)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
