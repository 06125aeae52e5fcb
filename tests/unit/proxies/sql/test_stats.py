"""The SQL section of ``sniff stats`` on a small capture written by the real writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from proxies.mysql.events import MysqlCommand, MysqlConnect
from proxies.sql.events import MysqlQuery, PostgresQuery
from proxies.sql.stats import collect, section
from sniff.events import ConnOpen
from sniff.store import CaptureReader, CaptureWriter


def _q(
    cls: Any,
    conn: int,
    ts: int,
    text: str,
    status: str = "ok",
    code: str | None = None,
    rows: int | None = None,
    aff: int | None = None,
) -> Any:
    system = "postgresql" if cls is PostgresQuery else "mariadb"
    return cls(
        ts,
        conn,
        system,
        "nova",
        "COM_QUERY",
        text,
        False,
        ts + 2_000_000,
        status,
        code,
        "boom" if code else None,
        rows,
        aff,
        f"{ts:016x}",
    )


def test_section(tmp_path: Path) -> None:
    path = tmp_path / "cap.db"
    w = CaptureWriter(path)
    for conn, port in ((1, 3306), (2, 5432)):
        w.emit(ConnOpen(0, conn, "db", "mysql", "10.0.0.5", 1000 + conn, "10.0.0.9", port, "::", 1))
    w.emit(_q(MysqlQuery, 1, 10, "SELECT * FROM instances WHERE id = 1", rows=3))
    w.emit(
        _q(MysqlQuery, 1, 20, "SELECT * FROM instances i JOIN hosts h ON h.id = i.host_id", rows=5)
    )
    w.emit(_q(MysqlQuery, 1, 30, "UPDATE instances SET x = 1", aff=2))
    w.emit(_q(MysqlQuery, 1, 40, "DELETE FROM nope", "error", "1146"))
    w.emit(_q(PostgresQuery, 2, 50, "INSERT INTO users VALUES (1)", aff=1))
    w.emit(MysqlCommand(60, 1, "mariadb", "nova", "COM_PING", 61, "ok", None, None, "f" * 16))
    w.emit(
        MysqlConnect(
            70,
            1,
            71,
            "mariadb",
            "10.11",
            9,
            "app",
            None,
            "mysql_native_password",
            "error",
            "1045",
            "Access denied",
            False,
            False,
            [],
            "e" * 16,
        )
    )
    w.close()
    r = CaptureReader(path)
    services = {1: "nova-api", 2: "keystone"}
    data = collect(r, services)
    assert data is not None
    st = {(s["service"], s["system"], s["operation"]): s for s in data["statements"]}
    assert st[("nova-api", "mariadb", "SELECT")]["count"] == 2
    assert st[("nova-api", "mariadb", "SELECT")]["rows_returned"] == 8
    assert st[("nova-api", "mariadb", "UPDATE")]["rows_affected"] == 2
    assert st[("nova-api", "mariadb", "DELETE")]["errors"] == 1
    assert st[("keystone", "postgresql", "INSERT")]["count"] == 1
    tables = {(t["service"], t["table"]): t for t in data["tables"]}
    assert tables[("nova-api", "instances")]["SELECT"] == 2
    assert tables[("nova-api", "instances")]["UPDATE"] == 1
    assert tables[("nova-api", "hosts")]["SELECT"] == 1
    assert tables[("keystone", "users")]["INSERT"] == 1
    errs = {(e["code"], e["operation"]) for e in data["errors"]}
    assert ("1146", "DELETE") in errs and ("1045", "LOGIN") in errs
    assert data["commands"] == [
        {"service": "nova-api", "command": "COM_PING", "count": 1, "errors": 0}
    ]
    console = Console(width=200, record=True)
    part = section(r, services)
    assert part is not None
    console.print(part)
    text = console.export_text()
    for want in (
        "SQL statements by service and operation",
        "SQL tables touched",
        "instances",
        "SQL errors",
        "Access denied",
        "COM_PING",
    ):
        assert want in text
    r.close()


def test_no_sql_no_section(tmp_path: Path) -> None:
    path = tmp_path / "cap.db"
    CaptureWriter(path).close()
    r = CaptureReader(path)
    assert section(r, {}) is None
    r.close()
