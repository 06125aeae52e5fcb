"""The AMQP section of ``sniff stats``: message flow with sizes.

Who published to which destination and who consumed from which queue, with
message counts and body sizes, plus settlement outcomes; aggregated in SQLite
(:meth:`CaptureReader.select_events`) so it stays fast on large captures.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table

from sniff.store import CaptureReader


def _dest(exchange: str | None, rk: str | None) -> str:
    ex = exchange or "amq.default"
    return f"{ex}:{rk}" if rk else ex


def section(reader: CaptureReader, services: dict[int, str]) -> RenderableType | None:
    db = reader.db
    fields = ("exchange", "routing_key", "body_size", "injected", "queue", "op")
    pubs = db.execute(
        "SELECT conn, exchange, routing_key, count(*), sum(body_size), min(body_size),"
        f" max(body_size), sum(injected) FROM {reader.select_events(('amqp.publish',), fields)}"
        " GROUP BY 1,2,3"
    ).fetchall()
    ins = db.execute(
        "SELECT conn, kind, coalesce(queue, ''), exchange, routing_key, count(*), sum(body_size)"
        f" FROM {reader.select_events(('amqp.deliver', 'amqp.get'), fields)} GROUP BY 1,2,3,4,5"
    ).fetchall()
    settles = db.execute(
        f"SELECT conn, op, count(*) FROM {reader.select_events(('amqp.settle',), fields)}"
        " GROUP BY 1,2"
    ).fetchall()
    if not pubs and not ins:
        return None
    flow: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [0, 0, None, 0, 0])
    for conn, ex, rk, n, total, mn, mx, injected in pubs:
        row = flow[(services.get(conn, "?"), _dest(ex, rk))]
        row[0] += n
        row[1] += total or 0
        row[2] = mn if row[2] is None else min(row[2], mn)
        row[3] = max(row[3], mx or 0)
        row[4] += injected or 0
    t = Table(title="AMQP publishes (service -> destination)", title_justify="left")
    for c in ("service", "destination", "messages", "bytes", "avg B", "min B", "max B", "tagged"):
        t.add_column(c, justify="left" if c in ("service", "destination") else "right")
    for (svc, dest), (n, total, mn, mx, inj) in sorted(flow.items(), key=lambda kv: -kv[1][0]):
        t.add_row(
            svc,
            dest,
            f"{n:,}",
            f"{total:,}",
            f"{total / n:,.0f}",
            f"{mn or 0:,}",
            f"{mx:,}",
            f"{inj:,}",
        )
    cons: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for conn, kind, queue, ex, rk, n, total in ins:
        key = (
            services.get(conn, "?"),
            queue or _dest(ex, rk),
            "get" if kind == "amqp.get" else "deliver",
        )
        cons[key][0] += n
        cons[key][1] += total or 0
    t2 = Table(title="AMQP consumption (queue -> service)", title_justify="left")
    for c in ("service", "queue", "via", "messages", "bytes", "avg B"):
        t2.add_column(c, justify="left" if c in ("service", "queue", "via") else "right")
    for (svc, queue, via), (n, total) in sorted(cons.items(), key=lambda kv: -kv[1][0]):
        t2.add_row(svc, queue, via, f"{n:,}", f"{total:,}", f"{total / n:,.0f}" if n else "0")
    outcome: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for conn, op, n in settles:
        outcome[services.get(conn, "?")][op] += n
    parts: list[RenderableType] = [t, t2]
    if outcome:
        t3 = Table(title="AMQP settlements", title_justify="left")
        for c in ("service", "ack", "nack", "reject"):
            t3.add_column(c, justify="left" if c == "service" else "right")
        for svc, ops in sorted(outcome.items()):
            t3.add_row(
                svc,
                f"{ops.get('ack', 0):,}",
                f"{ops.get('nack', 0):,}",
                f"{ops.get('reject', 0):,}",
            )
        parts.append(t3)
    return Group(*parts)
