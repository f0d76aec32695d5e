"""PyTorch → ``.tflite`` conversion with litert-torch (no TensorFlow needed)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
from torch import nn

from edgefl.errors import EdgeflError

__all__ = ["convert_to_tflite"]

logger = logging.getLogger(__name__)


def convert_to_tflite(model: nn.Module, input_shape: tuple[int, ...], out: Path) -> None:
    """Convert ``model`` for a batch of one sample of ``input_shape`` and write ``out``.

    Devices answer one sample at a time, so the artifact's input is ``(1, *input_shape)``.

    Raises:
        EdgeflError: litert-torch could not lower the model.
    """
    import litert_torch

    model = model.eval()
    example = (torch.zeros((1, *input_shape), dtype=torch.float32),)
    # litert-torch prints a progress tree on stdout; keep stdout for our own output.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            exported = litert_torch.convert(model, example)
            exported.export(str(out))
    except Exception as exc:  # litert-torch raises many unrelated types
        raise EdgeflError(f"conversion to .tflite failed: {exc}") from exc
    finally:
        logger.debug("litert-torch output:\n%s", chatter.getvalue())
