"""Out-of-process runner: run a model on a runtime that lives in another environment.

``tflite-runtime`` 2.14 needs numpy<2 and cannot share an environment with torch, so the
workstation runs it in its own venv through this module::

    python -m edgefl.runtimes.worker REQUEST.json

The request is a JSON object::

    {"runtime": "tflite-runtime", "model": "/path/m.tflite", "input": "/path/x.npy",
     "output": "/path/out.npy", "threads": 1, "bench_iters": 0}

The worker runs :meth:`Runtime.run` over the whole input array, saves the float32
outputs to ``output`` with ``np.save`` and prints one JSON line on stdout, either::

    {"ok": true, "runtime": ..., "version": ..., "inputs": [...], "outputs": [...],
     "latency_us": [...]}

or ``{"ok": false, "error_type": "ArtifactError", "message": ..., "hint": ...}``.
It exits 0 whenever the request file could be read, and non-zero only when it could not.

This module imports only the standard library, numpy, :mod:`edgefl.errors` and the
runtimes package, because the environment it runs in holds nothing else.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.errors import BadInputError, EdgeflError, ExitCode

from ._registry import create_runtime

__all__ = ["handle_request", "main"]

logger = logging.getLogger(__name__)


def _field(request: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = request.get(name, default)
    # bool is an int subclass; a JSON `true` is not a thread count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadInputError(f"request field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def handle_request(request: dict[str, Any]) -> dict[str, Any]:
    """Carry out one parsed request and return the success reply.

    Args:
        request: The request object (see the module docstring).

    Returns:
        The ``{"ok": true, ...}`` reply.

    Raises:
        EdgeflError: Any failure, already translated by the runtime layer.
    """
    key = _field(request, "runtime", str)
    model = Path(_field(request, "model", str))
    input_path = Path(_field(request, "input", str))
    output_path = Path(_field(request, "output", str))
    threads = _field(request, "threads", int, 1)
    bench_iters = _field(request, "bench_iters", int, 0)
    runtime = create_runtime(key, model, threads=threads)
    try:
        x = np.load(input_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read input array {input_path}: {exc}") from exc
    outputs = runtime.run(x)
    latencies = runtime.bench(np.asarray(x, dtype=np.float32), bench_iters)
    np.save(output_path, outputs.astype(np.float32, copy=False))
    return {
        "ok": True,
        "runtime": runtime.key,
        "version": runtime.version(),
        "inputs": [spec.to_dict() for spec in runtime.inputs],
        "outputs": [spec.to_dict() for spec in runtime.outputs],
        "latency_us": latencies,
    }


def _failure(exc: BaseException) -> dict[str, Any]:
    return {
        "ok": False,
        "error_type": type(exc).__name__,
        "message": getattr(exc, "message", None) or str(exc),
        "hint": getattr(exc, "hint", ""),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: read the request named on the command line, reply on stdout.

    Args:
        argv: Command-line arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The process exit code: 0 once the request was read, ``ExitCode.USAGE`` if not.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        reply = _failure(BadInputError("usage: python -m ...runtimes.worker REQUEST.json"))
        print(json.dumps(reply), flush=True)
        return int(ExitCode.USAGE)
    try:
        request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        if not isinstance(request, dict):
            raise ValueError("the request must be a JSON object")
    except (OSError, ValueError) as exc:
        print(json.dumps(_failure(BadInputError(f"unreadable request: {exc}"))), flush=True)
        return int(ExitCode.USAGE)
    try:
        reply = handle_request(request)
    except EdgeflError as exc:
        reply = _failure(exc)
    except Exception as exc:  # a bug: report it to the caller rather than dying silently
        logger.exception("worker failed")
        reply = _failure(exc)
    print(json.dumps(reply), flush=True)
    return int(ExitCode.OK)


if __name__ == "__main__":
    raise SystemExit(main())
