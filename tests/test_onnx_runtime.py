"""The onnxruntime device runtime (the Jetson path) and a release's onnx variant on a device.

Unit behaviour on a real exported model: it runs like torch, reports its execution
provider, checks its inputs and threads like the TFLite runtimes, and refuses files it
cannot run with an ArtifactError naming them. Then a real release (``create_release`` from
a run recorded in a SQLite registry: build, verify with golden vectors, sign, publish)
carries an ``onnx`` variant for device class ``jetson``; the device's real model manager
configured as a Jetson installs it, and a Pi-class one refuses it.

Only the CPU execution provider exists here: the TensorRT and CUDA ones are probed by
name (:func:`choose_providers` is given provider lists), never run.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefl.errors import ArtifactError, BadInputError, RuntimeUnavailableError
from edgefl.runtimes import RemoteRuntime, available_runtimes, create_runtime, runtime_keys

onnxruntime = pytest.importorskip("onnxruntime")

MODEL = "digits-mlp"
RUN_ID = "jetson-src"
FLEET = "lab"


@dataclass(frozen=True)
class Exported:
    onnx: Path
    tflite: Path
    x: np.ndarray
    reference: np.ndarray


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    import torch

    from edgefl.quantize.convert import convert_to_onnx, convert_to_tflite
    from edgefl.zoo import build_model, get_spec

    folder = tmp_path_factory.mktemp("onnx-models")
    spec = get_spec(MODEL)
    model = build_model(MODEL, seed=0).eval()
    convert_to_onnx(model, spec.input_shape, folder / "m.onnx")
    convert_to_tflite(model, spec.input_shape, folder / "m.tflite")
    x = np.random.default_rng(0).random((16, *spec.input_shape), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    return Exported(folder / "m.onnx", folder / "m.tflite", x, reference)


# --- the runtime ---------------------------------------------------------------------------


def test_onnxruntime_is_registered_available_and_never_the_default() -> None:
    assert "onnxruntime" in runtime_keys()
    available = available_runtimes()
    assert "onnxruntime" in available
    # A .tflite still goes to a TFLite interpreter when no runtime is named.
    assert available[0] == "ai-edge-litert"


@pytest.mark.slow
def test_a_device_running_a_tflite_never_imports_onnxruntime(exported: Exported) -> None:
    """Only the asked-for backend is imported: a Pi's agent does not map onnxruntime."""
    import subprocess

    code = (
        "import sys; from edgefl.runtimes import create_runtime; "
        f"create_runtime('ai-edge-litert', {str(exported.tflite)!r}); "
        f"create_runtime(None, {str(exported.tflite)!r}); "
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'tflite_runtime') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.slow
def test_an_exported_model_runs_like_torch_on_the_cpu_provider(exported: Exported) -> None:
    from edgefl.edge_agent.runtimes import create_runtime as agent_create_runtime

    runtime = agent_create_runtime("onnxruntime", exported.onnx)
    assert runtime.key == "onnxruntime"
    # The dynamic batch axis is reported as 1: edgefl runs one sample at a time.
    assert [(s.name, s.shape, s.dtype) for s in runtime.inputs] == [
        ("input", (1, 1, 8, 8), "float32")
    ]
    assert [(s.name, s.shape, s.dtype) for s in runtime.outputs] == [("logits", (1, 10), "float32")]
    outputs = runtime.run(exported.x)
    np.testing.assert_allclose(outputs, exported.reference, atol=1e-5)
    assert runtime.run(exported.x[:0]).shape == (0, 10)
    raw = runtime.run_raw(exported.x[0])
    assert raw.shape == (1, 10)
    np.testing.assert_allclose(raw[0], exported.reference[0], atol=1e-5)
    latencies = runtime.bench(exported.x, 10, warmup=2)
    assert len(latencies) == 10
    assert all(t > 0 for t in latencies)

    described = runtime.describe()
    assert described["runtime"] == "onnxruntime"
    assert described["version"] == onnxruntime.__version__
    assert described["execution_provider"] == "CPUExecutionProvider"
    assert described["execution_providers"] == ["CPUExecutionProvider"]
    assert described["available_providers"] == onnxruntime.get_available_providers()
    assert described["inputs"][0]["shape"] == [1, 1, 8, 8]
    json.dumps(described)
    # `edgefl agent predict` reports it too.
    from edgefl.edge_agent.offload.engine import describe_model

    assert describe_model(runtime)["execution_provider"] == "CPUExecutionProvider"
    assert "execution_provider" not in describe_model(create_runtime(None, exported.tflite))


