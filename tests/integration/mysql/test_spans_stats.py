"""What an operator sees: spans (OpenTelemetry database attributes), the sqlcommenter
tag in the database's own view of the statement, and ``sniff stats``."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import pymysql
import pytest

from tests.helpers import ROOT
from tests.integration.mysql.conftest import HOST, direct
from tests.integration.mysql.util import wait_for

pytestmark = pytest.mark.integration


def _workload(port: int, table: str, prog: str) -> None:
    c = pymysql.connect(host=HOST, port=port, user="root", database="test", program_name=prog)
    with c.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, host VARCHAR(32))")
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"compute-{i}") for i in range(20)]
        )
        cur.execute(f"SELECT * FROM {table} WHERE host = 'compute-3'")
        cur.execute(f"UPDATE {table} SET host = 'x' WHERE id < 5")
        cur.execute(f"DELETE FROM {table} WHERE id = 19")
        c.commit()
        with pytest.raises(pymysql.MySQLError):
            cur.execute(f"SELECT * FROM {table}_nope")
    c.close()


def test_spans_carry_the_database_conventions(sniff_run: Any, table: str) -> None:
    p = sniff_run([{"name": "mariadb", "protocol": "mysql", "upstream": "127.0.0.1:3306"}])
    prog = f"nova-conductor-{uuid.uuid4().hex[:4]}"
    _workload(p.port(), table, prog)
    wait_for(lambda: any(e.status == "error" for e in p.events("mysql.query")), what="events")
    p.stop()
    spans = [s for s in p.spans() if s.attrs.get("db.system.name")]
    by_op = {s.attrs["db.operation.name"]: s for s in spans if s.kind == "CLIENT"}
    sel = next(
        s for s in spans if s.attrs.get("db.query.text") == f"SELECT * FROM {table} WHERE host = ?"
    )
    assert sel.name == f"SELECT {table}" and sel.kind == "CLIENT"
    a = sel.attrs
    assert a["db.system.name"] == "mariadb" and a["db.namespace"] == "test"
    assert a["db.collection.name"] == table and a["db.query.summary"] == f"SELECT {table}"
    assert a["db.response.returned_rows"] == 1
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == 3306
    assert a["network.peer.port"] == 3306 and a["sniff.db.user"] == "root"
    assert sel.service == prog  # the client announced program_name
    assert sel.end >= sel.start and sel.parent_id is None and len(sel.trace_id) == 32
    assert by_op["UPDATE"].attrs["sniff.db.rows_affected"] == 5
    assert by_op["INSERT"].attrs["sniff.db.rows_affected"] == 20
    err = next(s for s in spans if s.status == "ERROR")
    assert err.attrs["db.response.status_code"] == "1146" and err.attrs["error.type"] == "1146"
    assert "doesn't exist" in err.status_message
    assert "compute-3" not in repr([s.attrs for s in spans])  # no literal leaves sniff


def test_sqlcommenter_reaches_the_server(sniff_run: Any, table: str) -> None:
    p = sniff_run([{"protocol": "mysql", "upstream": "127.0.0.1:3306", "sqlcommenter": True}])
    c = pymysql.connect(host=HOST, port=p.port(), user="root", database="test", autocommit=True)
    with c.cursor() as cur:
        # the server's own view of the statement it is running
        cur.execute("SELECT INFO FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()")
        (seen,) = cur.fetchone()
        cur.execute(f"CREATE TABLE {table} (a INT)")
        cur.execute(f"INSERT INTO {table} VALUES (1), (2)")
        cur.execute(f"SELECT a FROM {table} ORDER BY a;")
        assert cur.fetchall() == ((1,), (2,))
    c.close()
    assert "/*traceparent='00-" in seen
    ev = wait_for(
        lambda: [e for e in p.events("mysql.query") if "PROCESSLIST" in e.text], what="the event"
    )[0]
    assert ev.injected and ev.traceparent in seen and "traceparent" not in ev.text
    p.stop()
    span = next(s for s in p.spans() if s.span_id == ev.span_id)
    assert span.trace_id == ev.traceparent.split("-")[1]  # the trace the server logged
    assert span.parent_id is None and span.attrs["sniff.traceparent.injected"] is True


def test_sniff_stats_shows_statements_tables_and_errors(sniff_run: Any, table: str) -> None:
    p = sniff_run([{"protocol": "mysql", "upstream": "127.0.0.1:3306"}])
    prog = f"stats-{uuid.uuid4().hex[:4]}"
    _workload(p.port(), table, prog)
    wait_for(lambda: any(e.status == "error" for e in p.events("mysql.query")), what="events")
    p.stop()
    out = subprocess.run(
        [sys.executable, "-m", "sniff", "stats", p.capture],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert "SQL statements by service and operation" in out
    assert "SQL tables touched" in out and table in out
    assert "SQL errors" in out and "1146" in out
    from proxies.sql.stats import collect
    from sniff.store import CaptureReader

    r = CaptureReader(p.capture)
    data = collect(r, {c: prog for c in {e.conn for e in p.events("mysql.")}})
    r.close()
    assert data is not None
    ops = {(s["operation"], s["count"]) for s in data["statements"] if s["service"] == prog}
    assert {("INSERT", 1), ("UPDATE", 1), ("DELETE", 1), ("COMMIT", 1)} <= ops
    assert ("SELECT", 2) in ops
    row = next(t for t in data["tables"] if t["table"] == table)
    assert row["SELECT"] == 1 and row["INSERT"] == 1 and row["UPDATE"] == 1 and row["DELETE"] == 1
    assert any(e["code"] == "1146" for e in data["errors"])


def test_bytes_are_unchanged_by_sniff(sniff_run: Any, table: str) -> None:
    """A raw client reading the server's answer byte for byte: through sniff and directly
    the result set bytes are identical (after the greeting, which differs anyway)."""
    import hashlib
    import socket
    import struct

    setup = direct()
    with setup.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id INT, b BLOB, t TEXT)")
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s)",
            [(i, bytes(range(256)) * (i % 9), "ü" * i) for i in range(500)],
        )
    setup.close()
    p = sniff_run([{"protocol": "mysql", "upstream": "127.0.0.1:3306"}])

    def raw(port: int) -> str:
        s = socket.create_connection((HOST, port))
        f = s.makefile("rb")

        def read_packet() -> bytes:
            hdr = f.read(4)
            return f.read(int.from_bytes(hdr[:3], "little"))

        read_packet()  # greeting
        caps = 0x0200 | 0x8000 | 0x80000 | 0x0008 | 0x2000  # PROTOCOL_41 SECURE PLUGIN_AUTH DB TXN
        body = (
            struct.pack("<IIB23s", caps, 1 << 24, 45, b"")
            + b"root\x00\x00test\x00mysql_native_password\x00"
        )
        s.sendall(len(body).to_bytes(3, "little") + b"\x01" + body)
        assert read_packet()[:1] == b"\x00"
        q = f"SELECT * FROM {table} ORDER BY id".encode()
        s.sendall((len(q) + 1).to_bytes(3, "little") + b"\x00\x03" + q)
        h = hashlib.sha256()
        eofs = 0
        while eofs < 2:
            pk = read_packet()
            h.update(pk)
            if pk[:1] == b"\xfe" and len(pk) < 9:
                eofs += 1
        s.close()
        return h.hexdigest()

    assert raw(p.port()) == raw(3306)
