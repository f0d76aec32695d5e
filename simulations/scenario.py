"""Simulation scenarios: one validated TOML file per experiment.

A scenario names the data (dataset, model, number of virtual devices, Dirichlet α), the
training (rounds, local epochs, optimiser, strategy), the privacy settings (device-level
DP-SGD and optional central DP), the device profiles (compute speed, dropout,
stragglers) and simulation-only settings (CPUs per client, bounded node wait, round
timeout, whether to also run without DP). Every key is checked by a strict pydantic
model, so a typo or a bad value fails with the key path, the value and the reason.

The federation part converts to the core :class:`edgefl.federation.FederationPlan`
(the same plan a deployment runs); the rest stays here.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from edgefl.config import StrictModel, validate_config
from edgefl.datasets import DATASETS
from edgefl.errors import ConfigError
from edgefl.files import SAFE_NAME_PATTERN

if TYPE_CHECKING:
    from edgefl.federation import FederationPlan

__all__ = [
    "STRATEGIES",
    "STRATEGY_PARAMS",
    "DeviceProfile",
    "Scenario",
    "load_scenario",
    "parse_scenario",
    "shipped_scenarios",
]

# Strategy names a scenario may use, with the parameters each accepts. They wrap
# Flower's own strategies (the server builds them); unknown names are refused here,
# before anything starts.
STRATEGY_PARAMS: dict[str, frozenset[str]] = {
    "fedavg": frozenset(),
    "fedprox": frozenset({"proximal_mu"}),
    "fedadam": frozenset({"eta", "eta_l", "beta_1", "beta_2", "tau"}),
    "fedmedian": frozenset(),
    "fedtrimmedavg": frozenset({"trim_beta"}),
}
STRATEGIES: tuple[str, ...] = tuple(sorted(STRATEGY_PARAMS))

# Zoo models and the dataset each is built for. Kept as names here so validating a
# scenario does not import torch; a test pins it to edgefl.zoo.MODELS.
_MODEL_DATASET: dict[str, str] = {
    "cancer-mlp": "breast-cancer",
    "digits-cnn": "digits",
    "digits-mlp": "digits",
    "mnist-cnn": "mnist5k",
}


class ScenarioMeta(StrictModel):
    """Identity of the scenario."""

    name: str = Field(
        pattern=SAFE_NAME_PATTERN,
        description="Short name (letters, digits, . _ -), used in reports and file names.",
    )
    description: str = Field("", description="One or two sentences for the report.")


class DataSection(StrictModel):
    """Which data, which model, and how it is split across virtual devices."""

    dataset: str = Field(description=f"Bundled dataset: one of {', '.join(DATASETS)}.")
    model: str = Field(description=f"Zoo model: one of {', '.join(sorted(_MODEL_DATASET))}.")
    num_devices: int = Field(ge=1, le=10_000, description="Number of virtual devices.")
    dirichlet_alpha: float = Field(
        gt=0, description="Dirichlet label-skew concentration; smaller is more non-IID."
    )
    seed: int = Field(0, ge=0, description="Seed of the split, the partition and the model.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of the dataset held out for server-side evaluation."
    )
    min_samples_per_device: int = Field(
        8, ge=1, description="Every device gets at least this many training samples."
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; choose one of: {', '.join(DATASETS)}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in _MODEL_DATASET:
            known = ", ".join(sorted(_MODEL_DATASET))
            raise ValueError(f"unknown model {value!r}; choose one of: {known}")
        return value

    @model_validator(mode="after")
    def _model_fits_dataset(self) -> DataSection:
        wanted = _MODEL_DATASET[self.model]
        if wanted != self.dataset:
            raise ValueError(
                f"model {self.model!r} is built for dataset {wanted!r}, not {self.dataset!r}"
            )
        return self


class TrainingSection(StrictModel):
    """Rounds, local training and the aggregation strategy."""

    rounds: int = Field(ge=1, le=10_000, description="Planned federated rounds.")
    local_epochs: int = Field(1, ge=1, le=100, description="Local epochs per round.")
    batch_size: int = Field(
        16, ge=1, description="Expected batch size (Poisson sampling under DP)."
    )
    lr: float = Field(gt=0, description="Local learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Local SGD momentum.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Local optimiser.")
    strategy: str = Field("fedavg", description=f"One of: {', '.join(STRATEGIES)}.")
    strategy_params: dict[str, float] = Field(
        default_factory=dict,
        description="Strategy parameters, e.g. proximal_mu for fedprox, eta for fedadam.",
    )
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="Share of the available devices sampled per round."
    )
    min_train_nodes: int | None = Field(
        None, ge=1, description="Fewest devices a round trains on (default: all sampled)."
    )
    fraction_evaluate: float = Field(
        0.0, ge=0, le=1, description="Share of devices for federated evaluation (0 = off)."
    )
    select_by_budget: bool = Field(True, description="Never select a device out of ε budget.")
    select_by_capability: bool = Field(
        True, description="Prefer fast devices (reported profile, past round times)."
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        key = value.lower()
        if key not in STRATEGY_PARAMS:
            raise ValueError(f"unknown strategy {value!r}; choose one of: {', '.join(STRATEGIES)}")
        return key

    @model_validator(mode="after")
    def _params_fit_strategy(self) -> TrainingSection:
        allowed = STRATEGY_PARAMS[self.strategy]
        unknown = sorted(set(self.strategy_params) - allowed)
        if unknown:
            names = ", ".join(sorted(allowed)) or "none"
            raise ValueError(
                f"strategy_params {unknown} do not apply to {self.strategy!r} (it takes: {names})"
            )
        return self


class PrivacySection(StrictModel):
    """Device-level DP-SGD (Opacus); σ is chosen once for rounds × local epochs."""

    enabled: bool = Field(True, description="Train with DP-SGD on every device.")
    target_epsilon: float = Field(8.0, gt=0, description="ε each device reaches after all rounds.")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm C.")
    device_epsilon_cap: float | None = Field(
        None,
        gt=0,
        description="A device refuses to train past this ε (default: target_epsilon).",
    )

    @property
    def cap(self) -> float:
        """The per-device ε cap in force."""
        return (
            self.device_epsilon_cap if self.device_epsilon_cap is not None else self.target_epsilon
        )


class CentralDPSection(StrictModel):
    """Optional user-level DP on the server (fixed clipping, RDP accountant)."""

    noise_multiplier: float = Field(gt=0, description="Noise std over the clipping norm.")
    clipping_norm: float = Field(gt=0, description="Clip of each device's update.")
    max_epsilon: float = Field(gt=0, description="The run stops before ε would pass this.")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the central accountant.")


class DeviceProfile(StrictModel):
    """A group of devices with the same hardware and connectivity.

    Devices are assigned to groups by share in partition order. Within a group,
    ``straggler_fraction`` of the devices run at ``straggler_speed`` instead of ``speed``
    (a straggler the round timeout may cut off).
    """

    name: str = Field("default", min_length=1, max_length=64, description="Profile name.")
    share: float = Field(1.0, gt=0, le=1, description="Share of the devices in this group.")
    speed: float = Field(
        1.0, gt=0, le=1, description="Compute-speed factor: 1 full speed, 0.25 four times slower."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Probability the device is unavailable in a round."
    )
    straggler_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of this group that straggles."
    )
    straggler_speed: float = Field(
        0.1, gt=0, le=1, description="Compute-speed factor of the stragglers."
    )


class SimulationSection(StrictModel):
    """Settings of the simulation engine only (not part of the federation plan)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per virtual client.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per virtual client.")
    compare_no_dp: bool = Field(False, description="Also run the same scenario without DP.")
    node_wait_s: float = Field(
        30.0, gt=0, description="Longest wait for enough devices before a round."
    )
    round_timeout_s: float = Field(600.0, gt=0, description="Longest wait for a round's replies.")


