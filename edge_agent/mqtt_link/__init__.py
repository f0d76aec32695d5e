"""The device's MQTT link (paho-mqtt 2.2) and the single thread that drains the outbox.

A package of one module per job (``edgefl.edge_agent.mqtt_link`` keeps every public name):

- :mod:`~edgefl.edge_agent.mqtt_link.config`: :class:`MqttLinkConfig`, the agent's ``mqtt:``
  section;
- :mod:`~edgefl.edge_agent.mqtt_link.link`: :class:`MqttLink`, the paho client (presence,
  session, reconnect, protocol fallback, inbound messages as :class:`InboundMessage`);
- :mod:`~edgefl.edge_agent.mqtt_link.sender`: :class:`OutboxSender`, the one thread that
  drains the outbox through the link;
- :mod:`~edgefl.edge_agent.mqtt_link.bucket`: :class:`TokenBucket`, the sender's flush
  rate after a reconnect.

The paho client is built by :func:`edgefl.mqtt_client.build_client` (shared with the
server's MQTT clients), the reconnect delays come from :func:`edgefl.backoff.backoff_delay`
and the topics from :mod:`edgefl.proto.topics`; ``backoff_delay`` and ``status_topic``
stay importable from here.
"""

from __future__ import annotations

from edgefl.backoff import backoff_delay
from edgefl.edge_agent.mqtt_link.bucket import TokenBucket
from edgefl.edge_agent.mqtt_link.config import MqttLinkConfig
from edgefl.edge_agent.mqtt_link.link import InboundMessage, MqttLink
from edgefl.edge_agent.mqtt_link.sender import OutboxSender
from edgefl.proto.topics import status_topic

__all__ = [
    "InboundMessage",
    "MqttLink",
    "MqttLinkConfig",
    "OutboxSender",
    "TokenBucket",
    "backoff_delay",
    "status_topic",
]
