"""TLS: stripped by default (clients that allow plaintext speak plaintext, a client that
requires TLS is told what to configure), terminated in sniff with ``tls = {...}``,
towards a server without TLS (the shared MariaDB) and one with TLS (a private one)."""

from __future__ import annotations

import ssl
import subprocess
import uuid
from typing import Any

import pymysql
import pytest

from tests.integration.mysql.conftest import HOST
from tests.integration.mysql.util import wait_for

pytestmark = pytest.mark.integration


def _cipher(port: int, **kw: Any) -> tuple[str, Any]:
    c = pymysql.connect(host=HOST, port=port, user="root", **kw)
    with c.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        cipher = cur.fetchone()[1]
    sock = c._sock
    c.close()
    return cipher, sock


def test_client_requiring_tls_gets_a_clear_error(sniff_run: Any, mariadb: int, certs: Any) -> None:
    p = sniff_run([{"name": "db", "protocol": "mysql", "upstream": "127.0.0.1:3306"}])
    with pytest.raises(pymysql.err.OperationalError, match="SSL is required"):
        pymysql.connect(host=HOST, port=p.port(), user="root", ssl_ca=certs[0], connect_timeout=5)
    note = wait_for(
        lambda: [
            e for e in p.events("core.note") if e.code == "mysql.client_hangup_after_greeting"
        ],
        what="the note about a client that requires TLS",
    )
    assert "tls = {" in note[0].message and "'db'" in note[0].message
    wait_for(lambda: "tls = {" in p.text(), what="the warning in sniff's log")


def test_server_tls_is_stripped_for_clients_that_allow_plaintext(
    sniff_run: Any, ssl_mariadb: int
) -> None:
    direct_cipher, _ = _cipher(ssl_mariadb)  # PyMySQL prefers TLS when offered
    assert direct_cipher
    p = sniff_run([{"protocol": "mysql", "upstream": f"127.0.0.1:{ssl_mariadb}"}])
    via_cipher, _ = _cipher(p.port(), program_name="tls-stripped")
    assert via_cipher == ""  # plaintext through sniff, and therefore decoded:
    q = wait_for(
        lambda: [e for e in p.events("mysql.query") if e.text.startswith("SHOW SESSION")],
        what="events",
    )
    assert q[0].text == "SHOW SESSION STATUS LIKE ?"  # the literal is not kept
    assert q[0].operation == "SHOW" and q[0].rows_returned == 1
    wait_for(lambda: "removed CLIENT_SSL" in p.text(), what="the warning in sniff's log")
    assert [e.code for e in p.events("core.note")].count("mysql.tls_stripped") == 1


def test_tls_terminated_in_sniff_plaintext_upstream(
    sniff_run: Any, mariadb: int, certs: Any
) -> None:
    cert, key = certs
    p = sniff_run(
        [{"protocol": "mysql", "upstream": "127.0.0.1:3306", "tls": {"cert": cert, "key": key}}]
    )
    prog = f"tls-{uuid.uuid4().hex[:6]}"
    c = pymysql.connect(
        host=HOST,
        port=p.port(),
        user="root",
        database="test",
        program_name=prog,
        ssl={"ca": cert, "check_hostname": False},
    )
    assert isinstance(c._sock, ssl.SSLSocket)
    with c.cursor() as cur:
        cur.execute("SELECT 1 + 1, 'through tls'")
        assert cur.fetchall() == ((2, "through tls"),)
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        assert cur.fetchone()[1] == ""  # the server got plaintext from sniff
    c.close()
    # the mariadb command-line client, which requires TLS with --ssl
    out = subprocess.run(
        [
            "mariadb",
            "-h",
            HOST,
            "-P",
            str(p.port()),
            "-uroot",
            "--ssl",
            "--batch",
            "-e",
            "SELECT 'cli over tls'",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "cli over tls" in out.stdout, out.stderr
    conns = wait_for(lambda: [e for e in p.events("mysql.connect") if e.client_tls], what="logins")
    assert all(e.status == "ok" and not e.server_tls for e in conns)
    texts = wait_for(
        lambda: (
            {e.text for e in p.events("mysql.query")} >= {"SELECT ? + ?, ?", "SELECT ?"}
            and {e.text for e in p.events("mysql.query")}
        ),
        what="decoded statements",
    )
    assert "SELECT ? + ?, ?" in texts
    assert not p.events("core.protocol_error")


def test_tls_on_both_sides(sniff_run: Any, ssl_mariadb: int, certs: Any) -> None:
    cert, key = certs
    p = sniff_run(
        [
            {
                "protocol": "mysql",
                "upstream": f"127.0.0.1:{ssl_mariadb}",
                "tls": {"cert": cert, "key": key, "upstream": "require"},
            }
        ]
    )
    cipher, sock = _cipher(p.port(), ssl={"ca": cert, "check_hostname": False})
    assert cipher  # the server sees TLS (from sniff)
    assert isinstance(sock, ssl.SSLSocket)  # the client sees TLS (to sniff)
    import mariadb

    m = mariadb.connect(host=HOST, port=p.port(), user="root", ssl=True, ssl_verify_cert=False)
    cur = m.cursor(binary=True)
    cur.execute("SELECT ? + 1", (41,))
    assert cur.fetchall() == [(42,)]
    m.close()
    (conn, *_) = wait_for(
        lambda: [e for e in p.events("mysql.connect") if e.server_tls], what="login"
    )
    assert conn.client_tls and conn.status == "ok"
    ex = wait_for(
        lambda: [e for e in p.events("mysql.query") if e.command == "COM_STMT_EXECUTE"],
        what="execute",
    )
    assert ex[0].text == "SELECT ? + ?" and ex[0].rows_returned == 1


def test_tls_upstream_required_but_not_offered(sniff_run: Any, mariadb: int, certs: Any) -> None:
    cert, key = certs
    p = sniff_run(
        [
            {
                "protocol": "mysql",
                "upstream": "127.0.0.1:3306",
                "tls": {"cert": cert, "key": key, "upstream": "require"},
            }
        ]
    )
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(
            host=HOST,
            port=p.port(),
            user="root",
            ssl={"ca": cert, "check_hostname": False},
            connect_timeout=5,
        )
    errs = wait_for(lambda: p.events("core.protocol_error"), what="the protocol error")
    assert "upstream" in errs[0].reason and "require" in errs[0].reason
