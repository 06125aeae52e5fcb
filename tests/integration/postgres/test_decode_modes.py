"""The same real traffic through ``decode = "inline"`` and ``decode = "capture"`` (the
default) gives the same events, up to what differs between two runs anyway (times,
span ids, connection ids, backend pids, client ports, asyncpg statement names, which side
closed first).

psycopg opens with an SSLRequest (sslmode=prefer), which sniff answers itself; a
client that requires TLS leaves after the refusal; a CancelRequest names the
connection it cancels: all of that must come out the same from the capture process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import require_server
from tests.helpers import SniffProcess

pytestmark = pytest.mark.integration

DB = {"user": "postgres", "database": "test", "host": "127.0.0.1"}
_VARYING = {"ts", "ts_end", "conn", "span_id", "backend_pid", "id_scan", "statement_id",
            "closed_by", "reason", "pid"}  # fmt: skip
_KINDS = ("postgres.", "core.note", "core.protocol_error", "core.conn_close", "core.identity")


def normalized(p: SniffProcess) -> list[tuple[Any, ...]]:
    order: dict[int, int] = {}
    out = []
    for e in p.events():
        if e.kind == "core.conn_open":
            order[e.conn] = len(order)
        if not e.kind.startswith(_KINDS) or e.conn not in order:
            continue
        if e.kind == "core.identity" and not e.source.startswith("postgres."):
            continue  # process identification: not the decoder's
        fields = {
            f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name not in _VARYING
        }
        if "target_conn" in fields:  # the cancelled connection, by its place in the run
            fields["target_conn"] = order.get(fields["target_conn"])
        out.append((order[e.conn], e.kind, re.sub(r":\d+", ":*", repr(sorted(fields.items())))))
    return sorted(out, key=lambda t: t[0])


async def _asyncpg(port: int, table: str) -> None:
    c = await asyncpg.connect(port=port, **DB)
    await c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await c.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"v{i}") for i in range(40)])
    for i in range(20):
        await c.fetchrow(f"SELECT * FROM {table} WHERE id = $1", i)
    async with c.transaction():
        await c.execute(f"DELETE FROM {table} WHERE id >= 35")
        rows = [r async for r in c.cursor(f"SELECT * FROM {table} ORDER BY id", prefetch=6)]
        assert len(rows) == 35
    await c.execute(f"UPDATE {table} SET v = 'm' WHERE id = 1; SELECT 1")
    with pytest.raises(asyncpg.UndefinedTableError):
        await c.fetch("SELECT * FROM sniff_no_such_table")
    await c.copy_from_query(f"SELECT * FROM {table}", output=_null)
    with pytest.raises(asyncio.TimeoutError):  # a CancelRequest on its own connection
        await c.execute("SELECT pg_sleep(20)", timeout=0.3)
    await c.execute(f"DROP TABLE {table}")
    await c.close()


async def _null(chunk: bytes) -> None:
    pass


def _psycopg(port: int) -> None:
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=test application_name=modes"
    with psycopg.connect(dsn + " sslmode=prefer", autocommit=True) as conn:
        with conn.pipeline():
            for i in range(10):
                conn.execute("SELECT %s::text", (str(i),))
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELEC broken")
        conn.execute("SELECT 1").fetchone()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn + " sslmode=require")


def test_inline_and_capture_give_the_same_events(sniff_run: Any) -> None:
    require_server("postgres")
    proxy = {"protocol": "postgres", "upstream": "127.0.0.1:5432", "capture_sql_literals": True}
    inline = sniff_run([{**proxy, "decode": "inline"}])
    capture = sniff_run([proxy])
    for p in (inline, capture):
        asyncio.run(_asyncpg(p.port(), "sniff_pg_modes"))
        _psycopg(p.port())
    inline.stop()
    capture.stop()
    a, b = normalized(inline), normalized(capture)
    kinds = {k for _, k, _ in a}
    assert {"postgres.cancel", "postgres.query", "postgres.session", "core.note"} <= kinds
    assert "core.protocol_error" not in kinds
    (cancel,) = [e for e in b if e[1] == "postgres.cancel"]
    assert "('target_conn', 0)" in cancel[2]  # the asyncpg connection, found by its pid
    assert b == a
