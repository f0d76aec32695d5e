"""Runtime registry: backends by key, discovered by importing one module per backend.

Each backend module imports its interpreter package at module top and registers its
class with :func:`register_runtime`. A module that fails to import (package missing,
shared library missing, numpy ABI mismatch) makes that runtime unavailable; it is logged
and skipped, never fatal, so a device with only one runtime still works.
:func:`create_runtime` imports only the backend it is asked for (and
:func:`default_runtime_key` only up to the first usable one), so an agent running a
``.tflite`` never loads onnxruntime; :func:`available_runtimes` imports them all.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from edgefl.errors import BadInputError, RuntimeUnavailableError

from .base import Runtime

__all__ = [
    "available_runtimes",
    "create_runtime",
    "default_runtime_key",
    "register_runtime",
    "runtime_keys",
]

logger = logging.getLogger(__name__)

# Preference order: the first available one is the default.
_BACKEND_MODULES: dict[str, str] = {
    "ai-edge-litert": "edgefl.runtimes.litert",
    "tflite-runtime": "edgefl.runtimes.tflite",
    "edgetpu": "edgefl.runtimes.edgetpu",
    # ONNX models (a release's onnx variant, device class jetson); never the default for
    # a .tflite, which every backend above runs.
    "onnxruntime": "edgefl.runtimes.onnx",
}

_INSTALL_HINTS: dict[str, str] = {
    "ai-edge-litert": "pip install 'edgefl[device]'",
    "tflite-runtime": (
        "pip install 'edgefl[tflite]' in a separate numpy<2 environment (Python < 3.12) "
        "and reach it with RemoteRuntime"
    ),
    "edgetpu": "install libedgetpu from https://coral.ai/software/ and attach the device",
    "onnxruntime": "pip install 'edgefl[jetson]'",
}

_DEFAULT_HINT = "pip install 'edgefl[device]'"

_REGISTRY: dict[str, type[Runtime]] = {}

# (key, reason) pairs already logged at INFO; repeats go to DEBUG so that polling
# available_runtimes() does not flood the log.
_REPORTED: set[tuple[str, str]] = set()

_R = TypeVar("_R", bound=type[Runtime])


def register_runtime(cls: _R) -> _R:
    """Class decorator that registers a :class:`Runtime` subclass under its ``key``.

    Raises:
        ValueError: If the class has no ``key`` or the key is already registered.
    """
    key = getattr(cls, "key", None)
    if not isinstance(key, str) or not key:
        raise ValueError(f"{cls.__qualname__} must set a non-empty string `key`")
    existing = _REGISTRY.get(key)
    if existing is not None:
        raise ValueError(
            f"runtime key {key!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[key] = cls
    return cls


def _report(key: str, reason: str) -> None:
    level = logging.DEBUG if (key, reason) in _REPORTED else logging.INFO
    _REPORTED.add((key, reason))
    logger.log(level, "runtime %s unavailable: %s", key, reason)


def _load(key: str) -> tuple[type[Runtime] | None, str]:
    """Import one backend's module (only that one); its class, or None and why not."""
    module = _BACKEND_MODULES.get(key)
    if module is None:
        cls = _REGISTRY.get(key)
        return cls, "" if cls is not None else "not registered"
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        _report(key, reason)
        return None, reason
    cls = _REGISTRY.get(key)
    if cls is None:
        reason = f"module {module} imported but did not register {key!r}"
        _report(key, reason)
        return None, reason
    return cls, ""


def _discover() -> tuple[dict[str, type[Runtime]], dict[str, str]]:
    """Import every backend module; return (classes by key, failure reasons by key).

    Both dicts follow preference order, then keys registered from elsewhere.
    """
    found: dict[str, type[Runtime]] = {}
    failed: dict[str, str] = {}
    for key in runtime_keys():
        cls, reason = _load(key)
        if cls is None:
            failed[key] = reason
        else:
            found[key] = cls
    return found, failed


def runtime_keys() -> list[str]:
    """Return every known runtime key, available or not, in preference order."""
    extra = [key for key in _REGISTRY if key not in _BACKEND_MODULES]
    return [*_BACKEND_MODULES, *extra]


def available_runtimes() -> list[str]:
    """Return the keys of runtimes that can run models here, in preference order."""
    found, _ = _discover()
    available = []
    for key, cls in found.items():
        reason = cls.unavailable_reason()
        if reason is None:
            available.append(key)
        else:
            _report(key, reason)
    return available


def default_runtime_key() -> str:
    """Return the most preferred available runtime key.

    Raises:
        RuntimeUnavailableError: If no runtime is available.
    """
    # One backend at a time, stopping at the first usable one: a device never imports
    # (and maps the memory of) an interpreter package it does not run.
    for key in runtime_keys():
        cls, _ = _load(key)
        if cls is None:
            continue
        reason = cls.unavailable_reason()
        if reason is None:
            return key
        _report(key, reason)
    raise RuntimeUnavailableError("no device runtime is available", hint=_DEFAULT_HINT)


def create_runtime(
    key: str | None,
    model_path: Path | str,
    *,
    threads: int = 1,
    delegates: Sequence[str] = (),
) -> Runtime:
    """Load a model on a runtime.

    Args:
        key: A runtime key from :func:`runtime_keys`, or ``None`` for the default.
        model_path: The model file (``.tflite``; ``.onnx`` for ``onnxruntime``).
        threads: CPU threads for the interpreter.
        delegates: Extra delegate libraries to load.

    Returns:
        The loaded runtime.

    Raises:
        BadInputError: The key is unknown.
        RuntimeUnavailableError: The runtime cannot be loaded here.
        ArtifactError: The model file is missing or unusable.
    """
    if key is None:
        key = default_runtime_key()
    known = runtime_keys()
    if key not in known:
        raise BadInputError(f"unknown runtime {key!r}; known runtimes: {', '.join(known)}")
    cls, reason = _load(key)  # only this backend: see default_runtime_key
    if cls is None:
        raise RuntimeUnavailableError(
            f"runtime {key!r} is not available: {reason}",
            hint=_INSTALL_HINTS.get(key, _DEFAULT_HINT),
        )
    return cls(Path(model_path), threads=threads, delegates=delegates)
