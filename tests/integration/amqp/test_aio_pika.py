"""aio-pika through sniff against the real RabbitMQ: confirms, RPC, concurrency."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aio_pika

from tests.integration.amqp.conftest import assert_linked, by_kind, qname, sha


async def connect(port: int, name: str) -> aio_pika.abc.AbstractRobustConnection:
    return await aio_pika.connect_robust(
        f"amqp://guest:guest@127.0.0.1:{port}/", client_properties={"connection_name": name}
    )


async def test_rpc_reply_is_linked_to_its_request(sniff_amqp: Any) -> None:
    port = sniff_amqp.port()
    rpc_q = qname("rpc")
    server_conn = await connect(port, "rpc-server")
    client_conn = await connect(port, "rpc-client")
    s_ch = await server_conn.channel()
    queue = await s_ch.declare_queue(rpc_q, auto_delete=True)
    request_tp: dict[str, str] = {}  # the traceparent each request reached the server with

    async def serve(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        request_tp[msg.correlation_id or ""] = str(msg.headers.get("traceparent"))
        async with msg.process():
            await s_ch.default_exchange.publish(
                aio_pika.Message(b"re:" + msg.body, correlation_id=msg.correlation_id),
                routing_key=msg.reply_to or "",
            )

    await queue.consume(serve)
    c_ch = await client_conn.channel()
    reply_q = await c_ch.declare_queue(exclusive=True)
    futures: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}

    async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        await msg.ack()
        futures[msg.correlation_id or ""].set_result(msg)

    await reply_q.consume(on_reply)
    loop = asyncio.get_running_loop()
    for i in range(5):
        futures[f"call-{i}"] = loop.create_future()
        await c_ch.default_exchange.publish(
            aio_pika.Message(f"req{i}".encode(), correlation_id=f"call-{i}", reply_to=reply_q.name),
            routing_key=rpc_q,
        )
    replies = await asyncio.wait_for(asyncio.gather(*futures.values()), 10)
    assert [r.body for r in replies] == [f"re:req{i}".encode() for i in range(5)]
    await client_conn.close()
    await server_conn.close()
    sniff_amqp.stop()
    spans = sniff_amqp.spans()
    by_id = {s.span_id: s for s in spans}
    for r in replies:
        corr = r.correlation_id
        request = next(
            s
            for s in by_kind(spans, "PRODUCER")
            if s.attrs.get("messaging.message.conversation_id") == corr
            and s.service == "rpc-client"
        )
        served = next(s for s in by_kind(spans, "CONSUMER") if s.parent_id == request.span_id)
        reply = next(
            s
            for s in by_kind(spans, "PRODUCER")
            if s.attrs.get("messaging.message.conversation_id") == corr
            and s.service == "rpc-server"
        )
        got = next(s for s in by_kind(spans, "CONSUMER") if s.parent_id == reply.span_id)
        # one trace: request -> served -> reply -> received by the caller
        assert served.service == "rpc-server" and got.service == "rpc-client"
        assert reply.parent_id == served.span_id
        assert reply.attrs["sniff.correlation.method"] == "paired"
        assert {request.trace_id, served.trace_id, reply.trace_id, got.trace_id} == {
            request.trace_id
        }
        assert by_id[got.parent_id] is reply
        # on the wire too (what another sniff process would see): the reply's tag
        # continues the request's trace, from sniff's span for the reply
        reply_tp = str(r.headers.get("traceparent"))
        assert reply_tp.split("-")[1] == request_tp[corr].split("-")[1]
        assert reply_tp.split("-")[2] == reply.span_id


async def test_confirms_and_concurrent_publishers(sniff_amqp: Any) -> None:
    port = sniff_amqp.port()
    q = qname("conc")
    conns = [await connect(port, f"pub-{i}") for i in range(4)]
    chans = [await c.channel(publisher_confirms=True) for c in conns]
    await chans[0].declare_queue(q, auto_delete=False)
    payloads = {f"{i}-{j}": os.urandom(100 + j * 37) for i in range(4) for j in range(50)}

    async def publish(i: int) -> None:
        ch = chans[i]
        await asyncio.gather(
            *(
                ch.default_exchange.publish(
                    aio_pika.Message(payloads[f"{i}-{j}"], message_id=f"{i}-{j}"), routing_key=q
                )
                for j in range(50)
            )
        )

    await asyncio.gather(*(publish(i) for i in range(4)))
    consumer = await connect(port, "consumer")
    cch = await consumer.channel()
    await cch.set_qos(prefetch_count=50)
    cq = await cch.get_queue(q)
    got: dict[str, str] = {}
    tps: list[str] = []
    done = asyncio.Event()

    async def on_msg(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        got[msg.message_id or ""] = sha(msg.body)
        tps.append(str((msg.headers or {})["traceparent"]))
        await msg.ack()
        if len(got) == len(payloads):
            done.set()

    await cq.consume(on_msg)
    await asyncio.wait_for(done.wait(), 20)
    await cq.delete(if_unused=False, if_empty=False)
    for c in [*conns, consumer]:
        await c.close()
    assert got == {k: sha(v) for k, v in payloads.items()}
    sniff_amqp.stop()
    spans = sniff_amqp.spans()
    assert_linked(spans, tps)
    prods = by_kind(spans, "PRODUCER")
    assert len(prods) == 200 and all(any(e.name == "confirmed" for e in p.events) for p in prods)
    assert {p.service for p in prods} == {f"pub-{i}" for i in range(4)}
