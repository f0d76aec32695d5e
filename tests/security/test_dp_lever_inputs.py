"""The server's augmentation, clipping and centring instructions, forged.

A device builds ``augment-multiplicity`` views of every sampled image, clips as
``clip-per-layer`` says and centres its inputs as ``centre-inputs`` says; all arrive in
the train message's config. A forged value (a multiplicity of a million to exhaust the
device's memory, zero or negative counts, a shift wider than the image, text or numbers
where booleans belong) is refused when the config is parsed, before the device trains
or spends any ε; the accepted range is the plan's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from edgefl.edge_agent.fl import clientapp
from edgefl.edge_agent.fl.privacy import FilePrivacyStore
from edgefl.errors import ConfigError
from edgefl.federation import ClientInstructions, load_plan
from edgefl.zoo import build_model


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower needs a task identity to build messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _config() -> dict[str, Any]:
    plan = load_plan(
        {
            "model": "digits-mlp",
            "num_devices": 1,
            "min_available_nodes": 1,
            "min_train_nodes": 1,
            "augment_multiplicity": 2,
        }
    )
    return dict(ClientInstructions.from_plan(plan, "forged").to_config())


FORGED = [
    ("augment-multiplicity", 1_000_000),
    ("augment-multiplicity", 33),
    ("augment-multiplicity", 0),
    ("augment-multiplicity", -4),
    ("augment-multiplicity", True),
    ("augment-multiplicity", 2.5),
    ("augment-multiplicity", "8"),
    ("augment-shift", 0),
    ("augment-shift", 64),
    ("augment-shift", -1),
    ("clip-per-layer", "yes"),
    ("clip-per-layer", 1),
    ("centre-inputs", "yes"),
    ("centre-inputs", 0),
]


@pytest.mark.parametrize(("key", "value"), FORGED)
def test_forged_lever_values_are_refused_when_parsed(key: str, value: object) -> None:
    config = {**_config(), key: value}
    with pytest.raises(ConfigError, match=repr(key)):
        ClientInstructions.from_config(config)


@pytest.mark.usefixtures("task_identity")
def test_a_device_refuses_a_forged_multiplicity_before_it_trains(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    model = build_model("digits-mlp", seed=0)
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
    msg = Message(
        RecordDict(
            {
                "arrays": arrays,
                "config": ConfigRecord({**_config(), "augment-multiplicity": 1_000_000}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 1, "state-dir": str(state_dir)},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(ConfigError, match="augment-multiplicity"):
        clientapp.train(msg, context)
    assert FilePrivacyStore(state_dir).runs() == {}  # nothing planned, nothing spent
