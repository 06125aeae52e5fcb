"""``sniff stats``' single pass gives the rows the SQL aggregates it replaced gave.

The old queries (one ``GROUP BY`` per table, over :meth:`CaptureReader.select_events`)
are kept here as the reference: on a capture of varied events of every kind the
sections read (NULLs, errors, odd ``tables`` and HTTP batch rows, several
connections), in both formats, each section's :class:`Stats` rows equal theirs,
in the same order."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from proxies.amqp import stats as amqp_stats
from proxies.http import stats as http_stats
from proxies.http.events import ROW_FIELDS, HttpExchange, HttpExchanges
from proxies.sql import stats as sql_stats
from sniff.events import Event
from sniff.statscan import scan
from sniff.store import CaptureReader
from tests.unit.test_store import _instances, _write2, _write3

_SQL = ("mysql.query", "postgres.query")


def _old_sql(reader: CaptureReader) -> tuple[list[Any], ...]:
    db = reader.db
    queries = reader.select_events(
        _SQL,
        ("db_system", "operation", "status", "rows_returned", "rows_affected", "ts_end", "tables"),
        json=("tables",),
    )
    ops = db.execute(
        "SELECT conn, kind, db_system, operation, count(*), sum(status = 'error'),"
        " sum(coalesce(rows_returned, 0)), sum(coalesce(rows_affected, 0)), sum(ts_end - ts)"
        f" FROM {queries} GROUP BY 1, 2, 3, 4"
    ).fetchall()
    tables = db.execute(
        "SELECT e.conn, e.operation, t.value, count(*), sum(e.status = 'error')"
        f" FROM {queries} e, json_each(e.tables) t GROUP BY 1, 2, 3"
    ).fetchall()
    failed = reader.select_events(
        (*_SQL, "mysql.command", "mysql.connect"),
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
    return ops, tables, errors, commands


def _old_amqp(reader: CaptureReader) -> tuple[list[Any], ...]:
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
    return pubs, ins, settles


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


def _old_http(reader: CaptureReader) -> list[Any]:
    one = reader.select_events(("http.exchange",), _ONE)
    many = reader.select_events(("http.exchanges",), ("rows", "fields"), json=("rows",))
    return reader.db.execute(
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
    ).fetchall()


def _vary(rnd: random.Random, ev: Event, ts: int) -> Event:
    """``ev`` with the fields the sections read drawn from small sets (groups repeat)."""
    pick = rnd.choice
    ch: dict[str, Any] = {"ts": ts, "conn": pick([1, 2, 3, 7])}
    have = {f.name for f in dataclasses.fields(ev)}
    options: dict[str, list[Any]] = {
        "db_system": [None, "mariadb", "postgresql", "mysql"],
        "operation": [None, "SELECT", "INSERT", "UPDATE", "DELETE", "COMMIT", "BEGIN"],
        "command": [None, "COM_QUERY", "COM_PING", "COM_INIT_DB"],
        "status": [None, "ok", "error", "error"],
        "rows_returned": [None, 0, 3, 10],
        "rows_affected": [None, 0, 1, 5],
        "ts_end": [None, ts + 1_000, ts + 2_500_000],
        "tables": [None, [], ["instances"], ["instances", "hosts"], ["é", "zeta", "Alpha"]],
        "error_code": [None, "1146", "1045", "42P01", ""],
        "error_message": [None, "boom", "Access denied", "another", "zz last"],
        "exchange": [None, "", "nova", "amq.topic"],
        "routing_key": [None, "", "compute", "scheduler.host1"],
        "queue": [None, "", "compute", "reply_1"],
        "body_size": [None, 0, 10, 1500, 7],
        "injected": [False, True],
        "op": ["ack", "nack", "reject"],
        "proxy": [None, "api", "keystone"],
        "method": ["GET", "POST", "DELETE"],
        "route": [None, "/v2/servers", "/v3/auth/tokens", ""],
        "path": [None, "/x", "/v2/servers/1"],
        "error": [None, None, "no_response"],
        "req_body_size": [0, 12, 300],
        "resp_body_size": [0, 99, 4000],
    }
    if isinstance(ev, HttpExchange):
        options["status"] = [None, 200, 201, 404, 499, 400, 500, 503]
    for name, vals in options.items():
        if name in have:
            ch[name] = pick(vals)
    if isinstance(ev, HttpExchanges):
        ex = _vary(rnd, _template("http.exchange"), ts)
        ch["fields"] = pick([list(ROW_FIELDS), list(ROW_FIELDS), ["ts", "conn"]])
        ch["rows"] = [
            [getattr(_vary(rnd, ex, ts + i), f) for f in ROW_FIELDS]
            for i in range(rnd.randrange(0, 4))
        ]
    return dataclasses.replace(ev, **ch)


_TEMPLATES = {ev.kind: ev for ev in _instances() if ev.conn}


def _template(kind: str) -> Event:
    return _TEMPLATES[kind]


_KINDS = (
    *_SQL,
    "mysql.command",
    "mysql.connect",
    "amqp.publish",
    "amqp.deliver",
    "amqp.get",
    "amqp.settle",
    "http.exchange",
    "http.exchanges",
    "core.conn_open",
)


@pytest.mark.parametrize("fmt", ["2", "3"])
def test_sections_give_the_rows_of_the_old_queries(tmp_path: Path, fmt: str) -> None:
    rnd = random.Random(7)
    evs = [_vary(rnd, _template(rnd.choice(_KINDS)), 1_000 + i) for i in range(3000)]
    path = tmp_path / "cap.db"
    chunks = [evs[i : i + 500] for i in range(0, len(evs), 500)]
    if fmt == "3":
        _write3(path, [ev for c in chunks for ev in c])
    else:
        _write2(path, chunks)
    r = CaptureReader(path)
    assert r.format == fmt
    sql, amqp, http = sql_stats.Stats(), amqp_stats.Stats(), http_stats.Stats()
    scan(r, [sql, amqp, http])
    want_sql, want_amqp, want_http = _old_sql(r), _old_amqp(r), _old_http(r)
    assert all(want_sql) and all(want_amqp) and want_http  # every table has rows
    assert sql.rows() == want_sql
    assert amqp.rows() == want_amqp
    assert http.rows() == want_http
    # and through the public functions, each reading the capture itself
    services = {1: "nova", 2: "keystone", 3: "glance"}
    assert sql_stats.collect(r, services) == sql_stats.collect(r, services, sql)
    assert amqp_stats.section(r, services) is not None
    assert http_stats.section(r, services) is not None
    r.close()
