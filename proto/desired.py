"""The model a device should run, and what it reports it runs (the fleet's state topics).

The server publishes a :class:`DesiredState` retained on ``edgefl/{fleet}/{device}/state/desired``
(:func:`edgefl.proto.topics`), written only by its rollout identity; a fleet-wide one
(``device = "*"``) goes out on each enrolled device's own desired topic, since the ACL is
per device. It is signed with a release-signing key like the manifests
(:mod:`edgefl.releasesign`): a device acts on no unsigned desired state, refuses one issued
before the newest it accepted (a replay), and applies its ``revoked_keys`` only when it
verified with a key that is itself not revoked
(:meth:`edgefl.releasesign.TrustStore.accept_desired`).
A rollback is a signed desired state that names the older version with ``rollback=true``.

A desired state may also name a **shadow** (:attr:`DesiredState.shadow`): a release the
device downloads and checks like any other, keeps apart from its A/B slots, and runs
beside the serving model on the same samples without ever serving its answers (shadow
evaluation before a staged rollout changes anything). ``shadow`` is left out of the JSON
when it is ``None``, so a state without one has the same bytes, and the same signature,
as before the field existed. A device whose agent predates the field refuses a state that
has one as malformed and keeps what it runs: the rollout then sees no shadow evidence.

The device answers with a :class:`ReportedState`, retained on ``.../state/reported``: the
model it runs, since when, and its last failure with the machine reason
(:data:`edgefl.releasesign.REASONS`).

Both are JSON (UTF-8); :func:`parse_desired` and :func:`parse_reported` read a payload and
turn any malformed one into a :class:`~edgefl.errors.BadInputError`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
    model_validator,
)

from edgefl.errors import BadInputError
from edgefl.files import SAFE_NAME_PATTERN
from edgefl.manifest import Signature
from edgefl.proto.ids import ID_PATTERN, ID_REGEX

__all__ = [
    "MAX_STATE_BYTES",
    "DesiredModel",
    "DesiredState",
    "LastFailure",
    "ReportedState",
    "parse_desired",
    "parse_reported",
]

MAX_STATE_BYTES: Final = 64 * 1024
"""Largest desired or reported state payload accepted."""
_SAFE_SEGMENT = SAFE_NAME_PATTERN
_SHA256_HEX = r"^[0-9a-f]{64}$"
_KEY_ID = r"^[0-9a-f]{16}$"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> bytes:
        """The payload: compact JSON, keys sorted (UTF-8)."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode("utf-8")


class DesiredModel(_Wire):
    """One released variant a device should run (its manifest is fetched and checked)."""

    model: str = Field(pattern=_SAFE_SEGMENT)
    version: int = Field(ge=1)
    variant: str = Field(pattern=_SAFE_SEGMENT)
    artifact_sha256: str = Field(pattern=_SHA256_HEX)
    size_bytes: int = Field(ge=0)
    rollback: bool = Field(
        False, description="run this version even if it is older than the installed one"
    )


class DesiredState(_Wire):
    """What the server wants a device (or the whole fleet, ``"*"``) to run; signed."""

    v: Literal[1] = 1
    fleet: str = Field(pattern=ID_REGEX)
    device: str = Field(pattern=f"^(?:{ID_PATTERN}|\\*)$", description='a device id or "*"')
    issued_at: int = Field(ge=0, description="unix seconds, the server's clock")
    expires_at: int = Field(ge=0)
    model: DesiredModel | None = Field(description="None: run no model")
    revoked_keys: list[Annotated[str, StringConstraints(pattern=_KEY_ID)]] = Field(
        default_factory=list, max_length=64, description="release key ids never to trust again"
    )
    shadow: DesiredModel | None = Field(
        None,
        description="a release to run beside the serving model without serving its answers "
        "(shadow evaluation); None: no shadow, and one running is removed",
    )
    signature: Signature | None = None

    @model_validator(mode="after")
    def _shadow_is_never_a_rollback(self) -> DesiredState:
        if self.shadow is not None and self.shadow.rollback:
            raise ValueError("a shadow is never installed, so it cannot be a rollback")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_shadow(self, handler: SerializerFunctionWrapHandler) -> Any:
        # No "shadow": null in the payload or in the signed canonical bytes: a state without
        # a shadow keeps the bytes and the signature it had before the field existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("shadow", 0) is None:
            del data["shadow"]
        return data


class LastFailure(_Wire):
    """Why the device refused or rolled back a version."""

    version: int
    reason: str = Field(description="one of edgefl.releasesign.REASONS")
    detail: str = Field(max_length=2000)
    at: int


class ReportedState(_Wire):
    """What a device runs, published retained on its ``state/reported`` topic."""

    v: Literal[1] = 1
    device: str = Field(pattern=ID_REGEX)
    model: str | None = None
    version: int | None = None
    variant: str | None = None
    sha256: str | None = None
    since: int | None = Field(None, description="when the running model was swapped in")
    state: Literal["running", "downloading", "verifying", "rolled_back", "failed", "none"]
    last_failure: LastFailure | None = None
    rollbacks: int = Field(0, ge=0)
    agent: str | None = Field(
        None,
        max_length=32,
        pattern=r"^[0-9A-Za-z.+!_-]+$",
        description="the agent's edgefl version; left out of the JSON when absent, so an "
        "older agent's report (without it) is read as before",
    )

    @model_serializer(mode="wrap")
    def _without_absent_agent(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("agent", 0) is None:
            del data["agent"]
        return data


_WireT = TypeVar("_WireT", bound=_Wire)


def _parse(payload: bytes | str, cls: type[_WireT], what: str) -> _WireT:
    raw = payload.encode("utf-8") if isinstance(payload, str) else payload
    if len(raw) > MAX_STATE_BYTES:
        raise BadInputError(f"{what} of {len(raw)} bytes exceeds {MAX_STATE_BYTES}")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise BadInputError(f"malformed {what} at {where}: {first['msg']}") from exc


def parse_desired(payload: bytes | str) -> DesiredState:
    """A desired state from its payload (its signature is not checked here).

    Raises:
        BadInputError: Too large, not JSON, or not a desired state.
    """
    return _parse(payload, DesiredState, "desired state")


def parse_reported(payload: bytes | str) -> ReportedState:
    """A reported state from its payload.

    Raises:
        BadInputError: Too large, not JSON, or not a reported state.
    """
    return _parse(payload, ReportedState, "reported state")
