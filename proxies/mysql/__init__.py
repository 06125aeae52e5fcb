"""mysql: not implemented yet."""
