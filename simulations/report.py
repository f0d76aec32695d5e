"""Simulation reports: ``report.json`` for scripts, ``report.md`` for people.

The JSON object always has the contract keys ``scenario``, ``rounds`` (each with
``round``, ``accuracy``, ``loss``, ``epsilon_max``, ``wall_s``, ``peak_rss_mb``),
``final_accuracy`` and ``epsilon_per_device``; everything else is extra detail
(configuration echo, failures, rejected updates, totals, versions). ``complete`` is false
when fewer rounds trained than planned (a round that aggregated nothing, or an early
stop); ``shortfall`` then says why, with each device's reason, and ``edgefl simulate``
exits 9.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgefl.files import write_text_atomic

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "RoundRow",
    "RunResult",
    "build_report",
    "package_versions",
    "render_markdown",
    "write_reports",
]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class RoundRow:
    """What one finished round produced, as the report shows it.

    ``epsilon_per_device`` holds each device's running ε total after the round (devices
    that never trained are absent); ``wall_s`` is the round's own wall time and
    ``peak_rss_mb`` the highest resident memory of the whole process tree during it.
    """

    round: int
    accuracy: float
    loss: float
    wall_s: float
    peak_rss_mb: float
    epsilon_per_device: dict[str, float] = field(default_factory=dict)
    trained: int = 0
    failures: int = 0
    rejected: int = 0
    refused_budget: int = 0
    aggregated: bool = True
    trained_nobody_because: str = ""
    refusals: dict[str, str] = field(default_factory=dict)

    @property
    def epsilon_max(self) -> float:
        """Largest running ε of any device (0 without DP)."""
        return max(self.epsilon_per_device.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The row as it appears in ``report.json``."""
        eps = list(self.epsilon_per_device.values())
        return {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "epsilon_max": self.epsilon_max,
            "epsilon_min": min(eps, default=0.0),
            "epsilon_median": statistics.median(eps) if eps else 0.0,
            "wall_s": self.wall_s,
            "peak_rss_mb": self.peak_rss_mb,
            "devices_trained": self.trained,
            "failures": self.failures,
            "rejected_updates": self.rejected,
            "refused_budget": self.refused_budget,
            "aggregated": self.aggregated,
            "trained_nobody_because": self.trained_nobody_because,
            "refusals": dict(sorted(self.refusals.items())),
        }


@dataclass
class RunResult:
    """One simulation run (with DP, or the no-DP comparison)."""

    label: str
    rows: list[RoundRow]
    epsilon_per_device: dict[str, float]
    startup_s: float
    wall_s: float
    peak_rss_mb: float
    failure_reasons: dict[str, int] = field(default_factory=dict)
    rejection_reasons: dict[str, int] = field(default_factory=dict)
    stopped_early: str = ""
    registry_url: str = ""
    shortfall: str | None = None

    @property
    def final_accuracy(self) -> float:
        """Server-side accuracy after the last round (NaN if no round finished)."""
        return self.rows[-1].accuracy if self.rows else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary of the run."""
        return {
            "label": self.label,
            "rounds": [r.to_dict() for r in self.rows],
            "final_accuracy": self.final_accuracy,
            "best_accuracy": max((r.accuracy for r in self.rows), default=math.nan),
            "epsilon_per_device": dict(sorted(self.epsilon_per_device.items())),
            "startup_s": self.startup_s,
            "wall_s_total": self.wall_s,
            "peak_rss_mb": self.peak_rss_mb,
            "failures": sum(r.failures for r in self.rows),
            "failure_reasons": self.failure_reasons,
            "rejected_updates": sum(r.rejected for r in self.rows),
            "rejection_reasons": self.rejection_reasons,
            "stopped_early": self.stopped_early,
            "complete": self.shortfall is None,
            "shortfall": self.shortfall,
            "registry_url": self.registry_url,
        }


def package_versions() -> dict[str, str]:
    """Versions of the packages a simulation result depends on."""
    import platform

    out = {"python": platform.python_version()}
    for dist in ("edgefl", "flwr", "opacus", "torch", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def build_report(
    *,
    scenario: str,
    description: str,
    config: dict[str, Any],
    dp: RunResult,
    no_dp: RunResult | None = None,
    plots: list[str] | None = None,
    rss_method: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report object (the contract keys first, then details)."""
    main = dp.summary()
    report: dict[str, Any] = {
        "scenario": scenario,
        "rounds": main.pop("rounds"),
        "final_accuracy": main.pop("final_accuracy"),
        "epsilon_per_device": main.pop("epsilon_per_device"),
        "description": description,
        "epsilon_max": max(dp.epsilon_per_device.values(), default=0.0),
        **main,
        "rss_method": rss_method,
        "plots": plots or [],
        "config": config,
        "versions": package_versions(),
    }
    if no_dp is not None:
        report["no_dp"] = no_dp.summary()
    if extra:
        report.update(extra)
    return report


