"""Build reports: ``report.json`` for scripts, ``report.md`` for people, a PNG trade-off plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgefl.quantize.build import BuildResult

__all__ = ["PLOT_NAME", "write_reports"]

PLOT_NAME = "size_latency_accuracy.png"


def _fmt_us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _markdown(result: BuildResult) -> str:
    fp32 = next((v for v in result.variants if v.variant == "fp32"), None)
    lines = [
        f"# {result.model}: edge artifacts",
        "",
        f"Dataset `{result.dataset}`, {result.test_samples} held-out samples. "
        f"Torch reference accuracy {result.torch_accuracy:.2%}, "
        f"torch eager p50 {result.torch_eager_p50_us:.1f} µs (single sample).",
        f"Verified on: {', '.join(result.targets)}.",
        "",
        "| variant | status | size (KiB) | vs fp32 | "
        + " | ".join(f"{t} acc | {t} p50 µs" for t in result.targets)
        + " |",
        "|---|---|---:|---:|" + "---:|---:|" * len(result.targets),
    ]
    for v in result.variants:
        ratio = f"{fp32.size_bytes / v.size_bytes:.2f}x smaller" if fp32 else ""
        cells = []
        for t in result.targets:
            check = v.verified_on.get(t)
            cells += [f"{check.accuracy:.2%}", _fmt_us(check.p50_us)] if check else ["n/a", "n/a"]
        status = "accepted" if v.accepted else "**refused**"
        lines.append(
            f"| {v.variant} | {status} | {v.size_bytes / 1024:.1f} | {ratio} | "
            + " | ".join(cells)
            + " |"
        )
    refused = result.refused
    if refused:
        lines += ["", "## Refused", ""]
        for v in refused:
            lines += [f"- **{v.variant}**: " + "; ".join(v.reasons)]
    lines += ["", f"![size, latency and accuracy]({PLOT_NAME})", ""]
    return "\n".join(lines)


def _plot(result: BuildResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    markers = ["o", "s", "^", "D"]
    timed = any(c.p50_us is not None for v in result.variants for c in v.verified_on.values())
    for i, target in enumerate(result.targets):
        xs, ys, labels = [], [], []
        for v in result.variants:
            check = v.verified_on.get(target)
            if check is None or (timed and check.p50_us is None):
                continue
            xs.append(v.size_bytes / 1024)
            # Without latency figures (bench_iters=0) the plot shows size vs accuracy.
            ys.append(check.p50_us if timed and check.p50_us is not None else check.accuracy * 100)
            label = f"{v.variant}\n{check.accuracy:.1%}" if timed else v.variant
            labels.append(label + ("" if v.accepted else " ✗"))
        ax.scatter(xs, ys, marker=markers[i % len(markers)], s=60, label=target)
        for x, y, label in zip(xs, ys, labels, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if timed and math.isfinite(result.torch_eager_p50_us):
        ax.axhline(result.torch_eager_p50_us, color="grey", linestyle="--", linewidth=1)
        ax.text(
            0.01,
            result.torch_eager_p50_us,
            " torch eager",
            va="bottom",
            fontsize=7,
            transform=ax.get_yaxis_transform(),
        )
    if result.variants:
        ax.set_xscale("log")
    ax.set_xlabel("artifact size (KiB, log)")
    if timed:
        ax.set_ylabel("p50 single-sample latency (µs)")
        ax.set_title(f"{result.model}: size vs latency (labels: accuracy)")
    else:
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{result.model}: size vs accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(result: BuildResult, folder: Path) -> None:
    """Write ``report.json``, ``report.md`` and the plot into ``folder``."""
    (folder / "report.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (folder / "report.md").write_text(_markdown(result))
    _plot(result, folder / PLOT_NAME)
