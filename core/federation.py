"""The federation contract: the plan of a federated run and the records it produces.

This module is the one place that the server (``edgefl.server.fl``), the device-side
ClientApp (``edgefl.edge_agent.fl.clientapp``) and the simulation runner
(``edgefl.simulations``) share. It imports only pydantic, the standard library and the
name tables of ``edgefl.datasets`` (no torch: a plan names zoo models without building
them), so the ClientApp (which Flower starts in a new process for every message) stays
light; Flower's
RDP accountant is imported only when a plan with central DP and ``max_epsilon`` is
validated (:func:`central_dp_budget`: a plan whose first round would already pass
``max_epsilon`` is refused, naming what would fit).

Public API
==========

:class:`FederationPlan`
    Everything a run needs, validated once (unknown keys and bad values give a
    :class:`~edgefl.errors.ConfigError` naming the key path). Build it with
    :func:`load_plan` (dict, e.g. a TOML table), ``edgefl.config.load_config`` (a file)
    or ``FederationPlan(...)``. A simulation scenario is the same file plus a
    ``[simulation]`` table, which the plan ignores (with a log line); keys of the older
    scenario layout (``[data]``, ``[training]``, ``[privacy]``, ``share``, ``speed``, ...)
    are still read, each with a warning naming its new key. :func:`keys_table` renders
    the keys, types, defaults and meanings (the README's table).
    ``plan.to_flat()`` / ``FederationPlan.from_flat()`` convert to and from a flat
    ``{"dp.target_epsilon": 8.0, ...}`` dict that fits a Flower ``run_config`` (the
    ``[tool.flwr.app.config]`` table of a deployment); lists travel as JSON strings.

:class:`ClientInstructions`
    What the server puts into the ``"config"`` ConfigRecord of every train/evaluate
    message: dataset, model, partitioning (seed, α, number of partitions), local epochs,
    batch size, learning rate, DP settings (target ε, δ, clip, ε cap, planned rounds),
    device profiles, the FedProx μ and the ledger floor (see below). The ClientApp needs
    nothing but this and its node config (``partition-id``, ``num-partitions``,
    optionally ``state-dir`` and ``device-id``), which is why simulation and deployment
    run the same code. ``to_config()`` gives the flat ConfigRecord values,
    ``from_config()`` parses them back.

:class:`RoundReport`, :class:`FederationResult`
    What a run reports per round and at the end: server-side accuracy/loss on the held-out
    split, federated evaluation, reply counts (replies, failures, rejected, refused for
    budget), the largest ε any device has spent, wall time, and ε per device.
    ``edgefl.server.fl.make_server_app(..., on_round=callback)`` calls the callback with a
    :class:`RoundReport` after each round; ``edgefl.server.fl.load_result(url, run_id)``
    reads a :class:`FederationResult` back from the registry.

:func:`device_id_for`
    Stable device name of a simulated partition (``sim-007``).

:func:`profile_for`
    The :class:`DeviceProfile` of a partition (profiles are assigned by ``fraction`` in
    partition-id order, each group's stragglers after the rest: :func:`expand_profiles`).

:data:`STRATEGY_PARAMS`, :data:`STRATEGIES`
    The strategy names and the ``[strategy]`` parameters each takes.

Privacy accounting (decided here, implemented by the ClientApp)
===============================================================

Each device runs Opacus DP-SGD with Poisson sampling. Partitions differ in size, so the
sample rate differs: ``q = 1 / ceil(n / batch_size)`` (Opacus' ``DPDataLoader``). **Each
device chooses its own σ once**, the first time it trains in a run, with
``opacus.accountants.utils.get_noise_multiplier(target_epsilon, delta, q,
steps=rounds * local_epochs * ceil(n / batch_size), accountant="rdp")``, and keeps it
(with its accountant) in its state for the whole run. The device's RDP accountant is
kept across rounds (``context.state`` in simulation, a JSON file in the node's
``state-dir`` on a device), so the ε it reports is the true running total. Each reply
carries σ, q, the steps taken and the accountant history, so the server (and anyone
reading the ledger) can recompute ε independently.

A device refuses to train (reply status ``budget_exhausted``, no exception) when the
next round would take its ε past ``dp.epsilon_cap`` (default: ``dp.target_epsilon``).

**The plan holds while the data grows.** With its σ, the device fixes the sample rate
``q = 1 / ceil(n0 / batch_size)`` and the steps per round from the data it holds then
(``n0``); every later round takes exactly those steps at that rate on whatever data it
holds by then (Poisson sampling over all of it), so the planned rounds end at ε <= target
exactly, however a device's store grows during the run
(:mod:`edgefl.edge_agent.fl.privacy` says why this and not a fixed sample count).

**Lifetime budget.** A device also composes its privacy loss across runs (RDP composition
of every run's history it keeps) and refuses, with status ``lifetime_budget_exhausted``,
a run whose plan, or a round that, would pass its lifetime cap (its agent config's
``training.privacy.lifetime_epsilon``). Every reply's ``"edgefl"`` record carries
``lifetime-epsilon``, ``lifetime-delta`` and ``lifetime-cap``; the server keeps them with
the round and shows each device's lifetime ε, recomputed from its ledger rows of every
run (:attr:`FederationResult.lifetime`).

The *ledger floor*: the server sends the accountant history the registry holds for each
device (``ledger`` in :class:`ClientInstructions`). A device whose own state is shorter
(lost state dir, or a simulation restarted after the server was killed) adopts it, so a
restart can never reset a device's ε.

Server side (``edgefl.server.fl``)
==================================

``make_server_app(plan, registry_url=..., run_id=..., resume=True, on_round=...)`` gives
the ServerApp; ``run_simulation(plan, registry_url=..., run_id=..., on_round=...,
backend_config=None, num_nodes=None)`` runs it on Flower's simulation engine with
``edgefl.edge_agent.fl.clientapp:app`` and returns a :class:`FederationResult`;
``load_result(url, run_id)`` reads one back; ``FlStore(url).ledger(run_id)`` lists the
privacy ledger rows (σ, q, steps, running ε per device and round).

Where the installed Flower (1.41) shaped the design:

- The round loop is ours, not ``Strategy.start``: that one cannot start at round k (resume),
  wait boundedly for nodes or checkpoint between rounds. The strategies' own
  ``configure_*``/``aggregate_*`` run unchanged; our device selection reaches them as a
  grid view listing only the selected nodes, so ``sample_nodes`` never blocks.
- Flower raises on replies without arrays or with inconsistent keys, so refusals and bad
  updates are screened out before the strategy aggregates.
- Central DP (``DifferentialPrivacyClientSideFixedClipping`` + ``RdpAccountant``) needs
  FedAvg, equal client weights (replies carry ``unit-weight``), and exactly the sampled
  number of replies: a round with a failed or rejected reply is *not* aggregated (and not
  accounted). The update clipping is done by our ClientApp (Flower's
  ``fixedclipping_mod`` insists on the key being present in every message).
- FedProx's μ travels in Flower's own ``proximal-mu`` key.
- Federated evaluation runs on each device's Dirichlet share of the held-out split; it
  is not privacy-accounted (as in Flower's examples).

Device profiles (simulation)
============================

``compute_speed`` < 1 makes a device sleep ``train_time * (1/speed - 1)`` after training
(a slow device; a straggler uses ``straggler_speed``); ``dropout`` is the probability that
the device fails a train message, drawn from ``Random((seed, partition_id, round))`` so
runs are reproducible. Real devices (no partition id) ignore the profiles.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from edgefl.config import KeyRename, RenamedKeyWarning, RenameMap, StrictModel, validate_config
from edgefl.datasets import DATASETS, MODEL_DATASET, default_model
from edgefl.errors import ConfigError
from edgefl.files import SAFE_NAME_PATTERN

if TYPE_CHECKING:
    from flwr.serverapp import RdpAccountant

__all__ = [
    "STRATEGIES",
    "STRATEGY_PARAMS",
    "CentralDPBudget",
    "CentralDPPlan",
    "ClientInstructions",
    "DPPlan",
    "DeviceProfile",
    "FederationPlan",
    "FederationResult",
    "RoundReport",
    "StrategyPlan",
    "central_dp_accountant",
    "central_dp_budget",
    "central_dp_epsilon",
    "device_id_for",
    "expand_profiles",
    "keys_table",
    "load_plan",
    "profile_for",
]

STRATEGY_PARAMS: Final[dict[str, frozenset[str]]] = {
    "fedavg": frozenset(),
    "fedprox": frozenset({"proximal_mu"}),
    "fedadam": frozenset({"eta", "eta_l", "beta_1", "beta_2", "tau"}),
    "fedmedian": frozenset(),
    "fedtrimmedavg": frozenset({"trim_beta"}),
    "fedavgm": frozenset({"server_learning_rate", "server_momentum"}),
}
"""The one list of strategy names, with the ``[strategy]`` parameters each takes. They
wrap Flower's strategies of the same name (``edgefl.server.fl.strategy`` builds them)."""

