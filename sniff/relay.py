"""The TCP relay: bytes both ways, a protocol handler watching (and rarely editing).

Strategy. One :class:`RelayConnection` per accepted client, built on asyncio
``Protocol`` callbacks rather than streams: no task or await per chunk, so the
relay costs a few method calls per ``recv``. For each direction the protocol
handler says whether it *rewrites* (its return value is what gets forwarded,
used only where a deliberate tag may be added) or only *observes* (the chunk is
written to the other side first, then the handler decodes it). Everything else
is the plain relay:

- backpressure: when one side's write buffer passes the high-water mark, reading
  from the other side pauses until it drains;
- half-close: an EOF from one side is passed on with ``write_eof`` and the other
  direction keeps flowing until it ends too;
- an upstream that refuses, times out or dies closes the client promptly, with a
  logged reason and an :class:`~sniff.events.UpstreamError` or ``ConnClose``;
- a handler that raises is replaced by passthrough for that connection (a
  ``ProtocolError`` event is recorded); the process never dies of one connection.

Handlers are sans-IO objects; :class:`ConnContext` is all they can touch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from typing import Protocol as TypingProtocol

from sniff.config import Address, ProxyConfig
from sniff.events import (
    ConnClose,
    ConnOpen,
    Event,
    ProtocolError,
    ProxyStart,
    ProxyStop,
    UpstreamError,
    new_conn_id,
)

log = logging.getLogger("sniff.relay")

WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024


class EventSink(TypingProtocol):
    def emit(self, ev: Event) -> None: ...


def emit_fields_of(sink: Any) -> Callable[[type[Event], tuple[Any, ...]], None]:
    """The sink's ``emit_fields(cls, values)`` when it has one (the capture shipper takes
    positional field values without building the event), else build and ``emit``."""
    fn = getattr(sink, "emit_fields", None)
    if fn is not None:
        return fn  # type: ignore[no-any-return]
    emit = sink.emit
    return lambda cls, values: emit(cls(*values))


class Handler:
    """Per-connection protocol logic. The base class is pure passthrough.

    ``c2s``/``s2c`` get every chunk in order. When ``rewrite_c2s`` (``rewrite_s2c``)
    is true the return value is forwarded instead of the chunk (it may hold back a
    partial frame and return it later); otherwise the chunk was already forwarded
    and the return value is ignored. The flags are read on every chunk, so a
    handler may switch them (e.g. to passthrough after a protocol error).
    ``flush_c2s``/``flush_s2c`` return any held-back bytes at EOF or on failure.
    """

    rewrite_c2s: bool = False
    rewrite_s2c: bool = False
    observe: bool = False  # False: the relay never calls c2s/s2c (pure passthrough)
    # (decoder, client-side shipper, broker-side shipper): the AMQP capture handler's lean
    # loop, which the relay may run in C for both sockets (see RelayConnection._lean_on)
    lean: tuple[Any, Any, Any] | None = None
    # (injector, tagger, the injector's state between requests): the HTTP capture
    # handler's commonest client chunk, which the relay may take in C (_head_on)
    head: tuple[Any, Any, int] | None = None

    def __init__(self, ctx: ConnContext) -> None:
        self.ctx = ctx

    def c2s(self, data: bytes) -> bytes:
        return data

    def s2c(self, data: bytes) -> bytes:
        return data

    def flush_c2s(self) -> bytes:
        return b""

    def flush_s2c(self) -> bytes:
        return b""

    def closed(self, reason: str) -> None:
        """The connection ended (either side); finish any in-flight state."""


HandlerFactory = Callable[["ConnContext"], Handler]


class ConnContext:
    """What a handler may see and do: identity, events, side channels, close."""

    __slots__ = (
        "_emit_raw",
        "_relay",
        "client",
        "conn_id",
        "emit_fields",
        "gap",
        "listen",
        "proxy",
        "server",
        "sink",
    )

    def __init__(
        self,
        relay: RelayConnection,
        conn_id: int,
        proxy: ProxyConfig,
        client: tuple[str, int],
        server: tuple[str, int],
        listen: tuple[str, int],
        sink: EventSink,
    ) -> None:
        self._relay = relay
        self.conn_id = conn_id
        self.proxy = proxy
        self.client = client
        self.server = server
        self.listen = listen
        self.sink = sink
        self.emit_fields = emit_fields_of(sink)
        self._emit_raw = getattr(sink, "emit_raw", None)
        self.gap = False  # raw bytes were refused: this connection is no longer shipped

    @property
    def can_ship(self) -> bool:
        """The sink decodes shipped bytes elsewhere (``decode = "capture"``)."""
        return self._emit_raw is not None

    def ship(self, direction: int, data: bytes, meta: Any = None) -> None:
        """Ship a copy of forwarded bytes to be decoded in the capture process.
        If the capture queue refuses them, the connection's decoding stops there
        (a gap is recorded) and nothing more of it is shipped."""
        if self.gap or not data:
            return
        assert self._emit_raw is not None
        if not self._emit_raw(self.conn_id, direction, time.time_ns(), data, meta):
            self.gap = True
            from sniff.events import RawGap

            self.sink.emit(RawGap(time.time_ns(), self.conn_id, len(data)))

    def shipper(self, direction: int) -> Callable[[bytes], None]:
        """``ship(direction, data)`` as a one-argument callable, the cheapest the sink
        offers (the capture shipper's per-connection closure): for handlers that ship
        every chunk of a direction as it is."""
        make = getattr(self.sink, "raw_shipper", None)
        if make is not None:
            return make(self, direction)  # type: ignore[no-any-return]
        return partial(self.ship, direction)

    def emit(self, ev: Event) -> None:
        self.sink.emit(ev)

    def send_to_client(self, data: bytes) -> None:
        self._relay.write_client(data)

    def send_to_server(self, data: bytes) -> None:
        self._relay.write_server(data)

    def close(self, reason: str) -> None:
        """Close both sides after flushing what is already queued."""
        self._relay.close(reason, by="proxy")


try:  # data_received in C, with a fast mode for directions a handler only ships
    from sniff._shipper import Shipper as _Shipper
    from sniff._shipper import Tee as _TeeBase
except ImportError:  # no C compiler at install: the same protocol in Python, slow mode only
    _Shipper = None  # type: ignore[assignment,misc]

    class _TeeBase:  # type: ignore[no-redef]
        __slots__ = ("slow",)
        slow: Callable[[bytes], Any]
        fast = False
        lean = False
        head = False
        nbytes = 0

        def data_received(self, data: bytes) -> None:
            self.slow(data)

        def set_fast(self, write: Any, shipper: Any) -> None:
            raise NotImplementedError

        def set_lean(
            self, write: Any, shipper: Any, dec: Any, st: Any, rewrite: bool, err: Any = None
        ) -> None:
            raise NotImplementedError

        def set_head(self, write: Any, injector: Any, tagger: Any, head_state: int) -> None:
            raise NotImplementedError

        def fast_off(self) -> None:
            pass


HAVE_C = _Shipper is not None  # the C relay extension is built (sniff run warns if not)
TeeBase = _TeeBase  # the base of every relayed socket's protocol object (also HTTP's)


class _Side(_TeeBase, asyncio.Protocol):
    """One socket of a relayed connection; all logic lives in RelayConnection.
    ``data_received`` (from the base) calls ``slow``, the connection's ``from_server``
    (or ``from_client``), or, in fast mode, forwards and ships in C."""

    __slots__ = ("conn", "is_client")

    def __init__(self, conn: RelayConnection, is_client: bool) -> None:
        self.conn = conn
        self.is_client = is_client
        self.slow = conn.from_client if is_client else conn.from_server

    def eof_received(self) -> bool:
        return self.conn.eof(self.is_client)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(self.is_client, exc)

    def pause_writing(self) -> None:
        self.conn.pause_other(self.is_client)

    def resume_writing(self) -> None:
        self.conn.resume_other(self.is_client)


class RelayConnection:
    __slots__ = (
        "_early",
        "_early_s",
        "_paused_by_c",
        "_paused_by_s",
        "c_eof",
        "c_side",
        "c_t",
        "closed",
        "ctx",
        "fast",
        "first_eof",
        "handler",
        "listener",
        "n_c2s",
        "n_s2c",
        "s_eof",
        "s_side",
        "s_t",
        "started",
    )

    def __init__(self, listener: RelayListener) -> None:
        self.listener = listener
        self.c_t: asyncio.Transport | None = None
        self.s_t: asyncio.Transport | None = None
        self.handler: Handler | None = None
        self.ctx: ConnContext | None = None
        self._early: list[bytes] = []
        # server bytes that arrive before the handler exists (MySQL's greeting: the server
        # speaks first, and the loop may deliver it before _connect_upstream resumes)
        self._early_s: list[bytes] = []
        self.n_c2s = 0
        self.n_s2c = 0
        self.c_eof = False
        self.s_eof = False
        self.closed = False
        self.first_eof: str | None = None
        self.started = time.monotonic()
        self._paused_by_c = False
        self._paused_by_s = False
        self.c_side: _TeeBase | None = None  # the protocol objects of both sockets
        self.s_side: _TeeBase | None = None
        self.fast = False  # a direction is in the protocol objects' fast mode

    # --- client accepted -----------------------------------------------------------------

    def accepted(self, transport: asyncio.Transport) -> None:
        self.c_t = transport
        transport.pause_reading()
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.listener.conns.add(self)
        asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        lst = self.listener
        cfg = lst.cfg
        assert self.c_t is not None
        peer = self.c_t.get_extra_info("peername") or ("?", 0)
        client = (str(peer[0]), int(peer[1]))
        loop = asyncio.get_running_loop()
        s_side = self.s_side = _Side(self, False)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: s_side, cfg.upstream.host, cfg.upstream.port),
                timeout=cfg.connect_timeout,
            )
        except (OSError, TimeoutError) as e:
            reason = _describe_connect_error(e, cfg.upstream, cfg.connect_timeout)
            log.warning(
                "%s: upstream %s unreachable (%s); closing client %s:%s",
                cfg.name,
                cfg.upstream,
                reason,
                client[0],
                client[1],
            )
            lst.sink.emit(
                UpstreamError(
                    time.time_ns(), 0, cfg.name, str(cfg.upstream), client[0], client[1], reason
                )
            )
            self.closed = True
            lst.conns.discard(self)
            if self.c_t is not None:
                self.c_t.close()
            return
        if self.closed:  # the client gave up while we were connecting
            transport.close()
            return
        self.s_t = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        conn_id = new_conn_id()
        sock = self.c_t.get_extra_info("sockname") or (cfg.listen.host, cfg.listen.port)
        srv = transport.get_extra_info("peername") or (cfg.upstream.host, cfg.upstream.port)
        ours = transport.get_extra_info("sockname")  # our end of the upstream connection
        self.ctx = ConnContext(
            self,
            conn_id,
            cfg,
            client,
            (str(srv[0]), int(srv[1])),
            (str(sock[0]), int(sock[1])),
            lst.sink,
        )
        lst.sink.emit(
            ConnOpen(
                time.time_ns(),
                conn_id,
                cfg.name,
                cfg.protocol,
                client[0],
                client[1],
                str(srv[0]),
                int(srv[1]),
                str(sock[0]),
                int(sock[1]),
                int(ours[1]) if ours else 0,
                str(ours[0]) if ours else "",
            )
        )
        lst.total += 1
        try:
            self.handler = lst.handler_factory(self.ctx)
        except Exception as e:  # a handler that cannot start: relay plainly
            log.exception("%s: handler failed to start; passthrough", cfg.name)
            self._record_failure("setup", e)
            self.handler = Handler(self.ctx)
        early, self._early = self._early, []
        for chunk in early:
            self.from_client(chunk)
        early, self._early_s = self._early_s, []
        for chunk in early:
            if chunk:
                self.from_server(chunk)
            else:  # the server's EOF came early too, after its bytes
                self.eof(False)
        if self.c_eof:
            self.eof(True)
        elif not self.closed:
            self.c_t.resume_reading()

    # --- data ----------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        h = self.handler
        s_t = self.s_t
        if h is None or s_t is None:
            self._early.append(data)
            return
        self.n_c2s += len(data)
        if not h.observe:
            s_t.write(data)
            if self.fast:
                self._fast_off()
        elif h.rewrite_c2s:
            try:
                out = h.c2s(data)
            except Exception as e:
                out = self._handler_failed("c2s", e) + data
                h = self.handler  # passthrough now
                assert h is not None
            if out:
                s_t.write(out)
            if self.fast:  # the handler may have taken the other direction back
                self._fast_check(h)
            if h.lean is not None:
                self._lean_on(h.lean, True)
            elif h.head is not None:
                self._head_on(h.head)
        else:
            s_t.write(data)
            try:
                h.c2s(data)
            except Exception as e:
                self._handler_failed("c2s", e)
                return
            if self.fast:
                self._fast_check(h)
            fn: Any = h.c2s
            if type(fn) is _Shipper and h.observe and not h.rewrite_c2s:
                self._fast_on(self.c_side, s_t, fn)

    def from_server(self, data: bytes) -> None:
        h = self.handler
        c_t = self.c_t
        if h is None or c_t is None:
            if c_t is not None and not self.closed:
                self._early_s.append(data)
            return
        self.n_s2c += len(data)
        if not h.observe:
            c_t.write(data)
            if self.fast:
                self._fast_off()
        elif h.rewrite_s2c:
            try:
                out = h.s2c(data)
            except Exception as e:
                out = self._handler_failed("s2c", e) + data
            if out:
                c_t.write(out)
            if self.fast:
                self._fast_check(h)
        else:
            c_t.write(data)
            try:
                h.s2c(data)
            except Exception as e:
                self._handler_failed("s2c", e)
                return
            if self.fast:
                self._fast_check(h)
            if h.lean is not None:
                self._lean_on(h.lean, False)
                return
            fn: Any = h.s2c
            if type(fn) is _Shipper and h.observe and not h.rewrite_s2c:
                self._fast_on(self.s_side, c_t, fn)

    # --- fast mode -------------------------------------------------------------------------
    # A capture-mode handler that only ships a direction (its c2s or s2c is a C Shipper, it
    # neither rewrites nor stops observing that direction) has nothing left to do in Python
    # for it: the socket's protocol object then forwards, counts and ships each chunk in one
    # C call (sniff/_shipper.c). The handler may still change its mind only through the
    # other direction (a pump from then on): that turns fast mode off.

    def _fast_on(self, side: _TeeBase | None, to: asyncio.Transport, shipper: Any) -> None:
        if side is not None and not self.closed and not side.fast:
            side.set_fast(to.write, shipper)
            self.fast = True

    def _lean_on(self, lean: tuple[Any, Any, Any], client: bool) -> None:
        """The AMQP lean loop in C for one socket (the client's: tag and forward; the
        broker's: forward and scan), once the handler has taken a chunk of it in slow
        mode. The C side returns a socket to the slow path itself: for a chunk before the
        protocol header is whole, and for good once the decoder is in passthrough."""
        side, to = (self.c_side, self.s_t) if client else (self.s_side, self.c_t)
        dec, ship0, ship1 = lean
        if (
            side is None
            or to is None
            or self.closed
            or side.fast
            or dec.passthrough
            or type(ship0) is not _Shipper
        ):
            return
        side.set_lean(
            to.write,
            ship0 if client else ship1,
            dec,
            dec.c if client else dec.s,
            client,
            partial(self._lean_failed, client),
        )
        self.fast = True

    def _head_on(self, head: tuple[Any, Any, int]) -> None:
        """The HTTP injector's commonest client chunk (a keep-alive client repeating its
        previous head) taken in C for the client's socket: see the Tee's head mode."""
        side, to = self.c_side, self.s_t
        if side is None or to is None or self.closed or side.fast or not HAVE_C:
            return
        injector, tagger, head_state = head
        side.set_head(to.write, injector, tagger, head_state)
        self.fast = True

    def _lean_failed(self, client: bool, exc: BaseException, data: bytes, forwarded: bool) -> None:
        """An exception in a socket's C lean mode (a bug or a failed allocation; bad input
        is a protocol error there): what a failing handler gets in slow mode. The chunk is
        forwarded unless the C side had forwarded it already, with what was held back."""
        held = self._handler_failed("c2s" if client else "s2c", exc)
        out = held if forwarded else held + data
        if out:
            (self.write_server if client else self.write_client)(out)

    def _fast_check(self, h: Handler) -> None:
        """After a handler call in slow mode: a fast direction whose handler no longer only
        ships (it rewrites, stopped observing, or its c2s/s2c is something else now, e.g.
        the HTTP injector watching the server's answer to an Upgrade) goes slow again."""
        c, s = self.c_side, self.s_side
        if c is not None and c.fast:
            fn: Any = h.c2s
            if c.lean:
                if not h.observe or h.lean is None:
                    c.fast_off()
            elif c.head:
                if not h.observe or h.head is None:
                    c.fast_off()
            elif not h.observe or h.rewrite_c2s or type(fn) is not _Shipper:
                c.fast_off()
        if s is not None and s.fast:
            fn = h.s2c
            if s.lean:
                if not h.observe or h.lean is None:
                    s.fast_off()
            elif not h.observe or h.rewrite_s2c or type(fn) is not _Shipper:
                s.fast_off()
        self.fast = (c is not None and c.fast) or (s is not None and s.fast)

    def _fast_off(self) -> None:
        for side in (self.c_side, self.s_side):
            if side is not None and side.fast:
                side.fast_off()
        self.fast = False

    def bytes_relayed(self) -> tuple[int, int]:
        """(client->server, server->client) bytes so far, fast mode included."""
        c, s = self.c_side, self.s_side
        return (
            self.n_c2s + (c.nbytes if c is not None else 0),
            self.n_s2c + (s.nbytes if s is not None else 0),
        )

    def write_client(self, data: bytes) -> None:
        if self.c_t is not None and not self.c_t.is_closing():
            self.c_t.write(data)

    def write_server(self, data: bytes) -> None:
        if self.s_t is not None and not self.s_t.is_closing():
            self.s_t.write(data)

    def _handler_failed(self, direction: str, exc: BaseException) -> bytes:
        """A handler bug: record it, flush what it held back, and go passthrough."""
        h = self.handler
        held = b""
        if h is not None:
            try:
                held = h.flush_c2s() if direction == "c2s" else h.flush_s2c()
            except Exception:
                held = b""
            if direction == "c2s":
                other = self._safe_flush(h.flush_s2c)
                if other:
                    self.write_client(other)
            else:
                other = self._safe_flush(h.flush_c2s)
                if other:
                    self.write_server(other)
        log.exception(
            "%s: connection %s handler failed; passthrough from now on",
            self.listener.cfg.name,
            self.ctx.conn_id if self.ctx else "?",
            exc_info=exc,
        )
        self._record_failure(direction, exc)
        assert self.ctx is not None
        self.handler = Handler(self.ctx)
        self._fast_off()  # no C mode keeps running the failed handler's logic
        return held

    @staticmethod
    def _safe_flush(fn: Callable[[], bytes]) -> bytes:
        try:
            return fn()
        except Exception:
            return b""

    def _record_failure(self, direction: str, exc: BaseException) -> None:
        ctx = self.ctx
        self.listener.sink.emit(
            ProtocolError(
                time.time_ns(),
                ctx.conn_id if ctx else 0,
                self.listener.cfg.protocol,
                direction,
                self.bytes_relayed()[0 if direction == "c2s" else 1],
                f"internal decoder error: {type(exc).__name__}: {exc}",
                "",
            )
        )

    # --- flow control --------------------------------------------------------------------

    def pause_other(self, is_client: bool) -> None:
        # is_client: the client's write buffer is full -> stop reading from the server
        t = self.s_t if is_client else self.c_t
        if t is not None and not t.is_closing():
            t.pause_reading()
            if is_client:
                self._paused_by_c = True
            else:
                self._paused_by_s = True

    def resume_other(self, is_client: bool) -> None:
        t = self.s_t if is_client else self.c_t
        if t is not None and not t.is_closing():
            if is_client and self._paused_by_c:
                self._paused_by_c = False
                if not self.s_eof:
                    t.resume_reading()
            elif not is_client and self._paused_by_s:
                self._paused_by_s = False
                if not self.c_eof:
                    t.resume_reading()

    # --- endings -------------------------------------------------------------------------

    def eof(self, is_client: bool) -> bool:
        """Half-close: pass the EOF on; close once both directions have ended."""
        if not is_client and self.handler is None and self.c_t is not None and not self.closed:
            self._early_s.append(b"")  # replayed in order once the handler exists
            return True
        if self.first_eof is None:
            self.first_eof = "client" if is_client else "server"
        if is_client:
            self.c_eof = True
            if self.s_t is None:
                return True  # still connecting; handled once connected
            h = self.handler
            if h is not None and h.observe and h.rewrite_c2s:
                held = self._safe_flush(h.flush_c2s)
                if held:
                    self.write_server(held)
            if self.s_t.can_write_eof() and not self.s_t.is_closing():
                self.s_t.write_eof()
        else:
            self.s_eof = True
            h = self.handler
            if h is not None and h.observe and h.rewrite_s2c:
                held = self._safe_flush(h.flush_s2c)
                if held:
                    self.write_client(held)
            if self.c_t is not None and self.c_t.can_write_eof() and not self.c_t.is_closing():
                self.c_t.write_eof()
        if self.c_eof and self.s_eof:
            self.close(
                f"{self.first_eof} closed first, then the other side", by=self.first_eof or "client"
            )
            return False
        return True

    def lost(self, is_client: bool, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is None:
            reason = "client closed" if is_client else "server closed"
        else:
            reason = f"{'client' if is_client else 'server'} connection lost: {exc}"
        # a reset after the client already left is the normal end of many protocols
        # (the server closed after its goodbye; our FIN met a closed socket)
        if not is_client and not self.s_eof and not self.c_eof and self.c_t is not None:
            log.info(
                "%s: upstream closed connection %s: %s",
                self.listener.cfg.name,
                self.ctx.conn_id if self.ctx else "?",
                reason,
            )
        self.close(reason, by="client" if is_client else "server")

    def close(self, reason: str, by: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.listener.conns.discard(self)
        if self.fast:
            self._fast_off()  # (the protocol objects keep their byte counts)
        h = self.handler
        if h is not None and h.observe:
            # anything a rewriting handler still holds goes out unchanged
            if h.rewrite_c2s:
                held = self._safe_flush(h.flush_c2s)
                if held:
                    self.write_server(held)
            if h.rewrite_s2c:
                held = self._safe_flush(h.flush_s2c)
                if held:
                    self.write_client(held)
            try:
                h.closed(reason)
            except Exception as e:
                self._record_failure("close", e)
        for t in (self.c_t, self.s_t):
            if t is not None and not t.is_closing():
                t.close()  # flushes the write buffer, then closes
        if self.ctx is not None:
            self.listener.sink.emit(
                ConnClose(time.time_ns(), self.ctx.conn_id, reason, by, *self.bytes_relayed())
            )

    def abort(self, reason: str) -> None:
        self.close(reason, by="proxy")
        for t in (self.c_t, self.s_t):
            if t is not None:
                t.abort()


def _describe_connect_error(e: BaseException, upstream: Address, timeout: float) -> str:
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve {upstream.host!r}: {e.strerror}"
    if isinstance(e, OSError) and e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
    return str(e) or type(e).__name__


class _Accept(_TeeBase, asyncio.Protocol):
    """The protocol object asyncio creates per accepted socket: hands over to RelayConnection
    (``data_received``, from the base, calls its ``from_client``; see :class:`_Side`)."""

    __slots__ = ("conn",)

    def __init__(self, listener: RelayListener) -> None:
        self.conn = RelayConnection(listener)
        self.conn.c_side = self
        self.slow = self.conn.from_client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.accepted(transport)  # type: ignore[arg-type]

    def eof_received(self) -> bool:
        return self.conn.eof(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(True, exc)

    def pause_writing(self) -> None:
        self.conn.pause_other(True)

    def resume_writing(self) -> None:
        self.conn.resume_other(True)


class Listener(TypingProtocol):
    cfg: ProxyConfig

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class ListenError(Exception):
    """The listen address cannot be bound (in use, not local, no permission)."""


class RelayListener:
    """Accepts clients on ``cfg.listen`` and relays each to ``cfg.upstream``."""

    def __init__(self, cfg: ProxyConfig, sink: EventSink, handler_factory: HandlerFactory) -> None:
        self.cfg = cfg
        self.sink = sink
        self.handler_factory = handler_factory
        self.conns: set[RelayConnection] = set()
        self.server: asyncio.Server | None = None
        self.total = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                lambda: _Accept(self),
                self.cfg.listen.host,
                self.cfg.listen.port,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as e:
            raise ListenError(describe_listen_error(self.cfg, e)) from None
        self.sink.emit(
            ProxyStart(
                time.time_ns(),
                0,
                self.cfg.name,
                self.cfg.protocol,
                str(self.cfg.listen),
                str(self.cfg.upstream),
                self.cfg.inject,
            )
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.close("proxy shutting down", by="proxy")
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
        self.sink.emit(ProxyStop(time.time_ns(), 0, self.cfg.name, self.total))


def describe_listen_error(cfg: ProxyConfig, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        why = "address already in use (another process listens there; pick a free port)"
    elif e.errno == errno.EADDRNOTAVAIL:
        why = "address not available on this host"
    elif e.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
    else:
        why = e.strerror or str(e)
    return f"proxy {cfg.name!r}: cannot listen on {cfg.listen}: {why}"
