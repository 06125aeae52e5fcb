"""Exporters: OTLP (HTTP/gRPC), Jaeger JSON, terminal trees. One small interface:
``export(spans: list[Span]) -> None`` and ``shutdown() -> None``."""
