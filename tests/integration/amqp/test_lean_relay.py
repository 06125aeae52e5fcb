"""The relay's AMQP lean mode in C (sniff._shipper.Tee.set_lean), in-process, in front of
the real RabbitMQ with aio-pika: once each socket's first chunk has gone through the
Python handler, both sockets run in C; publishes still gain a traceparent whose span id
travels with the shipped copy, an RPC reply continues its request's trace under the
consumer span the broker's side chose, and the shipped copies are the bytes forwarded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pamqp import frame as pamqp_frame

from proxies.amqp.decoder import AmqpShared
from proxies.amqp.handler import AmqpCaptureHandler, amqp_meta
from sniff import capture_proc, relay
from sniff.capture_proc import _unpack_raw
from sniff.config import Address, ProxyConfig
from tests.conftest import require_server
from tests.helpers import RawSink

pytestmark = pytest.mark.skipif(
    not relay.HAVE_C or capture_proc._PURE,
    reason="sniff._shipper is not built, or SNIFF_PURE_PYTHON=1 asks for the Python path",
)


def _content_headers(data: bytes) -> list[Any]:
    """The content-header frames of a whole AMQP stream (after the protocol header)."""
    out, pos = [], 8 if data.startswith(b"AMQP") else 0
    while pos < len(data):
        n, _ch, f = pamqp_frame.unmarshal(data[pos:])
        if f.name == "ContentHeader":
            out.append(f)
        pos += n
    return out


def test_lean_mode_tags_ships_and_continues_rpc_traces() -> None:
    require_server("rabbitmq")
    import aio_pika

    sink = RawSink()
    shared = AmqpShared()
    seen_lean: set[tuple[int, str]] = set()

    async def main() -> tuple[list[str], str, str]:
        cfg = ProxyConfig("mq", "amqp", Address("127.0.0.1", 0), Address("127.0.0.1", 5672))
        lst = relay.RelayListener(cfg, sink, lambda ctx: AmqpCaptureHandler(ctx, 4096, shared))
        await lst.start()

        def watch() -> None:
            for conn in lst.conns:
                for name, side in (("c", conn.c_side), ("s", conn.s_side)):
                    if side is not None and side.lean:
                        seen_lean.add((id(conn), name))

        url = f"amqp://guest:guest@127.0.0.1:{lst.port}/"
        client = await aio_pika.connect(url)
        worker = await aio_pika.connect(url)
        cch, wch = await client.channel(), await worker.channel()
        work = await wch.declare_queue("", exclusive=True)
        replies = await cch.declare_queue("", exclusive=True)
        got: list[str] = []

        async def serve(msg: Any) -> None:
            async with msg.process():
                got.append(msg.headers["traceparent"])
                if msg.reply_to:
                    await wch.default_exchange.publish(
                        aio_pika.Message(b"pong", correlation_id=msg.correlation_id),
                        routing_key=msg.reply_to,
                    )
            watch()

        await work.consume(serve)
        for i in range(3):  # plain publishes: with and without properties, one empty
            await cch.default_exchange.publish(
                aio_pika.Message(b"x" * i * 1000, headers={"k": i} if i else None),
                routing_key=work.name,
            )
            watch()
        await cch.default_exchange.publish(
            aio_pika.Message(b"ping", reply_to=replies.name, correlation_id="rpc-1"),
            routing_key=work.name,
        )
        reply = await replies.get(timeout=10, fail=True)
        assert reply is not None
        await reply.ack()
        watch()
        for _ in range(100):
            if len(got) == 4:
                break
            await asyncio.sleep(0.05)
        await client.close()
        await worker.close()
        await asyncio.sleep(0.1)
        await lst.stop()
        return got, got[-1], reply.headers["traceparent"]

    got, request_tp, reply_tp = asyncio.run(main())
    assert len(got) == 4
    assert len({conn for conn, _ in seen_lean}) == 2  # both connections went lean...
    assert {side for _, side in seen_lean} == {"c", "s"}  # ...on both sockets
    chunks: list[Any] = []
    _unpack_raw(sink._buf, chunks)
    metas = [(c.conn, c.direction, amqp_meta(c.meta)) for c in chunks if c.meta is not None]
    injected = {m for _, d, ms in metas if d == 0 for m in ms}
    spans = {m if isinstance(m, str) else m[0] for m in injected}
    # every traceparent a consumer saw was drawn by the relay and shipped with its copy
    assert {tp.split("-")[2] for tp in got} <= spans | {reply_tp.split("-")[2]}
    # the broker's side chose the consumer span of the request; the reply continues it
    assigned = [m for _, d, ms in metas if d == 1 for m in ms]
    trace = request_tp.split("-")[1]
    assert any(isinstance(a, tuple) and a[0] == trace for a in assigned)
    consumer_span = next(a[1] for a in assigned if isinstance(a, tuple) and a[0] == trace)
    assert reply_tp.split("-")[1] == trace
    assert (reply_tp.split("-")[2], consumer_span) in injected
    # nothing took the Python ship path (each connection's first chunks, in slow mode,
    # carried no ids); the shipped client copies parse as AMQP, every publish tagged once
    assert not sink.slow
    for conn in {c.conn for c in chunks}:
        sent = b"".join(c.data for c in chunks if c.conn == conn and c.direction == 0)
        headers = _content_headers(sent)
        assert headers
        for h in headers:
            assert "traceparent" in (h.properties.headers or {})
