"""kombu (what OpenStack's oslo.messaging uses) through sniff against RabbitMQ."""

from __future__ import annotations

import os
from typing import Any

import kombu

from tests.integration.amqp.conftest import assert_linked, by_kind, qname, sha


def test_kombu_topic_exchange_publish_consume(sniff_amqp: Any) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{sniff_amqp.port()}//"
    ex_name = qname("nova")
    exchange = kombu.Exchange(ex_name, type="topic", durable=False, auto_delete=True)
    queue = kombu.Queue(qname("compute"), exchange, routing_key="compute.host1", auto_delete=True)
    bodies = [
        {
            "method": "build_instance",
            "args": {"n": i, "blob": os.urandom(8).hex()},
            "_context_request_id": f"req-{i:04d}",
            "_unique_id": os.urandom(8).hex(),
        }
        for i in range(10)
    ]
    with kombu.Connection(
        url, transport_options={"client_properties": {"connection_name": "nova-conductor"}}
    ) as conn:
        producer = conn.Producer(serializer="json")
        with conn.Consumer(queue, accept=["json"]) as consumer:  # declares the binding
            received: list[Any] = []
            consumer.register_callback(lambda body, msg: (received.append((body, msg)), msg.ack()))
            for b in bodies:
                producer.publish(
                    b,
                    exchange=exchange,
                    routing_key="compute.host1",
                    declare=[queue],
                    headers={"x-origin": "scheduler"},
                )
            while len(received) < len(bodies):
                conn.drain_events(timeout=10)
    assert [r[0] for r in received] == bodies
    tps = []
    for body, msg in received:
        headers = dict(msg.headers)
        tps.append(headers.pop("traceparent"))
        assert headers == {"x-origin": "scheduler"}
        # the bytes the consumer got are the bytes kombu serialised for the publish
        _, _, expected = kombu.serialization.dumps(body, serializer="json")
        raw = msg.body.encode() if isinstance(msg.body, str) else msg.body
        assert sha(raw) == sha(expected.encode() if isinstance(expected, str) else expected)
    sniff_amqp.stop()
    spans = sniff_amqp.spans()
    assert_linked(spans, tps)
    prod = by_kind(spans, "PRODUCER")[0]
    assert prod.attrs["messaging.destination.name"] == f"{ex_name}:compute.host1"
    assert prod.name == f"{ex_name}:compute.host1 send"
    assert prod.service == "nova-conductor"
