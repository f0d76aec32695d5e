"""The demo's report: ``report.md`` and PNG plots (matplotlib, Agg backend: no display).

The figures come from the registry (:mod:`edgefl.demo.figures`); the stages, the records
the agents sent and the processes left behind from the run (``summary``, the ``--json``
object). Anything not measured (no telemetry yet, a stage that never ran, no release)
is written as "not measured" and drawn as an empty plot saying so, never an error.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeGuard

from edgefl.demo.figures import NOT_MEASURED, DemoFigures

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PLOTS", "REPORT_MD", "StageOutcome", "write_report"]

REPORT_MD: Final = "report.md"
ACCURACY_PNG: Final = "accuracy.png"
"""Server-side accuracy per round (the simulation's plot, :mod:`edgefl.simulations.plots`)."""
EPSILON_ROUNDS_PNG: Final = "epsilon.png"
"""ε per round: largest, median and spread over the devices (also the simulation's plot)."""
EPSILON_DEVICES_PNG: Final = "epsilon_per_device.png"
VARIANTS_PNG: Final = "variants.png"
ON_DEVICE_PNG: Final = "on_device.png"
OFFLOAD_PNG: Final = "offload.png"
RECORDS_PNG: Final = "records.png"
PLOTS: Final = (
    ACCURACY_PNG,
    EPSILON_ROUNDS_PNG,
    EPSILON_DEVICES_PNG,
    VARIANTS_PNG,
    ON_DEVICE_PNG,
    OFFLOAD_PNG,
    RECORDS_PNG,
)
"""Every plot :func:`write_report` writes, whatever was measured."""

_SIZE: Final = (6.4, 4.0)
_DPI: Final = 110


@dataclass(frozen=True)
class StageOutcome:
    """How one stage of the demo went.

    Attributes:
        name: The stage (``server``, ``enroll``, ``train``, ...).
        ok: Whether it completed.
        wall_s: Its wall time in seconds.
        detail: A line about it (what failed, with the log's path), or empty.
    """

    name: str
    ok: bool
    wall_s: float
    detail: str = ""


def write_report(
    out_dir: Path,
    *,
    figures: DemoFigures,
    stages: Sequence[StageOutcome],
    summary: Mapping[str, Any],
) -> Path:
    """Write ``out_dir/report.md`` and the PNG plots (:data:`PLOTS`) beside it.

    Args:
        out_dir: Where to write (created if missing).
        figures: What the registry holds of the run.
        stages: The stages, in order.
        summary: The ``--json`` object (``records.sent``, ``leftover_processes``,
            ``agents_on_release``, ``wall_s``, ... are read from it; any may be missing).
            ``records.sent_by_device`` (device -> records its outbox committed), when
            given, is shown per device.

    Returns:
        The report's path.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _plots(out_dir, figures, summary)
    path = out_dir / REPORT_MD
    path.write_text(_markdown(figures, stages, summary), encoding="utf-8")
    return path


# --- report.md ------------------------------------------------------------------------------


def _markdown(
    figures: DemoFigures, stages: Sequence[StageOutcome], summary: Mapping[str, Any]
) -> str:
    lines: list[str] = ["# edgefl demo", ""]
    if not stages:
        outcome = NOT_MEASURED
    else:
        outcome = "**completed**" if all(s.ok for s in stages) else "**failed**"
    lines += [
        f"- Outcome: {outcome} in {_seconds(summary.get('wall_s'))}",
        f"- Devices: {_text(summary.get('devices', len(figures.stored_by_device)))}, "
        f"rounds: {_text(summary.get('rounds', len(figures.rounds)))}",
        f"- Final server-side accuracy: {_pct(figures.final_accuracy)}",
        f"- Largest ε of a device: {_num(figures.epsilon_max)}",
        f"- Release: {_text(summary.get('release_version'))}, agents on it: "
        f"{_text(summary.get('agents_on_release'))}",
        f"- On-device accuracy: {_pct(figures.on_device_accuracy)}, offload fraction: "
        f"{_pct(figures.offload_fraction)}",
        f"- Records sent / stored / duplicate rows: {_text(_sent(summary))} / "
        f"{figures.records_stored} / {figures.duplicate_rows}",
        f"- Processes left behind: {_text(summary.get('leftover_processes'))}",
    ]
    if summary.get("dashboard"):
        lines.append(f"- Dashboard (while the demo ran): {summary['dashboard']}")
    if summary.get("run_id"):
        lines.append(f"- Federated run: `{summary['run_id']}`")
    lines.append("")
    lines += _stages(stages)
    lines += _training(figures)
    lines += _privacy(figures)
    lines += _release(figures)
    lines += _serving(figures)
    lines += _records(figures, summary)
    lines += _chaos(summary)
    lines += _processes(summary)
    lines += ["## Plots", ""]
    lines += [f"![{name.removesuffix('.png')}]({name})" for name in PLOTS]
    lines.append("")
    return "\n".join(lines)


def _stages(stages: Sequence[StageOutcome]) -> list[str]:
    lines = ["## Stages", ""]
    if not stages:
        return [*lines, NOT_MEASURED, ""]
    lines += ["| stage | outcome | wall time | detail |", "|---|---|---:|---|"]
    lines += [
        f"| {s.name} | {'ok' if s.ok else '**failed**'} | {_seconds(s.wall_s)} | "
        f"{_cell(s.detail)} |"
        for s in stages
    ]
    return [*lines, ""]


def _training(figures: DemoFigures) -> list[str]:
    lines = ["## Training (server-side accuracy on the held-out split)", ""]
    if not figures.rounds:
        return [*lines, NOT_MEASURED, ""]
    worst = _epsilon_per_round(figures)
    lines += ["| round | accuracy | largest ε |", "|---:|---:|---:|"]
    lines += [
        f"| {r} | {_pct(a)} | {_num(worst.get(r, (None, None, None))[2])} |"
        for r, a in figures.rounds
    ]
    return [*lines, ""]


def _privacy(figures: DemoFigures) -> list[str]:
    lines = ["## Privacy", ""]
    if not figures.epsilon_per_device:
        return [*lines, f"Privacy ledger: {NOT_MEASURED} (no ledger row for the run).", ""]
    delta = f"{figures.delta:g}" if figures.delta is not None else "unknown"
    # The guarantee is what the recorded (σ, q, steps) prove, not what a total claims.
    proven = max(figures.epsilon_recomputed.values(), default=None)
    differing = [
        d
        for d, again in figures.epsilon_recomputed.items()
        if d in figures.epsilon_per_device
        and not math.isclose(figures.epsilon_per_device[d], again, rel_tol=0.01)
    ]
    target = figures.epsilon_target
    lines += [
        "Each device's training data is protected by local differential privacy "
        f"(DP-SGD on the device): ({_num(proven)}, {delta})-DP at worst, per device, for "
        "this run, as recomputed from the ledger's per-round (σ, q, steps) entries alone"
        + (f"; the plan's target ε is {target:g}." if target else "."),
        "The ledger's own totals agree with the recomputation (within 1%)."
        if not differing
        else f"**The ledger's total differs from the recomputation by more than 1% for: "
        f"{', '.join(sorted(differing))}.**",
        "",
        "| device | ε (ledger) | ε (recomputed) | difference |",
        "|---|---:|---:|---:|",
    ]
    for device in sorted(set(figures.epsilon_per_device) | set(figures.epsilon_recomputed)):
        ledger = figures.epsilon_per_device.get(device)
        again = figures.epsilon_recomputed.get(device)
        diff = (
            f"{abs(ledger - again) / again:.2%}"
            if ledger is not None and again is not None and again > 0
            else "-"
        )
        lines.append(f"| {device} | {_num(ledger)} | {_num(again)} | {diff} |")
    return [*lines, ""]


def _release(figures: DemoFigures) -> list[str]:
    lines = ["## Release", ""]
    if not figures.variants:
        return [*lines, f"Variants: {NOT_MEASURED} (no release recorded).", ""]
    lines += [
        "| variant | size | accuracy | status | rolled out |",
        "|---|---:|---:|---|---|",
    ]
    lines += [
        f"| {v['name']} | {_kib(v.get('size_bytes'))} | {_pct(v.get('accuracy'))} | "
        f"{v.get('status', '-')} | {'yes' if v.get('rolled_out') else 'no'} |"
        for v in figures.variants
    ]
    return [*lines, ""]


def _serving(figures: DemoFigures) -> list[str]:
    lines = ["## Serving the release", ""]
    if figures.on_device_source == NOT_MEASURED:
        return [*lines, f"On-device figures: {NOT_MEASURED} (no result or inference report).", ""]
    latency = figures.on_device_latency_ms
    lines += [
        f"- Source: {figures.on_device_source}; {figures.answered} answers, "
        f"{figures.evaluated} with a label counted for accuracy",
        f"- On-device accuracy: {_pct(figures.on_device_accuracy)} (the answers the devices "
        "served, those the cloud gave included, as the agent counts them)",
        f"- Device model time per sample: p50 {_ms(latency.get('p50'))}, "
        f"p99 {_ms(latency.get('p99'))}",
        f"- Offload fraction (answered by the cloud): {_pct(figures.offload_fraction)}",
        "",
    ]
    if figures.on_device_by_device:
        lines += [
            "| device | answers | accuracy | local p50 | local p99 | offloaded |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {d} | {_text(f.get('answered'))} | {_pct(f.get('accuracy'))} | "
            f"{_ms(f.get('local_p50_ms'))} | {_ms(f.get('local_p99_ms'))} | "
            f"{_pct(f.get('offload_fraction'))} |"
            for d, f in sorted(figures.on_device_by_device.items())
        ]
        lines.append("")
    return lines


def _records(figures: DemoFigures, summary: Mapping[str, Any]) -> list[str]:
    sent = _sent(summary)
    lost = sent - figures.records_stored if isinstance(sent, int) else None
    lines = [
        "## Records",
        "",
        f"- Sent (committed to the agents' outboxes): {_text(sent)}",
        f"- Stored in the registry: {figures.records_stored}"
        + (f" ({lost} fewer than sent)" if lost and lost > 0 else "")
        + (f" ({-lost} more than sent)" if lost and lost < 0 else ""),
        f"- Duplicate rows: {figures.duplicate_rows} (rows beyond the first per message "
        f"identity (device, incarnation, seq): {figures.duplicate_keys}; the same answer "
        f"stored again under another identity: {figures.duplicate_answers})",
    ]
    if figures.dead_letters:
        refused = ", ".join(f"{r}: {n}" for r, n in figures.dead_letters.items())
        lines.append(f"- Refused by the ingest (dead letters): {refused}")
    lines.append("")
    by_device = _sent_by_device(summary)
    lines += ["| device | sent | stored |", "|---|---:|---:|"]
    lines += [
        f"| {d} | {_text(by_device.get(d))} | {n} |"
        for d, n in sorted(figures.stored_by_device.items())
    ]
    return [*lines, ""]


def _chaos(summary: Mapping[str, Any]) -> list[str]:
    """The faults ``--chaos`` injected and what they did, as the run reported them."""
    chaos = summary.get("chaos")
    if chaos is None:
        return []
    lines = ["## Chaos", ""]
    if not isinstance(chaos, Mapping) or not chaos:
        return [*lines, f"Faults injected: {NOT_MEASURED}.", ""]
    lines += [f"- {_cell(str(k))}: {_cell(json.dumps(v, default=str))}" for k, v in chaos.items()]
    return [*lines, ""]


def _processes(summary: Mapping[str, Any]) -> list[str]:
    left = summary.get("leftover_processes")
    if left is None:
        text = f"Processes left behind: {NOT_MEASURED}."
    elif left == 0:
        text = "Every process the demo started was stopped: none is left behind."
    else:
        text = f"**{left} process(es) left behind** after the stop."
    return ["## Clean stop", "", text, ""]


# --- plots ----------------------------------------------------------------------------------


def _plots(out_dir: Path, figures: DemoFigures, summary: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    _rounds_plots(out_dir, figures)
    _epsilon_plot(out_dir / EPSILON_DEVICES_PNG, figures)
    _variants_plot(out_dir / VARIANTS_PNG, figures)
    _on_device_plot(out_dir / ON_DEVICE_PNG, figures)
    _offload_plot(out_dir / OFFLOAD_PNG, figures)
    _records_plot(out_dir / RECORDS_PNG, figures, summary)


def _rounds_plots(out_dir: Path, figures: DemoFigures) -> None:
    """Accuracy and ε per round, drawn by the simulation's own plots."""
    if not figures.rounds:
        _empty(out_dir / ACCURACY_PNG, "accuracy per round")
        _empty(out_dir / EPSILON_ROUNDS_PNG, "ε per round")
        return
    from edgefl.simulations.plots import write_plots

    spread = _epsilon_per_round(figures)
    rows = [
        {
            "round": r,
            "accuracy": a,
            "epsilon_min": spread.get(r, (0.0, 0.0, 0.0))[0],
            "epsilon_median": spread.get(r, (0.0, 0.0, 0.0))[1],
            "epsilon_max": spread.get(r, (0.0, 0.0, 0.0))[2],
        }
        for r, a in figures.rounds
    ]
    dp = {"enabled": figures.epsilon_target is not None, "target_epsilon": figures.epsilon_target}
    write_plots({"scenario": "demo", "rounds": rows, "config": {"dp": dp}}, out_dir)


def _epsilon_per_round(figures: DemoFigures) -> dict[int, tuple[float, float, float]]:
    """Round -> (min, median, max) ε over the devices that have trained by then."""
    out: dict[int, tuple[float, float, float]] = {}
    for rnd, _ in figures.rounds:
        values = [
            max(rows, key=lambda x: x[0])[1]
            for rows in (
                [(r, e) for r, e in series if r <= rnd]
                for series in figures.epsilon_by_round.values()
            )
            if rows
        ]
        if values:
            out[rnd] = (min(values), statistics.median(values), max(values))
    return out


def _epsilon_plot(path: Path, figures: DemoFigures) -> None:
    devices = sorted(set(figures.epsilon_per_device) | set(figures.epsilon_recomputed))
    if not devices:
        _empty(path, "ε per device")
        return
    fig, ax = _figure()
    xs = range(len(devices))
    width = 0.4
    ax.bar(
        [x - width / 2 for x in xs],
        [figures.epsilon_per_device.get(d, 0.0) for d in devices],
        width,
        label="ledger",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [figures.epsilon_recomputed.get(d, 0.0) for d in devices],
        width,
        label="recomputed from (σ, q, steps)",
    )
    if figures.epsilon_target is not None:
        ax.axhline(
            figures.epsilon_target, color="C3", lw=1, label=f"target ε={figures.epsilon_target:g}"
        )
    ax.set_xticks(list(xs), devices, rotation=20, ha="right")
    ax.set_ylabel("ε after the run")
    ax.legend()
    _save(fig, ax, path, "ε per device")


def _variants_plot(path: Path, figures: DemoFigures) -> None:
    if not figures.variants:
        _empty(path, "size and accuracy per variant")
        return
    import matplotlib.pyplot as plt

    names = [str(v["name"]) for v in figures.variants]
    fig, (size_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=_DPI)
    size_ax.bar(names, [int(v.get("size_bytes") or 0) / 1024 for v in figures.variants])
    size_ax.set_ylabel("size (KiB)")
    accuracies = [v.get("accuracy") for v in figures.variants]
    acc_ax.bar(names, [a if _finite(a) else 0.0 for a in accuracies])
    for x, (a, v) in enumerate(zip(accuracies, figures.variants, strict=True)):
        label = f"{a:.1%}" if _finite(a) else NOT_MEASURED
        acc_ax.annotate(f"{label}\n{v.get('status', '')}", (x, 0.02), ha="center", fontsize=8)
    acc_ax.set_ylabel("verified accuracy")
    acc_ax.set_ylim(0, 1)
    for ax in (size_ax, acc_ax):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("release variants")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _on_device_plot(path: Path, figures: DemoFigures) -> None:
    per_device = figures.on_device_by_device
    if figures.on_device_source == NOT_MEASURED or not per_device:
        _empty(path, "on-device accuracy and latency")
        return
    import matplotlib.pyplot as plt

    devices = sorted(per_device)
    fig, (acc_ax, lat_ax) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=_DPI)
    accuracies = [per_device[d].get("accuracy") for d in devices]
    acc_ax.bar(devices, [a if _finite(a) else 0.0 for a in accuracies])
    for x, a in enumerate(accuracies):
        acc_ax.annotate(f"{a:.1%}" if _finite(a) else NOT_MEASURED, (x, 0.02), ha="center")
    if _finite(figures.on_device_accuracy):
        acc_ax.axhline(figures.on_device_accuracy, color="C3", lw=1, label="all devices")
        acc_ax.legend()
    acc_ax.set_ylim(0, 1)
    acc_ax.set_ylabel("on-device accuracy")
    xs = range(len(devices))
    width = 0.4
    for offset, key, label in (
        (-width / 2, "local_p50_ms", "p50"),
        (width / 2, "local_p99_ms", "p99"),
    ):
        values = [per_device[d].get(key) for d in devices]
        lat_ax.bar(
            [x + offset for x in xs], [v if _finite(v) else 0.0 for v in values], width, label=label
        )
    lat_ax.set_xticks(list(xs), devices)
    lat_ax.set_ylabel("device model time per sample (ms)")
    lat_ax.legend()
    for ax in (acc_ax, lat_ax):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"serving the release ({figures.on_device_source})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _offload_plot(path: Path, figures: DemoFigures) -> None:
    per_device: dict[str, float] = {}
    for device, f in sorted(figures.on_device_by_device.items()):
        fraction = f.get("offload_fraction")
        if _finite(fraction):
            per_device[device] = fraction
    overall = figures.offload_fraction
    if not _finite(overall) or not per_device:
        _empty(path, "offload fraction")
        return
    fig, ax = _figure()
    names = [*per_device, "all"]
    ax.bar(
        names,
        [*per_device.values(), overall],
        color=[*["C0"] * len(per_device), "C1"],
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of answers from the cloud")
    ax.tick_params(axis="x", rotation=20)
    _save(fig, ax, path, "offload fraction")


def _records_plot(path: Path, figures: DemoFigures, summary: Mapping[str, Any]) -> None:
    sent = _sent(summary)
    if not figures.stored_by_device and not isinstance(sent, int):
        _empty(path, "records sent and stored")
        return
    fig, ax = _figure()
    by_device = _sent_by_device(summary)
    devices = sorted(figures.stored_by_device)
    names = [*devices, "all"]
    xs = range(len(names))
    width = 0.4
    sent_values = [by_device.get(d) for d in devices] + [sent]
    ax.bar(
        [x - width / 2 for x in xs],
        [float(v) if isinstance(v, int) else 0.0 for v in sent_values],
        width,
        label="sent",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [*(figures.stored_by_device[d] for d in devices), figures.records_stored],
        width,
        label="stored",
    )
    for x, v in enumerate(sent_values):
        if not isinstance(v, int):
            ax.annotate(
                NOT_MEASURED, (x - width / 2, 0), ha="center", va="bottom", fontsize=7, rotation=90
            )
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("records")
    ax.legend()
    _save(fig, ax, path, f"records sent and stored ({figures.duplicate_rows} duplicate rows)")


def _figure() -> tuple[Figure, Axes]:
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=_SIZE, dpi=_DPI)


