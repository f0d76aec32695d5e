"""The agent daemon: sources → outbox → MQTT, with a status file for ``agent status``.

Every record a source produces is wrapped in the fleet envelope and committed to the
SQLite outbox *before* anything is sent; the single sender thread publishes with QoS 1
and deletes a record only on a successful PUBACK. The daemon writes
``<state_dir>/agent-status.json`` every ``status_interval_s`` so that ``edgefl agent
status`` can report on a running (or dead) agent from another process.

The agent subscribes (QoS 1, persistent session) to ``edgefl/{fleet}/{device}/cmd/+`` and
answers each command once through the outbox (see :mod:`edgefl.edge_agent.commands`);
built-in commands are ``ping``, ``status`` and ``set-rate``, and ``install-cert`` when the
link has a client certificate (mutual TLS) to renew.

With a ``training:`` section (:class:`~edgefl.edge_agent.fl.supernode.TrainingConfig`)
the agent also keeps every labelled sample in its local data store
(``<state_dir>/samples.db``), supervises a Flower SuperNode whose ClientApp trains on it,
and sends the ClientApp's per-round training reports (spooled as JSON files in
``<state_dir>/fl-telemetry/``) as ``telemetry/training`` envelopes through the outbox,
exactly once: a file is committed under its name as import key, then deleted.

With an ``inference:`` section (:class:`~edgefl.edge_agent.inference.InferenceConfig`)
every sample of the chosen sources is also offered to the inference loop
(:mod:`edgefl.edge_agent.inference.loop`), which answers it with the model manager's
current model (moving to a new one between two samples when the manager swaps), commits
a ``result`` envelope, and reports its figures per model version as ``telemetry/inference``
and in the status file. A record marked ``evaluation`` (a held-out split) is answered and
scored but never kept in the training data store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from edgefl.config import StrictModel
from edgefl.edge_agent.commands import (
    CommandError,
    CommandProcessor,
    ping_handler,
    prewarm_handler,
    set_rate_handler,
    status_handler,
)
from edgefl.edge_agent.datastore import SAMPLES_FILE, LocalDataStore, Sample
from edgefl.edge_agent.fl.supernode import TELEMETRY_DIR, SuperNodeSupervisor, TrainingConfig
from edgefl.edge_agent.identity import CertRenewer
from edgefl.edge_agent.inference.config import InferenceConfig
from edgefl.edge_agent.metrics import AgentMetricsConfig
from edgefl.edge_agent.models.config import ModelsConfig
from edgefl.edge_agent.mqtt_link import InboundMessage, MqttLink, MqttLinkConfig, OutboxSender
from edgefl.edge_agent.offload.config import OffloadConfig
from edgefl.edge_agent.outbox import (
    Outbox,
    OutboxFullError,
    OutboxItem,
    OutboxPolicy,
    Record,
    RecordTooLargeError,
)
from edgefl.edge_agent.outbox import read_stats as read_outbox_stats
from edgefl.edge_agent.sources import (
    DatasetReplaySource,
    DataSource,
    SourceConfig,
    SourceRecord,
    build_source,
)
from edgefl.enrollment import INSTALL_CERT_COMMAND
from edgefl.errors import BadInputError
from edgefl.files import write_text_atomic
from edgefl.procs import pid_alive
from edgefl.proto.commands import PREWARM_TRAINING_COMMAND
from edgefl.proto.ids import ID_REGEX
from edgefl.proto.topics import (
    command_filter,
    record_topic,
    state_desired_topic,
    state_reported_topic,
    status_topic,
)

__all__ = ["STATUS_FILE", "Agent", "AgentConfig", "read_status"]

logger = logging.getLogger(__name__)

STATUS_FILE = "agent-status.json"
OUTBOX_FILE = "outbox.db"


class AgentConfig(StrictModel):
    """The agent's one config file (YAML). Unknown keys are errors."""

    device_id: str = Field(pattern=ID_REGEX, description="This device's id (its certificate CN).")
    fleet: str = Field("default", pattern=ID_REGEX, description="Fleet the device belongs to.")
    state_dir: Path = Field(description="Where the outbox and status file live.")
    encoding: Literal["json", "protobuf"] = Field(
        "json", description="Envelope encoding on the wire (json is readable by mosquitto_sub)."
    )
    mqtt: MqttLinkConfig
    outbox: OutboxPolicy = Field(default_factory=lambda: OutboxPolicy())
    sources: list[SourceConfig] = Field(default_factory=list)
    status_interval_s: float = Field(1.0, gt=0, le=3600)
    agent_report_s: float = Field(
        60.0,
        ge=0,
        description="Every this long while connected, report the outbox (records, bytes, "
        "oldest age, dropped, expired) as telemetry/agent, so the server can show each "
        "device's backlog; 0: never. Nothing is reported while disconnected: the backlog "
        "then would be old news when it arrived.",
    )
    offload: OffloadConfig | None = Field(
        None, description="Device model and cloud offload for `edgefl agent predict`."
    )
    inference: InferenceConfig = Field(
        default_factory=lambda: InferenceConfig(),
        description="The inference loop: answer every sample of the sources with the model "
        "manager's current model, offloading as offload: does (off by default).",
    )
    training: TrainingConfig | None = Field(
        None, description="Federated training on this device (a supervised Flower SuperNode)."
    )
    cert_renew_days: float = Field(
        30.0,
        gt=0,
        description="Ask the server for a new certificate (over MQTT, same key) when less "
        "than this is left of mqtt.tls.cert_file; the server answers with install-cert.",
    )
    cert_renew_retry_s: float = Field(
        600.0, gt=0, description="Ask again after this long while no certificate came."
    )
    models: ModelsConfig = Field(
        default_factory=lambda: ModelsConfig(),
        description="Signed model updates: follow state/desired, download, verify, swap "
        "(off by default).",
    )
    metrics: AgentMetricsConfig = Field(
        default_factory=lambda: AgentMetricsConfig(),
        description="A local Prometheus endpoint (off by default; loopback).",
    )

    @model_validator(mode="after")
    def _inference_has_a_model_and_its_sources(self) -> AgentConfig:
        if not self.inference.enabled:
            return self
        if not self.models.enabled:
            raise ValueError(
                "inference.enabled needs models.enabled: the loop serves the model the model "
                "manager installs (add a models: section with enabled: true and its server)"
            )
        names = [s.name for s in self.sources]
        unknown = sorted(set(self.inference.sources or []) - set(names))
        if unknown:
            raise ValueError(
                f"inference.sources names {unknown}, which are not sources of this agent "
                f"(it has {sorted(names)})"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _client_id_defaults_to_device_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("mqtt"), dict):
            mqtt = data["mqtt"]
            if "client_id" not in mqtt and isinstance(data.get("device_id"), str):
                data = {**data, "mqtt": {**mqtt, "client_id": data["device_id"]}}
        return data


