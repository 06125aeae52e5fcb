"""postgres: not implemented yet."""
