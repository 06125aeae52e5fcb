"""The capture store: an append-only SQLite file (WAL), written off the hot path.

Strategy. ``emit`` is the only thing the proxies call: a length check and a
``deque.append`` (atomic under the GIL), nothing else, so telemetry never waits
on disk. When the deque holds ``max_queue`` events, new ones are dropped and
counted; traffic never slows. A writer thread wakes every ``interval``
seconds, drains the deque, runs each event's off-hot-path ``prepare()``, and
writes the whole batch in one transaction as rows of up to ``CHUNK_EVENTS`` (1,024)
events: JSON arrays of events in time order. A row
per event cost 10-18 us of SQLite work each (measured here); a row per batch
costs a fraction of a microsecond per event and keeps the writer from
competing with the proxies for the GIL. The same batch then goes to the
``on_batch`` listeners (the live correlator and exporter).

Schema (``format_version`` 3)::

    chunks(id INTEGER PRIMARY KEY, ts_min INTEGER, ts_max INTEGER, n INTEGER, data TEXT)
    fields(kind TEXT PRIMARY KEY, names TEXT)       -- each kind's field names, a JSON list
    counts(kind TEXT, conn INTEGER, n INTEGER)      -- events per kind and connection
    meta(key TEXT PRIMARY KEY, value TEXT)
    VIEW events(id, ts, conn, kind, data)           -- one row per event, for SQL aggregates

Each event in a chunk is a positional array ``[kind, v1, v2, ...]``: the
values of its dataclass fields in declaration order (``ts`` and ``conn``
first), ``bytes`` as latin-1 strings. ``fields`` names them, one row per kind,
written the first time the file gets that kind. Format 2 stored
``[kind, {field: value}]`` pairs: the names were repeated in every event, and
reading built a dict per event and then the event from it. Measured on the
same 1M events (mostly SQL statements and AMQP messages): 491 -> 244 bytes per
event; ``CaptureReader.events()`` 6.5 -> 3.5 us per event (about 1.5 us of it
the orjson parse, 1.2 us ``cls(*values)``); ``encode_chunk`` 3.5 -> 1.7 us per
event (tuples, no dataclass introspection). When a
file's names for a kind differ from the running class's (a capture from
another sniff version) the values are matched by name: missing fields take
their defaults, unknown ones are ignored; unknown kinds become ``UnknownEvent``.
Format-2 files are still read, never appended to; ``merge`` writes format 3,
re-encoding format-2 chunks and chunks whose field lists differ.

Readers stream chunks in ``ts_min`` order and merge overlapping ones, so events
come out in timestamp order even from merged captures. The ``events`` view,
generated from the file's ``fields`` table (re-created when a kind is added),
presents each event's ``data`` as a JSON object with named fields, so SQL
(``json_extract(data, '$.field')``) aggregates over events without Python. It
builds that object for every use of ``data`` in a query (SQLite inlines the
view), so naming several fields of a wide kind is slow (four fields of
``mysql.query`` over 1M events: 41 s, 5.6 s in format 2);
:meth:`CaptureReader.select_events` reads the fields by position instead.
``sniff stats`` reads no SQL at all: one pass over the chunks
(:mod:`sniff.statscan`), 26-28 s -> 3.3-3.9 s on 1M events.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import operator
import os
import socket
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from sniff import __version__
from sniff.events import Event, UnknownEvent, _default, event_class, loads

log = logging.getLogger("sniff.store")

FORMAT_VERSION = "3"
READABLE_FORMATS = ("2", "3")

_TABLES = """
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
CREATE TABLE IF NOT EXISTS fields (kind TEXT PRIMARY KEY, names TEXT NOT NULL);
"""

BatchListener = Callable[[list[Event]], None]
MAX_CHUNK = 20_000
_T = TypeVar("_T")


def _connect(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _create(db: sqlite3.Connection) -> None:
    db.executescript(_TABLES)
    _create_view(db, _read_fields(db))


def _read_fields(db: sqlite3.Connection) -> dict[str, list[str]]:
    return {k: orjson.loads(names) for k, names in db.execute("SELECT kind, names FROM fields")}


def _add_fields(db: sqlite3.Connection, new: dict[str, list[str]]) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO fields(kind, names) VALUES (?, ?)",
        [(k, orjson.dumps(v).decode()) for k, v in new.items()],
    )


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _view_sql(fields: dict[str, list[str]]) -> str:
    """The ``events`` view over format-3 chunks: ``data`` a JSON object built per kind.

    ``j.value -> '$[i]'`` keeps nested arrays and objects JSON (not strings)."""

    def obj(names: list[str]) -> str:
        vals = [(n, f"j.value -> '$[{i + 1}]'") for i, n in enumerate(names)]
        # json_object takes at most ~60 pairs (SQLITE_MAX_FUNCTION_ARG 127): the rest
        # go in with json_insert (json_patch would drop null values)
        expr = "json_object(" + ", ".join(f"{_lit(n)}, {v}" for n, v in vals[:60]) + ")"
        for k in range(60, len(vals), 60):
            more = ", ".join(
                f"{_lit('$.' + orjson.dumps(n).decode())}, {v}" for n, v in vals[k : k + 60]
            )
            expr = f"json_insert({expr}, {more})"
        return expr

    cases = " ".join(f"WHEN {_lit(k)} THEN {obj(n)}" for k, n in sorted(fields.items()))
    data = f"CASE j.value ->> '$[0]' {cases} END" if cases else "NULL"
    return (
        "CREATE VIEW events(id, ts, conn, kind, data) AS"
        f" SELECT c.id * 1000000 + j.key, {_positional(fields, 'ts', '->>')},"
        f" {_positional(fields, 'conn', '->>')},"
        f" j.value ->> '$[0]', {data}"
        " FROM chunks c, json_each(c.data) j"
    )


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _positional(fields: dict[str, list[str]], name: str, op: str) -> str:
    """SQL for field ``name`` of the format-3 array ``j.value`` of any of ``fields``' kinds
    (``op`` ``->>`` for an SQL value, ``->`` for JSON text); NULL for kinds without it."""
    at = {n.index(name) for n in fields.values() if name in n}
    if len(at) == 1 and all(name in n for n in fields.values()):
        return f"j.value {op} '$[{at.pop() + 1}]'"  # ts and conn always, as this sniff writes
    whens = " ".join(
        f"WHEN {_lit(k)} THEN j.value {op} '$[{n.index(name) + 1}]'"
        for k, n in sorted(fields.items())
        if name in n
    )
    return f"CASE j.value ->> '$[0]' {whens} END" if whens else "NULL"


def _create_view(db: sqlite3.Connection, fields: dict[str, list[str]]) -> None:
    db.execute("DROP VIEW IF EXISTS events")
    db.execute(_view_sql(fields))


# --- format 3: positional events ---------------------------------------------------------

_names: dict[type[Event], list[str]] = {}
_getters: dict[type[Event], Callable[[Event], tuple[Any, ...]]] = {}


def field_names(cls: type[Event]) -> list[str]:
    """``cls``'s dataclass field names in declaration order (the positional layout)."""
    names = _names.get(cls)
    if names is None:
        names = _names[cls] = [f.name for f in dataclasses.fields(cls)]
    return names


