"""Rollout: tell a device, or the whole fleet, which released model to run (signed, retained).

:func:`publish_desired` builds a :class:`~edgefl.proto.desired.DesiredState` naming one
variant of a published release (its sha256 and size read from the release's manifest in
``<state_dir>/releases/<model>/<version>/<variant>.manifest.json``, after checking the
artifact beside it matches), signs it with the server's current release-signing key
(:func:`edgefl.server.release_keys.current_signing_key`, :func:`edgefl.releasesign.sign`)
and publishes it, QoS 1 and **retained**, on ``edgefl/{fleet}/{device}/state/desired``:

- for one device (``device="pi-01"``): on its own topic, in the fleet it enrolled in;
- for the whole fleet (``device=None``): one state addressed to ``"*"`` per fleet, signed
  once and published on *each* admitted device's own topic, since the broker's ACL is per
  device and a device reads only its own subtree.

Only a **published** release is deployed (:func:`published_variants`): its registry row
must say ``published``, and the named variant must be one of its published variants
with the sha256 the registry recorded. Files in the releases folder are not enough: an
interrupted ``server release`` (a crash after its folder's rename, before its row says
``published``) leaves files behind a ``failed`` row, and a variant the accuracy gate left
out has a row but no file.

Retained, so a device that is offline gets it when it reconnects, and a newer state
replaces the older one on the topic. A rollback is the same with ``rollback=True`` naming
the older version: the device runs an older version only when a signed state says so.
Every state also carries the revoked release-key ids (:func:`revoked_key_ids`), so
devices stop trusting a revoked key with the next state they accept.

The publisher connects as the rollout service identity (CN ``edgefl-rollout``), the only
one besides ``edgefl-commands`` the broker's ACL lets write ``state/desired``; its
certificate is issued into ``<ca_dir>/services/edgefl-rollout/`` when missing or due. A
PUBACK with a failure reason code (the ACL refusing) is an error, not a silent loss.

``edgefl server deploy MODEL VERSION [--variant V] [--device D | --fleet] [--rollback]
[--expires-days N]`` (:mod:`edgefl.server.cli_deploy`) calls :func:`deploy`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from edgefl.config import TlsFiles
from edgefl.errors import BadInputError, ConfigError, ServiceUnavailableError
from edgefl.manifest import read_manifest, sha256_file
from edgefl.mqtt_client import identity_session
from edgefl.proto.desired import DesiredModel, DesiredState
from edgefl.proto.ids import InvalidIdError, check_id
from edgefl.proto.topics import state_desired_topic
from edgefl.server.config import ServerConfig
from edgefl.server.fleet_ca import ROLLOUT_IDENTITY, FleetCA
from edgefl.server.models_service import ARTIFACT_SUFFIX, MANIFEST_SUFFIX, release_paths

__all__ = [
    "DEFAULT_EXPIRES_DAYS",
    "Deployment",
    "broker_address",
    "deploy",
    "desired_state",
    "publish_desired",
    "publish_retained",
    "published_variants",
    "release_variants",
    "releases_folder",
    "rollout_identity",
]

log = logging.getLogger(__name__)

DEFAULT_EXPIRES_DAYS: Final = 30.0
"""How long a desired state stays valid: a device offline longer keeps what it runs."""

_RENEW_BEFORE: Final = dt.timedelta(days=30)


@dataclass
class Deployment:
    """What :func:`publish_desired` published.

    Attributes:
        states: The signed states, one per fleet (``device="*"``) or the one device's.
        topics: Every topic a state was published on (retained), sorted.
        key_id: The release key that signed them.
    """

    states: list[DesiredState]
    topics: list[str]
    key_id: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``edgefl server deploy --json``)."""
        first = self.states[0]
        model = first.model
        return {
            "model": model.model if model else None,
            "version": model.version if model else None,
            "variant": model.variant if model else None,
            "sha256": model.artifact_sha256 if model else None,
            "size_bytes": model.size_bytes if model else None,
            "rollback": model.rollback if model else False,
            "issued_at": first.issued_at,
            "expires_at": first.expires_at,
            "key_id": self.key_id,
            "revoked_keys": first.revoked_keys,
            "targets": [f"{s.fleet}/{s.device}" for s in self.states],
            "topics": self.topics,
        }


