"""The SuperLink's control plane, attacked from outside and by a node nobody admitted.

Before the fix, ``edgefl server start`` ran ``flower-superlink`` on ``superlink.host/port``
itself: its Fleet, Control and Runtime APIs shared that one port, and the Control API has
no authentication in Flower's open-source build. From another host, with only the public
fleet CA certificate, ``flwr supernode list/register`` and ``flwr run`` all worked. And the
ServerApp sampled every node the SuperLink knew and trusted the device id a reply claimed,
so a node registered on the SuperLink by any other means than ``edgefl server admit``
trained, and was accounted as the device it named.

The attacks live in ``benchmarks/probes/control_plane.py`` (the security probe runs the
same functions); one server and one namespace serve this module.

A node that is admitted can still lie in its update: a reply's ``Array`` carries
sender-set ``shape`` and ``dtype`` labels beside its ``.npy`` bytes, and the aggregation
decodes the bytes. The server screens every update before aggregating it (shape, dtype,
NaN/Inf), reading the bytes in place rather than through ``np.load``. Each hostile update
below carries the right labels and lying bytes; it must be rejected with its reason while
an honest update of the same round is accepted.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from probes.control_plane import (
    probe_control_api_from_outside,
    probe_rogue_node_reply,
    started_server,
)
from probes.netns import VethNamespace

from edgefl.server.fl.fleet_proxy import FLEET_ROUTES, render_proxy_config
from edgefl.server.fl.serverapp import NotEnoughNodesError, wait_for_nodes
from edgefl.server.fl.strategy import _array_view, screen_train_replies
from edgefl.server.serve import Server


@pytest.fixture(scope="module")
def server(veth_ns: VethNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with started_server(tmp_path_factory.mktemp("control-plane"), veth_ns.host_ip) as srv:
        yield srv


@pytest.mark.slow
def test_control_api_from_outside(server: Server, veth_ns: VethNamespace, tmp_path: Path) -> None:
    result = probe_control_api_from_outside(server, veth_ns, tmp_path)
    detail = str(result["detail"])
    assert "Control API -> HTTP 403" in detail, detail
    assert result["held"] is True, detail


@pytest.mark.slow
def test_rogue_node_reply(server: Server, tmp_path: Path) -> None:
    result = probe_rogue_node_reply(server, tmp_path)
    assert result["held"] is True, result["detail"]


# --------------------------------------------------------------- the pieces, fast


def test_proxy_config_passes_on_only_fleet_routes(tmp_path: Path) -> None:
    text = render_proxy_config(
        prefix=tmp_path, listen_host="0.0.0.0", listen_port=9092, upstream_port=40000, tls=None
    )
    proxied = [
        line.split()[2]
        for line in text.splitlines()
        if line.strip().startswith("location = /v1/fleet/")
    ]
    assert proxied == list(FLEET_ROUTES)
    assert text.count("proxy_pass ") == len(FLEET_ROUTES)
    assert "location /v1/control/ { return 403; }" in text
    assert "location / { return 404; }" in text
    # Node registration is the Control API's (edgefl server admit), never the proxy's.
    assert "register-node" not in text


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower needs a task identity to build messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


EXPECTED: dict[str, tuple[tuple[int, ...], str]] = {"w": ((2, 3), "float32")}


def _reply(node: int, device: str, array: Array | None = None) -> Message:
    ins = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train"
    )
    metrics = MetricRecord(
        {
            "num-examples": 10.0,
            "train-loss": 0.5,
            "epsilon": 1.0,
            "delta": 1e-5,
            "sigma": 1.0,
            "sample-rate": 0.2,
            "steps": 5.0,
            "train-time-s": 0.1,
            "compute-speed": 1.0,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": array or Array(np.ones((2, 3), np.float32))}),
            "metrics": metrics,
            "edgefl": ConfigRecord(
                {"device-id": device, "status": "ok", "history": "[[1.0, 0.2, 5]]"}
            ),
        }
    )
    return Message(content, reply_to=ins)


@pytest.mark.usefixtures("task_identity")
def test_a_reply_from_a_node_that_is_not_an_admitted_enrollment_is_refused() -> None:
    # Node 99 was registered on the SuperLink without `edgefl server admit` and claims to
    # be the admitted device dev-a (node 7).
    node_device: dict[int, str] = {}
    result = screen_train_replies(
        1,
        [_reply(7, "dev-a"), _reply(99, "dev-a")],
        EXPECTED,
        {},
        node_device,
        set(),
        enrolled={7: "dev-a"},
        admitted_only=True,
    )
    assert [int(m.metadata.src_node_id) for m in result.accepted] == [7]
    assert result.rejected == {
        "node-99": "node 99 is not an admitted enrollment (its reply claims device 'dev-a')"
    }
    assert [row.device_id for row in result.rows] == ["dev-a"]  # one row, the real one
    assert node_device == {7: "dev-a"}


class _Fleet(Grid):
    """Fault injection: a grid whose SuperLink knows the given nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def create_message(self, *a: object, **k: object) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


