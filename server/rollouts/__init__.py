"""Staged and shadow rollouts; :mod:`edgefl.server.staged_rollout` is the entry point."""
