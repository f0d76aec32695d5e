"""The security regression suite: each test is one attack, from the attacker's position.

The attacks themselves live in ``benchmarks/probes/`` (the security probe runs the same
functions); this puts the repository root and ``benchmarks/`` on ``sys.path`` so tests
can import them as ``probes.<area>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for _path in (_ROOT / "benchmarks", _ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
