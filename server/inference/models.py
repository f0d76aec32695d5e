"""The models the cloud serves: heavy, full-precision torch nets, trained once and cached.

A served model is a :class:`ServedModel`: a name, a version (a prefix of
:func:`edgefl.zoo.state_dict_sha256`), the input it accepts and a ``forward`` that the
micro-batcher calls from its worker thread. ``forward`` gets a ``should_stop`` callback and
runs an ``nn.Sequential`` layer by layer, checking it between layers, so a batch whose
callers all gave up (their deadline passed) stops computing instead of finishing for
nobody.

Heavy models are registered by name in :data:`HEAVY_MODELS`. ``digits`` is a wider and
deeper CNN than the device's ``digits-cnn`` (2.5 M multiply-adds per sample, 12x), trained
on the same training split with one-pixel shift augmentation and kept in float32; it is
evaluated on the same held-out split the device artifacts are verified on, so the two
accuracies compare directly. Its weights are cached in a folder (``<name>.pt`` +
``<name>.json``); a missing cache is trained once (under a minute on 2 idle cores,
several on a busy machine) with progress.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from edgefl.errors import ArtifactError, BadInputError, ConfigError, UnknownModelError
from edgefl.files import write_text_atomic

__all__ = [
    "HEAVY_MODELS",
    "VERSION_LENGTH",
    "ComputeCancelledError",
    "HeavyModelRecipe",
    "ServedModel",
    "TorchServedModel",
    "get_recipe",
    "load_or_train",
]

logger = logging.getLogger(__name__)

VERSION_LENGTH: Final = 12
"""Hex digits of the state-dict sha256 used as the served version."""

FloatArray = npt.NDArray[np.float32]
Progress = Callable[[str, int, int], None]  # (what, done, total)


class ComputeCancelledError(Exception):
    """Raised inside ``forward`` when ``should_stop()`` turned true: nobody wants the result."""


class ServedModel:
    """What the inference service needs from a model.

    Attributes:
        name: Name clients ask for (``PredictRequest.model``).
        version: Version string clients may pin (``PredictRequest.version``).
        input_shape: Shape of one sample, without the batch dimension.
        input_dtype: numpy dtype name of the input (only this one is accepted).
        output_shape: Shape of one output row, without the batch dimension.
        heldout_accuracy: Accuracy on the held-out split, or NaN when unknown.
    """

    def __init__(
        self,
        *,
        name: str,
        version: str,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        input_dtype: str = "float32",
        heldout_accuracy: float = float("nan"),
    ) -> None:
        self.name = name
        self.version = version
        self.input_shape = input_shape
        self.output_shape = output_shape
        self.input_dtype = input_dtype
        self.heldout_accuracy = heldout_accuracy

    def forward(self, batch: FloatArray, should_stop: Callable[[], bool]) -> FloatArray:
        """Compute outputs ``[N, *output_shape]`` for inputs ``[N, *input_shape]``.

        Called from one worker thread at a time. Implementations check ``should_stop``
        between chunks of work and raise :class:`ComputeCancelledError` when it is true.
        """
        raise NotImplementedError


class TorchServedModel(ServedModel):
    """An ``nn.Sequential`` served in eval mode, float32, layer by layer."""

    def __init__(
        self,
        name: str,
        module: nn.Sequential,
        *,
        input_shape: tuple[int, ...],
        heldout_accuracy: float = float("nan"),
    ) -> None:
        """Wrap ``module``; the version is a prefix of its state-dict sha256.

        Args:
            name: Name clients ask for.
            module: The trained network (put in eval mode here).
            input_shape: Shape of one sample, without the batch dimension.
            heldout_accuracy: Accuracy on the held-out split, if known.
        """
        from edgefl.zoo import state_dict_sha256

        module.eval()
        with torch.inference_mode():
            out = module(torch.zeros((1, *input_shape), dtype=torch.float32))
        super().__init__(
            name=name,
            version=state_dict_sha256(module)[:VERSION_LENGTH],
            input_shape=input_shape,
            output_shape=tuple(int(d) for d in out.shape[1:]),
            heldout_accuracy=heldout_accuracy,
        )
        self.module = module

    def forward(self, batch: FloatArray, should_stop: Callable[[], bool]) -> FloatArray:
        """Run the layers in order, checking ``should_stop`` before each one."""
        with torch.inference_mode():
            t = torch.from_numpy(batch)
            for layer in self.module:
                if should_stop():
                    raise ComputeCancelledError
                t = layer(t)
            return t.numpy().astype(np.float32, copy=False)


@dataclass(frozen=True)
class HeavyModelRecipe:
    """How to build, train and evaluate one heavy model.

    Attributes:
        name: Served name.
        dataset: Bundled dataset (:func:`edgefl.datasets.load_dataset`), default split.
        factory: Builds the untrained network.
        epochs: Training epochs over the augmented training split.
        lr: Starting Adam learning rate (decays linearly to a tenth).
        batch_size: Mini-batch size.
        augment_shifts: Add copies of the training set shifted by one pixel (8 ways).
        device_counterpart: The zoo model the device runs for the same task.
        description: One line for ``--help`` and the docs.
    """

    name: str
    dataset: str
    factory: Callable[[], nn.Sequential]
    epochs: int
    lr: float
    batch_size: int
    augment_shifts: bool
    device_counterpart: str
    description: str


def _digits_heavy() -> nn.Sequential:
    # Three 3x3 conv blocks (32/64/128 channels) instead of the device net's two (16/32):
    # 2.5 M multiply-adds per sample against its 0.22 M: affordable in the cloud.
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 2 * 2, 256),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(256, 10),
    )


HEAVY_MODELS: Final[dict[str, HeavyModelRecipe]] = {
    r.name: r
    for r in (
        HeavyModelRecipe(
            name="digits",
            dataset="digits",
            factory=_digits_heavy,
            epochs=8,
            lr=1e-3,
            batch_size=64,
            augment_shifts=True,
            device_counterpart="digits-cnn",
            description="3-block float32 CNN for 8x8 digits (cloud counterpart of digits-cnn)",
        ),
    )
}
"""Heavy models by served name."""


def get_recipe(name: str) -> HeavyModelRecipe:
    """Look a heavy model up by served name.

    Raises:
        UnknownModelError: No such heavy model; the message lists the known ones.
    """
    try:
        return HEAVY_MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"no heavy model named {name!r}",
            hint=f"choose one of: {', '.join(sorted(HEAVY_MODELS))}",
        ) from None


def _shift_augment(
    x: FloatArray, y: npt.NDArray[np.int64]
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """The images plus 8 copies moved by one pixel (zero fill): 9x the data."""
    h, w = x.shape[-2:]
    xs, ys = [x], [y]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            moved = np.zeros_like(x)
            moved[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
                ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
            xs.append(moved)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _paths(weights_dir: Path, name: str) -> tuple[Path, Path]:
    return weights_dir / f"{name}.pt", weights_dir / f"{name}.json"


def _save_state_dict(path: Path, module: nn.Module) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(module.state_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_train(
    name: str,
    weights_dir: Path,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> TorchServedModel:
    """Load a heavy model's cached weights, training and caching them first if missing.

    Args:
        name: Served name, a key of :data:`HEAVY_MODELS`.
        weights_dir: Cache folder (created if missing); holds ``<name>.pt`` and
            ``<name>.json`` (training settings and held-out accuracy, for people).
        epochs: Override the recipe's epochs when training (tests train 1 epoch).
        seed: Seed of the initial weights and the shuffling.
        progress: Called as ``progress(what, done, total)`` before and after each training
            epoch; an exception it raises stops the training (nothing is cached).

    Returns:
        The model, evaluated on the dataset's held-out split.

    Raises:
        UnknownModelError: ``name`` is not a heavy model.
        ArtifactError: The cached weights exist but do not load into the architecture.
        ConfigError: The weights folder cannot be created or written.
    """
    from edgefl.datasets import load_dataset
    from edgefl.training import evaluate, train

    recipe = get_recipe(name)
    data = load_dataset(recipe.dataset)
    weights_dir = Path(weights_dir)
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the weights folder {weights_dir}: {exc.strerror}",
            hint="pass --weights with a writable folder",
        ) from exc
    pt_path, meta_path = _paths(weights_dir, name)
    module = recipe.factory()
    if pt_path.exists():
        try:
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as exc:  # torch raises many types for a bad file
            raise ArtifactError(
                f"cannot load cached weights {pt_path}: {str(exc).splitlines()[0]}",
                hint="delete the file to retrain it, or point --weights at another folder",
            ) from exc
        logger.info("loaded %s weights from %s", name, pt_path)
    else:
        total = epochs if epochs is not None else recipe.epochs
        if total < 1:
            raise BadInputError(f"epochs must be at least 1, got {total}")
        x, y = data.x_train, data.y_train
        if recipe.augment_shifts:
            x, y = _shift_augment(x, y)
        torch.manual_seed(seed)
        module = recipe.factory()
        logger.info("training %s (%d epochs, %d samples) into %s", name, total, len(x), pt_path)
        # One intra-op thread: these convolutions are too small to gain from more, and on
        # a busy machine OpenMP's spinning threads made an epoch 8x slower (measured).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if progress is not None:
                progress(f"training {name}: {len(x)} samples, {total} epochs", 0, total)
            for epoch in range(total):
                # Linear decay to a tenth of lr: the last epochs settle instead of bouncing.
                lr = recipe.lr * (1.0 - 0.9 * epoch / max(total - 1, 1))
                loss = train(
                    module, x, y, epochs=1, lr=lr, batch_size=recipe.batch_size, seed=seed + epoch
                )
                if progress is not None:
                    progress(
                        f"training {name}: epoch {epoch + 1}/{total}, loss {loss:.4f}",
                        epoch + 1,
                        total,
                    )
        finally:
            torch.set_num_threads(threads)
        try:
            _save_state_dict(pt_path, module)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the trained weights to {pt_path}: {exc.strerror}",
                hint="pass --weights with a writable folder",
            ) from exc
    accuracy = evaluate(module, data.x_test, data.y_test).accuracy
    served = TorchServedModel(name, module, input_shape=data.input_shape, heldout_accuracy=accuracy)
    write_text_atomic(
        meta_path,
        json.dumps(
            {
                "model": name,
                "version": served.version,
                "dataset": recipe.dataset,
                "heldout_accuracy": accuracy,
                "heldout_samples": len(data.y_test),
                "device_counterpart": recipe.device_counterpart,
                "description": recipe.description,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n",
    )
    return served
