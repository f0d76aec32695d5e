"""Releases: a federated run's checkpoint made into signed, verified ``.tflite`` variants.

``edgefl server release --run RUN_ID`` (:func:`create_release`):

1. reads the run's plan and the final (or a named) round's checkpoint from the registry
   and rebuilds the zoo model with those weights;
2. builds the variants with the model toolkit (:func:`edgefl.quantize.build.build_artifacts`:
   conversion, recipes, pruning with fine-tuning) and verifies each on every device runtime
   available here against the checkpoint's torch reference, with golden vectors;
3. records a release in the registry under the model's next version, with the privacy
   guarantee the weights carry (from the run's privacy ledger and plan);
4. writes each variant as ``<releases dir>/<model>/<version>/<variant>.tflite`` with its
   manifest ``<variant>.manifest.json`` (the layout the delivery service serves,
   :func:`edgefl.server.models_service.release_paths`), whose ``release`` block (model,
   version, variant, device class, runtime, created and expiry times, run, round, privacy)
   is signed with the server's current release-signing key (:func:`edgefl.releasesign.sign`).

Data (``--calibration``): ``held-out`` is the plan's held-out split (the one the server
evaluated each round on, never trained on), split in two halves with the plan's seed: one
calibrates the int8 recipes and fine-tunes pruned models, the other is the evaluation and
golden set. A real server often holds no device data: ``synthetic`` calibrates on generated
inputs (uniform in [0, 1], the range of the bundled image datasets) and ``none`` calibrates
on nothing; both verify on generated inputs labelled with the float model's own answers, so
they measure agreement with the float model, not accuracy (``accuracy`` is then None).
Pruned variants need labelled data to be fine-tuned, so they come only with ``held-out``;
``none`` offers only the recipes that need no calibration (fp32, fp16, weight-only int8,
onnx, onnx-int8).
A default recipe list is narrowed to what the data allows and the output says so; a
recipe named explicitly that the data does not allow is an error.

Accuracy gate (``--max-accuracy-drop``, default :data:`DEFAULT_MAX_ACCURACY_DROP` points,
also ``models.max_accuracy_drop`` in server.yaml): verification holds each variant to its
own torch reference (a pruned variant: the pruned, fine-tuned model), which says nothing
of what pruning itself cost. So, with labelled data, each verified variant's accuracy
(its lowest over the runtimes) is also measured against the float model's on the same
evaluation set; a variant more than the limit below it is left out of the release with
reason ``accuracy_drop``: no file, and its ``release_variants`` row (measurements kept,
``path`` empty) says why, while the others are published. The unpruned ``fp32`` variant
is the float model converted and is always kept when it verifies (and so is ``onnx``, the
float model exported to ONNX). When every variant is left out, nothing is published and
the release is ``failed`` with those reasons. Without labelled data (``synthetic``,
``none``) there is no accuracy to compare: the gate is not applied, and the output says so.

Failure: a release is all or nothing. When any variant fails verification nothing is
published (no files) and the release is recorded as ``failed`` with the reasons. Recording
it (rather than nothing) keeps the audit trail of who tried to release what and why it
was refused; it takes a version number, so versions are never reused and a failed version
is never on any device. The command exits 6 (:class:`~edgefl.errors.VerificationError`).

The version is taken (in one transaction, under the unique ``(model, version)`` key) only
after the build, and the release row says ``failed`` ("interrupted") until its files are
in place: the version folder is written beside its final name and moved there with one
rename, so a reader never sees half a release, and a crash leaves no ``published`` row
without its files. The reverse, files with no ``published`` row (a crash between the
rename and the row's update), is not a release: ``edgefl server deploy`` refuses it
(:mod:`edgefl.server.rollout`).

Runtime: each variant's manifest names one ``runtime``, the key a device's configured
runtime must equal; the variants are verified on every runtime available here, and the
release is for ``--runtime`` (default: the most preferred of those, ``ai-edge-litert``).

Jetson: the ``onnx`` variant (in the default list whenever the ONNX exporter and
onnxruntime are installed; ``onnx-int8`` and ``prunedNN-onnx`` on request) is the float
model exported to ONNX and verified on ``onnxruntime`` with the same golden vectors. Its
manifest names device class ``--onnx-device-class`` (default ``jetson``) and runtime
``onnxruntime``, so only a device configured that way installs it. It is kept, like every
artifact, in the delivery layout's ``<variant>.tflite`` file name: the bytes are ONNX, and a
runtime checks what it loads, not the name.
"""

