"""The capture file, format 3 (positional events): round trips, older files, merge, SQL."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from sniff.events import REGISTRY, ConnOpen, Event, Note, UnknownEvent, _default
from sniff.store import FORMAT_VERSION, CaptureReader, Recorder, _create_view, field_names, merge

for _proto in ("amqp", "mysql", "postgres", "http", "sql"):
    importlib.import_module(f"proxies.{_proto}.events")

# format 2 as sniff wrote it: [kind, {field: value}] pairs, the view reading them by name
_FORMAT2_SCHEMA = """
CREATE TABLE chunks (id INTEGER PRIMARY KEY, ts_min INTEGER NOT NULL, ts_max INTEGER NOT NULL,
                     n INTEGER NOT NULL, data TEXT NOT NULL);
CREATE INDEX chunks_ts ON chunks(ts_min);
CREATE TABLE counts (kind TEXT NOT NULL, conn INTEGER NOT NULL, n INTEGER NOT NULL,
                     PRIMARY KEY (kind, conn));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE VIEW events(id, ts, conn, kind, data) AS
    SELECT c.id * 1000000 + j.key, json_extract(j.value, '$[1].ts'),
           json_extract(j.value, '$[1].conn'), json_extract(j.value, '$[0]'),
           json_extract(j.value, '$[1]')
    FROM chunks c, json_each(c.data) j;
