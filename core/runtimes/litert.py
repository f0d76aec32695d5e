"""The ``ai-edge-litert`` runtime: Google's LiteRT interpreter (the TFLite successor).

Importing this module fails when ``ai-edge-litert`` is not installed; the registry takes
that as "unavailable".
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

from ai_edge_litert.interpreter import Interpreter, load_delegate

from ._registry import register_runtime
from .base import InterpreterLike, Runtime

__all__ = ["LiteRtRuntime"]


@register_runtime
class LiteRtRuntime(Runtime):
    """Runs ``.tflite`` models with ``ai_edge_litert.interpreter.Interpreter``."""

    key = "ai-edge-litert"

    @classmethod
    def version(cls) -> str:
        """Return the installed ``ai-edge-litert`` version."""
        return metadata.version("ai-edge-litert")

    def _load_delegate(self, library: str) -> object:
        return load_delegate(library)

    def _new_interpreter(
        self, model_path: str, threads: int, delegates: Sequence[object]
    ) -> InterpreterLike:
        interpreter: InterpreterLike = Interpreter(
            model_path=model_path, num_threads=threads, experimental_delegates=list(delegates)
        )
        return interpreter
