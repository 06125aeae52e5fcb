"""Relay glue for MySQL/MariaDB: :class:`sniff.relay.Handler` around :class:`MysqlDecoder`.

Plain mode (:class:`MysqlHandler`). The server direction is *rewritten* only until
the greeting has gone by (its CLIENT_SSL/CLIENT_COMPRESS bits are edited), then
observed: forwarded first, decoded after. The client direction is rewritten only
with ``sqlcommenter`` (a COM_QUERY may get a comment); otherwise observed. Once
the decoder gives up (protocol error, compression, TLS end to end), the handler
stops observing and the relay is a plain byte pump for that connection.

TLS mode (:class:`MysqlTlsHandler`). A MySQL client sends its TLS ClientHello
right after the 32-byte SSLRequest, without waiting, so asyncio's ``start_tls``
(which cannot take bytes already read) does not fit. TLS is terminated here,
sans-IO, with ``ssl.MemoryBIO``/``SSLObject`` pairs: one as the client's TLS
server (with the configured certificate), one as a TLS client towards the server
when the server offers TLS (``tls.upstream = "auto"``, the default; ``"require"``
refuses a server without TLS; ``"off"`` talks plaintext upstream). Between them
the decoder sees plaintext. Both directions are rewritten (the relay forwards
nothing itself; everything goes out through ``send_to_client``/``send_to_server``).
A TLS failure closes that connection with a ``ProtocolError`` event: after TLS
has started there is no byte stream that could be passed through instead.

Capture mode (:class:`MysqlCaptureHandler`, ``decode = "capture"``, the default
without ``tls`` and ``sqlcommenter``). The event loop does only the greeting edit
(CLIENT_SSL and compression cleared, the same bytes the decoder would make) and
ships a copy of everything it forwarded to the capture process, where
:class:`MysqlRawDecoder` runs the same :class:`MysqlDecoder`. The greeting's chunk
is shipped as forwarded with the chunk as read in ``meta``: the decoder decodes
the original, so it knows what the server offered (the TLS-stripped note, a
client that sets CLIENT_COMPRESS anyway) exactly as in-line. After the greeting
both directions are a relay plus one ``ship`` call per chunk.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time

from proxies.mysql import packets as P
from proxies.mysql.decoder import MysqlDecoder, MysqlShared
from sniff.events import ProtocolError
from sniff.relay import ConnContext, Handler

log = logging.getLogger("sniff.mysql")


def _decoder(ctx: ConnContext, shared: MysqlShared, **kw: object) -> MysqlDecoder:
    opts = ctx.proxy.options
    return MysqlDecoder(
        ctx.conn_id,
        ctx.emit,
        keep_literals=bool(opts.get("capture_sql_literals", False)),
        # the proxy-wide ``inject = false`` switches every tag off, sqlcommenter included
        sqlcommenter=bool(opts.get("sqlcommenter", False)) and ctx.proxy.inject,
        max_statement_bytes=int(opts.get("max_statement_bytes", 65536)),
        shared=shared,
        **kw,  # type: ignore[arg-type]
    )


class MysqlHandler(Handler):
    observe = True

    def __init__(self, ctx: ConnContext, shared: MysqlShared) -> None:
        super().__init__(ctx)
        d = self.decoder = _decoder(
            ctx, shared, release_client=ctx.send_to_server, release_server=ctx.send_to_client
        )
        d.on_passthrough = self._passthrough
        self.rewrite_s2c = True  # until the greeting has been edited
        self.rewrite_c2s = d.sqlcommenter
        # the relay calls these directly: no wrapper call per chunk on the hot path
        self.c2s = d.feed_client  # type: ignore[method-assign]

    def s2c(self, data: bytes) -> bytes:  # only until the greeting has gone by
        d = self.decoder
        out = d.feed_server(data)
        if d.greeting_seen or d.passthrough:
            # from now on the relay forwards first; a partial packet the decoder holds
            # was not forwarded yet, so it goes out now (the decoder keeps its copy)
            self.rewrite_s2c = False
            if d.s.buf and not d.passthrough:
                out += d.s.buf
            self.s2c = d.feed_server  # type: ignore[method-assign]
        return out

    def _passthrough(self) -> None:
        """The decoder gave up on this connection: the relay becomes a plain pump."""
        self.observe = False

    def flush_c2s(self) -> bytes:
        return self.decoder.flush_client() if self.rewrite_c2s else b""

    def flush_s2c(self) -> bytes:
        return self.decoder.flush_server() if self.rewrite_s2c else b""

    def closed(self, reason: str) -> None:
        self.decoder.closed(reason)


class MysqlTlsHandler(Handler):
    observe = True
    rewrite_c2s = True
    rewrite_s2c = True

    def __init__(
        self,
        ctx: ConnContext,
        shared: MysqlShared,
        server_ctx: ssl.SSLContext,
        upstream_ctx: ssl.SSLContext,
    ) -> None:
        super().__init__(ctx)
        tls = ctx.proxy.options.get("tls") or {}
        self.shared = shared
        self.decoder = _decoder(
            ctx,
            shared,
            terminate_tls=True,
            upstream_tls=str(tls.get("upstream", "auto")),
            release_client=self._to_server,
            release_server=self._to_client,
        )
        self._server_ctx = server_ctx
        self._upstream_ctx = upstream_ctx
        self._hostname = tls.get("server_hostname") or ctx.server[0]
        self._c_mode = "pre"  # pre (before the client's first packet) | tls | clear | dead
        self._c_pre = b""
        self._c_in = ssl.MemoryBIO()
        self._c_out = ssl.MemoryBIO()
        self._c: ssl.SSLObject | None = None
        self._c_ready = False
        self._s_in = ssl.MemoryBIO()
        self._s_out = ssl.MemoryBIO()
        self._s: ssl.SSLObject | None = None
        self._s_ready = False
        self._s_queue: list[bytes] = []  # plaintext for the server, waiting for its handshake

    # --- client side ---------------------------------------------------------------------

    def c2s(self, data: bytes) -> bytes:
        if self._c_mode == "dead":
            return b""
        try:
            self._c2s(data)
        except ssl.SSLError as e:
            self._tls_failed("c2s", "client", e)
        except Exception as e:  # never let the relay fall back to raw passthrough here
            self._tls_failed("c2s", "client", e)
        return b""

    def _c2s(self, data: bytes) -> None:
        mode = self._c_mode
        if mode == "tls":
            self._c_in.write(data)
            self._pump_client()
        elif mode == "clear":
            self._to_server(self.decoder.feed_client(data))
        elif mode == "pre":
            buf = self._c_pre + data
            if len(buf) < 4:
                self._c_pre = buf
                return
            end = 4 + (buf[0] | buf[1] << 8 | buf[2] << 16)
            if len(buf) < end:
                self._c_pre = buf
                return
            self._c_pre = b""
            d = self.decoder
            out = d.feed_client(buf[:end])
            rest = buf[end:]
            if d.client_tls and d.passthrough:  # e.g. tls.upstream = "require", server without TLS
                raise ssl.SSLError("tls.upstream is 'require' but the server does not offer TLS")
            if d.client_tls:
                if out:  # the SSLRequest goes on: TLS towards the server as well
                    self.ctx.send_to_server(out)
                    self._start_upstream_tls()
                self._c = self._server_ctx.wrap_bio(self._c_in, self._c_out, server_side=True)
                self._c_mode = "tls"
                if rest:
                    self._c_in.write(rest)
                self._pump_client()
            else:  # the client declined TLS: plaintext both ways
                self._c_mode = "clear"
                self._to_server(out)
                if rest:
                    self._to_server(d.feed_client(rest))

    def _pump_client(self) -> None:
        c = self._c
        assert c is not None
        if not self._c_ready:
            try:
                c.do_handshake()
                self._c_ready = True
            except ssl.SSLWantReadError:
                pass
            self._flush_client_tls()
            if not self._c_ready:
                return
        chunks = []
        while True:
            try:
                b = c.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break
            if not b:
                break
            chunks.append(b)
        self._flush_client_tls()
        if chunks:
            self._to_server(self.decoder.feed_client(b"".join(chunks)))

    def _flush_client_tls(self) -> None:
        out = self._c_out.read()
        if out:
            self.ctx.send_to_client(out)

    def _to_client(self, plain: bytes) -> None:
        if not plain:
            return
        if self._c_mode == "tls" and self._c is not None:
            self._c.write(plain)
            self._flush_client_tls()
        else:
            self.ctx.send_to_client(plain)

    # --- server side ---------------------------------------------------------------------

    def _start_upstream_tls(self) -> None:
        self._s = self._upstream_ctx.wrap_bio(
            self._s_in, self._s_out, server_side=False, server_hostname=self._hostname
        )
        with contextlib.suppress(ssl.SSLWantReadError):
            self._s.do_handshake()
        self._flush_server_tls()

    def s2c(self, data: bytes) -> bytes:
        if self._c_mode == "dead":
            return b""
        try:
            s = self._s
            if s is None:
                self._to_client(self.decoder.feed_server(data))
            else:
                self._s_in.write(data)
                self._pump_server(s)
        except ssl.SSLError as e:
            self._tls_failed("s2c", "server", e)
        except Exception as e:
            self._tls_failed("s2c", "server", e)
        return b""

    def _pump_server(self, s: ssl.SSLObject) -> None:
        if not self._s_ready:
            try:
                s.do_handshake()
                self._s_ready = True
            except ssl.SSLWantReadError:
                pass
            self._flush_server_tls()
            if not self._s_ready:
                return
            queued, self._s_queue = self._s_queue, []
            for q in queued:
                s.write(q)
            self._flush_server_tls()
        chunks = []
        while True:
            try:
                b = s.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not b:
                break
            chunks.append(b)
        self._flush_server_tls()
        if chunks:
            self._to_client(self.decoder.feed_server(b"".join(chunks)))

    def _flush_server_tls(self) -> None:
        out = self._s_out.read()
        if out:
            self.ctx.send_to_server(out)

    def _to_server(self, plain: bytes) -> None:
        if not plain:
            return
        s = self._s
        if s is None:
            self.ctx.send_to_server(plain)
        elif not self._s_ready:
            self._s_queue.append(plain)
        else:
            s.write(plain)
            self._flush_server_tls()

    # --- endings -------------------------------------------------------------------------

    def _tls_failed(self, direction: str, side: str, e: BaseException) -> None:
        if self._c_mode == "dead":
            return
        self._c_mode = "dead"
        reason = (
            f"TLS with the {side} failed: {e}"
            if isinstance(e, ssl.SSLError)
            else f"internal error in the TLS layer: {type(e).__name__}: {e}"
        )
        self.shared.warn(f"tls-{side}", f"connection {self.ctx.conn_id}: {reason}", every_s=60.0)
        self.ctx.emit(
            ProtocolError(time.time_ns(), self.ctx.conn_id, "mysql", direction, 0, reason, "")
        )
        self.ctx.close(reason)

    def closed(self, reason: str) -> None:
        self.decoder.closed(reason)


# the decoder's own bound on a server packet it reads whole: a larger "greeting" is
# forwarded unchanged (the decoder reports it)
_GREETING_MAX = 1 << 20


class MysqlCaptureHandler(Handler):
    """``decode = "capture"``: edit the greeting, relay, ship copies (see the module doc)."""

    observe = True
    rewrite_s2c = True  # until the greeting has gone by

    def __init__(self, ctx: ConnContext) -> None:
        super().__init__(ctx)
        self._held = b""  # a partial greeting, not forwarded yet
        self.c2s = self._first_c2s  # type: ignore[method-assign]

    def s2c(self, data: bytes) -> bytes:
        buf = self._held + data if self._held else data
        n = len(buf)
        ln = buf[0] | buf[1] << 8 | buf[2] << 16 if n >= 4 else -1
        if ln < 0 or (4 + ln > n and ln <= _GREETING_MAX):
            self._held = buf  # the greeting is still incomplete
            return b""
        self._held = b""
        out = buf
        edited = P.plaintext_greeting(buf[4 : 4 + ln]) if 4 + ln <= n else None
        ctx = self.ctx
        if edited is not None:
            out = buf[:4] + edited + buf[4 + ln :]
        # from now on the relay forwards first and this only ships
        self.rewrite_s2c = False
        self.s2c = ctx.shipper(1)  # type: ignore[method-assign,assignment]
        ctx.ship(1, out, buf if edited is not None else None)
        return out

    def _first_c2s(self, data: bytes) -> bytes:
        ctx = self.ctx
        ship = self.c2s = ctx.shipper(0)  # type: ignore[method-assign,assignment]
        ship(data)
        # An SSLRequest although the greeting offered no TLS: encrypted end to end. The
        # decoder says so from this packet and decodes nothing after it, so nothing after
        # it needs shipping: the relay becomes a plain pump (once the greeting is out: a
        # pump would never release a greeting still held).
        if _is_ssl_request(data) and not self.rewrite_s2c:
            self.observe = False
        return data

    def flush_s2c(self) -> bytes:
        held, self._held = self._held, b""
        if held:
            self.ctx.ship(1, held)
        return held


def _is_ssl_request(data: bytes) -> bool:
    """``data`` opens with a MySQL SSLRequest (32-byte protocol-4.1 response with CLIENT_SSL)."""
    if len(data) < 8 or data[0] != 32 or data[1] or data[2]:
        return False
    caps = data[4] | data[5] << 8
    return bool(caps & P.CLIENT_PROTOCOL_41 and caps & P.CLIENT_SSL)


class MysqlRawDecoder:
    """Capture side of ``decode = "capture"``: :class:`MysqlDecoder` over shipped copies.
    A chunk with ``meta`` is the greeting's: ``meta`` holds it as the server sent it."""

    def __init__(self, decoder: MysqlDecoder) -> None:
        self.d = decoder
        self._c = decoder.feed_client
        self._s = decoder.feed_server

    def feed(self, direction: int, data: bytes, meta: object) -> None:
        if direction:
            self._s(meta if isinstance(meta, bytes) else data)
        else:
            self._c(data)

    def closed(self, reason: str) -> None:
        self.d.closed(reason)
