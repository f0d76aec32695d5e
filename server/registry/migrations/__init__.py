"""Alembic migrations of the registry (run them with ``edgefl.server.registry.upgrade``)."""
