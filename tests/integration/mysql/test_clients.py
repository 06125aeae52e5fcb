"""Real clients through sniff against the real MariaDB: what they read is what they
would read directly (checksums), and what sniff records is what happened."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import hashlib
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pymysql
import pytest
from pymysql.constants import CLIENT

from tests.helpers import SniffProcess
from tests.integration.mysql.conftest import HOST, direct
from tests.integration.mysql.util import digest, wait_quiet

pytestmark = pytest.mark.integration


def _rows(port: int, sql: str, **kw: Any) -> tuple[Any, Any]:
    c = direct(port, **kw)
    with c.cursor() as cur:
        cur.execute(sql)
        out = (cur.description, cur.fetchall())
    c.close()
    return out


def test_pymysql_workload(sniff_mysql: SniffProcess, table: str) -> None:
    p = sniff_mysql
    port = p.port()
    prog = f"pymysql-{uuid.uuid4().hex[:6]}"
    c = pymysql.connect(
        host=HOST,
        port=port,
        user="root",
        database="test",
        program_name=prog,
        client_flag=CLIENT.MULTI_STATEMENTS,
    )
    with c.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {table} (id INT PRIMARY KEY, name VARCHAR(64), price DECIMAL(10,3),"
            " at DATETIME(6), data BLOB, note TEXT, f DOUBLE, j JSON)"
        )
        rows = [
            (
                i,
                f"name-{i}",
                decimal.Decimal(i) / 7,
                datetime.datetime(2024, 1, 1, 0, 0, i % 60, i),
                os.urandom(i % 200),
                "é☃ü" * (i % 5) if i % 3 else None,
                i / 3,
                f'{{"k": {i}}}',
            )
            for i in range(300)
        ]
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", rows)
        c.commit()
        cur.execute(f"SELECT * FROM {table} ORDER BY id")
        via = (cur.description, cur.fetchall())
        cur.execute(f"SELECT * FROM {table} WHERE id IN (1, 2, 3) AND name LIKE 'name-%%'")
        assert len(cur.fetchall()) == 3
        cur.execute(f"UPDATE {table} SET note = 'x' WHERE id < 10")
        cur.execute(f"DELETE FROM {table} WHERE id >= 290")
        c.rollback()  # undo the update and the delete
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute(f"SELECT nope FROM {table}_missing")
        cur.execute(f"SELECT count(*) FROM {table}; SELECT max(id) FROM {table}")
        assert cur.fetchall() == ((300,),)
        cur.nextset()
        assert cur.fetchall() == ((299,),)
        c.select_db("test")
        c.ping()
    c.close()
    assert digest(via) == digest(_rows(3306, f"SELECT * FROM {table} ORDER BY id"))

    evs = wait_quiet(p, prog, 14)
    q = [e for e in evs if e.kind == "mysql.query"]
    ops = [e.operation for e in q]
    for op in ("CREATE", "INSERT", "SELECT", "UPDATE", "DELETE", "ROLLBACK", "COMMIT"):
        assert op in ops, (op, ops)
    ins = next(e for e in q if e.operation == "INSERT")
    assert ins.rows_affected == 300 and ins.tables == [table] and ins.database == "test"
    assert "?" in ins.text and "name-1" not in ins.text  # literals never stored by default
    sel = next(e for e in q if e.operation == "SELECT" and e.text.endswith("ORDER BY id"))
    assert sel.rows_returned == 300 and sel.db_system == "mariadb"
    upd = next(e for e in q if e.operation == "UPDATE")
    dele = next(e for e in q if e.operation == "DELETE")
    rb = next(e for e in q if e.operation == "ROLLBACK")
    assert upd.rows_affected == 10 and dele.rows_affected == 10
    assert upd.transaction == dele.transaction == rb.transaction and rb.transaction_end
    bad = next(e for e in q if e.status == "error")
    assert bad.error_code == "1146" and bad.operation == "SELECT"
    multi = [e for e in q if e.batch_size == 2]
    assert [e.rows_returned for e in multi] == [1, 1]
    cmds = [e.command for e in evs if e.kind == "mysql.command"]
    assert cmds == ["COM_INIT_DB", "COM_PING", "COM_QUIT"]
    (conn,) = [e for e in evs if e.kind == "mysql.connect"]
    assert conn.status == "ok" and conn.user == "root" and conn.connection_id > 0
    assert not [e for e in p.events("core.protocol_error")]


def test_aiomysql(sniff_mysql: SniffProcess, table: str) -> None:
    import aiomysql

    prog = f"aiomysql-{uuid.uuid4().hex[:6]}"

    async def work() -> Any:
        conn = await aiomysql.connect(
            host=HOST,
            port=sniff_mysql.port(),
            user="root",
            db="test",
            autocommit=True,
            program_name=prog,
        )
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v VARCHAR(32))")
            await cur.executemany(
                f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"v{i}") for i in range(50)]
            )
            await cur.execute(f"UPDATE {table} SET v = 'w' WHERE id = 7")
            await cur.execute(f"SELECT * FROM {table} ORDER BY id")
            rows = await cur.fetchall()
        conn.close()
        return rows

    rows = asyncio.run(work())
    assert digest(rows) == digest(_rows(3306, f"SELECT * FROM {table} ORDER BY id")[1])
    q = [e for e in wait_quiet(sniff_mysql, prog, 4) if e.kind == "mysql.query"]
    assert [e.operation for e in q][-3:] == ["INSERT", "UPDATE", "SELECT"]
    assert q[-2].rows_affected == 1 and q[-1].rows_returned == 50


def test_sqlalchemy(sniff_mysql: SniffProcess, table: str) -> None:
    from sqlalchemy import Column, Integer, String, create_engine, select
    from sqlalchemy.orm import DeclarativeBase, Session
    from sqlalchemy.pool import NullPool

    class Base(DeclarativeBase):
        pass

    class Instance(Base):
        __tablename__ = table
        id = Column(Integer, primary_key=True)
        uuid = Column(String(36), nullable=False)
        host = Column(String(64))

    prog = f"sqlalchemy-{uuid.uuid4().hex[:6]}"
    url = f"mysql+pymysql://root@{HOST}:{sniff_mysql.port()}/test"
    engine = create_engine(url, poolclass=NullPool, connect_args={"program_name": prog})
    Base.metadata.create_all(engine)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    with Session(engine) as s:
        s.add_all([Instance(uuid=u, host="compute-1") for u in ids])
        s.commit()
        got = s.scalars(select(Instance).where(Instance.uuid.in_(ids[:3]))).all()
        assert len(got) == 3
        got[0].host = "compute-2"
        s.delete(got[1])
        s.commit()
    engine.dispose()
    q = [e for e in wait_quiet(sniff_mysql, prog, 8) if e.kind == "mysql.query"]
    ops = [e.operation for e in q]
    assert ops.count("COMMIT") >= 2 and "UPDATE" in ops and "DELETE" in ops
    sel = next(e for e in q if e.operation == "SELECT" and table in e.tables)
    assert sel.rows_returned == 3
    # the ids the statements carried are found for the causal stage (UUIDs in the text)
    assert any(ids[0] in (e.ids or {}).values() for e in q)
    txns = {(e.conn, e.transaction) for e in q if e.operation in ("INSERT", "UPDATE", "DELETE")}
    assert None not in {t for _, t in txns} and len(txns) == 2


def test_mariadb_connector_binary_protocol(sniff_run: Any, table: str) -> None:
    """COM_STMT_PREPARE/EXECUTE/FETCH/BULK/CLOSE from libmariadb (MariaDB Connector/C)."""
    import mariadb
    from mariadb.constants import CURSOR

    p = sniff_run(
        [{"protocol": "mysql", "upstream": "127.0.0.1:3306", "capture_sql_literals": True}]
    )
    c = mariadb.connect(host=HOST, port=p.port(), user="root", database="test", autocommit=True)
    cur = c.cursor(binary=True)
    cur.execute(
        f"CREATE TABLE {table} (id INT PRIMARY KEY, d DECIMAL(12,3), t DATETIME(6), s TEXT)"
    )
    when = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456)
    cur.execute(
        f"INSERT INTO {table} VALUES (?, ?, ?, ?)",
        (1, decimal.Decimal("12.345"), when, "\u00e9t\u00e9"),
    )
    cur.executemany(
        f"INSERT INTO {table} (id, s) VALUES (?, ?)", [(i, f"s{i}") for i in range(2, 12)]
    )
    cur.execute(f"SELECT id, d, t, s FROM {table} WHERE id >= ? ORDER BY id", (1,))
    rows = cur.fetchall()
    cur.execute(f"UPDATE {table} SET s = ? WHERE id = ?", ("z", 2))
    cur.execute(f"DELETE FROM {table} WHERE id = ?", (3,))
    cur2 = c.cursor(cursor_type=CURSOR.READ_ONLY, prefetch_size=3)
    cur2.execute(f"SELECT id FROM {table} WHERE id > ?", (0,))
    assert len(cur2.fetchall()) == 10
    cur2.close()
    cur.close()
    c.close()
    assert rows[0] == (1, decimal.Decimal("12.345"), when, "\u00e9t\u00e9")

    def done() -> list[Any]:
        evs = [e for e in p.events("mysql.") if e.kind in ("mysql.query", "mysql.command")]
        return evs if any(e.command == "COM_STMT_FETCH" for e in evs) else []

    from tests.integration.mysql.util import wait_for

    evs = wait_for(done, what="the FETCH event")
    ex = [e for e in evs if e.kind == "mysql.query" and e.command != "COM_QUERY"]
    kinds = {(e.command, e.operation) for e in ex}
    assert ("COM_STMT_EXECUTE", "INSERT") in kinds and ("COM_STMT_BULK_EXECUTE", "INSERT") in kinds
    assert ("COM_STMT_EXECUTE", "SELECT") in kinds and ("COM_STMT_EXECUTE", "DELETE") in kinds
    first = next(e for e in ex if e.operation == "INSERT" and e.command == "COM_STMT_EXECUTE")
    assert first.params == ["1", "12.345", "'2024-02-29 23:59:58.123456'", "'\u00e9t\u00e9'"]
    sel = next(e for e in ex if e.operation == "SELECT" and e.rows_returned)
    assert sel.rows_returned == 11 == len(rows)
    bulk = next(e for e in ex if e.command == "COM_STMT_BULK_EXECUTE")
    assert bulk.rows_affected == 10
    fetched = sum(e.rows_returned or 0 for e in evs if e.command == "COM_STMT_FETCH")
    assert fetched == 10
    assert not p.events("core.protocol_error")


def _cli(port: int, sql: str, *extra: str) -> bytes:
    return subprocess.run(
        [
            "mariadb",
            "-h",
            HOST,
            "-P",
            str(port),
            "-uroot",
            "--batch",
            "--raw",
            *extra,
            "test",
            "-e",
            sql,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout


def test_mariadb_cli_and_load_data_local(
    sniff_mysql: SniffProcess, table: str, tmp_path: Path
) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("".join(f"{i},row {i},{i * 1.5}\n" for i in range(1000)))
    setup = (
        f"CREATE TABLE {table} (a INT, b TEXT, c DOUBLE);"
        f"LOAD DATA LOCAL INFILE '{csv}' INTO TABLE {table} FIELDS TERMINATED BY ',';"
        f"SELECT count(*), sum(a) FROM {table};"
    )
    out = _cli(sniff_mysql.port(), setup, "--local-infile=1")
    assert b"1000\t499500" in out
    read = f"SELECT * FROM {table} ORDER BY a; SHOW COLUMNS FROM {table}"
    assert (
        hashlib.sha256(_cli(sniff_mysql.port(), read)).digest()
        == hashlib.sha256(_cli(3306, read)).digest()
    )

    def loaded() -> Any:
        return [
            e
            for e in sniff_mysql.events("mysql.query")
            if e.operation == "LOAD" and table in e.tables
        ]

    from tests.integration.mysql.util import wait_for

    (ld,) = wait_for(loaded, what="the LOAD DATA event")
    assert ld.status == "ok" and ld.rows_affected == 1000
    assert ld.infile_bytes == csv.stat().st_size  # the CLI sends its statements one by one


def test_mariadb_slap(sniff_mysql: SniffProcess) -> None:
    schema = f"sniff_slap_{uuid.uuid4().hex[:8]}"
    res = subprocess.run(
        [
            "mariadb-slap",
            "-h",
            HOST,
            "-P",
            str(sniff_mysql.port()),
            "-uroot",
            "--concurrency=4",
            "--iterations=1",
            "--number-of-queries=400",
            "--auto-generate-sql",
            "--auto-generate-sql-load-type=mixed",
            f"--create-schema={schema}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "Average number of seconds" in res.stdout

    def done() -> Any:
        q = [e for e in sniff_mysql.events("mysql.query") if e.database == schema]
        return q if any(e.operation == "DROP" for e in q) else []

    from tests.integration.mysql.util import wait_for

    q = wait_for(done, what="mariadb-slap's DROP SCHEMA")
    ops = {e.operation for e in q}
    assert {"SELECT", "INSERT"} <= ops
    assert not sniff_mysql.events("core.protocol_error")


def test_large_rows_and_statements_over_16_mib(sniff_mysql: SniffProcess, table: str) -> None:
    admin = direct()
    with admin.cursor() as cur:
        cur.execute("SELECT @@global.max_allowed_packet")
        (old,) = cur.fetchone()
        cur.execute("SET GLOBAL max_allowed_packet = 67108864")
    try:
        blob = os.urandom(20 * 1024 * 1024)
        prog = f"big-{uuid.uuid4().hex[:6]}"
        c = pymysql.connect(
            host=HOST,
            port=sniff_mysql.port(),
            user="root",
            database="test",
            autocommit=True,
            max_allowed_packet=64 * 1024 * 1024,
            program_name=prog,
        )
        with c.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, b LONGBLOB)")
            cur.execute(f"INSERT INTO {table} VALUES (1, %s), (2, 'small')", (blob,))
            cur.execute(f"SELECT id, b FROM {table} ORDER BY id")
            rows = cur.fetchall()
        c.close()
        assert hashlib.sha256(rows[0][1]).digest() == hashlib.sha256(blob).digest()
        assert rows[1][1] == b"small"
        q = [e for e in wait_quiet(sniff_mysql, prog, 3) if e.kind == "mysql.query"]
        ins = next(e for e in q if e.operation == "INSERT")
        sel = next(e for e in q if e.operation == "SELECT")
        assert ins.truncated and ins.rows_affected == 2 and len(ins.text) <= 70_000
        assert sel.rows_returned == 2 and sel.status == "ok"
        assert not sniff_mysql.events("core.protocol_error")
    finally:
        with admin.cursor() as cur:
            cur.execute(f"SET GLOBAL max_allowed_packet = {int(old)}")
        admin.close()
