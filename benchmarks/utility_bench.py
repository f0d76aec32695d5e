"""Does training learn, on every seed? Accuracy of shipped scenarios over data seeds.

    python benchmarks/utility_bench.py --json --only main

Sections (``--only`` picks some, comma-separated; default: all):

- **main**: the README's main command, ``edgefl simulate --scenario
  simulations/scenarios/quick.toml --out DIR --json``, run as a user runs it (a new
  process per seed, Ray start-up included) on ``--seeds`` (0-4). The seed is the
  scenario's ``seed`` key (split, partitions, model initialisation): each run reads a
  temporary copy of ``quick.toml`` with only that line changed. Per seed: the final
  server-side accuracy and the command's wall time. The run must be complete and every
  device's ε must stay within its cap and match the ledger's independent recomputation
  (within 1%); otherwise the benchmark stops with an error naming the seed.

A section is a function taking the parsed options and returning its JSON object;
``SECTIONS`` lists them in the order they run.

Output (``--json``: stdout holds only this object; progress goes to stderr)::

    {"main": {"seeds": {SEED: {"final_accuracy": float, "wall_s": float}},
              "mean": float, "min": float, "max": float, "wall_s_max": float}}

``mean``/``min``/``max`` summarise the final accuracy over the seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefl.simulations.scenario import load_scenario, shipped_scenarios

MAIN_SCENARIO = next(p for p in shipped_scenarios() if p.stem == "quick")
"""The scenario of the README's main command."""

SEED_LINE = re.compile(r"^seed\s*=\s*\d+[ \t]*$", re.MULTILINE)


def log(message: str) -> None:
    print(f"[utility_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A run failed or broke a property the benchmark relies on."""


@dataclass(frozen=True)
class Options:
    seeds: list[int]
    keep: Path | None


def edgefl_command() -> list[str]:
    """The ``edgefl`` entry point of the interpreter running this script."""
    script = Path(sys.executable).with_name("edgefl")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from edgefl.cli import main; main()"]


def with_seed(text: str, seed: int, source: Path) -> str:
    """The scenario text with its one top-level ``seed = N`` line set to ``seed``."""
    new, count = SEED_LINE.subn(f"seed = {seed}", text)
    if count != 1:
        raise BenchError(f"{source}: expected exactly one 'seed = N' line, found {count}")
    return new


def simulate(scenario: Path, seed: int, workdir: Path) -> tuple[dict[str, Any], float]:
    """Run ``edgefl simulate`` on ``scenario`` with ``seed``; its report and wall time."""
    copy = workdir / f"seed-{seed}" / scenario.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(with_seed(scenario.read_text(encoding="utf-8"), seed, scenario), "utf-8")
    if load_scenario(copy).seed != seed:
        raise BenchError(f"{copy}: the seed did not take")
    out = copy.parent / "run"
    command = [*edgefl_command(), "simulate", "--scenario", str(copy), "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, timeout=1800, check=False
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise BenchError(
            f"seed {seed}: `{' '.join(command)}` exited {proc.returncode}; "
            f"the end of its stderr:\n{proc.stderr[-3000:]}"
        )
    report: dict[str, Any] = json.loads(proc.stdout)
    return report, wall


def check_privacy(report: dict[str, Any], cap: float, seed: int) -> None:
    """Every device within its ε cap, and the ledger's recomputation agrees (1%)."""
    eps = report["epsilon_per_device"]
    over = {d: e for d, e in eps.items() if e > cap * (1 + 1e-9)}
    if not eps or over:
        raise BenchError(f"seed {seed}: ε per device {eps} (cap {cap}): over the cap: {over}")
    error = report["epsilon_check"]["max_relative_error"]
    if not error < 0.01:
        raise BenchError(f"seed {seed}: ledger recomputation differs by {error:.2%}")


def main_section(options: Options) -> dict[str, Any]:
    """The README's main command over ``options.seeds``."""
    cap = load_scenario(MAIN_SCENARIO).dp.cap
    seeds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="utility-bench-") as tmp:
        workdir = options.keep or Path(tmp)
        for seed in options.seeds:
            log(f"main: seed {seed} ({len(seeds) + 1}/{len(options.seeds)}) ...")
            report, wall = simulate(MAIN_SCENARIO, seed, workdir / "main")
            check_privacy(report, cap, seed)
            accuracy = float(report["final_accuracy"])
            seeds[str(seed)] = {"final_accuracy": accuracy, "wall_s": round(wall, 2)}
            log(
                f"main: seed {seed}: final accuracy {accuracy:.2%}, wall {wall:.1f} s, "
                f"ε max {report['epsilon_max']:.3f}"
            )
    accuracies = [row["final_accuracy"] for row in seeds.values()]
    return {
        "seeds": seeds,
        "mean": statistics.fmean(accuracies),
        "min": min(accuracies),
        "max": max(accuracies),
        "wall_s_max": max(row["wall_s"] for row in seeds.values()),
    }


SECTIONS: dict[str, Callable[[Options], dict[str, Any]]] = {"main": main_section}


def render(result: dict[str, Any]) -> str:
    """A short human-readable summary of the result."""
    lines: list[str] = []
    if "main" in result:
        main = result["main"]
        lines.append(f"main ({MAIN_SCENARIO.name}):")
        for seed, row in main["seeds"].items():
            lines.append(
                f"  seed {seed}: final accuracy {row['final_accuracy']:.2%}, "
                f"wall {row['wall_s']:.1f} s"
            )
        lines.append(
            f"  mean {main['mean']:.2%}, min {main['min']:.2%}, max {main['max']:.2%}; "
            f"slowest run {main['wall_s_max']:.1f} s"
        )
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds: give integers like 0,1,2, not {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: give distinct integers >= 0, not {text!r}")
    return seeds


def parse_sections(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--only: unknown section(s) {unknown or text!r}; choose from: {', '.join(SECTIONS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument(
        "--only",
        type=parse_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default: all: {', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--seeds", type=parse_seeds, default=[0, 1, 2, 3, 4], help="data seeds (default 0-4)"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep each run's scenario copy and report here"
    )
    args = parser.parse_args(argv)
    options = Options(seeds=args.seeds, keep=args.keep)
    result: dict[str, Any] = {}
    try:
        for name in SECTIONS:
            if name in args.only:
                result[name] = SECTIONS[name](options)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
