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
    """Two panels sharing the variant axis: size (labelled with accuracy) and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [v.variant + ("" if v.accepted else " (refused)") for v in result.variants]
    rows = np.arange(len(names))
    fig, (ax_size, ax_lat) = plt.subplots(
        1, 2, figsize=(11, 0.55 * len(names) + 1.8), dpi=110, sharey=True
    )
    sizes = [v.size_bytes / 1024 for v in result.variants]
    ax_size.barh(rows, sizes, color=["C0" if v.accepted else "C3" for v in result.variants])
    first = result.targets[0] if result.targets else None
    for row, v, size in zip(rows, result.variants, sizes, strict=True):
        check = v.verified_on.get(first) if first else None
        label = f" {size:.0f} KiB" + (f", acc {check.accuracy:.1%}" if check else "")
        ax_size.text(size, row, label, va="center", fontsize=8)
    ax_size.set_yticks(rows, names)
    ax_size.invert_yaxis()
    ax_size.set_xlabel("artifact size (KiB); label: accuracy on " + (first or "-"))
    ax_size.set_xlim(0, max(sizes, default=1) * 1.6)
    height = 0.8 / max(len(result.targets), 1)
    for i, target in enumerate(result.targets):
        lat = [
            (v.verified_on[target].p50_us or 0.0) if target in v.verified_on else 0.0
            for v in result.variants
        ]
        ax_lat.barh(rows + (i - (len(result.targets) - 1) / 2) * height, lat, height, label=target)
    if math.isfinite(result.torch_eager_p50_us):
        ax_lat.axvline(result.torch_eager_p50_us, color="grey", linestyle="--", linewidth=1)
        ax_lat.text(result.torch_eager_p50_us, -0.6, " torch eager", fontsize=7, color="grey")
    ax_lat.set_xlabel("p50 single-sample latency (µs, 1 thread)")
    ax_lat.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{result.model}: size, accuracy and latency per variant")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(result: BuildResult, folder: Path) -> None:
    """Write ``report.json``, ``report.md`` and the plot into ``folder``."""
    (folder / "report.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (folder / "report.md").write_text(_markdown(result))
    _plot(result, folder / PLOT_NAME)