from __future__ import annotations

import getpass
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefl.errors import BadInputError, ConfigError, EdgeflError, RuntimeUnavailableError
from edgefl.files import check_safe_name, fsync_dir, write_bytes_atomic
from edgefl.manifest import PrivacyGuarantee, ReleaseInfo
from edgefl.server.registry.db import display_url, make_engine, session_factory, upgrade
from edgefl.server.registry.models import (
    FlCheckpoint,
    FlRound,
    FlRun,
    PrivacyLedgerEntry,
    Release,
    ReleaseVariant,
)

if TYPE_CHECKING:
    from torch import nn

    from edgefl.datasets import Dataset
    from edgefl.federation import FederationPlan
    from edgefl.quantize.build import BuildResult, VariantResult
    from edgefl.quantize.recipes import Variant

__all__ = [
    "ACCURACY_DROP",
    "CALIBRATION_SOURCES",
    "DEFAULT_DEVICE_CLASS",
    "DEFAULT_EXPIRES_DAYS",
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_RECIPES",
    "Calibration",
    "ReleaseOutcome",
    "ReleaseRequest",
    "accuracy_gate",
    "create_release",
    "list_releases",
    "select_variants",
]

logger = logging.getLogger(__name__)

Calibration = Literal["held-out", "synthetic", "none"]
CALIBRATION_SOURCES: Final = get_args(Calibration)
DEFAULT_RECIPES: Final = ("fp32", "int8", "pruned50-int8", "onnx")
"""Variants built when ``--recipes`` is not given (narrowed to what the data and the
installed toolkit allow)."""
DEFAULT_DEVICE_CLASS: Final = "generic"
ONNX_DEVICE_CLASS: Final = "jetson"
"""The device class of the ONNX variants unless ``--onnx-device-class`` says otherwise."""
ONNX_RUNTIME: Final = "onnxruntime"
DEFAULT_EXPIRES_DAYS: Final = 90.0
DEFAULT_MAX_ACCURACY_DROP: Final = 1.5
"""Accuracy points a variant may lose against the float model and still be published."""
ACCURACY_DROP: Final = "accuracy_drop"
"""The reason a variant the accuracy gate left out carries (first word of its reason)."""
FLOAT_VARIANT: Final = "fp32"
"""The float model converted: never left out by the accuracy gate."""
FLOAT_VARIANTS: Final = (FLOAT_VARIANT, "onnx")
"""The float model converted to each format (``.tflite``, ``.onnx``): never gated."""
SYNTHETIC_SAMPLES: Final = 512
"""Generated inputs for ``synthetic`` and ``none``: half calibrate, half verify."""

Progress = Callable[[str, int], None]  # (step just done, steps done so far)


@dataclass(frozen=True)
class ReleaseRequest:
    """What ``edgefl server release`` was asked to do.

    Attributes:
        run_id: The federated run.
        round: The round whose checkpoint to release (None: the run's last one).
        recipes: Variant names (``int8``, ``pruned50-int8``...); None: :data:`DEFAULT_RECIPES`.
        calibration: Where calibration and verification data come from.
        device_class: The device class the variants are for.
        runtime: The runtime the variants are for (None: the preferred verified one).
        expires_days: How long the signatures stay valid.
        by: The operator's name, recorded beside the OS user.
        bench_iters: Single-sample runs timed per runtime and variant.
        max_accuracy_drop: Accuracy points a variant may lose against the float model
            (labelled data only); one that loses more is left out of the release.
        onnx_device_class: The device class the ONNX variants are for.
    """

    run_id: str
    round: int | None = None
    recipes: Sequence[str] | None = None
    calibration: Calibration = "held-out"
    device_class: str = DEFAULT_DEVICE_CLASS
    runtime: str | None = None
    expires_days: float = DEFAULT_EXPIRES_DAYS
    by: str | None = None
    bench_iters: int = 100
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    onnx_device_class: str = ONNX_DEVICE_CLASS