STRATEGIES: Final[tuple[str, ...]] = tuple(STRATEGY_PARAMS)

log = logging.getLogger(__name__)


def _renamed(old: str, new: str, source: str) -> None:
    """Announce a key of the older scenario layout the way ``renamed_keys`` does."""
    text = KeyRename(old, new, source).warning_text()
    log.warning("%s", text)
    warnings.warn(text, RenamedKeyWarning, stacklevel=2)


class DPPlan(StrictModel):
    """Local (record-level) differential privacy: Opacus DP-SGD on every device."""

    renamed_keys: ClassVar[RenameMap] = {"device_epsilon_cap": "epsilon_cap"}

    enabled: bool = Field(True, description="Train with DP-SGD (false: plain SGD).")
    target_epsilon: float = Field(8.0, gt=0, description="ε each device reaches after all rounds.")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clip C.")
    epsilon_cap: float | None = Field(
        None,
        gt=0,
        description="A device refuses to train past this ε (default: target_epsilon).",
    )
    clip_per_layer: bool = Field(
        False,
        description="Clip each parameter tensor to max_grad_norm / sqrt(#tensors) instead "
        "of the whole gradient to max_grad_norm (same sensitivity, same ε).",
    )

    @property
    def cap(self) -> float:
        """The effective per-device ε cap."""
        return self.epsilon_cap if self.epsilon_cap is not None else self.target_epsilon


class CentralDPPlan(StrictModel):
    """Central (user-level) DP: Flower's client-side fixed clipping + RdpAccountant."""

    enabled: bool = Field(False, description="Add central DP on the server (needs fedavg).")
    noise_multiplier: float = Field(1.0, gt=0, description="z of the Gaussian mechanism.")
    clipping_norm: float = Field(1.0, gt=0, description="Clip of each device's update.")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the central accountant.")
    max_epsilon: float | None = Field(
        None, gt=0, description="The run stops before a round would pass this ε."
    )


