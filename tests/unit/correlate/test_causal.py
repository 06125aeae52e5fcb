"""The causal stage on synthetic event streams with a fake clock (event time)."""

from __future__ import annotations

import itertools
from typing import Any

from correlate.engine import Correlator
from correlate.model import Span
from proxies.amqp.events import AmqpDeliver, AmqpPublish, AmqpSettle
from sniff.events import ConnClose, ConnIdentity, ConnOpen, Event

MS = 1_000_000
_ids = itertools.count(1)


def sid() -> str:
    return f"{next(_ids):016x}"


def tid() -> str:
    return f"{next(_ids):032x}"


def conn_open(conn: int, ts: int, pid: int | None = None, name: str = "svc") -> list[Event]:
    out: list[Event] = [
        ConnOpen(
            ts,
            conn,
            "rabbitmq",
            "amqp",
            "127.0.0.1",
            40000 + conn,
            "127.0.0.1",
            5672,
            "127.0.0.1",
            5673,
        )
    ]
    out.append(ConnIdentity(ts, conn, "amqp.client_properties", {"connection_name": name}))
    if pid is not None:
        out.append(
            ConnIdentity(ts + 20 * MS, conn, "proc", {"pid": str(pid), "name": name, "host": "h"})
        )
    return out


def deliver(
    conn: int,
    ts: int,
    tag: int,
    body_ids: dict[str, str] | None = None,
    no_ack: bool = False,
    ch: int = 1,
    props: dict[str, Any] | None = None,
) -> AmqpDeliver:
    trace, span = tid(), sid()
    return AmqpDeliver(
        ts,
        conn,
        ch,
        "ctag",
        tag,
        False,
        "",
        "q",
        "q",
        no_ack,
        props or {},
        None,
        10,
        ts + MS,
        f"00-{trace}-{sid()}-01",
        trace,
        span,
        b"",
        body_ids,
    )


def publish(
    conn: int,
    ts: int,
    rk: str = "out",
    body_ids: dict[str, str] | None = None,
    props: dict[str, Any] | None = None,
) -> AmqpPublish:
    trace, span = tid(), sid()
    return AmqpPublish(
        ts,
        conn,
        1,
        "",
        rk,
        False,
        props or {},
        None,
        10,
        ts + MS,
        trace,
        span,
        None,
        f"00-{trace}-{span}-01",
        True,
        None,
        None,
        False,
        None,
        b"",
        body_ids,
    )


def settle(conn: int, ts: int, tag: int, ch: int = 1) -> AmqpSettle:
    return AmqpSettle(ts, conn, ch, tag, False, "ack", None)


def run(events: list[Event], **opts: Any) -> list[Span]:
    c = Correlator(options={"lag_ms": 500, **opts})
    out = c.feed_many(sorted(events, key=lambda e: e.ts))
    return out + c.finish()


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def test_timing_one_unit_in_flight() -> None:
    d = deliver(1, 100 * MS, 1)
    p = publish(1, 110 * MS)
    spans = by_id(run([*conn_open(1, 0, pid=7), d, p, settle(1, 120 * MS, 1)]))
    out = spans[p.span_id]
    assert out.parent_id == d.span_id
    assert out.trace_id == d.trace_id == spans[d.span_id].trace_id
    assert out.attrs["sniff.correlation.method"] == "timing"
    assert out.attrs["sniff.correlation.confidence"] == 1.0


def test_two_in_flight_gives_links_not_a_parent() -> None:
    d1, d2 = deliver(1, 100 * MS, 1), deliver(1, 101 * MS, 2)
    p = publish(1, 110 * MS)
    spans = by_id(
        run([*conn_open(1, 0, pid=7), d1, d2, p, settle(1, 120 * MS, 1), settle(1, 121 * MS, 2)])
    )
    out = spans[p.span_id]
    assert out.parent_id is None
    assert out.attrs["sniff.correlation.confidence"] == 0.5
    assert {lk.span_id for lk in out.links} == {d1.span_id, d2.span_id}
    assert all(lk.attrs["sniff.correlation.confidence"] == 0.5 for lk in out.links)


def test_shared_id_decides_among_several() -> None:
    d1 = deliver(1, 100 * MS, 1, body_ids={"json._context_request_id": "req-a"})
    d2 = deliver(1, 101 * MS, 2, body_ids={"json._context_request_id": "req-b"})
    p = publish(1, 110 * MS, body_ids={"json._context_request_id": "req-b"})
    spans = by_id(
        run([*conn_open(1, 0, pid=7), d1, d2, p, settle(1, 120 * MS, 1), settle(1, 121 * MS, 2)])
    )
    out = spans[p.span_id]
    assert out.parent_id == d2.span_id and out.attrs["sniff.correlation.method"] == "shared_id"