@pytest.mark.slow
def test_inputs_threads_and_delegates_are_checked(exported: Exported) -> None:
    runtime = create_runtime("onnxruntime", exported.onnx)
    with pytest.raises(BadInputError, match="does not match"):
        runtime.run(exported.x[:, :, :4])
    with pytest.raises(BadInputError, match="does not match"):
        runtime.run(exported.x[0])
    with pytest.raises(BadInputError, match="run_raw needs float32"):
        runtime.run_raw(exported.x[0].astype(np.float64))
    with pytest.raises(BadInputError, match="does not match"):
        runtime.run_raw(exported.x[:2])
    with pytest.raises(BadInputError, match="threads"):
        create_runtime("onnxruntime", exported.onnx, threads=0)
    two = create_runtime("onnxruntime", exported.onnx, threads=2)
    assert two.threads == 2
    np.testing.assert_allclose(two.run(exported.x), runtime.run(exported.x), atol=1e-6)
    with pytest.raises(BadInputError, match="no delegate libraries"):
        create_runtime("onnxruntime", exported.onnx, delegates=["libedgetpu.so.1"])


def _other_shapes_model(path: Path) -> Path:
    """A valid ONNX Identity whose second axis is dynamic too (not an edgefl export)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _external_data_model(exported: Exported, folder: Path) -> Path:
    """The same model with its weights in a file beside it (the exporter's default)."""
    import onnx

    model = onnx.load(exported.onnx)
    path = folder / "external.onnx"
    onnx.save_model(
        model, path, save_as_external_data=True, location="external.data", size_threshold=1024
    )
    assert (folder / "external.data").is_file()
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "cannot read model file"),
        ("empty", "is empty"),
        ("truncated", "cannot be loaded by onnxruntime"),
        ("random", "cannot be loaded by onnxruntime"),
        ("tflite", "is a TFLite model"),
        ("dynamic-axis", "only the batch axis may be dynamic"),
        ("external-data", "cannot be loaded by onnxruntime"),
    ],
)
def test_a_file_it_cannot_run_is_an_artifact_error_naming_it(
    exported: Exported, tmp_path: Path, kind: str, message: str
) -> None:
    path = tmp_path / f"{kind}.onnx"
    data = exported.onnx.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(len(data)))
    elif kind == "tflite":
        path.write_bytes(exported.tflite.read_bytes())
    elif kind == "dynamic-axis":
        _other_shapes_model(path)
    elif kind == "external-data":
        path = _external_data_model(exported, tmp_path)
    with pytest.raises(ArtifactError, match=re.escape(message)) as caught:
        create_runtime("onnxruntime", path)
    assert path.name in str(caught.value)