"""

_BYTES = b"\x00\x01head\x7f\x80\xfe\xff"


def _value(type_: str, name: str, i: int) -> Any:
    """A representative value for a field of type ``type_`` (JSON-stable: lists, not tuples)."""
    t = type_.split(" | ")[0]
    if name in ("ts", "conn"):
        return 1_700_000_000_000_000_000 + 2 * i if name == "ts" else (7 << 32) | 5
    if t == "int":
        return 1000 + i
    if t == "bool":
        return True
    if t == "bytes":
        return _BYTES
    if t == "str":
        return f"{name} 'é' \"q\" {i}"
    if t.startswith("dict[str, str]"):
        return {"k": "v", "x-é": name}
    if t.startswith("dict"):
        return {"nested": {"a": [1, 2.5, None]}, "s": "x"}
    if t in ("list[str]", "list[str"):
        return ["users", "instances"]
    if t == "list[int]":
        return [1, 2, 3]
    if t.startswith("list[dict"):
        return [{"pid": "1", "name": "nova-api"}]
    if t.startswith("list["):
        return [[1, "a", None], [2, "b", {"c": [3]}]]
    return {"any": [1, "two", None, {"three": 3.5}]}  # Any


def _instances() -> list[Event]:
    out: list[Event] = []
    for i, (kind, cls) in enumerate(sorted(REGISTRY.items())):
        vals = {f.name: _value(str(f.type), f.name, i) for f in dataclasses.fields(cls)}
        out.append(cls(**vals))
        # and once more with every optional field None
        opt = {
            f.name: None if str(f.type).endswith("| None") else v
            for f, v in zip(dataclasses.fields(cls), vals.values(), strict=True)
        }
        opt["ts"] += 1
        out.append(cls(**opt))
        assert kind == cls.kind
    return out


def _write3(path: Path, events: list[Event]) -> None:
    rec = Recorder(path)
    rec._write(events)
    rec.close()


def _write2(path: Path, chunks: list[list[Event]]) -> None:
    """A format-2 capture, written with the old encoding."""
    db = sqlite3.connect(path)
    db.executescript(_FORMAT2_SCHEMA)
    for batch in chunks:
        batch = sorted(batch, key=lambda e: e.ts)
        data = orjson.dumps([[ev.kind, ev] for ev in batch], default=_default).decode()
        db.execute(
            "INSERT INTO chunks(ts_min, ts_max, n, data) VALUES (?, ?, ?, ?)",
            (batch[0].ts, batch[-1].ts, len(batch), data),
        )
        for ev in batch:
            db.execute(
                "INSERT INTO counts VALUES (?, ?, 1) ON CONFLICT(kind, conn) DO UPDATE SET n = n + 1",
                (ev.kind, ev.conn),
            )
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("format_version", "2"), ("host", "old"), ("started_ns", "5")],
    )
    db.commit()
    db.close()


def _write3_fields(path: Path, fields: dict[str, list[str]], rows: list[list[Any]]) -> None:
    """A format-3 capture as another sniff version would write it (its own field lists)."""
    Recorder(path).close()  # the schema
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO fields VALUES (?, ?)",
        [(k, orjson.dumps(v).decode()) for k, v in fields.items()],
    )
    _create_view(db, fields)  # as the writer does when a kind is added
    db.execute(
        "INSERT INTO chunks(ts_min, ts_max, n, data) VALUES (?, ?, ?, ?)",
        (rows[0][1], rows[-1][1], len(rows), orjson.dumps(rows).decode()),
    )
    db.commit()
    db.close()


def test_every_kind_round_trips(tmp_path: Path) -> None:
    evs = _instances()
    path = tmp_path / "cap.db"
    _write3(path, list(evs))
    r = CaptureReader(path)
    assert r.format == FORMAT_VERSION == "3"
    assert r.meta()["format_version"] == "3"
    got = list(r.events())
    assert got == sorted(evs, key=lambda e: e.ts)
    assert all(
        type(g) is type(e) for g, e in zip(got, sorted(evs, key=lambda e: e.ts), strict=True)
    )
    # bytes come back as bytes, nested values as they were
    pub = next(e for e in got if e.kind == "amqp.publish")
    assert pub.body_head == _BYTES  # type: ignore[attr-defined]
    assert r.fields() == {k: field_names(c) for k, c in REGISTRY.items()}
    # each chunk event is [kind, values in field order]
    (data,) = r.db.execute("SELECT data FROM chunks").fetchone()
    first = orjson.loads(data)[0]
    ev0 = got[0]
    assert first[0] == ev0.kind and first[1:3] == [ev0.ts, ev0.conn]
    assert len(first) == 1 + len(field_names(type(ev0)))
    # raw(): named fields, bytes as their latin-1 text (as in format 2)
    raw = list(r.raw(kinds=["amqp.publish"]))
    assert len(raw) == 2 and raw[0][1]["body_head"] == _BYTES.decode("latin-1")
    assert list(r.events(kinds=["core.note"])) == [e for e in got if e.kind == "core.note"]
    ts = sorted(e.ts for e in evs)
    assert [e.ts for e in r.events(since_ns=ts[3], until_ns=ts[5])] == ts[3:6]
    r.close()


def test_overlapping_chunks_come_out_in_order(tmp_path: Path) -> None:
    path = tmp_path / "cap.db"
    rec = Recorder(path)
    rec._write([Note(t, 1, "c", str(t)) for t in (10, 30, 50, 70)])
    rec._write([Note(t, 2, "c", str(t)) for t in (20, 40, 60)])  # overlaps the first
    rec._write([ConnOpen(80, 3, "p", "amqp", "a", 1, "b", 2, "c", 3)])  # a new kind later
    rec.close()
    r = CaptureReader(path)
    assert [e.ts for e in r.events()] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert [t for _, t in ((k, d["ts"]) for k, d in r.raw())] == [10, 20, 30, 40, 50, 60, 70, 80]
    r.close()


def test_a_large_batch_is_stored_as_chunks_of_bounded_size(tmp_path: Path) -> None:
    from sniff.store import CHUNK_EVENTS

    path = tmp_path / "cap.db"
    rec = Recorder(path)
    n = 2 * CHUNK_EVENTS + 5
    rec._write([Note(n - t, t % 3, "c", str(t)) for t in range(n)])  # in reverse time order
    rec.close()
    db = sqlite3.connect(path)
    rows = db.execute("SELECT ts_min, ts_max, n FROM chunks ORDER BY id").fetchall()
    db.close()
    assert [r[2] for r in rows] == [CHUNK_EVENTS, CHUNK_EVENTS, 5]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(rows))  # in time order
    r = CaptureReader(path)
    assert r.count() == n
    assert [e.ts for e in r.events()] == list(range(1, n + 1))
    r.close()


def test_reads_format_2(tmp_path: Path) -> None:
    evs = _instances()
    path = tmp_path / "old.db"
    half = len(evs) // 2
    _write2(path, [evs[:half], evs[half:]])
    r = CaptureReader(path)
    assert r.format == "2" and r.fields() == {}
    assert list(r.events()) == sorted(evs, key=lambda e: e.ts)
    raw = dict(r.raw(kinds=["amqp.publish"]))
    assert raw["amqp.publish"]["body_head"] == _BYTES.decode("latin-1")
    r.close()
    with pytest.raises(ValueError, match=r"format 2.*does not append"):
        Recorder(path)


def test_other_field_lists_are_matched_by_name(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    # ConnOpen from a sniff without upstream_local_* but with a field this one lacks,
    # in another order; and a kind this sniff does not know
    names = ["ts", "conn", "listen_port", "proxy", "protocol_name", "client_addr"]
    names += ["client_port", "server_addr", "server_port", "listen_addr", "future_field"]
    fields = {"core.conn_open": names, "future.thing": ["ts", "conn", "size"]}
    rows = [
        ["core.conn_open", 10, 1, 5672, "amqp", "amqp", "10.0.0.1", 4000, "rmq", 5672, "::", "x"],
        ["future.thing", 20, 1, 99],
    ]
    _write3_fields(path, fields, rows)
    r = CaptureReader(path)
    opened, future = list(r.events())
    assert opened == ConnOpen(10, 1, "amqp", "amqp", "10.0.0.1", 4000, "rmq", 5672, "::", 5672)
    assert opened.upstream_local_port == 0 and opened.upstream_local_addr == ""
    assert isinstance(future, UnknownEvent)
    assert future.original_kind == "future.thing"
    assert future.data == {"ts": 20, "conn": 1, "size": 99}
    assert dict(r.raw())["core.conn_open"]["future_field"] == "x"
    r.close()
    # merged, the known kind is rewritten in this sniff's layout, the unknown one kept
    out = tmp_path / "merged.db"
    assert merge([path], out) == 2
    m = CaptureReader(out)
    assert m.fields()["core.conn_open"] == field_names(ConnOpen)
    assert m.fields()["future.thing"] == ["ts", "conn", "size"]
    assert next(iter(m.events())) == opened
    m.close()


def test_merge_format_2_and_3(tmp_path: Path) -> None:
    old, new, out = tmp_path / "old.db", tmp_path / "new.db", tmp_path / "out.db"
    a = [Note(t, 1, "old", str(t)) for t in (10, 30, 50)]
    a.append(ConnOpen(40, 1, "p", "amqp", "a", 1, "b", 2, "c", 3))
    b = [Note(t, 2, "new", str(t)) for t in (20, 40, 60)]
    _write2(old, [a])
    _write3(new, list(b))
    assert merge([old, new], out) == 7
    r = CaptureReader(out)
    assert r.format == "3"
    assert r.fields() == {"core.note": field_names(Note), "core.conn_open": field_names(ConnOpen)}
    got = list(r.events())
    assert [e.ts for e in got] == [10, 20, 30, 40, 40, 50, 60]
    assert sorted(got, key=lambda e: (e.ts, e.conn)) == sorted(a + b, key=lambda e: (e.ts, e.conn))
    assert sorted(r.kind_counts_by_conn()) == [
        ("core.conn_open", 1, 1),
        ("core.note", 1, 3),
        ("core.note", 2, 3),
    ]
    meta = r.meta()
    assert meta["format_version"] == "3" and meta["host"].startswith("old,")
    # every chunk is positional now (the format-2 one re-encoded)
    for (data,) in r.db.execute("SELECT data FROM chunks"):
        assert all(isinstance(it[1], int) for it in orjson.loads(data))
    assert r.db.execute("SELECT count(*) FROM events").fetchone()[0] == 7
    r.close()


def test_events_view_has_named_fields(tmp_path: Path) -> None:
    from proxies.sql.events import MysqlQuery

    evs = _instances()
    q, q2 = (e for e in evs if isinstance(e, MysqlQuery))
    q.tables = ["users", "instances"]
    q2.tables = []
    path3, path2 = tmp_path / "v3.db", tmp_path / "v2.db"
    _write3(path3, list(evs))
    _write2(path2, [list(evs)])
    results = []
    for path in (path3, path2):
        r = CaptureReader(path)
        db = r.db
        rows = db.execute(
            "SELECT ts, conn, json_extract(data, '$.operation'), json_type(data, '$.tables'),"
            " json_extract(data, '$.rows_returned'), json_type(data, '$.rows_returned')"
            " FROM events WHERE kind = 'mysql.query' ORDER BY ts"
        ).fetchall()
        assert rows[0] == (q.ts, q.conn, q.operation, "array", q.rows_returned, "integer")
        assert rows[1][4:] == (None, "null")  # a None stays a JSON null
        tables = db.execute(
            "SELECT t.value FROM events e, json_each(e.data, '$.tables') t"
            " WHERE e.kind = 'mysql.query' ORDER BY e.ts, t.key"
        ).fetchall()
        assert tables == [("users",), ("instances",)]
        # every event, every field, the same object as the dataclass serialised by name
        by_ts = {e.ts: e for e in evs}
        for ts, kind, data in db.execute("SELECT ts, kind, data FROM events"):
            assert orjson.loads(data) == orjson.loads(orjson.dumps(by_ts[ts], default=_default))
            assert kind == by_ts[ts].kind
        # select_events: the same values as json_extract on the view
        sel = r.select_events(
            ("mysql.query", "postgres.query", "core.note"),
            ("operation", "tables", "code", "status"),
            json=("tables",),
        )
        got = db.execute(f"SELECT ts, kind, operation, tables, code, status FROM {sel} ORDER BY ts")
        want = db.execute(
            "SELECT ts, kind, json_extract(data, '$.operation'), data -> '$.tables',"
            " json_extract(data, '$.code'), json_extract(data, '$.status') FROM events"
            " WHERE kind IN ('mysql.query', 'postgres.query', 'core.note') ORDER BY ts"
        )
        results.append(got.fetchall())
        assert results[-1] == want.fetchall() and len(results[-1]) == 6
        r.close()
    assert results[0] == results[1]


def test_view_of_a_kind_with_many_fields(tmp_path: Path) -> None:
    path = tmp_path / "wide.db"
    names = ["ts", "conn", *(f"f{i}" for i in range(70))]
    row: list[Any] = ["future.wide", 10, 1, *range(69), None]
    _write3_fields(path, {"future.wide": names}, [row])
    r = CaptureReader(path)
    (data,) = r.db.execute("SELECT data FROM events").fetchone()
    assert orjson.loads(data) == dict(zip(names, row[1:], strict=True))
    r.close()


def test_append_and_kinds_added_while_reading(tmp_path: Path) -> None:
    path = tmp_path / "cap.db"
    _write3(path, [Note(10, 1, "a", "first")])
    rec = Recorder(path)  # appending to a format-3 file: its field lists are kept
    rec._write([ConnOpen(20, 1, "p", "amqp", "a", 1, "b", 2, "c", 3), Note(30, 1, "b", "x")])
    rec.close()
    r = CaptureReader(path)
    assert set(r.fields()) == {"core.note", "core.conn_open"}
    assert [e.ts for e in r.events()] == [10, 20, 30]
    # a reader that listed the kinds before the writer added one finds it when met
    real = r.fields
    calls: list[int] = []

    def stale() -> dict[str, list[str]]:
        calls.append(1)
        return {"core.note": field_names(Note)} if len(calls) == 1 else real()

    r.fields = stale  # type: ignore[method-assign]
    assert [e.kind for e in r.events()] == ["core.note", "core.conn_open", "core.note"]
    assert len(calls) == 2
    assert r.db.execute("SELECT count(*) FROM events WHERE data IS NOT NULL").fetchone() == (3,)
    r.close()


def test_stats_the_same_in_both_formats(tmp_path: Path) -> None:
    from rich.console import Console

    from proxies.http.events import ROW_FIELDS, HttpExchange, HttpExchanges
    from sniff.stats import render

    evs = _instances()
    for ev in evs:
        if hasattr(ev, "ts_end"):
            ev.ts_end = ev.ts + 5_000  # (sums of ts_end - ts stay in 64 bits)
    for ev in evs:
        if isinstance(ev, HttpExchanges):  # rows the HTTP section reads
            ex = next(e for e in evs if isinstance(e, HttpExchange))
            ev.fields = list(ROW_FIELDS)
            ev.rows = [[getattr(ex, f) for f in ROW_FIELDS] for _ in range(3)]
    path3, path2 = tmp_path / "v3.db", tmp_path / "v2.db"
    _write3(path3, list(evs))
    _write2(path2, [list(evs)])
    out = []
    for path in (path2, path3):
        r = CaptureReader(path)
        console = Console(width=250, record=True)
        render(r, console)
        out.append(console.export_text().split("\n", 2)[2])  # after the header (path, host)
        r.close()
    assert out[0] == out[1]
    for want in ("AMQP publishes", "SQL statements", "HTTP requests"):
        assert want in out[1]


def test_rows_are_the_stored_arrays_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "cap.db"
    rec = Recorder(path)
    rec._write([Note(t, 1, "c", str(t)) for t in (10, 30, 50)])
    rec._write([Note(t, 2, "c", str(t)) for t in (20, 40)])  # overlaps the first
    rec.close()
    _write3(tmp_path / "all.db", _instances())
    for p in (path, tmp_path / "all.db"):
        r = CaptureReader(p)
        rows = [row for batch in r.rows() for row in batch]
        # each row builds, through its kind's layout, the event events() gives
        assert [r.layout(row[0])[1](*row[1:]) for row in rows] == list(r.events())
        assert [row[1] for row in rows] == sorted(row[1] for row in rows)
        for kind, names in r.fields().items():
            assert r.layout(kind)[0] == names
        r.close()
    r = CaptureReader(path)
    with pytest.raises(ValueError, match="without a field list"):
        r.layout("core.conn_open")
    rec = Recorder(path)  # a kind added after the reader listed the field lists
    rec._write([ConnOpen(60, 3, "p", "amqp", "a", 1, "b", 2, "c", 3)])
    rec.close()
    assert r.layout("core.conn_open")[0] == field_names(ConnOpen)
    r.close()
    old = tmp_path / "old.db"
    _write2(old, [_instances()])
    with pytest.raises(ValueError, match="format-2"):
        CaptureReader(old).rows()
