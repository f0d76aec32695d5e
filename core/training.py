"""Plain (non-private) torch training and evaluation used by the toolkit and baselines.

Deterministic for a given seed on CPU. The DP trainer (Opacus) lives with the ClientApp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["EvalResult", "evaluate", "predict_logits", "train"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy in [0, 1] and mean cross-entropy loss on a labelled set."""

    accuracy: float
    loss: float


def train(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """Train in place with Adam and cross-entropy; returns the last epoch's mean loss.

    Args:
        model: The model to train (modified in place).
        x: Inputs, float32, batch first.
        y: Integer labels.
        epochs: Passes over the data.
        lr: Adam learning rate.
        batch_size: Mini-batch size.
        seed: Seed of the shuffling.
        on_epoch: Called after each epoch with (epoch index, mean loss), e.g. for progress.
    """
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    mean_loss = float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.item()) * len(idx)
            count += len(idx)
        mean_loss = total / max(count, 1)
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    model.eval()
    return mean_loss


@torch.inference_mode()
def predict_logits(
    model: nn.Module, x: npt.NDArray[np.float32], *, batch_size: int = 256
) -> npt.NDArray[np.float32]:
    """Run the model in eval mode and return float32 logits."""
    model.eval()
    outs = [
        model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32)


def evaluate(model: nn.Module, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> EvalResult:
    """Accuracy and mean cross-entropy of the model on (x, y)."""
    logits = predict_logits(model, x)
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item())
    return EvalResult(accuracy=float((logits.argmax(1) == y).mean()), loss=loss)
