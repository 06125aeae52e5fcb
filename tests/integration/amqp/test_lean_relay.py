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
        # basic.get does not wait: poll until the worker's reply is in (up to 10 s)
        reply = None
        for _ in range(200):
            reply = await replies.get(timeout=10, fail=False)
            if reply is not None:
                break
            await asyncio.sleep(0.05)
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


def test_an_exception_in_lean_mode_fails_the_handler_not_the_connection() -> None:
    """A bug inside the C lean mode (here: the decoder's id list replaced by a tuple) is
    handled as a failing handler is in slow mode: recorded, passthrough from then on, and
    the connection keeps working with every byte relayed."""
    require_server("rabbitmq")
    import aio_pika

    from sniff.events import ProtocolError

    sink = RawSink()

    async def main() -> tuple[bytes, bool]:
        cfg = ProxyConfig("mq", "amqp", Address("127.0.0.1", 0), Address("127.0.0.1", 5672))
        lst = relay.RelayListener(cfg, sink, lambda ctx: AmqpCaptureHandler(ctx, 4096))
        await lst.start()
        conn = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{lst.port}/")
        ch = await conn.channel()
        q = await ch.declare_queue("", exclusive=True)
        (rc,) = lst.conns
        assert rc.s_side is not None and rc.s_side.lean
        assert rc.handler is not None and rc.handler.lean is not None
        rc.handler.lean[0].assigned_now = ()  # the next broker chunk fails in take_meta
        await ch.default_exchange.publish(aio_pika.Message(b"after"), routing_key=q.name)
        msg = await q.get(timeout=10, fail=True)
        assert msg is not None
        await msg.ack()
        lean_after = rc.s_side.lean or (rc.c_side is not None and rc.c_side.lean)
        await conn.close()
        await asyncio.sleep(0.1)
        await lst.stop()
        return msg.body, lean_after

    body, lean_after = asyncio.run(main())
    assert body == b"after"
    assert not lean_after
    errors = [e for e in sink.events if isinstance(e, ProtocolError)]
    assert any("internal decoder error: TypeError" in e.reason for e in errors)
