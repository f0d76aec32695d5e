"""inference (see the modules)."""
