"""The capture store: an append-only SQLite file (WAL), written off the hot path.

Strategy. ``emit`` is the only thing the proxies call: a length check and a
``deque.append`` (atomic under the GIL), nothing else, so telemetry never waits
on disk. When the deque holds ``max_queue`` events, new ones are dropped and
counted; traffic never slows. A writer thread wakes every ``interval`` seconds,
drains the deque, serialises with orjson and inserts the batch in one
transaction, then hands the same batch to the ``on_batch`` listeners (the live
correlator and exporters), so they also run off the event loop.

Schema (``format_version`` 1)::

    events(id INTEGER PRIMARY KEY, ts INTEGER, conn INTEGER, kind TEXT, data TEXT)
    meta(key TEXT PRIMARY KEY, value TEXT)

``data`` is the whole event as JSON (see :mod:`sniff.events`).
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sniff import __version__
from sniff.events import Event, dumps, loads

log = logging.getLogger("sniff.store")

FORMAT_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    conn INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

BatchListener = Callable[[list[Event]], None]


def _connect(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


class CaptureWriter:
    """Accepts events from any thread; persists them from its own thread."""

    def __init__(
        self,
        path: str | Path,
        max_queue: int = 200_000,
        interval: float = 0.05,
        on_batch: list[BatchListener] | None = None,
    ) -> None:
        self.path = str(path)
        self.max_queue = max_queue
        self.interval = interval
        self.on_batch: list[BatchListener] = list(on_batch or [])
        self.dropped = 0
        self.written = 0
        self._q: deque[Event] = deque()
        self._stop = threading.Event()
        self._db = _connect(self.path)
        self._set_meta_initial()
        self._thread = threading.Thread(target=self._run, name="sniff-capture", daemon=True)
        self._thread.start()

    # hot path ----------------------------------------------------------------------------

    def emit(self, ev: Event) -> None:
        if len(self._q) >= self.max_queue:
            self.dropped += 1
            return
        self._q.append(ev)

    # writer thread -----------------------------------------------------------------------

    def _set_meta_initial(self) -> None:
        existing = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        rows = {
            "format_version": FORMAT_VERSION,
            "sniff_version": __version__,
            "host": socket.gethostname(),
        }
        if "started_ns" not in existing:
            rows["started_ns"] = str(time.time_ns())
        rows["pid"] = str(os.getpid())
        self._db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", rows.items())

    def _run(self) -> None:
        last_tick = time.monotonic()
        while not self._stop.wait(self.interval):
            if self._q:
                self._drain()
                last_tick = time.monotonic()
            elif self.on_batch and time.monotonic() - last_tick >= 1.0:
                # idle: let listeners advance their clocks (expire in-flight state)
                last_tick = time.monotonic()
                for listener in self.on_batch:
                    try:
                        listener([])
                    except Exception:
                        log.exception("capture: batch listener %r failed", listener)
        self._drain()

    def _drain(self) -> None:
        q = self._q
        while q:
            n = min(len(q), 20_000)
            batch = [q.popleft() for _ in range(n)]
            for ev in batch:
                if ev.needs_prepare:
                    try:
                        ev.prepare()
                    except Exception:
                        log.exception("capture: preparing a %s event failed", ev.kind)
            try:
                rows = [(ev.ts, ev.conn, ev.kind, dumps(ev).decode()) for ev in batch]
                with self._db:
                    self._db.executemany(
                        "INSERT INTO events(ts, conn, kind, data) VALUES (?, ?, ?, ?)", rows
                    )
                self.written += n
            except Exception:
                log.exception("capture: failed to write %d events to %s", n, self.path)
            for listener in self.on_batch:
                try:
                    listener(batch)
                except Exception:
                    log.exception("capture: batch listener %r failed", listener)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything emitted so far is written (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._q and time.monotonic() < deadline:
            time.sleep(self.interval / 2)
        time.sleep(self.interval)  # the batch being written right now

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        prev = self._db.execute("SELECT value FROM meta WHERE key='dropped_events'").fetchone()
        total_dropped = self.dropped + (int(prev[0]) if prev else 0)
        self._db.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [("dropped_events", str(total_dropped)), ("stopped_ns", str(time.time_ns()))],
        )
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class CaptureReader:
    """Reads a capture file: events in time order, metadata, simple aggregates."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such capture file")
        self.path = str(p)
        self.db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            self.db.execute("SELECT 1 FROM events LIMIT 1")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{p}: not a sniff capture ({e})") from None

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM events").fetchone()[0])

    def events(
        self,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kinds: list[str] | None = None,
        batch: int = 10_000,
    ) -> Iterator[Event]:
        sql = "SELECT kind, data FROM events"
        where: list[str] = []
        args: list[Any] = []
        if since_ns is not None:
            where.append("ts >= ?")
            args.append(since_ns)
        if until_ns is not None:
            where.append("ts <= ?")
            args.append(until_ns)
        if kinds:
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args.extend(kinds)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts, id"
        cur = self.db.execute(sql, args)
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            for kind, data in rows:
                yield loads(kind, data)

    def kind_counts_by_conn(self) -> list[tuple[str, int, int]]:
        return [
            (k, int(c), int(n))
            for k, c, n in self.db.execute(
                "SELECT kind, conn, count(*) FROM events GROUP BY kind, conn"
            ).fetchall()
        ]

    def close(self) -> None:
        self.db.close()


def merge(inputs: list[str | Path], output: str | Path) -> int:
    """Merge captures into a new file; events keep their timestamps and ids."""
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{out}: exists; choose a new output file")
    db = _connect(out)
    total = 0
    dropped = 0
    hosts: list[str] = []
    started: list[int] = []
    for i, src in enumerate(inputs):
        r = CaptureReader(src)
        m = r.meta()
        dropped += int(m.get("dropped_events", "0"))
        hosts.append(m.get("host", "?"))
        if "started_ns" in m:
            started.append(int(m["started_ns"]))
        r.close()
        alias = f"src{i}"
        db.execute(f"ATTACH DATABASE ? AS {alias}", (str(src),))
        with db:
            cur = db.execute(
                f"INSERT INTO events(ts, conn, kind, data) SELECT ts, conn, kind, data FROM {alias}.events"
            )
            total += cur.rowcount
        db.execute(f"DETACH DATABASE {alias}")
    db.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [
            ("format_version", FORMAT_VERSION),
            ("sniff_version", __version__),
            ("merged_from", ",".join(str(p) for p in inputs)),
            ("host", ",".join(hosts)),
            ("dropped_events", str(dropped)),
            ("started_ns", str(min(started)) if started else str(time.time_ns())),
        ],
    )
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return total
