"""The HTTP section of ``sniff stats``: requests each service received, by caller and route.

Answers "how many requests did each component receive, from whom, for what":
one row per (proxied service, calling component, method, route) with counts,
4xx/5xx/cut-short counts, latency and body bytes. :class:`Stats` aggregates
them in the one pass of :func:`sniff.statscan.scan` over the capture (what
``sniff stats`` runs for all sections at once), grouping and summing as the SQL
aggregate it replaced did.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import RenderableType
from rich.table import Table

from proxies.http.events import ROW_FIELDS
from sniff.statscan import ABSENT, Feed, fed, group_order, sql_value
from sniff.store import CaptureReader

_ONE = (
    "conn",
    "ts",
    "proxy",
    "method",
    "route",
    "path",
    "status",
    "error",
    "ts_end",
    "req_body_size",
    "resp_body_size",
)
# positions in a batch row (ROW_FIELDS order) of _ONE[1:]
_AT = tuple(ROW_FIELDS.index(n) for n in _ONE[1:])


class Stats:
    """The section's aggregates, fed one event at a time: single exchanges (mitmproxy
    path) and batches (fast path: rows of ROW_FIELDS columns; captures written with
    another column order are skipped here, the correlator still reads them); the rows
    the SQL query ``GROUP BY`` gave (same groups, sums, NULLs and order)."""

    json_fields = frozenset({"rows"})

    def __init__(self) -> None:
        # (conn, proxy, method, route) -> [count, 4xx, 5xx, cut, sum(dur), max(dur), sum(in), sum(out)]
        self.groups: dict[tuple[Any, ...], list[Any]] = {}

    def wants(self) -> dict[str, tuple[str, ...]]:
        return {"http.exchange": _ONE, "http.exchanges": ("conn", "rows", "fields")}

    def feed(self, kind: str) -> Feed:
        if kind == "http.exchange":
            return self._add
        add, fields = self._add, list(ROW_FIELDS)

        def batch(v: tuple[Any, ...]) -> None:
            conn, rows, names = v
            if names != fields or rows is ABSENT:
                return
            if rows.__class__ is not list:  # what json_each yields for other JSON
                rows = list(rows.values()) if isinstance(rows, dict) else [rows]
            for row in rows:
                if row.__class__ is list:
                    n = len(row)
                    add((conn, *(sql_value(row[i]) if i < n else None for i in _AT)))
                else:  # what json_extract(x, '$[i]') gives on a scalar or an object
                    add((conn, *(None for _ in _AT)))

        return batch

    def _add(self, v: tuple[Any, ...]) -> None:
        conn, ts, proxy, method, route, path, status, error, te, rq, rs = v
        if route is None:
            route = path if path is not None else ""
        key = (conn, proxy, method, route)
        r = self.groups.get(key)
        if r is None:
            r = self.groups[key] = [0, None, None, 0, None, None, None, None]
        r[0] += 1
        if status is not None:
            if isinstance(status, int | float):
                r[1] = (r[1] or 0) + (400 <= status <= 499)
                r[2] = (r[2] or 0) + (status >= 500)
            else:  # text sorts after numbers in SQLite
                r[1] = r[1] or 0
                r[2] = (r[2] or 0) + 1
        if error is not None:
            r[3] += 1
        if te is not None and ts is not None:
            d = te - ts
            r[4] = (r[4] or 0) + d
            if r[5] is None or d > r[5]:
                r[5] = d
        if rq is not None:
            r[6] = (r[6] or 0) + rq
        if rs is not None:
            r[7] = (r[7] or 0) + rs

    def rows(self) -> list[tuple[Any, ...]]:
        """The rows the SQL query returned."""
        g = self.groups
        return [(*k, *g[k]) for k in sorted(g, key=group_order)]


def section(
    reader: CaptureReader, services: dict[int, str], stats: Stats | None = None
) -> RenderableType | None:
    """The section's table; ``stats`` already fed (by ``sniff stats``' single pass),
    or the capture is read for it."""
    stats = fed(reader, stats, Stats)
    rows = stats.rows()
    if not rows:
        return None
    agg: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0, 0])
    for conn, proxy, method, route, n, c4, c5, cut, dur, dmax, rq, rs in rows:
        key = (proxy or "?", services.get(conn, "?"), f"{method} {route}".strip())
        r = agg[key]
        r[0] += n
        r[1] += c4 or 0
        r[2] += c5 or 0
        r[3] += cut or 0
        r[4] += dur or 0
        r[5] = max(r[5], dmax or 0)
        r[6] += rq or 0
        r[7] += rs or 0
    t = Table(title="HTTP requests received (service <- client)", title_justify="left")
    cols = ("service", "client", "request", "count", "4xx", "5xx", "cut", "avg ms", "max ms")
    for c in (*cols, "bytes in", "bytes out"):
        t.add_column(c, justify="left" if c in ("service", "client", "request") else "right")
    for (svc, client, req), (n, c4, c5, cut, dur, dmax, rq, rs) in sorted(
        agg.items(), key=lambda kv: (kv[0][0], -kv[1][0])
    ):
        t.add_row(
            svc,
            client,
            req,
            f"{n:,}",
            f"{c4:,}",
            f"{c5:,}",
            f"{cut:,}",
            f"{dur / n / 1e6:,.1f}" if n else "0",
            f"{dmax / 1e6:,.1f}",
            f"{rq:,}",
            f"{rs:,}",
        )
    return t
