"""Relay glue for the HTTP/1 fast path, in both ``decode`` modes.

``decode = "inline"``: :class:`HttpHandler` runs the whole
:class:`~proxies.http.decoder.Http1Decoder` on the relay. The client direction
is *rewritten* when injection is on (the decoder holds a partial head and adds
the ``traceparent`` line); otherwise both directions are observed after
forwarding. The decoder's methods are bound straight onto the handler so the
relay calls them without an extra Python frame per chunk.

``decode = "capture"`` (the default): :class:`HttpCaptureHandler` does on the
relay only what injection needs (:class:`~proxies.http.injector.Http1Injector`)
and ships a copy of every forwarded chunk; :class:`HttpRawDecoder` runs the same
``Http1Decoder`` over those copies in the capture process, clocked by each
chunk's timestamp (see :mod:`sniff.decode_host`), so the events are those the
inline mode would have emitted.

``meta`` of a shipped client chunk (server chunks carry none) is ``None``, or
the one traceparent line the relay inserted in it (``bytes``: the 72 bytes
``traceparent: 00-<trace>-<span>-01`` CRLF CRLF that end the head), or a tuple
of, in order: an ``int`` (the time the first byte of the chunk's first head
arrived, when the relay had to hold that head), the lines inserted (``bytes``),
and a ``str`` when the relay stopped injecting on the connection (why). The
capture side removes the lines to get the client's own bytes back, tells the
decoder where each was inserted (so its exchanges carry the ids the upstream
received, and their recorded heads are the client's), and feeds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from proxies.http.decoder import _HEAD, _TUNNEL, ANNOUNCE_AFTER_NS, Http1Decoder
from proxies.http.injector import Http1Injector
from sniff.events import Note
from sniff.relay import ConnContext, Handler


class HttpHandler(Handler):
    """``decode = "inline"``: the full decoder on the relay."""

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


class HttpCaptureHandler(Handler):
    """``decode = "capture"``: inject in-line, ship copies, decode nothing here.

    Without injection both directions are only shipped. With it, client chunks
    go through the injector, and server chunks are only shipped, except while a
    protocol switch awaits its answer (the injector then reads status lines)."""

    observe = True

    def __init__(self, ctx: ConnContext, settings: dict[str, Any]) -> None:
        super().__init__(ctx)
        ship = ctx.ship
        # server chunks are only shipped: with the C shipper the relay then forwards and
        # ships them without a Python call (sniff.relay fast mode), except while watching
        self._s2c_plain: Callable[[bytes], None] = ctx.shipper(1)
        self.s2c = self._s2c_plain  # type: ignore[assignment]
        self.injector: Http1Injector | None = None
        if ctx.proxy.inject:
            self.rewrite_c2s = True
            inj = self.injector = Http1Injector(
                ship,
                ctx.send_to_server,
                self._watch,
                max_head=settings.get("max_head", 64 * 1024),
                clock=settings.get("clock", time.time_ns),  # a fake clock in tests
                tagger=getattr(ctx.shipper(0), "tag_head", None),
            )
            self.c2s = inj.feed_client  # type: ignore[method-assign]
            self.flush_c2s = inj.flush_client  # type: ignore[method-assign]
            if inj.tagger is not None:  # its commonest chunk in C (sniff.relay._head_on)
                self.head = (inj, inj.tagger, _HEAD)
        else:
            self.c2s = ctx.shipper(0)  # type: ignore[assignment]

    def _watch(self, on: bool) -> None:
        assert self.injector is not None
        self.s2c = self.injector.feed_server if on else self._s2c_plain  # type: ignore[assignment]


class HttpRawDecoder:
    """Capture side of ``decode = "capture"``: the full decoder over shipped copies.

    The decoder is made on the first chunk: connections of the proxy that take
    mitmproxy or passthrough ship nothing and cost only this object."""

    __slots__ = ("d", "make")

    def __init__(self, make: Callable[[], Http1Decoder]) -> None:
        self.make = make
        self.d: Http1Decoder | None = None

    def feed(self, direction: int, data: bytes, meta: Any) -> None:
        d = self.d
        if d is None:
            d = self.d = self.make()
        if direction:
            d.feed_server(data)
        elif meta is None:
            d.feed_client(data)
        else:
            self._client(d, data, meta)

    def _client(self, d: Http1Decoder, data: bytes, meta: Any) -> None:
        told = d.told
        if meta.__class__ is bytes:
            if told is not None and data.endswith(meta):
                # the commonest chunk: one head, with the line at its end
                n = len(data) - len(meta)
                told.append((d.c_total + n, meta))
                d.feed_client(data[:n] + b"\r\n")
                if d.cstate >= _TUNNEL:
                    told.clear()
                return
            items: Any = (meta,)
        else:
            items = meta
        stop = None
        parts: list[bytes] = []
        start = 0
        removed = 0
        base = d.c_total  # the stream offset of data[0], in the client's own bytes
        for it in items:
            if it.__class__ is bytes:
                i = data.find(it, start)
                if i < 0:
                    raise ValueError("a traceparent line the relay reported is not in its chunk")
                parts.append(data[start:i])
                if told is not None:
                    told.append((base + i - removed, it))
                cut = len(it) - 2  # the line; the head's final CRLF stays
                start = i + cut
                removed += cut
            elif it.__class__ is int:
                if not d.chold:
                    d.chold_ts = it
            else:
                stop = str(it)
        if parts:
            parts.append(data[start:])
            data = b"".join(parts)
        d.feed_client(data)
        if d.cstate >= _TUNNEL:
            if told:
                told.clear()  # nothing here parses heads any more
        elif stop is not None:
            d.emit(
                Note(
                    d.clock(),
                    d.conn,
                    "http.inject_stopped",
                    f"the relay stopped adding traceparent on this connection ({stop}); "
                    "its requests are still decoded",
                )
            )

    def tick(self, now: int) -> None:
        """About once a second: emit the exchanges held for batching, and announce
        requests in flight for more than a second (HttpRequest)."""
        d = self.d
        if d is not None:
            d.flush_events()
            d.announce(now - ANNOUNCE_AFTER_NS)

    def closed(self, reason: str) -> None:
        if self.d is not None:
            self.d.closed(reason)
