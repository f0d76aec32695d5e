"""scripts/copies.py sees each kind of copy it counts, on a tiny synthetic tree.

A walk that silently found nothing would report a clean tree; here every figure must be
one in the product code and one in tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import copies  # noqa: E402

_PROCESS = """
import os, signal, subprocess
def run() -> None:
    p = subprocess.Popen(["sleep", "9"], start_new_session=True)
    os.killpg(p.pid, signal.SIGTERM)
"""
_BACKOFF = """
def delay(attempt: int) -> float:
    return min(30.0, 0.5 * 2 ** attempt)
"""
_PORT = """
import socket
def free() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
"""
_PICKER = """
def last_log_line(path: str) -> str:
    return open(path).read().splitlines()[-1]
def last_line_of_child(path: str) -> str:
    return last_log_line(path)
"""
_RESTART = "def restart(n: int) -> float:\n    return backoff_delay(n, 1.0, 30.0)\n"
_SUPERVISOR = "class ChildSupervisor:\n    pass\n"
_ID = 'ID = "[A-Za-z0-9_-]{1,64}"\n'
_TOPIC = """
ROOT = "edgefl"
def topic(fleet: str) -> str:
    return f"{ROOT}/{fleet}/x"
"""
_NOT_COPIES = """
import subprocess
def only_start() -> None:
    subprocess.Popen(["true"])
def fixed() -> int:
    return 2 ** 64
"""


def _tree(tmp: Path) -> Path:
    body = "\n".join([_PROCESS, _BACKOFF, _PORT, _PICKER, _RESTART, _SUPERVISOR, _ID, _TOPIC])
    for rel, text in {
        "server/all.py": body,
        "tests/test_all.py": body,
        "core/clean.py": _NOT_COPIES,
    }.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


def test_each_figure_is_counted_in_product_code_and_tests(tmp_path: Path) -> None:
    figures = copies.measure(_tree(tmp_path))
    names = [
        "process_copies",
        "backoff_curves",
        "free_port_helpers",
        "log_line_pickers",
        "supervisors",
        "restart_delay_sites",
        "id_patterns",
        "topic_builder_modules",
    ]
    for name in names:
        assert figures[name] == 1, (name, figures["where"])
        assert figures[f"{name}_in_tests"] == 1, (name, figures["where"])


def test_this_tree_is_measured(tmp_path: Path) -> None:
    figures = copies.measure(ROOT)
    assert figures["backoff_curves"] == 1  # edgefl.backoff, the one curve
