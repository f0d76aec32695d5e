"""Data sources: where the samples an agent collects and runs its model on come from.

A source yields records at its own pace (:meth:`DataSource.due`, polled by the agent);
the agent daemon commits every record to the outbox before it is published, and an agent
with a ``training:`` section keeps the labelled ones for on-device training
(:mod:`edgefl.edge_agent.datastore`), never those of an ``evaluation`` source.

The sources (``type`` in a ``sources:`` entry of the agent config):

- ``dataset-replay`` (:class:`DatasetReplaySource`): a bundled dataset played back at a
  rate, standing in for a sensor; its samples are prepared by a child process, so the
  agent itself never imports scikit-learn (``edgefl[device,datasets]``).
- ``endpoint`` (:class:`EndpointSource`): a loopback HTTP endpoint and/or a Unix socket
  that a sensor process posts samples to, as JSON or ``.npy``.
- ``folder`` (:class:`FolderSource`): a watched folder of ``.npy`` / ``.json`` files,
  each moved to ``done/`` or ``rejected/`` once read.
- ``plugin`` (:func:`load_plugin`): a :class:`DataSource` subclass an installed package
  declares in the ``edgefl.sources`` entry-point group.

Every source checks each sample against the model's input spec (:meth:`DataSource.expect`)
and its own ``shape``/``dtype`` when configured, and counts what it refuses by reason
(:attr:`DataSource.rejected`). ``docs/sources.md`` has the formats and the plugin
interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from edgefl.edge_agent.sources._base import DataSource, InputSpec, PushSource, SourceRecord
from edgefl.edge_agent.sources._endpoint import (
    EndpointConfig,
    EndpointHttp,
    EndpointSource,
    EndpointUnixSocket,
)
from edgefl.edge_agent.sources._folder import FolderConfig, FolderSource
from edgefl.edge_agent.sources._plugin import (
    ENTRY_POINT_GROUP,
    PluginConfig,
    find_plugin,
    load_plugin,
)
from edgefl.edge_agent.sources._replay import (
    DEVICE_SHARDS,
    DatasetReplayConfig,
    DatasetReplaySource,
    device_partition,
    replay_arrays,
)
from edgefl.edge_agent.sources._samples import RawSample, SampleError

__all__ = [
    "DEVICE_SHARDS",
    "ENTRY_POINT_GROUP",
    "DataSource",
    "DatasetReplayConfig",
    "DatasetReplaySource",
    "EndpointConfig",
    "EndpointHttp",
    "EndpointSource",
    "EndpointUnixSocket",
    "FolderConfig",
    "FolderSource",
    "InputSpec",
    "PluginConfig",
    "PushSource",
    "RawSample",
    "SampleError",
    "SourceConfig",
    "SourceRecord",
    "build_source",
    "device_partition",
    "find_plugin",
    "load_plugin",
    "replay_arrays",
]

SourceConfig = Annotated[
    DatasetReplayConfig | EndpointConfig | FolderConfig | PluginConfig,
    Field(discriminator="type"),
]


def build_source(
    config: SourceConfig, *, cache_dir: Path | None = None, device_id: str | None = None
) -> DataSource:
    """Instantiate the source a config describes (``cache_dir``: see :func:`replay_arrays`).

    ``device_id`` picks a training replay's default shard (:func:`device_partition`).

    Raises:
        ConfigError: The source cannot start (a port or socket in use, a folder it cannot
            use, a plugin that is not installed or refuses its options ...).
    """
    if isinstance(config, DatasetReplayConfig):
        return DatasetReplaySource(config, cache_dir=cache_dir, device_id=device_id)
    if isinstance(config, EndpointConfig):
        return EndpointSource(config)
    if isinstance(config, FolderConfig):
        return FolderSource(config)
    return load_plugin(config)
