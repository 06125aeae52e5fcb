"""OTLP export (HTTP/protobuf, or gRPC for ``grpc://`` URLs) through the
OpenTelemetry SDK's exporters: sniff's spans are turned into SDK
``ReadableSpan`` objects with their own ids and timestamps, so the SDK's
encoding, retries and compression are reused as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SdkEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link as SdkLink
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from correlate.model import Span
from sniff import __version__

log = logging.getLogger("sniff.otlp")

_KINDS = {
    "CLIENT": SpanKind.CLIENT,
    "SERVER": SpanKind.SERVER,
    "PRODUCER": SpanKind.PRODUCER,
    "CONSUMER": SpanKind.CONSUMER,
    "INTERNAL": SpanKind.INTERNAL,
}
_STATUS = {"UNSET": StatusCode.UNSET, "OK": StatusCode.OK, "ERROR": StatusCode.ERROR}
_SCOPE = InstrumentationScope("sniff", __version__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _ctx(trace_id: str, span_id: str, remote: bool = False) -> SpanContext:
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=remote, trace_flags=_SAMPLED)


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, bool | int | float | str):
            out[k] = v
        elif isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


class _Resources:
    def __init__(self) -> None:
        self._cache: dict[frozenset[tuple[str, Any]], Resource] = {}

    def get(self, attrs: dict[str, Any]) -> Resource:
        clean = _clean(attrs)
        key = frozenset((k, tuple(v) if isinstance(v, list) else v) for k, v in clean.items())
        r = self._cache.get(key)
        if r is None:
            r = self._cache[key] = Resource(clean)
        return r


def to_readable(spans: Sequence[Span], resources: _Resources | None = None) -> list[ReadableSpan]:
    resources = resources or _Resources()
    out = []
    for s in spans:
        res = dict(s.resource)
        res.setdefault("service.name", s.service)
        res.setdefault("telemetry.sdk.name", "sniff")
        out.append(
            ReadableSpan(
                name=s.name,
                context=_ctx(s.trace_id, s.span_id),
                parent=_ctx(s.trace_id, s.parent_id, remote=True) if s.parent_id else None,
                resource=resources.get(res),
                attributes=_clean(s.attrs),
                events=[SdkEvent(e.name, _clean(e.attrs), e.ts) for e in s.events],
                links=[
                    SdkLink(_ctx(lk.trace_id, lk.span_id, True), _clean(lk.attrs)) for lk in s.links
                ],
                kind=_KINDS.get(s.kind, SpanKind.INTERNAL),
                status=Status(_STATUS.get(s.status, StatusCode.UNSET), s.status_message or None)
                if s.status == "ERROR"
                else Status(_STATUS.get(s.status, StatusCode.UNSET)),
                start_time=s.start,
                end_time=max(s.end, s.start),
                instrumentation_scope=_SCOPE,
            )
        )
    return out


def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why the OTLP receiver at ``url`` cannot be reached (a TCP connect to its
    host and port), or None when it accepts connections. Checked before an offline
    export so that a wrong URL fails at once, not after the SDK's retries."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return f"{url!r} names no host"
    try:
        port = parts.port or {"https": 443, "grpcs": 443, "http": 80}.get(parts.scheme, 4317)
    except ValueError as e:
        return str(e)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


class OtlpExporter:
    """Sends spans to an OTLP receiver: ``http(s)://host:port`` (``/v1/traces`` is
    appended unless the URL has a path) or ``grpc(s)://host:port``."""

    def __init__(
        self, url: str, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        self.url = url
        self._resources = _Resources()
        self._exp: Any
        if url.startswith(("grpc://", "grpcs://")):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            endpoint = url.split("://", 1)[1].rstrip("/")
            self._exp = GrpcExporter(
                endpoint=endpoint,
                insecure=url.startswith("grpc://"),
                headers=headers or None,
                timeout=timeout,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            _scheme, rest = url.split("://", 1)
            endpoint = url.rstrip("/") + "/v1/traces" if "/" not in rest.strip("/") else url
            self._exp = HttpExporter(endpoint=endpoint, headers=headers or None, timeout=timeout)
        self.sent = 0
        self.failed = 0

    def export(self, spans: Sequence[Span], batch: int = 512) -> bool:
        ok = True
        for i in range(0, len(spans), batch):
            chunk = spans[i : i + batch]
            result = self._exp.export(to_readable(chunk, self._resources))
            if result == SpanExportResult.SUCCESS:
                self.sent += len(chunk)
            else:
                self.failed += len(chunk)
                ok = False
        return ok

    def shutdown(self) -> None:
        self._exp.shutdown()
