"""Spans as the correlator produces them and every exporter consumes them.

Ids are lowercase hex strings (32 chars for traces, 16 for spans); times are
Unix nanoseconds; ``kind`` is one of CLIENT, SERVER, PRODUCER, CONSUMER,
INTERNAL; ``service`` becomes the resource's service.name.

Plain classes with ``__slots__`` rather than dataclasses: compiled with mypyc (see
setup.py), a dataclass's ``__init__`` is still the Python code the dataclasses module
generates, and building spans is the correlator's most frequent allocation; written
out, the constructor is native. They keep a dataclass's behaviour: the same
constructor (positional or keyword, the containers' defaults fresh per object),
field-wise ``==`` (and so no hash), and a field-wise ``repr``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class _Fields:
    """Field-wise ``==``, ``repr`` and :meth:`as_dict` over ``FIELDS``, as a dataclass
    has them (``__slots__`` names the same fields, but a compiled class has none)."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.FIELDS)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict, recursively (``dataclasses.asdict``)."""
        return {n: _plain(getattr(self, n)) for n in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Fields)
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable and field-wise equal: unhashable

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.FIELDS)
        return f"{self.__class__.__name__}({inner})"


def _plain(v: Any) -> Any:
    if isinstance(v, _Fields):
        return v.as_dict()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class Link(_Fields):
    FIELDS: ClassVar[tuple[str, ...]] = ("trace_id", "span_id", "attrs")
    __slots__ = FIELDS

    def __init__(self, trace_id: str, span_id: str, attrs: dict[str, Any] | None = None) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.attrs: dict[str, Any] = {} if attrs is None else attrs


class SpanEvent(_Fields):
    FIELDS: ClassVar[tuple[str, ...]] = ("ts", "name", "attrs")
    __slots__ = FIELDS

    def __init__(self, ts: int, name: str, attrs: dict[str, Any] | None = None) -> None:
        self.ts = ts
        self.name = name
        self.attrs: dict[str, Any] = {} if attrs is None else attrs


class Span(_Fields):
    FIELDS: ClassVar[tuple[str, ...]] = (  # in the constructor's order
        "trace_id",
        "span_id",
        "parent_id",
        "name",
        "kind",
        "start",
        "end",
        "service",
        "attrs",
        "resource",
        "status",
        "status_message",
        "links",
        "events",
        "conn",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        name: str,
        kind: str,
        start: int,
        end: int,
        service: str,
        attrs: dict[str, Any] | None = None,
        resource: dict[str, Any] | None = None,
        status: str = "UNSET",  # UNSET | OK | ERROR
        status_message: str = "",
        links: list[Link] | None = None,
        events: list[SpanEvent] | None = None,
        conn: int = 0,  # the connection it came from (not exported; for analysis)
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.start = start
        self.end = end
        self.service = service
        self.attrs: dict[str, Any] = {} if attrs is None else attrs
        self.resource: dict[str, Any] = {} if resource is None else resource
        self.status = status
        self.status_message = status_message
        self.links: list[Link] = [] if links is None else links
        self.events: list[SpanEvent] = [] if events is None else events
        self.conn = conn

    @property
    def duration_ns(self) -> int:
        return max(0, self.end - self.start)
