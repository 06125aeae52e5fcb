"""SQL events -> CLIENT spans, on synthetic event lists with event-time clocks."""

from __future__ import annotations

import itertools
from typing import Any

from correlate.engine import Correlator
from correlate.model import Span
from correlate.sql import derived_trace_id
from proxies.amqp.events import AmqpDeliver, AmqpSettle
from proxies.mysql.events import MysqlCommand
from proxies.sql.events import MysqlQuery, PostgresQuery
from sniff.events import ConnIdentity, ConnOpen, Event

MS = 1_000_000
_ids = itertools.count(1)


def sid() -> str:
    return f"{next(_ids):016x}"


def opened(
    conn: int, proto: str = "mysql", port: int = 3306, addr: str = "10.0.0.5"
) -> list[Event]:
    return [
        ConnOpen(
            0,
            conn,
            "mariadb" if proto == "mysql" else proto,
            proto,
            addr,
            40000 + conn,
            "10.0.0.9",
            port,
            "127.0.0.1",
            13306,
        ),
        ConnIdentity(0, conn, "mysql.login", {"user": "nova", "database": "nova"}),
        ConnIdentity(0, conn, "mysql.connect_attrs", {"program_name": "nova-conductor"}),
    ]


def q(conn: int, ts: int, text: str, **kw: Any) -> MysqlQuery:
    fields: dict[str, Any] = {
        "db_system": "mariadb",
        "database": "nova",
        "command": "COM_QUERY",
        "text": text,
        "keep_literals": False,
        "ts_end": ts + 2 * MS,
        "status": "ok",
        "error_code": None,
        "error_message": None,
        "rows_returned": None,
        "rows_affected": None,
        "span_id": sid(),
    }
    fields.update(kw)
    return MysqlQuery(ts, conn, **fields)


def run(events: list[Event], services: dict[str, str] | None = None) -> list[Span]:
    c = Correlator(services=services, options={"lag_ms": 100})
    for e in events:
        if e.needs_prepare:
            e.prepare()
    # (copy: the engine hands back its own empty output list when nothing was released)
    return list(c.feed_many(sorted(events, key=lambda e: e.ts))) + list(c.finish())


def test_one_client_span_per_statement_with_db_attributes() -> None:
    e = q(1, 10 * MS, "SELECT * FROM instances WHERE uuid = 'abc'", rows_returned=1)
    (span,) = run([*opened(1), e])
    a = span.attrs
    assert span.kind == "CLIENT" and span.name == "SELECT instances"
    assert span.start == 10 * MS and span.end == 12 * MS
    assert a["db.system.name"] == "mariadb" and a["db.namespace"] == "nova"
    assert a["db.operation.name"] == "SELECT" and a["db.collection.name"] == "instances"
    assert a["db.query.text"] == "SELECT * FROM instances WHERE uuid = ?"
    assert a["db.query.summary"] == "SELECT instances" and a["db.response.returned_rows"] == 1
    assert a["server.address"] == "10.0.0.9" and a["server.port"] == 3306
    assert a["network.peer.address"] == "10.0.0.9" and a["network.peer.port"] == 3306
    assert a["sniff.db.user"] == "nova" and span.service == "nova-conductor"
    assert span.parent_id is None and span.trace_id == derived_trace_id(e.span_id)
    assert span.status == "UNSET"


def test_error_sets_status_and_code() -> None:
    e = q(
        1,
        MS,
        "SELECT * FROM nope",
        status="error",
        error_code="1146",
        error_message="Table 'nova.nope' doesn't exist",
    )
    (span,) = run([*opened(1), e])
    assert span.status == "ERROR" and "doesn't exist" in span.status_message
    assert span.attrs["db.response.status_code"] == "1146" and span.attrs["error.type"] == "1146"


def test_joins_name_no_single_collection() -> None:
    e = q(1, MS, "SELECT * FROM a JOIN b ON a.id = b.a_id", rows_returned=3)
    (span,) = run([*opened(1), e])
    assert "db.collection.name" not in span.attrs
    assert span.attrs["sniff.db.tables"] == ["a", "b"] and span.name == "SELECT a b"


def test_application_traceparent_makes_a_child() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    e = q(1, MS, f"SELECT 1 /*traceparent='{tp}'*/")
    (span,) = run([*opened(1), e])
    assert span.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent_id == "b7ad6b7169203331"
    assert span.attrs["sniff.correlation.method"] == "propagated"


def test_sniffs_own_tag_names_the_trace_not_a_parent() -> None:
    span_id = sid()
    trace = "1" * 32
    e = q(
        1,
        MS,
        "SELECT 1",
        span_id=span_id,
        trace_id=trace,
        injected=True,
        traceparent=f"00-{trace}-{span_id}-01",
    )
    (span,) = run([*opened(1), e])
    assert span.trace_id == trace and span.parent_id is None
    assert span.attrs["sniff.traceparent.injected"] is True


