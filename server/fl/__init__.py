"""fl (see the modules)."""
