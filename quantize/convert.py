"""PyTorch → ``.tflite`` conversion with litert-torch (no TensorFlow needed), and → ``.onnx``.

The ONNX export uses ``torch.onnx.export`` with the ``torch.export``-based exporter (the
default since torch 2.9; it needs the ``onnx`` and ``onnxscript`` packages) at opset
:data:`ONNX_OPSET`, with a dynamic batch axis, weights inside the one file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from edgefl.errors import EdgeflError

__all__ = ["ONNX_INPUT", "ONNX_OPSET", "ONNX_OUTPUT", "convert_to_onnx", "convert_to_tflite"]

ONNX_OPSET = 18
"""The default ``ai.onnx`` opset of the ONNX export: ONNX Runtime 1.14+ and JetPack 5's
TensorRT 8.5 parser read it."""
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"

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


def convert_to_onnx(
    model: nn.Module, input_shape: tuple[int, ...], out: Path, *, opset: int = ONNX_OPSET
) -> None:
    """Export ``model`` to ONNX at ``opset`` and write ``out`` (one self-contained file).

    The input is ``input`` of shape ``(batch, *input_shape)`` with a dynamic ``batch``
    axis, the output ``logits``; the runtimes run it one sample at a time.

    Raises:
        EdgeflError: The exporter is not installed, or could not export the model.
    """
    try:
        import onnxscript  # noqa: F401  # the exporter imports it; say so before torch does
    except ImportError as exc:
        raise EdgeflError(
            f"the ONNX export needs onnx and onnxscript: {exc}",
            hint="pip install 'edgefl[quantize]'",
        ) from exc
    model = model.eval()
    example = (torch.zeros((2, *input_shape), dtype=torch.float32),)
    chatter = io.StringIO()
    # The exporter logs missing optional packages (torchvision) as warnings: not ours.
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        # The exporter prints its progress on stdout; keep stdout for our own output.
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                model,
                example,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
            if program is None:
                raise EdgeflError("torch.onnx.export returned no program")
            program.save(str(out), external_data=False)
    except EdgeflError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types
        raise EdgeflError(f"export to .onnx failed: {exc}") from exc
    finally:
        torch_onnx_log.setLevel(level)
        logger.debug("torch.onnx output:\n%s", chatter.getvalue())
