"""``edgefl agent``: run the device agent and inspect it."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from edgefl.clikit import JSON_OPTION, emit_json, exits_on_error, print_table

__all__ = ["app"]

app = typer.Typer(
    help=(
        "The device agent: data sources, durable outbox and MQTT link, fleet commands, "
        "enrollment (enroll), on-device DP training in a Flower SuperNode (a training: "
        "section of the config) and local/cloud inference (predict)."
    ),
    no_args_is_help=True,
)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Agent config file (YAML, TOML or JSON).")
]


def _load(config: Path) -> Any:
    from edgefl.config import load_config
    from edgefl.edge_agent.daemon import AgentConfig

    return load_config(AgentConfig, config)


@app.command("validate-config")
@exits_on_error
def validate_config(config: ConfigOption, as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """Check a config file; exits 3 naming each bad key, and reports each renamed key."""
    from edgefl.config import config_renames

    cfg = _load(config)
    renames = config_renames(cfg)
    if as_json:
        emit_json(
            {
                "valid": True,
                "config": cfg.model_dump(mode="json"),
                "renamed_keys": [{"old": r.old, "new": r.new} for r in renames],
            }
        )
    else:
        typer.echo(f"{config}: valid (device {cfg.device_id}, fleet {cfg.fleet})")
        for rename in renames:
            typer.echo(f"  {rename.message()}")


@app.command()
@exits_on_error
def run(config: ConfigOption) -> None:
    """Run the agent until SIGTERM or Ctrl-C; boots even when the broker is down.

    It sends its sources' records through the outbox, answers fleet commands and, with a
    training: section, supervises the Flower SuperNode that trains on the device.
    """
    from edgefl.edge_agent.daemon import Agent

    agent = Agent(_load(config))
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    agent.run(stop)


@app.command()
@exits_on_error
def status(config: ConfigOption, as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """Connection state, outbox depth and bytes, age of the oldest record, drops.

    Read-only: it never writes to the agent's files, so it is safe beside a running
    agent; a damaged outbox is reported, not moved.
    """
    from edgefl.edge_agent.daemon import read_status

    report = read_status(_load(config))
    if as_json:
        emit_json(report)
        return
    box = report["outbox"]
    age = box.get("oldest_age_s")
    typer.echo(
        f"agent {report['device_id']} ({report['fleet']}): {report['state']}, "
        f"{'connected' if report['connected'] else 'not connected'}\n"
        + (
            f"outbox: UNREADABLE, left as it is: {box['error']}"
            if "error" in box
            else f"outbox: {box.get('depth', 0)} records, {box.get('bytes', 0)} bytes, oldest "
            f"{'-' if age is None else f'{age:.1f} s'}, dropped {box.get('dropped', 0)}, "
            f"expired {box.get('expired', 0)}, rejected {report['rejected']}"
        )
    )
    training = report.get("training")
    if training:
        node = training["supernode"]
        typer.echo(
            f"training: SuperNode {node['state']} ({node['reason']}), "
            f"{training['samples']} samples, restarts {node['restarts']}"
            + (f", last error: {node['last_error']}" if node.get("last_error") else "")
        )
    privacy = report.get("privacy")
    if privacy is not None:
        typer.echo(_privacy_line(privacy))
    models = report.get("models")
    if models is not None:
        typer.echo(_models_line(models))
    inference = report.get("inference")
    if inference is not None:
        typer.echo(_inference_lines(inference))


def _privacy_line(doc: dict[str, Any]) -> str:
    """``privacy: lifetime ε 10.31 of cap 16 (5.69 left, δ=1e-05) over 2 runs``."""
    if "error" in doc:
        return f"privacy: lifetime ε UNREADABLE: {doc['error']}"
    cap = doc.get("lifetime_cap")
    delta = f"δ={doc['lifetime_delta']:g}"
    budget = (
        f"no cap ({delta})"
        if cap is None
        else f"cap {cap:g} ({doc.get('lifetime_remaining') or 0.0:.2f} left, {delta})"
    )
    return (
        f"privacy: lifetime ε {doc['lifetime_epsilon']:.2f} of {budget} over "
        f"{doc.get('runs', 0)} runs"
        + (f", as of {_when(doc['updated_at'])}" if doc.get("updated_at") else "")
    )


def _when(stamp: Any) -> str:
    import datetime as dt

    if not isinstance(stamp, int | float):
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _models_line(models: dict[str, Any]) -> str:
    """``model: NAME vN (VARIANT) since ..., STATE; last swap ...; rollbacks N; last failure``."""
    reported = models.get("reported") or {}
    if reported.get("version") is None:
        line = f"model: none ({reported.get('state', 'none')})"
    else:
        line = (
            f"model: {reported['model']} v{reported['version']} ({reported['variant']}) "
            f"since {_when(reported.get('since'))}, {reported.get('state')}"
        )
    swap = models.get("last_swap")
    if swap:
        line += (
            f"; last swap v{swap.get('from_version') or '-'} -> v{swap.get('to_version')} at "
            f"{_when(swap.get('at'))}{' (rollback)' if swap.get('rollback') else ''}"
        )
    line += f"; rollbacks {reported.get('rollbacks', 0)}"
    failure = reported.get("last_failure")
    if failure:
        line += (
            f"\nlast model failure: v{failure['version']} {failure['reason']} at "
            f"{_when(failure.get('at'))}: {failure['detail']}"
        )
    return line


def _ms(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.2f} ms"


def _inference_lines(doc: dict[str, Any]) -> str:
    """The loop's model and figures, then one line per model version that answered."""
    model = doc.get("model")
    serving = "no model yet" if not model else f"{model['model']} v{model['version']} "
    if model:
        serving += f"({model['variant']})"
    rate = doc.get("samples_per_s")
    queue = doc.get("queue") or {}
    lines = [
        f"inference: {serving}, {'-' if rate is None else f'{rate:.1f}'} samples/s, "
        f"{doc.get('answered', 0)} answered, dropped {doc.get('dropped', 0)}, rejected "
        f"{sum((doc.get('rejected') or {}).values())}, queue {queue.get('depth', 0)}/"
        f"{queue.get('size', '-')}, mode {doc.get('mode')} budget {doc.get('budget_ms')} ms"
    ]
    for v in doc.get("versions") or []:
        accuracy = v.get("accuracy")
        per_s = v.get("samples_per_s")
        lines.append(
            f"  v{v['version']} ({v['variant']}): {v['answered']} answered"
            f"{'' if per_s is None else f' at {per_s:.1f}/s'}, "
            f"local p50 {_ms(v.get('local_p50_ms'))} p99 {_ms(v.get('local_p99_ms'))}, offload "
            f"{100 * float(v.get('offload_fraction') or 0):.1f}%, deadline misses "
            f"{v.get('deadline_misses', 0)}, dropped {v.get('dropped', 0)}, accuracy "
            + ("-" if accuracy is None else f"{100 * accuracy:.1f}% of {v['evaluated']}")
        )
    lines.extend(_shadow_lines(doc.get("shadow")))
    swaps = doc.get("swaps") or {}
    if swaps.get("count"):
        lines.append(
            f"  swaps {swaps['count']}, pause p50 {_ms(swaps.get('pause_p50_ms'))} p99 "
            f"{_ms(swaps.get('pause_p99_ms'))}"
        )
    return "\n".join(lines)


