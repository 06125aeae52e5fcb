"""Spans as the correlator produces them and every exporter consumes them.

Ids are lowercase hex strings (32 chars for traces, 16 for spans); times are
Unix nanoseconds; ``kind`` is one of CLIENT, SERVER, PRODUCER, CONSUMER,
INTERNAL; ``service`` becomes the resource's service.name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Link:
    trace_id: str
    span_id: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SpanEvent:
    ts: int
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start: int
    end: int
    service: str
    attrs: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    status: str = "UNSET"  # UNSET | OK | ERROR
    status_message: str = ""
    links: list[Link] = field(default_factory=list)
    events: list[SpanEvent] = field(default_factory=list)
    conn: int = 0  # the connection it came from (not exported; for analysis)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end - self.start)
