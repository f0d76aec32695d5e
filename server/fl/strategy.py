"""Flower's strategies, wrapped (never rewritten): selection, reply screening, state.

- :func:`build_strategy` makes the plan's Flower strategy (FedAvg, FedAvgM, FedProx, FedAdam,
  FedMedian, FedTrimmedAvg from ``flwr.serverapp.strategy``), wrapped in Flower's
  ``DifferentialPrivacyClientSideFixedClipping`` with an ``RdpAccountant`` when central DP
  is on. The inner strategy is configured to send to *every* node it is shown.
- :class:`SelectedGrid` is how our selection reaches it: a view of the real grid whose
  ``get_node_ids()`` lists only the nodes :func:`select_nodes` chose. Flower's
  ``sample_nodes`` then never waits (the bounded wait happened before) and the strategy's
  own configure/aggregate code runs unchanged.
- :func:`select_nodes` picks devices by remaining ε budget and capability, seeded.
- :func:`screen_train_replies` drops error replies, budget refusals (the run's cap or the
  device's lifetime cap) and invalid updates (wrong keys/shapes/dtypes, NaN/Inf, ε going
  down) before Flower aggregates the rest, turns every reply that spent privacy into a
  ledger row, and keeps each device's lifetime report (ε, δ, cap over all its runs). In
  a deployment it first refuses every reply from a node that is not an admitted
  enrollment, and accounts each reply to the device its node id is enrolled as, never to
  the one the reply names.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)

from edgefl.federation import FederationPlan
from edgefl.privacy import epsilon_of, merge_history
from edgefl.server.fl.ledger import DeviceRecord, LedgerRow

__all__ = [
    "REFUSAL_STATUSES",
    "REQUIRED_METRICS",
    "ScreenResult",
    "SelectedGrid",
    "build_strategy",
    "lifetime_report",
    "load_strategy_state",
    "next_round_epsilon",
    "screen_train_replies",
    "select_nodes",
    "strategy_state",
]

log = logging.getLogger(__name__)

REQUIRED_METRICS: tuple[str, ...] = (
    "num-examples",
    "train-loss",
    "epsilon",
    "delta",
    "sigma",
    "sample-rate",
    "steps",
    "train-time-s",
    "compute-speed",
)


def build_strategy(plan: FederationPlan) -> Strategy:
    """The plan's Flower strategy (wrapped for central DP when enabled)."""
    s = plan.strategy
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0 if plan.fraction_evaluate > 0 else 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        # Central DP's accountant needs equal client weights.
        "weighted_by_key": "unit-weight" if plan.central_dp.enabled else "num-examples",
    }
    inner: Strategy
    if s.name == "fedavg":
        inner = FedAvg(**common)
    elif s.name == "fedprox":
        inner = FedProx(**common, proximal_mu=s.proximal_mu)
    elif s.name == "fedadam":
        inner = FedAdam(
            **common, eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau
        )
    elif s.name == "fedavgm":
        inner = FedAvgM(
            **common, server_learning_rate=s.server_learning_rate, server_momentum=s.server_momentum
        )
    elif s.name == "fedmedian":
        inner = FedMedian(**common)
    else:
        inner = FedTrimmedAvg(**common, beta=s.trim_beta)
    if not plan.central_dp.enabled:
        return inner
    from edgefl.federation import central_dp_accountant

    c = plan.central_dp
    # The same accountant the plan's up-front check uses (FederationPlan.central_budget).
    accountant = central_dp_accountant(c.delta, plan.num_devices, c.max_epsilon)
    return DifferentialPrivacyClientSideFixedClipping(
        inner,
        noise_multiplier=c.noise_multiplier,
        clipping_norm=c.clipping_norm,
        num_sampled_clients=expected_sample_size(plan, plan.num_devices),
        accountant=accountant,
    )


