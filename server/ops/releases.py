"""Release and rollout operations: releases, rollouts, rollout-status, results, deploy.

``release`` (building, verifying and signing variants: minutes) and the staged
``rollout`` (soaking and watching canaries: minutes) run on the server host as commands,
or remotely as background jobs of the server (:mod:`edgefl.server.ops.background`).
Their records are read here from anywhere: ``releases``, ``rollouts``,
``rollout-status ID``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edgefl.errors import BadInputError
from edgefl.server.ops import NotFoundError, OpContext, Params, operation

__all__: list[str] = []


class ReleasesParams(Params):
    model: str | None = Field(None, description="Only this model.")


@operation(
    "releases",
    role="viewer",
    params=ReleasesParams,
    summary="List releases (published and failed) with their privacy guarantee and variants.",
)
def releases(ctx: OpContext, params: ReleasesParams) -> dict[str, Any]:
    """``{"releases": [ReleaseOutcome.to_dict(), ...]}`` by model then version."""
    from edgefl.server.releases import list_releases

    url = ctx.engine.url.render_as_string(hide_password=False)
    return {"releases": [r.to_dict() for r in list_releases(url, model=params.model)]}


class RolloutsParams(Params):
    limit: int = Field(50, ge=1, le=10_000, description="Newest this many.")


@operation(
    "rollouts",
    role="viewer",
    params=RolloutsParams,
    summary="List staged rollouts, newest first, with their state and device counts.",
)
def rollouts(ctx: OpContext, params: RolloutsParams) -> dict[str, Any]:
    """``{"rollouts": [...]}`` (see :func:`edgefl.server.staged_rollout.list_rollouts`)."""
    from edgefl.server.staged_rollout import list_rollouts

    return {"rollouts": list_rollouts(ctx.engine, limit=params.limit)}


class RolloutParams(Params):
    rollout: str = Field(min_length=1, max_length=32, description="The rollout id (r-...).")


@operation(
    "rollout-status",
    role="viewer",
    params=RolloutParams,
    summary="Show one rollout: its state and reason, each device's state and reason.",
)
def rollout_status(ctx: OpContext, params: RolloutParams) -> dict[str, Any]:
    """The rollout's document (see :func:`edgefl.server.staged_rollout.read_rollout`).

    Raises:
        NotFoundError: No such rollout.
    """
    from edgefl.server.staged_rollout import read_rollout

    try:
        return read_rollout(ctx.engine, params.rollout)
    except BadInputError as exc:
        raise NotFoundError(str(exc), hint="`edgefl server rollouts` lists them") from exc


class ResultsParams(Params):
    model: str | None = Field(None, description="Only results of this model.")
    version: int | None = Field(None, description="Only this release version.")
    device: str | None = Field(None, description="Only this device.")


@operation(
    "results",
    role="viewer",
    params=ResultsParams,
    summary="Count the stored results per device and the model version that computed them.",
)
def results(ctx: OpContext, params: ResultsParams) -> dict[str, Any]:
    """Stored results per device and model version.

    Returns ``{"results": [{device_id, model, version, variant, results,
    first_received, last_received}]}``.
    """
    from edgefl.server.staged_rollout import results_by_version

    return {
        "results": results_by_version(
            ctx.engine, model=params.model, version=params.version, device=params.device
        )
    }


class DeployParams(Params):
    model: str = Field(min_length=1, max_length=64, description="Released model name.")
    version: int = Field(ge=1, description="Release version.")
    variant: str | None = Field(None, description="Variant (needed when it has several).")
    device: str | None = Field(None, description="One admitted device (else: the fleet).")
    fleet: bool = Field(False, description="Every admitted device, fleet by fleet.")
    rollback: bool = Field(False, description="Name an older version on purpose.")
    expires_days: float = Field(30.0, ge=0.001, description="Days the desired state is valid.")


@operation(
    "deploy",
    role="operator",
    params=DeployParams,
    summary="Sign the desired state naming a release and publish it for a device or the fleet.",
    mutating=True,
    target=lambda p: f"{p.model} v{p.version} -> {p.device or 'fleet'}",
)
def deploy(ctx: OpContext, params: DeployParams) -> dict[str, Any]:
    """What :func:`edgefl.server.rollout.deploy` published (``Deployment.to_dict``).

    Raises:
        BadInputError: Neither or both of ``device`` and ``fleet``; an unknown release,
            variant or device (the message names it).
    """
    from edgefl.server.rollout import deploy as run_deploy

    if (params.device is None) == (not params.fleet):
        raise BadInputError("give exactly one of --device D and --fleet")
    result = run_deploy(
        ctx.config,
        params.model,
        params.version,
        variant=params.variant,
        device=params.device,
        rollback=params.rollback,
        expires_days=params.expires_days,
    )
    return result.to_dict()
