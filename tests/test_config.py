"""Tests for edgefl.config: strict models and load_config on YAML, TOML and JSON files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import pytest
from pydantic import Field, ValidationError

from edgefl.config import (
    Address,
    Rename,
    RenamedKeyWarning,
    RenameMap,
    StrictModel,
    TlsFiles,
    config_renames,
    load_config,
    validate_config,
)
from edgefl.errors import ConfigError, ExitCode


class Broker(StrictModel):
    host: str = Field("localhost", description="Broker host name.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")


class AppConfig(StrictModel):
    name: str = Field("edge", description="Device name.")
    broker: Broker = Field(default_factory=Broker, description="MQTT broker.")
    tags: list[str] = Field(default_factory=list, description="Free-form labels.")


class NeedsName(StrictModel):
    name: str = Field(description="Required.")


GOOD = {"name": "pi-7", "broker": {"host": "mqtt.local", "port": 8883}, "tags": ["lab", "a"]}

GOOD_TEXT = {
    "yaml": "name: pi-7\nbroker:\n  host: mqtt.local\n  port: 8883\ntags: [lab, a]\n",
    "toml": 'name = "pi-7"\ntags = ["lab", "a"]\n\n[broker]\nhost = "mqtt.local"\nport = 8883\n',
    "json": json.dumps(GOOD),
}

# broker.port is given as a string that is not a number, in each format.
BAD_PORT_TEXT = {
    "yaml": "broker:\n  port: not-a-port\n",
    "toml": '[broker]\nport = "not-a-port"\n',
    "json": json.dumps({"broker": {"port": "not-a-port"}}),
}

UNPARSABLE_TEXT = {
    "yaml": "broker: [unclosed\n  port: 1\n",
    "toml": "broker = = 1\n",
    "json": '{"broker": {"port": 1}',
}

FORMATS = ["yaml", "toml", "json"]


def write(tmp_path: Path, suffix: str, text: str) -> Path:
    path = tmp_path / f"config.{suffix}"
    path.write_text(text, encoding="utf-8")
    return path


def test_strict_model_forbids_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Broker.model_validate({"host": "h", "hots": "typo"})


def test_strict_model_validates_on_assignment() -> None:
    broker = Broker()
    with pytest.raises(ValidationError):
        broker.port = 0
    assert broker.port == 1883


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_config_reads_each_format(tmp_path: Path, fmt: str) -> None:
    cfg = load_config(AppConfig, write(tmp_path, fmt, GOOD_TEXT[fmt]))
    assert isinstance(cfg, AppConfig)
    assert cfg.model_dump() == GOOD


def test_yml_suffix_is_yaml(tmp_path: Path) -> None:
    cfg = load_config(AppConfig, write(tmp_path, "yml", GOOD_TEXT["yaml"]))
    assert cfg.broker.port == 8883


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_value_names_key_path_reason_and_value(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, fmt, BAD_PORT_TEXT[fmt])
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path)
    message = str(info.value)
    assert "broker.port" in message
    assert "valid integer" in message
    assert "'not-a-port'" in message
    assert str(path) in message
    assert isinstance(info.value.__cause__, ValidationError)


def test_out_of_range_value_reports_the_bound(tmp_path: Path) -> None:
    path = write(tmp_path, "yaml", "broker:\n  port: 70000\n")
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path)
    line = next(ln for ln in str(info.value).splitlines() if "broker.port" in ln)
    assert "less than or equal to 65535" in line
    assert "70000" in line


def test_list_index_is_part_of_the_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, "yaml", "tags: [ok, 5]\n")
    with pytest.raises(ConfigError, match=r"tags\.1: .*string"):
        load_config(AppConfig, path)


def test_unknown_key_says_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "yaml", "broker:\n  hots: mqtt.local\n")
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path)
    line = next(ln for ln in str(info.value).splitlines() if "broker.hots" in ln)
    assert "unknown key" in line
    assert "'mqtt.local'" in line


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "yaml", "nmae: x\nbroker:\n  port: 0\n  host: [1]\n")
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path)
    message = str(info.value)
    assert "3 invalid value(s)" in message
    for key in ("nmae", "broker.port", "broker.host"):
        assert f"  {key}: " in message


def test_missing_required_key_has_no_got_value() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(NeedsName, {}, source="inline")
    message = str(info.value)
    assert message.startswith("inline:")
    assert "name: Field required" in message
    assert "got" not in message


def test_long_values_are_truncated() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(AppConfig, {"broker": {"port": "x" * 1000}})
    line = next(ln for ln in str(info.value).splitlines() if "broker.port" in ln)
    assert len(line) < 250
    assert "..." in line


def test_top_level_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="<root>"):
        load_config(AppConfig, write(tmp_path, "yaml", "- a\n- b\n"))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(AppConfig, tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unparsable_file_names_the_file(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, fmt, UNPARSABLE_TEXT[fmt])
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path)
    assert str(path) in str(info.value)
    assert f"not valid {fmt}" in str(info.value)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"name: \xff\xfe\x00bad\n")
    with pytest.raises(ConfigError) as info:
        load_config(AppConfig, path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_yaml_gives_defaults(tmp_path: Path, text: str) -> None:
    cfg = load_config(AppConfig, write(tmp_path, "yaml", text))
    assert cfg == AppConfig()
    assert cfg.broker.port == 1883


def test_empty_toml_gives_defaults(tmp_path: Path) -> None:
    assert load_config(AppConfig, write(tmp_path, "toml", "")) == AppConfig()


def test_config_error_exit_code() -> None:
    assert ConfigError.exit_code is ExitCode.CONFIG
    assert int(ExitCode.CONFIG) == 3
    assert ConfigError("x").exit_code == 3


# Renamed keys: an old name is moved to the new one (at any depth), warned about, reported.


class Endpoint(Address):
    host: str = Field("127.0.0.1", min_length=1, description="Host.")
    port: int = Field(1883, ge=1, le=65535, description="Port.")


class Link(StrictModel):
    renamed_keys: ClassVar[RenameMap] = {
        "broker_host": "broker.host",
        "broker_port": "broker.port",
        "ca_file": "tls.ca_file",
        "keepalive": "keepalive_s",
        "timeout_ms": Rename("timeout_s", lambda v: v / 1000),
    }
    broker: Endpoint = Field(default_factory=lambda: Endpoint(), description="Broker.")
    tls: TlsFiles = Field(default_factory=lambda: TlsFiles(), description="TLS.")
    keepalive_s: int = Field(30, description="Keepalive.")
    timeout_s: float = Field(1.0, description="Timeout.")


class Replay(StrictModel):
    renamed_keys: ClassVar[RenameMap] = {"hz": "rate_hz"}
    type: Literal["replay"] = "replay"
    rate_hz: float = Field(1.0, description="Rate.")


class Device(StrictModel):
    link: Link = Field(default_factory=lambda: Link(), description="Link.")
    spare: Link | None = Field(None, description="Optional section.")
    sources: list[Annotated[Replay, Field(discriminator="type")]] = Field(
        default_factory=list, description="List of sections."
    )


OLD_DEVICE = {
    "link": {"broker_port": 8883, "ca_file": "/ca.pem", "keepalive": 5, "timeout_ms": 250},
    "spare": {"broker_host": "mqtt.local"},
    "sources": [{"type": "replay", "hz": 3}],
}


def test_old_keys_are_moved_to_their_new_place_at_every_depth(tmp_path: Path) -> None:
    path = write(tmp_path, "json", json.dumps(OLD_DEVICE))
    with pytest.warns(RenamedKeyWarning) as warned:
        cfg = load_config(Device, path)
    assert cfg.link.broker == Endpoint(port=8883)
    assert cfg.link.tls.ca_file == Path("/ca.pem")
    assert (cfg.link.keepalive_s, cfg.link.timeout_s) == (5, 0.25)
    assert cfg.spare is not None
    assert cfg.spare.broker.host == "mqtt.local"
    assert cfg.sources[0].rate_hz == 3
    renames = [(r.old, r.new) for r in config_renames(cfg)]
    assert renames == [
        ("link.broker_port", "link.broker.port"),
        ("link.ca_file", "link.tls.ca_file"),
        ("link.keepalive", "link.keepalive_s"),
        ("link.timeout_ms", "link.timeout_s"),
        ("spare.broker_host", "spare.broker.host"),
        ("sources.0.hz", "sources.0.rate_hz"),
    ]
    texts = [str(w.message) for w in warned]
    assert len(texts) == 6
    assert texts[0] == (
        f"{path}: key link.broker_port is renamed link.broker.port; accepted until the next release"
    )
    assert config_renames(cfg)[0].message() == (
        "key link.broker_port is renamed link.broker.port; accepted until the next release"
    )


def test_a_renamed_key_is_also_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="edgefl.config"), pytest.warns(RenamedKeyWarning):
        validate_config(Link, {"keepalive": 5}, source="agent.yaml")
    assert "agent.yaml: key keepalive is renamed keepalive_s" in caplog.text


def test_new_keys_give_no_warning_and_no_renames(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = validate_config(Device, {"link": {"broker": {"port": 8883}, "keepalive_s": 5}})
    assert config_renames(cfg) == []
    assert cfg.link.broker.port == 8883


@pytest.mark.parametrize(
    ("data", "old", "new"),
    [
        ({"keepalive": 5, "keepalive_s": 6}, "link.keepalive", "link.keepalive_s"),
        ({"broker_port": 1, "broker": {"port": 2}}, "link.broker_port", "link.broker.port"),
    ],
)
def test_old_and_new_key_together_is_an_error(data: dict[str, object], old: str, new: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(Device, {"link": data}, source="agent.yaml")
    assert str(info.value) == (
        f"agent.yaml: both {old} (its old name) and {new} are given; keep only the new one"
    )


def test_models_built_in_code_accept_old_keys_too() -> None:
    with pytest.warns(RenamedKeyWarning, match="Link: key keepalive is renamed keepalive_s"):
        link = Link(keepalive=7)  # type: ignore[call-arg]
    assert link.keepalive_s == 7
    with pytest.raises(ValidationError, match="both keepalive"):
        Link(keepalive=7, keepalive_s=8)  # type: ignore[call-arg]


def test_tls_files_and_address_are_strict() -> None:
    assert not TlsFiles().configured
    assert TlsFiles(ca_file=Path("ca.pem")).configured
    with pytest.raises(ValidationError):
        TlsFiles.model_validate({"certfile": "x"})
    with pytest.raises(ValidationError):
        Address.model_validate({"host": "h"})  # port has no default in the base
    assert Address(port=0).host == "127.0.0.1"


class Target(Address):
    text_form_accepted: ClassVar[bool] = True
    host: str = Field(min_length=1, description="Host.")
    port: int = Field(ge=1, le=65535, description="Port.")


class Cloud(StrictModel):
    target: Target = Field(description="Where the service is.")


class Device2(StrictModel):
    cloud: Cloud = Field(description="Cloud.")


def test_an_address_given_as_text_is_split_warned_about_and_reported() -> None:
    with pytest.warns(RenamedKeyWarning, match="key cloud.target is written"):
        cfg = validate_config(Device2, {"cloud": {"target": "inference.local:50051"}}, "a.yaml")
    assert (cfg.cloud.target.host, cfg.cloud.target.port) == ("inference.local", 50051)
    assert str(cfg.cloud.target) == "inference.local:50051"
    (rename,) = config_renames(cfg)
    assert rename.message() == (
        "key cloud.target is written {host, port} now, not 'host:port' text; "
        "accepted until the next release"
    )
    assert str(validate_config(Cloud, {"target": "[::1]:7"}).target) == "[::1]:7"
    with pytest.raises(ConfigError, match=r"cloud\.target"):
        validate_config(Device2, {"cloud": {"target": "no-port"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_config(Cloud, {"target": {"host": "h", "port": 1}}).target.port == 1


def test_only_addresses_that_opt_in_take_text() -> None:
    with pytest.raises(ConfigError):
        validate_config(Link, {"broker": "h:1"})
