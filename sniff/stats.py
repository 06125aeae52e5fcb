"""``sniff stats``: what a capture holds, by protocol, event kind and service.

The core tables come from the capture's ``counts`` table and the connections'
``core.*`` events; each protocol adds its own section (AMQP message flow, SQL
statements by operation and table, HTTP requests by route) through a
``section(reader, services, stats)`` function in its package, loaded lazily,
and a ``Stats`` aggregator: :func:`sniff.statscan.scan` feeds all of them in one
pass over the capture (decoding each chunk once, no event objects), then each
section lays out its tables. On 1M events (AMQP and MySQL, /tmp/big3.db) the
command takes 3.3-3.9 s; one SQL query per table, each scanning every chunk, took
26-28 s (measured here, 2 cores, another CPU-bound job running).
"""

from __future__ import annotations

import importlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

from rich.console import Console, RenderableType
from rich.table import Table

from correlate.offline import conn_services
from sniff.events import Event
from sniff.statscan import Feed, scan
from sniff.store import CaptureReader

SECTIONS = (
    "proxies.amqp.stats:section",
    "proxies.sql.stats:section",
    "proxies.http.stats:section",
)


def _when(ns: str | int | None) -> str:
    if not ns:
        return "?"
    return datetime.fromtimestamp(int(ns) / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Connections:
    """The events :func:`conn_services` reads (one per connection, identity and
    upstream: few), kept from the single pass; replayed in the order
    ``CaptureReader.events`` gives (chunks by ``ts_min``, a stable sort by time).
    Asked for other kinds, it reads them from the capture."""

    json_fields: frozenset[str] = frozenset()
    KINDS = ("core.conn_open", "core.identity", "core.proxy_upstream")

    def __init__(self, reader: CaptureReader) -> None:
        self.reader = reader
        self.seen: list[Event] = []

    def wants(self) -> dict[str, tuple[str, ...] | None]:
        return dict.fromkeys(self.KINDS)

    def feed(self, kind: str) -> Feed:
        return lambda v: self.seen.append(v[0])

    def events(self, kinds: list[str] | None = None, **kw: Any) -> Iterator[Event]:
        if kw or not kinds or not set(kinds) <= set(self.KINDS):
            yield from self.reader.events(kinds=kinds, **kw)
            return
        yield from sorted((ev for ev in self.seen if ev.kind in kinds), key=lambda ev: ev.ts)


def collect(
    reader: CaptureReader,
    services: dict[str, str] | None = None,
    connections: _Connections | None = None,
) -> dict[str, Any]:
    """The core numbers; ``connections`` fed by the single pass of :func:`render`,
    or the capture is read for them."""
    meta = reader.meta()
    # conn_services only calls .events(kinds=...) on what it is given
    svc = conn_services(
        cast(CaptureReader, connections) if connections is not None else reader, services
    )
    by_kind: Counter[str] = Counter()
    by_service: dict[str, Counter[str]] = defaultdict(Counter)
    conns_by_service: dict[str, set[int]] = defaultdict(set)
    proto_of_service: dict[str, set[str]] = defaultdict(set)
    for kind, conn, n in reader.kind_counts_by_conn():
        by_kind[kind] += n
        if conn and conn in svc:
            name, info = svc[conn]
            by_service[name][kind] += n
            conns_by_service[name].add(conn)
            proto_of_service[name].add(info.protocol)
    span = reader.time_range()
    return {
        "meta": meta,
        "events": sum(by_kind.values()),
        "first_ns": span[0],
        "last_ns": span[1],
        "by_kind": dict(by_kind),
        "by_service": {k: dict(v) for k, v in by_service.items()},
        "connections_by_service": {k: len(v) for k, v in conns_by_service.items()},
        "protocols_by_service": {k: sorted(v) for k, v in proto_of_service.items()},
        "services": {c: s for c, (s, _) in svc.items()},
    }


def render(
    reader: CaptureReader, console: Console, services: dict[str, str] | None = None
) -> dict[str, Any]:
    conns = _Connections(reader)
    sections = _sections(reader, conns)
    data = collect(reader, services, conns)
    meta = data["meta"]
    console.print(
        f"[bold]capture[/bold] {reader.path}: {data['events']:,} events, "
        f"{int(meta.get('dropped_events', 0)):,} dropped, from {_when(data['first_ns'])} "
        f"to {_when(data['last_ns'])}  [dim](sniff {meta.get('sniff_version', '?')}, "
        f"host {meta.get('host', '?')})[/dim]"
    )
    t = Table(title="Events by protocol and kind", title_justify="left")
    t.add_column("protocol")
    t.add_column("kind")
    t.add_column("events", justify="right")
    for kind, n in sorted(data["by_kind"].items()):
        proto, _, rest = kind.partition(".")
        t.add_row(proto, rest, f"{n:,}")
    console.print(t)
    t = Table(
        title="Events by service (the client component of each connection)", title_justify="left"
    )
    t.add_column("service")
    t.add_column("protocols")
    t.add_column("connections", justify="right")
    t.add_column("events", justify="right")
    t.add_column("top kinds")
    for name, kinds in sorted(data["by_service"].items(), key=lambda kv: -sum(kv[1].values())):
        top = ", ".join(f"{k.split('.', 1)[1]} {n:,}" for k, n in Counter(kinds).most_common(4))
        t.add_row(
            name,
            ",".join(data["protocols_by_service"][name]),
            str(data["connections_by_service"][name]),
            f"{sum(kinds.values()):,}",
            top,
        )
    console.print(t)
    svc_map = data["services"]
    for fn, stats in sections:
        part: RenderableType | None = (
            fn(reader, svc_map, stats) if stats is not None else fn(reader, svc_map)
        )
        if part is not None:
            console.print(part)
    return data


def _sections(reader: CaptureReader, conns: _Connections) -> list[tuple[Any, Any]]:
    """Each section's function and its aggregator, all fed by one pass over the capture."""
    out: list[tuple[Any, Any]] = []
    for spec in SECTIONS:
        mod_name, fn_name = spec.split(":")
        try:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, fn_name)
        except (ImportError, AttributeError):
            continue
        make = getattr(mod, "Stats", None)
        out.append((fn, make() if make is not None else None))
    scan(reader, [conns, *(stats for _, stats in out if stats is not None)])
    return out
