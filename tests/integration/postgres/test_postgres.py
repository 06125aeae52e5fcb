"""The postgres proxy against the real PostgreSQL on 127.0.0.1:5432, through a real
``sniff run``, with asyncpg and psycopg 3: statement counts equal what the
workload issued, results and bytes equal what a direct connection sees."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections import Counter
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import require_server
from tests.fixtures.postgres.record import Recorder

pytestmark = pytest.mark.integration

DB = {"user": "postgres", "database": "test", "host": "127.0.0.1"}


@pytest.fixture
def pg(sniff_run: Any) -> Any:
    require_server("postgres")
    # literals kept so that tests can match statement texts exactly
    return sniff_run(
        [{"protocol": "postgres", "upstream": "127.0.0.1:5432", "capture_sql_literals": True}]
    )


def _table() -> str:
    return f"sniff_pg_{secrets.token_hex(4)}"


def _dsn(port: int, **kw: str) -> str:
    extra = " ".join(f"{k}={v}" for k, v in kw.items())
    return f"host=127.0.0.1 port={port} user=postgres dbname=test {extra}"


def queries(p: Any) -> list[Any]:
    return [e for e in p.events("postgres.query")]


def capture_bytes(p: Any) -> bytes:
    """The capture file and its WAL, raw: for checking what was never stored."""
    raw = b""
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError), open(p.capture + suffix, "rb") as f:
            raw += f.read()
    return raw


def counts(events: list[Any]) -> Counter[str]:
    return Counter(
        e.operation for e in events if e.operation in ("SELECT", "INSERT", "UPDATE", "DELETE")
    )


async def _checksum(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    h = hashlib.sha256()
    for row in await conn.fetch(sql, *args):
        h.update(repr(tuple(row)).encode())
    return h.hexdigest()


# --- ground truth: statement counts ---------------------------------------------------------


def test_asyncpg_mixed_workload_counts_exactly(pg: Any) -> None:
    t = _table()
    issued: Counter[str] = Counter()

    async def work() -> None:
        c = await asyncpg.connect(port=pg.port(), **DB)
        await c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text, n int DEFAULT 0)")
        await c.executemany(
            f"INSERT INTO {t} (id, v) VALUES ($1, $2)", [(i, f"v{i}") for i in range(50)]
        )
        issued["INSERT"] += 50
        for i in range(30):
            await c.fetchrow(f"SELECT * FROM {t} WHERE id = $1", i)
        issued["SELECT"] += 30
        stmt = await c.prepare(f"UPDATE {t} SET n = n + 1 WHERE id = $1")
        for i in range(20):
            await stmt.fetch(i)
        issued["UPDATE"] += 20
        async with c.transaction():
            await c.execute(f"DELETE FROM {t} WHERE id >= 45")
            await c.execute(f"INSERT INTO {t} (id, v) VALUES (1000, 'tx')")
            issued["DELETE"] += 1
            issued["INSERT"] += 1
        # a multi-statement simple query: three statements
        await c.execute(
            f"UPDATE {t} SET v = 'm' WHERE id = 1; SELECT 1; DELETE FROM {t} WHERE id = 2"
        )
        issued.update({"UPDATE": 1, "SELECT": 1, "DELETE": 1})
        # errors: a failing INSERT in the middle of a pipelined executemany
        with pytest.raises(asyncpg.UniqueViolationError):
            await c.executemany(
                f"INSERT INTO {t} (id, v) VALUES ($1, $2)", [(2000, "a"), (3, "dup"), (2001, "b")]
            )
        # the first ran (rolled back with the batch's implicit transaction), the duplicate
        # failed, the third was never executed
        issued["INSERT"] += 2
        with pytest.raises(asyncpg.UndefinedTableError):
            await c.fetch("SELECT * FROM sniff_no_such_table")
        issued["SELECT"] += 1
        # the connection recovered after the error
        assert await c.fetchval(f"SELECT count(*) FROM {t}") == 45
        issued["SELECT"] += 1
        async with c.transaction():
            rows = [r async for r in c.cursor(f"SELECT * FROM {t} ORDER BY id", prefetch=7)]
            assert len(rows) == 45
        issued["SELECT"] += 1
        await c.execute(f"DROP TABLE {t}")
        await c.close()

    asyncio.run(work())
    pg.stop()
    q = queries(pg)
    assert counts(q) == issued
    errors = [e for e in q if e.status == "error"]
    assert sorted(e.error_code for e in errors) == ["23505", "42P01"]
    cursor = next(e for e in q if e.text.startswith(f"SELECT * FROM {t} ORDER BY id"))
    assert cursor.rows_returned == 45
    assert all(e.db_system == "postgresql" and e.database == "test" for e in q)
    assert not pg.events("core.protocol_error")


def test_psycopg_pipeline_copy_and_error_recovery(pg: Any) -> None:
    t = _table()
    issued: Counter[str] = Counter()
    with psycopg.connect(_dsn(pg.port(), application_name="pg-it"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {t} VALUES (%s, %s)", [(i, str(i)) for i in range(40)])
        issued["INSERT"] += 40
        with conn.pipeline():
            for i in range(10):
                conn.execute(f"UPDATE {t} SET v = %s WHERE id = %s", ("p", i))
            conn.execute(f"SELECT * FROM {t} WHERE id < %s", (5,)).fetchall()
        issued["UPDATE"] += 10
        issued["SELECT"] += 1
        # an error inside a pipeline: statements after it (until Sync) never run
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute(f"DELETE FROM {t} WHERE id = %s", (39,))
            conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (1, "dup"))
            conn.execute(f"DELETE FROM {t} WHERE id = %s", (38,))
        issued["DELETE"] += 1  # ran, then rolled back with the pipeline's implicit transaction
        issued["INSERT"] += 1
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (40,)
        issued["SELECT"] += 1
        with conn.cursor() as cur:
            with cur.copy(f"COPY {t} (id, v) FROM STDIN") as cp:
                for i in range(100, 160):
                    cp.write_row((i, f"c{i}"))
            with cur.copy(f"COPY (SELECT * FROM {t} ORDER BY id) TO STDOUT") as cp:
                out = b"".join(bytes(b) for b in cp)
        with conn.transaction(), conn.cursor(name="srv") as cur:
            cur.execute(f"SELECT * FROM {t} ORDER BY id")
            assert len(cur.fetchmany(10)) == 10
            assert len(cur.fetchall()) == 90
        for _ in range(5):
            conn.execute(f"SELECT v FROM {t} WHERE id = %s", (3,), prepare=True).fetchone()
        issued["SELECT"] += 5
        conn.execute(f"DROP TABLE {t}")
    pg.stop()
    q = queries(pg)
    assert counts(q) == issued
    copy_in = next(e for e in q if e.text.startswith(f"COPY {t} (id, v) FROM STDIN"))
    copy_out = next(e for e in q if e.text.startswith("COPY (SELECT"))
    assert copy_in.rows_affected == 60 and copy_out.rows_returned == 100
    assert out.count(b"\n") == 100
    fetches = [e.rows_returned for e in q if e.text.startswith("FETCH")]
    assert fetches == [10, 90]
    (ident,) = [e for e in pg.events("core.identity") if e.attrs.get("application_name") == "pg-it"]
    assert ident.source == "postgres.startup" and ident.attrs["database"] == "test"
    assert not pg.events("core.protocol_error")


# --- transparency -----------------------------------------------------------------------------


def test_results_equal_direct_including_large_rows(pg: Any) -> None:
    t = _table()
    big = secrets.token_bytes(6 * 1024 * 1024)

    async def work() -> tuple[list[str], list[str]]:
        proxied = await asyncpg.connect(port=pg.port(), **DB)
        direct = await asyncpg.connect(port=5432, **DB)
        await direct.execute(f"CREATE TABLE {t} (id int, blob bytea, txt text)")
        await proxied.execute(f"INSERT INTO {t} VALUES (1, $1, repeat('é', 1000000))", big)
        await direct.execute(
            f"INSERT INTO {t} SELECT g, NULL, md5(g::text) FROM generate_series(2, 5000) g"
        )
        sqls = [
            (f"SELECT * FROM {t} ORDER BY id", ()),
            (f"SELECT id, txt FROM {t} WHERE id > $1 ORDER BY id", (10,)),
            ("SELECT g, g * 2.5, now()::date, 'x' || g FROM generate_series(1, 20000) g", ()),
        ]
        a = [await _checksum(proxied, s, *args) for s, args in sqls]
        b = [await _checksum(direct, s, *args) for s, args in sqls]
        assert await proxied.fetchval(f"SELECT blob FROM {t} WHERE id = 1") == big
        await direct.execute(f"DROP TABLE {t}")
        await proxied.close()
        await direct.close()
        return a, b

    a, b = asyncio.run(work())
    assert a == b
    pg.stop()
    big_select = next(e for e in queries(pg) if e.text.startswith(f"SELECT * FROM {t}"))
    assert big_select.rows_returned == 5000


def test_bytes_on_both_sides_of_sniff_are_identical(sniff_run: Any) -> None:
    """client -> recorder A -> sniff -> recorder B -> PostgreSQL: sniff changes nothing but
    the SSLRequest it answers itself."""
    require_server("postgres")

    async def work() -> tuple[Recorder, Recorder]:
        rec_b = Recorder(5432)
        port_b = await rec_b.start()
        p = sniff_run([{"protocol": "postgres", "upstream": f"127.0.0.1:{port_b}"}])
        rec_a = Recorder(p.port())
        port_a = await rec_a.start()
        c = await asyncpg.connect(host="127.0.0.1", port=port_a, user="postgres", database="test")
        await c.fetch("SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
        await c.executemany("SELECT $1::int", [(i,) for i in range(50)])
        await c.copy_from_query("SELECT * FROM generate_series(1, 1000)", output=_null)
        await c.close()
        await asyncio.get_running_loop().run_in_executor(None, _psycopg_some, port_a)
        await asyncio.sleep(0.3)
        await rec_a.stop()
        await rec_b.stop()
        p.stop()
        return rec_a, rec_b

    rec_a, rec_b = asyncio.run(work())
    assert len(rec_a.sessions) == len(rec_b.sessions) == 2
    for sa, sb in zip(rec_a.sessions, rec_b.sessions, strict=True):
        c_a = b"".join(c for d, c in sa if d == b">")
        c_b = b"".join(c for d, c in sb if d == b">")
        s_a = b"".join(c for d, c in sa if d == b"<")
        s_b = b"".join(c for d, c in sb if d == b"<")
        ssl_request = bytes.fromhex("0000000804d2162f")
        assert c_a.startswith(ssl_request)  # both clients asked for TLS ...
        assert c_a[8:] == c_b  # ... sniff answered it; every other byte went through unchanged
        assert s_a == b"N" + s_b
    assert sum(len(c) for d, c in rec_b.sessions[0] if d == b"<") > 50_000


async def _null(chunk: bytes) -> None:
    pass


def _psycopg_some(port: int) -> None:
    with psycopg.connect(_dsn(port), autocommit=True) as conn:
        with conn.pipeline():
            for i in range(20):
                conn.execute("SELECT %s::text", (str(i),))
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELEC broken")


# --- listen / notify, cancel, timing --------------------------------------------------------


def test_listen_notify(pg: Any) -> None:
    async def work() -> list[str]:
        listener = await asyncpg.connect(port=pg.port(), **DB)
        sender = await asyncpg.connect(port=pg.port(), **DB)
        got: list[str] = []
        done = asyncio.Event()

        def cb(*args: Any) -> None:
            got.append(args[3])
            done.set()

        await listener.add_listener("sniff_chan", cb)
        await sender.execute("NOTIFY sniff_chan, 'hello there'")
        await asyncio.wait_for(done.wait(), 5)
        await listener.close()
        await sender.close()
        return got

    assert asyncio.run(work()) == ["hello there"]
    pg.stop()
    (n,) = pg.events("postgres.notification")
    assert (n.channel, n.payload_size, n.payload) == (
        "sniff_chan",
        11,
        "hello there",
    )  # literals on


def test_cancel_request_reaches_the_server(pg: Any) -> None:
    async def work() -> tuple[float, int, int]:
        c = await asyncpg.connect(port=pg.port(), **DB)
        pid, key = c.get_server_pid(), c._protocol.backend_secret  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await c.execute("SELECT pg_sleep(20)", timeout=0.5)
        took = time.monotonic() - t0
        assert (
            await c.fetchval("SELECT 42") == 42
        )  # the connection is usable: the query was cancelled
        await c.close()
        return took, pid, key

    took, pid, key = asyncio.run(work())
    assert took < 5
    pg.stop()
    (cancel,) = pg.events("postgres.cancel")
    sleep = next(e for e in queries(pg) if "pg_sleep" in e.text)
    assert (sleep.status, sleep.error_code) == ("error", "57014")
    assert cancel.backend_pid == pid and cancel.target_conn == sleep.conn
    assert sleep.ts_end - sleep.ts < 5e9
    assert str(key).encode() not in capture_bytes(pg)


def test_statement_timing_and_span_ids(pg: Any) -> None:
    async def work() -> None:
        c = await asyncpg.connect(port=pg.port(), **DB)
        await c.execute("SELECT pg_sleep(0.2)")
        await c.close()

    asyncio.run(work())
    pg.stop()
    (e,) = [e for e in queries(pg) if "pg_sleep" in e.text]
    assert 0.2e9 <= e.ts_end - e.ts < 2e9
    assert len(e.span_id) == 16 and e.command == "Query" and e.status == "ok"
    (s,) = pg.events("postgres.session")
    assert s.status == "ok" and s.backend_pid and s.server_version and not s.client_tls


def test_spans_for_statements(pg: Any) -> None:
    async def work() -> None:
        c = await asyncpg.connect(port=pg.port(), **DB)
        await c.fetchval("SELECT $1::int", 1)
        with contextlib.suppress(asyncpg.PostgresError):
            await c.execute("SELECT * FROM sniff_missing_table")
        async with c.transaction():
            await c.execute("SELECT 2")
        await c.close()

    asyncio.run(work())
    pg.stop()
    spans = [s for s in pg.spans() if s.attrs.get("db.system.name") == "postgresql"]
    assert len(spans) == 5  # SELECT, the failing SELECT, BEGIN, SELECT 2, COMMIT
    assert all(s.kind == "CLIENT" and s.attrs.get("db.namespace") == "test" for s in spans)
    (bad,) = [s for s in spans if s.status == "ERROR"]
    assert bad.attrs.get("db.response.status_code") == "42P01"
    assert "does not exist" in bad.status_message
    ok = next(s for s in spans if s.attrs.get("db.query.text") == "SELECT $1::int")
    assert ok.attrs.get("db.response.returned_rows") == 1 and ok.end > ok.start
    assert len({s.span_id for s in spans}) == 5


def test_literals_are_not_captured_by_default(sniff_run: Any) -> None:
    require_server("postgres")
    p = sniff_run([{"protocol": "postgres", "upstream": "127.0.0.1:5432"}])

    async def work() -> None:
        c = await asyncpg.connect(port=p.port(), **DB)
        await c.execute("SELECT 'sniff-literal-4711' AS a, 271828 AS b")
        await c.close()

    asyncio.run(work())
    p.stop()
    (e,) = [e for e in queries(p) if e.operation == "SELECT"]
    assert not e.keep_literals or e.text != "SELECT 'sniff-literal-4711' AS a, 271828 AS b"
    raw = capture_bytes(p)
    assert b"sniff-literal-4711" not in raw and b"271828" not in raw


# --- sqlcommenter ---------------------------------------------------------------------------


def test_sqlcommenter_tags_reach_the_server(sniff_run: Any) -> None:
    require_server("postgres")
    p = sniff_run(
        [
            {
                "protocol": "postgres",
                "upstream": "127.0.0.1:5432",
                "sqlcommenter": True,
                "capture_sql_literals": True,
            }
        ]
    )

    async def work() -> tuple[str, str]:
        c = await asyncpg.connect(port=p.port(), **DB)
        simple = await c.fetchval("SELECT current_query()")  # prepared (Parse) by asyncpg
        await c.execute("CREATE TEMP TABLE tc (a int)")
        await c.close()
        with psycopg.connect(_dsn(p.port()), autocommit=True) as conn:
            q = conn.execute("SELECT current_query();").fetchone()
            assert q is not None
        return simple, q[0]

    prepared_text, simple_text = asyncio.run(work())
    p.stop()
    q = queries(p)
    by_text = {e.text: e for e in q}
    assert "traceparent" not in "".join(by_text)  # events keep the statement as the client wrote it
    e1 = next(e for e in q if e.command == "Execute" and "current_query" in e.text)
    e2 = next(e for e in q if e.command == "Query" and "current_query" in e.text)
    assert prepared_text == f"SELECT current_query() /*traceparent='{e1.traceparent}'*/"
    assert simple_text == f"SELECT current_query() /*traceparent='{e2.traceparent}'*/;"
    for e in (e1, e2):
        assert e.traceparent is not None and e.traceparent.split("-")[2] == e.span_id


# --- TLS refused by default ------------------------------------------------------------------


def test_client_that_requires_tls_fails_with_a_clear_log_line(pg: Any) -> None:
    async def work() -> None:
        with pytest.raises((ConnectionError, asyncpg.PostgresError, OSError)):
            await asyncpg.connect(port=pg.port(), ssl="require", **DB)

    asyncio.run(work())
    with pytest.raises(psycopg.OperationalError, match="SSL"):
        psycopg.connect(_dsn(pg.port(), sslmode="require"))
    # sslmode=prefer falls back to plaintext through sniff
    with psycopg.connect(_dsn(pg.port(), sslmode="prefer")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    time.sleep(0.2)
    pg.stop()
    log = pg.text()
    assert "answered 'N'" in log and 'tls = { cert = "server.pem", key = "server.key" }' in log
    assert "requires TLS" in log
    notes = [n.code for n in pg.events("core.note")]
    assert "postgres.tls_required" in notes and "postgres.ssl_refused" in notes
