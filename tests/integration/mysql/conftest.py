"""Fixtures for the MySQL proxy against real servers with real clients.

- the shared MariaDB on 127.0.0.1:3306 (root, no password, database ``test``);
- ``ssl_mariadb``: a private MariaDB started for this session in a temporary
  directory, with TLS enabled (the shared one has ``have_ssl = DISABLED``), to
  test CLIENT_SSL stripping and TLS towards the server; about 3 s to start;
- ``certs``: a self-signed certificate for sniff's own TLS endpoint;
- ``table``: a unique table name, dropped afterwards (tests may run concurrently
  with other people's tests on the same server).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from tests.conftest import require_server
from tests.helpers import SniffProcess, free_port, wait_port

HOST = "127.0.0.1"


def direct(port: int = 3306, **kw: Any) -> pymysql.connections.Connection:
    kw.setdefault("database", "test")
    return pymysql.connect(host=HOST, port=port, user="root", password="", autocommit=True, **kw)


def drop(table: str, port: int = 3306) -> None:
    c = direct(port)
    with c.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    c.close()


@pytest.fixture(scope="session")
def mariadb() -> int:
    return require_server("mariadb")


@pytest.fixture
def table(mariadb: int) -> Iterator[str]:
    name = f"sniff_t_{uuid.uuid4().hex[:10]}"
    yield name
    drop(name)


def mysql_proxy(upstream: str = "127.0.0.1:3306", **opts: Any) -> dict[str, Any]:
    return {"name": "mariadb", "protocol": "mysql", "upstream": upstream, **opts}


@pytest.fixture(scope="module")
def sniff_mysql(tmp_path_factory: pytest.TempPathFactory, mariadb: int) -> Iterator[SniffProcess]:
    """One ``sniff run`` (default options) shared by a test module."""
    p = SniffProcess(tmp_path_factory.mktemp("sniff"), [mysql_proxy()]).start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("certs")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="session")
def ssl_mariadb(tmp_path_factory: pytest.TempPathFactory, certs: tuple[str, str]) -> Iterator[int]:
    """A private MariaDB with TLS, listening on 127.0.0.1 only."""
    mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    if not os.path.exists(mariadbd) or not shutil.which("mariadb-install-db"):
        pytest.fail("mariadbd / mariadb-install-db not found: install the mariadb-server package")
    base = tmp_path_factory.mktemp("ssl-mariadb")
    data = base / "data"
    common = [
        "--no-defaults",
        f"--datadir={data}",
        "--innodb-log-file-size=4M",
        "--innodb-buffer-pool-size=16M",
    ]
    user = ["--user=root"] if os.geteuid() == 0 else []
    subprocess.run(
        [
            "mariadb-install-db",
            *common,
            *user,
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    cert, key = certs
    log = (base / "server.log").open("w")
    proc = subprocess.Popen(
        [
            mariadbd,
            *common,
            *user,
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--socket={base / 'sock'}",
            f"--pid-file={base / 'pid'}",
            f"--ssl-cert={cert}",
            f"--ssl-key={key}",
            "--skip-log-bin",
            "--skip-name-resolve",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, timeout=30)
        deadline = time.monotonic() + 30
        while True:  # the port opens a little before logins work
            try:
                c = pymysql.connect(host=HOST, port=port, user="root", ssl_disabled=True)
                with c.cursor() as cur:
                    cur.execute("CREATE DATABASE IF NOT EXISTS test")
                c.close()
                break
            except pymysql.MySQLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def session_counters(cur: Any) -> dict[str, int]:
    """This session's statement counters (the server's own ground truth)."""
    cur.execute(
        "SHOW SESSION STATUS WHERE Variable_name IN ('Com_select','Com_insert','Com_insert_select',"
        "'Com_update','Com_update_multi','Com_delete','Com_delete_multi','Com_replace',"
        "'Com_replace_select')"
    )
    return {k: int(v) for k, v in cur.fetchall()}


def by_operation(counters: dict[str, int]) -> dict[str, int]:
    """Server counters -> sniff's operations (INSERT ... SELECT is an INSERT, etc.)."""
    c = counters
    return {
        "SELECT": c.get("Com_select", 0),
        "INSERT": c.get("Com_insert", 0) + c.get("Com_insert_select", 0),
        "UPDATE": c.get("Com_update", 0) + c.get("Com_update_multi", 0),
        "DELETE": c.get("Com_delete", 0) + c.get("Com_delete_multi", 0),
        "REPLACE": c.get("Com_replace", 0) + c.get("Com_replace_select", 0),
    }
