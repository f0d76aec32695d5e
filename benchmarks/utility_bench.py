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

- **dp_target**: the DP target scenario, ``simulations/scenarios/digits-noniid-dp.toml``
  (digits, 20 non-IID devices, ε=8 per device, 30 rounds), run as shipped on
  ``--seeds`` (0-4), each seed the same way as ``main``. Per seed: the final server-side
  accuracy and the largest ε of any device, checked as for ``main`` (within the cap,
  the ledger's recomputation within 1%).
- **levers**: the screen that chose that configuration, as data: each entry of
  :data:`LEVERS` is a named override of the shipped file (a dict merged into its TOML
  tables; ``{}`` is the file as shipped), run on ``--screen-seeds`` (1,2: the seeds
  where the earlier configuration was weakest) without the no-DP comparison run (it
  does not change the DP run). Per lever: the mean final accuracy over those seeds and
  each seed's figure. ``--levers NAME,...`` runs some of them.

A section is a function taking the parsed options and returning its JSON object;
``SECTIONS`` lists them in the order they run.

Output (``--json``: stdout holds only this object; progress goes to stderr)::

    {"main": {"seeds": {SEED: {"final_accuracy": float, "wall_s": float}},
              "mean": float, "min": float, "max": float, "wall_s_max": float},
     "dp_target": {"seeds": {SEED: {"final_accuracy": float, "epsilon_max": float}},
                   "mean": float, "min": float, "max": float},
     "levers": [{"name": str, "mean": float, "seeds": {SEED: float},
                 "override": {...}}]}

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
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from utility_scenarios import scenarios_section  # benchmarks/ is on sys.path

from edgefl.simulations.scenario import load_scenario, parse_scenario, shipped_scenarios

MAIN_SCENARIO = next(p for p in shipped_scenarios() if p.stem == "quick")
"""The scenario of the README's main command."""

DP_TARGET_SCENARIO = next(p for p in shipped_scenarios() if p.stem == "digits-noniid-dp")
"""The DP target: digits, 20 devices, Dirichlet α=0.5, ε=8 per device, 30 rounds."""

SCREEN_SEEDS = [1, 2]
"""The data seeds the levers were screened on (the weakest of the earlier configuration)."""

PREVIOUS: dict[str, Any] = {"centre_inputs": None, "batch_size": 16, "lr": 0.15}
"""The configuration shipped before centred inputs: the same file with raw inputs, batch 16
and lr 0.15 (64-32-10 MLP, FedAvgM server momentum 0.5). The screens before it are
overrides of that configuration, so each is merged onto this."""

FEDAVG: dict[str, Any] = {**PREVIOUS, "strategy": {"name": "fedavg", "server_momentum": None}}
"""Plain FedAvg instead of FedAvgM (``None`` removes a key from the file)."""

WIDE_FEDAVG: dict[str, Any] = {**FEDAVG, "lr": 0.3}
"""The configuration shipped before FedAvgM was chosen: the 64-32-10 MLP, FedAvg, lr 0.3."""

NARROW: dict[str, Any] = {**WIDE_FEDAVG, "model": "digits-mlp"}
"""The configuration shipped before the first screen: the 64-16-10 MLP, FedAvg, lr 0.3."""

CENTRED: dict[str, Any] = {**PREVIOUS, "centre_inputs": True}
"""The previous configuration with centred inputs (batch 16, lr 0.15)."""

LEVERS: list[tuple[str, dict[str, Any]]] = [
    # The last screen; figures of seeds 1 / 2 in the README's table.
    ("shipped: centred inputs + batch 32 + lr 0.4 + FedAvgM server momentum 0.5", {}),
    ("previous: raw inputs + batch 16 + lr 0.15 + FedAvgM server momentum 0.5", PREVIOUS),
    ("previous + centred inputs", CENTRED),
    ("previous + centred inputs + lr 0.2", {**CENTRED, "lr": 0.2}),
    ("centred inputs + batch 32 + lr 0.3", {"lr": 0.3}),
    ("previous + batch 32", {**PREVIOUS, "batch_size": 32}),
    ("previous + batch 32 + lr 0.3", {**PREVIOUS, "batch_size": 32, "lr": 0.3}),
    ("previous + augmentation multiplicity 4", {**PREVIOUS, "augment_multiplicity": 4}),
    ("previous + augmentation multiplicity 8", {**PREVIOUS, "augment_multiplicity": 8}),
    ("previous + per-layer clipping", {**PREVIOUS, "dp": {"clip_per_layer": True}}),
    ("previous + cosine lr 0.15 to 0.05", {**PREVIOUS, "lr_final": 0.05}),
    (
        "central DP instead: trusted aggregator z 3.5 and update clip 0.3 with FedAvg",
        {
            "dp": {"enabled": False},
            "central_dp": {
                "enabled": True,
                "noise_multiplier": 3.5,
                "clipping_norm": 0.3,
                "max_epsilon": 8.0,
            },
            "strategy": {"name": "fedavg", "server_momentum": None},
        },
    ),
    # The screens before it.
    ("64-32-10 MLP digits-mlp-wide with FedAvg and lr 0.3", WIDE_FEDAVG),
    ("64-32-10 + cosine lr 0.3 to 0.03", {**WIDE_FEDAVG, "lr_final": 0.03}),
    ("64-32-10 + lr 0.15", FEDAVG),
    ("before: 64-16-10 MLP digits-mlp", NARROW),
    ("64-16-10 + lr 0.15", {**FEDAVG, "model": "digits-mlp"}),
    ("64-16-10 + batch 32", {**NARROW, "batch_size": 32}),
    ("64-16-10 + clip 0.5", {**NARROW, "dp": {"max_grad_norm": 0.5}}),
    ("64-16-10 + 2 local epochs", {**NARROW, "local_epochs": 2}),
    ("64-16-10 + cosine lr 0.3 to 0.03", {**NARROW, "lr_final": 0.03}),
    (
        "64-16-10 + FedAvgM server momentum 0.9 and lr 0.1",
        {
            **PREVIOUS,
            "model": "digits-mlp",
            "lr": 0.1,
            "strategy": {"name": "fedavgm", "server_momentum": 0.9},
        },
    ),
    (
        "64-16-10 + FedAdam eta 0.01 eta_l 0.3 tau 0.001",
        {
            **NARROW,
            "strategy": {
                "name": "fedadam",
                "eta": 0.01,
                "eta_l": 0.3,
                "tau": 0.001,
                "server_momentum": None,
            },
        },
    ),
]
"""The screen of :data:`DP_TARGET_SCENARIO`: (name, override of the shipped file).

An override is merged into the file's TOML tables (a nested dict updates that table,
``None`` removes a key). Each entry is a configuration a screen measured: the last screen
changes one or two things from :data:`PREVIOUS` (or, for the batch-32 lr-0.3 entry, from
the file as shipped); the earlier ones change one thing from the configuration shipped
before them (:data:`NARROW`). Names hold no comma (``--levers`` takes a comma-separated
list of them).
"""

LEVER_BASE: dict[str, Any] = {"simulation": {"compare_no_dp": False}}
"""Applied to every lever run: the no-DP comparison run does not change the DP run."""

SEED_LINE = re.compile(r"^seed\s*=\s*\d+[ \t]*$", re.MULTILINE)


def log(message: str) -> None:
    print(f"[utility_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A run failed or broke a property the benchmark relies on."""


@dataclass(frozen=True)
class Options:
    seeds: list[int]
    keep: Path | None
    screen_seeds: list[int] = field(default_factory=lambda: list(SCREEN_SEEDS))
    levers: list[str] = field(default_factory=lambda: [name for name, _ in LEVERS])


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


def merge(data: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``override`` merged in: a dict updates that table, ``None`` removes the
    key, anything else is set."""
    out = dict(data)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def with_override(text: str, seed: int, override: dict[str, Any], source: Path) -> str:
    """The scenario text with ``seed`` and ``override`` applied (no override: one line)."""
    text = with_seed(text, seed, source)
    if not override:
        return text
    return tomli_w.dumps(merge(tomllib.loads(text), override))


def simulate(
    scenario: Path, seed: int, workdir: Path, override: dict[str, Any] | None = None
) -> tuple[dict[str, Any], float]:
    """Run ``edgefl simulate`` on ``scenario`` with ``seed`` (and ``override`` merged into
    the file); its report and wall time."""
    copy = workdir / f"seed-{seed}" / scenario.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    text = with_override(scenario.read_text(encoding="utf-8"), seed, override or {}, scenario)
    copy.write_text(text, "utf-8")
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


def sweep(
    label: str,
    scenario: Path,
    seeds: list[int],
    workdir: Path,
    override: dict[str, Any] | None = None,
) -> Iterator[tuple[int, dict[str, Any], float]]:
    """Run ``scenario`` (with ``override``) on each seed, with progress and, when it trains
    with DP, the privacy check of every run; yields ``(seed, report, wall_s)``."""
    text = with_override(scenario.read_text(encoding="utf-8"), 0, override or {}, scenario)
    plan = parse_scenario(tomllib.loads(text), source=str(scenario))  # with the override
    dp, central = plan.dp, plan.central_dp
    for index, seed in enumerate(seeds):
        log(f"{label}: seed {seed} ({index + 1}/{len(seeds)}) ...")
        report, wall = simulate(scenario, seed, workdir, override)
        if dp.enabled:
            check_privacy(report, dp.cap, seed)
        if central.enabled and central.max_epsilon is not None:
            spent = report.get("central_epsilon")
            if spent is None or not spent <= central.max_epsilon * (1 + 1e-9):
                raise BenchError(f"seed {seed}: central ε {spent} (cap {central.max_epsilon})")
        log(
            f"{label}: seed {seed}: final accuracy {report['final_accuracy']:.2%}, "
            f"ε max {report['epsilon_max']:.4f}, wall {wall:.1f} s"
        )
        yield seed, report, wall


def spread(accuracies: list[float]) -> dict[str, float]:
    """Mean, min and max of the final accuracies over the seeds."""
    return {
        "mean": statistics.fmean(accuracies),
        "min": min(accuracies),
        "max": max(accuracies),
    }


def main_section(options: Options) -> dict[str, Any]:
    """The README's main command over ``options.seeds``."""
    seeds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="utility-bench-") as tmp:
        workdir = options.keep or Path(tmp)
        for seed, report, wall in sweep("main", MAIN_SCENARIO, options.seeds, workdir / "main"):
            seeds[str(seed)] = {
                "final_accuracy": float(report["final_accuracy"]),
                "wall_s": round(wall, 2),
            }
    return {
        "seeds": seeds,
        **spread([row["final_accuracy"] for row in seeds.values()]),
        "wall_s_max": max(row["wall_s"] for row in seeds.values()),
    }


def dp_target_section(options: Options) -> dict[str, Any]:
    """The DP target scenario, as shipped, over ``options.seeds``."""
    seeds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="utility-bench-") as tmp:
        workdir = options.keep or Path(tmp)
        runs = sweep("dp_target", DP_TARGET_SCENARIO, options.seeds, workdir / "dp_target")
        for seed, report, _wall in runs:
            seeds[str(seed)] = {
                "final_accuracy": float(report["final_accuracy"]),
                "epsilon_max": float(report["epsilon_max"]),
            }
    return {"seeds": seeds, **spread([row["final_accuracy"] for row in seeds.values()])}


def levers_section(options: Options) -> list[dict[str, Any]]:
    """Each lever of :data:`LEVERS` (``options.levers``) on ``options.screen_seeds``."""
    chosen = [(name, override) for name, override in LEVERS if name in options.levers]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="utility-bench-") as tmp:
        workdir = options.keep or Path(tmp)
        for index, (name, override) in enumerate(chosen):
            runs = sweep(
                f"levers: {name!r} ({index + 1}/{len(chosen)})",
                DP_TARGET_SCENARIO,
                options.screen_seeds,
                workdir / "levers" / f"lever-{index}",
                merge(override, LEVER_BASE),
            )
            seeds = {str(seed): float(report["final_accuracy"]) for seed, report, _ in runs}
            rows.append(
                {
                    "name": name,
                    "mean": statistics.fmean(seeds.values()),
                    "seeds": seeds,
                    "override": override,
                }
            )
    return rows


