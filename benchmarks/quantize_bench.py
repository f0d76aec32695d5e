"""Size, accuracy and single-sample latency of each edge variant, on every runtime.

Runs the real build pipeline (train, prune + fine-tune, convert, quantize, verify) and
times each artifact on ai-edge-litert in this process and on tflite-runtime 2.14 in its
own environment. Torch eager p50 is measured in this same process as the baseline.

    python benchmarks/quantize_bench.py --json

Latency is the runtime's own single-sample cost (set input, invoke, read output) with
the input already in the tensor's dtype, one thread, after 20 warm-up runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgefl.logs import configure_logging
from edgefl.quantize.build import BuildOptions, BuildResult, build_artifacts
from edgefl.quantize.recipes import parse_variants

VARIANTS = "fp32,fp16,int8-wo,int8,int8-dynamic,pruned50-fp32,pruned50-int8"
LITERT = "ai-edge-litert"
TFLITE = "tflite-runtime"


def summarize(result: BuildResult) -> dict[str, Any]:
    """The output contract plus the issue's target ratios."""
    variants: dict[str, Any] = {}
    for v in result.variants:
        checks = v.verified_on
        variants[v.variant] = {
            "size_bytes": v.size_bytes,
            "accuracy": checks[LITERT].accuracy if LITERT in checks else None,
            "accuracy_by_runtime": {k: c.accuracy for k, c in checks.items()},
            "p50_us": {
                LITERT: checks[LITERT].p50_us if LITERT in checks else None,
                TFLITE: checks[TFLITE].p50_us if TFLITE in checks else None,
            },
            "accepted": v.accepted,
            "refused_because": v.reasons,
        }
    out: dict[str, Any] = {
        "model": result.model,
        "dataset": result.dataset,
        "test_samples": result.test_samples,
        "torch_accuracy": result.torch_accuracy,
        "torch_eager_p50_us": result.torch_eager_p50_us,
        "variants": variants,
    }
    fp32, int8, pruned = (variants.get(k) for k in ("fp32", "int8", "pruned50-int8"))
    if fp32 and int8 and pruned:
        ratios = {
            "int8_smaller_than_fp32_x": fp32["size_bytes"] / int8["size_bytes"],
            "int8_accuracy_drop_points": (fp32["accuracy"] - int8["accuracy"]) * 100,
            "litert_int8_p50_over_fp32": int8["p50_us"][LITERT] / fp32["p50_us"][LITERT],
            "litert_fp32_speedup_vs_torch_x": result.torch_eager_p50_us / fp32["p50_us"][LITERT],
            "pruned50_int8_smaller_than_fp32_x": fp32["size_bytes"] / pruned["size_bytes"],
            "pruned50_int8_accuracy_drop_points": (fp32["accuracy"] - pruned["accuracy"]) * 100,
        }
        out["ratios"] = ratios
        out["targets_met"] = {
            "int8_size": ratios["int8_smaller_than_fp32_x"] >= 3.5,
            "int8_accuracy": ratios["int8_accuracy_drop_points"] <= 1.0,
            "int8_latency": ratios["litert_int8_p50_over_fp32"] <= 0.6,
            "fp32_vs_torch": ratios["litert_fp32_speedup_vs_torch_x"] >= 5.0,
            "pruned_size": ratios["pruned50_int8_smaller_than_fp32_x"] >= 8.0,
            "pruned_accuracy": ratios["pruned50_int8_accuracy_drop_points"] <= 1.5,
        }
    return out


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--iters", type=int, default=500, help="timed runs per runtime")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    configure_logging("ERROR")

    def progress(what: str, done: int) -> None:
        print(f"[{done}] {what}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        opts = BuildOptions(
            model=args.model,
            variants=parse_variants(args.variants),
            out=Path(tmp) / "out",
            bench_iters=args.iters,
        )
        summary = summarize(build_artifacts(opts, progress))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['model']}: torch eager p50 {summary['torch_eager_p50_us']:.1f} µs")
    for name, v in summary["variants"].items():
        lat = ", ".join(
            f"{k} {t:.1f} µs" if t is not None else f"{k} n/a" for k, t in v["p50_us"].items()
        )
        state = "" if v["accepted"] else "  REFUSED"
        print(f"  {name:<14} {v['size_bytes']:>8} B  acc {v['accuracy']:.2%}  {lat}{state}")
    for key, value in summary.get("ratios", {}).items():
        print(f"  {key}: {value:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
