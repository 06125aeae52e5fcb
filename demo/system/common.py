"""Shared by the test system's services: ground truth, tokens, oslo-style messages.

Every outbound call a service makes carries a ``gt-<hex>`` token (a SQL literal
or comment, an AMQP message_id, a ``gt`` query parameter) so the evaluation can
find its span; the service records which unit of work caused it. The tokens are
invisible to the correlator (not ids under its rules).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Any

import pymysql


def token() -> str:
    return "gt-" + uuid.uuid4().hex[:12]


class GroundTruth:
    def __init__(self, path: str, component: str) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 -- held for the service's lifetime
        self.component = component
        self.lock = threading.Lock()

    def call(self, call: str, cause: str | None) -> None:
        with self.lock:
            self.f.write(
                json.dumps(
                    {"component": self.component, "pid": os.getpid(), "call": call, "cause": cause}
                )
                + "\n"
            )

    def unit_done(self, unit: str) -> None:
        with self.lock:
            self.f.write(json.dumps({"component": self.component, "done": unit}) + "\n")


def oslo_envelope(msg: dict[str, Any]) -> bytes:
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(msg)}).encode()


def oslo_open(body: bytes) -> dict[str, Any]:
    env = json.loads(body)
    return json.loads(env["oslo.message"]) if "oslo.message" in env else env


def db(port: int, name: str, database: str) -> pymysql.connections.Connection:
    return pymysql.connect(
        host="127.0.0.1",
        port=port,
        user="root",
        password="",
        database=database,
        autocommit=True,
        program_name=name,
    )


SCHEMA = [
    "CREATE TABLE instances (uuid CHAR(36) PRIMARY KEY, name VARCHAR(64), image CHAR(36), "
    "host VARCHAR(64), state VARCHAR(16), gt VARCHAR(32))",
    "CREATE TABLE instance_actions (id INT AUTO_INCREMENT PRIMARY KEY, instance_uuid CHAR(36), "
    "action VARCHAR(32), request_id VARCHAR(64), gt VARCHAR(32))",
    "CREATE TABLE compute_nodes (id INT PRIMARY KEY, host VARCHAR(64), free_ram_mb INT, gt VARCHAR(32))",
    "CREATE TABLE images (id CHAR(36) PRIMARY KEY, name VARCHAR(64), size INT)",
]


def setup_database(port: int, database: str, images: list[str]) -> None:
    conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="", autocommit=True)
    with conn.cursor() as c:
        c.execute(f"DROP DATABASE IF EXISTS {database}")
        c.execute(f"CREATE DATABASE {database}")
        c.execute(f"USE {database}")
        for stmt in SCHEMA:
            c.execute(stmt)
        c.executemany(
            "INSERT INTO compute_nodes (id, host, free_ram_mb) VALUES (%s, %s, %s)",
            [(i, f"compute-{i}", 10**9) for i in range(1, 21)],
        )
        c.executemany(
            "INSERT INTO images (id, name, size) VALUES (%s, %s, %s)",
            [(img, f"image-{n}", 1000 + n) for n, img in enumerate(images)],
        )
    conn.close()


def drop_database(port: int, database: str) -> None:
    conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="", autocommit=True)
    with conn.cursor() as c:
        c.execute(f"DROP DATABASE IF EXISTS {database}")
    conn.close()
