"""offload (see the modules)."""