def _getter(cls: type[Event]) -> Callable[[Event], tuple[Any, ...]]:
    get = _getters.get(cls)
    if get is None:
        # every event has ts and conn: at least two names, so attrgetter returns a tuple
        get = _getters[cls] = operator.attrgetter(*field_names(cls))
    return get


# Events per stored chunk, at most. Readers decode a chunk whole before handing its
# events on; a writer batch of 20,000 events made 5 MB chunks, decoded into 10-20 MB of
# objects that left the CPU's caches before they were used. Measured offline on 100,000
# events (cachegrind, 32 MiB last-level cache): 10.2M -> 4.9M last-level misses with
# chunks of 1,024; on 1M events, alternated: faster in 6 of 8 pairs, by about 8%.
CHUNK_EVENTS = 1024


def encode_chunk(batch: list[Event]) -> tuple[str, int, int]:
    """A batch as a JSON array of ``[kind, v1, v2...]`` in time order: (text, ts_min, ts_max).

    One orjson call for the whole batch over tuples (no dataclass introspection
    per event); the caller records each kind's :func:`field_names` in ``fields``."""
    batch.sort(key=_ev_ts)
    getters = _getters
    try:
        rows = [(ev.kind, *getters[ev.__class__](ev)) for ev in batch]
    except KeyError:
        for ev in batch:
            _getter(ev.__class__)
        rows = [(ev.kind, *getters[ev.__class__](ev)) for ev in batch]
    data = orjson.dumps(rows, default=_default)
    return data.decode(), batch[0].ts, batch[-1].ts