class StrategyPlan(StrictModel):
    """Aggregation strategy (one of Flower's) and its parameters."""

    name: str = Field("fedavg", description=f"One of: {', '.join(STRATEGIES)}.")
    proximal_mu: float = Field(0.0, ge=0, description="FedProx μ (client-side proximal term).")
    eta: float = Field(0.01, gt=0, description="FedAdam server learning rate.")
    eta_l: float = Field(0.1, gt=0, description="FedAdam client learning rate (informative).")
    beta_1: float = Field(0.9, ge=0, lt=1, description="FedAdam β1.")
    beta_2: float = Field(0.99, ge=0, lt=1, description="FedAdam β2.")
    tau: float = Field(1e-3, gt=0, description="FedAdam τ.")
    trim_beta: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg cut per tail.")
    server_learning_rate: float = Field(1.0, gt=0, description="FedAvgM server learning rate.")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="FedAvgM server momentum.")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        key = value.lower()
        if key not in STRATEGY_PARAMS:
            raise ValueError(f"unknown strategy {value!r}; choose one of: {', '.join(STRATEGIES)}")
        return key

    @model_validator(mode="after")
    def _check(self) -> StrategyPlan:
        allowed = STRATEGY_PARAMS[self.name]
        # A parameter left at its default is no choice (a plan read back from a
        # run_config carries every parameter).
        changed = sorted(
            key
            for key, info in type(self).model_fields.items()
            if key != "name" and key not in allowed and getattr(self, key) != info.default
        )
        if changed:
            takes = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"{changed} do not apply to {self.name!r} (it takes: {takes})")
        if self.name == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0")
        return self


class DeviceProfile(StrictModel):
    """How a group of simulated devices behaves; ``fraction`` of the devices get it.

    Within the group, ``straggler_fraction`` of the devices run at ``straggler_speed``
    instead of ``compute_speed`` (a straggler the round timeout may cut off). Only
    simulated devices (partition ids) emulate a profile; a real device ignores it.
    """

    renamed_keys: ClassVar[RenameMap] = {"share": "fraction", "speed": "compute_speed"}

    name: str | None = Field(None, min_length=1, max_length=64, description="Group name.")
    fraction: float | None = Field(
        None, gt=0, le=1, description="Share of the devices (default: an equal split)."
    )
    compute_speed: float = Field(1.0, gt=0, le=1, description="1 = full speed, 0.25 = 4x slower.")
    dropout: float = Field(0.0, ge=0, le=1, description="Probability of failing a round.")
    straggler_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of this group that straggles."
    )
    straggler_speed: float = Field(
        0.1, gt=0, le=1, description="compute_speed of the group's stragglers."
    )


_IMAGE_DATASETS: Final = frozenset({"digits", "mnist5k"})
"""Bundled datasets of images (N, 1, H, W), which augmentation can shift."""

_CENTRABLE_MODELS: Final = frozenset({"digits-mlp", "digits-mlp-wide", "mnist-mlp"})
"""Zoo models on images whose first layer is Linear (``centre_inputs`` applies to them)."""

_SCENARIO_SECTIONS = ("scenario", "data", "training")
"""Sections of the scenario format before the plan and the scenario became one file."""


