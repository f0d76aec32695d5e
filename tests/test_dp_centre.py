"""``centre_inputs``: devices train on each image minus its own mean, a per-sample
transform that shares nothing between samples, so it costs no privacy and leaves the
accountant's record as it was; the returned model computes the same on raw inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from edgefl.errors import ConfigError
from edgefl.federation import ClientInstructions, load_plan


def _start(model: str = "digits-mlp-wide") -> dict[str, Any]:
    from edgefl.edge_agent.fl.trainer import build_trainable_model

    return {
        k: v.detach().numpy().copy() for k, v in build_trainable_model(model).state_dict().items()
    }


@pytest.mark.slow  # Opacus' first import
def test_centred_training_ignores_each_samples_offset_and_keeps_the_accounting() -> None:
    from edgefl.datasets import load_dataset
    from edgefl.edge_agent.fl.trainer import build_trainable_model, train_local

    data = load_dataset("digits", seed=0)
    x, y = data.x_train[:64], data.y_train[:64]
    offsets = np.linspace(-0.4, 0.6, len(x), dtype=np.float32)[:, None, None, None]
    common: dict[str, Any] = {
        "epochs": 1, "batch_size": 16, "lr": 0.3, "momentum": 0.9, "optimizer": "sgd",
        "seed": 3, "dp": True, "sigma": 1.2, "max_grad_norm": 1.0, "history": [],
    }  # fmt: skip
    centred = train_local("digits-mlp-wide", _start(), x, y, centre_inputs=True, **common)
    shifted = train_local("digits-mlp-wide", _start(), x + offsets, y, centre_inputs=True, **common)
    plain = train_local("digits-mlp-wide", _start(), x, y, **common)
    assert centred.history == plain.history == [[1.2, 0.25, 4]]
    for k, v in centred.state.items():  # a per-sample offset changes nothing
        np.testing.assert_allclose(shifted.state[k], v, atol=2e-5)
    assert any(not np.allclose(plain.state[k], centred.state[k]) for k in plain.state)
    weight = centred.state["1.weight"]
    np.testing.assert_allclose(weight.sum(axis=1), 0.0, atol=1e-4)
    # The model the server evaluates on raw inputs is the centred one.
    model = build_trainable_model("digits-mlp-wide")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in centred.state.items()})
    with torch.no_grad():
        raw = model(torch.from_numpy(data.x_test))
        own = model(torch.from_numpy(data.x_test - data.x_test.mean(axis=(1, 2, 3), keepdims=True)))
    torch.testing.assert_close(raw, own, atol=1e-4, rtol=0)


def test_centre_inputs_is_an_opt_in_key_for_mlps_on_images() -> None:
    default = load_plan({})
    assert default.centre_inputs is False
    assert default.plan_key() == "3509e8f141aeaadf"
    plan = load_plan({"model": "digits-mlp-wide", "centre_inputs": True})
    assert plan.plan_key() != load_plan({"model": "digits-mlp-wide"}).plan_key()
    sent = ClientInstructions.from_plan(plan, "r").to_config()
    assert ClientInstructions.from_config(sent).centre_inputs is True
    older = {k: v for k, v in sent.items() if k != "centre-inputs"}
    assert ClientInstructions.from_config(older).centre_inputs is False
    load_plan({"dataset": "mnist5k", "model": "mnist-mlp", "centre_inputs": True})
    with pytest.raises(ConfigError, match="centre_inputs: model 'digits-cnn'"):
        load_plan({"centre_inputs": True})
    with pytest.raises(ConfigError, match="centre_inputs: model 'cancer-mlp'"):
        load_plan({"dataset": "breast-cancer", "centre_inputs": True})
    with pytest.raises(ConfigError, match="centre_inputs"):
        load_plan({"model": "digits-mlp", "centre_inputs": "maybe"})
    with pytest.raises(ConfigError, match="'centre-inputs'"):
        ClientInstructions.from_config({**sent, "centre-inputs": "yes"})


@pytest.mark.slow  # Opacus' first import
def test_a_convolution_first_is_refused_by_the_trainer() -> None:
    from edgefl.datasets import load_dataset
    from edgefl.edge_agent.fl.trainer import train_local
    from edgefl.errors import EdgeflError

    data = load_dataset("digits", seed=0)
    with pytest.raises(EdgeflError, match="centre_inputs needs a model whose first layer"):
        train_local(
            "digits-cnn", _start("digits-cnn"), data.x_train[:32], data.y_train[:32],
            epochs=1, batch_size=16, lr=0.1, momentum=0.0, optimizer="sgd", seed=0,
            dp=False, sigma=0.0, max_grad_norm=1.0, history=[], centre_inputs=True,
        )  # fmt: skip
