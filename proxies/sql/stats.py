"""The SQL section of ``sniff stats``: statements by service, operation and table.

Answers "how many SELECT/INSERT/UPDATE/DELETE did each component issue, on which
tables, and which failed" for MySQL/MariaDB (``mysql.query``) and PostgreSQL
(``postgres.query``) alike. Everything is aggregated in SQLite (the fields of
:meth:`CaptureReader.select_events`, ``json_each`` over the statement's ``tables``)
so it stays fast on large captures; Python only maps connections to services and lays out the tables.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table

from sniff.store import CaptureReader

_KINDS = ("mysql.query", "postgres.query")
_MAIN_OPS = ("SELECT", "INSERT", "UPDATE", "DELETE")


def _system(kind: str, db_system: str | None) -> str:
    return db_system or ("postgresql" if kind.startswith("postgres") else "mysql")


def collect(reader: CaptureReader, services: dict[int, str]) -> dict[str, Any] | None:
    """The section's numbers as plain data (also what the tables show)."""
    db = reader.db
    queries = reader.select_events(
        _KINDS,
        ("db_system", "operation", "status", "rows_returned", "rows_affected", "ts_end", "tables"),
        json=("tables",),
    )
    ops = db.execute(
        "SELECT conn, kind, db_system, operation, count(*), sum(status = 'error'),"
        " sum(coalesce(rows_returned, 0)), sum(coalesce(rows_affected, 0)), sum(ts_end - ts)"
        f" FROM {queries} GROUP BY 1, 2, 3, 4"
    ).fetchall()
    if not ops:
        return None
    tables = db.execute(
        "SELECT e.conn, e.operation, t.value, count(*), sum(e.status = 'error')"
        f" FROM {queries} e, json_each(e.tables) t GROUP BY 1, 2, 3"
    ).fetchall()
    failed = reader.select_events(
        (*_KINDS, "mysql.command", "mysql.connect"),
        ("error_code", "operation", "command", "error_message", "status"),
    )
    errors = db.execute(
        "SELECT conn, kind, coalesce(error_code, ''), coalesce(operation, command, 'LOGIN'),"
        f" max(error_message), count(*) FROM {failed} WHERE status = 'error' GROUP BY 1, 2, 3, 4"
    ).fetchall()
    mysql_cmds = reader.select_events(("mysql.command",), ("command", "status"))
    commands = db.execute(
        f"SELECT conn, command, count(*), sum(status = 'error') FROM {mysql_cmds} GROUP BY 1, 2"
    ).fetchall()

    by_op: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for conn, kind, system, op, n, nerr, ret, aff, dur in ops:
        row = by_op[(services.get(conn, "?"), _system(kind, system), op or "?")]
        row[0] += n
        row[1] += nerr or 0
        row[2] += ret or 0
        row[3] += aff or 0
        row[4] += dur or 0
    by_table: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for conn, op, table, n, nerr in tables:
        cell = by_table[(services.get(conn, "?"), str(table))]
        cell[op if op in _MAIN_OPS else "other"] += n
        cell["errors"] += nerr or 0
    errs: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, ""])
    for conn, _kind, code, what, msg, n in errors:
        e = errs[(services.get(conn, "?"), str(code) or "?", str(what))]
        e[0] += n
        e[1] = e[1] or (msg or "")
    cmds: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for conn, cmd, n, nerr in commands:
        c = cmds[(services.get(conn, "?"), str(cmd))]
        c[0] += n
        c[1] += nerr or 0
    return {
        "statements": [
            {
                "service": s,
                "system": system,
                "operation": op,
                "count": v[0],
                "errors": v[1],
                "rows_returned": v[2],
                "rows_affected": v[3],
                "total_ms": v[4] / 1e6,
            }
            for (s, system, op), v in sorted(by_op.items(), key=lambda kv: (kv[0][0], -kv[1][0]))
        ],
        "tables": [
            {"service": s, "table": t, **dict(v)}
            for (s, t), v in sorted(
                by_table.items(), key=lambda kv: (kv[0][0], -sum(kv[1].values()))
            )
        ],
        "errors": [
            {"service": s, "code": code, "operation": what, "count": v[0], "message": v[1]}
            for (s, code, what), v in sorted(errs.items(), key=lambda kv: -kv[1][0])
        ],
        "commands": [
            {"service": s, "command": cmd, "count": v[0], "errors": v[1]}
            for (s, cmd), v in sorted(cmds.items())
        ],
    }


def section(reader: CaptureReader, services: dict[int, str]) -> RenderableType | None:
    data = collect(reader, services)
    if data is None:
        return None
    parts: list[RenderableType] = []

    t = Table(title="SQL statements by service and operation", title_justify="left")
    for c in (
        "service",
        "db",
        "operation",
        "statements",
        "errors",
        "rows returned",
        "rows affected",
        "avg ms",
    ):
        t.add_column(c, justify="left" if c in ("service", "db", "operation") else "right")
    for r in data["statements"]:
        n = r["count"]
        t.add_row(
            r["service"],
            r["system"],
            r["operation"],
            f"{n:,}",
            f"{r['errors']:,}",
            f"{r['rows_returned']:,}",
            f"{r['rows_affected']:,}",
            f"{r['total_ms'] / n:,.2f}" if n else "0",
        )
    parts.append(t)

    if data["tables"]:
        t2 = Table(title="SQL tables touched (statements per operation)", title_justify="left")
        for c in ("service", "table", *_MAIN_OPS, "other", "errors"):
            t2.add_column(c, justify="left" if c in ("service", "table") else "right")
        for r in data["tables"]:
            t2.add_row(
                r["service"],
                r["table"],
                *(f"{r.get(op, 0):,}" for op in (*_MAIN_OPS, "other", "errors")),
            )
        parts.append(t2)

    if data["errors"]:
        t3 = Table(title="SQL errors", title_justify="left")
        for c in ("service", "code", "operation", "count", "message (first seen)"):
            t3.add_column(c, justify="right" if c == "count" else "left")
        for r in data["errors"]:
            msg = r["message"]
            t3.add_row(
                r["service"],
                r["code"],
                r["operation"],
                f"{r['count']:,}",
                msg if len(msg) <= 80 else msg[:77] + "...",
            )
        parts.append(t3)

    if data["commands"]:
        t4 = Table(title="MySQL commands other than statements", title_justify="left")
        for c in ("service", "command", "count", "errors"):
            t4.add_column(c, justify="left" if c in ("service", "command") else "right")
        for r in data["commands"]:
            t4.add_row(r["service"], r["command"], f"{r['count']:,}", f"{r['errors']:,}")
        parts.append(t4)
    return Group(*parts)
