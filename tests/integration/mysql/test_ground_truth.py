"""Ground truth: sniff's statement counts equal the server's own counters, exactly.

Each client connection reads its *session* counters (``SHOW SESSION STATUS LIKE
'Com_%'``) before and after its workload, on the same connection, through sniff.
Session counters count only that connection's statements, so other people's
tests running against the same MariaDB cannot disturb the measurement (global
``SHOW GLOBAL STATUS`` deltas would); sniff's events are counted between the
same two SHOW statements of each connection. Summed over every connection of a
mixed workload (PyMySQL text protocol with multi-statement packets and errors,
MariaDB Connector/C's binary protocol with bulk inserts and cursors, aiomysql,
SQLAlchemy ORM), the numbers must be equal.

Mapping (MariaDB counts some forms separately): sniff's INSERT = Com_insert +
Com_insert_select, UPDATE = Com_update + Com_update_multi, DELETE = Com_delete +
Com_delete_multi, REPLACE = Com_replace + Com_replace_select, SELECT = Com_select.
A statement with a syntax error counts on neither side (sniff's operation is its
first keyword, e.g. ``SELEC``). Statements run inside stored procedures and
triggers never cross the wire, so the workload has none.

A second test checks ``mariadb-slap``, which cannot read session counters: it
uses global deltas and, if another client disturbed them, measures once more.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections import Counter
from typing import Any

import pymysql
import pytest
from pymysql.constants import CLIENT

from tests.helpers import SniffProcess
from tests.integration.mysql.conftest import HOST, by_operation, direct, drop, session_counters
from tests.integration.mysql.util import wait_for

pytestmark = pytest.mark.integration

OPS = ("SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE")
SHOW = "SHOW SESSION STATUS"


def _pymysql_workload(port: int, t1: str, t2: str) -> dict[str, int]:
    c = pymysql.connect(
        host=HOST,
        port=port,
        user="root",
        database="test",
        client_flag=CLIENT.MULTI_STATEMENTS,
        program_name="gt-pymysql",
    )
    cur = c.cursor()
    before = session_counters(cur)
    cur.execute(f"CREATE TABLE {t1} (id INT PRIMARY KEY, v INT, s VARCHAR(40))")
    cur.execute(f"CREATE TABLE {t2} (id INT PRIMARY KEY, t1_id INT, w INT)")
    cur.executemany(
        f"INSERT INTO {t1} VALUES (%s, %s, %s)", [(i, i % 7, f"s{i}") for i in range(100)]
    )
    cur.execute(f"INSERT INTO {t2} VALUES (1, 1, 10)")
    cur.execute(f"INSERT INTO {t2} (id, t1_id, w) SELECT id + 100, id, v FROM {t1} WHERE v = 3")
    cur.execute(f"REPLACE INTO {t2} VALUES (1, 2, 20)")
    c.commit()
    for i in range(20):
        cur.execute(f"SELECT * FROM {t1} WHERE id IN (%s, %s, %s)", (i, i + 1, i + 2))
        cur.fetchall()
    cur.execute(f"SELECT a.id, b.w FROM {t1} a JOIN {t2} b ON b.t1_id = a.id WHERE a.v > 1")
    cur.execute(f"SELECT * FROM {t1} WHERE id = (SELECT max(t1_id) FROM {t2})")
    cur.execute(f"SELECT * FROM {t1} WHERE id = 5 FOR UPDATE")
    cur.execute(f"UPDATE {t1} SET v = v + 1 WHERE id < 10")
    cur.execute(f"UPDATE {t1} a JOIN {t2} b ON b.t1_id = a.id SET a.s = 'joined' WHERE b.w > 0")
    cur.execute(f"DELETE FROM {t1} WHERE id >= 95")
    cur.execute(f"DELETE a FROM {t1} a JOIN {t2} b ON b.t1_id = a.id WHERE b.id > 150")
    c.rollback()
    cur.execute("BEGIN")
    cur.execute(f"UPDATE {t2} SET w = 0 WHERE id = 1")
    cur.execute("COMMIT")
    # a multi-statement packet; the error stops it: the last SELECT never runs
    cur.execute(
        f"SELECT 1; INSERT INTO {t2} VALUES (500, 1, 1); UPDATE {t2} SET w = 2 WHERE id = 500"
    )
    while cur.nextset():
        pass
    with pytest.raises(pymysql.MySQLError):
        cur.execute(f"SELECT 1; SELECT * FROM {t1}_missing; SELECT 3")
        while cur.nextset():
            pass
    with pytest.raises(pymysql.MySQLError):
        cur.execute(f"DELETE FROM {t2}_missing WHERE id = 1")  # counted by the server too
    with pytest.raises(pymysql.MySQLError):
        cur.execute("SELEC 1")  # a syntax error: counted by neither
    c.commit()
    after = session_counters(cur)
    c.close()
    return _delta(before, after)


def _mariadb_workload(port: int, t1: str, t2: str) -> dict[str, int]:
    import mariadb
    from mariadb.constants import CURSOR

    c = mariadb.connect(host=HOST, port=port, user="root", database="test", autocommit=True)
    cur = c.cursor(binary=True)
    counters_cur = c.cursor()
    before = session_counters(counters_cur)
    for i in range(15):
        cur.execute(f"SELECT id, s FROM {t1} WHERE v = ? AND id > ?", (i % 7, i))
        cur.fetchall()
    cur.executemany(f"INSERT INTO {t2} VALUES (?, ?, ?)", [(1000 + i, i, i) for i in range(30)])
    cur.execute(f"INSERT INTO {t2} VALUES (?, ?, ?)", (2000, 1, 1))
    cur.execute(f"UPDATE {t2} SET w = ? WHERE id >= ?", (7, 1000))
    cur.execute(f"DELETE FROM {t2} WHERE id = ?", (2000,))
    cur2 = c.cursor(cursor_type=CURSOR.READ_ONLY, prefetch_size=4)
    cur2.execute(f"SELECT id FROM {t2} WHERE w = ?", (7,))
    cur2.fetchall()
    cur2.close()
    after = session_counters(counters_cur)
    c.close()
    return _delta(before, after)


def _aiomysql_workload(port: int, t1: str) -> dict[str, int]:
    import aiomysql

    async def work() -> dict[str, int]:
        conn = await aiomysql.connect(
            host=HOST,
            port=port,
            user="root",
            db="test",
            autocommit=True,
            program_name="gt-aiomysql",
        )
        async with conn.cursor() as cur:
            before = await _async_counters(cur)
            for i in range(10):
                await cur.execute(f"SELECT s FROM {t1} WHERE id = %s", (i,))
                await cur.fetchall()
            await cur.execute(f"UPDATE {t1} SET s = 'async' WHERE id = 3")
            after = await _async_counters(cur)
        conn.close()
        return _delta(before, after)

    return asyncio.run(work())


async def _async_counters(cur: Any) -> dict[str, int]:
    await cur.execute("SHOW SESSION STATUS LIKE 'Com\\_%'")
    return {k: int(v) for k, v in await cur.fetchall()}


def _sqlalchemy_workload(port: int, t1: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(
        f"mysql+pymysql://root@{HOST}:{port}/test", connect_args={"program_name": "gt-sqlalchemy"}
    )
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        before = session_counters(raw.cursor())
        for i in range(5):
            conn.execute(text(f"SELECT * FROM {t1} WHERE id = :i"), {"i": i}).fetchall()
        conn.execute(text(f"UPDATE {t1} SET v = 1 WHERE id = :i"), {"i": 1})
        conn.commit()
        after = session_counters(raw.cursor())
    engine.dispose()
    return _delta(before, after)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    b, a = by_operation(before), by_operation(after)
    return {k: a[k] - b[k] for k in a}


def _sniff_counts(p: SniffProcess, conns: set[int] | None = None) -> Counter[str]:
    """Statements per operation between each connection's first and last SHOW SESSION STATUS."""
    per_conn: dict[int, list[Any]] = {}
    for e in p.events("mysql.query"):
        if conns is None or e.conn in conns:
            per_conn.setdefault(e.conn, []).append(e)
    out: Counter[str] = Counter()
    for evs in per_conn.values():
        marks = [i for i, e in enumerate(evs) if e.text.upper().startswith(SHOW)]
        if len(marks) < 2:
            continue
        for e in evs[marks[0] + 1 : marks[-1]]:
            if e.operation in OPS:
                out[e.operation] += 1
    return out


