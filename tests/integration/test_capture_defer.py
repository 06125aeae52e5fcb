"""``capture_defer`` with its default (30 s) on a machine whose cores are busy: decoding
waits for idle CPU, and nothing is lost. Against the real PostgreSQL, with psycopg."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import psycopg

from tests.conftest import require_server

_SPIN = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 60: pass\n"


def test_busy_machine_defers_decoding_and_stop_decodes_everything(sniff_run: Any) -> None:
    require_server("postgres")
    proc = sniff_run(
        [{"protocol": "postgres", "upstream": "127.0.0.1:5432"}],
        capture_defer=30,
        log_level="info",
    )
    n_cpu = len(__import__("os").sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n_cpu)]
    try:
        time.sleep(0.5)  # the gate reads the load over its last 100 ms
        dsn = f"host=127.0.0.1 port={proc.port()} user=postgres dbname=test sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(300):
                conn.execute("SELECT %s::int", (i,))
        time.sleep(1.0)
        decoded_meanwhile = len(proc.events("postgres.query"))
        t0 = time.monotonic()
        assert proc.stop() == 0  # stopping decodes what waited, busy machine or not
        stop_took = time.monotonic() - t0
    finally:
        for s in spinners:
            s.kill()
            s.wait()
    statements = [e for e in proc.events("postgres.query") if "SELECT" in e.text]
    assert len(statements) == 300
    assert decoded_meanwhile < 300  # the decoding waited for the CPU...
    assert "decoding waited" in proc.text()  # ... and says so
    assert stop_took < 20
