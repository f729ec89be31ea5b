"""ml_collections configs, one per sweep: `get_config("smoke")` is the quick variant."""
