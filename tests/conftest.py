from __future__ import annotations

import pytest

from edgefl.edge_agent.runtimes import find_tflite_python


@pytest.fixture(scope="session")
def has_tflite_runtime() -> bool:
    """Whether the separate numpy<2 environment with tflite-runtime 2.14 exists."""
    return find_tflite_python() is not None


def require_tflite_runtime() -> None:
    if find_tflite_python() is None:
        pytest.skip("tflite-runtime environment missing: run scripts/setup (creates .venv-tflite)")
