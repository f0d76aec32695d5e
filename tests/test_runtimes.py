"""Device runtimes on real interpreters: ai-edge-litert here, tflite-runtime via its venv."""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgefl import runtimes
from edgefl.errors import (
    ArtifactError,
    BadInputError,
    EdgeflError,
    RuntimeUnavailableError,
)
from edgefl.runtimes import (
    RemoteRuntime,
    TensorSpec,
    _registry,
    available_runtimes,
    create_runtime,
    default_runtime_key,
    find_tflite_python,
    register_runtime,
    runtime_keys,
    worker,
)
from edgefl.runtimes.edgetpu import EdgeTpuRuntime
from edgefl.runtimes.litert import LiteRtRuntime

REGISTRY_LOGGER = "edgefl.runtimes._registry"


@dataclass(frozen=True)
class Models:
    fp32: Path
    int8: Path
    x: np.ndarray
    reference: np.ndarray


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    # Imported here: conversion pulls in torch/jax and takes seconds.
    import litert_torch
    import torch
    from ai_edge_quantizer import quantizer, recipe

    directory = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    fp32 = directory / "fp32.tflite"
    litert_torch.convert(net, (torch.randn(1, 1, 8, 8),)).export(str(fp32))

    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((256, 1, 8, 8)).astype(np.float32)
    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    data = {"serving_default": [{"args_0": sample[None]} for sample in calibration]}
    int8 = directory / "int8.tflite"
    qt.quantize(qt.calibrate(data)).export_model(str(int8), overwrite=True)

    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        reference = net(torch.from_numpy(x)).numpy()
    return Models(fp32=fp32, int8=int8, x=x, reference=reference)


# --- public surface and registry ------------------------------------------------------


def test_public_names_are_pinned() -> None:
    assert runtimes.__all__ == sorted(runtimes.__all__)
    assert set(runtimes.__all__) == {
        "RemoteResult",
        "RemoteRuntime",
        "Runtime",
        "TensorSpec",
        "available_runtimes",
        "create_runtime",
        "default_runtime_key",
        "dequantize",
        "find_tflite_python",
        "quantize",
        "register_runtime",
        "runtime_keys",
    }


def test_the_agent_package_reexports_every_public_name() -> None:
    from edgefl.edge_agent import runtimes as agent_runtimes

    assert agent_runtimes.__all__ == runtimes.__all__
    for name in runtimes.__all__:
        assert getattr(agent_runtimes, name) is getattr(runtimes, name)


def test_litert_is_available_and_preferred() -> None:
    assert runtime_keys()[:3] == ["ai-edge-litert", "tflite-runtime", "edgetpu"]
    assert available_runtimes()[0] == "ai-edge-litert"
    assert default_runtime_key() == "ai-edge-litert"
    assert LiteRtRuntime.version() == "2.3.0"


def test_unknown_key_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="known runtimes: ai-edge-litert"):
        create_runtime("no-such-runtime", tmp_path / "m.tflite")


