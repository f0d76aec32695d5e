"""The edgefl ClientApp (Flower Message API): DP-SGD training with a persistent accountant.

``app`` handles ``train`` and ``evaluate`` messages. Module-level imports are light (Flower
starts a new ClientApp process per message in deployment); torch and Opacus are imported
inside the handlers. See ``edgefl.federation`` for the privacy-accounting contract.

Node config, simulation: ``partition-id`` and ``num-partitions`` (set by the simulation
engine, or by ``flower-supernode --node-config``), optional ``device-id`` (default
``sim-NNN`` from the partition id) and ``state-dir`` (where the accountant lives on a
device; without it, in ``context.state``, which is where a simulated node keeps it).

Node config, a real device (what the agent's SuperNode supervisor passes):

- ``data-store``: path of the agent's :class:`~edgefl.edge_agent.datastore.LocalDataStore`;
  the device trains and evaluates on it instead of a partition (``partition-id`` and
  ``num-partitions`` are then not needed, ``device-id`` is required);
- ``eval-fraction`` (optional, default 0.2): the store's held-out share;
- ``telemetry-dir`` (optional): after each train message, once the privacy state is saved,
  one JSON document ``train-<run_id>-r<round>.json`` is written there atomically (run id,
  round, device id, status, ε, δ, σ, sample rate, steps, examples, loss, lifetime ε, δ
  and cap, time) for the agent to send as fleet telemetry;
- ``lifetime-epsilon`` / ``lifetime-delta`` (optional; the agent passes its config's
  ``training.privacy``): the device's lifetime cap across runs and its δ (see
  :mod:`edgefl.edge_agent.fl.privacy`). Without ``lifetime-epsilon`` there is no cap.

Every node (simulated or not) keeps the run's privacy plan: σ, the sample rate and the
steps per round are fixed the first time it trains in the run and hold for every round,
however its data grows (:mod:`edgefl.edge_agent.fl.privacy`).

Train reply (``RecordDict``):

- ``"arrays"``: the new local weights (absent when the device refused to train);
- ``"metrics"`` (MetricRecord, always the same keys): ``num-examples``, ``train-loss``,
  ``epsilon`` (running total), ``delta``, ``sigma``, ``sample-rate``, ``steps`` (this
  round), ``train-time-s``, ``compute-speed``, ``cpu-count``, ``unit-weight`` (1.0, for
  central DP's equal weights) and ``refused`` (1.0 when the budget is exhausted);
- ``"edgefl"`` (ConfigRecord): ``device-id``, ``status`` (``ok``, ``budget_exhausted``
  when the next round would pass the run's ε cap, or ``lifetime_budget_exhausted`` when
  the run's plan or the next round would pass the device's lifetime cap), ``history``
  (the run's accountant history as JSON), ``reason`` (a refusal's numbers, in words),
  ``lifetime-epsilon`` (the device's ε over all its runs, this one included, after the
  round), ``lifetime-delta`` and ``lifetime-cap`` (0.0: none).

A device whose ``dropout`` draw fails raises :class:`DeviceDropoutError`: Flower turns it
into an error reply, which the server counts as a failure.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgefl.errors import EdgeflError
from edgefl.federation import ClientInstructions, DeviceProfile, device_id_for, profile_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgefl.edge_agent.fl.privacy import LifetimeBudget, PrivacyState

__all__ = ["DeviceDropoutError", "app", "telemetry_file_name"]

logger = logging.getLogger(__name__)

app = ClientApp()


class DeviceDropoutError(EdgeflError):
    """The simulated device dropped out of this round (its profile's dropout draw)."""


@dataclass(frozen=True)
class _Node:
    """Who this node is and where its data lives (from the node config)."""

    device_id: str
    partition_id: int  # a stable per-device number on a real device (seeds only)
    num_partitions: int  # 0 on a real device
    data_store: Path | None
    eval_fraction: float
    telemetry_dir: Path | None


def _node(context: Context) -> _Node:
    cfg = context.node_config
    telemetry = cfg.get("telemetry-dir")
    telemetry_dir = Path(str(telemetry)) if telemetry else None
    store = cfg.get("data-store")
    if store:
        device_id = str(cfg.get("device-id") or "")
        if not device_id:
            raise EdgeflError(
                "node config has data-store but no device-id",
                hint="start the SuperNode with --node-config 'device-id=\"ID\" data-store=...'",
            )
        try:
            eval_fraction = float(cfg.get("eval-fraction", 0.2))
        except ValueError as exc:
            raise EdgeflError(f"node config eval-fraction is not a number: {exc}") from exc
        return _Node(
            device_id,
            zlib.crc32(device_id.encode()) % 1_000_003,
            0,
            Path(str(store)),
            eval_fraction,
            telemetry_dir,
        )
    try:
        partition_id = int(cfg["partition-id"])
        num_partitions = int(cfg["num-partitions"])
    except (KeyError, ValueError) as exc:
        raise EdgeflError(
            f"node config needs integer partition-id and num-partitions: {exc}",
            hint="start the SuperNode with --node-config 'partition-id=0 num-partitions=N'",
        ) from exc
    device_id = str(cfg.get("device-id") or device_id_for(partition_id))
    return _Node(device_id, partition_id, num_partitions, None, 0.2, telemetry_dir)


def _store(context: Context) -> Any:
    from edgefl.edge_agent.fl.privacy import ContextPrivacyStore, FilePrivacyStore

    state_dir = context.node_config.get("state-dir")
    if state_dir:
        return FilePrivacyStore(Path(str(state_dir)))
    return ContextPrivacyStore(context)


def _arrays_in(msg: Message) -> dict[str, Any]:
    return {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}


def _data(inst: ClientInstructions, node: _Node) -> Any:
    if node.data_store is not None:
        from edgefl.edge_agent.datastore import LocalDataStore
        from edgefl.zoo import get_spec

        return LocalDataStore(
            node.data_store,
            input_shape=get_spec(inst.model).input_shape,
            eval_fraction=node.eval_fraction,
            create=False,
        )
    from edgefl.edge_agent.fl.data import PartitionData

    if node.num_partitions != inst.num_partitions:
        raise EdgeflError(
            f"node has num-partitions={node.num_partitions} but the plan has "
            f"{inst.num_partitions} devices",
            hint="start as many nodes as the plan's num_devices",
        )
    return PartitionData(
        inst.dataset,
        node.partition_id,
        inst.num_partitions,
        inst.dirichlet_alpha,
        inst.seed,
        inst.test_fraction,
    )


def _profile(inst: ClientInstructions, node: _Node) -> DeviceProfile:
    if node.data_store is not None:
        return DeviceProfile()  # a real device: no simulated dropout or slowdown
    return profile_for(inst.device_profiles(), node.partition_id, inst.num_partitions)


def telemetry_file_name(run_id: str, server_round: int) -> str:
    """``train-<run_id>-r<round>.json``, with characters unsafe in a file name replaced."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    return f"train-{safe}-r{server_round}.json"


def _write_telemetry(
    node: _Node,
    inst: ClientInstructions,
    status: str,
    metrics: dict[str, int | float | list[int] | list[float]],
    lifetime: dict[str, float],
) -> None:
    if node.telemetry_dir is None:
        return
    from edgefl.files import write_text_atomic

    def num(key: str) -> float | None:
        value = metrics[key]
        assert isinstance(value, int | float)
        return None if value != value else float(value)  # NaN is not JSON

    doc = {
        "run_id": inst.run_id,
        "round": inst.server_round,
        "device_id": node.device_id,
        "status": status,
        "epsilon": num("epsilon"),
        "delta": num("delta"),
        "sigma": num("sigma"),
        "sample_rate": num("sample-rate"),
        "steps": int(num("steps") or 0),
        "num_examples": int(num("num-examples") or 0),
        "train_loss": num("train-loss"),
        "train_time_s": num("train-time-s"),
        "lifetime_epsilon": lifetime["lifetime-epsilon"],
        "lifetime_delta": lifetime["lifetime-delta"],
        "lifetime_cap": lifetime["lifetime-cap"] or None,
        "ts": time.time(),
    }
    try:
        node.telemetry_dir.mkdir(parents=True, exist_ok=True)
        path = node.telemetry_dir / telemetry_file_name(inst.run_id, inst.server_round)
        write_text_atomic(path, json.dumps(doc, sort_keys=True) + "\n")
    except OSError as exc:  # telemetry must never cost the round
        logger.warning("could not write training telemetry to %s: %s", node.telemetry_dir, exc)


def _record_lifetime(
    context: Context, lifetime: dict[str, float], runs: dict[str, PrivacyState]
) -> None:
    """The lifetime ε after this round, for ``edgefl agent status`` (a device only)."""
    from edgefl.edge_agent.fl import privacy as pv

    state_dir = context.node_config.get("state-dir")
    if not state_dir:
        return
    cap = lifetime["lifetime-cap"]
    pv.write_lifetime(
        Path(str(state_dir)),
        lifetime["lifetime-epsilon"],
        lifetime["lifetime-delta"],
        cap if cap > 0 else None,
        sum(1 for r in runs.values() if r.history),
    )


def _round_seed(inst: ClientInstructions, partition_id: int) -> int:
    return (inst.seed * 1_000_003 + partition_id * 10_007 + inst.server_round) % (2**31)


def _refusal(
    msg: Message,
    device_id: str,
    status: str,
    reason: str,
    metrics: dict[str, int | float | list[int] | list[float]],
    history: list[list[float]],
    lifetime: dict[str, float],
) -> Message:
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "edgefl": ConfigRecord(
                    {
                        "device-id": device_id,
                        "status": status,
                        "history": json.dumps(history),
                        "reason": reason,
                        **lifetime,
                    }
                ),
            }
        ),
        reply_to=msg,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local (DP-)training; see the module docstring for the reply."""
    inst = ClientInstructions.from_config(dict(msg.content["config"]))
    node = _node(context)
    partition_id, device_id = node.partition_id, node.device_id
    profile = _profile(inst, node)
    draw = random.Random(f"{inst.seed}:{partition_id}:{inst.server_round}").random()
    if draw < profile.dropout:
        raise DeviceDropoutError(f"{device_id} dropped out of round {inst.server_round}")

    from edgefl.edge_agent.fl import privacy as pv
    from edgefl.edge_agent.fl.trainer import train_local

    budget = pv.LifetimeBudget.from_node_config(dict(context.node_config))
    x, y = _data(inst, node).train_arrays()
    store = _store(context)
    state_dir = context.node_config.get("state-dir")
    curves = pv.RdpCurveCache(Path(str(state_dir))) if state_dir else None
    if curves is not None:
        curves.load()
    runs = store.runs()  # every run's state: the lifetime accountant's input
    state = runs.get(inst.run_id)
    # The ledger floor: never account less than the server has recorded for this device.
    spent = state.history if state is not None else []
    floor = inst.ledger_floor().get(device_id)
    if floor and pv.history_steps(floor) > pv.history_steps(spent):
        spent = [[float(h[0]), float(h[1]), int(h[2])] for h in floor]
    planned_now = state is None or state.plan_key != inst.plan_key
    if planned_now:
        # The run's privacy plan, fixed for every round it plans (module docstring of
        # edgefl.edge_agent.fl.privacy); with budget already spent (lost state, new plan),
        # for the rounds left from the budget left.
        rounds = inst.rounds if not spent else max(1, inst.rounds - inst.server_round + 1)
        state = pv.plan_run(
            run_id=inst.run_id,
            plan_key=inst.plan_key,
            num_examples=len(x),
            batch_size=inst.batch_size,
            local_epochs=inst.local_epochs,
            rounds=rounds,
            target_epsilon=inst.target_epsilon,
            delta=inst.delta,
            dp=inst.dp_enabled,
            spent=spent,
        )
    else:
        assert state is not None
        state.history = spent
    runs[inst.run_id] = state

    def lifetime_of(history: list[list[float]]) -> float:
        return pv.epsilon_of(pv.lifetime_history(runs, inst.run_id, history), budget.delta)

    lifetime = {
        "lifetime-epsilon": lifetime_of(state.history),
        "lifetime-delta": budget.delta,
        "lifetime-cap": budget.epsilon if budget.epsilon is not None else 0.0,
    }
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": float(len(x)),
        "train-loss": float("nan"),
        "epsilon": pv.epsilon_of(state.history, inst.delta),
        "delta": inst.delta,
        "sigma": state.sigma,
        "sample-rate": state.sample_rate,
        "steps": 0.0,
        "train-time-s": 0.0,
        "compute-speed": profile.compute_speed,
        "cpu-count": float(os.cpu_count() or 1),
        "unit-weight": 1.0,
        "refused": 0.0,
    }
    if inst.dp_enabled:
        after_history = pv.merge_history(
            state.history, state.sigma, state.sample_rate, state.steps_per_round
        )
        after = pv.epsilon_of(after_history, inst.delta)
        status, reason = "", ""
        if after > inst.epsilon_cap * (1 + 1e-9):
            status = "budget_exhausted"
            reason = (
                f"{device_id}: the next round would take ε from {metrics['epsilon']:.4f} to "
                f"{after:.4f}, past its cap {inst.epsilon_cap}"
            )
        elif budget.epsilon is not None:
            status, reason = _lifetime_check(state, budget, planned_now, lifetime_of, device_id)
            if not status:
                life_after = lifetime_of(after_history)
                if life_after > budget.epsilon * (1 + 1e-9):
                    status = "lifetime_budget_exhausted"
                    reason = (
                        f"{device_id}: the next round would take its lifetime ε (all runs, "
                        f"δ={budget.delta:g}) from {lifetime['lifetime-epsilon']:.4f} to "
                        f"{life_after:.4f}, past its lifetime cap {budget.epsilon:g}"
                    )
        if status:
            store.save(state)
            if curves is not None:
                curves.save()
                _record_lifetime(context, lifetime, runs)
            metrics["refused"] = 1.0
            _write_telemetry(node, inst, status, metrics, lifetime)
            return _refusal(msg, device_id, status, reason, metrics, state.history, lifetime)

    result = train_local(
        inst.model,
        _arrays_in(msg),
        x,
        y,
        epochs=inst.local_epochs,
        batch_size=inst.batch_size,
        lr=inst.lr,
        momentum=inst.momentum,
        optimizer=inst.optimizer,
        seed=_round_seed(inst, partition_id),
        dp=inst.dp_enabled,
        sigma=state.sigma,
        max_grad_norm=inst.max_grad_norm,
        history=state.history,
        proximal_mu=inst.proximal_mu,  # FedProx's own "proximal-mu" key
        clipping_norm=inst.clipping_norm,
        batches_per_epoch=state.batches,
        augment_views=inst.augment_multiplicity,
        augment_shift=inst.augment_shift,
        clip_per_layer=inst.clip_per_layer,
        centre_inputs=inst.centre_inputs,
    )
    if inst.dp_enabled:
        state.history = result.history
        lifetime["lifetime-epsilon"] = lifetime_of(state.history)
    store.save(state)
    if curves is not None:
        curves.save()
        _record_lifetime(context, lifetime, runs)
    if profile.compute_speed < 1.0:  # emulate a slower device
        time.sleep(result.train_time_s * (1.0 / profile.compute_speed - 1.0))
    metrics.update(
        {
            "train-loss": result.loss,
            "epsilon": pv.epsilon_of(state.history, inst.delta),
            "steps": float(result.steps),
            "train-time-s": result.train_time_s / profile.compute_speed,
        }
    )
    _write_telemetry(node, inst, "ok", metrics, lifetime)
    from flwr.app import Array, ArrayRecord

    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in result.state.items()}),
                "metrics": MetricRecord(metrics),
                "edgefl": ConfigRecord(
                    {
                        "device-id": device_id,
                        "status": "ok",
                        "history": json.dumps(state.history),
                        "reason": "",
                        **lifetime,
                    }
                ),
            }
        ),
        reply_to=msg,
    )