def release_variants(releases_dir: Path, model: str, version: int) -> list[str]:
    """The variants published for ``model`` ``version`` (those with a manifest), sorted."""
    folder = release_paths(releases_dir, model, version, "x")[0].parent
    if not folder.is_dir():
        return []
    return sorted(
        p.name.removesuffix(MANIFEST_SUFFIX)
        for p in folder.iterdir()
        if p.name.endswith(MANIFEST_SUFFIX)
        and (folder / (p.name.removesuffix(MANIFEST_SUFFIX) + ARTIFACT_SUFFIX)).is_file()
    )


def desired_state(
    releases_dir: Path,
    model: str,
    version: int,
    variant: str | None,
    *,
    fleet: str,
    device: str,
    issued_at: int,
    expires_at: int,
    rollback: bool = False,
    revoked_keys: Sequence[str] = (),
) -> DesiredState:
    """The unsigned desired state naming one published variant (checked against its files).

    Raises:
        BadInputError: No such release or variant, several variants and none named, or an
            artifact that does not match its manifest (it would be refused by every device).
    """
    if variant is None:
        variants = release_variants(releases_dir, model, version)
        if not variants:
            raise BadInputError(
                f"no release {model} {version} in {releases_dir}",
                hint="publish it with `edgefl server release`; list with `edgefl server releases`",
            )
        if len(variants) > 1:
            raise BadInputError(
                f"release {model} {version} has several variants: {', '.join(variants)}",
                hint="name one with --variant",
            )
        variant = variants[0]
    artifact, manifest_path = release_paths(releases_dir, model, version, variant)
    if not manifest_path.is_file() or not artifact.is_file():
        have = release_variants(releases_dir, model, version)
        raise BadInputError(
            f"no variant {variant!r} of release {model} {version} in {releases_dir}",
            hint=f"published variants: {', '.join(have)}" if have else "publish it first",
        )
    manifest = read_manifest(manifest_path)
    size = artifact.stat().st_size
    if size != manifest.size_bytes or sha256_file(artifact) != manifest.sha256:
        raise BadInputError(
            f"{artifact} does not match its manifest (sha256 or size): not deploying it",
            hint="the release folder was changed after publishing; publish the release again",
        )
    return DesiredState(
        fleet=fleet,
        device=device,
        issued_at=issued_at,
        expires_at=expires_at,
        model=DesiredModel(
            model=model,
            version=version,
            variant=variant,
            artifact_sha256=manifest.sha256,
            size_bytes=manifest.size_bytes,
            rollback=rollback,
        ),
        revoked_keys=list(revoked_keys),
    )


@dataclass(frozen=True)
class PublishedRelease:
    """A published release's variants, as the registry recorded them.

    Attributes:
        variants: Variant -> sha256 of each published variant.
        left_out: Variant -> why, of each recorded variant that was not published (the
            accuracy gate's ``accuracy_drop``).
    """

    variants: dict[str, str]
    left_out: dict[str, str]

    def check(self, model: str, version: int, variant: str, sha256: str) -> None:
        """Refuse a variant that is not one of the published ones, or not their bytes.

        Raises:
            BadInputError: It was left out, is not recorded, or its manifest's sha256 is
                not the one the registry recorded.
        """
        have = ", ".join(sorted(self.variants)) or "none"
        if variant in self.left_out:
            raise BadInputError(
                f"variant {variant!r} of release {model} {version} was not published: "
                f"{self.left_out[variant]}",
                hint=f"published variants: {have}",
            )
        recorded = self.variants.get(variant)
        if recorded is None:
            raise BadInputError(
                f"the registry records no published variant {variant!r} of release "
                f"{model} {version}",
                hint=f"published variants: {have}",
            )
        if recorded != sha256:
            raise BadInputError(
                f"variant {variant!r} of release {model} {version} on disk (sha256 "
                f"{sha256[:12]}…) is not the one the registry recorded ({recorded[:12]}…): "
                "not deploying it",
                hint="the releases folder was changed after publishing; make a new release",
            )


