"""The security regression suite: each test is one attack, from the attacker's position.

The attacks themselves live in ``benchmarks/probes/`` (the security probe runs the same
functions); this puts the repository root and ``benchmarks/`` on ``sys.path`` so tests
can import them as ``probes.<area>``, and offers ``veth_ns``: a network namespace joined
to this host by veth, standing for another host.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
for _path in (_ROOT / "benchmarks", _ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


from probes.netns import VethNamespace, netns_available, veth_namespace  # noqa: E402


@pytest.fixture(scope="module")
def veth_ns() -> Iterator[VethNamespace]:
    """A network namespace joined to this host by veth: "another host" (deleted after).

    Bind a server on ``veth_ns.host_ip`` to expose it to the namespace; run the attacker
    with ``veth_ns.run([...])``. Skipped where namespaces cannot be created (not root).
    """
    if not netns_available():
        pytest.skip("network namespaces need root and the ip tool")
    with veth_namespace("efl") as net:
        yield net