Section = Callable[[Options], Any]

SECTIONS: dict[str, Section] = {
    "main": main_section,
    "dp_target": dp_target_section,
    "levers": levers_section,
    "scenarios": scenarios_section,
}


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
    if "dp_target" in result:
        target = result["dp_target"]
        lines.append(f"dp_target ({DP_TARGET_SCENARIO.name}):")
        for seed, row in target["seeds"].items():
            lines.append(
                f"  seed {seed}: final accuracy {row['final_accuracy']:.2%}, "
                f"ε max {row['epsilon_max']:.4f}"
            )
        lines.append(
            f"  mean {target['mean']:.2%}, min {target['min']:.2%}, max {target['max']:.2%}"
        )
    if "levers" in result:
        lines.append(f"levers ({DP_TARGET_SCENARIO.name}, mean over the screening seeds):")
        for row in result["levers"]:
            per_seed = ", ".join(f"seed {k} {v:.2%}" for k, v in row["seeds"].items())
            lines.append(f"  {row['name']}: {row['mean']:.2%} ({per_seed})")
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


def parse_levers(text: str) -> list[str]:
    known = [name for name, _ in LEVERS]
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--levers: unknown lever(s) {unknown or text!r}; choose from: {', '.join(known)}"
        )
    return names


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
        "--screen-seeds",
        type=parse_seeds,
        default=list(SCREEN_SEEDS),
        help="data seeds of the levers section (default 1,2)",
    )
    parser.add_argument(
        "--levers",
        type=parse_levers,
        default=[name for name, _ in LEVERS],
        help="comma-separated levers to run (default: all)",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep each run's scenario copy and report here"
    )
    args = parser.parse_args(argv)
    options = Options(
        seeds=args.seeds, keep=args.keep, screen_seeds=args.screen_seeds, levers=args.levers
    )
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
