"""pika (blocking) through sniff against the real RabbitMQ."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pika
import pytest

from sniff.ids import parse_traceparent
from tests.integration.amqp.conftest import assert_linked, by_kind, qname, sha

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def connect(port: int, name: str = "test-pika") -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1", port, client_properties={"connection_name": name}, heartbeat=0
        )
    )


def full_props(headers: dict[str, Any] | None) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/octet-stream",
        content_encoding="identity",
        headers=headers,
        delivery_mode=2,
        priority=5,
        correlation_id="corr-1",
        reply_to="nowhere",
        expiration="600000",
        message_id="msg-1",
        timestamp=1_700_000_000,
        type="kind",
        user_id="guest",
        app_id="sniff-tests",
    )


def same_props(sent: pika.BasicProperties, got: pika.BasicProperties, injected: bool) -> None:
    for name in (
        "content_type",
        "content_encoding",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
    ):
        assert getattr(got, name) == getattr(sent, name), name
    headers = dict(got.headers or {})
    tp = headers.pop("traceparent", None)
    assert headers == dict(sent.headers or {})
    if injected:
        assert parse_traceparent(tp) is not None


@pytest.mark.parametrize("confirms", [False, True], ids=["no-confirms", "confirms"])
def test_publish_consume_sizes_and_properties(sniff_amqp: Any, confirms: bool) -> None:
    q = qname("pika")
    conn = connect(sniff_amqp.port())
    ch = conn.channel()
    ch.queue_declare(q, auto_delete=True)
    if confirms:
        ch.confirm_delivery()
    bodies = [b"", os.urandom(1024), os.urandom(4 * 1024 * 1024)]
    sent = []
    for i, body in enumerate(bodies):
        headers = (
            None if i == 0 else {"i": i, "s": "x" * 10, "nested": {"k": [1, "two"]}, "neg": -5}
        )
        props = full_props(headers)
        ch.basic_publish("", q, body, props)
        sent.append((props, body))
    received: list[tuple[pika.BasicProperties, bytes]] = []

    def on_msg(c: Any, m: Any, p: pika.BasicProperties, b: bytes) -> None:
        received.append((p, b))
        c.basic_ack(m.delivery_tag)

    ch.basic_consume(q, on_msg)
    deadline = time.time() + 20
    while len(received) < 3 and time.time() < deadline:
        conn.process_data_events(0.1)
    conn.close()
    assert len(received) == 3
    tps = []
    for (sp, sb), (gp, gb) in zip(sent, received, strict=True):
        assert sha(gb) == sha(sb)
        same_props(sp, gp, injected=True)
        tps.append(gp.headers["traceparent"])
    sniff_amqp.stop()
    spans = sniff_amqp.spans()
    assert_linked(spans, tps)
    prods = by_kind(spans, "PRODUCER")
    assert [p.attrs["messaging.message.body.size"] for p in prods] == [0, 1024, 4 * 1024 * 1024]
    p = prods[1]
    assert p.service == "test-pika" and p.name == f"amq.default:{q} send"
    assert p.attrs["messaging.destination.name"] == f"amq.default:{q}"
    assert p.attrs["messaging.rabbitmq.destination.routing_key"] == q
    assert p.attrs["messaging.message.id"] == "msg-1"
    assert p.attrs["messaging.message.conversation_id"] == "corr-1"
    assert p.attrs["messaging.operation.type"] == "send"
    assert p.attrs["server.port"] == 5672 and p.attrs["network.peer.port"] == 5672
    if confirms:
        assert any(e.name == "confirmed" for e in p.events)
    c = by_kind(spans, "CONSUMER")[1]
    assert c.attrs["messaging.rabbitmq.message.delivery_tag"] == 2
    assert c.attrs["messaging.destination.subscription.name"] == q
    assert c.attrs["sniff.amqp.settlement"] == "ack"


def test_existing_traceparent_is_kept(sniff_amqp: Any) -> None:
    q = qname("tp")
    conn = connect(sniff_amqp.port())
    ch = conn.channel()
    ch.queue_declare(q, auto_delete=True)
    ch.basic_publish("", q, b"hello", pika.BasicProperties(headers={"traceparent": TP, "other": 1}))
    _m, props, body = ch.basic_get(q, auto_ack=True)
    conn.close()
    assert props.headers == {"traceparent": TP, "other": 1} and body == b"hello"
    sniff_amqp.stop()
    spans = sniff_amqp.spans()
    prod = by_kind(spans, "PRODUCER")[0]
    assert prod.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert prod.parent_id == "00f067aa0ba902b7"  # our span sits under the application's
    assert prod.attrs["sniff.traceparent.injected"] is False
    cons = by_kind(spans, "CONSUMER")[0]
    assert cons.trace_id == prod.trace_id and cons.attrs["messaging.operation.type"] == "receive"


def test_basic_get_tx_and_several_channels(sniff_amqp: Any) -> None:
    conn = connect(sniff_amqp.port())
    chans = [conn.channel() for _ in range(4)]
    qs = [qname(f"ch{i}") for i in range(4)]
    for ch, q in zip(chans, qs, strict=True):
        ch.queue_declare(q, auto_delete=True)
    chans[0].tx_select()
    for round_ in range(5):  # interleave publishes over the channels
        for i, (ch, q) in enumerate(zip(chans, qs, strict=True)):
            ch.basic_publish("", q, f"{i}:{round_}".encode() * 100)
    chans[0].tx_commit()
    tps = []
    for ch, q in zip(chans, qs, strict=True):
        for round_ in range(5):
            m, props, body = ch.basic_get(q)
            assert m is not None and body.startswith(f"{qs.index(q)}:{round_}".encode())
            tps.append(props.headers["traceparent"])
            ch.basic_ack(m.delivery_tag)
    conn.close()
    sniff_amqp.stop()
    spans = sniff_amqp.spans()
    assert_linked(spans, tps)
    assert len(by_kind(spans, "PRODUCER")) == 20
    assert sum(1 for s in spans if s.attrs.get("sniff.amqp.tx")) == 5


def test_nack_and_reject_with_requeue(sniff_amqp: Any) -> None:
    q = qname("nack")
    conn = connect(sniff_amqp.port())
    ch = conn.channel()
    ch.queue_declare(q, auto_delete=True)
    ch.basic_publish("", q, b"a")
    ch.basic_publish("", q, b"b")
    seen: list[tuple[bytes, bool]] = []

    def on_msg(c: Any, m: Any, p: Any, b: bytes) -> None:
        seen.append((b, m.redelivered))
        if not m.redelivered:
            if b == b"a":
                c.basic_nack(m.delivery_tag, requeue=True)
            else:
                c.basic_reject(m.delivery_tag, requeue=True)
        else:
            c.basic_ack(m.delivery_tag)

    ch.basic_consume(q, on_msg)
    deadline = time.time() + 10
    while len(seen) < 4 and time.time() < deadline:
        conn.process_data_events(0.1)
    conn.close()
    assert sorted(seen) == [(b"a", False), (b"a", True), (b"b", False), (b"b", True)]
    sniff_amqp.stop()
    cons = by_kind(sniff_amqp.spans(), "CONSUMER")
    outcome = sorted((c.attrs["sniff.amqp.settlement"], c.status) for c in cons)
    assert outcome == [("ack", "UNSET"), ("ack", "UNSET"), ("nack", "ERROR"), ("reject", "ERROR")]
    assert all(
        c.attrs.get("sniff.amqp.requeue") for c in cons if c.attrs["sniff.amqp.settlement"] != "ack"
    )
    assert sum(1 for c in cons if c.attrs.get("sniff.amqp.redelivered")) == 2


_DYING_CONSUMER = """
import pika, sys, time
conn = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', int(sys.argv[1]), heartbeat=0,
    client_properties={'connection_name': 'doomed'}))
