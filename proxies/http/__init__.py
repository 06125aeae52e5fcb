"""http: not implemented yet."""