class Agent:
    """Runs the data sources, the outbox and the MQTT link until stopped."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(config.state_dir / OUTBOX_FILE, config.device_id, config.outbox)
        self.link = MqttLink(config.mqtt, status_topic=status_topic(config.fleet, config.device_id))
        self.sender = OutboxSender(self.outbox, self.link)
        # Replay sources read their samples from a cache a child process prepares, so the
        # agent never imports scikit-learn (see sources.replay_arrays).
        self.sources: list[DataSource] = [
            build_source(s, cache_dir=config.state_dir / "cache", device_id=config.device_id)
            for s in config.sources
        ]
        self.rejected = 0
        self.oversized = 0  # records refused as larger than the fleet carries
        self._started_at = time.time()
        self.commands = CommandProcessor(
            config.state_dir,
            fleet=config.fleet,
            device_id=config.device_id,
            outbox=self.outbox,
            encoding=config.encoding,
            ack=self.link.ack,
            wake=self.sender.wake,
            synchronous=config.outbox.synchronous,
        )
        self.commands.register("ping", ping_handler)
        self.commands.register("status", status_handler(lambda: self.status(running=True)))
        self.commands.register("set-rate", set_rate_handler(self.set_source_rate))
        self.renewer: CertRenewer | None = None
        self._next_renewal = 0.0
        tls = config.mqtt.tls
        if tls.cert_file and tls.key_file and tls.ca_file:
            self.renewer = CertRenewer(
                config.device_id,
                config.fleet,
                cert_path=tls.cert_file,
                key_path=tls.key_file,
                ca_path=tls.ca_file,
                renew_before=dt.timedelta(days=config.cert_renew_days),
            )
            self.commands.register(INSTALL_CERT_COMMAND, self.renewer.install)
        self.link.subscribe(command_filter(config.fleet, config.device_id), qos=1)
        self.models: Any = None  # a ModelManager when models.enabled
        self._desired_topic = state_desired_topic(config.fleet, config.device_id)
        self._inbound: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
        if config.models.enabled:
            self.models = self._model_manager()
            self.link.subscribe(self._desired_topic, qos=1)
        self.datastore: LocalDataStore | None = None
        self.supervisor: SuperNodeSupervisor | None = None
        self.telemetry_imported = 0
        self.telemetry_bad = 0
        self._samples = 0
        if config.training is not None:
            self.datastore = LocalDataStore(
                config.state_dir / SAMPLES_FILE,
                max_samples=config.training.max_samples,
                eval_fraction=config.training.eval_fraction,
            )
            self._samples = self.datastore.count()
            self.supervisor = SuperNodeSupervisor(
                config.training,
                device_id=config.device_id,
                state_dir=config.state_dir,
                data_store=self.datastore.path,
            )
            self.commands.register(
                PREWARM_TRAINING_COMMAND, prewarm_handler(self.supervisor.prewarm)
            )
        self.inference: Any = None  # an InferenceLoop when inference.enabled
        if config.inference.enabled:
            # Imported only when used: the loop loads numpy, grpc and the runtimes.
            from edgefl.edge_agent.inference.loop import InferenceLoop

            self.inference = InferenceLoop(
                config.inference,
                models=self.models,
                runtime_key=config.models.runtime,
                commit=self.submit,
                sources=self.sources,
                device_id=config.device_id,
                fleet=config.fleet,
            )
        self.metrics: Any = None  # an AgentMetrics when metrics.enabled
        if config.metrics.enabled:
            # Imported only when used: prometheus_client and its HTTP server.
            from edgefl.edge_agent.metrics import AgentMetrics

            self.metrics = AgentMetrics(self, config.metrics)
            if self.inference is not None:
                self.inference.stats.on_answer = self.metrics.observe_answer

    def _model_manager(self) -> Any:
        """The model manager, with the device's pinned release keys and its mTLS identity."""
        from edgefl.edge_agent.models.manager import GrpcSource, ModelManager
        from edgefl.releasesign import TrustStore

        models = self.config.models
        assert models.server is not None  # ModelsConfig requires it when enabled
        trust = TrustStore.load(
            self.config.state_dir / "identity", extra_keys=models.release_signing_keys
        )
        if not trust.trusted_ids:
            logger.warning(
                "models: no release-signing key is trusted (none pinned at enrollment or in "
                "models.release_signing_keys): every release will be refused"
            )
        return ModelManager(
            models,
            state_dir=self.config.state_dir,
            trust=trust,
            source=GrpcSource(
                models.server,
                models.tls or self.config.mqtt.tls,
                timeout_s=models.download_timeout_s,
                stall_timeout_s=models.stall_timeout_s,
            ),
            device_id=self.config.device_id,
            fleet=self.config.fleet,
            publish=self._publish_reported,
        )

    def _publish_reported(self, reported: Any) -> None:
        """Publish the model manager's reported state, retained, on ``state/reported``."""
        topic = state_reported_topic(self.config.fleet, self.config.device_id)
        self.link.publish(topic, reported.to_json(), qos=1, retain=True)

    def _route_inbound(self, stop: threading.Event) -> None:
        """Hand ``state/desired`` to the model manager, everything else to the commands."""
        while not stop.is_set():
            try:
                message = self.link.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if message.topic == self._desired_topic and self.models is not None:
                self.models.submit(message.payload)  # only queues: the manager's thread works
                self.link.ack(message)
            else:
                self._inbound.put(message)

    def set_source_rate(self, name: str | None, rate_hz: float) -> tuple[str, float]:
        """Change a dataset-replay source's rate (the ``set-rate`` command).

        Args:
            name: Source name; ``None`` when the agent has exactly one replay source.
            rate_hz: New samples per second, validated like the config field.

        Returns:
            The source's name and its previous rate.

        Raises:
            CommandError: No such source, or the rate is out of range.
        """
        replay = [s for s in self.sources if isinstance(s, DatasetReplaySource)]
        if name is None:
            if len(replay) != 1:
                raise CommandError(
                    f"name the source: the agent has {len(replay)} replay sources "
                    f"{sorted(s.name for s in replay)}"
                )
            source = replay[0]
        else:
            matches = [s for s in replay if s.name == name]
            if not matches:
                raise CommandError(
                    f"no replay source {name!r} (have {sorted(s.name for s in replay)})"
                )
            source = matches[0]
        try:
            previous = source.set_rate(rate_hz)
        except ValueError as exc:
            raise CommandError(f"invalid rate_hz {rate_hz}: {exc}") from exc
        return source.name, previous

    def topic_for(self, record: SourceRecord) -> str:
        """``edgefl/{fleet}/{device}/{kind}/{stream}``."""
        return record_topic(self.config.fleet, self.config.device_id, record.kind, record.stream)

    def _item(self, record: SourceRecord) -> OutboxItem:
        """An outbox item whose payload is the envelope, encoded once the seq is known."""
        from edgefl.proto.serde import ENVELOPE_VERSION, Envelope, encode_envelope

        ts_ms = int(time.time() * 1000)
        incarnation = self.outbox.incarnation

        def encode(seq: int) -> bytes:
            env = Envelope(
                version=ENVELOPE_VERSION,
                device_id=self.config.device_id,
                incarnation=incarnation,
                seq=seq,
                ts_ms=ts_ms,
                kind=record.kind,
                content_type=record.content_type,
                body=record.body,
            )
            return encode_envelope(env, self.config.encoding)

        return OutboxItem(topic=self.topic_for(record), body=encode, kind=record.kind)

    def submit(self, records: Sequence[SourceRecord]) -> list[int]:
        """Commit records to the outbox in one transaction; returns the stored seqs.

        A record whose envelope is over the largest payload the fleet carries is refused
        (counted in ``rejected`` and ``oversized``, and by the outbox) and the rest of the
        batch stored. When the batch does not fit under ``reject_new``, the records are
        offered one by one so that as many as fit are kept; each refused one is counted in
        ``rejected``.
        """
        if not records:
            return []
        pending = list(records)
        stored: list[Record] = []
        while pending:
            try:
                stored += self.outbox.put_many([self._item(r) for r in pending])
                break
            except RecordTooLargeError as exc:
                # Never sendable: drop it from the batch (it is counted once) and go on.
                self._refused_oversized(pending.pop(exc.index), exc)
            except OutboxFullError:
                for record in pending:
                    try:
                        stored += self.outbox.put_many([self._item(record)])
                    except RecordTooLargeError as exc:
                        self._refused_oversized(record, exc)
                    except OutboxFullError as exc:
                        self.rejected += 1
                        logger.warning("outbox refused a %s record: %s", record.kind, exc)
                break
        self.sender.wake()
        if self.datastore is not None:
            self._keep_samples(records)
        return [r.seq for r in stored]

    def _refused_oversized(self, record: SourceRecord, exc: RecordTooLargeError) -> None:
        self.rejected += 1
        self.oversized += 1
        logger.error("refused a %s record of stream %s: %s", record.kind, record.stream, exc)

    def _keep_samples(self, records: Sequence[SourceRecord]) -> None:
        assert self.datastore is not None
        # An evaluation record (a held-out split) is scored, never trained on.
        samples = [
            Sample(x=r.sample[0], y=r.sample[1], stream=r.stream)
            for r in records
            if r.sample is not None and not r.evaluation
        ]
        if not samples:
            return
        try:
            dropped = self.datastore.add_many(samples)
        except sqlite3.Error as exc:  # training data is best effort; the outbox is not
            logger.error("could not store %d training samples: %s", len(samples), exc)
            return
        self._samples += len(samples) - dropped

    def import_telemetry(self) -> int:
        """Move the ClientApp's spooled training reports into the outbox, exactly once.

        Each ``<state_dir>/fl-telemetry/*.json`` is committed with ``put_once`` under its
        file name, then deleted: a crash in between leaves a file whose key is already
        committed, so the next import only deletes it. A file that is not a JSON object is
        renamed to ``*.bad`` and logged.

        Returns:
            How many reports were newly committed.
        """
        spool = self.config.state_dir / TELEMETRY_DIR
        if not spool.is_dir():
            return 0
        committed = 0
        for path in sorted(spool.glob("*.json")):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(doc, dict):
                    raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                bad = path.with_name(path.name + ".bad")
                logger.error(
                    "training telemetry %s is unusable (%s); set aside as %s", path, exc, bad
                )
                with contextlib.suppress(OSError):
                    path.replace(bad)
                self.telemetry_bad += 1
                continue
            record = SourceRecord(
                stream="training",
                kind="telemetry",
                content_type="application/json",
                body=json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),
            )
            try:
                stored = self.outbox.put_once(f"fl-telemetry:{path.name}", [self._item(record)])
            except RecordTooLargeError as exc:
                # It can never be sent: set it aside like an unusable report.
                bad = path.with_name(path.name + ".bad")
                logger.error(
                    "training telemetry %s cannot be sent (%s); set aside as %s", path, exc, bad
                )
                with contextlib.suppress(OSError):
                    path.replace(bad)
                self.telemetry_bad += 1
                self.oversized += 1
                continue
            except OutboxFullError as exc:
                logger.warning("outbox full, training telemetry %s waits: %s", path.name, exc)
                break
            if stored is not None:
                committed += 1
                self.telemetry_imported += 1
            path.unlink(missing_ok=True)
        if committed:
            self.sender.wake()
        return committed

    def _training_tick(self) -> None:
        if self.supervisor is None:
            return
        try:
            self.import_telemetry()
        except Exception:  # never let a spool problem stop the agent
            logger.exception("importing training telemetry failed")
        self.supervisor.poll(connected=self.link.connected, samples=self._samples)

    def _renewal_tick(self, now: float) -> None:
        """Ask for a new certificate when due; reconnect once one was installed."""
        renewer = self.renewer
        if renewer is None:
            return
        if renewer.reload_needed:
            renewer.reload_needed = False
            self.link.reload_tls()
            return
        if now < self._next_renewal or not self.link.connected or not renewer.due():
            return
        self._next_renewal = now + self.config.cert_renew_retry_s
        try:
            topic, payload = renewer.request()
        except BadInputError as exc:
            logger.error("cannot ask for a new certificate: %s", exc)
            return
        self.link.publish(topic, payload, qos=1)
        logger.warning(
            "certificate %s expires at %s: asked the server for a new one",
            renewer.cert_path,
            renewer.not_after(),
        )

    def run(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set; always closes cleanly (retained ``offline``)."""
        self.commands.recover()
        if self.metrics is not None:
            self.metrics.start()  # a port that cannot be bound fails the start, loudly
        router_stop = threading.Event()
        router: threading.Thread | None = None
        if self.models is not None:
            # The desired state shares the link's inbound queue with the commands.
            router = threading.Thread(
                target=self._route_inbound, args=(router_stop,), name="inbound-router", daemon=True
            )
            router.start()
            self.commands.start(self._inbound)
            self.models.start()
        else:
            self.commands.start(self.link.messages)
        self.link.start()
        self.sender.start()
        loop = self.inference
        if loop is not None:
            loop.start()  # loads the current model before the first sample is due
        next_status = 0.0
        next_training = 0.0
        next_report = time.monotonic() + self.config.inference.report_interval_s
        next_agent_report = time.monotonic() + self.config.agent_report_s
        try:
            while not stop.is_set():
                now = time.monotonic()
                for source in self.sources:
                    records = source.due(now)
                    self.submit(records)
                    if loop is not None and records and loop.serves(source.name):
                        loop.offer(source.name, records)
                if loop is not None and now >= next_report:
                    self.submit([loop.report()])
                    next_report = now + self.config.inference.report_interval_s
                if self.config.agent_report_s and now >= next_agent_report and self.link.connected:
                    self.submit([self.agent_report()])
                    next_agent_report = now + self.config.agent_report_s
                if now >= next_training:
                    self._training_tick()
                    self._renewal_tick(now)
                    next_training = now + 1.0
                if now >= next_status:
                    self.write_status(running=True)
                    next_status = now + self.config.status_interval_s
                stop.wait(0.01)
        finally:
            if loop is not None:
                loop.stop()  # answers what is queued; the results are committed
                self.submit([loop.report()])
            for source in self.sources:
                try:
                    source.close()
                except Exception:  # one source's problem must not stop the shutdown
                    logger.exception("closing source %s failed", source.name)
            if self.supervisor is not None:
                self.supervisor.close()
            if self.models is not None:
                self.models.stop()
            router_stop.set()
            if router is not None:
                router.join(5.0)
            self.commands.stop()
            self.sender.stop()
            self.link.close()
            if self.metrics is not None:
                self.metrics.stop()
            self.write_status(running=False)
            self.commands.close()
            if self.datastore is not None:
                self.datastore.close()
            self.outbox.close()

    def agent_report(self) -> SourceRecord:
        """The ``telemetry/agent`` record: the outbox as it is now and the agent's version."""
        from edgefl import __version__

        stats = self.outbox.stats()
        body = {
            "agent_version": __version__,
            "outbox": {
                "depth": stats.depth,
                "bytes": stats.bytes,
                "oldest_age_s": round(stats.oldest_age_s, 3),
                "dropped": stats.dropped,
                "expired": stats.expired,
            },
        }
        return SourceRecord(
            stream="agent",
            kind="telemetry",
            content_type="application/json",
            body=json.dumps(body, sort_keys=True, separators=(",", ":")).encode(),
        )

    def status(self, *, running: bool) -> dict[str, Any]:
        """The document ``agent status`` shows."""
        stats = self.outbox.stats()
        return {
            "device_id": self.config.device_id,
            "fleet": self.config.fleet,
            "pid": os.getpid(),
            "running": running,
            "started_at": self._started_at,
            "updated_at": time.time(),
            "connected": self.link.connected,
            "subscribed": self.link.subscribed,
            "outbox": {**asdict(stats), "rejected": self.rejected, "oversized": self.oversized},
            "sender": {
                "published": self.sender.published,
                "acked": self.sender.acked,
                "failed": self.sender.failed,
            },
            "commands": self.commands.stats.as_dict(),
            "training": self.training_status(),
            "sources": [self._source_status(s) for s in self.sources],
            "inference": None if self.inference is None else self.inference.status(),
            "metrics": None if self.metrics is None else self.metrics.address,
        }

    @staticmethod
    def _source_status(source: DataSource) -> dict[str, Any]:
        try:
            return source.status()
        except Exception:  # a plugin's status must not break the agent's
            logger.exception("source %s could not report its status", source.name)
            return {"name": source.name, "type": type(source).__name__}

    def training_status(self) -> dict[str, Any] | None:
        """The SuperNode supervisor's state, the data store and the telemetry import."""
        if self.supervisor is None or self.datastore is None:
            return None
        return {
            "supernode": self.supervisor.status(),
            "samples": self._samples,
            "max_samples": self.datastore.max_samples,
            "telemetry_imported": self.telemetry_imported,
            "telemetry_bad": self.telemetry_bad,
        }

    def write_status(self, *, running: bool) -> None:
        """Atomically rewrite the status file."""
        path = self.config.state_dir / STATUS_FILE
        write_text_atomic(path, json.dumps(self.status(running=running), indent=2) + "\n")


def read_status(config: AgentConfig) -> dict[str, Any]:
    """Status for ``agent status``: the daemon's last report plus the outbox as it is now.

    Works whether or not the agent runs: the outbox is read from its SQLite file, read
    only (:func:`~edgefl.edge_agent.outbox.read_stats`); WAL allows a reader beside the
    running writer. A damaged outbox shows as ``outbox.error``.
    """
    path = config.state_dir / STATUS_FILE
    report: dict[str, Any] = {}
    if path.is_file():
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            report = {}
    stale_after = max(5 * config.status_interval_s, 5.0)
    alive = bool(report.get("running")) and pid_alive(int(report.get("pid", 0)))
    fresh = time.time() - float(report.get("updated_at", 0.0)) < stale_after
    state = "running" if alive and fresh else ("stalled" if alive else "stopped")
    outbox: dict[str, Any] = {}
    if (config.state_dir / OUTBOX_FILE).is_file():
        # Read-only: this file may be a running agent's, so status never expires,
        # creates or quarantines anything in it; a damaged file is reported as such.
        try:
            outbox = asdict(read_outbox_stats(config.state_dir / OUTBOX_FILE, config.device_id))
        except BadInputError as exc:
            outbox = {"error": str(exc)}
    return {
        "device_id": config.device_id,
        "fleet": config.fleet,
        "state": state,
        "connected": bool(report.get("connected")) if state == "running" else False,
        "pid": report.get("pid"),
        "updated_at": report.get("updated_at"),
        "outbox": outbox or report.get("outbox", {}),
        "rejected": report.get("outbox", {}).get("rejected", 0),
        "sender": report.get("sender", {}),
        "commands": report.get("commands", {}),
        "training": report.get("training"),
        "sources": report.get("sources", []),
        "inference": report.get("inference"),
        # The local Prometheus endpoint's URL while the agent runs (metrics.enabled).
        "metrics": report.get("metrics") if state == "running" else None,
        "models": _models_status(config),
        "privacy": _privacy_status(config),
    }


def _privacy_status(config: AgentConfig) -> dict[str, Any] | None:
    """The device's lifetime ε and cap (``None`` without training or before any round)."""
    if config.training is None:
        return None
    from edgefl.edge_agent.fl.privacy import read_lifetime

    budget = config.training.privacy
    return read_lifetime(config.state_dir, budget.lifetime_epsilon, budget.lifetime_delta)


def _models_status(config: AgentConfig) -> dict[str, Any] | None:
    """The model manager's last status file (read-only); ``None`` when models are off."""
    from edgefl.edge_agent.models.manager import read_model_status

    doc = read_model_status(config.state_dir)
    if not doc and not config.models.enabled:
        return None
    return doc
