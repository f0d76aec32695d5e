"""The distribution's shape: extras, pins and the edgefl.* import mapping."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match is not None
    return match.group(0).lower()


def _closure(extra: str) -> list[str]:
    """Requirements of an extra plus the base, following edgefl[...] self-references."""
    extras = PROJECT["project"]["optional-dependencies"]
    seen: list[str] = list(PROJECT["project"]["dependencies"])
    todo = [extra]
    while todo:
        for req in extras[todo.pop()]:
            nested = re.fullmatch(r"edgefl\[(.+)\]", req)
            if nested:
                todo += nested.group(1).split(",")
            else:
                seen.append(req)
    return seen


def test_device_extra_has_no_torch_and_has_the_device_stack() -> None:
    names = {_name(r) for r in _closure("device")}
    assert not names & {"torch", "opacus", "flwr", "litert-torch", "ai-edge-quantizer"}
    assert {"numpy", "ai-edge-litert", "paho-mqtt", "grpcio", "cryptography", "pydantic"} <= names


def test_torch_and_flwr_are_pinned_wherever_they_appear() -> None:
    for extra in PROJECT["project"]["optional-dependencies"]:
        for req in _closure(extra):
            if _name(req) == "torch":
                assert req == "torch==2.13.0", (extra, req)
            if _name(req) == "flwr":
                assert req.endswith("==1.41.0"), (extra, req)


def test_all_extra_covers_every_role() -> None:
    names = {_name(r) for r in _closure("all")}
    assert {"torch", "opacus", "flwr", "litert-torch", "ai-edge-quantizer", "sqlalchemy"} <= names


@pytest.mark.parametrize(
    "module",
    [
        "edgefl.server",
        "edgefl.edge_agent",
        "edgefl.edge_agent.runtimes",
        "edgefl.proto",
        "edgefl.quantize",
        "edgefl.quantize.recipes",
        "edgefl.simulations",
    ],
)
def test_folders_install_under_the_edgefl_namespace(module: str) -> None:
    folder = PROJECT["tool"]["setuptools"]["package-dir"][".".join(module.split(".")[:2])]
    imported = importlib.import_module(module)
    assert imported.__file__ is not None
    assert Path(imported.__file__).resolve().is_relative_to(ROOT / folder)


def test_cli_help_does_not_import_torch() -> None:
    """A device without torch must be able to run the CLI."""
    code = "import sys, edgefl.cli; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.strip() == "False"


def test_server_extra_installs_what_its_privacy_check_imports() -> None:
    # The ServerApp checks reported ε with edgefl.privacy.epsilon_of, which uses Opacus'
    # accountant: without opacus in the extra, `pip install '.[server]'` fails at run time.
    source = (ROOT / "core" / "privacy.py").read_text()
    assert "from opacus" in source
    assert "opacus" in {_name(r) for r in _closure("server")}
