"""Correlating a capture file: the live correlator, fed from SQLite in time order."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

from correlate.engine import Correlator
from correlate.identity import ConnInfo, Identities
from correlate.model import Span
from sniff.events import ConnIdentity, ConnOpen, Event, ProxyUpstream
from sniff.store import CaptureReader


def iter_spans(
    reader: CaptureReader,
    services: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
    batch: int = 5000,
    correlator: Correlator | None = None,
) -> Iterator[list[Span]]:
    """Yield finished spans in batches while streaming the capture's events (through
    ``correlator`` when given, e.g. to watch its ``stats``, else a new one)."""
    corr = correlator if correlator is not None else Correlator(services=services, options=options)
    pending: list[Span] = []
    # The correlator keeps a large, long-lived heap of small objects; the default
    # GC thresholds would walk it again and again (measured: ~30% of the time). Its
    # state is acyclic (reference counting frees it all), so a young collection only
    # re-walks what is alive: units, the spans of a batch, the chunk being read. With
    # a threshold of 200,000 that was 4 collections of 170,000-480,000 objects (0.9 s,
    # ~7%) per 1M events; the threshold is net allocations, so once that state stops
    # growing (after the TTL) collections are rare either way, and the collector still
    # runs if something did leave cycles behind.
    old = gc.get_threshold()
    gc.set_threshold(1_000_000, 50, 100)
    try:
        feed: Callable[[list[Any], int], None]
        if reader.format == "2":
            source: Iterator[list[Any]] = _chunks(reader.events(), 1024)
            one = corr._feed  # the per-event entry without the per-call list handling

            def feed(events: list[Any], count: int) -> None:
                pop = events.pop
                for _ in range(count):
                    one(pop())

        else:
            # the stored rows themselves: no event object is built (see Correlator._feed_rows)
            source = reader.rows()
            layout = reader.layout

            def feed(rows: list[Any], count: int) -> None:
                corr._feed_rows(rows, count, layout)

        n = 0  # events since the correlator's spans were last taken (every 1024)
        for rows in source:
            rows.reverse()  # taken from the end: each freed as soon as it is processed
            while rows:
                k = min(len(rows), 1024 - n)
                feed(rows, k)
                n += k
                if n >= 1024:
                    n = 0
                    got = corr._take()
                    if got:
                        pending.extend(got)
                        if len(pending) >= batch:
                            yield _window(pending, since_ns, until_ns)
                            pending = []
            del rows  # not held while the next chunk is decoded (see CaptureReader._batches)
        pending.extend(corr._take())
        pending.extend(corr.finish())
        if pending:
            yield _window(pending, since_ns, until_ns)
    finally:
        gc.set_threshold(*old)


def _chunks(events: Iterator[Event], size: int) -> Iterator[list[Event]]:
    chunk: list[Event] = []
    for ev in events:
        chunk.append(ev)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _window(spans: list[Span], since: int | None, until: int | None) -> list[Span]:
    if since is None and until is None:
        return spans
    return [
        s
        for s in spans
        if (since is None or s.start >= since) and (until is None or s.start <= until)
    ]


def all_spans(reader: CaptureReader, **kw: Any) -> list[Span]:
    out: list[Span] = []
    for b in iter_spans(reader, **kw):
        out.extend(b)
    return out


def conn_services(
    reader: CaptureReader, services: dict[str, str] | None = None
) -> dict[int, tuple[str, ConnInfo]]:
    """conn id -> (service name, ConnInfo) for every connection in the capture."""
    ids = Identities(services)
    infos: dict[int, ConnInfo] = {}
    for ev in reader.events(kinds=["core.conn_open", "core.identity", "core.proxy_upstream"]):
        if isinstance(ev, ConnOpen):
            infos[ev.conn] = ConnInfo(
                ev.conn,
                ev.proxy,
                ev.protocol_name,
                ev.client_addr,
                ev.client_port,
                ev.server_addr,
                ev.server_port,
                ev.ts,
            )
        elif isinstance(ev, ConnIdentity) and ev.conn in infos:
            infos[ev.conn].identity[ev.source] = dict(ev.attrs)
        elif isinstance(ev, ProxyUpstream):
            ids.upstream(ev.proxy, ev.processes)
    return {c: (ids.client(i).name, i) for c, i in infos.items()}