def expected_sample_size(plan: FederationPlan, connected: int) -> int:
    """Flower's rule: ``max(int(connected * fraction_train), min_train_nodes)``."""
    return max(int(connected * plan.fraction_train), plan.min_train_nodes)


class SelectedGrid(Grid):
    """The real grid, showing only the selected nodes to the wrapped strategy."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:  # noqa: D102
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._grid.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def next_round_epsilon(record: DeviceRecord, delta: float) -> float:
    """The ε a device would reach after one more round like its last one."""
    return epsilon_of(
        merge_history(record.history, record.sigma, record.sample_rate, record.steps_per_round),
        delta,
    )


def select_nodes(
    plan: FederationPlan,
    server_round: int,
    node_ids: Sequence[int],
    node_device: dict[int, str],
    devices: dict[str, DeviceRecord],
    exhausted: set[str],
) -> tuple[list[int], dict[str, str]]:
    """Choose this round's nodes.

    A device is *ineligible* (never selected) when ``plan.select_by_budget`` and it
    refused for budget before, or one more round would take it past ``plan.dp.cap``.
    Among the eligible, ``max(int(connected * fraction_train), min_train_nodes)`` nodes are
    drawn without replacement by a generator seeded with ``(plan.seed, server_round)``,
    with weights (``plan.select_by_capability``) favouring fast devices (reported
    train time relative to the median, and compute speed) and a large remaining budget.
    Nodes not seen yet (no reply so far) have weight 1 and full budget.

    Returns:
        The selected node ids and ``{device_id: reason}`` for the excluded devices.
    """
    excluded: dict[str, str] = {}
    eligible: list[int] = []
    cap = plan.dp.cap
    for node in node_ids:
        device = node_device.get(node)
        record = devices.get(device) if device else None
        if device and plan.select_by_budget and plan.dp.enabled:
            if device in exhausted:
                excluded[device] = "refused: budget exhausted"
                continue
            if record is not None:
                nxt = next_round_epsilon(record, plan.dp.delta)
                if nxt > cap * (1 + 1e-9):
                    excluded[device] = f"next round would reach ε={nxt:.3f} > cap {cap}"
                    continue
        eligible.append(node)
    if not eligible:
        return [], excluded
    k = min(len(eligible), expected_sample_size(plan, len(node_ids)))
    # A stable order, so the seeded draw does not depend on the order nodes connected.
    eligible.sort(key=lambda n: (node_device.get(n, "~"), n))
    weights = np.ones(len(eligible))
    if plan.select_by_capability:
        times = [r.train_time_s for r in devices.values() if r.train_time_s > 0]
        median = float(np.median(times)) if times else 0.0
        for i, node in enumerate(eligible):
            device = node_device.get(node)
            record = devices.get(device) if device else None
            if record is None:
                continue
            # Reported train times already include the device's speed; the profile's
            # factor is the fallback before a time is known.
            speed = record.compute_speed
            if median > 0 and record.train_time_s > 0:
                speed = median / record.train_time_s
            budget = 1.0
            if plan.dp.enabled:
                budget = max(0.05, (cap - record.epsilon_total) / cap)
            weights[i] = max(0.05, min(speed, 10.0)) * budget
    rng = np.random.default_rng([plan.seed, server_round])
    chosen = rng.choice(len(eligible), size=k, replace=False, p=weights / weights.sum())
    return [eligible[int(i)] for i in sorted(chosen)], excluded


@dataclass
class ScreenResult:
    """The outcome of screening one round's train replies."""

    accepted: list[Message] = field(default_factory=list)
    rows: list[LedgerRow] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)  # device -> its reply's reason
    flagged: list[str] = field(default_factory=list)
    # device -> {"epsilon", "delta", "cap"}: its lifetime privacy as it reported it
    lifetime: dict[str, dict[str, float]] = field(default_factory=dict)


