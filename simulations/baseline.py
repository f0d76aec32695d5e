"""The stock baseline the benchmark compares against: plain Flower + per-round Opacus.

This is how Flower's Opacus example trains: a stock ``FedAvg`` on the server, and a
ClientApp that builds a **new** ``PrivacyEngine`` in every round and reports that
engine's ε. The fresh accountant only knows the current round, so the reported ε is far
below the device's true cumulative ε. It runs the same workload as edgefl's apps (same
partitions, model, σ, clip, local epochs, optimiser) so the wall-time ratio measures
only what edgefl adds (ledger, checkpoints, selection, validation, kept accountants).
With ``dp = false`` in the train config the ClientApp trains plain SGD (shuffled
mini-batches, no Opacus), for a workload run without DP on both sides.

Nothing here is used by edgefl itself; it exists to be measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["StockRound", "StockRun", "make_stock_client_app", "make_stock_server_app"]


@dataclass
class StockRound:
    """One round of the stock run as the driver saw it."""

    round: int
    accuracy: float
    loss: float
    wall_s: float
    peak_rss_mb: float = 0.0


@dataclass
class StockRun:
    """What the stock run recorded: rounds, and per-device reports and (σ, q, steps)."""

    rounds: list[StockRound] = field(default_factory=list)
    reported_epsilon: dict[str, list[float]] = field(default_factory=dict)
    history: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    start_s: float = 0.0


def make_stock_client_app(
    partition: Callable[
        [dict[str, Any], int], tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
    ]
    | None = None,
) -> Any:
    """A Flower ClientApp training with Opacus, creating a new PrivacyEngine every round.

    Args:
        partition: ``(train config, partition id) -> (x, y)``; default: the bundled
            dataset split with :func:`edgefl.partition.dirichlet_partition`.
    """
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def default_partition(
        cfg: dict[str, Any], pid: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        from edgefl.edge_agent.fl.data import PartitionData

        return PartitionData(
            str(cfg["dataset"]),
            pid,
            int(cfg["num-partitions"]),
            float(cfg["dirichlet-alpha"]),
            int(cfg["seed"]),
            float(cfg["test-fraction"]),
        ).train_arrays()

    get_partition = partition or default_partition

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        from edgefl.edge_agent.fl.privacy import choose_sigma, steps_per_round
        from edgefl.edge_agent.fl.trainer import build_trainable_model

        cfg: dict[str, Any] = dict(msg.content.config_records["config"])
        pid = int(context.node_config["partition-id"])
        x, y = get_partition(cfg, pid)
        batch = int(cfg["batch-size"])
        epochs = int(cfg["local-epochs"])
        if not bool(cfg.get("dp", True)):
            reply: Message = _train_plain(msg, cfg, pid, x, y)
            return reply
        q, steps_planned = steps_per_round(len(x), batch, epochs)
        delta = float(cfg["delta"])
        # The same σ edgefl's device chooses: sized once for rounds × local epochs. It is
        # a pure function of (ε, δ, q, steps), cached per worker process by choose_sigma
        # (Flower's example takes σ straight from the config; searching it is not the
        # workload).
        sigma = choose_sigma(
            float(cfg["target-epsilon"]), delta, q, steps_planned * int(cfg["rounds"])
        )

        torch.manual_seed(int(cfg["seed"]) * 1000 + pid + 7919 * int(cfg["server-round"]))
        model = build_trainable_model(str(cfg["model"]))
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        loader = DataLoader(
            TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch
        )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"])
        )
        engine = PrivacyEngine(accountant="rdp")  # new every round: the flaw measured
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=float(cfg["max-grad-norm"]),
        )
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        started = time.perf_counter()
        total, count, steps = 0.0, 0, 0
        for _ in range(epochs):
            for xb, yb in loader:
                # Poisson sampling can draw an empty batch: it still is a DP step (noise
                # only), so it runs and the accountant counts it.
                steps += 1
                optimizer.zero_grad()
                out = model(xb)
                loss = loss_fn(out, yb) if len(xb) else out.sum()
                loss.backward()
                optimizer.step()
                if len(xb):
                    total += float(loss.item()) * len(xb)
                    count += len(xb)
        epsilon = float(engine.get_epsilon(delta))
        state = {k: v.detach().clone() for k, v in model._module.state_dict().items()}
        metrics = MetricRecord(
            {
                "num-examples": len(x),
                "train-loss": total / max(count, 1),
                "epsilon": epsilon,
                "sigma": sigma,
                "sample-rate": q,
                "steps": steps,
                "partition-id": pid,
                "train-time-s": time.perf_counter() - started,
            }
        )
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)

    return app


def _train_plain(
    msg: Any,
    cfg: dict[str, Any],
    pid: int,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
) -> Any:
    """One round of plain SGD on shuffled mini-batches (a run without DP): the reply."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from torch.utils.data import DataLoader, TensorDataset

    from edgefl.edge_agent.fl.trainer import build_trainable_model

    seed = int(cfg["seed"]) * 1000 + pid + 7919 * int(cfg["server-round"])
    torch.manual_seed(seed)
    model = build_trainable_model(str(cfg["model"]))
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=int(cfg["batch-size"]),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"])
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    started = time.perf_counter()
    total, count, steps = 0.0, 0, 0
    for _ in range(int(cfg["local-epochs"])):
        for xb, yb in loader:
            steps += 1
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += float(loss.item()) * len(xb)
            count += len(xb)
    metrics = MetricRecord(
        {
            "num-examples": len(x),
            "train-loss": total / max(count, 1),
            "epsilon": 0.0,
            "sigma": 0.0,
            "sample-rate": 0.0,
            "steps": steps,
            "partition-id": pid,
            "train-time-s": time.perf_counter() - started,
        }
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


def make_stock_server_app(
    *,
    train_config: dict[str, Any],
    num_devices: int,
    rounds: int,
    record: StockRun,
    on_round: Callable[[StockRound], None] | None = None,
    timeout_s: float = 600.0,
) -> Any:
    """A stock Flower ServerApp: ``FedAvg`` with server-side evaluation each round.

    The train metrics of every reply are captured into ``record`` (reported ε and the
    (σ, q, steps) of each device and round) through ``train_metrics_aggr_fn``.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from edgefl.datasets import load_dataset
    from edgefl.edge_agent.fl.trainer import build_trainable_model
    from edgefl.training import evaluate

    app = ServerApp()
    cfg = dict(train_config)

    def capture(replies: list[RecordDict], weight_key: str) -> MetricRecord:
        total = 0.0
        n = 0
        for content in replies:
            m: dict[str, Any] = dict(content.metric_records["metrics"])
            device = f"stock-{int(m['partition-id']):03d}"
            record.reported_epsilon.setdefault(device, []).append(float(m["epsilon"]))
            record.history.setdefault(device, []).append(
                (float(m["sigma"]), float(m["sample-rate"]), int(m["steps"]))
            )
            w = int(m[weight_key])
            total += float(m["train-loss"]) * w
            n += w
        return MetricRecord({"train-loss": total / max(n, 1)})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        data = load_dataset(
            str(cfg["dataset"]), test_fraction=float(cfg["test-fraction"]), seed=int(cfg["seed"])
        )
        model = build_trainable_model(str(cfg["model"]))
        last = [time.perf_counter()]

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            result = evaluate(model, data.x_test, data.y_test)
            now = time.perf_counter()
            if server_round == 0:
                record.start_s = now
            else:
                row = StockRound(server_round, result.accuracy, result.loss, now - last[0])
                record.rounds.append(row)
                if on_round is not None:
                    on_round(row)
            last[0] = now
            return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_devices,
            min_evaluate_nodes=0,
            min_available_nodes=num_devices,
            train_metrics_aggr_fn=capture,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            timeout=timeout_s,
            train_config=ConfigRecord(cfg),
            evaluate_fn=evaluate_fn,
        )

    return app
