"""Tests for edgefl.config: strict models and load_config on YAML, TOML and JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from edgefl.config import StrictModel, load_config, validate_config
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
