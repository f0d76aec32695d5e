"""Registry tables: fleet data plus federated training.

Fleet: ``devices``, ``records`` (a result's model version in ``model``, ``model_version``,
``model_variant``), ``dead_letters``, ``device_states`` (the model each device reports it
runs). Federated training: ``fl_runs``,
``fl_rounds``, ``privacy_ledger`` and ``fl_checkpoints``. Enrollment: ``enrollments``
(one device's certificate and Flower node registration under its device id). Releases:
``releases`` and ``release_variants`` (a run's model made into signed, verified
``.tflite`` variants; :mod:`edgefl.server.releases`). Staged rollouts: ``rollouts`` and
``rollout_devices`` (a release published to a canary cohort first, then to the rest, each
device's state with its reason; :mod:`edgefl.server.staged_rollout`). Operations:
``audit_log`` (append-only, :mod:`edgefl.server.audit`), ``admin_tokens`` and
``admin_certs`` (who may use the admin API).

Timestamps are timezone-aware UTC on PostgreSQL. SQLite has no time zone type, so
values read back there are naive and mean UTC.

Schema changes go through an alembic revision in ``migrations/versions/``; a test checks
that the migrations and these models agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ADMIN_ROLES",
    "AUDIT_OUTCOMES",
    "DEAD_LETTER_PAYLOAD_CAP",
    "ENROLLMENT_STATUSES",
    "RELEASE_STATUSES",
    "ROLLOUT_DEVICE_STATES",
    "ROLLOUT_STATES",
    "AdminCert",
    "AdminToken",
    "AuditEntry",
    "Base",
    "DeadLetter",
    "Device",
    "DeviceState",
    "Enrollment",
    "FlCheckpoint",
    "FlRound",
    "FlRun",
    "PrivacyLedgerEntry",
    "Record",
    "Release",
    "ReleaseVariant",
    "Rollout",
    "RolloutDevice",
]

DEAD_LETTER_PAYLOAD_CAP: Final = 64 * 1024
"""Dead letters keep at most this many leading payload bytes (``payload_size`` keeps the
original length)."""

ENROLLMENT_STATUSES: Final = ("admitted", "revoked")
"""Values of ``enrollments.status``."""

RELEASE_STATUSES: Final = ("published", "failed")
"""Values of ``releases.status``."""

ROLLOUT_STATES: Final = ("running", "completed", "halted", "failed", "interrupted")
"""Values of ``rollouts.state``."""

ROLLOUT_DEVICE_STATES: Final = (
    "pending",
    "published",
    "installed",
    "rolled_back",
    "failed",
    "offline",
    "restored",
    "shadow",
)
"""Values of ``rollout_devices.state`` (``shadow``: a canary running the release beside its
current model, in a ``--shadow`` rollout's first stage)."""

ADMIN_ROLES: Final = ("viewer", "operator", "admin")
"""Admin roles, least to most: a viewer reads; an operator also trains, releases, rolls out
and sends commands; an admin also admits and revokes."""

AUDIT_OUTCOMES: Final = ("ok", "denied", "error")
"""Values of ``audit_log.outcome``."""

# Explicit constraint names so alembic migrations are stable across databases.
_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_ID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of the registry tables."""

    metadata = MetaData(naming_convention=_NAMING)


class Device(Base):
    """A device the cloud has heard from, with its presence.

    Attributes:
        device_id: The device identity (``{device}`` topic segment).
        fleet: The fleet of the topic it last published on.
        first_seen: When the ingest first heard from it.
        last_seen: When the ingest last accepted anything from it.
        online: Presence from the retained ``status`` topic (``online``/``offline``).
        status_changed_at: When ``online`` was last set from a status message.
        agent_version: The edgefl version the device's agent last reported (None: never).
        envelope_version: The envelope version of its last accepted record.
    """

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    online: Mapped[bool] = mapped_column(Boolean(create_constraint=False), default=False)
    status_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    agent_version: Mapped[str | None] = mapped_column(String(32))
    envelope_version: Mapped[int | None] = mapped_column(Integer)


class Record(Base):
    """One accepted envelope, stored at most once per ``(device_id, incarnation, seq)``.

    Attributes:
        id: Surrogate key, in insertion order.
        device_id: Sender.
        incarnation: The sending outbox's identity (envelope version 2; 32 hex digits),
            empty for version-1 envelopes. A new outbox (deleted, reset, reflashed) gets a
            new one, and its seqs start again at 1 without colliding with stored ones.
        seq: Sequence number within the incarnation.
        kind: Envelope kind.
        topic: The MQTT topic it arrived on.
        ts_ms: Device time, Unix milliseconds.
        content_type: MIME type of ``body``.
        body: The envelope body.
        received_at: When the ingest stored it.
        model: For a ``result`` record, the model that computed it (its JSON body's
            ``model``); None for other records or a body that does not name one.
        model_version: That model's release version (the body's ``version``).
        model_variant: Its variant (the body's ``variant``).
    """

    __tablename__ = "records"
    __table_args__ = (
        UniqueConstraint("device_id", "incarnation", "seq"),
        Index(None, "model", "model_version"),
        # A device's newest record of a kind (its newest outbox report, its recent
        # results) is a short backward scan of this index instead of a table scan.
        Index(None, "device_id", "kind", "id"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    incarnation: Mapped[str] = mapped_column(String(32), default="", server_default="")
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str] = mapped_column(Text)
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(255))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    model: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(BigInteger)
    model_variant: Mapped[str | None] = mapped_column(String(64))


class DeadLetter(Base):
    """A payload the ingest refused, kept with the reason instead of being lost.

    Attributes:
        id: Surrogate key, in arrival order.
        topic: The MQTT topic it arrived on.
        payload: The first :data:`DEAD_LETTER_PAYLOAD_CAP` bytes of the payload.
        payload_size: The original payload length in bytes.
        reason: A short code, one of ``edgefl.server.ingest.DEAD_LETTER_REASONS``
            (``malformed_envelope``, ``oversized``, ``device_mismatch``,
            ``fleet_mismatch``, ``conflicting_duplicate``, ``retained``, ...).
        detail: A human-readable explanation.
        received_at: When the ingest refused it.
    """

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    payload_size: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class DeviceState(Base):
    """The model a device reports it runs: its newest retained ``state/reported`` document.

    One row per device, written by the ingest from a valid
    :class:`~edgefl.proto.desired.ReportedState` (newest wins; the same document again
    leaves the row as it is). Columns mirror the document; ``document`` keeps it whole.

    Attributes:
        device_id: The device (the topic's ``{device}``, which the document must name).
        fleet: The fleet of the topic it arrived on.
        model: The model it runs (None: none).
        version: Its release version.
        variant: Its variant (``int8``, ``pruned50-int8``, ...).
        sha256: The artifact's sha256 (hex).
        state: ``running``, ``downloading``, ``verifying``, ``rolled_back``, ``failed`` or
            ``none``.
        since: When the running model was swapped in (the device's clock), or None.
        rollbacks: How many times the device rolled an update back.
        last_failure_version: The version of its last refused or rolled-back update.
        last_failure_reason: Its machine reason (``edgefl.releasesign.REASONS``).
        last_failure_detail: Its human-readable detail.
        last_failure_at: When it failed (the device's clock).
        reported_at: When the ingest stored this document.
        document: The JSON document as the device published it.
    """

    __tablename__ = "device_states"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.device_id"), primary_key=True
    )
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int | None] = mapped_column(BigInteger)
    variant: Mapped[str | None] = mapped_column(String(64))
    sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rollbacks: Mapped[int] = mapped_column(BigInteger)
    last_failure_version: Mapped[int | None] = mapped_column(BigInteger)
    last_failure_reason: Mapped[str | None] = mapped_column(String(64))
    last_failure_detail: Mapped[str | None] = mapped_column(Text)
    last_failure_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    document: Mapped[str] = mapped_column(Text)


class FlRun(Base):
    """A federated training run.

    Attributes:
        run_id: The run id (chosen by the caller or ``edgefl.server.fl.new_run_id``).
        plan_json: The validated ``FederationPlan`` as JSON.
        plan_key: Fingerprint of the plan (a resume with another plan is refused).
        status: ``running``, ``completed`` or ``stopped``.
        stop_reason: Why the run stopped early (empty otherwise).
        rounds_done: The last round whose checkpoint is committed.
        created_at: When the run was first started.
        updated_at: When the run last changed.
    """

    __tablename__ = "fl_runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan_json: Mapped[str] = mapped_column(Text)
    plan_key: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    stop_reason: Mapped[str] = mapped_column(Text, default="")
    rounds_done: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FlRound(Base):
    """Metrics of one finished round (committed with the round's checkpoint).

    Attributes:
        run_id: The run.
        round: Round number, from 1.
        accuracy: Server-side accuracy on the held-out split.
        loss: Server-side loss on the held-out split.
        federated_accuracy: Federated evaluation accuracy (None if not run).
        federated_loss: Federated evaluation loss (None if not run).
        train_loss: Weighted local training loss of the aggregated replies.
        num_selected: Devices sent a train message.
        num_replies: Replies aggregated.
        num_failures: Failed or missing replies.
        num_rejected: Replies refused by validation.
        num_refused: Devices that refused to train (budget exhausted).
        num_flagged: Devices whose reported ε went down.
        epsilon_max: Largest device ε after the round.
        central_epsilon: Central-DP ε after the round (None without central DP).
        wall_s: Wall time of the round in seconds.
        detail_json: Other details as JSON (rejection reasons, aggregated flag).
        at: When the round was committed.
    """

    __tablename__ = "fl_rounds"

    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("fl_runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    accuracy: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    federated_accuracy: Mapped[float | None] = mapped_column(Float)
    federated_loss: Mapped[float | None] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    num_selected: Mapped[int] = mapped_column(Integer)
    num_replies: Mapped[int] = mapped_column(Integer)
    num_failures: Mapped[int] = mapped_column(Integer)
    num_rejected: Mapped[int] = mapped_column(Integer)
    num_refused: Mapped[int] = mapped_column(Integer)
    num_flagged: Mapped[int] = mapped_column(Integer)
    epsilon_max: Mapped[float] = mapped_column(Float)
    central_epsilon: Mapped[float | None] = mapped_column(Float)
    wall_s: Mapped[float] = mapped_column(Float)
    detail_json: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PrivacyLedgerEntry(Base):
    """ε one device spent in one round of one run, with what is needed to recompute it.

    ``epsilon_total`` is the device's running total as its accountant reports it;
    ``epsilon_spent`` is the increase over its previous ledger row. ``sigma``,
    ``sample_rate`` and ``steps`` are the DP-SGD parameters of this round and
    ``history_json`` the device's whole accountant history, so the running total can be
    recomputed independently. At most one row per (run, device, round).

    Attributes:
        id: Surrogate key.
        run_id: The run.
        device_id: The device.
        round: The round.
        epsilon_spent: ε spent in this round.
        epsilon_total: Running ε of the device after this round.
        delta: δ of the guarantee.
        sigma: Noise multiplier used.
        sample_rate: Poisson sample rate used.
        steps: DP-SGD steps taken this round.
        history_json: Opacus accountant history ``[[sigma, q, steps], ...]`` as JSON.
        num_examples: Size of the device's training data.
        train_time_s: Local training time.
        compute_speed: The device's reported compute-speed factor.
        flagged: True when the device reported an ε lower than its previous total.
        at: When the row was committed.
    """

    __tablename__ = "privacy_ledger"
    __table_args__ = (UniqueConstraint("run_id", "device_id", "round"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("fl_runs.run_id", ondelete="CASCADE"), index=True
    )
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int] = mapped_column(Integer)
    epsilon_spent: Mapped[float] = mapped_column(Float)
    epsilon_total: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    sigma: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    history_json: Mapped[str] = mapped_column(Text)
    num_examples: Mapped[int] = mapped_column(Integer)
    train_time_s: Mapped[float] = mapped_column(Float)
    compute_speed: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean(create_constraint=False), default=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FlCheckpoint(Base):
    """The state after one round: enough to resume the run from the next one.

    Attributes:
        run_id: The run.
        round: The round this checkpoint follows.
        model: The global model (``numpy.savez`` of the arrays, keys in order).
        strategy_state: Strategy state (e.g. FedAdam moments), ``numpy.savez`` bytes.
        accountants_json: Device accountant histories and central-DP accountant state.
        at: When it was committed.
    """

    __tablename__ = "fl_checkpoints"

    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("fl_runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[bytes] = mapped_column(LargeBinary)
    strategy_state: Mapped[bytes] = mapped_column(LargeBinary)
    accountants_json: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Enrollment(Base):
    """A device admitted to the fleet: its certificate and its Flower node, one device id.

    The row is written in the same transaction that records both identities, so the
    certificate's CN, the SuperLink node's name and this row's key are always the same
    device id. A revoked row is kept (with the reason) so the device cannot come back
    silently under the same id.

    Attributes:
        device_id: The device id (certificate CN, MQTT username, node name).
        fleet: The fleet the device enrolled into.
        status: ``admitted`` or ``revoked`` (:data:`ENROLLMENT_STATUSES`).
        cert_serial: Serial of the device certificate, lowercase hexadecimal.
        cert_pem: The device certificate the fleet CA issued.
        node_public_key: The Flower node public key (one OpenSSH line).
        node_id: The SuperLink's node id, decimal. Flower node ids are unsigned 64-bit,
            which no portable integer column holds, hence a string.
        admitted_at: When the device was admitted.
        revoked_at: When it was revoked (None while admitted).
        revoke_reason: Why it was revoked (empty while admitted).
    """

    __tablename__ = "enrollments"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    cert_serial: Mapped[str] = mapped_column(String(40), unique=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    node_public_key: Mapped[str] = mapped_column(Text)
    node_id: Mapped[str] = mapped_column(String(20), unique=True)
    admitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoke_reason: Mapped[str] = mapped_column(Text, default="")


class Release(Base):
    """One release of a model: a run's checkpoint made into verified, signed variants.

    Every attempt that got as far as verification is a row, and takes the model's next
    version: ``published`` (its files are in ``<releases dir>/<model>/<version>/``) or
    ``failed`` (a variant failed verification, or the files could not be written; no
    files, ``reasons_json`` says why). So a version is never reused, and only grows.

    Attributes:
        id: Surrogate key.
        model: The zoo model name.
        version: 1, 2, ... per model (unique with ``model``).
        run_id: The federated run the weights come from.
        round: The round whose checkpoint was released.
        plan_hash: The run's plan fingerprint (``fl_runs.plan_key``).
        epsilon_max: The largest per-device ε of the run up to that round (local DP), or
            the central ε (central DP); None without DP.
        delta: δ of that guarantee (None without DP).
        dp_mode: ``local``, ``central`` or ``none``.
        calibration: Where calibration and verification data came from: ``held-out``,
            ``synthetic`` or ``none``.
        float_accuracy: The checkpoint's torch accuracy on the evaluation data (None
            without labelled data).
        device_class: The device class the variants are for.
        key_id: The release-signing key (None for a failed release).
        created_by: Who made it (the OS user, and the operator's name when given).
        created_at: When it was made.
        expires_at: When its signatures stop being accepted.
        status: ``published`` or ``failed`` (:data:`RELEASE_STATUSES`).
        reasons_json: Why it failed, a JSON list of strings (``[]`` when published).
    """

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int] = mapped_column(Integer)
    plan_hash: Mapped[str] = mapped_column(String(64))
    epsilon_max: Mapped[float | None] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    dp_mode: Mapped[str] = mapped_column(String(16))
    calibration: Mapped[str] = mapped_column(String(16))
    float_accuracy: Mapped[float | None] = mapped_column(Float)
    device_class: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reasons_json: Mapped[str] = mapped_column(Text, default="[]")


class ReleaseVariant(Base):
    """One variant of a release: its artifact, how it measured, and where it is.

    Attributes:
        id: Surrogate key.
        release_id: The release.
        variant: The variant name (``int8``, ``pruned50-int8``, ...).
        recipe: The quantization recipe.
        prune_ratio: Share of channels pruned before the recipe (None: not pruned).
        sha256: The artifact's sha256 (hex).
        size_bytes: The artifact's size.
        accuracy: Its lowest accuracy over the runtimes it was verified on (None without
            labelled data).
        float_accuracy: Its torch reference's accuracy (the pruned and fine-tuned model
            for a pruned variant).
        latency_json: Median single-sample latency per runtime in µs, a JSON object.
        device_class: The device class it is for.
        runtime: The runtime it is for (its manifest's ``release.runtime``).
        path: The artifact, relative to the releases folder (None: not written).
        passed: Whether it passed verification on every runtime.
        reasons_json: Why it failed verification, a JSON list of strings.
    """

    __tablename__ = "release_variants"
    __table_args__ = (UniqueConstraint("release_id", "variant"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    release_id: Mapped[int] = mapped_column(
        _ID, ForeignKey("releases.id", ondelete="CASCADE"), index=True
    )
    variant: Mapped[str] = mapped_column(String(64))
    recipe: Mapped[str] = mapped_column(String(32))
    prune_ratio: Mapped[float | None] = mapped_column(Float)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float)
    float_accuracy: Mapped[float | None] = mapped_column(Float)
    latency_json: Mapped[str] = mapped_column(Text)
    device_class: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(64))
    path: Mapped[str | None] = mapped_column(Text)
    passed: Mapped[bool] = mapped_column(Boolean(create_constraint=False), default=False)
    reasons_json: Mapped[str] = mapped_column(Text, default="[]")


class Rollout(Base):
    """A staged rollout of one release variant: canaries first, then the rest.

    :mod:`edgefl.server.staged_rollout` writes it as it goes; the devices are in
    ``rollout_devices``.

    Attributes:
        id: The rollout id (``r-`` and 10 hex digits).
        model: The released model.
        version: The release version rolled out.
        variant: Its variant.
        sha256: The variant's artifact sha256 (hex).
        fleet: The fleet it targets, or None for admitted devices of every fleet.
        canary_fraction: Share of the online targets in the canary cohort (``--canary``).
        canaries: Size of the canary cohort.
        soak_s: Seconds the canaries run the release after installing it, before the rest.
        max_failures: Share of a cohort that may fail (roll back, refuse, not report, miss
            an accuracy threshold) without halting the rollout (``--max-failures``).
        min_accuracy: Floor of each canary's on-device accuracy on evaluation samples
            (0 to 1), or None.
        max_accuracy_drop: Most points a canary's accuracy may fall below the previous
            version's on the same device, or None.
        min_evaluated: Evaluation samples a canary must have answered with the release
            before its accuracy is judged.
        install_timeout_s: How long a device may take to report the release running.
        state: ``running``, ``completed``, ``halted``, ``failed`` or ``interrupted``
            (:data:`ROLLOUT_STATES`).
        phase: Where it is or stopped: ``shadow`` or ``remove-shadow`` (``--shadow``),
            ``canary``, ``soak``, ``accuracy``, ``rest``, ``rollback`` or ``done``.
        reason: Why it halted, failed or was interrupted; a summary when completed.
        evidence_json: What the decision rested on (cohort accuracy, failures; with
            ``--shadow``, ``shadow: true``, ``min_agreement`` and ``shadow_canaries``: each
            canary's shadow figures and verdict), JSON.
        created_by: Who started it (the OS user, and the operator's name when given).
        created_at: When it started.
        updated_at: The controller's last heartbeat or change.
        finished_at: When it ended (None while running).
    """

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    variant: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    fleet: Mapped[str | None] = mapped_column(String(64))
    canary_fraction: Mapped[float] = mapped_column(Float)
    canaries: Mapped[int] = mapped_column(Integer)
    soak_s: Mapped[float] = mapped_column(Float)
    max_failures: Mapped[float] = mapped_column(Float)
    min_accuracy: Mapped[float | None] = mapped_column(Float)
    max_accuracy_drop: Mapped[float | None] = mapped_column(Float)
    min_evaluated: Mapped[int] = mapped_column(Integer)
    install_timeout_s: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    evidence_json: Mapped[str] = mapped_column(Text, default="{}")
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RolloutDevice(Base):
    """One device of a staged rollout: its cohort, state and the model it ran before.

    Attributes:
        rollout_id: The rollout.
        device_id: The device.
        fleet: Its enrolled fleet.
        cohort: ``canary`` or ``rest``.
        state: ``pending``, ``shadow``, ``published``, ``installed``, ``rolled_back``,
            ``failed``, ``offline`` or ``restored`` (:data:`ROLLOUT_DEVICE_STATES`).
        reason: Why it is in that state (the device's failure reason and detail, a
            timeout, an accuracy below the threshold, ...).
        online_at_start: Its presence when the rollout started.
        previous_model: The model it reported running before the rollout (None: none).
        previous_version: Its version.
        previous_variant: Its variant.
        previous_sha256: Its artifact sha256.
        published_at: When the release's desired state was published to it.
        evaluated: Evaluation samples it answered with the release (its newest report;
            in the shadow stage, those the shadow answered).
        accuracy: Its on-device accuracy with the release on those samples.
        previous_evaluated: Evaluation samples the previous version answered on it (in
            the shadow stage: the same samples as the shadow's).
        previous_accuracy: The previous version's accuracy on it.
        updated_at: When the row last changed.
    """

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    cohort: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    online_at_start: Mapped[bool] = mapped_column(Boolean(create_constraint=False))
    previous_model: Mapped[str | None] = mapped_column(String(64))
    previous_version: Mapped[int | None] = mapped_column(BigInteger)
    previous_variant: Mapped[str | None] = mapped_column(String(64))
    previous_sha256: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    evaluated: Mapped[int | None] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float)
    previous_evaluated: Mapped[int | None] = mapped_column(Integer)
    previous_accuracy: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """One mutating admin action, appended and never changed.

    Attributes:
        id: Surrogate key, in insertion order.
        at: When the action was taken (UTC).
        actor: Who: the admin certificate's CN, ``token:NAME``, or ``local:USER`` for a
            command run on the server host with direct access to its files.
        role: The actor's role (:data:`ADMIN_ROLES`), or ``local``.
        via: ``api`` or ``cli`` (local).
        action: What: ``admit``, ``revoke``, ``train``, ``stop``, ``release``,
            ``rollout``, ``command``, ``forget``, ``token``, ...
        target: What it acted on (a device id, run id, ``model@version``), or empty.
        arguments_json: The arguments as JSON, with secrets redacted.
        outcome: :data:`AUDIT_OUTCOMES`.
        detail: The error or refusal message, or a short result.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    via: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(255))
    arguments_json: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text)


class AdminToken(Base):
    """An admin API token: only a hash of its secret is stored.

    Attributes:
        id: The token's public id (the part before the secret in the token string).
        name: Who it was issued to.
        role: :data:`ADMIN_ROLES`.
        secret_hash: A hash of the secret (never the secret).
        created_at: When it was issued.
        expires_at: When it stops working.
        revoked_at: When it was revoked, or None.
        last_used_at: When it last authenticated a request, or None.
    """

    __tablename__ = "admin_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdminCert(Base):
    """A certificate the admin CA issued, so it can be listed and revoked.

    Attributes:
        serial: The certificate serial number (hex).
        name: Its CN.
        role: :data:`ADMIN_ROLES` (also in the certificate itself).
        issued_at: When it was issued.
        expires_at: Its notAfter.
        revoked_at: When it was revoked, or None.
    """

    __tablename__ = "admin_certs"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
