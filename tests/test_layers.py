"""The dependency rule holds, and scripts/layers.py can see a break of it.

The counter is exercised on a tiny synthetic tree with one server module importing the
device, so a walk that silently found nothing would fail here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import layers  # noqa: E402


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    (tmp / "pyproject.toml").write_text(
        "[tool.setuptools]\n"
        'package-dir = { "edgefl" = "core", "edgefl.server" = "server", '
        '"edgefl.edge_agent" = "edge_agent" }\n'
    )
    for rel, text in {"core/__init__.py": "", "server/__init__.py": "",
                      "edge_agent/__init__.py": "", **files}.items():  # fmt: skip
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


def test_counter_sees_each_kind_of_crossing(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "edge_agent/link.py": "def f() -> None:\n    from edgefl.server import x\n",
            "server/serve.py": "from edgefl.edge_agent.link import f\n",
            "server/fl/__init__.py": "",
            "server/fl/strategy.py": "from ...edge_agent import link\n",
            "core/privacy.py": "import edgefl.server.serve\n",
            "core/cli.py": "from edgefl.server import serve\n",
        },
    )
    counts, roots = layers.import_counts(root)
    assert counts == {
        "server_imports_edge_agent": 2,
        "edge_agent_imports_server": 1,
        "core_imports_above": 1,
    }
    assert roots == [("edgefl.cli", "edgefl.server.serve")]


def test_tls_spellings_follow_config_model_inheritance(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "core/config.py": "class StrictModel: ...\n",
            "server/a.py": (
                "from pathlib import Path\nfrom edgefl.config import StrictModel\n"
                "class Base(StrictModel):\n    ca_file: Path\n    ca_dir: Path\n"
                "class Child(Base):\n    certfile: Path | None\n    cert_days: int\n"
                "class NotConfig:\n    tls_key: Path\n"
            ),
        },
    )
    assert layers.tls_spellings(root) == {
        "edgefl.server.a.Base": ["ca_file"],
        "edgefl.server.a.Child": ["certfile"],
    }


@pytest.mark.timeout(120)
def test_this_tree_keeps_every_contract() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "layers.py"), "--json"],
        capture_output=True, text=True, check=True, timeout=110,
    ).stdout  # fmt: skip
    figures = json.loads(out)
    assert figures["contracts_broken"] == 0
    assert figures["contracts_kept"] >= 4
    assert figures["server_imports_edge_agent"] == 0
    assert figures["edge_agent_imports_server"] == 0
    assert figures["core_imports_above"] == 0
