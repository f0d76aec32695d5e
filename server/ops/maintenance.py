"""Operations that keep a server alive for years (role admin, audited).

``backup`` (:mod:`edgefl.server.backup`), ``retention`` (:mod:`edgefl.server.retention`)
and ``forget`` (:mod:`edgefl.server.forget`). ``restore`` is no operation: it replaces the
registry the audit log lives in, on a host whose server is stopped, so it runs only on
that host (``edgefl server restore``), and records itself in the restored audit log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from edgefl.proto.ids import ID_REGEX
from edgefl.server.ops import InvalidError, OpContext, Params, operation

__all__: list[str] = []


class BackupParams(Params):
    dest: str = Field(
        min_length=1,
        description="New (or empty) folder on the server host to write the backup into.",
    )


@operation(
    "backup",
    role="admin",
    params=BackupParams,
    summary="Back up the CA and signing keys, registry, SuperLink database and config "
    "(consistent while the server runs).",
    mutating=True,
    target=lambda p: p.dest,
)
def backup(ctx: OpContext, params: BackupParams) -> dict[str, Any]:
    """The manifest: ``{format, created_at, registry, superlink, config, files, path}``."""
    from edgefl.server.backup import backup as make_backup

    dest = Path(params.dest)
    if not dest.is_absolute():
        if ctx.principal.via == "api":
            raise InvalidError(
                f"dest {params.dest!r} is relative: name an absolute folder on the server host"
            )
        dest = Path.cwd() / dest
    manifest = make_backup(ctx.config, dest, config_path=ctx.config_path)
    files = manifest.pop("files")
    manifest["file_count"] = len(files)
    manifest["bytes"] = sum(int(f["size"]) for f in files.values())
    return manifest


class RetentionParams(Params):
    apply: bool = Field(False, description="Delete; false: only count what would go.")


@operation(
    "retention",
    role="admin",
    params=RetentionParams,
    summary="Apply the retention policy (records, dead letters, checkpoints) now, or count "
    "what it would delete.",
    mutating=True,
    target=lambda p: "apply" if p.apply else "dry-run",
)
def retention(ctx: OpContext, params: RetentionParams) -> dict[str, Any]:
    """``{dry_run, deleted: {table: {rule: n}}, totals, batches, seconds, policy}``."""
    from edgefl.server.retention import apply_retention

    policy = ctx.config.retention
    report = apply_retention(ctx.engine, policy, dry_run=not params.apply).to_dict()
    report["policy"] = policy.model_dump(mode="json")
    return report


class ForgetParams(Params):
    device: str = Field(pattern=ID_REGEX, description="The device id.")
    dry_run: bool = Field(False, description="Count what would be erased; erase nothing.")


@operation(
    "forget",
    role="admin",
    params=ForgetParams,
    summary="Erase a (revoked) device's records, results, telemetry, state and enrollment; "
    "keep its privacy-ledger rows.",
    mutating=True,
    target=lambda p: p.device,
)
def forget(ctx: OpContext, params: ForgetParams) -> dict[str, Any]:
    """``{device_id, dry_run, erased: {table: n}, kept: {privacy_ledger: n}, kept_why}``."""
    from edgefl.server.forget import forget_device

    return forget_device(ctx.engine, params.device, dry_run=params.dry_run)
