"""sql: not implemented yet."""
