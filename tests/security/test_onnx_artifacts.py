"""ONNX artifacts on a Jetson, from the attacker's position: refused, with the reason.

The device runs the release's ``onnx`` variant on onnxruntime. The attacker controls what
the device downloads (the releases folder) and can replay what the fleet signed. Beyond
the checks every artifact gets (signature, sha256, device class; the tamper table covers
them for ``.tflite``), an ONNX model can name *external data* files for its weights, which
ONNX Runtime reads at load time: from beside the model file, or, for a model given as
bytes, from the process's working directory, which for an agent is where its identity
lives. Such a model is refused even when it is signed by a trusted key (a release
pipeline that was made to sign it): no file outside the artifact is ever read into a
model, and nothing is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefl.proto.desired import DesiredModel

try:
    from tests.model_release_helpers import Built, Fleet
except ImportError:  # pragma: no cover - run from inside tests/
    from model_release_helpers import Built, Fleet  # type: ignore[import-not-found,no-redef]

pytest.importorskip("onnxruntime")
# Each test builds (trains and exports) the model once per module and runs the manager.
pytestmark = pytest.mark.slow

JETSON: dict[str, object] = {"device_class": "jetson", "runtime": "onnxruntime"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """digits-mlp's onnx variant from the toolkit, with its manifest and golden vectors."""
    from edgefl.manifest import read_manifest
    from edgefl.quantize.build import BuildOptions, build_artifacts
    from edgefl.quantize.recipes import parse_variants

    out = tmp_path_factory.mktemp("onnx-variant") / "digits-mlp"
    build_artifacts(
        BuildOptions(
            model="digits-mlp", variants=parse_variants("onnx"), out=out, epochs=1, bench_iters=2
        )
    )
    artifact = out / "digits-mlp.onnx.onnx"
    return Built({"onnx": (artifact, read_manifest(artifact.with_suffix(".manifest.json")))})


def _with_external_weights(artifact: Path, location: str) -> bytes:
    """The model with its weight tensors moved out to ``location`` (the proto only)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = onnx.load(artifact)
    moved = 0
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) >= 1024:  # the weight matrices, not the shape constants
            size = len(tensor.raw_data)
            set_external_data(tensor, location=location, offset=0, length=size)
            tensor.ClearField("raw_data")
            moved += 1
    assert moved
    return bytes(model.SerializeToString())


def _signed_as_genuine(fleet: Fleet, version: int, artifact: bytes) -> DesiredModel:
    """``artifact`` published as the onnx variant, its manifest signed by the fleet key."""
    import hashlib

    manifest = fleet.release_manifest(
        version,
        "onnx",
        sha256=hashlib.sha256(artifact).hexdigest(),
        size_bytes=len(artifact),
        device_class="jetson",
        runtime="onnxruntime",
    )
    return fleet.publish(version, "onnx", manifest=manifest, artifact=artifact)


def test_a_genuine_onnx_release_is_installed(tmp_path: Path, built: Built) -> None:
    """The control: the same path accepts the real artifact, so the refusals below count."""
    fleet = Fleet(tmp_path, built)
    manager = fleet.manager(**JETSON)
    manager.handle(
        fleet.desired(fleet.publish(1, "onnx", device_class="jetson", runtime="onnxruntime"))
    )
    current = manager.current()
    assert current is not None
    assert current.installed.variant == "onnx"


def test_a_signed_model_reading_the_agents_identity_as_weights_is_refused(
    tmp_path: Path, built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's working directory is its state folder (deploy/systemd), keys included."""
    import onnx
    import onnxruntime as ort

    fleet = Fleet(tmp_path, built)
    manager = fleet.manager(**JETSON)
    # The file the model names, holding bytes that make it a working model (the real
    # weights), where onnxruntime looks for a model given as bytes: only the runtime's
    # refusal stops it.
    secret = "identity/device.key"
    genuine = onnx.load(built.variants["onnx"][0])
    weights = [bytes(t.raw_data) for t in genuine.graph.initializer if len(t.raw_data) >= 1024]
    assert len(weights) == 1  # digits-mlp: one weight matrix beyond the threshold
    (fleet.state_dir / "identity").mkdir(parents=True, exist_ok=True)
    (fleet.state_dir / secret).write_bytes(weights[0])
    monkeypatch.chdir(fleet.state_dir)
    crafted = _with_external_weights(built.variants["onnx"][0], secret)
    ort.InferenceSession(crafted)  # the trap: plain onnxruntime loads it from there

    manager.handle(fleet.desired(_signed_as_genuine(fleet, 1, crafted)))

    assert manager.current() is None
    failure = fleet.reports[-1].last_failure
    assert failure is not None
    assert failure.reason == "load_failed", failure
    assert "External data path" in failure.detail
    assert list((fleet.state_dir / "models" / "staging").iterdir()) == []


def test_a_pi_refuses_the_jetson_variant_and_a_jetson_refuses_swapped_bytes(
    tmp_path: Path, built: Built
) -> None:
    fleet = Fleet(tmp_path / "pi", built)
    pi = fleet.manager(device_class="pi", runtime="ai-edge-litert")
    pi.handle(fleet.desired(fleet.publish(1, "onnx", device_class="jetson", runtime="onnxruntime")))
    assert pi.current() is None
    assert fleet.reports[-1].last_failure is not None
    assert fleet.reports[-1].last_failure.reason == "wrong_device_class"

    # Another ONNX model's bytes under the genuine signed manifest: the sha256 differs.
    jetson_fleet = Fleet(tmp_path / "jetson", built)
    jetson = jetson_fleet.manager(**JETSON)
    genuine = built.variants["onnx"][0].read_bytes()
    forged = bytearray(genuine)
    forged[-64:] = np.random.default_rng(0).bytes(64)
    jetson.handle(
        jetson_fleet.desired(
            jetson_fleet.publish(
                1, "onnx", artifact=bytes(forged), device_class="jetson", runtime="onnxruntime"
            )
        )
    )
    assert jetson.current() is None
    assert jetson_fleet.reports[-1].last_failure is not None
    assert jetson_fleet.reports[-1].last_failure.reason == "sha256_mismatch"