def test_backend_that_fails_to_import_is_logged_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # One backend module that does not exist and one whose import hits a missing
    # shared library (OSError), as a real interpreter package would.
    (tmp_path / "edgefl_test_oserror_backend.py").write_text(
        "raise OSError('libfake.so: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_registry._BACKEND_MODULES, "bogus", "edgefl_test_no_such_module")
    monkeypatch.setitem(_registry._BACKEND_MODULES, "broken", "edgefl_test_oserror_backend")
    caplog.set_level(logging.DEBUG, logger=REGISTRY_LOGGER)

    available = available_runtimes()

    assert available[0] == "ai-edge-litert"
    assert "bogus" not in available
    assert "broken" not in available
    messages = [r.getMessage() for r in caplog.records if r.name == REGISTRY_LOGGER]
    assert any(m.startswith("runtime bogus unavailable: ModuleNotFoundError") for m in messages)
    assert any(m.startswith("runtime broken unavailable: OSError: libfake.so") for m in messages)
    assert all(r.levelno <= logging.INFO for r in caplog.records if r.name == REGISTRY_LOGGER)
    with pytest.raises(RuntimeUnavailableError, match=r"bogus.*ModuleNotFoundError"):
        create_runtime("bogus", tmp_path / "m.tflite")


def test_no_runtime_at_all_is_reported_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_BACKEND_MODULES", {"bogus": "edgefl_test_no_such_module"})
    monkeypatch.setattr(_registry, "_REGISTRY", {})
    with pytest.raises(RuntimeUnavailableError) as info:
        default_runtime_key()
    assert "edgefl[device]" in info.value.hint


def test_duplicate_registration_is_rejected() -> None:
    before = dict(_registry._REGISTRY)

    class Duplicate(LiteRtRuntime):
        key = "ai-edge-litert"

    with pytest.raises(ValueError, match="already registered"):
        register_runtime(Duplicate)
    assert before == _registry._REGISTRY


def test_edgetpu_is_unavailable_here(tmp_path: Path) -> None:
    if EdgeTpuRuntime.is_available():
        pytest.skip("an Edge TPU runtime library is installed on this machine")
    assert "edgetpu" not in available_runtimes()
    assert "cannot be loaded" in (EdgeTpuRuntime.unavailable_reason() or "")
    with pytest.raises(RuntimeUnavailableError, match="edgetpu") as info:
        create_runtime("edgetpu", tmp_path / "m.tflite")
    assert "coral.ai" in info.value.hint


# --- ai-edge-litert on real models ----------------------------------------------------


@pytest.mark.slow
def test_default_runtime_runs_fp32_like_torch(models: Models) -> None:
    rt = create_runtime(None, models.fp32)
    assert rt.key == "ai-edge-litert"
    assert rt.model_path == models.fp32
    [spec_in] = rt.inputs
    [spec_out] = rt.outputs
    assert (spec_in.shape, spec_in.dtype, spec_in.quantized) == ((1, 1, 8, 8), "float32", False)
    assert (spec_out.shape, spec_out.dtype) == ((1, 10), "float32")

    out = rt.run(models.x)

    assert out.dtype == np.float32
    assert out.shape == (32, 10)
    np.testing.assert_allclose(out, models.reference, atol=1e-4)


@pytest.mark.slow
def test_tensor_spec_round_trips_through_json(models: Models) -> None:
    rt = create_runtime("ai-edge-litert", models.int8)
    for spec in (*rt.inputs, *rt.outputs):
        assert TensorSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.slow
def test_int8_model_quantizes_io_and_agrees_with_float(models: Models) -> None:
    rt = create_runtime("ai-edge-litert", models.int8)
    [spec_in] = rt.inputs
    [spec_out] = rt.outputs
    for spec in (spec_in, spec_out):
        assert spec.dtype == "int8"
        assert spec.quantized
        assert spec.scale > 0

    out = rt.run(models.x)

    assert out.dtype == np.float32
    assert out.shape == models.reference.shape
    agreement = np.mean(out.argmax(axis=1) == models.reference.argmax(axis=1))
    assert agreement >= 0.9
    # The quantizer calibrates ranges with a moving average, so extreme values clip and
    # a max-error bound would test the recipe, not the runtime; correlation does not.
    assert np.corrcoef(out.ravel(), models.reference.ravel())[0, 1] > 0.95


@pytest.mark.slow
def test_run_raw_uses_the_tensor_as_given(models: Models) -> None:
    rt = create_runtime("ai-edge-litert", models.int8)
    [spec_in] = rt.inputs
    [spec_out] = rt.outputs
    sample = runtimes.quantize(models.x[0], spec_in.scale, spec_in.zero_point, spec_in.dtype)

    raw = rt.run_raw(sample)

    assert raw.dtype == np.int8
    assert raw.shape == spec_out.shape
    expected = runtimes.dequantize(raw, spec_out.scale, spec_out.zero_point)[0]
    np.testing.assert_array_equal(rt.run(models.x[:1])[0], expected)
    with pytest.raises(BadInputError, match="int8"):
        rt.run_raw(models.x[0])


@pytest.mark.slow
def test_run_checks_the_input_shape(models: Models) -> None:
    rt = create_runtime(None, models.fp32)
    assert rt.run(models.x[:0]).shape == (0, 10)
    with pytest.raises(BadInputError, match="does not match"):
        rt.run(models.x[:, :, :4])
    with pytest.raises(BadInputError, match="does not match"):
        rt.run(models.x[0])


@pytest.mark.slow
def test_threads_setting_is_accepted(models: Models) -> None:
    one = create_runtime(None, models.fp32, threads=1)
    two = create_runtime(None, models.fp32, threads=2)
    assert two.threads == 2
    np.testing.assert_allclose(two.run(models.x), one.run(models.x), atol=1e-6)
    with pytest.raises(BadInputError, match="threads"):
        create_runtime(None, models.fp32, threads=0)


def _corrupt(kind: str, fp32: Path, directory: Path) -> Path:
    path = directory / f"{kind}.tflite"
    data = fp32.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:100])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(len(data)))
    elif kind == "random-behind-header":
        path.write_bytes(data[:8] + np.random.default_rng(2).bytes(len(data) - 8))
    elif kind == "empty":
        path.write_bytes(b"")
    return path  # "missing": never written


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["truncated", "random", "random-behind-header", "empty", "missing"]
)
def test_unusable_model_file_is_an_artifact_error(
    models: Models, tmp_path: Path, kind: str
) -> None:
    path = _corrupt(kind, models.fp32, tmp_path)
    with pytest.raises(ArtifactError, match=re.escape(path.name)):
        create_runtime("ai-edge-litert", path)


