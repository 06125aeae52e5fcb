"""Fixtures shared by every test package.

Integration tests use the real servers this machine runs (RabbitMQ 5672,
MariaDB 3306, PostgreSQL 5432); `.ci/run` starts any that is down. A server
that is unreachable fails the test with a message saying how to start it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SniffProcess

SERVERS = {
    "rabbitmq": (5672, "rabbitmq-server -detached"),
    "mariadb": (3306, "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"),
    "postgres": (5432, "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"),
}


def require_server(name: str) -> int:
    port, how = SERVERS[name]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return port
    except OSError:
        pytest.fail(f"{name} is not listening on 127.0.0.1:{port}; start it with: {how}")


@pytest.fixture
def sniff_run(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``sniff_run([{"protocol": "amqp", "upstream": "127.0.0.1:5672"}])``
    starts ``sniff run`` on free ports; every process is stopped at teardown."""
    started: list[SniffProcess] = []

    def make(proxies: list[dict[str, Any]], **top: Any) -> SniffProcess:
        p = SniffProcess(tmp_path, proxies, **top).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
