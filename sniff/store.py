"""The capture store: an append-only SQLite file (WAL), written off the hot path.

Strategy. ``emit`` is the only thing the proxies call: a length check and a
``deque.append`` (atomic under the GIL), nothing else, so telemetry never waits
on disk. When the deque holds ``max_queue`` events, new ones are dropped and
counted; traffic never slows. A writer thread wakes every ``interval``
seconds, drains the deque, runs each event's off-hot-path ``prepare()``, and
writes the whole batch as ONE row: a JSON array of ``[kind, event]`` pairs in
time order. A row per event cost 10-18 us of SQLite work each (measured here);
a row per batch costs a fraction of a microsecond per event and keeps the
writer from competing with the proxies for the GIL. The same batch then goes
to the ``on_batch`` listeners (the live correlator and exporter).

Schema (``format_version`` 2)::

    chunks(id INTEGER PRIMARY KEY, ts_min INTEGER, ts_max INTEGER, n INTEGER, data TEXT)
    counts(kind TEXT, conn INTEGER, n INTEGER)      -- events per kind and connection
    meta(key TEXT PRIMARY KEY, value TEXT)
    VIEW events(id, ts, conn, kind, data)           -- one row per event, for SQL aggregates

Readers stream chunks in ``ts_min`` order and merge overlapping ones, so events
come out in timestamp order even from merged captures. The ``events`` view lets
SQL (``json_extract(data, '$.field')``) aggregate over events without Python.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from sniff import __version__
from sniff.events import Event, _default, loads

log = logging.getLogger("sniff.store")

FORMAT_VERSION = "2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    ts_min INTEGER NOT NULL,
    ts_max INTEGER NOT NULL,
    n INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_ts ON chunks(ts_min);
CREATE TABLE IF NOT EXISTS counts (
    kind TEXT NOT NULL,
    conn INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (kind, conn)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE VIEW IF NOT EXISTS events(id, ts, conn, kind, data) AS
    SELECT c.id * 1000000 + j.key,
           json_extract(j.value, '$[1].ts'),
           json_extract(j.value, '$[1].conn'),
           json_extract(j.value, '$[0]'),
           json_extract(j.value, '$[1]')
    FROM chunks c, json_each(c.data) j;
"""

BatchListener = Callable[[list[Event]], None]
MAX_CHUNK = 20_000