REFUSAL_STATUSES: dict[str, str] = {
    "budget_exhausted": "",
    "lifetime_budget_exhausted": "lifetime budget exhausted: ",
}
"""Reply statuses of a device that refused to train, and how its reason is prefixed."""


def lifetime_report(info: Any) -> dict[str, float] | None:
    """A reply's lifetime report ``{"epsilon", "delta", "cap"}``, or None.

    None when the reply has none (an older ClientApp) or when a value is not a finite
    number, ε or the cap is negative, or δ is outside (0, 1): a device's claim about
    itself, kept for display beside the server's own recomputation, never trusted for
    accounting.
    """
    values: dict[str, float] = {}
    for key, name in (
        ("lifetime-epsilon", "epsilon"),
        ("lifetime-delta", "delta"),
        ("lifetime-cap", "cap"),
    ):
        value = info.get(key) if key in info else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not math.isfinite(value) or value < 0:
            return None
        values[name] = float(value)
    if not 0.0 < values["delta"] < 1.0:
        return None
    return values


def _finite_metric(metrics: Any, key: str) -> float:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"metric {key!r} missing or not a finite number (got {value!r})")
    return float(value)


_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=256)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, Fortran order, dtype) of a ``.npy`` header (magic to the end of its dict).

    Every reply of a round carries the same few headers, and NumPy parses each one with
    ``ast.literal_eval``: cached, keyed by the header's bytes.
    """
    header = io.BytesIO(prefix)
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(header)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(header)
    raise ValueError(f"unsupported .npy version {version}")


def _array_view(array: Any) -> npt.NDArray[Any]:
    """The array a reply's ``Array`` holds, read in place (what ``Array.numpy()`` returns).

    ``Array.numpy()`` copies the data through ``np.load``; screening every reply's every
    array that way cost as much as the aggregation itself. This parses the same ``.npy``
    header and views the bytes without copying. What is checked is the data the
    aggregation will decode, never the ``Array``'s own (sender-set) ``shape`` and
    ``dtype`` fields.

    Raises:
        ValueError: Not a NumPy array, not a ``.npy`` payload, an object dtype, or
            fewer bytes than its header promises.
    """
    if getattr(array, "stype", None) != "numpy.ndarray":
        raise ValueError(f"array of unsupported serialisation {getattr(array, 'stype', None)!r}")
    data = array.data
    if not isinstance(data, bytes) or data[:6] != _NPY_MAGIC or len(data) < 12:
        raise ValueError("array data is not a .npy payload (no magic string)")
    # The header length follows the magic and the 2-byte version: 2 bytes in 1.0, 4 after.
    width = 2 if data[6] == 1 else 4
    offset = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    shape, fortran, dtype = _npy_header(data[:offset])
    if dtype.hasobject:
        raise ValueError("array of Python objects")
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def _check_arrays(record: Any, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    if not isinstance(record, ArrayRecord):
        raise ValueError("no ArrayRecord 'arrays' in the reply")
    keys = list(record.keys())
    if set(keys) != set(expected):
        missing = sorted(set(expected) - set(keys))
        extra = sorted(set(keys) - set(expected))
        raise ValueError(f"wrong array keys (missing {missing}, unexpected {extra})")
    for key in keys:
        arr = _array_view(record[key])
        shape, dtype = expected[key]
        if tuple(arr.shape) != shape:
            raise ValueError(f"array {key!r} has shape {tuple(arr.shape)}, expected {shape}")
        if str(arr.dtype) != dtype:
            raise ValueError(f"array {key!r} has dtype {arr.dtype}, expected {dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"array {key!r} contains NaN or Inf")


def screen_train_replies(
    server_round: int,
    replies: Iterable[Message],
    expected: dict[str, tuple[tuple[int, ...], str]],
    devices: dict[str, DeviceRecord],
    node_device: dict[int, str],
    exhausted: set[str],
    *,
    enrolled: dict[int, str] | None = None,
    admitted_only: bool = False,
    accept_plain: bool = False,
) -> ScreenResult:
    """Split replies into aggregatable ones and the rest, and build the ledger rows.

    Updates ``node_device`` (node id -> device id, learnt from replies) and
    ``exhausted`` (devices that refused for budget). A reply whose update is invalid is
    rejected but its privacy spend is still recorded (the device did train and send it);
    a device reporting an ε below its ledger total is flagged and rejected.

    Args:
        server_round: The round the replies belong to.
        replies: Flower's replies.
        expected: Parameter name -> (shape, dtype) of the global model.
        devices: The ledger's devices (running ε totals).
        node_device: Node id -> device id, updated.
        exhausted: Devices that refused for budget, updated.
        enrolled: Node id -> device id of enrolled devices (deployment): a reply whose
            ``device-id`` is not its node's enrolled device is rejected, so one device's
            node key cannot report (or spend ε) as another.
        admitted_only: Refuse (as a rejection, keyed ``node-<id>``) every reply from a
            node that is not in ``enrolled``: a node registered on the SuperLink by other
            means than ``edgefl server admit`` is never aggregated nor put in the ledger.
        accept_plain: Aggregate replies without edgefl's privacy report (a stock Flower
            ClientApp: arrays plus ``num-examples``). Only for runs without local DP,
            where there is no per-device ε to account.
    """
    out = ScreenResult()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        known = (enrolled or {}).get(node)
        if admitted_only and known is None:
            claimed = ""
            if not msg.has_error():
                info = msg.content.config_records.get("edgefl")
                if info is not None and "device-id" in info:
                    claimed = f" (its reply claims device {str(info['device-id'])[:64]!r})"
            out.rejected[f"node-{node}"] = f"node {node} is not an admitted enrollment{claimed}"
            log.warning(
                "round %d: refused the reply of node %d: %s",
                server_round,
                node,
                out.rejected[f"node-{node}"],
            )
            continue
        if msg.has_error():
            name = node_device.get(node, known or f"node-{node}")
            out.failures[name] = str(msg.error.reason)[:300]
            continue
        content = msg.content
        info = content.config_records.get("edgefl")
        if info is None or "device-id" not in info:
            name = known or node_device.get(node, f"node-{node}")
            if not accept_plain:
                out.rejected[name] = (
                    "reply has no edgefl privacy report (device-id, ε): this run uses local "
                    "DP, so only ClientApps that account for their privacy are aggregated"
                )
                continue
            node_device[node] = name
            try:
                metrics = content.metric_records.get("metrics")
                if metrics is None or len(content.metric_records) != 1:
                    raise ValueError("expected exactly one MetricRecord 'metrics'")
                if _finite_metric(metrics, "num-examples") <= 0:
                    raise ValueError("num-examples must be > 0")
                _check_arrays(content.array_records.get("arrays"), expected)
                if len(content.array_records) != 1:
                    raise ValueError("expected exactly one ArrayRecord")
            except ValueError as exc:
                out.rejected[name] = str(exc)
                log.warning("round %d: rejected %s: %s", server_round, name, exc)
                continue
            out.accepted.append(msg)
            continue
        device = str(info["device-id"])
        if known is not None and device != known:
            out.rejected[known] = (
                f"node {node} is enrolled as {known!r} but its reply claims {device!r}"
            )
            log.warning("round %d: rejected node %d: %s", server_round, node, out.rejected[known])
            continue
        node_device[node] = device
        report = lifetime_report(info)
        if report is not None:
            out.lifetime[device] = report
        status = str(info.get("status", ""))
        if status in REFUSAL_STATUSES:
            out.refused.append(device)
            reason = str(info.get("reason", "") or status)
            out.refusals[device] = (REFUSAL_STATUSES[status] + reason)[:300]
            exhausted.add(device)
            continue
        metrics = content.metric_records.get("metrics")
        try:
            if metrics is None:
                raise ValueError("no MetricRecord 'metrics' in the reply")
            values = {k: _finite_metric(metrics, k) for k in REQUIRED_METRICS if k != "train-loss"}
            history = json.loads(str(info.get("history", "[]")))
        except (ValueError, TypeError) as exc:
            out.rejected[device] = f"bad metrics: {exc}"
            log.warning("round %d: rejected %s: bad metrics: %s", server_round, device, exc)
            continue
        previous = devices.get(device)
        prev_total = previous.epsilon_total if previous is not None else 0.0
        eps = values["epsilon"]
        flagged = eps < prev_total - 1e-9
        if flagged:
            out.flagged.append(device)
        if values["steps"] > 0 or flagged:
            out.rows.append(
                LedgerRow(
                    device_id=device,
                    round=server_round,
                    epsilon_spent=max(0.0, eps - prev_total),
                    epsilon_total=max(eps, prev_total),
                    delta=values["delta"],
                    sigma=values["sigma"],
                    sample_rate=values["sample-rate"],
                    steps=int(values["steps"]),
                    history=history,
                    num_examples=int(values["num-examples"]),
                    train_time_s=values["train-time-s"],
                    compute_speed=values["compute-speed"],
                    flagged=flagged,
                )
            )
        if flagged:
            out.rejected[device] = (
                f"reported ε {eps:.4f} is below its ledger total {prev_total:.4f}"
            )
            log.warning("round %d: flagged %s: %s", server_round, device, out.rejected[device])
            continue
        try:
            if values["num-examples"] <= 0:
                raise ValueError("num-examples must be > 0")
            _check_arrays(content.array_records.get("arrays"), expected)
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                raise ValueError("expected exactly one ArrayRecord and one MetricRecord")
        except ValueError as exc:
            out.rejected[device] = str(exc)
            log.warning("round %d: rejected %s: %s", server_round, device, exc)
            continue
        out.accepted.append(msg)
    return out


# ---------------------------------------------------------------------------------------
# Strategy state for checkpoints.
# ---------------------------------------------------------------------------------------


def _inner(strategy: Strategy) -> Strategy:
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: Strategy) -> tuple[bytes, dict[str, Any]]:
    """The strategy's state: FedOpt moments as ``numpy.savez`` bytes, accountant as JSON."""
    inner = _inner(strategy)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for attr in ("current_arrays", "m_t", "v_t"):
        value = getattr(inner, attr, None)
        if isinstance(value, dict):
            for key, arr in value.items():
                arrays[f"{attr}/{key}"] = np.asarray(arr)
    # FedAvgM's server momentum: a list in the order of the model's keys.
    for index, arr in enumerate(getattr(inner, "momentum_vector", None) or []):
        arrays[f"momentum_vector/{index:06d}"] = np.asarray(arr)
    buf = io.BytesIO()
    np.savez(buf, **cast(dict[str, Any], arrays))
    accountant = getattr(strategy, "accountant", None)
    meta: dict[str, Any] = {"central": accountant.state_dict() if accountant is not None else None}
    return buf.getvalue(), meta


def load_strategy_state(strategy: Strategy, blob: bytes, meta: dict[str, Any]) -> None:
    """Restore :func:`strategy_state` output into a freshly built strategy."""
    inner = _inner(strategy)
    with np.load(io.BytesIO(blob)) as data:
        restored: dict[str, dict[str, npt.NDArray[Any]]] = {}
        for name in data.files:
            attr, key = name.split("/", 1)
            restored.setdefault(attr, {})[key] = data[name]
    momentum = restored.pop("momentum_vector", None)
    if momentum is not None:
        inner.momentum_vector = [momentum[k] for k in sorted(momentum)]  # type: ignore[attr-defined]
    for attr, value in restored.items():
        setattr(inner, attr, value)
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and meta.get("central") is not None:
        accountant.load_state_dict(meta["central"])
