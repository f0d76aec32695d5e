"""``edgefl.server.ops.invoke``: role check, validation, audit; on a real SQLite registry.

Operations made for these tests register under names starting with ``test-core-``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from edgefl.errors import BadInputError
from edgefl.server import audit
from edgefl.server.audit import REDACTED, Principal
from edgefl.server.ops import (
    ForbiddenError,
    InvalidError,
    NoParams,
    NotFoundError,
    OpContext,
    Params,
    invoke,
    operation,
    operations,
    role_allows,
    status_of,
)
from edgefl.server.registry import make_engine, upgrade

CALLS: list[dict[str, Any]] = []


class _SetParams(Params):
    device: str = Field(min_length=1)
    level: int = Field(1, ge=0, le=9)
    password: str | None = None


@operation(
    "test-core-set",
    role="operator",
    params=_SetParams,
    summary="a mutating operation for the tests",
    mutating=True,
    target=lambda p: p.device,
    secrets=("device_secret",),
)
def _set(ctx: OpContext, params: _SetParams) -> dict[str, Any]:
    if params.device == "fail":
        raise BadInputError("device fail cannot be set", hint="pick another")
    if params.device == "crash":
        raise RuntimeError("boom")
    CALLS.append({"device": params.device, "by": ctx.principal.name})
    return {"device": params.device, "level": params.level}


@operation("test-core-read", role="viewer", params=NoParams, summary="a read for the tests")
def _read(ctx: OpContext, _params: NoParams) -> str:
    return ctx.principal.role


@pytest.fixture
def ctx_for(tmp_path: Path) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    CALLS.clear()

    def make(role: str) -> OpContext:
        return OpContext(Principal(f"{role}-1", role, "api"), engine=engine)

    make.engine = engine  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        engine.dispose()


def test_roles_rank_viewer_operator_admin() -> None:
    assert role_allows("admin", "operator")
    assert role_allows("operator", "operator")
    assert not role_allows("viewer", "operator")
    assert not role_allows("nobody", "viewer")
    assert {"test-core-set", "test-core-read"} <= set(operations())


def test_an_allowed_call_runs_once_and_is_audited_with_secrets_redacted(ctx_for: Any) -> None:
    result = invoke(
        "test-core-set", {"device": "pi-01", "level": 3, "password": "hunter2"}, ctx_for("admin")
    )
    assert result == {"device": "pi-01", "level": 3}
    assert CALLS == [{"device": "pi-01", "by": "admin-1"}]
    (row,) = audit.read(ctx_for.engine)
    assert (row["actor"], row["role"], row["via"], row["action"], row["target"]) == (
        "admin-1",
        "admin",
        "api",
        "test-core-set",
        "pi-01",
    )
    assert row["outcome"] == "ok"
    assert row["arguments"] == {"device": "pi-01", "level": 3, "password": REDACTED}


def test_a_role_too_low_is_refused_before_anything_runs_and_audited(ctx_for: Any) -> None:
    with pytest.raises(ForbiddenError, match="needs the operator role") as err:
        invoke("test-core-set", {"device": "pi-01"}, ctx_for("viewer"))
    assert status_of(err.value) == 403
    assert CALLS == []
    (row,) = audit.read(ctx_for.engine)
    assert (row["outcome"], row["actor"]) == ("denied", "viewer-1")
    # A read that is denied is not a change: nothing to audit (and a viewer may read).
    assert invoke("test-core-read", {}, ctx_for("viewer")) == "viewer"
    assert len(audit.read(ctx_for.engine)) == 1


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({}, "device: Field required"),
        ({"device": "pi-01", "level": 12}, "level"),
        ({"device": "pi-01", "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"device": ["a"]}, "device"),
    ],
)
def test_invalid_arguments_are_400_and_nothing_runs(
    ctx_for: Any, arguments: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidError, match=words) as err:
        invoke("test-core-set", arguments, ctx_for("admin"))
    assert status_of(err.value) == 400
    assert "--help" in err.value.hint
    assert CALLS == []


def test_handler_errors_are_audited_and_keep_their_status(ctx_for: Any) -> None:
    with pytest.raises(BadInputError) as err:
        invoke("test-core-set", {"device": "fail"}, ctx_for("operator"))
    assert status_of(err.value) == 400
    with pytest.raises(RuntimeError):
        invoke("test-core-set", {"device": "crash"}, ctx_for("operator"))
    rows = audit.read(ctx_for.engine)
    assert [(r["outcome"], r["detail"]) for r in rows] == [
        ("error", "RuntimeError: boom"),
        ("error", "device fail cannot be set (pick another)"),
    ]


def test_an_unknown_operation_is_404(ctx_for: Any) -> None:
    with pytest.raises(NotFoundError) as err:
        invoke("test-core-nope", {}, ctx_for("admin"))
    assert status_of(err.value) == 404
    assert audit.read(ctx_for.engine) == []


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="defined twice"):
        operation("test-core-read", role="viewer", params=NoParams, summary="again")(
            lambda ctx, p: None
        )
    with pytest.raises(ValueError, match="role must be one of"):
        operation("test-core-bad", role="root", params=NoParams, summary="x")
