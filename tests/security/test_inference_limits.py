"""Inference service input limits, attacked by a device holding only its own certificate.

A real grpc.aio server with mutual TLS under a fleet CA, on port 0. Before the fix a
shape such as ``[0, 2**62, 2**62]`` reached numpy and came back ``UNKNOWN`` with a
traceback, and a batch of 16,000 samples was computed (seconds of the model's time)
while every other device waited behind it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from probes.small import (
    HUGE_SHAPES,
    InferenceTarget,
    inference_target,
    probe_inference_huge_shape,
    probe_inference_oversized_batch,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceTarget]:
    with inference_target(tmp_path_factory.mktemp("inference")) as running:
        yield running


def test_huge_shape_is_invalid_argument_and_service_goes_on(target: InferenceTarget) -> None:
    result = probe_inference_huge_shape(target)
    detail = str(result["detail"])
    assert detail.count("INVALID_ARGUMENT") == len(HUGE_SHAPES), detail
    assert "too large" in detail
    assert "a good request afterwards: OK" in detail
    assert result["held"] is True


def test_oversized_batch_is_refused_and_honest_device_answered_promptly(
    target: InferenceTarget,
) -> None:
    result = probe_inference_oversized_batch(target, duration_s=2.0)
    detail = str(result["detail"])
    assert "refused (INVALID_ARGUMENT)" in detail, detail
    assert result["held"] is True, detail
    assert target.running.server.refused["INVALID_ARGUMENT"] > 0