def _num(value: float, spec: str) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def render_markdown(report: dict[str, Any]) -> str:
    """A human summary: headline figures, the per-round table and the plots."""
    cfg = report.get("config", {})  # the scenario: plan keys plus "simulation"
    privacy = cfg.get("dp", {})
    strategy = cfg.get("strategy", {})
    dp_on = bool(privacy.get("enabled", True))
    lines = [f"# Simulation `{report['scenario']}`", ""]
    if report.get("description"):
        lines += [report["description"], ""]
    lines += [
        f"- data: `{cfg.get('dataset')}` / `{cfg.get('model')}`, "
        f"{cfg.get('num_devices')} devices, Dirichlet α={cfg.get('dirichlet_alpha')}",
        f"- training: {strategy.get('name')}, {len(report['rounds'])}/"
        f"{cfg.get('rounds')} rounds, {cfg.get('local_epochs')} local epoch(s), "
        f"lr {cfg.get('lr')}, batch {cfg.get('batch_size')}",
        (
            f"- privacy: DP-SGD target ε={privacy.get('target_epsilon')} at "
            f"δ={privacy.get('delta')}, clip {privacy.get('max_grad_norm')}"
            if dp_on
            else "- privacy: off"
        ),
        f"- **final server-side accuracy {_num(report['final_accuracy'], '.2%')}** "
        f"(best {_num(report.get('best_accuracy', math.nan), '.2%')})",
        f"- max device ε {_num(report.get('epsilon_max', 0.0), '.3f')}; "
        f"failures {report.get('failures', 0)}, rejected updates "
        f"{report.get('rejected_updates', 0)}",
        f"- wall {_num(report.get('wall_s_total', math.nan), '.1f')} s "
        f"({_num(report.get('startup_s', math.nan), '.1f')} s outside rounds; round 1 "
        "also holds the engine's start-up), "
        f"peak RSS {_num(report.get('peak_rss_mb', math.nan), '.0f')} MB "
        f"({report.get('rss_method', '')})",
    ]
    if report.get("stopped_early"):
        lines.append(f"- stopped early: {report['stopped_early']}")
    if report.get("shortfall"):
        lines.append(f"- **did not complete: {report['shortfall']}**")
    no_dp = report.get("no_dp")
    if no_dp:
        lines.append(
            f"- without DP: final accuracy {_num(no_dp['final_accuracy'], '.2%')}, "
            f"wall {_num(no_dp['wall_s_total'], '.1f')} s"
        )
    lines += [
        "",
        "| round | accuracy | loss | ε max | ε median | trained | failed | rejected "
        "| wall s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rounds"]:
        lines.append(
            f"| {row['round']} | {_num(row['accuracy'], '.2%')} | {_num(row['loss'], '.4f')} "
            f"| {row['epsilon_max']:.3f} | {row.get('epsilon_median', 0.0):.3f} "
            f"| {row.get('devices_trained', '')} | {row.get('failures', '')} "
            f"| {row.get('rejected_updates', '')} | {row['wall_s']:.2f} "
            f"| {row['peak_rss_mb']:.0f} |"
        )
    idle = [row for row in report["rounds"] if not row.get("aggregated", True)]
    if idle:
        lines += ["", "## Rounds that trained nobody", ""]
        lines += [f"- round {row['round']}: {row['trained_nobody_because']}" for row in idle]
    reasons = {**report.get("failure_reasons", {}), **report.get("rejection_reasons", {})}
    if reasons:
        lines += ["", "## Failures and rejected updates", ""]
        lines += [f"- {count}× {reason}" for reason, count in sorted(reasons.items())]
    if report.get("plots"):
        lines += [""]
        lines += [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    versions = report.get("versions", {})
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    """Write ``report.json`` and ``report.md`` atomically into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        out_dir / REPORT_JSON, json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"
    )
    write_text_atomic(out_dir / REPORT_MD, render_markdown(report))