def test_counts_equal_the_servers_session_counters(sniff_mysql: SniffProcess) -> None:
    t1, t2 = f"gt1_{uuid.uuid4().hex[:8]}", f"gt2_{uuid.uuid4().hex[:8]}"
    port = sniff_mysql.port()
    try:
        expected: Counter[str] = Counter()
        for d in (
            _pymysql_workload(port, t1, t2),
            _mariadb_workload(port, t1, t2),
            _aiomysql_workload(port, t1),
            _sqlalchemy_workload(port, t1),
        ):
            expected.update(d)
        expected = +expected  # drop zeros
        assert expected["SELECT"] > 40 and expected["INSERT"] > 4 and expected["DELETE"] >= 3

        def counted() -> Counter[str] | None:
            got = _sniff_counts(sniff_mysql)
            return got if got == expected else None

        try:
            wait_for(counted, timeout=10, what="sniff's counts to reach the server's")
        except AssertionError:
            assert _sniff_counts(sniff_mysql) == expected
    finally:
        drop(t1)
        drop(t2)


def _global() -> dict[str, int]:
    c = direct()
    with c.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Com\\_%'")
        out = by_operation({k: int(v) for k, v in cur.fetchall()})
    c.close()
    return out


def test_mariadb_slap_counts_match_global_counters(sniff_run: Any) -> None:
    def attempt() -> tuple[Counter[str], Counter[str]]:
        p = sniff_run([{"protocol": "mysql", "upstream": "127.0.0.1:3306"}])
        schema = f"sniff_gt_{uuid.uuid4().hex[:8]}"
        before = _global()
        res = subprocess.run(
            [
                "mariadb-slap",
                "-h",
                HOST,
                "-P",
                str(p.port()),
                "-uroot",
                "--concurrency=4",
                "--iterations=1",
                "--number-of-queries=300",
                "--auto-generate-sql",
                "--auto-generate-sql-load-type=mixed",
                f"--create-schema={schema}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        after = _global()
        assert res.returncode == 0, res.stderr

        def all_in() -> Any:
            q = [e for e in p.events("mysql.query") if e.database == schema]
            return q if any(e.operation == "DROP" for e in q) else None

        q = wait_for(all_in, what="mariadb-slap's statements")
        got = Counter(e.operation for e in q if e.operation in OPS)
        server = Counter({k: after[k] - before[k] for k in OPS})
        return got, +server

    got, server = attempt()
    if got != server:  # another client ran statements meanwhile: measure once more
        got, server = attempt()
    assert got == server