class Scenario(StrictModel):
    """A whole simulation scenario (the TOML file)."""

    scenario: ScenarioMeta = Field(description="Name and description.")
    data: DataSection = Field(description="Dataset, model and split.")
    training: TrainingSection = Field(description="Rounds, local training and strategy.")
    privacy: PrivacySection = Field(
        default_factory=PrivacySection, description="Device-level DP-SGD."
    )
    central_dp: CentralDPSection | None = Field(None, description="Optional central DP.")
    profiles: list[DeviceProfile] = Field(
        default_factory=lambda: [DeviceProfile()],
        description="Device profile groups ([[profiles]] tables, or one [profiles] table).",
    )
    simulation: SimulationSection = Field(
        default_factory=SimulationSection, description="Simulation engine settings."
    )

    @field_validator("profiles", mode="before")
    @classmethod
    def _one_table_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if not self.profiles:
            raise ValueError("profiles: give at least one profile or leave the key out")
        total = sum(p.share for p in self.profiles)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"profiles: shares must add up to 1, they add up to {total:g}")
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"profiles: names must be unique, got {names}")
        if (
            self.training.min_train_nodes is not None
            and self.training.min_train_nodes > self.data.num_devices
        ):
            raise ValueError(
                f"training.min_train_nodes ({self.training.min_train_nodes}) is more than "
                f"data.num_devices ({self.data.num_devices})"
            )
        return self

    def to_plan(self) -> FederationPlan:
        """The core federation plan this scenario runs (what a deployment would run).

        Profile groups with stragglers become two core profiles (regular and straggling).
        In simulation every virtual device is connected from the start, so the plan
        waits for all of them (bounded by ``simulation.node_wait_s``).

        Raises:
            ConfigError: The plan refuses the combination (e.g. central DP with a
                strategy other than fedavg); the message names the plan key.
        """
        from edgefl.federation import load_plan

        data, training, sim = self.data, self.training, self.simulation
        sampled = max(1, math.floor(data.num_devices * training.fraction_train))
        strategy: dict[str, Any] = {"name": training.strategy, **training.strategy_params}
        profiles: list[dict[str, Any]] = []
        for group in self.profiles:
            regular = group.share * (1 - group.straggler_fraction)
            straggling = group.share * group.straggler_fraction
            if regular > 0:
                profiles.append(
                    {"fraction": regular, "compute_speed": group.speed, "dropout": group.dropout}
                )
            if straggling > 0:
                profiles.append(
                    {
                        "fraction": straggling,
                        "compute_speed": group.straggler_speed,
                        "dropout": group.dropout,
                    }
                )
        # Rounding may leave the fractions a hair off 1; the plan checks with a tolerance.
        plan: dict[str, Any] = {
            "dataset": data.dataset,
            "model": data.model,
            "num_devices": data.num_devices,
            "dirichlet_alpha": data.dirichlet_alpha,
            "seed": data.seed,
            "test_fraction": data.test_fraction,
            "rounds": training.rounds,
            "local_epochs": training.local_epochs,
            "batch_size": training.batch_size,
            "lr": training.lr,
            "momentum": training.momentum,
            "optimizer": training.optimizer,
            "strategy": strategy,
            "fraction_train": training.fraction_train,
            "fraction_evaluate": training.fraction_evaluate,
            "min_train_nodes": training.min_train_nodes or sampled,
            "min_evaluate_nodes": 1 if training.fraction_evaluate > 0 else 0,
            "min_available_nodes": data.num_devices,
            "node_wait_s": sim.node_wait_s,
            "round_timeout_s": sim.round_timeout_s,
            "select_by_budget": training.select_by_budget,
            "select_by_capability": training.select_by_capability,
            "dp": {
                "enabled": self.privacy.enabled,
                "target_epsilon": self.privacy.target_epsilon,
                "delta": self.privacy.delta,
                "max_grad_norm": self.privacy.max_grad_norm,
                "epsilon_cap": self.privacy.device_epsilon_cap,
            },
            "profiles": profiles,
        }
        if self.central_dp is not None:
            plan["central_dp"] = {"enabled": True, **self.central_dp.model_dump()}
        return load_plan(plan, source=f"scenario {self.scenario.name!r} as a federation plan")

    def without_dp(self) -> Scenario:
        """The same scenario with device-level and central DP switched off."""
        copy = self.model_copy(deep=True)
        copy.privacy = copy.privacy.model_copy(update={"enabled": False})
        copy.central_dp = None
        return copy


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """Validate already-parsed TOML data.

    Raises:
        ConfigError: A key is unknown or a value is invalid; the message names the key path.
    """
    return validate_config(Scenario, data, source=source)


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario TOML file.

    Raises:
        ConfigError: The file is missing, not TOML, or invalid (naming the key path).
    """
    if path.suffix != ".toml":
        raise ConfigError(f"{path}: a scenario is a .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read scenario {path}: {exc.strerror}",
            hint="shipped scenarios: " + ", ".join(str(p) for p in shipped_scenarios()),
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_scenario(data, source=str(path))


def shipped_scenarios() -> list[Path]:
    """The scenario files installed with the package."""
    return sorted((Path(__file__).resolve().parent / "scenarios").glob("*.toml"))
