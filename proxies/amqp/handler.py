"""Relay glue for AMQP: a :class:`sniff.relay.Handler` around :class:`AmqpDecoder`.

The client direction is *rewritten* only when injection is on (the decoder may
hold back a partial frame and replace a content header); otherwise both
directions are observed after forwarding.
"""

from __future__ import annotations

from typing import Any

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


def _nothing(*_: object) -> None:
    return None


class AmqpCaptureHandler(Handler):
    """``decode = "capture"``: the event loop only tags publishes (when ``inject``)
    and ships a copy of both streams; :class:`AmqpRawDecoder` decodes them in the
    capture process. To tag an RPC reply with its request's trace, the broker's
    stream is scanned for delivered requests (reply_to and correlation_id): the
    ids chosen for them here go with the chunk, and the capture process uses them."""

    observe = True

    def __init__(self, ctx: ConnContext, body_head: int, shared: AmqpShared | None = None) -> None:
        super().__init__(ctx)
        self.rewrite_c2s = ctx.proxy.inject
        self.injector = (
            AmqpDecoder(ctx.conn_id, _nothing, inject=True, emit_fields=_nothing, lean=True,
                        release=self._release, shared=shared)
            if ctx.proxy.inject else None
        )  # fmt: skip
        self._ship0 = ctx.shipper(0)
        self._ship1 = ctx.shipper(1)
        if self.injector is not None:  # the relay may run c2s/s2c below in C (lean mode)
            self.lean = (self.injector, self._ship0, self._ship1)

    def _release(self, data: bytes) -> None:  # held bytes let go after a decode failure
        self.ctx.send_to_server(data)
        self.ctx.ship(0, data)

    def c2s(self, data: bytes) -> bytes:
        inj = self.injector
        if inj is None:
            self._ship0(data)
            return data
        out = inj.feed_client(data)
        if out:
            meta = inj.take_injected()
            if meta is None:
                self._ship0(out)
            else:
                self.ctx.ship(0, out, meta)
        return out

    def s2c(self, data: bytes) -> bytes:
        inj = self.injector
        if inj is None:
            self._ship1(data)
            return data
        inj.scan_server(data)
        meta = inj.take_assigned()
        if meta is None:
            self._ship1(data)
        else:
            self.ctx.ship(1, data, meta)
        return data

    def flush_c2s(self) -> bytes:
        held = self.injector.flush_client() if self.injector is not None else b""
        if held:
            self.ctx.ship(0, held)
        return held


def amqp_meta(meta: bytes) -> list[str | tuple[str, str]]:
    """The ids the relay's C lean mode ships with a chunk (``sniff/_shipper.c``,
    ``take_meta``): ``;``-separated, a pair written ``a:b``; as the Python handler's lists."""
    out: list[str | tuple[str, str]] = []
    for item in meta.decode("ascii").split(";"):
        a, sep, b = item.partition(":")
        out.append((a, b) if sep else a)
    return out


class AmqpRawDecoder:
    """Capture side of ``decode = "capture"``: the full decoder over shipped copies."""

    def __init__(self, decoder: AmqpDecoder) -> None:
        self.d = decoder

    def feed(self, direction: int, data: bytes, meta: Any) -> None:
        d = self.d
        if meta.__class__ is bytes:  # from the relay's lean mode in C
            meta = amqp_meta(meta)
        if direction == 0:
            if meta:  # span ids the proxy injected; (span id, request span id) for replies
                own = d.sniff_injected
                for it in meta:
                    if it.__class__ is str:
                        own[it] = None
                    else:
                        own[it[0]] = it[1]
            d.feed_client(data)
        else:
            if meta:  # (trace id, span id) the proxy gave delivered RPC requests
                d.relay_assigned.extend(meta)
            d.feed_server(data)

    def closed(self, reason: str) -> None:
        """Nothing held: the correlator ends in-flight deliveries at the ConnClose."""
