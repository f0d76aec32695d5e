"""PNG plots of a simulation report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ACCURACY_PNG", "DP_VS_NO_DP_PNG", "EPSILON_PNG", "write_plots"]

ACCURACY_PNG = "accuracy.png"
EPSILON_PNG = "epsilon.png"
DP_VS_NO_DP_PNG = "dp_vs_no_dp.png"


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Draw the report's plots into ``out_dir``; returns the file names written.

    Always: accuracy vs round, ε vs round (max, median and the min–max spread across
    devices, with the target). With a ``no_dp`` run: DP vs no-DP accuracy and loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["rounds"]
    rounds = [r["round"] for r in rows]
    no_dp = report.get("no_dp")
    written: list[str] = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(rounds, [r["accuracy"] for r in rows], marker="o", ms=3, label="with DP")
    if no_dp:
        nrows = no_dp["rounds"]
        ax.plot(
            [r["round"] for r in nrows],
            [r["accuracy"] for r in nrows],
            marker="o",
            ms=3,
            ls="--",
            label="without DP",
        )
        ax.legend()
    ax.set_xlabel("round")
    ax.set_ylabel("server-side accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{report['scenario']}: accuracy")
    fig.tight_layout()
    fig.savefig(out_dir / ACCURACY_PNG)
    plt.close(fig)
    written.append(ACCURACY_PNG)

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.fill_between(
        rounds,
        [r.get("epsilon_min", 0.0) for r in rows],
        [r["epsilon_max"] for r in rows],
        alpha=0.25,
        label="device spread (min–max)",
    )
    ax.plot(rounds, [r["epsilon_max"] for r in rows], marker="o", ms=3, label="max")
    ax.plot(rounds, [r.get("epsilon_median", 0.0) for r in rows], ls="--", label="median")
    dp = report.get("config", {}).get("dp", {})
    target = dp.get("target_epsilon")
    if target is not None and dp.get("enabled", True):
        ax.axhline(float(target), color="C3", lw=1, label=f"target ε={target}")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε per device")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{report['scenario']}: privacy spent")
    fig.tight_layout()
    fig.savefig(out_dir / EPSILON_PNG)
    plt.close(fig)
    written.append(EPSILON_PNG)

    if no_dp:
        nrows = no_dp["rounds"]
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=110)
        for series, label, style in ((rows, "with DP", "-"), (nrows, "without DP", "--")):
            xs = [r["round"] for r in series]
            ax_acc.plot(
                xs, [r["accuracy"] for r in series], ls=style, marker="o", ms=3, label=label
            )
            ax_loss.plot(xs, [r["loss"] for r in series], ls=style, marker="o", ms=3, label=label)
        ax_acc.set_ylabel("server-side accuracy")
        ax_acc.set_ylim(0, 1)
        ax_loss.set_ylabel("server-side loss")
        for ax in (ax_acc, ax_loss):
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(
            f"{report['scenario']}: DP (final {report['final_accuracy']:.1%}) vs no DP "
            f"(final {no_dp['final_accuracy']:.1%})"
        )
        fig.tight_layout()
        fig.savefig(out_dir / DP_VS_NO_DP_PNG)
        plt.close(fig)
        written.append(DP_VS_NO_DP_PNG)
    return written
