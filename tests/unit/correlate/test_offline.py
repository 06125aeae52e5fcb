"""Offline correlation reads the capture's stored rows without building events: the
spans must be exactly those the events themselves give (every field, in order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from correlate.engine import Correlator
from correlate.model import Span
from correlate.offline import all_spans, iter_spans
from proxies.amqp.events import (
    AmqpConfirm,
    AmqpGetOk,
    AmqpMethod,
    AmqpReturn,
    AmqpSettle,
)
from proxies.mysql.events import MysqlCommand
from proxies.sql.events import PostgresQuery
from sniff.events import ConnClose, ConnIdentity, ConnOpen, Event, ProxyUpstream
from sniff.store import CaptureReader, Recorder
from tests.unit.correlate import test_causal as tc
from tests.unit.correlate import test_http as th
from tests.unit.correlate import test_sql as tq

MS = 1_000_000
T = 1_700_000_000_000_000_000
UUID = "6f1c2a3e-1234-4bcd-9abc-0123456789ab"


def _mix(n: int = 40) -> list[Event]:
    """Every kind the builders take, in the situations their handlers branch on."""
    ev: list[Event] = []
    for conn, pid, name in ((1, 100, "api"), (2, 200, "worker")):
        for e in tc.conn_open(conn, T, pid, name):
            e.ts += T if e.ts < T else 0
            ev.append(e)
    ev.append(ProxyUpstream(T, 0, "mariadb", "10.0.0.9:3306", [{"pid": "900", "host": "h"}]))
    for e in tq.opened(3):
        e.ts = T
        ev.append(e)
    ev.append(ConnIdentity(T + 5 * MS, 3, "proc", {"pid": "100", "name": "api", "host": "h"}))
    ev.append(
        ConnOpen(T, 4, "postgresql", "postgres", "10.0.0.7", 5000, "10.0.0.9", 5432, "l", 15432)
    )
    ev.append(th.conn_open(5))
    for i in range(n):
        t = T + (i + 1) * 50 * MS
        rid = f"req-{i}"
        # an API request: HTTP exchange, its statements, an RPC over AMQP, a cast
        ev.append(
            th.exchange(
                5,
                f"{i + 1:016x}",
                f"GET /v2.1/servers/{UUID} HTTP/1.1\r\nX-Openstack-Request-Id: {rid}".encode(),
                start=(t - th.T0) // MS,
                end=(t - th.T0) // MS + 30,
            )
        )
        d = tc.deliver(1, t, i + 1, body_ids={"json._context_request_id": rid})
        d.properties = {"reply_to": "reply_q", "correlation_id": f"c{i}"} if i % 3 == 0 else {}
        ev.append(d)
        ev.append(tq.q(3, t + MS, f"SELECT * FROM instances WHERE uuid = '{UUID}'"))
        ev.append(tq.q(3, t + 2 * MS, "BEGIN", transaction=i + 1))
        ev.append(
            tq.q(
                3,
                t + 3 * MS,
                "UPDATE instances SET host = 'h' WHERE id = 1",
                transaction=i + 1,
                rows_affected=1,
            )
        )
        ev.append(tq.q(3, t + 4 * MS, "COMMIT", transaction=i + 1, transaction_end=i % 2 == 0))
        ev.append(
            tq.q(
                3,
                t + 5 * MS,
                "SELECT * FROM nope",
                status="error",
                error_code="1146" if i % 2 else None,
                error_message="no" if i % 4 else None,
                params=["42", None],
                statement_id="7",
                warnings=1,
                truncated=True,
                infile_bytes=10,
            )
        )
        tp = f"00-{'0af7651916cd43dd8448eb211c80319c'}-{i + 1:016x}-01"
        ev.append(tq.q(3, t + 6 * MS, f"SELECT 1 /*traceparent='{tp}'*/"))
        ev.append(
            tq.q(3, t + 7 * MS, "INSERT INTO a VALUES (1); SELECT * FROM b", batch=1, batch_size=2)
        )
        ev.append(
            MysqlCommand(
                t + 8 * MS, 3, "mariadb", "nova", "COM_PING", t + 9 * MS, "ok", None, None, tq.sid()
            )
        )
        ev.append(
            PostgresQuery(
                t + 9 * MS,
                4,
                "",
                "keystone",
                "Query",
                "SELECT * FROM users WHERE id = 'x'",
                False,
                t + 10 * MS,
                "ok",
                None,
                None,
                1,
                None,
                tq.sid(),
            )
        )
        p = tc.publish(1, t + 10 * MS, "scheduler", body_ids={"json._context_request_id": rid})
        p.confirm_seq = i + 1
        p.mandatory = i % 5 == 0
        p.properties = {"correlation_id": f"c{i}", "reply_to": "reply_q", "message_id": "m"}
        ev.append(p)
        if i % 4 == 0:  # a nack, and a multiple ack of the earlier ones
            ev.append(AmqpConfirm(t + 11 * MS, 1, 1, i + 1, False, False))
        elif i % 4 == 3:
            ev.append(AmqpConfirm(t + 11 * MS, 1, 1, i + 1, True, True))
        if i % 5 == 0:
            ev.append(
                AmqpReturn(
                    t + 11 * MS, 1, 1, 312, "NO_ROUTE", "", "scheduler", {}, 10, t, p.traceparent
                )
            )
        # the worker: a delivery (no-ack sometimes), its statement, an RPC reply, a get
        w = tc.deliver(2, t + 12 * MS, i + 1, body_ids={"json._context_request_id": rid})
        w.no_ack = i % 2 == 1
        w.redelivered = i % 3 == 1
        ev.append(w)
        ev.append(
            tq.q(3, t + 13 * MS, f"UPDATE instances SET vm_state = 'x' WHERE uuid = '{UUID}'")
        )
        if i % 3 == 0:
            r = tc.publish(2, t + 14 * MS, "reply_q", props={"correlation_id": f"c{i}"})
            ev.append(r)
        if not w.no_ack:
            ev.append(
                AmqpSettle(t + 15 * MS, 2, 1, i + 1, False, "ack" if i % 6 else "reject", True)
            )
        ev.append(
            AmqpGetOk(
                t + 16 * MS,
                2,
                2,
                i + 1,
                False,
                "",
                "q",
                "q",
                True,
                0,
                {},
                None,
                10,
                t + 17 * MS,
                None,
                tc.tid(),
                tc.sid(),
            )
        )
        ev.append(AmqpSettle(t + 18 * MS, 1, 1, i + 1, i % 7 == 0, "ack", None))
        if i == n // 2:
            ev.append(AmqpMethod(t + 19 * MS, 2, 2, "s2c", "Channel.Close", {"reply_code": 406}))
    end = T + (n + 2) * 50 * MS
    ev += [ConnClose(end, c, "client closed", "client", 0, 0) for c in (1, 2, 3)]
    return sorted(ev, key=lambda e: e.ts)


def _fields(spans: list[Span]) -> list[tuple[Any, ...]]:
    """Every field of every span, dicts as their items (their order counts too)."""
    out = []
    for s in spans:
        d = s.as_dict()
        for k in ("attrs", "resource"):
            d[k] = list(d[k].items())
        d["links"] = [(x["trace_id"], x["span_id"], list(x["attrs"].items())) for x in d["links"]]
        d["events"] = [(x["ts"], x["name"], list(x["attrs"].items())) for x in d["events"]]
        out.append(tuple(d.items()))
    return out


def _via_events(path: Path, **kw: Any) -> list[Span]:
    corr = Correlator(**kw)
    for ev in CaptureReader(path).events():
        corr._feed(ev)
    return corr._take() + corr.finish()


@pytest.mark.parametrize("prepared", [True, False])
def test_rows_give_exactly_the_spans_events_give(tmp_path: Path, prepared: bool) -> None:
    events = _mix()
    if prepared:  # as the capture writer stores them; else each is prepared when correlated
        for e in events:
            if e.needs_prepare:
                e.prepare()
    path = tmp_path / "cap.db"
    rec = Recorder(path)
    for k in range(0, len(events), 97):  # several chunks
        rec._write(events[k : k + 97])
    rec.close()
    opts = {"lag_ms": 20}
    expected = _via_events(path, options=opts)
    assert len(expected) > 500
    got = all_spans(CaptureReader(path), options=opts)
    assert _fields(got) == _fields(expected)
    # the method attributes this mix is meant to exercise
    methods = {s.attrs.get("sniff.correlation.method") for s in got}
    assert {"propagated", "paired", "shared_id", "timing", "none"} <= methods
    # batches of at least batch spans, each taken every 1024 events
    sizes = [len(b) for b in iter_spans(CaptureReader(path), options=opts, batch=100)]
    assert sum(sizes) == len(got) and all(n >= 100 for n in sizes[:-1])


def test_rows_of_other_layouts_become_events(tmp_path: Path) -> None:
    """Rows laid out by another sniff version (or unknown kinds) go through events."""
    from tests.unit.test_store import _write3_fields

    path = tmp_path / "other.db"
    names = ["ts", "conn", "listen_port", "proxy", "protocol_name", "client_addr"]
    names += ["client_port", "server_addr", "server_port", "listen_addr", "future_field"]
    q_names = ["ts", "conn", "db_system", "database", "command", "text", "keep_literals"]
    q_names += ["ts_end", "status", "error_code", "error_message", "rows_returned"]
    q_names += ["rows_affected", "span_id", "operation", "summary"]  # no tables, ids...
    fields = {"core.conn_open": names, "mysql.query": q_names, "future.thing": ["ts", "conn"]}
    rows: list[list[Any]] = [
        ["core.conn_open", 10, 1, 13306, "mariadb", "mysql", "10.0.0.1", 4000, "db", 3306, "", 0],
        ["future.thing", 15, 1],
        [
            *("mysql.query", 20, 1, "mariadb", "nova", "COM_QUERY", "SELECT ?", True, 30, "ok"),
            *(None, None, 1, None, "00000000000000aa", "SELECT", "SELECT"),
        ],
    ]
    _write3_fields(path, fields, rows)
    (span,) = all_spans(CaptureReader(path))
    assert _fields([span]) == _fields(_via_events(path))
    assert span.attrs["server.port"] == 3306 and span.name == "SELECT"


def test_a_format_2_capture_gives_the_same_spans(tmp_path: Path) -> None:
    from tests.unit.test_store import _write2

    events = _mix(10)
    for e in events:
        if e.needs_prepare:
            e.prepare()
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    rec = Recorder(new)
    rec._write(events)
    rec.close()
    _write2(old, [events[:150], events[150:]])
    assert CaptureReader(old).format == "2"
    opts = {"lag_ms": 20}
    spans = _fields(all_spans(CaptureReader(old), options=opts))
    assert len(spans) > 100
    assert spans == _fields(_via_events(old, options=opts))
    assert spans == _fields(all_spans(CaptureReader(new), options=opts))