def published_variants(engine: Engine, model: str, version: int) -> PublishedRelease:
    """The published variants of ``model`` ``version``, by the registry.

    Raises:
        BadInputError: The registry has no such release, or it is not ``published``
            (``failed``: a variant failed verification, or the release was interrupted).
        ConfigError: The registry cannot be read.
    """
    from edgefl.server.registry.db import display_url, session_factory
    from edgefl.server.registry.models import Release, ReleaseVariant

    try:
        with session_factory(engine)() as session:
            release = session.scalar(
                select(Release).where(Release.model == model, Release.version == version)
            )
            if release is None:
                raise BadInputError(
                    f"the registry has no release {model} {version}: only a published "
                    "release is deployed",
                    hint="see `edgefl server releases`; files in the releases folder with no "
                    "release recorded are not a release (was the registry reset?): make one "
                    "with `edgefl server release`",
                )
            if release.status != "published":
                why = "; ".join(str(r) for r in json.loads(release.reasons_json or "[]"))
                raise BadInputError(
                    f"release {model} {version} is {release.status!r}, not published"
                    + (f" ({why})" if why else "")
                    + ": it is not deployed",
                    hint="deploy a published version (`edgefl server releases`) or make a new "
                    f"release (`edgefl server release --run {release.run_id}`); files an "
                    f"interrupted release left in <releases>/{model}/{version}/ are not "
                    "served as a release and can be removed",
                )
            rows = session.scalars(
                select(ReleaseVariant).where(ReleaseVariant.release_id == release.id)
            )
            variants: dict[str, str] = {}
            left_out: dict[str, str] = {}
            for row in rows:
                if row.path:
                    variants[row.variant] = row.sha256
                else:
                    reasons = json.loads(row.reasons_json or "[]")
                    left_out[row.variant] = "; ".join(map(str, reasons)) or "not published"
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot read the releases in the registry {display_url(str(engine.url))}: {exc}",
            hint="`edgefl server start` (or `edgefl server release`) migrates the registry",
        ) from exc
    return PublishedRelease(variants=variants, left_out=left_out)


def rollout_identity(ca_dir: Path) -> TlsFiles:
    """The ``edgefl-rollout`` client certificate, issued when missing or due for renewal."""
    folder = ca_dir / "services" / ROLLOUT_IDENTITY
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    due = True
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        due = not key_file.is_file() or (
            cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < _RENEW_BEFORE
        )
    except (OSError, ValueError):
        pass
    if due:
        FleetCA.load(ca_dir).issue_service_cert(ROLLOUT_IDENTITY)
        log.info("issued the %s service certificate in %s", ROLLOUT_IDENTITY, folder)
    return TlsFiles(ca_file=ca_dir / "ca.pem", cert_file=cert_file, key_file=key_file)


def publish_retained(
    messages: Mapping[str, bytes], *, host: str, port: int, tls: TlsFiles, timeout_s: float
) -> dict[str, str]:
    """Publish each (topic, payload) QoS 1 retained; topic -> failure reason of refused ones.

    The connection holds this host's ``edgefl-rollout`` session
    (:func:`edgefl.mqtt_client.identity_session`): a deploy and the rollouts of other models
    take turns rather than take over each other's connection.

    Raises:
        ServiceUnavailableError: The broker cannot be reached, refuses the connection, or
            does not acknowledge within ``timeout_s``; or another publisher held the
            identity's session for ``timeout_s``.
    """
    with identity_session(tls, wait_s=timeout_s, what="the rollout publisher"):
        return _publish_retained(messages, host=host, port=port, tls=tls, timeout_s=timeout_s)


