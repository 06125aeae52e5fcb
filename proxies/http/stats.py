"""The HTTP section of ``sniff stats``: requests each service received, by caller and route.

Answers "how many requests did each component receive, from whom, for what":
one row per (proxied service, calling component, method, route) with counts,
4xx/5xx/cut-short counts, latency and body bytes, aggregated in SQLite
(:meth:`CaptureReader.select_events`) so it stays fast on large captures.
"""

from __future__ import annotations

import json
from collections import defaultdict

from rich.console import RenderableType
from rich.table import Table

from proxies.http.events import ROW_FIELDS
from sniff.store import CaptureReader


def _col(name: str) -> str:
    return f"json_extract(j.value,'$[{ROW_FIELDS.index(name)}]')"


_ONE = (
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


def _query(reader: CaptureReader) -> str:
    """Single exchanges (mitmproxy path) and batches (fast path: rows of ROW_FIELDS
    columns; captures written with another column order are skipped here, the
    correlator still reads them), as one row set."""
    one = reader.select_events(("http.exchange",), _ONE)
    many = reader.select_events(("http.exchanges",), ("rows", "fields"), json=("rows",))
    return (
        "WITH x(conn, ts, proxy, method, route, status, error, ts_end, rq, rs) AS ("
        " SELECT conn, ts, proxy, method, coalesce(route, path, ''), status, error, ts_end,"
        f" req_body_size, resp_body_size FROM {one}"
        f" UNION ALL SELECT e.conn, {_col('ts')}, {_col('proxy')}, {_col('method')},"
        f" coalesce({_col('route')}, {_col('path')}, ''), {_col('status')}, {_col('error')},"
        f" {_col('ts_end')}, {_col('req_body_size')}, {_col('resp_body_size')}"
        f" FROM {many} e, json_each(e.rows) j"
        f" WHERE e.fields = '{json.dumps(list(ROW_FIELDS), separators=(',', ':'))}')"
        " SELECT conn, proxy, method, route, count(*), sum(status BETWEEN 400 AND 499),"
        " sum(status >= 500), sum(error IS NOT NULL), sum(ts_end - ts), max(ts_end - ts),"
        " sum(rq), sum(rs) FROM x GROUP BY 1,2,3,4"
    )


def section(reader: CaptureReader, services: dict[int, str]) -> RenderableType | None:
    rows = reader.db.execute(_query(reader)).fetchall()
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
