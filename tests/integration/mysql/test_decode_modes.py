"""The same real traffic through ``decode = "inline"`` and ``decode = "capture"`` (the
default) gives the same events, up to what differs between two runs anyway (times,
span ids, connection ids, server-assigned ids, which side closed first)."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import re
from typing import Any

import pymysql
import pytest
from pymysql.constants import CLIENT

from tests.helpers import SniffProcess
from tests.integration.mysql.conftest import HOST, mysql_proxy

pytestmark = pytest.mark.integration

# what differs between two runs anyway (server-assigned ids; which side closes first)
_VARYING = {"ts", "ts_end", "conn", "span_id", "connection_id", "statement_id", "id_scan",
            "closed_by", "reason"}  # fmt: skip
_KINDS = ("mysql.", "core.note", "core.protocol_error", "core.conn_close")


def normalized(p: SniffProcess) -> list[tuple[Any, ...]]:
    """Each connection's events (in connection order) without what varies between runs."""
    order: dict[int, int] = {}
    out = []
    for e in p.events():
        if e.kind == "core.conn_open":
            order[e.conn] = len(order)
        if not e.kind.startswith(_KINDS) or e.conn not in order:
            continue
        fields = {
            f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name not in _VARYING
        }
        out.append((order[e.conn], e.kind, re.sub(r":\d+", ":*", repr(sorted(fields.items())))))
    return sorted(out, key=lambda t: t[0])  # stable: each connection's own order is kept


def workload(port: int, table: str) -> None:
    c = pymysql.connect(
        host=HOST, port=port, user="root", database="test", program_name="modes",
        client_flag=CLIENT.MULTI_STATEMENTS, autocommit=True,
    )  # fmt: skip
    with c.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, name VARCHAR(64), d DECIMAL(9,3))")
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s)",
            [(i, f"n{i}", decimal.Decimal(i) / 8) for i in range(200)],
        )
        for i in range(50):
            cur.execute(f"SELECT * FROM {table} WHERE id = %s", (i,))
        cur.execute(f"SELECT * FROM {table}")
        cur.execute(f"UPDATE {table} SET name = 'x' WHERE id < 10")
        cur.execute("BEGIN")
        cur.execute(f"DELETE FROM {table} WHERE id >= 150")
        cur.execute("COMMIT")
        cur.execute(
            f"SELECT count(*) FROM {table}; SELECT 1; UPDATE {table} SET d = 0 WHERE id = 1"
        )
        while cur.nextset():
            pass
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute("SELECT * FROM sniff_no_such_table")
        c.ping()
        c.select_db("mysql")
        c.select_db("test")
    c.close()

    import mariadb  # binary protocol: PREPARE / EXECUTE / cursor FETCH / CLOSE

    m = mariadb.connect(host=HOST, port=port, user="root", database="test", autocommit=True)
    cur = m.cursor(binary=True)
    when = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456)
    for i in range(20):
        cur.execute(f"SELECT name, d FROM {table} WHERE id = ? AND ? < NOW()", (i, when))
        cur.fetchall()
    cur.close()
    cur = m.cursor(cursor_type=mariadb.constants.CURSOR.READ_ONLY, prefetch_size=7)
    cur.execute(f"SELECT * FROM {table} WHERE id < ?", (40,))
    assert len(cur.fetchall()) == 40
    cur.close()
    m.cursor().execute(f"DROP TABLE {table}")
    m.close()


def test_inline_and_capture_give_the_same_events(sniff_run: Any, table: str) -> None:
    inline = sniff_run([mysql_proxy(decode="inline", capture_sql_literals=True)])
    capture = sniff_run([mysql_proxy(capture_sql_literals=True)])
    for p in (inline, capture):
        workload(p.port(), table)
    inline.stop()
    capture.stop()
    a, b = normalized(inline), normalized(capture)
    assert len(a) > 100 and not [e for e in a if e[1] == "core.protocol_error"]
    assert b == a