def _share(part: Any, whole: Any) -> str:
    if not isinstance(part, int) or not isinstance(whole, int) or not whole:
        return "-"
    return f"{100 * part / whole:.1f}% of {whole}"


def _shadow_lines(shadow: Any) -> list[str]:
    """The shadow the loop runs beside the serving model, then its figures per version."""
    if not isinstance(shadow, dict):
        return []
    model = shadow.get("model")
    state = shadow.get("state", "none")
    if not model and state == "none" and not shadow.get("versions"):
        return []
    name = "none" if not model else f"{model['model']} v{model['version']} ({model['variant']})"
    lines = [f"  shadow: {name}, {state} (never serves its answers)"]
    failure = shadow.get("last_failure")
    if state == "failed" and isinstance(failure, dict):
        lines[0] += f"; last failure v{failure.get('version')} {failure.get('reason')}"
    for v in shadow.get("versions") or []:
        lines.append(
            f"  shadow v{v['version']} ({v['variant']}): {v['compared']} compared, agreement "
            f"{_share(v.get('agreed'), v.get('compared'))}, accuracy "
            f"{_share(v.get('correct'), v.get('evaluated'))} (served "
            f"{_share(v.get('served_correct'), v.get('evaluated'))}), errors "
            f"{v.get('errors', 0)}, skipped {v.get('skipped', 0)}, p99 "
            f"{_ms(v.get('latency_p99_ms'))}"
        )
    return lines