def test_shared_id_reaches_a_unit_that_already_ended() -> None:
    # an early-acking consumer (oslo.messaging acks RPC requests on receipt)
    d = deliver(1, 100 * MS, 1, body_ids={"json._context_request_id": "req-z"})
    p = publish(1, 300 * MS, body_ids={"json._context_request_id": "req-z"})
    spans = by_id(run([*conn_open(1, 0, pid=7), d, settle(1, 101 * MS, 1), p]))
    assert spans[p.span_id].parent_id == d.span_id


def test_weak_id_alone_never_decides() -> None:
    d = deliver(1, 100 * MS, 1, body_ids={"json._reply_q": "~reply_abc"})
    p = publish(1, 300 * MS, body_ids={"json._reply_q": "~reply_abc"})
    spans = by_id(run([*conn_open(1, 0, pid=7), d, settle(1, 101 * MS, 1), p]))
    assert spans[p.span_id].parent_id is None
    assert spans[p.span_id].attrs["sniff.correlation.method"] == "none"


def test_components_are_processes_resolved_after_the_fact() -> None:
    # two connections, two processes; the /proc answer comes 20 ms after each connection
    d = deliver(1, 100 * MS, 1)
    p_same = publish(2, 110 * MS)  # pid 7 too: same component as conn 1
    p_other = publish(3, 111 * MS)  # pid 8: another component, nothing in flight
    spans = by_id(
        run(
            [
                *conn_open(1, 0, pid=7),
                *conn_open(2, 0, pid=7, name="other-name"),
                *conn_open(3, 0, pid=8),
                d,
                p_same,
                p_other,
                settle(1, 120 * MS, 1),
            ]
        )
    )
    assert spans[p_same.span_id].parent_id == d.span_id
    assert spans[p_other.span_id].parent_id is None


def test_rpc_reply_is_a_response_not_a_unit() -> None:
    call = publish(1, 100 * MS, rk="rpc", props={"reply_to": "rq", "correlation_id": "c1"})
    reply = deliver(1, 110 * MS, 1, props={"correlation_id": "c1"})
    reply.routing_key = "rq"
    after = publish(1, 115 * MS, rk="cast")
    spans = by_id(run([*conn_open(1, 0, pid=7), call, reply, after, settle(1, 130 * MS, 1)]))
    assert spans[reply.span_id].attrs.get("sniff.amqp.rpc_response") is True
    assert spans[after.span_id].parent_id is None  # the reply did not become its parent


def test_no_ack_unit_ends_at_next_delivery() -> None:
    d1 = deliver(1, 100 * MS, 1, no_ack=True)
    p1 = publish(1, 105 * MS)
    d2 = deliver(1, 110 * MS, 2, no_ack=True)
    p2 = publish(1, 115 * MS)
    spans = by_id(run([*conn_open(1, 0, pid=7), d1, p1, d2, p2]))
    assert spans[p1.span_id].parent_id == d1.span_id
    assert spans[p2.span_id].parent_id == d2.span_id


def test_attached_call_moves_its_consumers_into_the_root_trace() -> None:
    d = deliver(1, 100 * MS, 1)
    p = publish(1, 110 * MS)
    # downstream: another process consumes p (its traceparent names p's wire trace)
    downstream = deliver(2, 130 * MS, 1)
    downstream.traceparent = p.traceparent
    downstream.trace_id = p.trace_id
    spans = by_id(
        run(
            [
                *conn_open(1, 0, pid=7),
                *conn_open(2, 0, pid=8),
                d,
                p,
                settle(1, 120 * MS, 1),
                downstream,
                settle(2, 140 * MS, 1),
            ]
        )
    )
    root_trace = spans[d.span_id].trace_id
    assert spans[p.span_id].trace_id == root_trace
    assert spans[downstream.span_id].trace_id == root_trace
    assert spans[downstream.span_id].parent_id == p.span_id


def test_state_is_bounded() -> None:
    c = Correlator(options={"lag_ms": 100, "recent_s": 1})
    events: list[Event] = [*conn_open(1, 0, pid=7)]
    for i in range(2000):
        t = (i + 1) * 10 * MS
        events += [deliver(1, t, i + 1), publish(1, t + MS), settle(1, t + 2 * MS, i + 1)]
    spans = c.feed_many(events)
    assert len(c.causal.units) < 200  # ended units are forgotten after recent_s
    assert len(c.causal._held) < 50
    spans += c.finish()
    assert len(spans) == 4000
    assert c.causal.stats["timing"] == 2000


def test_conn_close_ends_units() -> None:
    d = deliver(1, 100 * MS, 1)
    p = publish(2, 300 * MS)  # same process, after the consumer's connection died
    events = [
        *conn_open(1, 0, pid=7),
        *conn_open(2, 0, pid=7),
        d,
        ConnClose(200 * MS, 1, "client closed", "client", 1, 1),
        p,
    ]
    spans = by_id(run(events))
    assert spans[d.span_id].status == "ERROR"
    assert spans[p.span_id].parent_id is None