_ev_ts: Callable[[Event], int] = operator.attrgetter("ts")  # a C key for sorts and bisects
_row_ts: Callable[[list[Any]], int] = operator.itemgetter(1)  # ts of a stored array
_kind_conn: Callable[[Event], tuple[str, int]] = operator.attrgetter("kind", "conn")


def _item_ts(item: Any) -> int:
    return int(item[1].get("ts", 0))


def _constructor(kind: str, names: list[str]) -> Callable[..., Event]:
    """What builds a ``kind`` event from a format-3 array's values (``arr[1:]``)."""
    cls = event_class(kind)
    if cls is None:

        def unknown(*vals: Any) -> Event:
            d = dict(zip(names, vals, strict=False))
            return UnknownEvent(d.get("ts", 0), d.get("conn", 0), kind, d)

        return unknown
    if names != field_names(cls):

        def by_name(*vals: Any) -> Event:  # a capture from another sniff version
            return loads(kind, dict(zip(names, vals, strict=False)))

        return by_name
    idx = [names.index(b) for b in cls._bytes_fields]
    if not idx:
        return cls

    def with_bytes(*vals: Any) -> Event:
        v = list(vals)
        for i in idx:
            x = v[i]
            if x.__class__ is str:
                v[i] = x.encode("latin-1")
        return cls(*v)

    return with_bytes


