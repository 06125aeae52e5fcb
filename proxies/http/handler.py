"""Relay glue for the HTTP/1 fast path: a :class:`sniff.relay.Handler` around
:class:`~proxies.http.decoder.Http1Decoder`.

The client direction is *rewritten* when injection is on (the decoder holds a
partial head and adds the ``traceparent`` line); otherwise both directions are
observed after forwarding. The decoder's methods are bound straight onto the
handler so the relay calls them without an extra Python frame per chunk.
"""

from __future__ import annotations

from typing import Any

from proxies.http.decoder import Http1Decoder
from sniff.relay import ConnContext, Handler


class HttpHandler(Handler):
    observe = True

    def __init__(self, ctx: ConnContext, settings: dict[str, Any]) -> None:
        super().__init__(ctx)
        inject = ctx.proxy.inject
        self.rewrite_c2s = inject
        d = Http1Decoder(
            ctx.conn_id,
            ctx.sink.emit,
            proxy=ctx.proxy.name,
            scheme=settings.get("scheme", "http"),
            inject=inject,
            rewrite=inject,
            release=ctx.send_to_server,
            user_agents=settings.get("user_agents"),
            max_head=settings.get("max_head", 64 * 1024),
            policy=settings.get("policy"),
        )
        self.decoder = d
        self.c2s = d.feed_client  # type: ignore[method-assign]
        self.s2c = d.feed_server  # type: ignore[method-assign]
        self.flush_c2s = d.flush_client  # type: ignore[method-assign]
        self.closed = d.closed  # type: ignore[method-assign]