@dataclass
class ReleaseOutcome:
    """A recorded release: what ``--json`` prints and ``releases`` lists."""

    id: int
    model: str
    version: int
    status: str
    run_id: str
    round: int
    plan_hash: str
    privacy: dict[str, Any]
    calibration: str
    float_accuracy: float | None
    device_class: str
    key_id: str | None
    created_by: str
    created_at: str
    expires_at: str
    reasons: list[str]
    variants: dict[str, dict[str, Any]]
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    max_accuracy_drop: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "status": self.status,
            "run_id": self.run_id,
            "round": self.round,
            "plan_hash": self.plan_hash,
            "privacy": self.privacy,
            "calibration": self.calibration,
            "float_accuracy": self.float_accuracy,
            "device_class": self.device_class,
            "key_id": self.key_id,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "reasons": self.reasons,
            "variants": self.variants,
            "path": self.path,
            "notes": self.notes,
            "max_accuracy_drop": self.max_accuracy_drop,
        }


# --- what to build, from which data ------------------------------------------------------


def select_variants(
    names: Sequence[str] | None, calibration: Calibration
) -> tuple[list[Variant], list[str]]:
    """The variants to build and notes on what the data left out.

    Raises:
        UnknownRecipeError: A name is malformed or names no recipe.
        BadInputError: An explicitly named variant needs data ``calibration`` does not give.
    """
    from edgefl.quantize.recipes import get_recipe, parse_variants

    explicit = names is not None
    variants = parse_variants(",".join(names if names is not None else DEFAULT_RECIPES))
    keep: list[Variant] = []
    notes: list[str] = []
    onnx_missing = _onnx_missing() if any(_is_onnx(v.recipe) for v in variants) else None
    for variant in variants:
        why = None
        if onnx_missing is not None and _is_onnx(variant.recipe):
            if explicit:
                raise RuntimeUnavailableError(
                    f"variant {variant.name} cannot be built here: {onnx_missing}",
                    hint="a server that makes ONNX variants needs pip install "
                    "'edgefl[server,quantize]'",
                )
            why = onnx_missing
        elif variant.prune_ratio is not None and calibration != "held-out":
            why = "pruning is fine-tuned on labelled data, which only --calibration held-out gives"
        elif calibration == "none" and get_recipe(variant.recipe).needs_calibration:
            why = "its recipe needs calibration data and --calibration is none"
        if why is None:
            keep.append(variant)
        elif explicit:
            raise BadInputError(
                f"variant {variant.name} cannot be built: {why}",
                hint="with --calibration none use fp32, fp16, int8-wo or onnx; with synthetic, "
                "unpruned variants; or use --calibration held-out",
            )
        else:
            notes.append(f"{variant.name} left out: {why}")
    if not keep:
        raise BadInputError("no variant can be built from this data", hint="name --recipes")
    if calibration == "none":
        notes.append(
            "no calibration data: only recipes that need none are offered "
            "(fp32, fp16, int8-wo, onnx, onnx-int8); verified on generated inputs against "
            "the float model"
        )
    elif calibration == "synthetic":
        notes.append(
            "synthetic calibration: int8 calibrated and verified on generated inputs; "
            "agreement with the float model is checked, accuracy is not measured"
        )
    return keep, notes


def _is_onnx(recipe: str) -> bool:
    from edgefl.quantize.recipes import get_recipe

    return get_recipe(recipe).artifact_format == "onnx"


def _onnx_missing() -> str | None:
    """Why ONNX variants cannot be built and verified here, or None when they can."""
    import importlib.util

    from edgefl.runtimes import available_runtimes

    if importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnx") is None:
        return "torch's ONNX exporter needs the onnx and onnxscript packages"
    if ONNX_RUNTIME not in available_runtimes():
        return "onnxruntime, which verifies ONNX variants, is not installed"
    return None


