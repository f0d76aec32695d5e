"""The DP-sized digits model: small enough for per-device DP-SGD, and it learns digits."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from edgefl.datasets import load_dataset
from edgefl.edge_agent.fl import privacy as pv
from edgefl.edge_agent.fl.trainer import build_trainable_model, evaluate_local, train_local
from edgefl.training import evaluate, train
from edgefl.zoo import build_model, get_spec

ROOT = Path(__file__).resolve().parents[1]


def test_digits_mlp_is_far_smaller_than_the_cnn() -> None:
    # Per-device DP noise grows with sqrt(#parameters): the point of this model is size.
    n_mlp = sum(p.numel() for p in build_model("digits-mlp").parameters())
    n_cnn = sum(p.numel() for p in build_model("digits-cnn").parameters())
    assert n_mlp < 2_000
    assert n_mlp * 50 < n_cnn


@pytest.mark.slow
def test_digits_mlp_learns_digits_centrally() -> None:
    spec = get_spec("digits-mlp")
    data = load_dataset("digits", test_fraction=0.2, seed=0)
    model = build_model("digits-mlp", seed=0)
    train(model, data.x_train, data.y_train, epochs=spec.epochs, lr=spec.lr, batch_size=32)
    assert evaluate(model, data.x_test, data.y_test).accuracy >= 0.9


@pytest.mark.slow
def test_digits_mlp_learns_under_dp_sgd_on_one_device() -> None:
    # 300 samples at ε=8 over 10 local epochs: the accountant lands on the target and the
    # noisy model is far better than chance (0.1).
    data = load_dataset("digits", test_fraction=0.2, seed=0)
    x, y = data.x_train[:300], data.y_train[:300]
    q, steps = pv.steps_per_round(len(x), 16, 10)
    sigma = pv.choose_sigma(8.0, 1e-5, q, steps)
    state = {
        k: v.detach().numpy().copy()
        for k, v in build_trainable_model("digits-mlp").state_dict().items()
    }
    result = train_local(
        "digits-mlp", state, x, y, epochs=10, batch_size=16, lr=0.3, momentum=0.9,
        optimizer="sgd", seed=0, dp=True, sigma=sigma, max_grad_norm=1.0, history=[],
    )  # fmt: skip
    assert abs(pv.epsilon_of(result.history, 1e-5) - 8.0) < 0.1
    acc, _ = evaluate_local("digits-mlp", dict(result.state), data.x_test, data.y_test)
    assert np.isfinite(acc)
    assert acc >= 0.5


def test_target_scenario_uses_the_dp_sized_model() -> None:
    path = ROOT / "simulations" / "scenarios" / "digits-noniid-dp.toml"
    scenario = tomllib.loads(path.read_text(encoding="utf-8"))
    # The 64-32-10 MLP: still ~60x smaller than the CNN (chosen over data seeds, see the
    # file's comment and benchmarks/utility_bench.py --only levers).
    assert scenario["model"] == "digits-mlp-wide"
    assert get_spec("digits-mlp-wide").dataset == scenario["dataset"]
    n_wide = sum(p.numel() for p in build_model("digits-mlp-wide").parameters())
    assert n_wide * 50 < sum(p.numel() for p in build_model("digits-cnn").parameters())
