"""Tests for the model zoo (edgefl.zoo) and structured pruning (edgefl.quantize.prune)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from edgefl.errors import BadInputError, UnknownModelError
from edgefl.quantize.prune import count_parameters, prune_channels
from edgefl.zoo import MODELS, build_model, get_spec, state_dict_sha256

NAMES = sorted(MODELS)


def weight_layers(model: nn.Sequential) -> list[nn.Conv2d | nn.Linear]:
    return [m for m in model if isinstance(m, nn.Conv2d | nn.Linear)]


def random_batch(name: str, batch: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *MODELS[name].input_shape), generator=gen)


def zero_half_of_hidden_channels(model: nn.Sequential, seed: int = 0) -> None:
    """Zero the weights and bias of a random half of every hidden layer's output channels.

    After ReLU those channels are exactly 0 (and max-pooling zeros gives zeros), so they
    carry nothing to the next layer: removing them must not change the output at all.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in weight_layers(model)[:-1]:
            out = layer.weight.shape[0]
            dead = torch.randperm(out, generator=gen)[: out // 2]
            layer.weight[dead] = 0.0
            if layer.bias is not None:
                layer.bias[dead] = 0.0


# ---------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name", NAMES)
def test_every_model_builds_and_runs(name: str) -> None:
    spec = get_spec(name)
    assert spec.name == name
    model = build_model(name, seed=0).eval()
    assert isinstance(model, nn.Sequential)
    with torch.no_grad():
        out = model(random_batch(name, batch=5))
    assert out.shape == (5, spec.num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_models_have_no_normalisation_layers(name: str) -> None:
    # The zoo promises Opacus-ready, prunable stacks.
    allowed = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Tanh, nn.MaxPool2d, nn.Flatten)
    assert all(isinstance(m, allowed) for m in build_model(name))


@pytest.mark.parametrize("name", NAMES)
def test_seeded_build_is_reproducible(name: str) -> None:
    a = build_model(name, seed=3)
    b = build_model(name, seed=3)
    c = build_model(name, seed=4)
    assert state_dict_sha256(a) == state_dict_sha256(b)
    assert state_dict_sha256(a) != state_dict_sha256(c)
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(ta, tb)


def test_seeded_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model("digits-cnn", seed=9)
    assert torch.equal(torch.rand(4), expected)


def test_unknown_model_lists_the_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        build_model("resnet-9000")
    assert isinstance(info.value, BadInputError)
    message = str(info.value)
    assert "resnet-9000" in message
    for name in NAMES:
        assert name in message


def test_sha256_stable_for_equal_weights() -> None:
    model = build_model("cancer-mlp", seed=1)
    digest = state_dict_sha256(model)
    assert len(digest) == 64
    assert state_dict_sha256(model) == digest
    assert state_dict_sha256(copy.deepcopy(model)) == digest
    with torch.no_grad():
        model(torch.zeros(2, 30))  # a forward pass changes nothing
    assert state_dict_sha256(model) == digest


@pytest.mark.parametrize("name", NAMES)
def test_sha256_changes_when_one_weight_changes(name: str) -> None:
    model = build_model(name, seed=1)
    digest = state_dict_sha256(model)
    for layer in (weight_layers(model)[0], weight_layers(model)[-1]):
        with torch.no_grad():
            saved = layer.weight.view(-1)[0].item()
            layer.weight.view(-1)[0] = saved + 1e-3
        assert state_dict_sha256(model) != digest
        with torch.no_grad():
            layer.weight.view(-1)[0] = saved
        assert state_dict_sha256(model) == digest
    first = weight_layers(model)[0]
    assert first.bias is not None
    with torch.no_grad():
        first.bias[-1] += 0.5
    assert state_dict_sha256(model) != digest


# -------------------------------------------------------------------------- prune


@pytest.mark.parametrize("name", NAMES)
def test_prune_half_shrinks_and_keeps_output_shape(name: str) -> None:
    model = build_model(name, seed=0).eval()
    before = state_dict_sha256(model)
    pruned = prune_channels(model, 0.5)
    assert count_parameters(pruned) < count_parameters(model)
    assert state_dict_sha256(model) == before  # the input model is not modified
    spec = MODELS[name]
    x = random_batch(name)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (len(x), spec.num_classes)
    old, new = weight_layers(model), weight_layers(pruned)
    assert len(old) == len(new)
    for o, n in zip(old[:-1], new[:-1], strict=True):
        assert n.weight.shape[0] == o.weight.shape[0] // 2
    assert new[-1].weight.shape[0] == old[-1].weight.shape[0]


@pytest.mark.parametrize("name", NAMES)
def test_prune_is_exact_when_removed_channels_are_dead(name: str) -> None:
    # The L1 rule must pick exactly the live channels, and every next layer (including
    # the Linear after Flatten, whose inputs are channel-major blocks) must keep the
    # matching inputs. Then the narrow network computes the same function.
    model = build_model(name, seed=0).eval()
    zero_half_of_hidden_channels(model, seed=1)
    pruned = prune_channels(model, 0.5)
    assert count_parameters(pruned) < count_parameters(model)
    x = torch.randn((64, *MODELS[name].input_shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


def test_prune_exactness_detects_wrong_channels() -> None:
    # Guard for the test above: removing live channels must change the output.
    model = build_model("digits-cnn", seed=0).eval()
    pruned = prune_channels(model, 0.5)
    x = random_batch("digits-cnn")
    with torch.no_grad():
        assert not torch.allclose(pruned(x), model(x), atol=1e-5)


def test_prune_exact_with_stride_and_no_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
    ).eval()
    zero_half_of_hidden_channels(model, seed=5)
    pruned = prune_channels(model, 0.5)
    x = torch.randn(16, 2, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.Conv2d(1, 8, 3, dilation=2), id="dilation"),
        pytest.param(
            lambda: nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"), id="padding_mode"
        ),
    ],
)
def test_dilation_and_padding_mode_are_kept(conv: Callable[[], nn.Conv2d]) -> None:
    # The pruner rebuilds each Conv2d with its dilation and padding mode, so these are
    # supported: a refusal (or a rebuild that drops them) is a failure, not a pass.
    torch.manual_seed(0)
    first = conv()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        features = first(x)[0].numel()
    model = nn.Sequential(first, nn.ReLU(), nn.Flatten(), nn.Linear(features, 3)).eval()
    zero_half_of_hidden_channels(model, seed=0)
    pruned = prune_channels(model, 0.5)
    rebuilt = pruned[0]
    assert isinstance(rebuilt, nn.Conv2d)
    assert rebuilt.out_channels == first.out_channels // 2
    assert rebuilt.dilation == first.dilation
    assert rebuilt.padding_mode == first.padding_mode
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_prune_ratio_outside_unit_interval(ratio: float) -> None:
    with pytest.raises(BadInputError, match="ratio"):
        prune_channels(build_model("cancer-mlp", seed=0), ratio)


def test_prune_refuses_unsupported_layers() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 2),
    )
    with pytest.raises(BadInputError, match="BatchNorm2d"):
        prune_channels(model, 0.5)


def test_prune_refuses_grouped_convolutions() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten())
    with pytest.raises(BadInputError, match="grouped"):
        prune_channels(model, 0.5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trainable_models_are_what_opacus_accepts_without_asking_it(name: str) -> None:
    from opacus.validators import ModuleValidator

    from edgefl.zoo import build_trainable_model

    model = build_trainable_model(name)
    assert ModuleValidator.is_valid(model)
    assert state_dict_sha256(model) == state_dict_sha256(build_model(name, seed=0))


def test_a_model_opacus_would_change_still_goes_through_its_validator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opacus.validators import ModuleValidator

    from edgefl import zoo

    spec = zoo.get_spec("digits-mlp")
    with_bn = lambda: nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))  # noqa: E731
    monkeypatch.setitem(
        zoo.MODELS, "digits-mlp", type(spec)(**{**spec.__dict__, "factory": with_bn})
    )
    model = zoo.build_trainable_model("digits-mlp")
    assert ModuleValidator.is_valid(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