def _save(fig: Figure, ax: Axes, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _empty(path: Path, title: str) -> None:
    """A plot that says its figures were not measured (the report's plots always exist)."""
    fig, ax = _figure()
    ax.text(0.5, 0.5, NOT_MEASURED, ha="center", va="center", fontsize=16, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


# --- formatting -----------------------------------------------------------------------------


def _sent(summary: Mapping[str, Any]) -> int | None:
    records = summary.get("records")
    sent = records.get("sent") if isinstance(records, Mapping) else None
    return sent if isinstance(sent, int) and not isinstance(sent, bool) else None


def _sent_by_device(summary: Mapping[str, Any]) -> dict[str, int]:
    records = summary.get("records")
    by_device = records.get("sent_by_device") if isinstance(records, Mapping) else None
    if not isinstance(by_device, Mapping):
        return {}
    return {str(d): n for d, n in by_device.items() if isinstance(n, int)}


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: object) -> str:
    return f"{float(value):.1%}" if _finite(value) else NOT_MEASURED


def _num(value: object) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "unbounded"  # e.g. ε of a round trained without noise
    return f"{float(value):.3f}" if _finite(value) else NOT_MEASURED


def _ms(value: object) -> str:
    return f"{float(value):.2f} ms" if _finite(value) else NOT_MEASURED


def _kib(value: object) -> str:
    return f"{float(value) / 1024:.1f} KiB" if _finite(value) else NOT_MEASURED


def _seconds(value: object) -> str:
    return f"{float(value):.1f} s" if _finite(value) else NOT_MEASURED


def _text(value: object) -> str:
    return NOT_MEASURED if value is None else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