def _publish_retained(
    messages: Mapping[str, bytes], *, host: str, port: int, tls: TlsFiles, timeout_s: float
) -> dict[str, str]:
    from edgefl.mqtt_client import build_client

    client = build_client(ROLLOUT_IDENTITY, tls=tls, what="rollout publisher")
    connected = threading.Event()
    connect_rc: list[Any] = []
    acks: dict[int, Any] = {}
    lock = threading.Lock()
    done = threading.Condition(lock)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        connect_rc.append(rc)
        connected.set()

    def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with done:
            acks[mid] = rc
            done.notify_all()

    client.on_connect = on_connect
    client.on_publish = on_publish
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise ServiceUnavailableError(
            f"cannot reach the broker at {host}:{port}: {exc}",
            hint="is `edgefl server start` running?",
        ) from exc
    client.loop_start()
    try:
        if not connected.wait(timeout_s) or connect_rc[0].is_failure:
            why = connect_rc[0] if connect_rc else "no answer"
            raise ServiceUnavailableError(
                f"the broker at {host}:{port} did not accept {ROLLOUT_IDENTITY}: {why}"
            )
        mids: dict[int, str] = {}
        for topic, payload in messages.items():
            info = client.publish(topic, payload, qos=1, retain=True)
            mids[info.mid] = topic
        deadline = time.monotonic() + timeout_s
        with done:
            while not all(mid in acks for mid in mids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceUnavailableError(
                        f"the broker acknowledged {sum(m in acks for m in mids)} of "
                        f"{len(mids)} desired states within {timeout_s} s"
                    )
                done.wait(left)
        return {
            topic: str(acks[mid])
            for mid, topic in mids.items()
            if getattr(acks[mid], "is_failure", False)
        }
    finally:
        client.disconnect()
        client.loop_stop()


def publish_desired(
    *,
    ca_dir: Path,
    db_url: str,
    releases_dir: Path,
    broker_host: str,
    broker_port: int,
    model: str,
    version: int,
    variant: str | None = None,
    device: str | None = None,
    rollback: bool = False,
    expires_days: float = DEFAULT_EXPIRES_DAYS,
    now: int | None = None,
    timeout_s: float = 10.0,
) -> Deployment:
    """Sign and publish the desired state for one device, or the whole fleet.

    Args:
        ca_dir: The fleet CA folder (release keys, the rollout identity).
        db_url: The registry: which devices are admitted, and in which fleet.
        releases_dir: Published releases.
        broker_host: The broker to publish on.
        broker_port: Its port (mutual TLS).
        model: Model name.
        version: Release version.
        variant: Variant; may be left out when the release has only one.
        device: One admitted device, or ``None`` for every admitted device.
        rollback: The state names an older version on purpose.
        expires_days: Validity of the state.
        now: Issue time (unix seconds); the clock by default.
        timeout_s: Longest wait for the broker.

    Returns:
        What was published.

    Raises:
        BadInputError: Bad names, an unknown release or variant, a release the registry
            does not record as ``published`` (or a variant it left out), an unknown or
            not admitted device, or no admitted device at all.
        ConfigError: No release-signing key, an unreadable CA or registry.
        ServiceUnavailableError: The broker is unreachable or refused the states.
    """
    from edgefl.releasesign import sign
    from edgefl.server.enrollment import admitted_fleets
    from edgefl.server.registry import make_engine
    from edgefl.server.release_keys import current_signing_key, revoked_key_ids

    try:
        check_id(model, "model")
        if variant is not None:
            check_id(variant, "variant")
        if device is not None:
            check_id(device, "device id")
    except InvalidIdError as exc:
        raise BadInputError(str(exc)) from exc
    if version < 1:
        raise BadInputError(f"version {version} is not a positive integer")
    if not expires_days > 0:
        raise BadInputError(f"--expires-days must be positive, got {expires_days}")
    engine = make_engine(db_url)
    try:
        admitted = admitted_fleets(engine)
        published = published_variants(engine, model, version)
    finally:
        engine.dispose()
    if device is not None:
        fleet = admitted.get(device)
        if fleet is None:
            raise BadInputError(
                f"device {device!r} is not an admitted device of the registry",
                hint="see `edgefl server devices`; admit it with `edgefl server admit`",
            )
        targets = {fleet: [device]}
    else:
        targets = {}
        for dev, fl in sorted(admitted.items()):
            targets.setdefault(fl, []).append(dev)
        if not targets:
            raise BadInputError("no admitted device in the registry: nothing to deploy to")
    issued = int(time.time()) if now is None else now
    expires = issued + int(expires_days * 86400)
    kid, key = current_signing_key(ca_dir)
    revoked = revoked_key_ids(ca_dir)
    states: list[DesiredState] = []
    messages: dict[str, bytes] = {}
    for fleet, devices in sorted(targets.items()):
        state = desired_state(
            releases_dir,
            model,
            version,
            variant,
            fleet=fleet,
            device=device if device is not None else "*",
            issued_at=issued,
            expires_at=expires,
            rollback=rollback,
            revoked_keys=revoked,
        )
        assert state.model is not None
        published.check(model, version, state.model.variant, state.model.artifact_sha256)
        signed = sign(state, key)
        states.append(signed)
        payload = signed.to_json()
        for dev in devices:
            messages[state_desired_topic(fleet, dev)] = payload
    refused = publish_retained(
        messages,
        host=broker_host,
        port=broker_port,
        tls=rollout_identity(ca_dir),
        timeout_s=timeout_s,
    )
    if refused:
        raise ServiceUnavailableError(
            f"the broker refused {len(refused)} desired state(s): "
            + ", ".join(f"{t} ({r})" for t, r in sorted(refused.items())),
            hint=f"the broker's ACL must let {ROLLOUT_IDENTITY} write state/desired",
        )
    log.warning(
        "published %s %d %s (signed by %s%s) on %d device topic(s)",
        model,
        version,
        states[0].model.variant if states[0].model else "-",
        kid,
        ", a rollback" if rollback else "",
        len(messages),
    )
    return Deployment(states=states, topics=sorted(messages), key_id=kid)


def broker_address(config: ServerConfig) -> tuple[str, int]:
    """The broker to publish on: the running server's (``server.json``), else the config's.

    Raises:
        ConfigError: ``broker.port`` is 0 (chosen at start) and no server is running.
    """
    from edgefl.netutil import dial_host
    from edgefl.server.runtime import read_runtime

    runtime = read_runtime(config.resolved_state_dir) or {}
    broker = runtime.get("broker") if isinstance(runtime.get("broker"), dict) else None
    host = str(broker["host"]) if broker else dial_host(config.broker.host)
    port = int(broker["port"]) if broker else config.broker.port
    if port == 0:
        raise ConfigError(
            "the broker's port is chosen at start (broker.port 0) and no server is running",
            hint="start the server (`edgefl server start`) or set broker.port",
        )
    return host, port


def releases_folder(config: ServerConfig) -> Path:
    """The folder of published releases the delivery service serves."""
    from edgefl.server.models_service import resolve_settings

    releases = resolve_settings(config).releases_dir
    assert releases is not None  # resolve_settings fills it in
    return releases


def deploy(
    config: ServerConfig,
    model: str,
    version: int,
    *,
    variant: str | None = None,
    device: str | None = None,
    rollback: bool = False,
    expires_days: float = DEFAULT_EXPIRES_DAYS,
    timeout_s: float = 10.0,
) -> Deployment:
    """:func:`publish_desired` with the server's config: its CA, registry, releases, broker.

    The broker is the running server's (``server.json``), else ``broker.host``/``port``.

    Raises:
        See :func:`publish_desired`.
    """
    host, port = broker_address(config)
    return publish_desired(
        ca_dir=config.resolved_ca_dir,
        db_url=config.resolved_db_url,
        releases_dir=releases_folder(config),
        broker_host=host,
        broker_port=port,
        model=model,
        version=version,
        variant=variant,
        device=device,
        rollback=rollback,
        expires_days=expires_days,
        timeout_s=timeout_s,
    )
