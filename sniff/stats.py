"""``sniff stats``: what a capture holds, by protocol, event kind and service.

The core tables come from SQL aggregates over the events table (fast on
millions of rows); each protocol adds its own section (AMQP message flow, SQL
statements by operation and table, HTTP requests by route) through a
``section(reader, services)`` function in its package, loaded lazily.
"""

from __future__ import annotations

import importlib
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table

from correlate.offline import conn_services
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


def collect(reader: CaptureReader, services: dict[str, str] | None = None) -> dict[str, Any]:
    meta = reader.meta()
    svc = conn_services(reader, services)
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
    data = collect(reader, services)
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
    for spec in SECTIONS:
        mod_name, fn_name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError):
            continue
        part: RenderableType | None = fn(reader, svc_map)
        if part is not None:
            console.print(part)
    return data