def _held_out(plan: FederationPlan) -> Dataset:
    """The plan's held-out split, halved: calibration/fine-tuning and evaluation."""
    from edgefl.datasets import Dataset, load_dataset

    data = load_dataset(plan.dataset, test_fraction=plan.test_fraction, seed=plan.seed)
    order = np.random.default_rng(plan.seed).permutation(len(data.x_test))
    half = len(order) // 2
    if half < 1:
        raise BadInputError(f"the held-out split of {plan.dataset} is too small to calibrate")
    cal, ev = order[:half], order[half:]
    return Dataset(
        name=f"{plan.dataset} (held-out)",
        x_train=data.x_test[cal],
        y_train=data.y_test[cal],
        x_test=data.x_test[ev],
        y_test=data.y_test[ev],
        num_classes=data.num_classes,
    )


def _synthetic(model: nn.Module, input_shape: tuple[int, ...], classes: int, seed: int) -> Dataset:
    """Generated inputs in [0, 1], labelled with the float model's answers."""
    import torch

    from edgefl.datasets import Dataset
    from edgefl.training import predict_logits

    rng = np.random.default_rng(seed)
    x = rng.random((SYNTHETIC_SAMPLES, *input_shape), dtype=np.float32)
    with torch.no_grad():
        y = predict_logits(model, x).argmax(1).astype(np.int64)
    half = SYNTHETIC_SAMPLES // 2
    return Dataset(
        name="synthetic",
        x_train=x[:half],
        y_train=y[:half],
        x_test=x[half:],
        y_test=y[half:],
        num_classes=classes,
    )


# --- the run's model and guarantee ---------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    run_id: str
    round: int
    plan: FederationPlan
    plan_hash: str
    model: nn.Sequential
    privacy: PrivacyGuarantee


def _model_from_checkpoint(name: str, blob: bytes) -> nn.Sequential:
    import torch

    from edgefl.zoo import build_model

    model = build_model(name, seed=0)
    keys = list(model.state_dict())
    try:
        with np.load(io.BytesIO(blob)) as arrays:
            state = {k: torch.from_numpy(np.asarray(arrays[k])) for k in keys}
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise EdgeflError(
            f"the checkpoint does not hold {name}'s weights: {str(exc).splitlines()[0]}",
            hint="release a run made by this edgefl version",
        ) from exc
    return model.eval()


def _privacy(session: Session, run_id: str, rnd: int, plan: FederationPlan) -> PrivacyGuarantee:
    """The guarantee the checkpoint of round ``rnd`` carries.

    Local DP (DP-SGD on the devices; also when central DP is on top): the largest
    per-device ε of the run up to that round, from the privacy ledger. Central DP only:
    the server's accountant's ε after that round.
    """
    if plan.dp.enabled:
        eps, delta = session.execute(
            select(func.max(PrivacyLedgerEntry.epsilon_total), func.max(PrivacyLedgerEntry.delta))
            .where(PrivacyLedgerEntry.run_id == run_id)
            .where(PrivacyLedgerEntry.round <= rnd)
        ).one()
        return PrivacyGuarantee(
            epsilon_max=None if eps is None else float(eps),
            delta=float(delta) if delta is not None else plan.dp.delta,
            mode="local",
        )
    if plan.central_dp.enabled:
        row = session.get(FlRound, (run_id, rnd))
        central = row.central_epsilon if row is not None else None
        return PrivacyGuarantee(epsilon_max=central, delta=plan.central_dp.delta, mode="central")
    return PrivacyGuarantee(epsilon_max=None, delta=None, mode="none")


def _source(session: Session, run_id: str, rnd: int | None) -> _Source:
    from edgefl.federation import load_plan

    run = session.get(FlRun, run_id)
    if run is None:
        raise BadInputError(
            f"no federated run {run_id!r} in the registry",
            hint="check --run, and that -c/--db-url name the registry the run was recorded in",
        )
    rounds = list(
        session.scalars(
            select(FlCheckpoint.round).where(FlCheckpoint.run_id == run_id).order_by("round")
        )
    )
    if not rounds:
        raise BadInputError(f"run {run_id!r} has no committed round yet: nothing to release")
    chosen = rnd if rnd is not None else run.rounds_done
    checkpoint = session.get(FlCheckpoint, (run_id, chosen))
    if checkpoint is None:
        raise BadInputError(
            f"run {run_id!r} has no checkpoint of round {chosen}",
            hint=f"rounds with a checkpoint: {', '.join(map(str, rounds))}",
        )
    if rnd is None and run.status == "running":
        logger.warning("run %s is still running: releasing its round %d", run_id, chosen)
    plan = load_plan(json.loads(run.plan_json), source=f"run {run_id}")
    return _Source(
        run_id=run_id,
        round=chosen,
        plan=plan,
        plan_hash=run.plan_key,
        model=_model_from_checkpoint(plan.model_name, checkpoint.model),
        privacy=_privacy(session, run_id, chosen, plan),
    )


