"""The correlator engine: events in, finished spans out.

Strategy. The engine is a pure state machine over a time-ordered event stream:
no I/O, no wall clock. Time is the events' own timestamps (``now`` is the
latest ``ts`` seen), so a capture replayed offline gives exactly the spans
``sniff run`` exported live. It keeps the connection table (who is at each end,
what the client said about itself) and hands each protocol's events to that
protocol's span builder (``correlate/amqp.py``, ``sql.py``, ``http.py``), which
pairs requests with responses on a connection and turns them into spans.

In-flight state is bounded: builders expire entries older than ``ttl_ns``
(counted in ``stats``) and closed connections are forgotten after the TTL.

Trace ids seen on the wire can be *aliased* to another trace (``alias``), so
that when pairing proves two wire traces are one causal path, spans finished
afterwards carry the canonical trace id.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from correlate.causal import DEFAULT_LAG_NS, DEFAULT_RECENT_NS, Causal
from correlate.identity import Component, ConnInfo, Identities
from correlate.model import Span
from sniff.events import ConnClose, ConnIdentity, ConnOpen, Event, ProxyUpstream, event_class
from sniff.store import field_names as _field_names

log = logging.getLogger("sniff.correlate")

DEFAULT_TTL_NS = 10 * 60 * 10**9
_EXPIRE_EVERY_NS = 1 * 10**9
_ADVANCE_NS = 5 * 10**6

# protocol prefix of an event kind -> "module:Class" of its span builder
BUILDERS = {
    "amqp": "correlate.amqp:AmqpSpans",
    "mysql": "correlate.sql:SqlSpans",
    "postgres": "correlate.sql:SqlSpans",
    "http": "correlate.http:HttpSpans",
}


def _ignore(ev: Event) -> None:
    return None


# a kind -> (the field names of its stored rows, what builds its event from row[1:])
Layout = Callable[[str], tuple[list[str], Callable[..., Event]]]
Row = list[Any]  # a stored event: [kind, ts, conn, v1, v2...] (sniff.store, format 3)


class SpanBuilder(Protocol):
    def feed(self, ev: Event) -> None: ...
    def conn_closed(self, info: ConnInfo, ts: int, reason: str) -> None: ...
    def expire(self, now: int) -> None: ...
    def flush(self, now: int) -> None: ...


class Correlator:
    def __init__(
        self,
        services: dict[str, str] | None = None,
        ttl_ns: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.identities = Identities(services)
        self.options = dict(options or {})
        self.ttl_ns = (
            ttl_ns if ttl_ns is not None else int(float(self.options.get("ttl_s", 600)) * 1e9)
        )
        self._no_timing = set(self.options.get("timing_exclude", []))
        self.causal = Causal(
            self._component_of,
            self.trace,
            self.alias,
            self._release,
            lag_ns=int(float(self.options.get("lag_ms", DEFAULT_LAG_NS / 1e6)) * 1e6),
            recent_ns=int(float(self.options.get("recent_s", DEFAULT_RECENT_NS / 1e9)) * 1e9),
            ttl_ns=self.ttl_ns,
            timing_allowed=self._timing_allowed if self._no_timing else None,
        )
        self.conns: dict[int, ConnInfo] = {}
        self._closed: dict[int, int] = {}  # conn -> close ts, for delayed eviction
        self._builders: dict[str, SpanBuilder | None] = {}
        self._by_class: dict[type, Callable[[Event], None]] = {}  # event class -> handler
        self._by_kind: dict[str, Callable[[Row], None]] = {}  # kind -> handler of its rows
        self._out: list[Span] = []
        self._aliases: dict[str, str] = {}
        self._alias_ts: dict[str, int] = {}  # insertion (event-time) order, for trimming
        self.now = 0
        self._next_expire = 0
        self._advance_at = 0
        self.stats: dict[str, int] = {"events": 0, "spans": 0, "expired": 0, "unknown_conn": 0}

    # --- inputs --------------------------------------------------------------------------

    def feed(self, ev: Event) -> list[Span]:
        """Process one event; return the spans it finished."""
        self._feed(ev)
        return self._take()

    def feed_many(self, events: Iterable[Event]) -> list[Span]:
        for ev in events:
            self._feed(ev)
        return self._take()

    def tick(self, now: int) -> list[Span]:
        """Advance the clock without an event (live mode): expire stale state."""
        if now > self.now:
            self.now = now
        self._expire()
        self.causal.advance(self.now)
        return self._take()

    def finish(self) -> list[Span]:
        """End of the stream: close every in-flight span as it stands."""
        for b in self._builders.values():
            if b is not None:
                b.flush(self.now)
        self.causal.drain()
        return self._take()

    def _feed(self, ev: Event) -> None:
        self.stats["events"] += 1
        ts = ev.ts
        if ts > self.now:
            self.now = ts
        if ts >= self._next_expire:
            self._expire()
        fn = self._by_class.get(ev.__class__)
        if fn is None:
            fn = self._handler_for(ev)
        fn(ev)
        causal = self.causal
        causal.now = self.now
        if ts >= self._advance_at:
            # the causal stage runs lag_ns behind; stepping it once per _ADVANCE_NS of
            # event time instead of after every event does the same work in batches
            self._advance_at = ts + _ADVANCE_NS
            causal.advance(ts)

    def _feed_rows(self, rows: list[Row], count: int, layout: Layout) -> None:
        """Process ``count`` stored events (``[kind, ts, conn, ...]`` rows) popped from
        the end of ``rows`` (the chunk, reversed: in time order), exactly as :meth:`_feed`
        processes the events built from them, without building them: builders that can
        read a kind's values from its rows take the rows (``layout`` names their fields),
        the others get the event. Popped, each row is freed once it has been processed,
        while its memory is still in the CPU's cache, and the next allocations reuse it
        (measured on 1M events: 8-10% faster than freeing a chunk's rows after it)."""
        handler = self._by_kind.get
        causal = self.causal
        now = self.now
        next_expire = self._next_expire  # only _expire moves it
        advance_at = self._advance_at
        pop = rows.pop
        for _ in range(count):
            row = pop()
            ts = row[1]
            if ts > now:
                now = self.now = ts
            if ts >= next_expire:
                self._expire()
                next_expire = self._next_expire
            fn = handler(row[0])
            if fn is None:
                fn = self._row_handler(row[0], layout)
            fn(row)
            causal.now = now
            if ts >= advance_at:
                advance_at = self._advance_at = ts + _ADVANCE_NS
                causal.advance(ts)
        self.stats["events"] += count

    def _row_handler(self, kind: str, layout: Layout) -> Callable[[Row], None]:
        """The function that takes rows of ``kind``: the builder's own (``row_handler_for``)
        when the rows are laid out as the running class's fields, else one that builds
        the event and hands it on as :meth:`_feed` would."""
        names, ctor = layout(kind)
        cls = event_class(kind)
        fn: Callable[[Row], None] | None = None
        if cls is not None and cls.protocol != "core" and names == _field_names(cls):
            b = self._builders.get(cls.protocol, False)
            if b is False:
                b = self._load_builder(cls.protocol)
            pick = getattr(b, "row_handler_for", None) if b is not None else None
            if pick is not None:
                fn = pick(cls, names, ctor)
        if fn is None:
            by_class = self._by_class
            handler_for = self._handler_for

            def fn(row: Row) -> None:
                ev = ctor(*row[1:])
                h = by_class.get(ev.__class__)
                if h is None:
                    h = handler_for(ev)
                h(ev)

        self._by_kind[kind] = fn
        return fn

    def _handler_for(self, ev: Event) -> Callable[[Event], None]:
        """The function that takes events of ``ev``'s class: the core table, or the
        protocol builder's own handler for that class (one dict lookup per event)."""
        proto = ev.protocol
        fn: Callable[[Event], None]
        if proto == "core":
            fn = self._core
        else:
            b = self._builders.get(proto, False)
            if b is False:
                b = self._load_builder(proto)
            if b is None:
                fn = _ignore
            else:
                pick = getattr(b, "handler_for", None)
                fn = (pick(ev.__class__) if pick is not None else None) or b.feed  # type: ignore[union-attr]
        self._by_class[ev.__class__] = fn
        return fn

    def _load_builder(self, proto: str) -> SpanBuilder | None:
        spec = BUILDERS.get(proto)
        builder: SpanBuilder | None = None
        if spec is not None:
            mod_name, cls_name = spec.split(":")
            try:
                cls = getattr(importlib.import_module(mod_name), cls_name)
                builder = cls(self)
            except (ImportError, AttributeError):
                log.debug("no span builder for %s events", proto)
        self._builders[proto] = builder
        return builder

    def _core(self, ev: Event) -> None:
        if isinstance(ev, ConnOpen):
            self.conns[ev.conn] = ConnInfo(
                ev.conn,
                ev.proxy,
                ev.protocol_name,
                ev.client_addr,
                ev.client_port,
                ev.server_addr,
                ev.server_port,
                ev.ts,
            )
        elif isinstance(ev, ConnIdentity):
            info = self.conns.get(ev.conn)
            if info is not None:
                info.identity[ev.source] = dict(ev.attrs)
                info.forget()
                if ev.source == "proc.server" and ev.attrs.get("pid"):
                    # the process that accepted a proxied connection serves behind that proxy
                    self.identities.upstream(info.proxy, [ev.attrs])
        elif isinstance(ev, ProxyUpstream):
            self.identities.upstream(ev.proxy, ev.processes, listening=True)
            for info in self.conns.values():
                info.forget()
        elif isinstance(ev, ConnClose):
            info = self.conns.get(ev.conn)
            if info is None:
                return
            info.closed = ev.ts
            self._closed[ev.conn] = ev.ts
            proto = "postgres" if info.protocol == "postgres" else info.protocol
            if proto == "https":
                proto = "http"
            b = self._builders.get(proto)
            if b is not None:
                b.conn_closed(info, ev.ts, ev.reason)

    def _expire(self) -> None:
        self._next_expire = self.now + _EXPIRE_EVERY_NS
        for b in self._builders.values():
            if b is not None:
                b.expire(self.now)
        limit = self.now - self.ttl_ns
        if self._closed:
            gone = [c for c, ts in self._closed.items() if ts < limit]
            for c in gone:
                del self._closed[c]
                self.conns.pop(c, None)

    # --- for builders --------------------------------------------------------------------

    def conn(self, conn: int) -> ConnInfo | None:
        info = self.conns.get(conn)
        if info is None:
            self.stats["unknown_conn"] += 1
        return info

    def client_of(self, conn: int) -> tuple[ConnInfo | None, str, dict[str, Any]]:
        """``conn(conn)`` and ``service()`` of it in one call (one per span)."""
        info = self.conns.get(conn)
        if info is None:
            self.stats["unknown_conn"] += 1
            return None, "unknown", {"service.name": "unknown"}
        c = self.identities.client(info)
        return info, c.name, c.resource

    def service(self, info: ConnInfo | None) -> tuple[str, dict[str, Any]]:
        """The client component of a connection: (service.name, resource attributes)."""
        if info is None:
            return "unknown", {"service.name": "unknown"}
        c = self.identities.client(info)
        return c.name, c.resource  # shared, read-only (and replaced when the span is released)

    def server_service(self, info: ConnInfo | None) -> tuple[str, dict[str, Any]]:
        """The server component of a connection (the proxied service): for SERVER spans."""
        if info is None:
            return "unknown", {"service.name": "unknown"}
        c = self.identities.server(info)
        return c.name, c.resource

    def client_component(self, info: ConnInfo) -> Component:
        return self.identities.client(info)

    def _timing_allowed(self, conn: int) -> bool:
        if not self._no_timing:
            return True
        info = self.conns.get(conn)
        return info is None or self.identities.client(info).name not in self._no_timing

    def _component_of(self, conn: int, role: str) -> str | None:
        info = self.conns.get(conn)
        if info is None:
            return None
        ids = self.identities
        return (ids.client(info) if role == "client" else ids.server(info)).key

    def alias(self, wire_trace: str, canonical: str) -> None:
        if wire_trace != canonical:
            aliases = self._aliases
            aliases[wire_trace] = self.trace(canonical)
            self._alias_ts[wire_trace] = self.now
            if (
                len(self._alias_ts) > 1024
                and next(iter(self._alias_ts.values())) < self.now - self.ttl_ns
            ):
                self._trim_aliases()

    def _trim_aliases(self) -> None:
        """Aliases outlive the spans that need them by the TTL at most."""
        limit = self.now - self.ttl_ns
        ts_of = self._alias_ts
        while ts_of:
            trace, ts = next(iter(ts_of.items()))
            if ts >= limit:
                break
            del ts_of[trace]
            self._aliases.pop(trace, None)

    def trace(self, trace_id: str) -> str:
        seen = 0
        while trace_id in self._aliases and seen < 8:
            trace_id = self._aliases[trace_id]
            seen += 1
        return trace_id

    def emit(self, span: Span) -> None:
        """A builder finished ``span``; it is released once causality has been decided."""
        self.causal.finished(span)

    def _release(self, span: Span) -> None:
        info = self.conns.get(span.conn) if span.conn else None
        if info is not None:  # name it now: the process behind it is known by now
            ids = self.identities
            comp = ids.server(info) if span.kind == "SERVER" else ids.client(info)
            span.service = comp.name
            span.resource = comp.resource  # shared by the component's spans; never mutated
        aliases = self._aliases
        if aliases:
            if span.trace_id in aliases:
                span.trace_id = self.trace(span.trace_id)
            for link in span.links:
                if link.trace_id in aliases:
                    link.trace_id = self.trace(link.trace_id)
        self._out.append(span)

    def expired(self, n: int = 1) -> None:
        self.stats["expired"] += n

    def _take(self) -> list[Span]:
        out = self._out
        if not out:
            return []  # never hand out the internal list: callers may keep and extend it
        self._out = []
        self.stats["spans"] += len(out)
        return out