# --- worker protocol (in this environment) -------------------------------------------


@pytest.mark.slow
def test_worker_round_trip_in_this_environment(models: Models) -> None:
    result = RemoteRuntime(Path(sys.executable), "ai-edge-litert").run(
        models.fp32, models.x[:5], bench_iters=7
    )
    assert result.runtime == "ai-edge-litert"
    assert result.version == "2.3.0"
    assert result.input_specs[0].shape == (1, 1, 8, 8)
    assert len(result.latency_us) == 7
    assert all(v > 0 for v in result.latency_us)
    np.testing.assert_allclose(result.outputs, models.reference[:5], atol=1e-4)


def test_worker_reports_unreadable_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert worker.main([str(tmp_path / "missing.json")]) != 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["ok"] is False


def test_worker_reports_bad_request_fields_with_exit_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"runtime": "ai-edge-litert", "model": 3}))
    assert worker.main([str(request)]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert (reply["ok"], reply["error_type"]) == (False, "BadInputError")


def test_remote_runtime_without_python_is_unavailable(tmp_path: Path) -> None:
    remote = RemoteRuntime(tmp_path / "no-python", "tflite-runtime")
    with pytest.raises(RuntimeUnavailableError, match="no Python"):
        remote.run(tmp_path / "m.tflite", np.zeros((1, 1, 8, 8), np.float32))


def test_find_tflite_python_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFL_TFLITE_PYTHON", str(tmp_path / "python"))
    assert find_tflite_python() == tmp_path / "python"


# --- tflite-runtime in its own environment -------------------------------------------

TFLITE_PYTHON = find_tflite_python()
needs_tflite = pytest.mark.skipif(
    TFLITE_PYTHON is None, reason="no tflite-runtime environment (.venv-tflite)"
)


@pytest.fixture(scope="module")
def tflite() -> RemoteRuntime:
    assert TFLITE_PYTHON is not None
    return RemoteRuntime(TFLITE_PYTHON, "tflite-runtime")


@pytest.mark.slow
@pytest.mark.tflite_runtime
@needs_tflite
def test_tflite_runtime_runs_fp32_like_torch(models: Models, tflite: RemoteRuntime) -> None:
    result = tflite.run(models.fp32, models.x, bench_iters=3)
    assert result.runtime == "tflite-runtime"
    assert result.version == "2.14.0"
    assert result.output_specs[0].dtype == "float32"
    assert len(result.latency_us) == 3
    np.testing.assert_allclose(result.outputs, models.reference, atol=1e-4)


@pytest.mark.slow
@pytest.mark.tflite_runtime
@needs_tflite
def test_tflite_worker_ignores_this_venvs_pythonpath(
    models: Models, tflite: RemoteRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flower's Ray backend exports this interpreter's sys.path as PYTHONPATH; inherited by
    # the worker it would import numpy 2 into the numpy<2 environment and fail every model.
    monkeypatch.setenv("PYTHONPATH", ":".join(p for p in sys.path if p))
    result = tflite.run(models.fp32, models.x)
    np.testing.assert_allclose(result.outputs, models.reference, atol=1e-4)


@pytest.mark.slow
@pytest.mark.tflite_runtime
@needs_tflite
def test_tflite_runtime_runs_int8_like_litert(models: Models, tflite: RemoteRuntime) -> None:
    result = tflite.run(models.int8, models.x)
    litert = create_runtime("ai-edge-litert", models.int8)
    assert result.input_specs == litert.inputs
    # Same integer kernels up to rounding: at most one output quantization step apart.
    step = litert.outputs[0].scale
    np.testing.assert_allclose(result.outputs, litert.run(models.x), atol=step * 1.01)


@pytest.mark.slow
@pytest.mark.tflite_runtime
@needs_tflite
def test_tflite_runtime_corrupt_model_is_an_artifact_error(
    models: Models, tflite: RemoteRuntime, tmp_path: Path
) -> None:
    path = _corrupt("truncated", models.fp32, tmp_path)
    with pytest.raises(ArtifactError, match="tflite-runtime") as info:
        tflite.run(path, models.x)
    assert type(info.value) is ArtifactError
    assert isinstance(info.value, EdgeflError)