@pytest.mark.slow
def test_external_data_is_found_neither_beside_the_model_nor_in_the_working_directory(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime reads a bytes-loaded model's external data from the working directory."""
    import onnxruntime as ort

    path = _external_data_model(exported, tmp_path)  # external.data lies beside it
    monkeypatch.chdir(tmp_path)  # ... and in the working directory
    ort.InferenceSession(path.read_bytes())  # the trap: raw onnxruntime reads it
    with pytest.raises(ArtifactError, match="External data path"):
        create_runtime("onnxruntime", path)


@pytest.mark.slow
def test_an_onnx_file_on_a_tflite_runtime_is_an_artifact_error(exported: Exported) -> None:
    with pytest.raises(ArtifactError, match="not a TFLite model"):
        create_runtime("ai-edge-litert", exported.onnx)


def test_providers_are_probed_in_order_and_never_required() -> None:
    from edgefl.runtimes.onnx import PROVIDER_PREFERENCE, choose_providers

    gpu_build = [
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "AzureExecutionProvider",
    ]
    assert choose_providers(gpu_build) == list(PROVIDER_PREFERENCE)
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert choose_providers(gpu_build, ["CPUExecutionProvider", "TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(RuntimeUnavailableError, match="CUDAExecutionProvider") as caught:
        choose_providers(["CPUExecutionProvider"], ["CUDAExecutionProvider"])
    assert "available: CPUExecutionProvider" in caught.value.hint
    with pytest.raises(RuntimeUnavailableError, match="none of the execution providers"):
        choose_providers(["AzureExecutionProvider"])


@pytest.mark.slow
def test_the_provider_setting_narrows_or_makes_the_runtime_unavailable(
    exported: Exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefl.runtimes.onnx import PROVIDERS_ENV

    monkeypatch.setenv(PROVIDERS_ENV, "CPUExecutionProvider")
    runtime = create_runtime("onnxruntime", exported.onnx)
    assert runtime.describe()["requested_providers"] == ["CPUExecutionProvider"]
    # Asking for a GPU this machine does not have: unavailable, saying what is.
    monkeypatch.setenv(PROVIDERS_ENV, "TensorrtExecutionProvider")
    assert "onnxruntime" not in available_runtimes()
    with pytest.raises(RuntimeUnavailableError, match="TensorrtExecutionProvider") as caught:
        create_runtime("onnxruntime", exported.onnx)
    assert "(available: CPUExecutionProvider)" in caught.value.message


@pytest.mark.slow
def test_golden_vectors_and_the_worker_protocol(exported: Exported) -> None:
    from edgefl.manifest import GoldenSet
    from edgefl.quantize.recipes import get_recipe
    from edgefl.runtimes.golden import check_golden

    golden = GoldenSet(
        inputs=[row.reshape(-1).tolist() for row in exported.x[:8]],
        input_shape=list(exported.x.shape[1:]),
        reference_outputs=exported.reference[:8].tolist(),
        labels=exported.reference[:8].argmax(1).tolist(),
    )
    runtime = create_runtime("onnxruntime", exported.onnx)
    check = check_golden(runtime, golden, get_recipe("onnx").thresholds)
    assert check.passed, check.reasons
    assert check.max_abs_error < 1e-5
    # The same golden set against other reference outputs is a mismatch.
    shifted = golden.model_copy(
        update={"reference_outputs": np.roll(exported.reference[:8], 1, axis=1).tolist()}
    )
    assert not check_golden(runtime, shifted, get_recipe("onnx").thresholds).passed

    result = RemoteRuntime(Path(sys.executable), "onnxruntime").run(
        exported.onnx, exported.x[:4], bench_iters=3
    )
    assert result.runtime == "onnxruntime"
    assert len(result.latency_us) == 3
    np.testing.assert_allclose(result.outputs, exported.reference[:4], atol=1e-5)


# --- a release with an onnx variant, installed by a Jetson -----------------------------------


def _record_run(url: str) -> None:
    """A finished (non-DP) run of digits-mlp in the registry, its weights briefly trained."""
    from edgefl.datasets import load_dataset
    from edgefl.federation import load_plan
    from edgefl.server.registry import make_engine, session_factory, upgrade
    from edgefl.server.registry.models import FlCheckpoint, FlRun
    from edgefl.training import train
    from edgefl.zoo import build_model, get_spec

    plan = load_plan(
        {"dataset": "digits", "model": MODEL, "num_devices": 2, "dp": {"enabled": False}}
    )
    spec = get_spec(MODEL)
    data = load_dataset(plan.dataset, test_fraction=plan.test_fraction, seed=plan.seed)
    model = build_model(MODEL, seed=0)
    train(model, data.x_train, data.y_train, epochs=3, lr=spec.lr, batch_size=32, seed=0)
    blob = io.BytesIO()
    np.savez(blob, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            now = datetime.now(UTC)
            session.add(
                FlRun(
                    run_id=RUN_ID,
                    plan_json=plan.model_dump_json(),
                    plan_key=plan.plan_key(),
                    status="completed",
                    stop_reason="",
                    rounds_done=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            session.add(
                FlCheckpoint(
                    run_id=RUN_ID,
                    round=1,
                    model=blob.getvalue(),
                    strategy_state=b"",
                    accountants_json="{}",
                    at=now,
                )
            )
    finally:
        engine.dispose()


def _manager(
    root: Path, releases: Path, ca: Path, device: str, **models: Any
) -> tuple[Any, list[Any]]:
    """The device's real model manager reading the releases folder, and its reports."""
    from edgefl.edge_agent.models.manager import FolderSource, ModelManager, ModelsConfig
    from edgefl.releasesign import TrustStore
    from edgefl.server.release_keys import trusted_public_keys

    state = root / device
    reports: list[Any] = []
    manager = ModelManager(
        ModelsConfig.model_validate(
            {
                "enabled": True,
                "server": {"host": "127.0.0.1", "port": 1},
                "health_window_s": 0,
                **models,
            }
        ),
        state_dir=state,
        trust=TrustStore.load(state / "identity", extra_keys=trusted_public_keys(ca)),
        source=FolderSource(releases),
        device_id=device,
        fleet=FLEET,
        publish=reports.append,
    )
    return manager, reports


def _desired(releases: Path, ca: Path, version: int, variant: str, device: str) -> Any:
    from edgefl.releasesign import sign
    from edgefl.server.release_keys import current_signing_key
    from edgefl.server.rollout import desired_state

    now = int(time.time())
    state = desired_state(
        releases,
        MODEL,
        version,
        variant,
        fleet=FLEET,
        device=device,
        issued_at=now,
        expires_at=now + 3600,
    )
    return sign(state, current_signing_key(ca)[1])


@pytest.mark.slow
def test_a_release_carries_an_onnx_variant_a_jetson_installs_and_a_pi_refuses(
    tmp_path: Path,
) -> None:
    from edgefl.cli import app
    from edgefl.manifest import read_manifest
    from edgefl.server.release_keys import create_release_key
    from edgefl.server.releases import ReleaseRequest, create_release

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    ca = tmp_path / "ca"
    releases = tmp_path / "releases"
    create_release_key(ca)
    _record_run(url)

    outcome = create_release(
        url,
        releases,
        ca,
        ReleaseRequest(run_id=RUN_ID, recipes=["fp32", "onnx"], bench_iters=5),
    )
    assert outcome.status == "published", outcome.reasons
    onnx = outcome.variants["onnx"]
    assert (onnx["device_class"], onnx["runtime"], onnx["status"]) == (
        "jetson",
        "onnxruntime",
        "published",
    )
    assert set(onnx["latency_us"]) == {"onnxruntime"}
    assert outcome.variants["fp32"]["device_class"] == "generic"
    assert "onnxruntime" not in outcome.variants["fp32"]["latency_us"]
    # Verified with golden vectors like the others, and signed for the Jetson.
    manifest = read_manifest(releases / MODEL / "1" / "onnx.manifest.json")
    assert manifest.recipe == "onnx"
    assert manifest.verified_on["onnxruntime"].passed
    assert len(manifest.golden.inputs) == 8
    assert manifest.release is not None
    assert (manifest.release.device_class, manifest.release.runtime) == ("jetson", "onnxruntime")
    assert manifest.signature is not None
    artifact = (releases / MODEL / "1" / "onnx.tflite").read_bytes()
    assert artifact[4:8] != b"TFL3"  # ONNX bytes in the delivery layout's file name

    # `server releases` lists it, with its device class and runtime.
    config = tmp_path / "server.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    runner = CliRunner()
    args = ["server", "releases", "-c", str(config), "--db-url", url]
    listed = runner.invoke(app, [*args, "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)["releases"]
    assert row["variants"]["onnx"]["runtime"] == "onnxruntime"
    assert row["variants"]["onnx"]["device_class"] == "jetson"
    table = runner.invoke(app, args)
    assert "onnx (" in table.stdout
    assert "for jetson/onnxruntime" in table.stdout

    # A Jetson installs the onnx variant through the real manager path (signature, sha256,
    # device class and runtime, golden vectors on its own onnxruntime) and serves it.
    jetson, jetson_reports = _manager(
        tmp_path, releases, ca, "jetson-01", device_class="jetson", runtime="onnxruntime"
    )
    jetson.handle(_desired(releases, ca, 1, "onnx", "jetson-01"))
    current = jetson.current()
    assert current is not None, jetson_reports[-1]
    assert (current.installed.variant, current.installed.version) == ("onnx", 1)
    assert jetson_reports[-1].state == "running"
    assert jetson_reports[-1].last_failure is None
    served = create_runtime("onnxruntime", current.path)
    assert served.describe()["execution_provider"] == "CPUExecutionProvider"
    golden = np.asarray(manifest.golden.inputs, dtype=np.float32).reshape(-1, 1, 8, 8)
    np.testing.assert_allclose(
        served.run(golden), np.asarray(manifest.golden.reference_outputs), atol=1e-4
    )

    # A Pi refuses it: made for another device class. Nothing is installed.
    pi, pi_reports = _manager(
        tmp_path, releases, ca, "pi-01", device_class="pi", runtime="ai-edge-litert"
    )
    pi.handle(_desired(releases, ca, 1, "onnx", "pi-01"))
    assert pi.current() is None
    failure = pi_reports[-1].last_failure
    assert failure is not None
    assert failure.reason == "wrong_device_class"
    assert "made for 'jetson', this device is 'pi'" in failure.detail

    # A Jetson-class device configured for a TFLite runtime refuses it too, and a Jetson
    # refuses the .tflite variant (made for the generic class).
    confused, confused_reports = _manager(
        tmp_path, releases, ca, "jetson-02", device_class="jetson", runtime="ai-edge-litert"
    )
    confused.handle(_desired(releases, ca, 1, "onnx", "jetson-02"))
    assert confused.current() is None
    assert confused_reports[-1].last_failure.reason == "wrong_runtime"
    other, other_reports = _manager(
        tmp_path, releases, ca, "jetson-03", device_class="jetson", runtime="onnxruntime"
    )
    other.handle(_desired(releases, ca, 1, "fp32", "jetson-03"))
    assert other.current() is None
    assert other_reports[-1].last_failure.reason == "wrong_device_class"


def test_the_readme_jetson_example_is_a_valid_agent_config(tmp_path: Path) -> None:
    import yaml

    from edgefl.edge_agent.daemon import AgentConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("#### Jetson", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    config = AgentConfig.model_validate(
        {"device_id": "jetson-01", "state_dir": str(tmp_path), "mqtt": {"port": 1883}, **example}
    )
    assert (config.models.device_class, config.models.runtime) == ("jetson", "onnxruntime")
    assert "What did not" in section.split("\n## ", 1)[0]


def test_onnx_is_in_the_default_release_and_needs_no_calibration() -> None:
    from edgefl.server.releases import select_variants

    held, _ = select_variants(None, "held-out")
    assert [v.name for v in held] == ["fp32", "int8", "pruned50-int8", "onnx"]
    none, _ = select_variants(None, "none")
    assert [v.name for v in none] == ["fp32", "onnx"]
    assert [v.name for v in select_variants(["onnx-int8"], "synthetic")[0]] == ["onnx-int8"]


def test_without_onnxruntime_the_default_leaves_onnx_out_and_asking_for_it_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import edgefl.runtimes as runtimes
    from edgefl.server.releases import select_variants

    monkeypatch.setattr(runtimes, "available_runtimes", lambda: ["ai-edge-litert"])
    held, notes = select_variants(None, "held-out")
    assert [v.name for v in held] == ["fp32", "int8", "pruned50-int8"]
    assert any(n.startswith("onnx left out: onnxruntime") for n in notes)
    with pytest.raises(RuntimeUnavailableError, match="variant onnx cannot be built here"):
        select_variants(["fp32", "onnx"], "held-out")
