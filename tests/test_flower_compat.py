"""A stock Flower ClientApp (no edgefl code) joins our SuperLink and trains in a run.

Real processes: a TLS SuperLink with node authentication, two registered SuperNodes
running a ClientApp written the way Flower's own quickstart writes one, and edgefl's
ServerApp submitted with ``flwr run``. Without local DP the stock replies are aggregated;
in a run with local DP they are refused with the reason (they carry no privacy report).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefl.edge_agent.identity import prepare_enrollment
from edgefl.federation import FederationPlan
from edgefl.server.fl.ledger import FlStore
from edgefl.server.fl.superlink import write_run_app

try:
    from tests.flower_deploy import (
        Deployment,
        SuperNodeProcess,
        start_deployment,
        wait_run_finished,
    )
except ImportError:  # run from inside tests/
    from flower_deploy import (  # type: ignore[import-not-found,no-redef]
        Deployment,
        SuperNodeProcess,
        start_deployment,
        wait_run_finished,
    )

pytestmark = pytest.mark.slow

STOCK_CLIENT = '''\
"""A plain Flower ClientApp (Message API), as in Flower's PyTorch quickstart."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits
from torch import nn

app = ClientApp()


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def load_data(partition_id: int, num_partitions: int):
    digits = load_digits()
    x = torch.tensor(digits.images[partition_id::num_partitions] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[partition_id::num_partitions], dtype=torch.long)
    return x[:, None], y


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    optimizer = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
    total = 0.0
    for _ in range(2):
        for start in range(0, len(x), 32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
            loss.backward()
            optimizer.step()
            total += float(loss)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": total, "num-examples": len(x)}),
        }
    )
    return Message(content=content, reply_to=msg)
'''


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = start_deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


def _stock_nodes(dep: Deployment, tmp_path: Path, count: int) -> list[SuperNodeProcess]:
    nodes = []
    for i in range(count):
        ident = prepare_enrollment(f"stock-{i}", "lab", tmp_path / f"device{i}")
        dep.admin.register_node(ident.paths.node_public_key, name=f"stock-{i}")
        nodes.append(
            SuperNodeProcess(
                tmp_path / f"node{i}",
                dep.superlink.address,
                root_certificates=dep.ca.cert_path,
                node_key=ident.paths.node_key,
                node_config={"partition-id": i, "num-partitions": count},
            )
        )
    return nodes


def _plan(*, dp: bool) -> FederationPlan:
    return FederationPlan.model_validate(
        {
            "dataset": "digits",
            "model": "digits-mlp",
            "num_devices": 2,
            "rounds": 2 if not dp else 1,
            "lr": 0.3,
            "min_train_nodes": 2,
            "min_available_nodes": 2,
            "node_wait_s": 90,
            "round_timeout_s": 180,
            "dp": {"enabled": dp},
        }
    )


def _run(dep: Deployment, tmp_path: Path, plan: FederationPlan, run_id: str) -> str:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    app = write_run_app(
        tmp_path / run_id, plan, registry_url=url, run_id=run_id, clientapp="stock_client:app"
    )
    (app / "stock_client.py").write_text(STOCK_CLIENT)
    flower_run = dep.admin.submit_run(app)
    status = wait_run_finished(dep.admin, flower_run, timeout=420)
    assert status == "finished:completed", status
    return url


def test_stock_clientapp_trains_in_a_run_without_local_dp(
    deployment: Deployment, tmp_path: Path
) -> None:
    nodes = _stock_nodes(deployment, tmp_path, 2)
    try:
        url = _run(deployment, tmp_path, _plan(dp=False), "compat")
        store = FlStore(url)
        try:
            result = store.result("compat")
            plain_ledger = store.ledger("compat")
        finally:
            store.close()
        assert result.status == "completed"
        assert [r.round for r in result.rounds] == [1, 2]
        for report in result.rounds:
            assert report.num_replies == 2, report
            assert report.num_rejected == 0, report.rejections
            assert report.aggregated
        # Two rounds of plain SGD from a random init: far above chance (10 classes).
        assert result.rounds[-1].accuracy > 0.5, result.rounds[-1]
        assert plain_ledger == []  # no privacy was accounted: no ledger rows

        # The same stock clients in a run with local DP: refused, with the reason.
        url = _run(deployment, tmp_path, _plan(dp=True), "compat-dp")
        store = FlStore(url)
        try:
            dp_result = store.result("compat-dp")
        finally:
            store.close()
        (only,) = dp_result.rounds
        assert only.num_replies == 0
        assert only.num_rejected == 2
        assert not only.aggregated
        assert all("privacy report" in why for why in only.rejections.values())
        # Registered with flwr directly (not admitted), so they are named by node id.
        assert all(name.startswith("node-") for name in only.rejections), only.rejections
    finally:
        for node in nodes:
            node.stop()