# --- files ---------------------------------------------------------------------------------


def _created_by(by: str | None) -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry and no $USER (containers)
        user = f"uid {os.getuid()}"
    return f"{by} (os user {user})" if by else user


def _iso(moment: datetime) -> str:
    # SQLite gives naive datetimes back; they mean UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


# --- the accuracy gate ---------------------------------------------------------------------


def accuracy_gate(
    variants: Sequence[VariantResult], float_accuracy: float, limit: float
) -> dict[str, str]:
    """The verified variants the accuracy gate leaves out: variant -> reason.

    A variant's accuracy is its lowest over the runtimes it was verified on; one more than
    ``limit`` points below ``float_accuracy`` (the float model's, on the same evaluation
    set) is left out, with a reason starting :data:`ACCURACY_DROP`. The unpruned ``fp32``
    variant (the float model converted) never is; refused variants are not looked at.
    """
    gated: dict[str, str] = {}
    for v in variants:
        if not v.accepted or not v.verified_on or v.variant in FLOAT_VARIANTS:
            continue
        accuracy = min(c.accuracy for c in v.verified_on.values())
        drop = (float_accuracy - accuracy) * 100.0
        if drop > limit + 1e-6:  # a drop that prints as the limit is within it
            gated[v.variant] = (
                f"{ACCURACY_DROP}: {drop:.2f} points below the float model "
                f"({accuracy:.1%} against {float_accuracy:.1%}; the limit is {limit:g})"
            )
    return gated


def _variant_status(row: ReleaseVariant) -> str:
    """A variant row's status: ``published``, ``failed``, ``accuracy_drop`` or ``verified``.

    ``failed``: verification refused it; ``accuracy_drop``: the accuracy gate left it out;
    ``verified``: it passed, but its release was not published.
    """
    if row.path:
        return "published"
    if not row.passed:
        return "failed"
    if any(str(r).startswith(ACCURACY_DROP) for r in json.loads(row.reasons_json)):
        return ACCURACY_DROP
    return "verified"


# --- the release -----------------------------------------------------------------------------


def _variant_rows(
    result: BuildResult,
    built: Path,
    labelled: bool,
    targets: dict[str, tuple[str, str]],
    gated: dict[str, str],
) -> list[ReleaseVariant]:
    from edgefl.manifest import read_manifest

    rows: list[ReleaseVariant] = []
    for v in result.variants:
        sha = ""
        if v.artifact is not None:
            sha = read_manifest(built / Path(v.artifact).with_suffix(".manifest.json").name).sha256
        checks = list(v.verified_on.values())
        rows.append(
            ReleaseVariant(
                variant=v.variant,
                recipe=v.recipe,
                prune_ratio=v.prune_ratio,
                sha256=sha,
                size_bytes=v.size_bytes,
                accuracy=min(c.accuracy for c in checks) if labelled and checks else None,
                float_accuracy=checks[0].reference_accuracy if labelled and checks else None,
                latency_json=json.dumps({c.runtime: c.p50_us for c in checks}, sort_keys=True),
                device_class=targets[v.variant][0],
                runtime=targets[v.variant][1],
                path=None,
                passed=v.accepted,
                reasons_json=json.dumps([gated[v.variant]] if v.variant in gated else v.reasons),
            )
        )
    return rows


def _allocate(
    sessions: sessionmaker[Session],
    make_release: Callable[[], Release],
    make_rows: Callable[[], list[ReleaseVariant]],
    attempts: int = 5,
) -> Release:
    """Insert a release (and its variant rows) under the model's next version.

    The unique ``(model, version)`` key refuses a version another process took at the
    same moment; then the next one is tried, with fresh rows.
    """
    for attempt in range(attempts):
        release, rows = make_release(), make_rows()
        try:
            with sessions.begin() as session:
                top = session.scalar(
                    select(func.max(Release.version)).where(Release.model == release.model)
                )
                release.version = int(top or 0) + 1
                session.add(release)
                session.flush()
                for row in rows:
                    row.release_id = release.id
                    session.add(row)
            return release
        except IntegrityError:
            if attempt == attempts - 1:
                raise
            logger.info("version %d of %s was just taken; retrying", release.version, release.model)
    raise AssertionError("unreachable")


