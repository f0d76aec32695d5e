"""``python -m edgefl.edge_agent.sources CONFIG_JSON TARGET``: prepare a replay cache.

The short-lived child process of :func:`~edgefl.edge_agent.sources.replay_arrays`, which
imports scikit-learn so that the agent never does.
"""

from __future__ import annotations

import sys

from edgefl.edge_agent.sources._replay import export_replay_arrays

if __name__ == "__main__":
    export_replay_arrays(sys.argv[1], sys.argv[2])
