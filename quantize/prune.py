"""Structured channel pruning for the zoo's ``nn.Sequential`` models.

Unstructured (masked) pruning leaves tensors their full size, so neither the ``.tflite``
nor its latency shrink. Here every hidden Conv2d/Linear keeps only its output channels
with the largest L1 norms, the next weight layer keeps the matching input channels, and
a genuinely smaller network is rebuilt with the surviving weights copied in. It then
needs a short fine-tune (done by the caller) to recover accuracy.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from edgefl.errors import BadInputError

__all__ = ["count_parameters", "prune_channels"]

_PRUNABLE = (nn.Conv2d, nn.Linear)
_PASSTHROUGH = (nn.ReLU, nn.Tanh, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _l1_keep(weight: torch.Tensor, keep: int) -> torch.Tensor:
    norms = weight.abs().reshape(weight.shape[0], -1).sum(dim=1)
    return torch.sort(torch.topk(norms, keep).indices).values


def prune_channels(model: nn.Sequential, ratio: float) -> nn.Sequential:
    """Return a narrower copy of ``model`` with ``ratio`` of each hidden layer's channels removed.

    The output layer keeps all its units. Grouped convolutions are not supported.

    Args:
        model: A trained sequential model of Conv2d/Linear/ReLU/MaxPool2d/Flatten layers.
        ratio: Share of channels to remove from every hidden layer, in (0, 1).

    Raises:
        BadInputError: ``ratio`` outside (0, 1) or a layer type this pruner cannot rebuild.
    """
    if not 0.0 < ratio < 1.0:
        raise BadInputError(f"pruning ratio must be in (0, 1), got {ratio}")
    layers = list(model)
    for layer in layers:
        if not isinstance(layer, _PRUNABLE + _PASSTHROUGH):
            raise BadInputError(f"cannot prune through layer {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise BadInputError("grouped convolutions are not supported by the pruner")
    weight_positions = [i for i, layer in enumerate(layers) if isinstance(layer, _PRUNABLE)]
    rebuilt: list[nn.Module] = [copy.deepcopy(layer) for layer in layers]
    kept: torch.Tensor | None = None  # surviving output channels of the previous weight layer
    prev_channels = 0
    with torch.no_grad():
        for order, pos in enumerate(weight_positions):
            layer = layers[pos]
            assert isinstance(layer, _PRUNABLE)
            weight: torch.Tensor = layer.weight.detach()
            bias: torch.Tensor | None = layer.bias.detach() if layer.bias is not None else None
            if kept is not None:
                if isinstance(layer, nn.Linear) and layer.in_features != prev_channels:
                    # Conv -> Flatten -> Linear: each channel owns a block of spatial positions.
                    spatial = layer.in_features // prev_channels
                    cols = (kept[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
                    weight = weight[:, cols]
                else:
                    weight = weight[:, kept]
            out_channels = weight.shape[0]
            if order == len(weight_positions) - 1:
                keep_idx = torch.arange(out_channels)
            else:
                keep_idx = _l1_keep(weight, max(1, round(out_channels * (1.0 - ratio))))
            weight = weight[keep_idx]
            bias = bias[keep_idx] if bias is not None else None
            new: nn.Conv2d | nn.Linear
            if isinstance(layer, nn.Conv2d):
                new = nn.Conv2d(
                    weight.shape[1],
                    weight.shape[0],
                    cast(tuple[int, int], layer.kernel_size),
                    stride=cast(tuple[int, int], layer.stride),
                    padding=cast(tuple[int, int], layer.padding),
                    dilation=cast(tuple[int, int], layer.dilation),
                    bias=bias is not None,
                    padding_mode=layer.padding_mode,
                )
            else:
                new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            new.weight.copy_(weight)
            if bias is not None and new.bias is not None:
                new.bias.copy_(bias)
            rebuilt[pos] = new
            kept = keep_idx
            prev_channels = out_channels
    return nn.Sequential(*rebuilt).eval()