def test_nodes_that_are_not_admitted_neither_count_nor_get_sampled() -> None:
    grid = _Fleet([7, 99, 100])
    assert wait_for_nodes(grid, 1, 0.0, lambda: {7: "dev-a"}) == [7]
    # Two rogue nodes online do not make up for a missing admitted one.
    with pytest.raises(NotEnoughNodesError, match="2 more connected but are not admitted"):
        wait_for_nodes(grid, 2, 0.0, lambda: {7: "dev-a"})
    assert wait_for_nodes(grid, 3, 0.0, lambda: None) == [7, 99, 100]  # simulation


# ------------------------------------------------------ updates whose bytes lie

GOOD = np.arange(6, dtype=np.float32).reshape(2, 3)


def _npy(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=True)
    return buf.getvalue()


def _labelled(data: bytes) -> Array:
    """An Array that claims to be the expected (2, 3) float32 and holds ``data``."""
    return Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)


HOSTILE: dict[str, tuple[Callable[[], Array], str]] = {
    "bytes of another shape": (lambda: _labelled(_npy(np.zeros((3, 2), np.float32))), "shape"),
    "bytes of another dtype": (lambda: _labelled(_npy(np.zeros((2, 3), np.float64))), "dtype"),
    "NaN in the bytes": (lambda: _labelled(_npy(np.full((2, 3), np.nan, np.float32))), "NaN"),
    "Inf in the bytes": (lambda: _labelled(_npy(np.full((2, 3), np.inf, np.float32))), "Inf"),
    "truncated bytes": (lambda: _labelled(_npy(GOOD)[:-8]), "smaller"),
    "no .npy header": (lambda: _labelled(GOOD.tobytes()), "magic"),
    "pickled objects": (
        lambda: _labelled(_npy(np.array([[object()] * 3] * 2, dtype=object))),
        "objects",
    ),
    "another serialisation": (
        lambda: Array(dtype="float32", shape=(2, 3), stype="torch.pickle", data=_npy(GOOD)),
        "serialisation",
    ),
}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_an_update_whose_bytes_lie_is_rejected_and_the_honest_one_kept(case: str) -> None:
    make, reason = HOSTILE[case]
    result = screen_train_replies(
        1, [_reply(1, "dev-1", Array(GOOD)), _reply(2, "dev-2", make())], EXPECTED, {}, {}, set()
    )
    assert [int(m.metadata.src_node_id) for m in result.accepted] == [1]
    assert reason in result.rejected["dev-2"], result.rejected


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_honest_updates_read_in_place_equal_what_the_aggregation_decodes(
    version: tuple[int, int], order: str
) -> None:
    arr = np.asfortranarray(GOOD) if order == "F" else np.ascontiguousarray(GOOD)
    array = _labelled(_npy(arr, version))
    result = screen_train_replies(1, [_reply(1, "dev-1", array)], EXPECTED, {}, {}, set())
    assert len(result.accepted) == 1, result.rejected
    np.testing.assert_array_equal(_array_view(array), array.numpy())
