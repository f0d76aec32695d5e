"""The ``tflite-runtime`` runtime: the legacy TFLite interpreter package (last: 2.14).

``tflite-runtime`` 2.14 needs numpy<2, so on a workstation it lives in its own
environment and is reached through :class:`edgefl.runtimes.RemoteRuntime`.
Importing this module fails where it is not installed; the registry takes that as
"unavailable".
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

from tflite_runtime.interpreter import Interpreter, load_delegate

from ._registry import register_runtime
from .base import InterpreterLike, Runtime

__all__ = ["TfliteRuntime"]


@register_runtime
class TfliteRuntime(Runtime):
    """Runs ``.tflite`` models with ``tflite_runtime.interpreter.Interpreter``.

    Delegates given by library name are loaded with ``tflite_runtime``'s
    ``load_delegate``.
    """

    key = "tflite-runtime"

    @classmethod
    def version(cls) -> str:
        """Return the installed ``tflite-runtime`` version."""
        return metadata.version("tflite-runtime")

    def _load_delegate(self, library: str) -> object:
        return load_delegate(library)

    def _new_interpreter(
        self, model_path: str, threads: int, delegates: Sequence[object]
    ) -> InterpreterLike:
        interpreter: InterpreterLike = Interpreter(
            model_path=model_path, num_threads=threads, experimental_delegates=list(delegates)
        )
        return interpreter