def _publish_files(
    variants: Sequence[VariantResult],
    built: Path,
    releases: Path,
    release: Release,
    targets: dict[str, tuple[str, str]],
    privacy: PrivacyGuarantee,
    signing: tuple[str, Any],
    created: int,
    expires: int,
) -> dict[str, tuple[str, str]]:
    """Sign every manifest and move the version folder into place; returns variant -> paths."""
    from edgefl.manifest import read_manifest
    from edgefl.releasesign import sign
    from edgefl.server.models_service import release_paths

    # The layout the delivery service serves: <releases>/<model>/<version>/<variant>.*
    paths = {
        v.variant: release_paths(releases, release.model, release.version, v.variant)
        for v in variants
    }
    final = next(iter(paths.values()))[0].parent
    if final.exists():
        raise ConfigError(
            f"{final} already exists, but the registry has no release {release.model} "
            f"version {release.version}",
            hint="the registry and the releases folder disagree (was the registry reset?); "
            "move that folder away and release again",
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{release.version}.staging-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp's 0700: releases are public, the delivery service reads them
    _, key = signing
    out: dict[str, tuple[str, str]] = {}
    try:
        for v in variants:
            assert v.artifact is not None  # a published release has only accepted variants
            source = built / v.artifact
            manifest = read_manifest(source.with_suffix(".manifest.json"))
            info = ReleaseInfo(
                model=release.model,
                version=release.version,
                variant=v.variant,
                device_class=targets[v.variant][0],
                runtime=targets[v.variant][1],
                created_at=created,
                expires_at=expires,
                run_id=release.run_id,
                round=release.round,
                privacy=privacy,
            )
            artifact, manifest_path = paths[v.variant]
            signed = sign(
                manifest.model_copy(update={"artifact": artifact.name, "release": info}), key
            )
            write_bytes_atomic(staging / artifact.name, source.read_bytes(), mode=0o644)
            write_bytes_atomic(
                staging / manifest_path.name, signed.to_json().encode("utf-8"), mode=0o644
            )
            out[v.variant] = (
                str(artifact.relative_to(releases)),
                str(manifest_path.relative_to(releases)),
            )
        os.replace(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def create_release(
    db_url: str,
    releases: Path,
    ca_dir: Path,
    request: ReleaseRequest,
    progress: Progress | None = None,
) -> ReleaseOutcome:
    """Build, verify, record, sign and publish one release (see the module docstring).

    Args:
        db_url: The registry holding the run.
        releases: The releases folder (``<state_dir>/releases``).
        ca_dir: The fleet CA folder, holding the release-signing keys.
        request: What to release.
        progress: Called after each long step.

    Returns:
        The recorded release; ``status`` is ``failed`` (nothing published, ``reasons``
        says why) when a variant failed verification or the accuracy gate left every
        variant out. Variants the gate left out have the status ``accuracy_drop``.

    Raises:
        BadInputError: No such run or round, or variants the data cannot build.
        ConfigError: No release-signing key, or the registry cannot be used.
        RuntimeUnavailableError: No device runtime to verify on, or not ``runtime``.
        EdgeflError: The build itself failed (conversion); nothing is recorded then.
    """
    try:
        from edgefl.quantize.build import BuildOptions, build_artifacts
        from edgefl.quantize.verify import resolve_targets
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"the model toolkit cannot be imported here: {exc}",
            hint="a server that makes releases needs pip install 'edgefl[server,quantize]'",
        ) from exc
    from edgefl.server.release_keys import current_signing_key
    from edgefl.zoo import get_spec

    if request.calibration not in CALIBRATION_SOURCES:
        raise BadInputError(
            f"unknown calibration {request.calibration!r}",
            hint=f"one of: {', '.join(CALIBRATION_SOURCES)}",
        )
    if request.expires_days <= 0:
        raise BadInputError("--expires-days must be > 0")
    if not request.max_accuracy_drop >= 0:
        raise BadInputError(
            f"--max-accuracy-drop must be >= 0 accuracy points, got {request.max_accuracy_drop}"
        )
    check_safe_name(request.device_class, "device class")
    check_safe_name(request.onnx_device_class, "ONNX device class")
    variants, notes = select_variants(request.recipes, request.calibration)
    tflite = [v for v in variants if not _is_onnx(v.recipe)]
    targets = resolve_targets(None) if tflite else []
    runtime = request.runtime or (targets[0] if targets else ONNX_RUNTIME)
    if tflite and runtime not in targets:
        raise BadInputError(
            f"runtime {runtime!r} is not one the variants are verified on here",
            hint=f"verified on: {', '.join(targets)}",
        )
    # Fail before the long build when the server cannot sign.
    signing = current_signing_key(ca_dir)

    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    steps = 0

    def step(what: str) -> None:
        nonlocal steps
        steps += 1
        logger.info("%s", what)
        if progress is not None:
            progress(what, steps)

    try:
        try:
            with sessions() as session:
                src = _source(session, request.run_id, request.round)
        except SQLAlchemyError as exc:
            raise ConfigError(f"cannot read the registry {display_url(db_url)}: {exc}") from exc
        spec = get_spec(src.plan.model_name)
        step(f"loaded {spec.name} from run {src.run_id} round {src.round}")
        labelled = request.calibration == "held-out"
        data = (
            _held_out(src.plan)
            if labelled
            else _synthetic(src.model, spec.input_shape, spec.num_classes, src.plan.seed)
        )
        releases.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=releases) as tmp:
            built = Path(tmp) / "variants"
            result = build_artifacts(
                BuildOptions(
                    model=spec.name,
                    variants=variants,
                    out=built,
                    runtimes=targets,
                    seed=src.plan.seed,
                    bench_iters=request.bench_iters,
                    base_model=src.model,
                    data=data,
                ),
                progress=lambda what, _done: step(what),
            )
            now = datetime.now(UTC).replace(microsecond=0)
            created = int(now.timestamp())
            expires = created + int(request.expires_days * 86400)
            reasons = [f"{v.variant}: {r}" for v in result.refused for r in v.reasons]
            gated = (
                accuracy_gate(result.variants, result.torch_accuracy, request.max_accuracy_drop)
                if labelled
                else {}
            )
            publish = [v for v in result.variants if v.accepted and v.variant not in gated]
            if not reasons and not publish:
                reasons = [f"{name}: {why}" for name, why in gated.items()]
            if labelled:
                rule = (
                    f"accuracy gate (--max-accuracy-drop {request.max_accuracy_drop:g} points "
                    "below the float model; fp32 is always kept)"
                )
                notes.append(
                    f"{rule}: left out {', '.join(gated)}"
                    if gated
                    else f"{rule}: every verified variant is within it"
                )
            else:
                notes.append(
                    "accuracy gate not applied: without labelled data (--calibration "
                    "held-out) no variant's accuracy is measured"
                )
            by = _created_by(request.by)
            # Each variant's device class and runtime (the ONNX ones are for Jetsons).
            variant_targets = {
                v.variant: (request.onnx_device_class, ONNX_RUNTIME)
                if _is_onnx(v.recipe)
                else (request.device_class, runtime)
                for v in result.variants
            }
            failure = reasons or ["interrupted before its files were published"]

            def make_release() -> Release:
                return Release(
                    model=spec.name,
                    version=0,
                    run_id=src.run_id,
                    round=src.round,
                    plan_hash=src.plan_hash,
                    epsilon_max=src.privacy.epsilon_max,
                    delta=src.privacy.delta,
                    dp_mode=src.privacy.mode,
                    calibration=request.calibration,
                    float_accuracy=result.torch_accuracy if labelled else None,
                    device_class=request.device_class,
                    key_id=None,
                    created_by=by,
                    created_at=now,
                    expires_at=datetime.fromtimestamp(expires, UTC),
                    status="failed",
                    reasons_json=json.dumps(failure),
                )

            def make_rows() -> list[ReleaseVariant]:
                # A failed release keeps its variants' measurements and reasons; a
                # published one gets its rows with their paths once the files are there.
                if not reasons:
                    return []
                return _variant_rows(result, built, labelled, variant_targets, gated)

            release = _allocate(sessions, make_release, make_rows)
            rows = _variant_rows(result, built, labelled, variant_targets, gated)
            limit = request.max_accuracy_drop if labelled else None
            if reasons:
                step(f"refused: {spec.name} version {release.version} is not published")
                return _outcome(release, rows, None, notes, limit)
            try:
                paths = _publish_files(
                    publish,
                    built,
                    releases,
                    release,
                    variant_targets,
                    src.privacy,
                    signing,
                    created,
                    expires,
                )
            except (OSError, EdgeflError) as exc:
                with sessions.begin() as session:
                    row = session.get(Release, release.id)
                    if row is not None:
                        row.reasons_json = json.dumps([f"writing its files failed: {exc}"])
                raise
            with sessions.begin() as session:
                row = session.get(Release, release.id)
                assert row is not None
                row.status = "published"
                row.key_id = signing[0]
                row.reasons_json = "[]"
                for variant_row in rows:
                    variant_row.release_id = row.id
                    # A variant the gate left out keeps its row, without a path.
                    published = paths.get(variant_row.variant)
                    variant_row.path = published[0] if published else None
                    session.add(variant_row)
                session.flush()
                release = row
                step(f"published {spec.name} version {row.version}")
                folder = releases / next(iter(paths.values()))[0]
                return _outcome(row, rows, str(folder.parent), notes, limit)
    finally:
        engine.dispose()


