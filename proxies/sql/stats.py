"""The SQL section of ``sniff stats``: statements by service, operation and table.

Answers "how many SELECT/INSERT/UPDATE/DELETE did each component issue, on which
tables, and which failed" for MySQL/MariaDB (``mysql.query``) and PostgreSQL
(``postgres.query``) alike. :class:`Stats` aggregates the statements, commands
and failed logins in the one pass of :func:`sniff.statscan.scan` over the
capture (what ``sniff stats`` runs for all sections at once), grouping and
summing as the SQL aggregates it replaced did (four queries, each scanning
every chunk with ``json_each``); Python then maps connections to services and
lays out the tables.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table

from sniff.statscan import ABSENT, Feed, fed, group_order, sql_key, sql_value
from sniff.store import CaptureReader

_KINDS = ("mysql.query", "postgres.query")
_MAIN_OPS = ("SELECT", "INSERT", "UPDATE", "DELETE")
_QUERY = (
    "conn",
    "ts",
    "db_system",
    "operation",
    "status",
    "rows_returned",
    "rows_affected",
    "ts_end",
    "tables",
    "error_code",
    "command",
    "error_message",
)
_OTHER = ("conn", "command", "status", "error_code", "operation", "error_message")


def _system(kind: str, db_system: str | None) -> str:
    return db_system or ("postgresql" if kind.startswith("postgres") else "mysql")


def _items(v: Any) -> list[Any]:
    """What ``json_each`` over a JSON value yields (one row for a scalar or null)."""
    if isinstance(v, list):
        return v
    if isinstance(v, dict):
        return [sql_value(x) for x in v.values()]
    return [sql_value(v)]


class Stats:
    """The section's aggregates, fed one event at a time: the rows the SQL queries
    ``GROUP BY`` gave (same groups, sums, NULLs and order)."""

    json_fields = frozenset({"tables"})

    def __init__(self) -> None:
        # (conn, kind, db_system, operation) -> [count, errors, returned, affected, sum(ts_end - ts)]
        self.ops: dict[tuple[Any, ...], list[Any]] = {}
        # (conn, operation, table) -> [count, errors]
        self.tables: dict[tuple[Any, ...], list[Any]] = {}
        # (conn, kind, error_code or '', operation or command or 'LOGIN') -> [max(message), count]
        # (the example message shown: the largest, the same whatever order chunks are read in)
        self.errors: dict[tuple[Any, ...], list[Any]] = {}
        # (conn, command) -> [count, errors]
        self.commands: dict[tuple[Any, ...], list[Any]] = {}

    def wants(self) -> dict[str, tuple[str, ...]]:
        return {
            **{k: _QUERY for k in _KINDS},
            "mysql.command": _OTHER,
            "mysql.connect": _OTHER,
        }

    def feed(self, kind: str) -> Feed:
        ops, tables, error = self.ops, self.tables, self._error
        if kind in _KINDS:

            def query(v: tuple[Any, ...]) -> None:
                conn, ts, system, op, status, ret, aff, te, tabs, code, cmd, msg = v
                key = (conn, kind, system, op)
                r = ops.get(key)
                if r is None:
                    r = ops[key] = [0, None, 0, 0, None]
                r[0] += 1
                if status is not None:
                    r[1] = (r[1] or 0) + (status == "error")
                if ret is not None:
                    r[2] += ret
                if aff is not None:
                    r[3] += aff
                if te is not None and ts is not None:
                    r[4] = (r[4] or 0) + (te - ts)
                if tabs is not ABSENT:
                    for t in tabs if tabs.__class__ is list else _items(tabs):
                        if t.__class__ is not str:
                            t = sql_value(t)
                        tk = (conn, op, t)
                        c = tables.get(tk)
                        if c is None:
                            c = tables[tk] = [0, None]
                        c[0] += 1
                        if status is not None:
                            c[1] = (c[1] or 0) + (status == "error")
                if status == "error":
                    error(conn, kind, code, op, cmd, msg)

            return query
        commands = self.commands

        def other(v: tuple[Any, ...]) -> None:
            conn, cmd, status, code, op, msg = v
            if kind == "mysql.command":
                key = (conn, cmd)
                c = commands.get(key)
                if c is None:
                    c = commands[key] = [0, None]
                c[0] += 1
                if status is not None:
                    c[1] = (c[1] or 0) + (status == "error")
            if status == "error":
                error(conn, kind, code, op, cmd, msg)

        return other

    def _error(self, conn: Any, kind: str, code: Any, op: Any, cmd: Any, msg: Any) -> None:
        what = op if op is not None else (cmd if cmd is not None else "LOGIN")
        key = (conn, kind, code if code is not None else "", what)
        e = self.errors.get(key)
        if e is None:
            e = self.errors[key] = [None, 0]
        e[1] += 1
        if msg is not None and (e[0] is None or sql_key(msg) > sql_key(e[0])):
            e[0] = msg

    def rows(self) -> tuple[list[tuple[Any, ...]], ...]:
        """(ops, tables, errors, commands) as the SQL queries returned them."""

        def out(groups: dict[tuple[Any, ...], list[Any]]) -> list[tuple[Any, ...]]:
            return [(*k, *groups[k]) for k in sorted(groups, key=group_order)]

        return out(self.ops), out(self.tables), out(self.errors), out(self.commands)


def collect(
    reader: CaptureReader, services: dict[int, str], stats: Stats | None = None
) -> dict[str, Any] | None:
    """The section's numbers as plain data (also what the tables show); ``stats``
    already fed (by ``sniff stats``' single pass), or the capture is read for it."""
    stats = fed(reader, stats, Stats)
    ops, tables, errors, commands = stats.rows()
    if not ops:
        return None

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


def section(
    reader: CaptureReader, services: dict[int, str], stats: Stats | None = None
) -> RenderableType | None:
    data = collect(reader, services, stats)
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
        for c in ("service", "code", "operation", "count", "example message"):
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
