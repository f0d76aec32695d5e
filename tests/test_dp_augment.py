"""Augmentation multiplicity and per-layer clipping: the two opt-in DP-SGD levers of the
local trainer, their plan keys, and that neither changes what the accountant records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgefl.errors import ConfigError
from edgefl.federation import ClientInstructions, load_plan


def _train(**kwargs: object) -> object:
    from edgefl.datasets import load_dataset
    from edgefl.edge_agent.fl.trainer import build_trainable_model, train_local

    data = load_dataset("digits", seed=0)
    state = {
        k: v.detach().numpy().copy()
        for k, v in build_trainable_model("digits-mlp-wide").state_dict().items()
    }
    args: dict[str, object] = {
        "epochs": 1, "batch_size": 16, "lr": 0.3, "momentum": 0.9, "optimizer": "sgd",
        "seed": 5, "dp": True, "sigma": 1.1, "max_grad_norm": 1.0, "history": [],
    }  # fmt: skip
    args.update(kwargs)
    x = args.pop("x", data.x_train[:64])
    y = args.pop("y", data.y_train[:64])
    return train_local("digits-mlp-wide", state, x, y, **args)  # type: ignore[arg-type]


def test_views_are_shifted_copies_and_the_first_is_the_image() -> None:
    from edgefl.edge_agent.fl.trainer import _shifted_views

    xb = torch.rand(5, 1, 8, 8)
    views = _shifted_views(xb, 4, 1, torch.Generator().manual_seed(0))
    assert views.shape == (20, 1, 8, 8)
    torch.testing.assert_close(views[::4], xb)
    padded = torch.nn.functional.pad(xb, (1, 1, 1, 1))
    for row in range(20):
        image = padded[row // 4]
        shifts = [
            (dy, dx)
            for dy in range(3)
            for dx in range(3)
            if torch.equal(views[row], image[..., dy : dy + 8, dx : dx + 8])
        ]
        assert shifts, row  # every view is the image moved by at most one pixel
    assert not torch.equal(views[1::4], xb)  # and some moved
    assert _shifted_views(xb[:0], 4, 1, torch.Generator()).shape == (0, 1, 8, 8)


@pytest.mark.slow  # Opacus' first import
def test_augmentation_keeps_the_accounting_and_the_per_sample_bound() -> None:
    plain = _train()
    augmented = _train(augment_views=4)
    per_layer = _train(clip_per_layer=True)
    # The same (σ, q, steps) history, hence the same ε, whatever the lever.
    assert plain.history == augmented.history == per_layer.history == [[1.1, 0.25, 4]]  # type: ignore[attr-defined]
    assert any(
        not np.array_equal(plain.state[k], augmented.state[k])  # type: ignore[attr-defined]
        for k in plain.state  # type: ignore[attr-defined]
    )
    # K identical views (no shift) average to the sample's own gradient: same update.
    same = _train(augment_views=4, augment_shift=0)
    for k, v in plain.state.items():  # type: ignore[attr-defined]
        np.testing.assert_allclose(same.state[k], v, atol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.slow  # Opacus' first import
@pytest.mark.parametrize("lever", [{"augment_views": 8}, {"clip_per_layer": True}])
def test_one_samples_step_stays_within_the_clip(lever: dict[str, object]) -> None:
    """One sample, q = 1, no noise, no momentum: the step is lr × its clipped gradient, so
    its norm is at most lr × C, with K views as without (views clipped one by one and
    summed would reach K × C)."""
    from edgefl.datasets import load_dataset
    from edgefl.edge_agent.fl.trainer import build_trainable_model

    data = load_dataset("digits", seed=0)
    start = {
        k: v.detach().numpy().copy()
        for k, v in build_trainable_model("digits-mlp-wide").state_dict().items()
    }
    result = _train(
        x=data.x_train[:1], y=data.y_train[:1], sigma=0.0, momentum=0.0, lr=1.0,
        max_grad_norm=0.01, batches_per_epoch=1, **lever,
    )  # fmt: skip
    step = np.sqrt(sum(((result.state[k] - start[k]) ** 2).sum() for k in start))  # type: ignore[attr-defined]
    assert 0.005 < step <= 0.01 * (1 + 1e-4)


def test_the_levers_are_opt_in_plan_keys_named_in_their_errors() -> None:
    default = load_plan({})
    assert (default.augment_multiplicity, default.augment_shift) == (1, 1)
    assert default.dp.clip_per_layer is False
    # Plans that set none of them keep the key devices hold σ under.
    assert default.plan_key() == "3509e8f141aeaadf"
    plan = load_plan(
        {"augment_multiplicity": 4, "augment_shift": 2, "dp": {"clip_per_layer": True}}
    )
    assert plan.plan_key() != default.plan_key()
    inst = ClientInstructions.from_config(ClientInstructions.from_plan(plan, "r").to_config())
    assert (inst.augment_multiplicity, inst.augment_shift, inst.clip_per_layer) == (4, 2, True)
    # An older server's config lacks the keys: no augmentation, flat clipping.
    old = {
        k: v
        for k, v in ClientInstructions.from_plan(default, "r").to_config().items()
        if k not in {"augment-multiplicity", "augment-shift", "clip-per-layer"}
    }
    inst = ClientInstructions.from_config(old)
    assert (inst.augment_multiplicity, inst.augment_shift, inst.clip_per_layer) == (1, 1, False)
    with pytest.raises(ConfigError, match="augment_multiplicity"):
        load_plan({"augment_multiplicity": 0})
    with pytest.raises(ConfigError, match="augment_multiplicity"):
        load_plan({"augment_multiplicity": 33})
    with pytest.raises(ConfigError, match="augment_multiplicity 4: shifted views need images"):
        load_plan({"dataset": "breast-cancer", "augment_multiplicity": 4})
    with pytest.raises(ConfigError, match="augment_shift applies only"):
        load_plan({"augment_shift": 2})
    with pytest.raises(ConfigError, match="clip_per_layer"):
        load_plan({"dp": {"clip_per_layer": "sometimes"}})
