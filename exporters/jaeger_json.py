"""Jaeger JSON: the shape Jaeger's query API returns (``{"data": [trace, ...]}``),
which the Jaeger UI opens from a file without a backend ("JSON File" upload)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from correlate.model import Span


def _tag(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    return {"key": key, "type": "string", "value": str(value)}


def to_jaeger(spans: Iterable[Span]) -> dict[str, Any]:
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        by_trace[s.trace_id].append(s)
    traces = []
    for trace_id, tspans in by_trace.items():
        processes: dict[str, dict[str, Any]] = {}
        proc_ids: dict[tuple[Any, ...], str] = {}
        out = []
        for s in sorted(tspans, key=lambda x: x.start):
            res = dict(s.resource)
            res.pop("service.name", None)
            pkey = (s.service, tuple(sorted((k, str(v)) for k, v in res.items())))
            pid = proc_ids.get(pkey)
            if pid is None:
                pid = proc_ids[pkey] = f"p{len(proc_ids) + 1}"
                processes[pid] = {
                    "serviceName": s.service,
                    "tags": [_tag(k, v) for k, v in sorted(res.items())],
                }
            refs = []
            if s.parent_id:
                refs.append({"refType": "CHILD_OF", "traceID": s.trace_id, "spanID": s.parent_id})
            for lk in s.links:
                if lk.span_id != s.parent_id:
                    refs.append(
                        {"refType": "FOLLOWS_FROM", "traceID": lk.trace_id, "spanID": lk.span_id}
                    )
            tags = [_tag(k, v) for k, v in s.attrs.items() if v is not None]
            tags.append(_tag("span.kind", s.kind.lower()))
            if s.status != "UNSET":
                tags.append(_tag("otel.status_code", s.status))
            if s.status == "ERROR":
                tags.append(_tag("error", True))
                if s.status_message:
                    tags.append(_tag("otel.status_description", s.status_message))
            out.append(
                {
                    "traceID": s.trace_id,
                    "spanID": s.span_id,
                    "operationName": s.name,
                    "references": refs,
                    "startTime": s.start // 1000,
                    "duration": max(0, s.end - s.start) // 1000,
                    "tags": tags,
                    "logs": [
                        {
                            "timestamp": e.ts // 1000,
                            "fields": [_tag("event", e.name)]
                            + [_tag(k, v) for k, v in e.attrs.items()],
                        }
                        for e in s.events
                    ],
                    "processID": pid,
                    "warnings": None,
                    "flags": 1,
                }
            )
        traces.append({"traceID": trace_id, "spans": out, "processes": processes, "warnings": None})
    return {"data": traces, "total": 0, "limit": 0, "offset": 0, "errors": None}