def _table(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _upgrade_old_layout(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A plan in today's keys from the older scenario layout, each move announced.

    ``[scenario]``, ``[data]`` and ``[training]`` keys became top-level keys,
    ``training.strategy`` / ``strategy_params`` became the ``[strategy]`` table, a
    ``[central_dp]`` table switched central DP on, and ``simulation.node_wait_s`` /
    ``round_timeout_s`` became top-level keys. The derived values the old layout implied
    (wait for every device, train every sampled one, a 30 s node wait) are filled in, so
    an old file runs as it did. (Plain renames, ``[privacy]`` -> ``[dp]`` and the like,
    are the models' ``renamed_keys``.)
    """
    out = dict(data)
    old_layout = isinstance(out.get("data"), dict) or isinstance(out.get("training"), dict)

    def move(old: str, new: str, value: Any) -> None:
        if new in out:
            raise ValueError(
                f"both {old} (its old name) and {new} are given; keep only the new one"
            )
        _renamed(old, new, source)
        out[new] = value

    simulation = out.get("simulation")
    if isinstance(simulation, dict):
        simulation = dict(simulation)
        for key in ("node_wait_s", "round_timeout_s"):
            if key in simulation:
                move(f"simulation.{key}", key, simulation.pop(key))
        out["simulation"] = simulation
    if not any(isinstance(out.get(s), dict) for s in _SCENARIO_SECTIONS):
        return out
    for section in ("scenario", "data", "training"):
        table = out.pop(section, None)
        if not isinstance(table, dict):
            if table is not None:
                out[section] = table  # not a table: let validation name it
            continue
        for key, value in table.items():
            if section == "data" and key == "min_samples_per_device":
                log.warning("data.min_samples_per_device: no longer used; ignored")
            elif section == "training" and key == "strategy":
                _renamed("training.strategy", "strategy.name", source)
                out["strategy"] = {**_table(out.get("strategy")), "name": value}
            elif section == "training" and key == "strategy_params" and isinstance(value, dict):
                _renamed("training.strategy_params", "strategy", source)
                out["strategy"] = {**_table(out.get("strategy")), **value}
            else:
                move(f"{section}.{key}", key, value)
    if not old_layout:
        return out
    central = out.get("central_dp")
    if isinstance(central, dict) and "enabled" not in central:
        log.warning("central_dp: the table alone no longer switches it on; add enabled = true")
        out["central_dp"] = {"enabled": True, **central}
    devices = out.get("num_devices")
    if isinstance(devices, int):
        out.setdefault("min_available_nodes", devices)
        share = out.get("fraction_train", 1.0)
        if isinstance(share, int | float):
            out.setdefault("min_train_nodes", max(1, math.floor(devices * share)))
    evaluate = out.get("fraction_evaluate", 0.0)
    if isinstance(evaluate, int | float):
        out.setdefault("min_evaluate_nodes", 1 if evaluate > 0 else 0)
    out.setdefault("node_wait_s", 30.0)
    return out


class FederationPlan(StrictModel):
    """Everything one federated run needs. See the module docstring.

    A simulation scenario is a plan plus a ``[simulation]`` table
    (``edgefl.simulations.scenario.Scenario``); the plan itself ignores that table, so
    ``edgefl server train --plan`` runs a scenario file as it is.
    """

    name: str | None = Field(
        None,
        pattern=SAFE_NAME_PATTERN,
        description="Short name (letters, digits, `. _ -`); a simulation's reports and run ids.",
    )
    description: str = Field("", description="One or two sentences for reports.")
    dataset: str = Field("digits", description=f"Bundled dataset: {' | '.join(DATASETS)}.")
    model: str | None = Field(
        None, description="Zoo model built for the dataset (default: the dataset's first)."
    )
    num_devices: int = Field(
        10,
        ge=1,
        le=10_000,
        description="Devices (partitions of the data); central DP's population size.",
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0, description="Dirichlet label-skew of the partitions; smaller is more non-IID."
    )
    seed: int = Field(0, ge=0, description="Seed of the split, the partitions and the model.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Held-out share of the dataset (server-side evaluation)."
    )
    rounds: int = Field(10, ge=1, le=10_000, description="Planned federated rounds.")
    local_epochs: int = Field(1, ge=1, description="Local epochs per round.")
    batch_size: int = Field(16, ge=1, description="Expected batch size (Poisson under DP).")
    lr: float = Field(0.1, gt=0, description="Local learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Local SGD momentum.")
    lr_final: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the last planned round: `lr` falls to it along a "
        "half cosine over the rounds (none: `lr` in every round).",
    )
    augment_multiplicity: int = Field(
        1,
        ge=1,
        le=32,
        description="Augmentation multiplicity K: each sampled image trains as K views "
        "shifted by up to `augment_shift` pixels, its gradient the mean over them taken "
        "before DP's per-sample clip, so ε is unchanged (1: off; image datasets only).",
    )
    augment_shift: int = Field(
        1, ge=1, le=4, description="Largest shift of an augmented view, in pixels."
    )
    centre_inputs: bool = Field(
        False,
        description="Devices train on each image minus its own mean pixel value (no "
        "statistic shared between samples, so no privacy cost); MLPs on images only.",
    )
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Local optimiser.")
    strategy: StrategyPlan = Field(
        default_factory=StrategyPlan, description="Aggregation strategy and its parameters."
    )
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="Share of the connected devices trained per round."
    )
    fraction_evaluate: float = Field(
        0.0, ge=0, le=1, description="Share of devices for federated evaluation (0: off)."
    )
    min_train_nodes: int = Field(2, ge=1, description="Fewest devices a round trains.")
    min_evaluate_nodes: int = Field(1, ge=0, description="Fewest devices a round evaluates.")
    min_available_nodes: int = Field(
        2, ge=1, description="Devices that must be connected before a round starts."
    )
    node_wait_s: float = Field(60.0, ge=0, description="Bounded wait for min_available_nodes.")
    round_timeout_s: float = Field(600.0, gt=0, description="Per-round reply timeout.")
    select_by_budget: bool = Field(True, description="Never select devices out of ε budget.")
    select_by_capability: bool = Field(
        True, description="Prefer fast devices (reported profile, past round times)."
    )
    dp: DPPlan = Field(default_factory=DPPlan, description="Device-level DP-SGD.")
    central_dp: CentralDPPlan = Field(
        default_factory=CentralDPPlan, description="Central DP on the server."
    )
    profiles: list[DeviceProfile] = Field(
        default_factory=lambda: [DeviceProfile()],
        description="Emulated device groups (`[[profiles]]`; simulated devices only).",
    )
    _central_budget: CentralDPBudget | None = PrivateAttr(default=None)

    renamed_keys: ClassVar[RenameMap] = {"privacy": "dp"}

    @model_validator(mode="before")
    @classmethod
    def _read_file_layout(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _upgrade_old_layout(data, cls.__name__)
        if cls is FederationPlan and "simulation" in data:
            log.warning("[simulation] is for `edgefl simulate` only; the plan ignores it")
            data = {k: v for k, v in data.items() if k != "simulation"}
        return data

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; choose one of: {', '.join(DATASETS)}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        if value is not None and value not in MODEL_DATASET:
            raise ValueError(f"unknown model; choose one of: {', '.join(sorted(MODEL_DATASET))}")
        return value

    @field_validator("profiles", mode="before")
    @classmethod
    def _one_table_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> FederationPlan:
        if self.model is not None and MODEL_DATASET[self.model] != self.dataset:
            raise ValueError(
                f"model {self.model!r} is built for dataset {MODEL_DATASET[self.model]!r}, "
                f"not {self.dataset!r}"
            )
        if self.min_available_nodes > self.num_devices:
            raise ValueError(
                f"min_available_nodes ({self.min_available_nodes}) > num_devices "
                f"({self.num_devices})"
            )
        if self.min_train_nodes > self.num_devices:
            raise ValueError(
                f"min_train_nodes ({self.min_train_nodes}) > num_devices ({self.num_devices})"
            )
        if not self.profiles:
            raise ValueError("profiles: give at least one device profile")
        given = [p.fraction for p in self.profiles if p.fraction is not None]
        if given and len(given) != len(self.profiles):
            raise ValueError("profiles: give a fraction for every profile or for none")
        if given and not math.isclose(sum(given), 1.0, abs_tol=1e-6):
            raise ValueError(f"profiles: fractions must sum to 1 (got {sum(given):.4g})")
        names = [p.name for p in self.profiles if p.name is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"profiles: names must be unique, got {names}")
        if self.augment_multiplicity > 1 and self.dataset not in _IMAGE_DATASETS:
            raise ValueError(
                f"augment_multiplicity {self.augment_multiplicity}: shifted views need "
                f"images, and dataset {self.dataset!r} is a table (image datasets: "
                f"{', '.join(sorted(_IMAGE_DATASETS))})"
            )
        if self.centre_inputs and self.model_name not in _CENTRABLE_MODELS:
            raise ValueError(
                f"centre_inputs: model {self.model_name!r} does not start with a Linear "
                f"layer on the image; choose one of: {', '.join(sorted(_CENTRABLE_MODELS))}"
            )
        if self.augment_shift != 1 and self.augment_multiplicity == 1:
            raise ValueError("augment_shift applies only with augment_multiplicity > 1")
        if self.central_dp.enabled and self.strategy.name != "fedavg":
            raise ValueError("central_dp needs strategy.name = 'fedavg' (Flower's accountant)")
        self._central_budget = central_dp_budget(self)
        if self._central_budget is not None and self._central_budget.rounds_fit == 0:
            # Flower's accountant would stop the run before round 1: refuse it now instead
            # of running nothing and reporting NaN accuracy.
            raise ValueError(self._central_budget.describe())
        return self

    @property
    def central_budget(self) -> CentralDPBudget | None:
        """How many rounds central DP's ``max_epsilon`` allows (``None``: no such cap)."""
        return self._central_budget

    @property
    def model_name(self) -> str:
        """The zoo model (the dataset's default when ``model`` is not set)."""
        return self.model or default_model(self.dataset)

    def round_lr(self, server_round: int) -> float:
        """The local learning rate of ``server_round`` (1-based).

        ``lr`` in every round, or with ``lr_final`` the half cosine from ``lr`` (round 1)
        to ``lr_final`` (round ``rounds``); rounds past the plan keep ``lr_final``.
        """
        if self.lr_final is None or self.rounds == 1:
            return self.lr
        progress = min(max(server_round - 1, 0) / (self.rounds - 1), 1.0)
        return self.lr_final + (self.lr - self.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """A flat ``run_config``-style dict: nested keys dotted, lists as JSON strings.

        ``None`` values are left out (absent means default).
        """
        flat: dict[str, bool | int | float | str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            elif isinstance(value, list):
                flat[prefix] = json.dumps(value)
            elif value is not None:
                flat[prefix] = value

        walk("", self.model_dump(mode="json"))
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any], source: str = "run_config") -> FederationPlan:
        """Rebuild a plan from :meth:`to_flat` output (or a Flower ``run_config``).

        Raises:
            ConfigError: A value is invalid; the message names the dotted key.
        """
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            parts = str(key).split(".")
            node = nested
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"{source}: {key}: conflicts with a scalar key {part!r}")
                node = child
            if parts[-1] == "profiles" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{source}: profiles: not a JSON list ({exc})") from exc
            node[parts[-1]] = value
        return load_plan(nested, source=source)

    def plan_key(self) -> str:
        """A short stable fingerprint of the plan (devices keep σ per plan key).

        The name and description do not count, nor a profile's name and straggler keys
        while no device straggles (keys newer than the fingerprint: a plan that could be
        written before keeps its key, so a resumed run keeps its σ).
        """
        import hashlib

        data = self.model_dump(mode="json", exclude={"name", "description"})
        if data["lr_final"] is None:
            del data["lr_final"]
        if not data["centre_inputs"]:
            del data["centre_inputs"]
        if data["augment_multiplicity"] == 1 and data["augment_shift"] == 1:
            del data["augment_multiplicity"], data["augment_shift"]
        if not data["dp"]["clip_per_layer"]:
            del data["dp"]["clip_per_layer"]
        strategy = data["strategy"]
        if strategy["server_learning_rate"] == 1.0 and strategy["server_momentum"] == 0:
            del strategy["server_learning_rate"], strategy["server_momentum"]
        for profile in data["profiles"]:
            if profile["name"] is None:
                del profile["name"]
            if profile["straggler_fraction"] == 0:
                del profile["straggler_fraction"], profile["straggler_speed"]
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CentralDPBudget:
    """What central DP's ``max_epsilon`` allows a plan, by Flower's own RDP accountant.

    Attributes:
        noise_multiplier: The plan's z.
        max_epsilon: The plan's cap.
        planned: The plan's rounds.
        rounds_fit: Rounds whose release stays within ``max_epsilon`` (at most
            ``planned``); Flower's accountant stops the run before the next one.
        epsilon_fit: ε after ``rounds_fit`` rounds (0 when none fits).
        epsilon_first: ε after one round.
        epsilon_planned: ε after all planned rounds.
        noise_for_one: Smallest z (3 significant digits, rounded up) that fits one round.
        noise_for_all: Smallest z that fits every planned round.
    """

    noise_multiplier: float
    max_epsilon: float
    planned: int
    rounds_fit: int
    epsilon_fit: float
    epsilon_first: float
    epsilon_planned: float
    noise_for_one: float
    noise_for_all: float

    def describe(self) -> str:
        """One sentence for the operator: what fits, and what would fit the plan."""
        z, cap, n = self.noise_multiplier, self.max_epsilon, self.planned
        if self.rounds_fit >= n:
            return (
                f"central_dp: noise_multiplier {z:g} with max_epsilon {cap:g} allows all "
                f"{n} planned rounds (ε {self.epsilon_planned:.3f})"
            )
        fix_all = (
            f"noise_multiplier {self.noise_for_all:g} or max_epsilon "
            f"{_round_up(self.epsilon_planned):g} allows all {n}"
        )
        if self.rounds_fit == 0:
            return (
                f"central_dp: noise_multiplier {z:g} spends ε {self.epsilon_first:.3f} in the "
                f"first round, over max_epsilon {cap:g}, so no round can run; noise_multiplier "
                f"{self.noise_for_one:g} or max_epsilon {_round_up(self.epsilon_first):g} "
                f"allows 1 round, {fix_all}"
            )
        return (
            f"central_dp: noise_multiplier {z:g} with max_epsilon {cap:g} allows only "
            f"{self.rounds_fit} of the {n} planned rounds (the run stops after round "
            f"{self.rounds_fit} at ε {self.epsilon_fit:.3f}); {fix_all}"
        )


def _round_up(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` significant digits (a safe suggestion)."""
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def central_dp_accountant(
    delta: float, population_size: int, max_epsilon: float | None = None
) -> RdpAccountant:
    """Flower's ``RdpAccountant`` as central DP uses it (the server and the plan check).

    One Gaussian release per round, no amplification by sampling (every sampled device
    is counted), add-or-remove-one neighbours. Imports Flower's accountant (``flwr[dp]``)
    on first use.
    """
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population_size,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=max_epsilon,
        )
    )


def central_dp_epsilon(
    noise_multiplier: float, delta: float, releases: int, population_size: int
) -> float:
    """ε after ``releases`` rounds of central DP, by :func:`central_dp_accountant`."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    accountant = central_dp_accountant(delta, population_size)
    accountant.compose(
        GaussianPrivacyEvent(
            noise_multiplier=noise_multiplier,
            sample_size=population_size,
            population_size=population_size,
        ),
        count=releases,
    )
    return float(accountant.get_epsilon(delta))


def central_dp_budget(plan: FederationPlan) -> CentralDPBudget | None:
    """The rounds ``central_dp.max_epsilon`` allows ``plan``; ``None`` without such a cap."""
    c = plan.central_dp
    if not c.enabled or c.max_epsilon is None:
        return None
    cap, planned = c.max_epsilon, plan.rounds

    def eps(z: float, k: int) -> float:
        return central_dp_epsilon(z, c.delta, k, plan.num_devices)

    # ε grows with the rounds: the last k that fits, by bisection on [0, planned].
    lo, hi = 0, planned
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if eps(c.noise_multiplier, mid) <= cap:
            lo = mid
        else:
            hi = mid - 1

    def noise_for(k: int) -> float:
        # ε falls as z grows: bisect to 3 significant digits, then round up so it fits.
        low, high = 1e-3, 1.0
        while eps(high, k) > cap:
            low, high = high, high * 2
        while high - low > high * 1e-4:
            mid = (low + high) / 2
            low, high = (mid, high) if eps(mid, k) > cap else (low, mid)
        return _round_up(high)

    z = c.noise_multiplier
    return CentralDPBudget(
        noise_multiplier=z,
        max_epsilon=cap,
        planned=planned,
        rounds_fit=lo,
        epsilon_fit=eps(z, lo) if lo else 0.0,
        epsilon_first=eps(z, 1),
        epsilon_planned=eps(z, planned),
        noise_for_one=noise_for(1) if lo == 0 else z,
        noise_for_all=noise_for(planned) if lo < planned else z,
    )


def load_plan(data: Any, source: str = "plan") -> FederationPlan:
    """Validate parsed data (e.g. a TOML table) into a plan.

    Raises:
        ConfigError: Unknown keys or invalid values; the message names each key path.
    """
    return validate_config(FederationPlan, data, source=source)


def _type_name(annotation: Any) -> str:
    """A config type as a reader writes it: ``int``, ``float or unset``, ``sgd | adam``."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return f"{_type_name(args[0])} or unset"
    return {str: "string", int: "int", float: "float", bool: "bool"}.get(annotation, "table")


def _toml_value(value: Any) -> str:
    if value is None:
        return "unset"
    return json.dumps(value, ensure_ascii=False)


def keys_table(model: type[StrictModel], prefix: str = "") -> str:
    """A Markdown table of a config model's keys (key, type, default, meaning).

    Nested tables are flattened to dotted keys (``dp.target_epsilon``), a list of tables
    to ``profiles[].fraction``; the meaning is each field's description. The README's key
    tables are this function's output (a test keeps them equal).
    """
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type[StrictModel], pre: str) -> None:
        import typing

        for name, info in cls.model_fields.items():
            ann = info.annotation
            inner = typing.get_args(ann)[0] if typing.get_origin(ann) is list else None
            if isinstance(ann, type) and issubclass(ann, StrictModel):
                walk(ann, f"{pre}{name}.")
                continue
            if isinstance(inner, type) and issubclass(inner, StrictModel):
                walk(inner, f"{pre}{name}[].")
                continue
            default = "required" if info.is_required() else _toml_value(info.get_default())
            cells = [f"`{pre}{name}`", _type_name(ann), default, info.description or ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    walk(model, prefix)
    return "\n".join(rows) + "\n"


def device_id_for(partition_id: int) -> str:
    """The stable device name of a simulated partition: ``sim-007``."""
    return f"sim-{partition_id:03d}"


def expand_profiles(profiles: list[DeviceProfile]) -> list[DeviceProfile]:
    """The profiles with every fraction set and each group's stragglers a group of their own.

    A group with ``straggler_fraction`` s becomes its regular part (fraction × (1 − s) at
    ``compute_speed``) followed by its stragglers (fraction × s at ``straggler_speed``),
    both with the group's dropout; profiles without a fraction share equally.
    """
    out: list[DeviceProfile] = []
    for profile in profiles:
        share = profile.fraction if profile.fraction is not None else 1.0 / len(profiles)
        regular = share * (1 - profile.straggler_fraction)
        straggling = share * profile.straggler_fraction
        if regular > 0:
            out.append(
                DeviceProfile(
                    name=profile.name,
                    fraction=regular,
                    compute_speed=profile.compute_speed,
                    dropout=profile.dropout,
                )
            )
        if straggling > 0:
            out.append(
                DeviceProfile(
                    name=profile.name,
                    fraction=straggling,
                    compute_speed=profile.straggler_speed,
                    dropout=profile.dropout,
                )
            )
    return out


def profile_for(
    profiles: list[DeviceProfile], partition_id: int, num_partitions: int
) -> DeviceProfile:
    """The profile of one partition: profiles cover the partition ids in order by fraction.

    Stragglers are placed after the rest of their group (:func:`expand_profiles`).
    Counts are rounded by largest remainder, so they always add up to ``num_partitions``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} outside [0, {num_partitions})")
    profiles = expand_profiles(profiles)
    shares = [p.fraction if p.fraction is not None else 1.0 / len(profiles) for p in profiles]
    exact = [s * num_partitions for s in shares]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: num_partitions - sum(counts)]:
        counts[i] += 1
    bound = 0
    for profile, count in zip(profiles, counts, strict=True):
        bound += count
        if partition_id < bound:
            return profile
    return profiles[-1]


# ---------------------------------------------------------------------------------------
# What travels in the train/evaluate ConfigRecord.
# ---------------------------------------------------------------------------------------

ConfigValue = bool | int | float | str

_AUGMENT_BOUNDS: Final[dict[str, tuple[int, int]]] = {
    "augment_multiplicity": (1, 32),
    "augment_shift": (1, 4),
}
"""What a device accepts for the augmentation keys (the plan's own bounds)."""


@dataclass(frozen=True)
class ClientInstructions:
    """The ClientApp's instructions, carried in the message's ``"config"`` ConfigRecord.

    Keys in the record are the field names with ``-`` instead of ``_`` (Flower style);
    ``profiles`` and ``ledger`` are JSON strings. Flower's own keys ride along:
    ``server-round`` (every strategy), ``proximal-mu`` (FedProx) and ``clipping_norm``
    (central DP with client-side clipping).

    Attributes:
        run_id: The federated run (devices keep one accountant per run).
        plan_key: Fingerprint of the plan; σ is re-chosen if it changes.
        dataset: Bundled dataset name.
        model: Zoo model name.
        seed: Seed of the split and partitioning (and dropout draws).
        dirichlet_alpha: Dirichlet α of the partitioning.
        num_partitions: How many partitions the training split is cut into.
        test_fraction: Held-out share of the dataset (not trained on).
        rounds: Planned rounds (σ is sized for rounds × local_epochs).
        local_epochs: Local epochs per round.
        batch_size: Expected batch size (Poisson sampling).
        lr: Learning rate.
        momentum: SGD momentum.
        optimizer: ``sgd`` or ``adam``.
        dp_enabled: Train with DP-SGD.
        target_epsilon: ε a device reaches after ``rounds`` rounds.
        delta: δ.
        max_grad_norm: Per-sample clip.
        epsilon_cap: A device refuses to train past this ε.
        profiles: JSON list of :class:`DeviceProfile` (simulation emulation).
        ledger: JSON ``{device_id: accountant history}`` the server holds (ledger floor).
        server_round: The round this message belongs to.
        proximal_mu: FedProx μ (0: no proximal term).
        clipping_norm: Central-DP update clip (0: none).
        augment_multiplicity: Views per sampled image (1: no augmentation).
        augment_shift: Largest shift of a view, in pixels.
        clip_per_layer: Opacus' per-layer clipping (an equal split of max_grad_norm).
        centre_inputs: Train on each sample minus its own mean value.
    """

    run_id: str
    plan_key: str
    dataset: str
    model: str
    seed: int
    dirichlet_alpha: float
    num_partitions: int
    test_fraction: float
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    optimizer: str
    dp_enabled: bool
    target_epsilon: float
    delta: float
    max_grad_norm: float
    epsilon_cap: float
    profiles: str = "[]"
    ledger: str = "{}"
    server_round: int = 0
    proximal_mu: float = 0.0
    clipping_norm: float = 0.0
    augment_multiplicity: int = 1
    augment_shift: int = 1
    clip_per_layer: bool = False
    centre_inputs: bool = False

    @classmethod
    def from_plan(cls, plan: FederationPlan, run_id: str) -> ClientInstructions:
        """The instructions for every device of a plan (round and ledger filled later)."""
        return cls(
            run_id=run_id,
            plan_key=plan.plan_key(),
            dataset=plan.dataset,
            model=plan.model_name,
            seed=plan.seed,
            dirichlet_alpha=plan.dirichlet_alpha,
            num_partitions=plan.num_devices,
            test_fraction=plan.test_fraction,
            rounds=plan.rounds,
            local_epochs=plan.local_epochs,
            batch_size=plan.batch_size,
            lr=plan.lr,
            momentum=plan.momentum,
            optimizer=plan.optimizer,
            dp_enabled=plan.dp.enabled,
            target_epsilon=plan.dp.target_epsilon,
            delta=plan.dp.delta,
            max_grad_norm=plan.dp.max_grad_norm,
            epsilon_cap=plan.dp.cap,
            # The wire keeps the three keys every ClientApp version reads: groups with
            # stragglers travel as two profiles, names stay on the server.
            profiles=json.dumps(
                [
                    p.model_dump(mode="json", include={"fraction", "compute_speed", "dropout"})
                    for p in expand_profiles(plan.profiles)
                ]
            ),
            proximal_mu=plan.strategy.proximal_mu if plan.strategy.name == "fedprox" else 0.0,
            augment_multiplicity=plan.augment_multiplicity,
            augment_shift=plan.augment_shift,
            clip_per_layer=plan.dp.clip_per_layer,
            centre_inputs=plan.centre_inputs,
        )

    def to_config(self) -> dict[str, ConfigValue]:
        """Flat ConfigRecord values (hyphenated keys)."""
        out = {k.replace("_", "-"): v for k, v in asdict(self).items()}
        del out["clipping-norm"]  # set by Flower's central-DP wrapper as ``clipping_norm``
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClientInstructions:
        """Parse a received ConfigRecord (unknown keys are ignored).

        Raises:
            ConfigError: A required key is missing or has the wrong type.
        """
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            key = name.replace("_", "-")
            if name == "clipping_norm":
                # Flower's central-DP wrapper injects this key with an underscore.
                values[name] = config.get("clipping_norm", config.get(key, 0.0))
            elif key in config:
                values[name] = config[key]
        try:
            inst = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"train config from the server is incomplete: {exc}") from exc
        for name, f in cls.__dataclass_fields__.items():
            value = getattr(inst, name)
            expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[str(f.type)]
            if not isinstance(value, expected):  # type: ignore[arg-type]
                raise ConfigError(
                    f"train config key {name.replace('_', '-')!r}: expected {f.type}, "
                    f"got {type(value).__name__}"
                )
        # The plan's own bounds: a device builds augment-multiplicity views of every batch.
        for name, (low, high) in _AUGMENT_BOUNDS.items():
            value = getattr(inst, name)
            if isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(
                    f"train config key {name.replace('_', '-')!r}: {value!r} is outside "
                    f"[{low}, {high}]"
                )
        return inst

    def device_profiles(self) -> list[DeviceProfile]:
        """The parsed :attr:`profiles` list."""
        return [DeviceProfile.model_validate(p) for p in json.loads(self.profiles)]

    def ledger_floor(self) -> dict[str, list[list[float]]]:
        """The parsed :attr:`ledger` map: device id -> Opacus accountant history."""
        parsed: dict[str, list[list[float]]] = json.loads(self.ledger)
        return parsed


# ---------------------------------------------------------------------------------------
# What a run reports.
# ---------------------------------------------------------------------------------------

ReplyStatus = Literal["ok", "budget_exhausted", "lifetime_budget_exhausted"]
"""The ``status`` a device puts in its reply's ``"edgefl"`` ConfigRecord."""


@dataclass
class RoundReport:
    """One finished round.

    Attributes:
        round: Round number (1-based; continues after a resume).
        accuracy: Server-side accuracy of the new global model on the held-out split.
        loss: Server-side cross-entropy on the held-out split.
        federated_accuracy: Example-weighted accuracy of federated evaluation (or None).
        federated_loss: Example-weighted loss of federated evaluation (or None).
        train_loss: Example-weighted local training loss of the accepted replies.
        num_selected: Devices sent a train message.
        num_replies: Replies aggregated.
        num_failures: Messages that failed (error reply, timeout, dropout).
        num_rejected: Replies refused by validation (wrong shapes, NaN/Inf, ε going down).
        num_refused: Devices that refused to train (``budget_exhausted``, or
            ``lifetime_budget_exhausted``: past the device's cap over all its runs).
        num_flagged: Devices flagged this round (reported ε went down).
        epsilon_max: Largest running ε of any device after this round.
        wall_s: Wall time of the round.
        aggregated: False when no update was aggregated (the model did not change).
        rejections: ``device_or_node: reason`` of every rejected reply.
        refusals: ``device: reason`` of every device that refused to train (its reply's
            reason, e.g. the ε the next round would reach past its cap).
        failure_reasons: ``device_or_node: reason`` of every failed train message
            (error replies; ``no reply`` for those that timed out).
    """

    round: int
    accuracy: float
    loss: float
    federated_accuracy: float | None = None
    federated_loss: float | None = None
    train_loss: float | None = None
    num_selected: int = 0
    num_replies: int = 0
    num_failures: int = 0
    num_rejected: int = 0
    num_refused: int = 0
    num_flagged: int = 0
    epsilon_max: float = 0.0
    wall_s: float = 0.0
    aggregated: bool = True
    rejections: dict[str, str] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    failure_reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def why_nothing_trained(self) -> str:
        """Each device's reason for not contributing this round, in one line."""
        parts = [f"{d} refused: {r}" for d, r in sorted(self.refusals.items())]
        parts += [f"{d} failed: {r}" for d, r in sorted(self.failure_reasons.items())]
        parts += [f"{d} rejected: {r}" for d, r in sorted(self.rejections.items())]
        if not parts:
            parts = [f"{self.num_selected} selected, no usable update"]
        return "; ".join(parts)


@dataclass
class FederationResult:
    """A finished (or stopped) run.

    Attributes:
        run_id: The run.
        status: ``completed``, ``stopped`` (e.g. central DP budget) or ``running``
            (read while in progress / killed).
        stop_reason: Why a run stopped early (``""`` when completed).
        rounds: One report per finished round, in order.
        epsilon_per_device: The latest running ε of every device in the ledger.
        central_epsilon: ε of central DP (None when not enabled).
        planned_rounds: The plan's rounds (0: unknown).
        lifetime: Each device of the run (trained or refused) -> its lifetime privacy over
            every run in the registry: ``epsilon`` (RDP composition of its ledger
            histories), ``delta``, ``runs`` (run id -> that run's ε), and what the device
            itself last reported, ``reported_epsilon`` and ``cap`` (None: unknown or no
            cap). Empty when read without the registry.
    """

    run_id: str
    status: str
    stop_reason: str = ""
    rounds: list[RoundReport] = field(default_factory=list)
    epsilon_per_device: dict[str, float] = field(default_factory=dict)
    central_epsilon: float | None = None
    planned_rounds: int = 0
    lifetime: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        """Server-side accuracy after the last round (NaN when no round finished)."""
        return self.rounds[-1].accuracy if self.rounds else float("nan")

    @property
    def rounds_trained(self) -> int:
        """Rounds that aggregated at least one update."""
        return sum(1 for r in self.rounds if r.aggregated)

    def shortfall(self) -> str | None:
        """Why the run trained fewer rounds than planned, or ``None`` if it trained all.

        A round that aggregated nothing does not count as trained, and its line names
        every selected device's reason (refused, failed or rejected); a run that stopped
        early adds its stop reason.
        """
        planned = self.planned_rounds or len(self.rounds)
        idle = [r for r in self.rounds if not r.aggregated]
        if self.rounds_trained >= planned and not idle and self.status != "stopped":
            return None
        parts = [f"trained {self.rounds_trained} of {planned} planned rounds"]
        parts += [f"round {r.round} trained nobody ({r.why_nothing_trained()})" for r in idle]
        if self.stop_reason:
            parts.append(f"stopped: {self.stop_reason}")
        elif len(self.rounds) < planned:
            parts.append(f"only {len(self.rounds)} rounds ran")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``complete`` and ``shortfall`` (see :meth:`shortfall`)."""
        out = asdict(self)
        out["final_accuracy"] = self.final_accuracy
        out["rounds_trained"] = self.rounds_trained
        shortfall = self.shortfall()
        out["complete"] = shortfall is None
        out["shortfall"] = shortfall
        return out