ch = conn.channel()
ch.basic_qos(prefetch_count=1)
def on_msg(c, m, p, b):
    print('got', flush=True)
    time.sleep(60)
ch.basic_consume(sys.argv[2], on_msg)
ch.start_consuming()
"""


def test_consumer_dies_mid_delivery(sniff_amqp: Any) -> None:
    q = qname("dies")
    conn = connect(sniff_amqp.port(), "survivor")
    ch = conn.channel()
    ch.queue_declare(q, auto_delete=False)
    ch.basic_publish("", q, b"work")
    doomed = subprocess.Popen(
        [sys.executable, "-c", _DYING_CONSUMER, str(sniff_amqp.port()), q],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert doomed.stdout is not None and doomed.stdout.readline().strip() == "got"
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    m = None
    deadline = time.time() + 10
    while m is None and time.time() < deadline:
        m, _props, body = ch.basic_get(q)
        time.sleep(0.05)
    assert m is not None and m.redelivered and body == b"work"
    ch.basic_ack(m.delivery_tag)
    ch.queue_delete(q)
    conn.close()
    sniff_amqp.stop()
    spans = sniff_amqp.spans()
    cons = by_kind(spans, "CONSUMER")
    dead = [c for c in cons if c.service == "doomed"]
    assert len(dead) == 1 and dead[0].status == "ERROR"
    assert "connection closed" in dead[0].status_message
    assert "settled" in dead[0].status_message
    redelivered = [c for c in cons if c.service == "survivor"]
    assert redelivered[0].attrs.get("sniff.amqp.redelivered")
    assert redelivered[0].parent_id == dead[0].parent_id  # the same message, the same producer