def _defaults(kind: str) -> dict[str, Any]:
    cls = event_class(kind)
    out: dict[str, Any] = {}
    if cls is not None:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


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
        self._fields = _read_fields(self._db)
        self._side: deque[Event] = deque()  # events the identity thread produces
        # connections whose identity was asked for on arrival (prefetch), before their
        # ConnOpen went through process(): their results wait in _early_ids till then
        self._pending_open: set[int] = set()
        self._early_ids: dict[int, list[Event]] = {}
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
        existing: dict[str, str] = {}
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
            existing = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if existing.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: a capture in format {existing['format_version']}; "
                f"this sniff writes format {FORMAT_VERSION} and does not append to another "
                "format: choose a new capture file (`sniff merge` converts old ones)"
            )
        _create(self._db)
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
            ev = self._side.popleft()
            if ev.conn in self._pending_open:
                self._early_ids.setdefault(ev.conn, []).append(ev)
            else:
                batch.append(ev)
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

    def prefetch(self, conn_opens: list[tuple[Any, ...]]) -> None:
        """Ask for the identity of new connections as soon as they reach the capture
        process (ConnOpen field values), before their events are processed: the peer's
        process may be gone by the time a deferred batch is (see ``sniff.capture_proc``)."""
        if self.resolver is None:
            return
        from sniff.events import ConnOpen

        for values in conn_opens:
            ev = ConnOpen(*values)
            self._pending_open.add(ev.conn)
            self._request_identity(ev)

    def tick(self, behind: bool = False) -> None:
        """Idle time: re-check upstream listeners, write identity results, advance listeners.
        ``behind``: received chunks still wait to be decoded, so the decoders' "in flight
        for a second" announcements, which compare with the wall clock, wait too."""
        late = None if behind else self.host.tick(time.time_ns())
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

        released: list[Event] = []
        for ev in batch:
            if isinstance(ev, ConnOpen):
                if ev.conn in self._pending_open:  # asked for on arrival (prefetch)
                    self._pending_open.discard(ev.conn)
                    released.extend(self._early_ids.pop(ev.conn, ()))
                else:
                    self._request_identity(ev)
            elif isinstance(ev, ProxyStart):
                host, _, port = ev.upstream.rpartition(":")
                self._upstreams[(ev.proxy, ev.upstream)] = (host.strip("[]"), int(port))
                self._check_upstreams()

        batch.extend(released)

    def _request_identity(self, ev: Any) -> None:
        self.resolver.request(
            ev.conn, "client", (ev.client_addr, ev.client_port), (ev.listen_addr, ev.listen_port)
        )
        if ev.upstream_local_port:
            self.resolver.request(
                ev.conn,
                "server",
                (ev.server_addr, ev.server_port),
                (ev.upstream_local_addr, ev.upstream_local_port),
            )

    def _check_upstreams(self) -> None:
        self._last_upstream_check = time.monotonic()
        for (proxy, _), (host, port) in self._upstreams.items():
            self.resolver.request_listen(proxy, host, port)

    def _write(self, batch: list[Event]) -> None:
        # in time order, as rows of at most CHUNK_EVENTS events (see CHUNK_EVENTS)
        batch.sort(key=_ev_ts)
        chunks = []
        for k in range(0, len(batch), CHUNK_EVENTS):
            piece = batch[k : k + CHUNK_EVENTS]
            data, ts_min, ts_max = encode_chunk(piece)
            chunks.append((ts_min, ts_max, len(piece), data))
        counts = Counter(map(_kind_conn, batch))
        with self._db:
            if any(k not in self._fields for k, _ in counts):
                # a kind new to this file: record its field names, show it in the view
                new = {
                    ev.kind: field_names(type(ev)) for ev in batch if ev.kind not in self._fields
                }
                _add_fields(self._db, new)
                self._fields.update(new)
                _create_view(self._db, self._fields)
            self._db.executemany(
                "INSERT INTO chunks(ts_min, ts_max, n, data) VALUES (?, ?, ?, ?)", chunks
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
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
            row = self.db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{p}: not a sniff capture ({e})") from None
        self.format: str = row[0] if row else ("3" if "fields" in tables else "2")
        if self.format not in READABLE_FORMATS:
            raise ValueError(
                f"{p}: a capture in format {self.format}; this sniff reads formats "
                f"{', '.join(READABLE_FORMATS)}"
            )
        self._layouts: dict[str, tuple[list[str], Callable[..., Event]]] = {}

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def fields(self) -> dict[str, list[str]]:
        """kind -> field names of its positional arrays (format 3; empty for format 2)."""
        if self.format == "2":
            return {}
        return _read_fields(self.db)

    def count(self) -> int:
        return int(self.db.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0])

    def time_range(self) -> tuple[int | None, int | None]:
        row = self.db.execute("SELECT min(ts_min), max(ts_max) FROM chunks").fetchone()
        return row[0], row[1]

    def _batches(
        self,
        decode: Callable[[bytes], list[_T]],
        key: Callable[[_T], int],
        since_ns: int | None,
        until_ns: int | None,
    ) -> Iterator[list[_T]]:
        """Decoded chunks as lists whose concatenation is in timestamp order."""
        # as bytes: orjson parses them as well, without a str made first
        sql = "SELECT ts_min, CAST(data AS BLOB) FROM chunks"
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
        # Chunks are sorted inside. Most do not overlap the next one and are yielded
        # as they are; where they do (a late event, merged captures), the events not
        # yet safe to yield are carried to the next chunk and sorted with it (Timsort
        # merges the two sorted runs in C, far cheaper than a heap per event).
        carry: list[_T] = []
        cur = self.db.execute(sql, args)
        row = cur.fetchone()
        while row is not None:
            nxt = cur.fetchone()
            boundary = nxt[0] if nxt is not None else None
            items = decode(row[1])
            if since_ns is not None or until_ns is not None:
                items = [
                    it
                    for it in items
                    if (since_ns is None or key(it) >= since_ns)
                    and (until_ns is None or key(it) <= until_ns)
                ]
            if carry:
                items = carry + items
                items.sort(key=key)
                carry = []
            if boundary is not None and items and key(items[-1]) >= boundary:
                cut = bisect.bisect_left(items, boundary, key=key)
                carry = items[cut:]
                items = items[:cut]
            if items:
                yield items
            # no reference to a yielded batch while the next one is decoded: freed
            # first, its memory is reused hot (measured: ~0.7 us per event less)
            del items
            row = nxt
        if carry:
            yield carry

    def raw(
        self,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kinds: list[str] | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(kind, fields) in timestamp order, without building event objects
        (``bytes`` fields as their latin-1 strings)."""
        wanted = set(kinds) if kinds else None
        decode: Callable[[bytes], list[tuple[str, dict[str, Any]]]]
        if self.format == "2":

            def decode(data: bytes) -> list[tuple[str, dict[str, Any]]]:
                items: list[tuple[str, dict[str, Any]]] = orjson.loads(data)
                if wanted is not None:
                    items = [it for it in items if it[0] in wanted]
                return items

        else:
            names = self.fields()

            def decode(data: bytes) -> list[tuple[str, dict[str, Any]]]:
                items: list[list[Any]] = orjson.loads(data)
                if wanted is not None:
                    items = [it for it in items if it[0] in wanted]
                try:
                    return [(it[0], dict(zip(names[it[0]], it[1:], strict=False))) for it in items]
                except KeyError:  # a kind added since (a capture still being written)
                    names.update(self.fields())
                    return [(it[0], dict(zip(names[it[0]], it[1:], strict=False))) for it in items]

        for batch in self._batches(decode, _item_ts, since_ns, until_ns):
            yield from batch
            del batch  # see _batches

    def events(
        self,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kinds: list[str] | None = None,
    ) -> Iterator[Event]:
        if self.format == "2":
            # each event built as it is consumed (a chunk of them at once, next to its
            # parsed dicts, measured slower)
            for kind, d in self.raw(since_ns, until_ns, kinds):
                yield loads(kind, d)
            return
        wanted = set(kinds) if kinds else None
        # kind -> constructor; for kinds with bytes fields, the array indexes to
        # convert in place first (cheaper than a wrapper around the constructor)
        ctors: dict[str, Callable[..., Event]] = {}
        fix: dict[str, tuple[int, ...]] = {}
        for kind, names in self.fields().items():
            cls = event_class(kind)
            if cls is not None and cls._bytes_fields and names == field_names(cls):
                ctors[kind] = cls
                fix[kind] = tuple(names.index(b) + 1 for b in cls._bytes_fields)
            else:
                ctors[kind] = _constructor(kind, names)

        def decode(data: bytes) -> list[Event]:
            items: list[list[Any]] = orjson.loads(data)
            if wanted is not None:
                items = [it for it in items if it[0] in wanted]
            if fix:
                for it in items:
                    idx = fix.get(it[0])
                    if idx is not None:
                        for i in idx:
                            x = it[i]
                            if x.__class__ is str:
                                it[i] = x.encode("latin-1")
            try:
                # the hot loop: one positional constructor call per event
                return [ctors[it[0]](*it[1:]) for it in items]
            except KeyError:  # a kind added since (a capture still being written)
                for kind, names in self.fields().items():
                    if kind not in ctors:
                        ctors[kind] = _constructor(kind, names)
                unlisted = {it[0] for it in items} - ctors.keys()
                if unlisted:
                    raise ValueError(
                        f"{self.path}: events of kinds {sorted(unlisted)} without a field list"
                    ) from None
                return [ctors[it[0]](*it[1:]) for it in items]

        for batch in self._batches(decode, _ev_ts, since_ns, until_ns):
            yield from batch
            del batch  # see _batches

    def rows(
        self, since_ns: int | None = None, until_ns: int | None = None
    ) -> Iterator[list[list[Any]]]:
        """Format 3: the events as stored, ``[kind, ts, conn, v1, v2...]`` arrays
        (``bytes`` fields still their latin-1 strings), in lists whose concatenation is
        in timestamp order; :meth:`layout` names each kind's values and builds its
        event. For a consumer that reads a few fields of every event (the offline
        correlator): no event object is built, which was about half of what reading
        an event cost (``cls(*values)`` ~1.5-2 us, then freeing it)."""
        if self.format == "2":
            raise ValueError(f"{self.path}: a format-2 capture has no positional rows")
        return self._batches(orjson.loads, _row_ts, since_ns, until_ns)

    def layout(self, kind: str) -> tuple[list[str], Callable[..., Event]]:
        """(the field names of ``kind``'s rows, what builds its event from ``row[1:]``,
        ``bytes`` fields restored: as :meth:`events` builds it). ValueError for a
        kind without a field list."""
        lay = self._layouts.get(kind)
        if lay is None:
            names = self.fields().get(kind)  # read again: a kind added since, when being written
            if names is None:
                raise ValueError(f"{self.path}: events of kinds {[kind]} without a field list")
            lay = self._layouts[kind] = (names, _constructor(kind, names))
        return lay

    def select_events(
        self, kinds: Sequence[str], names: Sequence[str], json: Sequence[str] = ()
    ) -> str:
        """SQL for a FROM clause: the events of ``kinds``, one row each, with columns
        ``id, ts, conn, kind`` and one per field in ``names``, valued as
        ``json_extract(data, '$.name')`` on the ``events`` view would be (NULL where a
        kind has no such field); fields in ``json`` instead as ``data -> '$.name'``
        (JSON text, ``'null'`` for a JSON null: what ``json_each`` over a nested array
        needs). In format 3 the values are taken by position from the chunks; through
        the view, which builds a JSON object per event and per use, ``sniff stats``
        took 140 s instead of 32 s on 1M events."""
        want = ", ".join(_lit(k) for k in kinds) or "NULL"
        if self.format == "2":
            cols = "".join(
                f", data {'->' if n in json else '->>'} {_lit('$.' + orjson.dumps(n).decode())}"
                f" AS {_ident(n)}"
                for n in names
            )
            return f"(SELECT id, ts, conn, kind{cols} FROM events WHERE kind IN ({want}))"
        fields = {k: v for k, v in self.fields().items() if k in set(kinds)}
        cols = "".join(
            f", {_positional(fields, n, '->' if n in json else '->>')} AS {_ident(n)}"
            for n in names
        )
        return (
            "(SELECT c.id * 1000000 + j.key AS id,"
            f" {_positional(fields, 'ts', '->>')} AS ts, {_positional(fields, 'conn', '->>')} AS conn,"
            f" j.value ->> '$[0]' AS kind{cols}"
            f" FROM chunks c, json_each(c.data) j WHERE j.value ->> '$[0]' IN ({want}))"
        )

    def kind_counts_by_conn(self) -> list[tuple[str, int, int]]:
        return [
            (k, int(c), int(n))
            for k, c, n in self.db.execute("SELECT kind, conn, n FROM counts").fetchall()
        ]

    def close(self) -> None:
        self.db.close()


def _reencode(data: str, src: dict[str, list[str]] | None, out: dict[str, list[str]]) -> str:
    """A format-2 chunk (``src`` None) or a format-3 one with field lists ``src``, as
    format 3 with the field lists ``out`` (kinds not in it yet are added)."""
    rows: list[list[Any]] = []
    defaults: dict[str, dict[str, Any]] = {}
    for it in orjson.loads(data):
        kind = it[0]
        d: dict[str, Any] = it[1] if src is None else dict(zip(src[kind], it[1:], strict=False))
        names = out.get(kind)
        if names is None:
            cls = event_class(kind)
            names = out[kind] = field_names(cls) if cls is not None else list(d)
        dflt = defaults.get(kind)
        if dflt is None:
            dflt = defaults[kind] = _defaults(kind)
        rows.append([kind, *(d[n] if n in d else dflt.get(n) for n in names)])
    return orjson.dumps(rows, default=_default).decode()


def merge(inputs: list[str | Path], output: str | Path) -> int:
    """Merge captures (format 2 or 3) into a new format-3 file; events keep their
    timestamps and ids. Chunks already in the output's layout are copied as they are;
    the others (format 2, or field lists of another sniff version) are re-encoded."""
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{out}: exists; choose a new output file")
    db = _connect(out)
    _create(db)
    fields: dict[str, list[str]] = {}
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
        src_fields = r.fields() if r.format == "3" else None
        same = src_fields is not None
        for kind, names in (src_fields or {}).items():
            if kind not in fields:
                cls = event_class(kind)
                fields[kind] = field_names(cls) if cls is not None else names
            same = same and fields[kind] == names
        if not same:
            cur = r.db.execute("SELECT ts_min, ts_max, n, data FROM chunks ORDER BY id")
            with db:
                for ts_min, ts_max, n, data in cur:
                    db.execute(
                        "INSERT INTO chunks(ts_min, ts_max, n, data) VALUES (?, ?, ?, ?)",
                        (ts_min, ts_max, n, _reencode(data, src_fields, fields)),
                    )
        r.close()
        alias = f"src{i}"
        db.execute(f"ATTACH DATABASE ? AS {alias}", (str(src),))
        with db:
            if same:
                db.execute(
                    f"INSERT INTO chunks(ts_min, ts_max, n, data) SELECT ts_min, ts_max, n, data FROM {alias}.chunks"
                )
            db.execute(
                f"INSERT INTO counts(kind, conn, n) SELECT kind, conn, n FROM {alias}.counts WHERE true "
                "ON CONFLICT(kind, conn) DO UPDATE SET n = n + excluded.n"
            )
        db.execute(f"DETACH DATABASE {alias}")
    _add_fields(db, fields)
    _create_view(db, fields)
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
