"""Security probe: every known attack on a deployment, tried against real processes.

Run from the repository root with the venv active::

    python benchmarks/security_probe.py --json [--only control_plane,ingest] [--keep DIR]

Each area lives in ``benchmarks/probes/<area>.py`` and exposes
``run_probes(workdir) -> dict``: it starts what it attacks (mosquitto with the shipped
config, the SuperLink behind its proxy, the ingest, the inference service, ...) on
loopback or in network namespaces it creates, plays the attacker with only what a device
or an outsider holds (a device's certificate and key, or the public CA certificate), and
returns ``{NAME: {"held": bool, "detail": str}}`` (or ``{"attacks": {...},
"honest_devices": {...}}`` for the area that measures the honest devices under a flood).
The ``tests/security/`` suite runs the same attacks as tests.

One JSON object goes to stdout::

    {"attacks": {NAME: {"held": bool, "detail": str}},
     "honest_devices": {"sent": int, "stored": int, "duplicate_rows": int, "p99_lag_s": float}}

An area that crashes reports each of its attacks as not held, with the error as detail,
so a broken probe never reads as a defence. The exit code is 0 when every attack held, 1
otherwise. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

AREAS: dict[str, tuple[str, ...]] = {
    "control_plane": ("control_api_from_outside", "rogue_node_reply"),
    "device_trust": ("untrusted_app_on_device",),
    "broker": (
        "clientid_takeover_ingest",
        "clientid_takeover_device",
        "device_writes_own_desired_state",
        "readmit_old_tls_key",
        "oversized_payload",
    ),
    "ingest": (
        "poison_seq_digits",
        "poison_surrogate",
        "retained_poison",
        "outbox_reset",
        "fleet_spoof",
    ),
    "reported_state": ("reported_state_forgery", "reported_state_flood"),
    "small": ("inference_huge_shape", "inference_oversized_batch", "run_id_dot"),
}
"""Probe module under ``benchmarks/probes/`` -> the attack names it must report."""

EMPTY_HONEST: dict[str, Any] = {"sent": 0, "stored": 0, "duplicate_rows": 0, "p99_lag_s": None}


def _progress(text: str) -> None:
    print(f"[security-probe] {text}", file=sys.stderr, flush=True)


def run_area(area: str, workdir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Run one area's probes; a crash or a missing name reports as not held."""
    expected = AREAS[area]
    try:
        module = importlib.import_module(f"probes.{area}")
        result: dict[str, Any] = module.run_probes(workdir)
    except Exception as exc:  # a broken probe must read as "not shown to hold"
        detail = f"probe crashed: {type(exc).__name__}: {exc}"
        _progress(f"{area}: {detail}\n{traceback.format_exc()}")
        return {name: {"held": False, "detail": detail} for name in expected}, None
    honest = result.pop("honest_devices", None)
    attacks = result.pop("attacks", result)
    out: dict[str, dict[str, Any]] = {}
    for name, value in attacks.items():
        out[str(name)] = {"held": bool(value.get("held")), "detail": str(value.get("detail", ""))}
    for name in expected:
        out.setdefault(name, {"held": False, "detail": "the probe did not report this attack"})
    return out, honest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--only", default="", help="comma-separated areas: " + ",".join(AREAS))
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    areas = [a for a in args.only.split(",") if a] or list(AREAS)
    unknown = sorted(set(areas) - set(AREAS))
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(AREAS)}")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(ROOT))
    base = args.keep or Path(tempfile.mkdtemp(prefix="edgefl-probe-"))
    base.mkdir(parents=True, exist_ok=True)
    attacks: dict[str, dict[str, Any]] = {}
    honest: dict[str, Any] = dict(EMPTY_HONEST)
    try:
        for area in areas:
            _progress(f"{area}: running")
            started = time.monotonic()
            workdir = base / area
            workdir.mkdir(exist_ok=True)
            found, area_honest = run_area(area, workdir)
            attacks.update(found)
            if area_honest is not None:
                honest = area_honest
            held = sum(1 for v in found.values() if v["held"])
            _progress(f"{area}: {held}/{len(found)} held in {time.monotonic() - started:.0f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    doc = {"attacks": dict(sorted(attacks.items())), "honest_devices": honest}
    if args.json:
        print(json.dumps(doc))
    else:
        for name, value in doc["attacks"].items():
            mark = "held  " if value["held"] else "BROKEN"
            print(f"{mark} {name}: {value['detail']}")
        print(f"honest devices: {json.dumps(honest)}")
    return 0 if all(v["held"] for v in attacks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