@app.command()
@exits_on_error
def enroll(
    config: ConfigOption,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where to write the request (default: identity dir)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing keys (the device must re-enroll).")
    ] = False,
    install: Annotated[
        Path | None,
        typer.Option("--install", help="Install the bundle `edgefl server admit` wrote."),
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Make the device's keys and enrollment request, or install an admitted bundle."""
    from edgefl.edge_agent.identity import install_bundle, prepare_enrollment

    cfg = _load(config)
    if install is not None:
        if out is not None or force:
            raise typer.BadParameter("--install takes no --out or --force", param_hint="--install")
        done = install_bundle(install, cfg.device_id, cfg.fleet, cfg.state_dir)
        report: dict[str, Any] = {
            "installed": True,
            "device_id": done.bundle.device_id,
            "fleet": done.bundle.fleet,
            "node_id": done.bundle.node_id,
            "cert_serial": done.serial,
            "not_after": done.not_after,
            "superlink": done.bundle.superlink,
            "cert": str(done.paths.cert),
            "ca": str(done.paths.ca),
            "bundle": str(done.paths.bundle),
            "app_signing_keys": len(done.bundle.app_signing_keys),
        }
        if as_json:
            emit_json(report)
        else:
            typer.echo(
                f"installed the certificate of {cfg.device_id} (serial {done.serial}, valid "
                f"until {done.not_after}, node id {done.bundle.node_id}) in "
                f"{done.paths.directory}"
                + (
                    f"; pinned the fleet's app-signing key ({done.paths.app_signing_keys.name})"
                    if done.bundle.app_signing_keys
                    else ""
                )
            )
        return
    result = prepare_enrollment(cfg.device_id, cfg.fleet, cfg.state_dir, out=out, force=force)
    report = {
        "device_id": cfg.device_id,
        "fleet": cfg.fleet,
        "request": str(result.request_path),
        "created_tls_key": result.created_tls_key,
        "created_node_key": result.created_node_key,
        "tls_key": str(result.paths.tls_key),
        "node_key": str(result.paths.node_key),
        "node_public_key": result.request.node_public_key,
    }
    if as_json:
        emit_json(report)
        return
    kept = [
        name
        for name, created in (
            ("TLS key", result.created_tls_key),
            ("node key", result.created_node_key),
        )
        if not created
    ]
    typer.echo(
        f"enrollment request for {cfg.device_id} ({cfg.fleet}) written to "
        f"{result.request_path}"
        + (f" (kept the existing {' and '.join(kept)})" if kept else "")
        + "\nnext: `edgefl server admit REQUEST` on the server, then "
        "`edgefl agent enroll --config CONFIG --install BUNDLE` here"
    )


@app.command()
@exits_on_error
def predict(
    input_file: Annotated[
        Path, typer.Option("--input", "-i", help=".npy file: one sample or a batch (N, ...).")
    ],
    budget_ms: Annotated[
        float | None,
        typer.Option("--budget-ms", help="Latency budget per sample, ms (default: config's)."),
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="local, cloud or adaptive (default: config's).")
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option("--model-dir", help="Device model: a .tflite file or an artifacts folder."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Agent config; its offload section and outbox are used."
        ),
    ] = None,
    cloud: Annotated[
        str | None, typer.Option("--cloud", help="HOST:PORT of the inference service.")
    ] = None,
    cloud_model: Annotated[
        str | None, typer.Option("--cloud-model", help="Model name the service serves.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca", help="CA certificate of the service (enables TLS).")
    ] = None,
    cert_file: Annotated[
        Path | None, typer.Option("--cert", help="Device certificate for mutual TLS.")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key", help="Device private key for mutual TLS.")
    ] = None,
    server_name: Annotated[
        str | None, typer.Option("--server-name", help="Name on the server certificate.")
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Answer samples locally, offloading to the cloud when the budget allows."""
    if mode is not None and mode not in ("local", "cloud", "adaptive"):
        raise typer.BadParameter(f"{mode!r}: use local, cloud or adaptive", param_hint="--mode")
    from edgefl.edge_agent.offload.predict_cli import PredictRequest, run_predict

    report = run_predict(
        PredictRequest(
            input_file=input_file,
            budget_ms=budget_ms,
            mode=mode,
            model=model_dir,
            config=config,
            cloud=cloud,
            cloud_model=cloud_model,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name=server_name,
        )
    )
    if as_json:
        emit_json(report)
        return
    print_table(
        [
            ("#", "right"),
            ("label", "right"),
            ("p", "right"),
            ("source", "left"),
            ("latency ms", "right"),
            ("budget", "left"),
            ("reason", "left"),
        ],
        [
            (
                row["index"],
                row["label"],
                f"{row['confidence']:.3f}",
                row["source"],
                f"{row['latency_ms']:.2f}",
                "met" if row["deadline_met"] else "MISSED",
                row["reason"],
            )
            for row in report["results"]
        ],
    )
    s = report["summary"]
    typer.echo(
        f"{s['samples']} samples, budget {report['budget_ms']:g} ms, mode {report['mode']}: "
        + ", ".join(f"{n} {source}" for source, n in s["by_source"].items())
        + f"; p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, "
        f"{s['deadline_misses']} over budget"
    )
