"""A silent network drop in the middle of a model download: noticed, abandoned, resumed.

A Wi-Fi or cellular link that goes away sends no FIN and no RST: packets just stop. The
device's download runs through :class:`tests.netproxy.TcpProxy` with a downlink rate
limit (so a few MiB take a few seconds), the relay is black-holed half-way (it stops
forwarding and reading, every socket stays open) and later brought back. The real
``Models`` service on port 0 with mutual TLS and the device's real client; the bytes the
server put on the link are counted in the relay.

Without a progress deadline the attempt hangs until gRPC's in-flight ping times out (58 s
measured for this drop, whatever the keepalive settings) or the call's deadline (300 s);
with ``stall_timeout_s`` it fails within that time of the last chunk, keeps the staged
bytes, and the retry after the network is back moves only the rest.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from edgefl.config import TlsFiles
from edgefl.edge_agent.models.download import DownloadError, download_artifact
from edgefl.edge_agent.models.health import golden_probe, load_runtime
from edgefl.edge_agent.models.manager import GrpcSource, ModelsConfig
from edgefl.manifest import sha256_file
from edgefl.testing import wait_for

try:
    from tests.delivery_helpers import (
        MODEL,
        VARIANT,
        VERSION,
        Delivery,
        address,
        make_delivery,
        start_service,
        tls_of,
    )
    from tests.model_release_helpers import DEVICE, RUNTIME, Built, Fleet, build_tiny_models
    from tests.netproxy import TcpProxy
except ImportError:  # pragma: no cover - run from inside tests/
    from delivery_helpers import (  # type: ignore[import-not-found,no-redef]
        MODEL,
        VARIANT,
        VERSION,
        Delivery,
        address,
        make_delivery,
        start_service,
        tls_of,
    )
    from model_release_helpers import (  # type: ignore[import-not-found,no-redef]
        DEVICE,
        RUNTIME,
        Built,
        Fleet,
        build_tiny_models,
    )
    from netproxy import TcpProxy  # type: ignore[import-not-found,no-redef]

pytestmark = pytest.mark.slow

SIZE = 4 * 1024 * 1024
RATE_BPS = 8e6
"""4 MiB take about 4.2 s through the relay: long enough to be cut half-way."""
STALL_S = 2.0
"""The stall timeout under test (the shipped default is 30 s)."""
SLACK_S = 3.0
"""Scheduling slack on two shared cores: an attempt must fail within STALL_S + SLACK_S."""


@pytest.fixture
def delivery(tmp_path: Path) -> Delivery:
    return make_delivery(tmp_path, size=SIZE)


class _Attempt:
    """One download call on a thread, so the test can cut the network under it."""

    def __init__(self, run: object) -> None:
        self.moved: int | None = None
        self.error: DownloadError | None = None
        self.ended_at: float | None = None
        self._run = run
        self.thread = threading.Thread(target=self._target, daemon=True)
        self.thread.start()

    def _target(self) -> None:
        try:
            assert callable(self._run)
            self.moved = self._run()
        except DownloadError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout: float) -> bool:
        """Whether the call ended within ``timeout``."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_a_silent_drop_half_way_fails_the_attempt_in_time_and_the_retry_resumes(
    delivery: Delivery, tmp_path: Path
) -> None:
    tls = tls_of(delivery, delivery.devices["pi-01"])
    dest = tmp_path / "staging" / "int8.tflite.part"
    with (
        start_service(delivery) as service,
        TcpProxy(service.port, downlink_bps=RATE_BPS) as relay,
    ):
        target = address(relay.port)

        def attempt() -> _Attempt:
            return _Attempt(
                lambda: download_artifact(
                    target,
                    tls,
                    MODEL,
                    VERSION,
                    VARIANT,
                    dest,
                    timeout_s=120,
                    stall_timeout_s=STALL_S,
                    expected_size=SIZE,
                )
            )

        first = attempt()
        wait_for(lambda: _size(dest) >= SIZE // 2, 30, "half of the artifact to arrive")
        relay.cut()
        cut_at = time.monotonic()
        assert first.join(STALL_S + SLACK_S), (
            f"the download still hangs {STALL_S + SLACK_S:g} s after a silent drop"
        )
        assert first.error is not None, "the download finished through a black-holed link"
        assert first.error.code == "STALLED", first.error
        assert first.error.reason == "download_failed"
        assert first.ended_at is not None
        noticed_s = first.ended_at - cut_at
        staged = _size(dest)
        assert staged == first.error.moved  # everything that arrived was kept
        assert SIZE // 2 <= staged < SIZE

        # Still down: a new attempt gets a connection that answers nothing (its TLS
        # handshake hangs); it fails in the same time and writes nothing.
        during = attempt()
        started = time.monotonic()
        assert during.join(STALL_S + SLACK_S), "an attempt during the outage hangs"
        assert during.error is not None
        assert during.error.code == "STALLED", during.error
        assert during.error.moved == 0
        assert during.ended_at is not None
        outage_attempt_s = during.ended_at - started
        assert _size(dest) == staged

        relay.restore()  # the network is back
        last = attempt()
        assert last.join(60), "the resumed download did not finish"
        assert last.error is None, last.error
    assert last.moved == SIZE - staged
    data = dest.read_bytes()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(delivery.artifact).hexdigest()
    # What the server put on the link, TLS and HTTP/2 included, over every connection,
    # counting what the black hole swallowed.
    print(
        f"silent drop: noticed after {noticed_s:.2f} s (stall timeout {STALL_S:g} s), "
        f"attempt during the outage failed after {outage_attempt_s:.2f} s; "
        f"artifact {SIZE} bytes, staged before the drop {staged}, "
        f"server sent {relay.downstream_read} bytes ({relay.downstream_read / SIZE:.3f}x)"
    )
    assert noticed_s <= STALL_S + SLACK_S
    assert relay.downstream_read <= 1.1 * SIZE


def test_a_drop_shorter_than_the_stall_timeout_costs_nothing(
    delivery: Delivery, tmp_path: Path
) -> None:
    tls = tls_of(delivery, delivery.devices["pi-01"])
    dest = tmp_path / "part"
    stall_s = 6.0
    with (
        start_service(delivery) as service,
        TcpProxy(service.port, downlink_bps=RATE_BPS) as relay,
    ):
        call = _Attempt(
            lambda: download_artifact(
                address(relay.port),
                tls,
                MODEL,
                VERSION,
                VARIANT,
                dest,
                timeout_s=120,
                stall_timeout_s=stall_s,
            )
        )
        wait_for(lambda: _size(dest) >= SIZE // 2, 30, "half of the artifact to arrive")
        relay.cut()
        held = _size(dest)
        time.sleep(1.5)
        assert call.thread.is_alive()
        assert _size(dest) - held <= 64 * 1024  # at most the chunk in flight got through
        relay.resume()  # the same connection carries on: no FIN, no RST, nothing lost
        assert call.join(60)
        assert call.error is None, call.error
    assert call.moved == SIZE
    assert dest.read_bytes() == delivery.artifact
    assert relay.accepted == 1
    assert relay.downstream_read <= 1.1 * SIZE


def test_a_link_with_a_long_round_trip_still_connects(tmp_path: Path) -> None:
    """The TLS handshake needs several round trips: at 600 ms each it takes seconds.

    The client once capped the connection attempt at 200 ms (gRPC takes
    ``grpc.min_reconnect_backoff_ms`` as the connect timeout), so no download ever
    started over a link with a round trip of 100 ms or more.
    """
    import importlib
    import sys

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    netshape = importlib.import_module("netshape")
    small = make_delivery(tmp_path, size=100_000)
    tls = tls_of(small, small.devices["pi-01"])
    dest = tmp_path / "part"
    with (
        start_service(small) as service,
        netshape.ShapingProxy(service.port, netshape.LinkShape(rtt_ms=600.0)) as relay,
    ):
        started = time.monotonic()
        moved = download_artifact(
            address(relay.port), tls, MODEL, VERSION, VARIANT, dest, timeout_s=60
        )
        took = time.monotonic() - started
    assert moved == len(small.artifact)
    assert dest.read_bytes() == small.artifact
    assert took >= 1.2  # the round trips really were there (TCP, TLS, the call)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_tiny_models(tmp_path_factory)


def test_the_manager_serves_its_model_through_a_drop_and_installs_after_it(
    tmp_path: Path, built: Built
) -> None:
    """The worker thread downloads v2; the drop stalls it; v1 serves throughout."""
    delivery = make_delivery(tmp_path, size=4096)
    fleet = Fleet(tmp_path, built)  # publishes into delivery.releases
    v1 = fleet.publish(1, "fp32")
    # A real model padded to a few MiB (the runtime ignores what follows the flatbuffer).
    padded = built.variants["fp16"][0].read_bytes() + os.urandom(SIZE)
    sha = hashlib.sha256(padded).hexdigest()
    v2 = fleet.publish(2, "fp16", artifact=padded, sha256=sha, size_bytes=len(padded))
    tls = tls_of(delivery, delivery.devices[DEVICE])
    with (
        start_service(delivery) as service,
        TcpProxy(service.port, downlink_bps=RATE_BPS) as relay,
    ):
        manager = fleet.manager(stall_timeout_s=STALL_S, retry_min_s=0.2, retry_max_s=0.5)
        manager.source = GrpcSource(
            address(relay.port), tls, timeout_s=120, stall_timeout_s=STALL_S
        )
        manager.handle(fleet.desired(v1))
        current = manager.current()
        assert current is not None
        assert current.installed.version == 1
        before = relay.downstream_read
        fleet.tick()
        staged = manager.store.staging_file(MODEL, 2, "fp16", ".tflite")

        def stalled() -> bool:
            return any(
                r.last_failure is not None
                and r.last_failure.version == 2
                and r.last_failure.reason == "download_failed"
                and "STALLED" in r.last_failure.detail
                for r in list(fleet.reports)
            )

        manager.start()
        try:
            manager.submit(fleet.desired(v2).to_json())
            wait_for(lambda: _size(staged) >= len(padded) // 2, 30, "half of v2 to arrive")
            relay.cut()
            cut_at = time.monotonic()
            wait_for(stalled, STALL_S + SLACK_S, "the manager to report the stalled download")
            noticed_s = time.monotonic() - cut_at
            kept = _size(staged)
            assert kept >= len(padded) // 2
            # v1 serves throughout: the worker thread is the one waiting on the network.
            serving = manager.current()
            assert serving is not None
            assert serving.installed.version == 1
            check = golden_probe(load_runtime(RUNTIME, serving.path), serving.manifest, 2)
            assert check.passed, check.reasons
            time.sleep(STALL_S + 0.5)  # the outage goes on; the retries find nothing
            assert _size(staged) == kept
            assert manager.current() is not None
            assert manager.current().installed.version == 1  # type: ignore[union-attr]
            relay.restore()
            wait_for(
                lambda: (c := manager.current()) is not None and c.installed.version == 2,
                60,
                "v2 to be installed once the network is back",
            )
        finally:
            manager.stop()
    installed = manager.current()
    assert installed is not None
    assert sha256_file(installed.path) == sha
    moved = relay.downstream_read - before
    print(
        f"manager through a drop: noticed after {noticed_s:.2f} s, v2 {len(padded)} bytes, "
        f"server sent {moved} bytes for it ({moved / len(padded):.3f}x, manifests and "
        "TLS handshakes of every attempt included)"
    )
    assert moved <= 1.1 * len(padded)


def test_the_agent_config_sets_the_stall_timeout_of_its_downloads(tmp_path: Path) -> None:
    from edgefl.edge_agent.daemon import Agent, AgentConfig

    assert ModelsConfig().stall_timeout_s == 30.0
    tls = TlsFiles(
        ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem"
    )
    config = AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "fleet": "f1",
            "state_dir": str(tmp_path / "device"),
            "mqtt": {"port": 1},
            "models": {
                "enabled": True,
                "server": {"host": "127.0.0.1", "port": 1},
                "tls": {k: str(v) for k, v in tls.model_dump().items()},
                "stall_timeout_s": 7.5,
            },
        }
    )
    agent = Agent(config)
    source = agent.models.source
    assert isinstance(source, GrpcSource)
    assert source.stall_timeout_s == 7.5
    with pytest.raises(ValueError, match="stall_timeout_s"):
        ModelsConfig.model_validate({"stall_timeout_s": 0})