def test_literals_kept_when_configured_and_parameters_exported() -> None:
    e = q(
        1,
        MS,
        "SELECT * FROM t WHERE id = ?",
        command="COM_STMT_EXECUTE",
        keep_literals=True,
        params=["42", None],
        statement_id="7",
    )
    (span,) = run([*opened(1), e])
    assert (
        span.attrs["db.query.parameter.0"] == "42" and span.attrs["db.query.parameter.1"] == "NULL"
    )
    assert span.attrs["sniff.db.statement_id"] == "7"


def test_multi_statement_batch() -> None:
    text = "INSERT INTO a VALUES (1); SELECT * FROM b"
    e1 = q(1, MS, text, batch=0, batch_size=2, rows_affected=1)
    e2 = q(1, 3 * MS, text, batch=1, batch_size=2, rows_returned=4)
    spans = {s.span_id: s for s in run([*opened(1), e1, e2])}
    assert spans[e1.span_id].attrs["db.operation.batch.size"] == 2
    assert spans[e1.span_id].name == "INSERT a" and spans[e2.span_id].name == "SELECT b"


def test_postgres_events_are_handled_too() -> None:
    e = PostgresQuery(
        MS,
        3,
        "postgresql",
        "keystone",
        "Query",
        "SELECT * FROM users WHERE id = 'x'",
        False,
        2 * MS,
        "error",
        "42P01",
        'relation "users" does not exist',
        None,
        None,
        sid(),
    )
    events: list[Event] = [
        ConnOpen(
            0, 3, "postgresql", "postgres", "10.0.0.7", 5000, "10.0.0.9", 5432, "127.0.0.1", 15432
        ),
        e,
    ]
    (span,) = run(events)
    assert span.attrs["db.system.name"] == "postgresql" and span.attrs["db.namespace"] == "keystone"
    assert span.attrs["db.response.status_code"] == "42P01" and span.status == "ERROR"


def test_commands_become_spans_except_the_unanswered() -> None:
    def cmd(name: str, ts: int) -> MysqlCommand:
        return MysqlCommand(ts, 1, "mariadb", "nova", name, ts + MS, "ok", None, None, sid())

    spans = run(
        [*opened(1), cmd("COM_PING", MS), cmd("COM_QUIT", 5 * MS), cmd("COM_STMT_CLOSE", 6 * MS)]
    )
    assert [s.name for s in spans] == ["PING"]
    assert spans[0].attrs["db.operation.name"] == "PING"


def _deliver(conn: int, ts: int, tag: int) -> AmqpDeliver:
    trace, span = "a" * 31 + str(tag), sid()
    return AmqpDeliver(
        ts,
        conn,
        1,
        "ctag",
        tag,
        False,
        "",
        "q",
        "q",
        False,
        {},
        None,
        10,
        ts + MS,
        None,
        trace,
        span,
        b"",
        None,
    )


def test_statements_join_the_unit_of_work_of_their_component() -> None:
    # the same component (one address) consumes a message and runs a transaction meanwhile
    services = {"10.0.0.5": "nova-compute"}
    amqp = ConnOpen(
        0, 9, "rabbitmq", "amqp", "10.0.0.5", 50000, "10.0.0.8", 5672, "127.0.0.1", 5673
    )
    d = _deliver(9, 10 * MS, 1)
    stmts = [
        q(1, 11 * MS, "BEGIN", transaction=1),
        q(
            1,
            12 * MS,
            "UPDATE instances SET host = 'h' WHERE id = 1",
            transaction=1,
            rows_affected=1,
        ),
        q(1, 13 * MS, "COMMIT", transaction=1, transaction_end=True),
    ]
    settle = AmqpSettle(20 * MS, 9, 1, 1, False, "ack", None)
    spans = {s.span_id: s for s in run([amqp, *opened(1), d, *stmts, settle], services)}
    unit = spans[d.span_id]
    for st in stmts:
        s = spans[st.span_id]
        assert s.parent_id == unit.span_id and s.trace_id == unit.trace_id
        assert s.attrs["sniff.correlation.method"] == "timing"
    assert spans[stmts[1].span_id].service == "nova-compute"


def test_a_never_ending_transaction_is_not_held_forever() -> None:
    c = Correlator(options={"lag_ms": 100})
    for ev in opened(1):
        c.feed(ev)
    out: list[Span] = []
    e = q(1, MS, "SELECT 1", transaction=1)
    e.prepare()
    out += list(c.feed(e))
    # much later, no COMMIT ever came: the clock moves on and the span is released
    out += list(c.tick(120 * 10**9))
    assert [s.span_id for s in out] == [e.span_id]