def _lifetime_check(
    state: PrivacyState,
    budget: LifetimeBudget,
    planned_now: bool,
    lifetime_of: Callable[[list[list[float]]], float],
    device_id: str,
) -> tuple[str, str]:
    """Whether the run's plan fits the lifetime cap: ``("", "")`` or the refusal.

    Checked when the device plans the run (the whole plan must fit: it never starts a run
    it cannot finish); the refusal is kept in the state for the rest of the run, unless
    the cap has been raised since.
    """
    from edgefl.edge_agent.fl import privacy as pv

    assert budget.epsilon is not None
    cap = budget.epsilon
    if not planned_now and not (state.lifetime_refused_cap and cap <= state.lifetime_refused_cap):
        return "", ""
    # Nothing was trained since the plan was made (or since the refusal): the plan's
    # rounds are all ahead.
    rest = state.planned_rounds * state.steps_per_round
    planned = pv.merge_history(state.history, state.sigma, state.sample_rate, rest)
    whole = lifetime_of(planned)
    if whole <= cap * (1 + 1e-9):
        state.lifetime_refused_cap = 0.0
        return "", ""
    state.lifetime_refused_cap = cap
    return "lifetime_budget_exhausted", (
        f"{device_id}: this run's plan ({state.planned_rounds} rounds to its target ε) "
        f"would take its lifetime ε (all runs, δ={budget.delta:g}) from "
        f"{lifetime_of(state.history):.4f} to {whole:.4f}, past its lifetime cap {cap:g}"
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the device's local evaluation data."""
    inst = ClientInstructions.from_config(dict(msg.content["config"]))
    node = _node(context)
    device_id = node.device_id
    from edgefl.edge_agent.fl.trainer import evaluate_local

    x, y = _data(inst, node).eval_arrays()
    acc, loss = evaluate_local(inst.model, _arrays_in(msg), x, y)
    # Devices without local evaluation data report zero examples (weight 0).
    n = len(x)
    eval_metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": float(n),
        "eval-accuracy": acc if n else 0.0,
        "eval-loss": loss if n else 0.0,
    }
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord(eval_metrics),
                "edgefl": ConfigRecord({"device-id": device_id}),
            }
        ),
        reply_to=msg,
    )
