"""Device side of edgefl: the agent and what it runs.

The daemon (:mod:`.daemon`) with its data sources, durable outbox, MQTT link and fleet
commands; the device's identity and enrollment (:mod:`.identity`); the inference runtimes
and the local/cloud offload (:mod:`.runtimes`, :mod:`.offload`); and on-device DP training
in a Flower SuperNode (:mod:`.fl`). It never imports the server (see the README's layers).
"""
