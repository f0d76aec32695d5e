"""The edgefl ServerApp: one federated run of a plan, with ledger, checkpoints and resume.

:func:`make_server_app` builds it for a plan; ``app`` is the same ServerApp for
``flwr run`` deployments (plan from the ``run_config``, see :func:`plan_from_run_config`).

The round loop is ours (Flower's ``Strategy.start`` cannot start at round k, wait boundedly
for nodes or checkpoint between rounds); the strategy's ``configure_*``/``aggregate_*``
methods are Flower's, called unchanged through :class:`~edgefl.server.fl.strategy.SelectedGrid`.

**Admitted nodes only (deployments).** The SuperLink knows every node whose key was
registered on it, by whatever means; the registry's ``enrollments`` table knows which of
them ``edgefl server admit`` admitted, and as which device. A deployed run therefore
counts, samples and evaluates only the connected nodes that are admitted enrollments
(read again at every poll, so an admission or revocation during a run counts at once), and
refuses, as a rejection with its reason, any reply from another node. The device a reply
is accounted to is the one its node id is enrolled as, never the one it claims. This
applies when the run config sets ``admitted-nodes-only`` (``edgefl server train`` does) or
the registry holds any admitted enrollment; simulations (no enrollments; nodes are virtual)
turn it off (``make_server_app(admitted_only=False)``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from edgefl.errors import ConfigError, EdgeflError
from edgefl.federation import ClientInstructions, FederationPlan, RoundReport
from edgefl.server.fl.ledger import Checkpoint, FlStore
from edgefl.server.fl.strategy import (
    SelectedGrid,
    build_strategy,
    load_strategy_state,
    screen_train_replies,
    select_nodes,
    strategy_state,
)

__all__ = ["NotEnoughNodesError", "app", "make_server_app", "plan_from_run_config"]

log = logging.getLogger(__name__)

_POLL_S = 0.25


class NotEnoughNodesError(EdgeflError):
    """Fewer nodes than ``min_available_nodes`` connected within ``node_wait_s``."""


def wait_for_nodes(
    grid: Grid,
    minimum: int,
    wait_s: float,
    admitted: Callable[[], dict[int, str] | None] | None = None,
) -> list[int]:
    """Wait at most ``wait_s`` for ``minimum`` connected nodes (never Flower's endless wait).

    Args:
        grid: Flower's grid.
        minimum: Nodes needed.
        wait_s: Longest wait.
        admitted: Called at every poll; when it returns a map (node id -> device id), only
            connected nodes in it count and are returned (``None``: every node counts).

    Returns:
        The connected (and admitted) node ids (at least ``minimum``).

    Raises:
        NotEnoughNodesError: Still fewer than ``minimum`` after ``wait_s`` seconds.
    """
    deadline = time.monotonic() + wait_s
    while True:
        connected = list(grid.get_node_ids())
        allowed = admitted() if admitted is not None else None
        nodes = connected if allowed is None else [n for n in connected if n in allowed]
        if len(nodes) >= minimum:
            if len(nodes) < len(connected):
                others = sorted(set(connected) - set(nodes))
                log.warning(
                    "ignoring %d connected node(s) that are not admitted enrollments: %s",
                    len(others),
                    others,
                )
            return nodes
        if time.monotonic() >= deadline:
            not_admitted = len(connected) - len(nodes)
            raise NotEnoughNodesError(
                f"only {len(nodes)} of the {minimum} required nodes (min_available_nodes) "
                f"connected within node_wait_s={wait_s:g} s"
                + (
                    f" ({not_admitted} more connected but are not admitted enrollments)"
                    if not_admitted
                    else ""
                ),
                hint="start more SuperNodes, lower min_available_nodes or raise node_wait_s",
            )
        time.sleep(_POLL_S)


def _model_bytes(arrays: ArrayRecord) -> bytes:
    buf = io.BytesIO()
    named: dict[str, Any] = {k: v.numpy() for k, v in arrays.items()}
    np.savez(buf, **named)
    return buf.getvalue()


def _model_from_bytes(blob: bytes, keys: list[str]) -> ArrayRecord:
    with np.load(io.BytesIO(blob)) as data:
        return ArrayRecord({k: Array(np.asarray(data[k])) for k in keys})


def round_config(base: dict[str, Any], plan: FederationPlan, rnd: int, ledger: str) -> ConfigRecord:
    """What every device trained in round ``rnd`` is sent.

    The plan's instructions (``base``), the round, the round's learning rate (``lr``, or
    its schedule towards ``lr_final``) and the ledger floor (JSON).
    """
    return ConfigRecord({**base, "server-round": rnd, "lr": plan.round_lr(rnd), "ledger": ledger})


class _Run:
    """State of one run while the ServerApp executes it."""

    def __init__(
        self,
        plan: FederationPlan,
        registry_url: str,
        run_id: str,
        resume: bool,
        on_round: Callable[[RoundReport], None] | None,
        admitted_only: bool | None = None,
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self.resume = resume
        self.on_round = on_round
        # True: only admitted enrollments; None: so when the registry has any; False: off.
        self.admitted_only = admitted_only
        self.store = FlStore(registry_url)
        self.node_device: dict[int, str] = {}
        self.exhausted: set[str] = set()
        self._enrolled_once: dict[int, str] | None = None

    def execute(self, grid: Grid) -> None:
        try:
            self._execute(grid)
        finally:
            self.store.close()

    def _execute(self, grid: Grid) -> None:
        import torch

        from edgefl.datasets import load_dataset
        from edgefl.training import evaluate
        from edgefl.zoo import build_trainable_model

        plan = self.plan
        checkpoint = self.store.start_run(self.run_id, plan, resume=self.resume)
        model = build_trainable_model(plan.model_name)
        keys = list(model.state_dict().keys())
        strategy = build_strategy(plan)
        if checkpoint is not None:
            arrays = _model_from_bytes(checkpoint.model, keys)
            load_strategy_state(
                strategy, checkpoint.strategy_state, checkpoint.accountants.get("strategy", {})
            )
            first = checkpoint.round + 1
            log.info("run %s: resuming after round %d", self.run_id, checkpoint.round)
        else:
            arrays = ArrayRecord(model.state_dict())
            first = 1
        expected = {k: (tuple(v.numpy().shape), str(v.numpy().dtype)) for k, v in arrays.items()}
        data = load_dataset(plan.dataset, test_fraction=plan.test_fraction, seed=plan.seed)
        base = ClientInstructions.from_plan(plan, self.run_id).to_config()

        def server_eval(current: ArrayRecord) -> tuple[float, float]:
            model.load_state_dict(current.to_torch_state_dict())
            with torch.no_grad():
                res = evaluate(model, data.x_test, data.y_test)
            return res.accuracy, res.loss

        for rnd in range(first, plan.rounds + 1):
            started = time.monotonic()
            devices = self.store.devices(self.run_id)
            nodes = wait_for_nodes(
                grid, plan.min_available_nodes, plan.node_wait_s, self._admitted_nodes
            )
            selected, excluded = select_nodes(
                plan, rnd, nodes, self.node_device, devices, self.exhausted
            )
            if excluded:
                log.info("round %d: not selected: %s", rnd, excluded)
            if not selected:
                reason = "no device has ε budget left" + (
                    " (" + "; ".join(f"{d}: {r}" for d, r in sorted(excluded.items())) + ")"
                    if excluded
                    else ""
                )
                self.store.finish(self.run_id, "stopped", reason)
                log.warning("run %s stopped before round %d: %s", self.run_id, rnd, reason)
                return
            config = round_config(
                base, plan, rnd, json.dumps({d: r.history for d, r in devices.items()})
            )
            if plan.central_dp.enabled:
                # Flower's accountant expects exactly this many messages per round.
                strategy.num_sampled_clients = len(selected)  # type: ignore[attr-defined]
            try:
                messages = list(
                    strategy.configure_train(rnd, arrays, config, SelectedGrid(grid, selected))
                )
            except Exception as exc:
                if type(exc).__name__ == "PrivacyBudgetExhausted":
                    reason = f"central DP budget: {exc}"
                    self.store.finish(self.run_id, "stopped", reason)
                    log.warning("run %s stopped before round %d: %s", self.run_id, rnd, reason)
                    return
                raise
            replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout_s))
            admitted = self._admitted_nodes()
            screen = screen_train_replies(
                rnd,
                replies,
                expected,
                devices,
                self.node_device,
                self.exhausted,
                enrolled=admitted if admitted is not None else self._enrolled_nodes(),
                admitted_only=admitted is not None,
                accept_plain=not plan.dp.enabled,
            )
            missing = len(messages) - len(replies)
            failure_reasons = dict(screen.failures)
            answered = {int(m.metadata.src_node_id) for m in replies}
            for msg in messages:
                node = int(msg.metadata.dst_node_id)
                if node not in answered:
                    name = self.node_device.get(node, f"node-{node}")
                    failure_reasons[name] = f"no reply within {plan.round_timeout_s:g} s"
            aggregated = False
            train_loss: float | None = None
            if screen.accepted:
                try:
                    new_arrays, metrics = strategy.aggregate_train(rnd, screen.accepted)
                except Exception as exc:  # Flower's InconsistentMessageReplies, AggregationError
                    log.warning("round %d: aggregation skipped: %s", rnd, exc)
                    new_arrays, metrics = None, None
                if new_arrays is not None:
                    arrays = new_arrays
                    aggregated = True
                if isinstance(metrics, MetricRecord) and "train-loss" in metrics:
                    value = float(cast(float, metrics["train-loss"]))
                    train_loss = value if math.isfinite(value) else None
            elif plan.central_dp.enabled:
                # Keep Flower's pending privacy event consistent: nothing was released.
                strategy.aggregate_train(rnd, [])
            fed_acc, fed_loss = self._federated_eval(grid, strategy, rnd, arrays, base, nodes)
            accuracy, loss = server_eval(arrays)
            totals = {d: r.epsilon_total for d, r in devices.items()}
            totals.update({row.device_id: row.epsilon_total for row in screen.rows})
            report = RoundReport(
                round=rnd,
                accuracy=accuracy,
                loss=loss,
                federated_accuracy=fed_acc,
                federated_loss=fed_loss,
                train_loss=train_loss,
                num_selected=len(selected),
                num_replies=len(screen.accepted),
                num_failures=len(screen.failures) + missing,
                num_rejected=len(screen.rejected),
                num_refused=len(screen.refused),
                num_flagged=len(screen.flagged),
                epsilon_max=max(totals.values(), default=0.0),
                wall_s=time.monotonic() - started,
                aggregated=aggregated,
                rejections=dict(screen.rejected),
                refusals=dict(screen.refusals),
                failure_reasons=failure_reasons,
            )
            if not aggregated:
                log.warning("round %d trained nobody: %s", rnd, report.why_nothing_trained())
            blob, meta = strategy_state(strategy)
            central = getattr(strategy, "accountant", None)
            central_eps = (
                float(central.get_privacy_spent().epsilon)
                if central is not None and central.num_releases
                else None
            )
            device_histories = {d: r.history for d, r in devices.items()}
            device_histories.update({row.device_id: row.history for row in screen.rows})
            self.store.commit_round(
                self.run_id,
                report,
                screen.rows,
                Checkpoint(
                    round=rnd,
                    model=_model_bytes(arrays),
                    strategy_state=blob,
                    accountants={"strategy": meta, "devices": device_histories},
                ),
                central_epsilon=central_eps,
                lifetime=screen.lifetime,
            )
            log.info(
                "round %d: acc=%.4f loss=%.4f replies=%d failures=%d rejected=%d refused=%d",
                rnd,
                accuracy,
                loss,
                report.num_replies,
                report.num_failures,
                report.num_rejected,
                report.num_refused,
            )
            if self.on_round is not None:
                self.on_round(report)
        self.store.finish(self.run_id, "completed")

    def _admitted_nodes(self) -> dict[int, str] | None:
        """The nodes this run may use (node id -> device id), or ``None`` for any node.

        See the module docstring: the admitted enrollments when ``admitted_only`` is
        true, or when it is ``None`` and the registry has any; otherwise ``None``.
        """
        if self.admitted_only is False:
            return None
        enrolled = self._enrolled_nodes()
        if self.admitted_only is None and not enrolled:
            return None
        return enrolled

    def _enrolled_nodes(self) -> dict[int, str]:
        """Node id -> device id of the devices enrolled in the registry (none: empty).

        Read every round, so a device admitted or revoked during a run counts at once;
        a simulation (``admitted_only`` false: its nodes are virtual) reads it once.
        """
        from edgefl.server.enrollment import enrolled_nodes

        if self.admitted_only is False and self._enrolled_once is not None:
            return self._enrolled_once
        enrolled = {int(node): device for node, device in enrolled_nodes(self.store.engine).items()}
        if self.admitted_only is False:
            self._enrolled_once = enrolled
        return enrolled

    def _federated_eval(
        self,
        grid: Grid,
        strategy: Any,
        rnd: int,
        arrays: ArrayRecord,
        base: dict[str, Any],
        nodes: list[int],
    ) -> tuple[float | None, float | None]:
        plan = self.plan
        if plan.fraction_evaluate <= 0:
            return None, None
        k = max(int(len(nodes) * plan.fraction_evaluate), plan.min_evaluate_nodes)
        k = min(k, len(nodes))
        if k == 0:
            return None, None
        rng = np.random.default_rng([plan.seed, rnd, 1])
        ordered = sorted(nodes)  # node ids exceed int64: draw indices, not ids
        chosen = [ordered[int(i)] for i in rng.choice(len(ordered), size=k, replace=False)]
        config = ConfigRecord({**base, "server-round": rnd})
        messages = list(
            strategy.configure_evaluate(rnd, arrays, config, SelectedGrid(grid, chosen))
        )
        replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout_s))
        admitted = self._admitted_nodes()
        usable: list[Message] = []
        for msg in replies:
            if admitted is not None and int(msg.metadata.src_node_id) not in admitted:
                log.warning(
                    "round %d: refused an evaluation reply from node %d: not an admitted "
                    "enrollment",
                    rnd,
                    int(msg.metadata.src_node_id),
                )
                continue
            if msg.has_error():
                continue
            metrics = msg.content.metric_records.get("metrics")
            if metrics is not None and float(cast(float, metrics.get("num-examples", 0))) > 0:
                usable.append(msg)
        if not usable:
            return None, None
        try:
            agg = strategy.aggregate_evaluate(rnd, usable)
        except Exception as exc:  # Flower's InconsistentMessageReplies
            log.warning("round %d: federated evaluation skipped: %s", rnd, exc)
            return None, None
        if agg is None or "eval-accuracy" not in agg or "eval-loss" not in agg:
            return None, None  # e.g. stock ClientApps that name their metrics otherwise
        return float(cast(float, agg["eval-accuracy"])), float(cast(float, agg["eval-loss"]))


def make_server_app(
    plan: FederationPlan,
    *,
    registry_url: str,
    run_id: str,
    resume: bool = True,
    on_round: Callable[[RoundReport], None] | None = None,
    admitted_only: bool | None = False,
) -> ServerApp:
    """A Flower ``ServerApp`` that runs ``plan`` as run ``run_id``.

    Every round: wait (at most ``plan.node_wait_s``) for ``plan.min_available_nodes``;
    select devices by remaining ε budget and capability (seeded); send the train message
    (the :class:`~edgefl.federation.ClientInstructions`); collect replies for at most
    ``plan.round_timeout_s``; reject replies with wrong shapes, NaN/Inf or ε going down;
    aggregate with the plan's Flower strategy; evaluate on the held-out split (and
    federated evaluation when ``plan.fraction_evaluate`` > 0); commit the ledger rows,
    metrics and checkpoint in one transaction; call ``on_round``.

    The run stops early (status ``stopped``) when no device has budget left or when
    central DP's accountant would pass ``central_dp.max_epsilon``.

    Args:
        plan: The validated plan.
        registry_url: Registry database URL (SQLite or PostgreSQL).
        run_id: The run id; with ``resume`` an existing run continues from its last
            checkpoint (round numbering continues).
        resume: Continue an existing run (False: an existing run id is an error).
        on_round: Called after each committed round (e.g. a progress bar).
        admitted_only: Use only nodes that are admitted enrollments in the registry
            (see the module docstring); ``None``: when the registry has any. Off by
            default: this builder serves simulations, whose nodes are virtual.

    Returns:
        The ServerApp (pass it to Flower's simulation engine or serve it).

    Raises:
        ConfigError: Raised when the app runs: the run exists with another plan, or the
            registry is unusable.
        NotEnoughNodesError: Raised when the app runs: fewer than
            ``min_available_nodes`` nodes connected within ``node_wait_s``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _Run(plan, registry_url, run_id, resume, on_round, admitted_only).execute(grid)

    return server_app


REGISTRY_PASSWORD_KEY: Final = "registry-password-file"
"""run_config key: the file holding the registry URL's password (not in the URL)."""
REGISTRY_PASSWORD_FILE: Final = "registry-password"
"""Its name, beside the run's app folder (``write_run_app``), mode 0600."""
RUN_KEYS: tuple[str, ...] = ("registry-url", "run-id", "admitted-nodes-only", REGISTRY_PASSWORD_KEY)
"""Keys of a deployed run's ``run_config`` that are not plan keys."""


def plan_from_run_config(run_config: dict[str, Any]) -> tuple[FederationPlan, str, str]:
    """Split a Flower ``run_config`` into (plan, registry URL, run id).

    ``registry-url`` defaults to the server's default registry, ``run-id`` to a new id.
    ``admitted-nodes-only`` is read by the deployed app itself.
    """
    from edgefl.server.fl.ledger import new_run_id
    from edgefl.server.registry.db import default_database_url, with_password

    flat = {k: v for k, v in run_config.items() if k not in RUN_KEYS}
    plan = FederationPlan.from_flat(flat, source="run_config")
    url = str(run_config.get("registry-url") or default_database_url())
    secret = run_config.get(REGISTRY_PASSWORD_KEY)
    if secret:
        try:
            password = Path(str(secret)).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the registry password file {secret}: {exc.strerror}"
            ) from exc
        url = with_password(url, password)
    run_id = str(run_config.get("run-id") or new_run_id())
    return plan, url, run_id


app = ServerApp()


@app.main()
def _deployed(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    plan, url, run_id = plan_from_run_config(run_config)
    # Deployed: admitted enrollments only when asked, and whenever the registry has any.
    admitted_only = True if run_config.get("admitted-nodes-only") is True else None
    _Run(plan, url, run_id, True, None, admitted_only).execute(grid)
