"""Client side of :mod:`edgefl.runtimes.worker`: run a model in another venv.

Used on a workstation to verify artifacts on ``tflite-runtime``, whose numpy<2 pin keeps
it out of the main environment. Arrays travel as ``.npy`` files in a temporary directory;
the worker's reply is one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefl import errors
from edgefl.errors import EdgeflError, RuntimeUnavailableError
from edgefl.resources import source_checkout

from .base import TensorSpec

__all__ = ["TFLITE_PYTHON_ENV", "RemoteResult", "RemoteRuntime", "find_tflite_python"]

#: Environment variable naming the Python interpreter of the tflite-runtime environment.
TFLITE_PYTHON_ENV = "EDGEFL_TFLITE_PYTHON"

_WORKER_MODULE = "edgefl.runtimes.worker"
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class RemoteResult:
    """What a worker run returned.

    Attributes:
        outputs: float32 outputs, shape ``(N, *output_shape[1:])``.
        runtime: The runtime key that ran the model.
        version: That runtime package's version.
        input_specs: The model's input tensors as that runtime saw them.
        output_specs: The model's output tensors as that runtime saw them.
        latency_us: Per-sample single-run latencies, empty unless ``bench_iters > 0``.
    """

    outputs: npt.NDArray[np.float32]
    runtime: str
    version: str
    input_specs: list[TensorSpec] = field(default_factory=list)
    output_specs: list[TensorSpec] = field(default_factory=list)
    latency_us: list[float] = field(default_factory=list)


def find_tflite_python() -> Path | None:
    """Locate the Python of the tflite-runtime environment.

    Returns:
        ``$EDGEFL_TFLITE_PYTHON`` if set; else ``<repo root>/.venv-tflite``'s Python if
        it exists (only in a source checkout); else ``None``.
    """
    configured = os.environ.get(TFLITE_PYTHON_ENV)
    if configured:
        return Path(configured)
    root = source_checkout()
    if root is None:
        return None
    for candidate in (
        root / ".venv-tflite" / "bin" / "python",
        root / ".venv-tflite" / "Scripts" / "python.exe",
    ):
        if candidate.is_file():
            return candidate
    return None


def _error_class(name: str) -> type[EdgeflError]:
    cls = getattr(errors, name, None) if name in errors.__all__ else None
    if isinstance(cls, type) and issubclass(cls, EdgeflError):
        return cls
    return EdgeflError


def _reply_line(stdout: str) -> dict[str, Any] | None:
    # Native libraries may print on stdout too; the reply is the last JSON object line.
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict):
                return reply
    return None


def _isolated_env() -> dict[str, str]:
    """This process's environment without the variables that would mix the two venvs.

    The other environment must import only its own packages (tflite-runtime needs
    numpy<2): a ``PYTHONPATH`` inherited from here (Flower's Ray backend sets it to this
    interpreter's ``sys.path``) makes it load this venv's numpy 2 and fail every model.
    """
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


class RemoteRuntime:
    """Runs models on a runtime in another Python environment via the worker module.

    That environment needs edgefl installed (``pip install --no-deps -e .``) and the
    runtime package.

    Args:
        python: The other environment's Python executable.
        key: The runtime key to use there, e.g. ``"tflite-runtime"``.
        timeout: Seconds to wait for one worker run.
    """

    def __init__(self, python: Path, key: str, *, timeout: float = 300.0) -> None:
        self.python = Path(python)
        self.key = key
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"RemoteRuntime(python={str(self.python)!r}, key={self.key!r})"

    def run(
        self,
        model_path: Path,
        x: npt.ArrayLike,
        *,
        threads: int = 1,
        bench_iters: int = 0,
    ) -> RemoteResult:
        """Run ``model_path`` over the float batch ``x`` in the other environment.

        Args:
            model_path: The ``.tflite`` file.
            x: Float input of shape ``(N, *input_shape[1:])``.
            threads: CPU threads for the interpreter.
            bench_iters: How many single-sample runs to time (after warm-up).

        Returns:
            The outputs, tensor specs and latencies.

        Raises:
            ArtifactError: The worker could not load the model.
            RuntimeUnavailableError: The environment or its runtime is unusable.
            EdgeflError: Any other worker failure, a crash or a timeout.
        """
        with tempfile.TemporaryDirectory(prefix="edgefl-remote-") as tmp:
            workdir = Path(tmp)
            np.save(workdir / "x.npy", np.asarray(x, dtype=np.float32))
            request = {
                "runtime": self.key,
                "model": str(Path(model_path).resolve()),
                "input": str(workdir / "x.npy"),
                "output": str(workdir / "out.npy"),
                "threads": threads,
                "bench_iters": bench_iters,
            }
            request_path = workdir / "request.json"
            request_path.write_text(json.dumps(request), encoding="utf-8")
            reply = self._call(request_path)
            outputs = np.load(workdir / "out.npy", allow_pickle=False)
        return RemoteResult(
            outputs=outputs.astype(np.float32, copy=False),
            runtime=str(reply["runtime"]),
            version=str(reply["version"]),
            input_specs=[TensorSpec.from_dict(d) for d in reply["inputs"]],
            output_specs=[TensorSpec.from_dict(d) for d in reply["outputs"]],
            latency_us=[float(v) for v in reply["latency_us"]],
        )

    def _call(self, request_path: Path) -> dict[str, Any]:
        command = [str(self.python), "-m", _WORKER_MODULE, str(request_path)]
        try:
            proc = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
                env=_isolated_env(),
            )
        except FileNotFoundError as exc:
            raise RuntimeUnavailableError(
                f"no Python at {self.python} for runtime {self.key!r}",
                hint=f"create that environment or set ${TFLITE_PYTHON_ENV}",
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EdgeflError(
                f"runtime worker ({self.key}) did not finish within {self.timeout:g} s"
            ) from exc
        reply = _reply_line(proc.stdout)
        stderr_tail = proc.stderr[-_STDERR_TAIL:].strip()
        if reply is None:
            if "No module named" in proc.stderr:
                raise RuntimeUnavailableError(
                    f"{self.python} cannot run the edgefl worker: {stderr_tail}",
                    hint="pip install --no-deps -e . in that environment",
                )
            raise EdgeflError(
                f"runtime worker ({self.key}) exited with {proc.returncode} "
                f"without a reply: {stderr_tail}"
            )
        if not reply.get("ok"):
            cls = _error_class(str(reply.get("error_type", "")))
            message = str(reply.get("message", "unknown worker error"))
            if cls is EdgeflError:
                message = f"{reply.get('error_type')}: {message}"
            raise cls(message, hint=str(reply.get("hint", "")))
        return reply
