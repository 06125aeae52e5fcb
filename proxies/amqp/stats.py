"""The AMQP section of ``sniff stats``: message flow with sizes.

Who published to which destination and who consumed from which queue, with
message counts and body sizes, plus settlement outcomes. :class:`Stats`
aggregates them in the one pass of :func:`sniff.statscan.scan` over the capture
(what ``sniff stats`` runs for all sections at once), grouping and summing as
the SQL aggregates it replaced did.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table

from sniff.statscan import Feed, fed, group_order, sql_key
from sniff.store import CaptureReader


def _dest(exchange: str | None, rk: str | None) -> str:
    ex = exchange or "amq.default"
    return f"{ex}:{rk}" if rk else ex


class Stats:
    """The section's aggregates, fed one event at a time: the rows the SQL queries
    ``GROUP BY`` gave (same groups, sums, NULLs and order)."""

    json_fields: frozenset[str] = frozenset()

    def __init__(self) -> None:
        # (conn, exchange, routing_key) -> [count, sum(body), min(body), max(body), sum(injected)]
        self.pubs: dict[tuple[Any, ...], list[Any]] = {}
        # (conn, kind, queue or '', exchange, routing_key) -> [count, sum(body)]
        self.ins: dict[tuple[Any, ...], list[Any]] = {}
        self.settles: dict[tuple[Any, ...], list[Any]] = {}  # (conn, op) -> [count]

    def wants(self) -> dict[str, tuple[str, ...]]:
        cons = ("conn", "queue", "exchange", "routing_key", "body_size")
        return {
            "amqp.publish": ("conn", "exchange", "routing_key", "body_size", "injected"),
            "amqp.deliver": cons,
            "amqp.get": cons,
            "amqp.settle": ("conn", "op"),
        }

    def feed(self, kind: str) -> Feed:
        if kind == "amqp.publish":
            pubs = self.pubs

            def publish(v: tuple[Any, ...]) -> None:
                conn, ex, rk, size, injected = v
                key = (conn, ex, rk)
                r = pubs.get(key)
                if r is None:
                    r = pubs[key] = [0, None, None, None, None]
                r[0] += 1
                if size is not None:
                    r[1] = (r[1] or 0) + size
                    if r[2] is None or sql_key(size) < sql_key(r[2]):
                        r[2] = size
                    if r[3] is None or sql_key(size) > sql_key(r[3]):
                        r[3] = size
                if injected is not None:
                    r[4] = (r[4] or 0) + injected

            return publish
        if kind == "amqp.settle":
            settles = self.settles

            def settle(v: tuple[Any, ...]) -> None:
                r = settles.get(v)
                if r is None:
                    r = settles[v] = [0]
                r[0] += 1

            return settle
        ins = self.ins

        def consume(v: tuple[Any, ...]) -> None:
            conn, queue, ex, rk, size = v
            key = (conn, kind, queue if queue is not None else "", ex, rk)
            r = ins.get(key)
            if r is None:
                r = ins[key] = [0, None]
            r[0] += 1
            if size is not None:
                r[1] = (r[1] or 0) + size

        return consume

    def rows(self) -> tuple[list[tuple[Any, ...]], ...]:
        """(publishes, consumption, settlements) as the SQL queries returned them."""

        def out(groups: dict[tuple[Any, ...], list[Any]]) -> list[tuple[Any, ...]]:
            return [(*k, *groups[k]) for k in sorted(groups, key=group_order)]

        return out(self.pubs), out(self.ins), out(self.settles)


def section(
    reader: CaptureReader, services: dict[int, str], stats: Stats | None = None
) -> RenderableType | None:
    """The section's tables; ``stats`` already fed (by ``sniff stats``' single pass),
    or the capture is read for it."""
    stats = fed(reader, stats, Stats)
    pubs, ins, settles = stats.rows()
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