def _outcome(
    release: Release,
    rows: Sequence[ReleaseVariant],
    path: str | None,
    notes: list[str],
    max_accuracy_drop: float | None = None,
) -> ReleaseOutcome:
    float_accuracy = release.float_accuracy
    return ReleaseOutcome(
        id=release.id,
        model=release.model,
        version=release.version,
        status=release.status,
        run_id=release.run_id,
        round=release.round,
        plan_hash=release.plan_hash,
        privacy={
            "epsilon_max": release.epsilon_max,
            "delta": release.delta,
            "mode": release.dp_mode,
        },
        calibration=release.calibration,
        float_accuracy=release.float_accuracy,
        device_class=release.device_class,
        key_id=release.key_id,
        created_by=release.created_by,
        created_at=_iso(release.created_at),
        expires_at=_iso(release.expires_at),
        reasons=list(json.loads(release.reasons_json)),
        variants={
            r.variant: {
                "recipe": r.recipe,
                "prune_ratio": r.prune_ratio,
                "sha256": r.sha256,
                "size_bytes": r.size_bytes,
                "accuracy": r.accuracy,
                "float_accuracy": r.float_accuracy,
                "latency_us": json.loads(r.latency_json),
                "device_class": r.device_class,
                "runtime": r.runtime,
                "path": r.path,
                "passed": r.passed,
                "status": _variant_status(r),
                # Points below the float model (the accuracy gate's measure).
                "accuracy_drop": (
                    None
                    if r.accuracy is None or float_accuracy is None
                    else round((float_accuracy - r.accuracy) * 100.0, 4)
                ),
                "reasons": json.loads(r.reasons_json),
            }
            for r in rows
        },
        path=path,
        notes=notes,
        max_accuracy_drop=max_accuracy_drop,
    )


def list_releases(db_url: str, *, model: str | None = None) -> list[ReleaseOutcome]:
    """Every recorded release (published and failed), by model then version.

    Raises:
        ConfigError: The registry cannot be opened or read.
    """
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            query = select(Release).order_by(Release.model, Release.version)
            if model is not None:
                query = query.where(Release.model == model)
            releases = list(session.scalars(query))
            variants: dict[int, list[ReleaseVariant]] = {}
            for row in session.scalars(select(ReleaseVariant).order_by(ReleaseVariant.id)):
                variants.setdefault(row.release_id, []).append(row)
            return [_outcome(r, variants.get(r.id, []), None, []) for r in releases]
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the registry {display_url(db_url)}: {exc}") from exc
    finally:
        engine.dispose()
