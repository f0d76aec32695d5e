"""``edgefl agent predict``: answer the samples of a ``.npy`` file with the predictor.

The command line and the agent config meet here: the config's ``offload`` section (if any)
is the base, options override it, and the merged settings are validated once. With
``--config`` the results are committed to the agent's outbox, so they leave with the
agent's next publish.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefl.config import load_config, validate_config
from edgefl.errors import BadInputError, ConfigError

from .config import OffloadConfig
from .estimators import percentile

__all__ = ["PredictRequest", "load_samples", "run_predict"]


@dataclass(frozen=True)
class PredictRequest:
    """The options of ``edgefl agent predict`` (``None`` = not given)."""

    input_file: Path
    budget_ms: float | None = None
    mode: str | None = None
    model: Path | None = None
    config: Path | None = None
    cloud: str | None = None
    cloud_model: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


def load_samples(path: Path) -> npt.NDArray[Any]:
    """Read a ``.npy`` file (no pickles).

    Raises:
        BadInputError: Missing, unreadable, or not a numeric ``.npy`` array.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise BadInputError(f"input file {path} does not exist") from exc
    except OSError as exc:
        raise BadInputError(f"cannot read input file {path}: {exc}") from exc
    except ValueError as exc:
        raise BadInputError(
            f"{path} is not a usable .npy array ({exc})",
            hint="save samples with numpy.save(path, float32_array)",
        ) from exc
    if not isinstance(array, np.ndarray):
        raise BadInputError(f"{path} holds several arrays (.npz); give one .npy array")
    return array


def _settings(req: PredictRequest) -> tuple[OffloadConfig, Any]:
    """Merge the config's offload section with the options; returns (settings, agent config)."""
    agent = None
    base: dict[str, Any] = {}
    if req.config is not None:
        from edgefl.edge_agent.daemon import AgentConfig

        agent = load_config(AgentConfig, req.config)
        if agent.offload is not None:
            base = agent.offload.model_dump(exclude_unset=True)
    if req.mode is not None:
        base["mode"] = req.mode
    if req.budget_ms is not None:
        base["budget_ms"] = req.budget_ms
    if req.model is not None:
        base["model"] = req.model
    if req.cloud is not None or req.cloud_model is not None:
        cloud = dict(base.get("cloud") or {})
        if req.cloud is not None:
            host, _, port = req.cloud.rpartition(":")
            if not host or not port.isdigit():
                # A config error (exit 3), as when the option was validated as text.
                raise ConfigError(f"predict options: cloud.target: {req.cloud!r} is not HOST:PORT")
            cloud["target"] = {"host": host, "port": int(port)}
        if req.cloud_model is not None:
            cloud["model"] = req.cloud_model
        if "model" not in cloud:
            raise BadInputError(
                "--cloud needs the name of the served model", hint="add --cloud-model NAME"
            )
        base["cloud"] = cloud
    tls_given = any(v is not None for v in (req.ca_file, req.cert_file, req.key_file))
    if tls_given:
        if "cloud" not in base:
            raise BadInputError("TLS options need a cloud endpoint", hint="add --cloud HOST:PORT")
        tls = dict(base["cloud"].get("tls") or {})
        for key, value in (
            ("ca_file", req.ca_file),
            ("cert_file", req.cert_file),
            ("key_file", req.key_file),
            ("server_name", req.server_name),
        ):
            if value is not None:
                tls[key] = value
        base["cloud"] = {**base["cloud"], "tls": tls}
    if base.get("model") is None:
        raise BadInputError(
            "no device model given", hint="pass --model-dir DIR or set offload.model in --config"
        )
    return validate_config(OffloadConfig, base, source="predict options"), agent


def _summary(latencies: list[float], sources: list[str], misses: int) -> dict[str, Any]:
    by_source = {s: sources.count(s) for s in ("local", "cloud", "local_fallback")}
    return {
        "samples": len(latencies),
        "by_source": by_source,
        "offload_fraction": by_source["cloud"] / len(latencies),
        "deadline_misses": misses,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def run_predict(req: PredictRequest) -> dict[str, Any]:
    """Run the predictor over the input file; returns the report ``--json`` prints.

    Raises:
        BadInputError: Bad input file, shape, options or model path.
        ConfigError: The merged settings are invalid.
        ArtifactError: The device model is corrupt.
        RuntimeUnavailableError: No runtime can run the model.
    """
    settings, agent = _settings(req)
    samples = load_samples(req.input_file)
    from edgefl.edge_agent.outbox import Outbox

    from .engine import Predictor, describe_model, load_runtime

    runtime = load_runtime(settings)
    outbox = None
    if agent is not None:
        from edgefl.edge_agent.daemon import OUTBOX_FILE

        agent.state_dir.mkdir(parents=True, exist_ok=True)
        outbox = Outbox(agent.state_dir / OUTBOX_FILE, agent.device_id, agent.outbox)
    try:
        predictor = Predictor(
            runtime,
            settings,
            outbox=outbox,
            device_id=agent.device_id if agent is not None else "device",
            fleet=agent.fleet if agent is not None else "default",
            encoding=agent.encoding if agent is not None else "json",
        )
        batch = predictor.check_input(samples)  # bad shapes fail before any connection
        with predictor:
            results = predictor.predict(batch)
        report = {
            "model": describe_model(runtime),
            "mode": settings.mode,
            "budget_ms": settings.budget_ms,
            "cloud": None if settings.cloud is None else str(settings.cloud.target),
            "results": [{"index": i, **r.to_dict()} for i, r in enumerate(results)],
            "summary": _summary(
                [r.latency_ms for r in results],
                [r.source for r in results],
                sum(not r.deadline_met for r in results),
            ),
            "estimates": predictor.estimates.snapshot(),
            "breaker": predictor.breaker.state,
            "outbox": None
            if outbox is None
            else {"path": str(outbox.path), "committed": len(results)},
        }
    finally:
        if outbox is not None:
            outbox.close()
    return report
