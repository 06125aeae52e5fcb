"""Relay glue for AMQP: a :class:`sniff.relay.Handler` around :class:`AmqpDecoder`.

The client direction is *rewritten* only when injection is on (the decoder may
hold back a partial frame and replace a content header); otherwise both
directions are observed after forwarding.
"""

from __future__ import annotations

from proxies.amqp.decoder import AmqpDecoder, AmqpShared
from sniff.relay import ConnContext, Handler


class AmqpHandler(Handler):
    observe = True

    def __init__(
        self, ctx: ConnContext, shared: AmqpShared, body_head: int, keep_body: bool = False
    ) -> None:
        super().__init__(ctx)
        self.rewrite_c2s = ctx.proxy.inject
        self.decoder = AmqpDecoder(
            ctx.conn_id,
            ctx.emit,
            inject=ctx.proxy.inject,
            shared=shared,
            body_head=body_head,
            release=ctx.send_to_server,
            keep_body=keep_body,
            emit_fields=ctx.emit_fields,
        )
        self.c2s = self.decoder.feed_client  # type: ignore[method-assign]

    def s2c(self, data: bytes) -> bytes:
        self.decoder.feed_server(data)
        return data

    def flush_c2s(self) -> bytes:
        return self.decoder.flush_client()