def _connect(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


def encode_chunk(batch: list[Event]) -> tuple[str, int, int]:
    """A batch as a JSON array of ``[kind, event]`` in time order: (text, ts_min, ts_max).

    One orjson call for the whole batch: per call, orjson spends ~4 us introspecting
    a dataclass; over a list that cost is shared (measured 5.7 -> 1.9 us per event)."""
    batch.sort(key=_ts)
    data = orjson.dumps([[ev.kind, ev] for ev in batch], default=_default)
    return data.decode(), batch[0].ts, batch[-1].ts


def _ts(ev: Event) -> int:
    return ev.ts


def _item_ts(item: list[Any]) -> int:
    return int(item[1].get("ts", 0))


class Recorder:
    """Everything done with events after the hot path, synchronously, in one thread:
    identity lookups for new connections, ``prepare()``, the chunk write, the
    per-kind counts, the listeners (live correlation and export).

    It runs on a thread of the proxy process (:class:`CaptureWriter`) or in a
    separate, lower-priority capture process (:mod:`sniff.capture_proc`), which is
    what ``sniff run`` uses so that none of this competes with the relay for the GIL.
    """

    def __init__(
        self,
        path: str | Path,
        on_batch: list[BatchListener] | None = None,
        identify: bool = False,
        proxies: list[Any] | None = None,
    ) -> None:
        self.path = str(path)
        self.on_batch: list[BatchListener] = list(on_batch or [])
        self.written = 0
        self._db = _connect(self.path)
        self._set_meta_initial()
        self._side: deque[Event] = deque()  # events the identity thread produces
        self._upstreams: dict[tuple[str, str], tuple[str, int]] = {}
        self._last_upstream_check = 0.0
        self._started = time.monotonic()
        self.resolver: Any = None
        from sniff.decode_host import DecoderHost

        # decodes the bytes that proxies in ``decode = "capture"`` mode ship here
        self.host = DecoderHost(proxies or [])
        if identify:
            from sniff.procinfo import ProcResolver

            self.resolver = ProcResolver(self._side.append)

    def _set_meta_initial(self) -> None:
        existing = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if existing.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: a capture in format {existing['format_version']}; "
                f"this sniff writes format {FORMAT_VERSION}: choose a new capture file"
            )
        rows = {
            "format_version": FORMAT_VERSION,
            "sniff_version": __version__,
            "host": socket.gethostname(),
        }
        if "started_ns" not in existing:
            rows["started_ns"] = str(time.time_ns())
        rows["pid"] = str(os.getpid())
        self._db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", rows.items())

    def process(self, batch: list[Event]) -> None:
        batch = self.host.expand(batch)
        if self.resolver is not None:
            self._identify(batch)
        while self._side:
            batch.append(self._side.popleft())
        if not batch:
            return
        for ev in batch:
            if ev.needs_prepare:
                try:
                    ev.prepare()
                except Exception:
                    log.exception("capture: preparing a %s event failed", ev.kind)
        for i in range(0, len(batch), MAX_CHUNK):
            part = batch[i : i + MAX_CHUNK]
            try:
                self._write(part)
                self.written += len(part)
            except Exception:
                log.exception("capture: failed to write %d events to %s", len(part), self.path)
        self._listeners(batch)

    def tick(self) -> None:
        """Idle time: re-check upstream listeners, write identity results, advance listeners."""
        late = self.host.tick(time.time_ns())
        if late:
            self.process(late)
        if self.resolver is not None and self._upstreams:
            # often at first (services start after sniff), then every 10 s (workers fork)
            age = time.monotonic() - self._started
            every = 1.0 if age < 30 else 10.0
            if time.monotonic() - self._last_upstream_check > every:
                self._check_upstreams()
        if self._side:
            self.process([])
        else:
            self._listeners([])

    def _listeners(self, batch: list[Event]) -> None:
        for listener in self.on_batch:
            try:
                listener(batch)
            except Exception:
                log.exception("capture: batch listener %r failed", listener)

    def _identify(self, batch: list[Event]) -> None:
        from sniff.events import ConnOpen, ProxyStart

        for ev in batch:
            if isinstance(ev, ConnOpen):
                self.resolver.request(
                    ev.conn,
                    "client",
                    (ev.client_addr, ev.client_port),
                    (ev.listen_addr, ev.listen_port),
                )
                if ev.upstream_local_port:
                    self.resolver.request(
                        ev.conn,
                        "server",
                        (ev.server_addr, ev.server_port),
                        (ev.upstream_local_addr, ev.upstream_local_port),
                    )
            elif isinstance(ev, ProxyStart):
                host, _, port = ev.upstream.rpartition(":")
                self._upstreams[(ev.proxy, ev.upstream)] = (host.strip("[]"), int(port))
                self._check_upstreams()

    def _check_upstreams(self) -> None:
        self._last_upstream_check = time.monotonic()
        for (proxy, _), (host, port) in self._upstreams.items():
            self.resolver.request_listen(proxy, host, port)

    def _write(self, batch: list[Event]) -> None:
        data, ts_min, ts_max = encode_chunk(batch)
        counts = Counter((ev.kind, ev.conn) for ev in batch)
        with self._db:
            self._db.execute(
                "INSERT INTO chunks(ts_min, ts_max, n, data) VALUES (?, ?, ?, ?)",
                (ts_min, ts_max, len(batch), data),
            )
            self._db.executemany(
                "INSERT INTO counts(kind, conn, n) VALUES (?, ?, ?) "
                "ON CONFLICT(kind, conn) DO UPDATE SET n = n + excluded.n",
                [(k, c, n) for (k, c), n in counts.items()],
            )

    def close(self, dropped: int = 0) -> None:
        if self.resolver is not None:
            self.resolver.close()
            if self._side:
                self.process([])
        prev = self._db.execute("SELECT value FROM meta WHERE key='dropped_events'").fetchone()
        total_dropped = dropped + (int(prev[0]) if prev else 0)
        self._db.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [("dropped_events", str(total_dropped)), ("stopped_ns", str(time.time_ns()))],
        )
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class CaptureWriter:
    """In-process capture: ``emit`` from any thread; a thread runs the :class:`Recorder`."""

    def __init__(
        self,
        path: str | Path,
        max_queue: int = 200_000,
        interval: float = 0.05,
        on_batch: list[BatchListener] | None = None,
        identify: bool = False,
        proxies: list[Any] | None = None,
    ) -> None:
        self.path = str(path)
        self.max_queue = max_queue
        self.interval = interval
        self.dropped = 0
        self.raw_bytes = 0
        self.max_raw_bytes = 256 * 1024 * 1024
        self._q: deque[Event] = deque()
        self._stop = threading.Event()
        self.recorder = Recorder(path, on_batch, identify, proxies)
        self._thread = threading.Thread(target=self._run, name="sniff-capture", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        return self.recorder.written

    # hot path ----------------------------------------------------------------------------

    def emit(self, ev: Event) -> None:
        if len(self._q) >= self.max_queue:
            self.dropped += 1
            return
        self._q.append(ev)

    def emit_fields(self, cls: type[Event], values: tuple[Any, ...]) -> None:
        self.emit(cls(*values))

    def emit_raw(self, conn: int, direction: int, ts: int, data: bytes, meta: Any = None) -> bool:
        """Forwarded bytes, decoded by the recorder's thread; False if over budget."""
        if self.raw_bytes + len(data) > self.max_raw_bytes or len(self._q) >= self.max_queue:
            return False
        self.raw_bytes += len(data)
        from sniff.events import RawChunk

        self._q.append(RawChunk(ts, conn, direction, data, meta))
        return True

    # writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        last_tick = time.monotonic()
        while not self._stop.wait(self.interval):
            if self._q:
                self._drain()
            if time.monotonic() - last_tick >= 1.0:
                last_tick = time.monotonic()
                self.recorder.tick()
        self._drain()

    def _drain(self) -> None:
        q = self._q
        while q:
            n = min(len(q), MAX_CHUNK)
            batch = [q.popleft() for _ in range(n)]
            self.raw_bytes -= sum(
                len(getattr(ev, "data", b"")) for ev in batch if ev.kind == "core.raw"
            )
            self.recorder.process(batch)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything emitted so far is written (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._q and time.monotonic() < deadline:
            time.sleep(self.interval / 2)
        time.sleep(self.interval)  # the batch being written right now

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.recorder.close(self.dropped)


class CaptureReader:
    """Reads a capture file: events in time order, metadata, simple aggregates."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such capture file")
        self.path = str(p)
        self.db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            self.db.execute("SELECT 1 FROM chunks LIMIT 1")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{p}: not a sniff capture in format {FORMAT_VERSION} ({e})") from None

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def count(self) -> int:
        return int(self.db.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0])

    def time_range(self) -> tuple[int | None, int | None]:
        row = self.db.execute("SELECT min(ts_min), max(ts_max) FROM chunks").fetchone()
        return row[0], row[1]

    def raw(
        self,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kinds: list[str] | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind, fields) in timestamp order, without building event objects."""
        sql = "SELECT ts_min, data FROM chunks"
        where: list[str] = []
        args: list[Any] = []
        if since_ns is not None:
            where.append("ts_max >= ?")
            args.append(since_ns)
        if until_ns is not None:
            where.append("ts_min <= ?")
            args.append(until_ns)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts_min, id"
        wanted = set(kinds) if kinds else None
        # Chunks are sorted inside. Most do not overlap the next one and are yielded
        # as they are; where they do (a late event, merged captures), the events not
        # yet safe to yield are carried to the next chunk and sorted with it (Timsort
        # merges the two sorted runs in C, far cheaper than a heap per event).
        carry: list[list[Any]] = []
        cur = self.db.execute(sql, args)
        row = cur.fetchone()
        while row is not None:
            nxt = cur.fetchone()
            boundary = nxt[0] if nxt is not None else None
            items: list[list[Any]] = orjson.loads(row[1])
            if wanted is not None:
                items = [it for it in items if it[0] in wanted]
            if since_ns is not None or until_ns is not None:
                items = [
                    it
                    for it in items
                    if (since_ns is None or it[1].get("ts", 0) >= since_ns)
                    and (until_ns is None or it[1].get("ts", 0) <= until_ns)
                ]
            if carry:
                items = carry + items
                items.sort(key=_item_ts)
                carry = []
            if boundary is not None and items and items[-1][1].get("ts", 0) >= boundary:
                cut = bisect.bisect_left(items, boundary, key=_item_ts)
                carry = items[cut:]
                items = items[:cut]
            for kind, d in items:
                yield kind, d
            row = nxt
        for kind, d in carry:
            yield kind, d

    def events(
        self,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kinds: list[str] | None = None,
    ) -> Iterator[Event]:
        for kind, d in self.raw(since_ns, until_ns, kinds):
            yield loads(kind, d)

    def kind_counts_by_conn(self) -> list[tuple[str, int, int]]:
        return [
            (k, int(c), int(n))
            for k, c, n in self.db.execute("SELECT kind, conn, n FROM counts").fetchall()
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
        total += r.count()
        r.close()
        alias = f"src{i}"
        db.execute(f"ATTACH DATABASE ? AS {alias}", (str(src),))
        with db:
            db.execute(
                f"INSERT INTO chunks(ts_min, ts_max, n, data) SELECT ts_min, ts_max, n, data FROM {alias}.chunks"
            )
            db.execute(
                f"INSERT INTO counts(kind, conn, n) SELECT kind, conn, n FROM {alias}.counts WHERE true "
                "ON CONFLICT(kind, conn) DO UPDATE SET n = n + excluded.n"
            )
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
