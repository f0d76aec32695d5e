"""Cloud side of edgefl: aggregation, registry, ingest and inference services."""
