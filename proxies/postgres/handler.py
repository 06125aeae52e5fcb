"""Relay glue for PostgreSQL: a :class:`sniff.relay.Handler` around :class:`PostgresDecoder`,
plus the TLS layers when sniff terminates TLS.

Strategy. The common case costs nothing extra: once the startup packet has
gone by, with neither TLS nor sqlcommenter in play, the relay forwards each
chunk first and calls the decoder's ``feed_client``/``feed_server`` directly
(observe mode, no wrapper call). Only the startup phase runs in rewrite mode,
so the proxy can answer an SSLRequest itself.

With TLS the handler rewrites both directions: ciphertext from the client is
decrypted by a server-side :class:`TlsEndpoint`, decoded, and sent on to the
server either in plaintext or through a client-side endpoint (``tls.upstream``);
the server's bytes go the opposite way. Upstream TLS is negotiated by the
handler itself as soon as the server connection exists (its own SSLRequest;
the server's one-byte answer never reaches the client), and plaintext for the
server is queued until that is settled.

A failing TLS session (bad certificate, handshake error, a server that refuses
TLS with ``tls.upstream = "require"``) ends the connection with an
ErrorResponse to the client naming the cause and the option to change.

Capture mode (:class:`PostgresCaptureHandler`, ``decode = "capture"``, the
default without ``tls`` and ``sqlcommenter``). The event loop answers
SSLRequest/GSSENCRequest with 'N' itself (they are never forwarded) and ships
a copy of everything it forwarded to the capture process, where
:class:`PostgresRawDecoder` runs the same :class:`PostgresDecoder`. An answered
request is shipped as a marked chunk (``meta = (ANSWERED, client address)``): the
decoder drops it from the stream as in-line (the server never saw it) but notes
the refusal, so the events and notes are the same. From the first other packet on
both directions are a relay plus one ``ship`` call per chunk; a connection whose
first packet says nothing after it will be decoded (CancelRequest, direct TLS, a
replication StartupMessage) is shipped up to there and then only relayed.
"""

from __future__ import annotations

import logging
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxies.postgres.decoder import (
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    SSL_REQUEST,
    PostgresDecoder,
    PostgresShared,
)
from proxies.postgres.tls import TlsEndpoint, TlsError
from sniff.events import Event, Note
from sniff.relay import ConnContext, Handler

log = logging.getLogger("sniff.postgres")

SSL_REQUEST_BYTES = struct.pack(">II", 8, SSL_REQUEST)
_PLAIN, _NEGOTIATING, _TLS = range(3)


@dataclass
class PgSettings:
    """A proxy's options, resolved once (contexts loaded) for all its connections."""

    keep_literals: bool = False
    sqlcommenter: bool = False
    max_statement_bytes: int = 65536
    server_ctx: ssl.SSLContext | None = None  # terminate client TLS with this
    upstream: str = "off"  # off | prefer | require: TLS from sniff to the server
    upstream_ctx: ssl.SSLContext | None = None
    upstream_hostname: str | None = None


class ProxyState(PostgresShared):
    """Per-proxy state: the shared pid map and warn-once flags."""

    def __init__(self) -> None:
        super().__init__()
        self.warned: set[str] = set()

    def warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(msg, *args)


def _warn_ssl_refused(state: ProxyState, proxy_name: str) -> None:
    state.warn_once(
        "ssl_refused",
        "%s: a client asked for TLS (SSLRequest); sniff answered 'N' because this proxy "
        "has no tls option, so clients that allow plaintext (sslmode=prefer) continue "
        "unencrypted and clients that require TLS fail. To terminate TLS, set "
        'tls = { cert = "server.pem", key = "server.key" } on this [[proxy]].',
        proxy_name,
    )


def _tls_required(state: ProxyState, proxy_name: str, peer: str, ts: int, conn: int) -> Note:
    """The note (and a log line, once) for a client that left after its SSLRequest was refused."""
    msg = (
        f"client {peer} closed the connection after sniff refused its TLS request: "
        "it requires TLS (sslmode=require or stricter). Set "
        'tls = { cert = "server.pem", key = "server.key" } on '
        f"proxy {proxy_name!r} to terminate TLS, or let the client use "
        "sslmode=prefer."
    )
    state.warn_once("tls_required", "%s: %s", proxy_name, msg)
    return Note(ts, conn, "postgres.tls_required", msg)


def error_response(message: str, code: str = "08006", hint: str | None = None) -> bytes:
    """A FATAL ErrorResponse the client library shows to its user."""
    fields = b"SFATAL\x00VFATAL\x00C" + code.encode() + b"\x00M" + message.encode() + b"\x00"
    if hint:
        fields += b"H" + hint.encode() + b"\x00"
    fields += b"\x00"
    return b"E" + struct.pack(">I", 4 + len(fields)) + fields


class PostgresHandler(Handler):
    observe = True

    def __init__(self, ctx: ConnContext, settings: PgSettings, state: ProxyState) -> None:
        super().__init__(ctx)
        self.settings = settings
        self.state = state
        self.decoder = PostgresDecoder(
            ctx.conn_id,
            ctx.sink.emit,  # the sink's own method: one call less per event than ctx.emit
            keep_literals=settings.keep_literals,
            inject=settings.sqlcommenter and ctx.proxy.inject,
            max_statement_bytes=settings.max_statement_bytes,
            ssl_policy="accept" if settings.server_ctx is not None else "refuse",
            reply=ctx.send_to_client,
            shared=state,
            proxy_name=ctx.proxy.name,
        )
        self.client_tls: TlsEndpoint | None = None
        self.server_tls: TlsEndpoint | None = None
        self._up = _PLAIN
        self._up_queue: list[bytes] = []
        self._failed = False
        # an error (message, hint) for the client, sent once it can read it
        self._deferred: tuple[str, str] | None = None
        if settings.upstream != "off":
            self._up = _NEGOTIATING
            ctx.send_to_server(SSL_REQUEST_BYTES)
        self.rewrite_c2s = True
        self.rewrite_s2c = self._up != _PLAIN

    # --- relay callbacks -----------------------------------------------------------------

    def c2s(self, data: bytes) -> bytes:
        if self._failed and self._deferred is None:
            return b""
        if self.client_tls is not None:
            try:
                data, back = self.client_tls.receive(data)
            except TlsError as e:
                self._fail_tls("client", str(e))
                return b""
            if back:
                self.ctx.send_to_client(back)
            if not data:
                return b""
        dec = self.decoder
        fwd = dec.feed_client(data)
        if dec.tls_request:
            dec.tls_request = False
            assert self.settings.server_ctx is not None
            self.client_tls = TlsEndpoint(self.settings.server_ctx, server_side=True)
            out = self._to_server(fwd) if self._deferred is None else b""
            rest = dec.take_leftover()
            return out + self.c2s(rest) if rest else out
        if self._deferred is not None:
            if dec.startup_done:
                self._tell_client_and_close(*self._deferred)
            return b""
        if dec.ssl_refused:
            _warn_ssl_refused(self.state, self.ctx.proxy.name)
        out = self._to_server(fwd)
        self._maybe_fast_path()
        return out

    def s2c(self, data: bytes) -> bytes:
        if self._failed:
            return b""
        if self._up == _NEGOTIATING:
            data = self._upstream_answer(data)
            if not data:
                return b""
        if self.server_tls is not None:
            try:
                data, back = self.server_tls.receive(data)
            except TlsError as e:
                self._fail_tls("server", str(e))
                return b""
            if back:
                self.ctx.send_to_server(back)
            if not data:
                return b""
        self.decoder.feed_server(data)
        if self.client_tls is not None:
            try:
                return self.client_tls.send(data)
            except TlsError as e:
                self._fail_tls("client", str(e))
                return b""
        self._maybe_fast_path()
        return data

    def flush_c2s(self) -> bytes:
        if self.client_tls is None and self._up == _PLAIN and self.server_tls is None:
            return self.decoder.flush_client()
        return b""

    def closed(self, reason: str) -> None:
        dec = self.decoder
        dec.close(reason)
        if dec.ssl_refused and not dec.startup_done:
            peer = f"{self.ctx.client[0]}:{self.ctx.client[1]}"
            self.ctx.emit(
                _tls_required(self.state, self.ctx.proxy.name, peer, time.time_ns(), dec.conn)
            )

    # --- plumbing ------------------------------------------------------------------------

    def _maybe_fast_path(self) -> None:
        """Plaintext both ways and past startup: let the relay call the decoder directly."""
        dec = self.decoder
        if (
            dec.startup_done
            and self.client_tls is None
            and self.server_tls is None
            and self._up == _PLAIN
            and not dec.holding
        ):
            self.c2s = dec.feed_client  # type: ignore[method-assign]
            self.s2c = dec.feed_server  # type: ignore[method-assign,assignment]
            self.rewrite_c2s = dec.rewriting
            self.rewrite_s2c = False

    def _to_server(self, plain: bytes) -> bytes:
        if not plain:
            return b""
        if self._up == _NEGOTIATING:
            self._up_queue.append(plain)
            return b""
        if self.server_tls is not None:
            try:
                return self.server_tls.send(plain)
            except TlsError as e:
                self._fail_tls("server", str(e))
                return b""
        return plain

    def _upstream_answer(self, data: bytes) -> bytes:
        """The server's one-byte answer to sniff's own SSLRequest; returns what follows."""
        answer, rest = data[:1], data[1:]
        queued = b"".join(self._up_queue)
        self._up_queue = []
        if answer == b"S":
            s = self.settings
            assert s.upstream_ctx is not None
            self._up = _TLS
            self.server_tls = TlsEndpoint(
                s.upstream_ctx, server_side=False, server_hostname=s.upstream_hostname
            )
            self.decoder.upstream_tls = True
            try:
                hello = self.server_tls.start()
                self.server_tls.send(queued)  # goes out once the handshake is done
            except TlsError as e:
                self._fail_tls("server", str(e))
                return b""
            self.ctx.send_to_server(hello)
            return rest
        self._up = _PLAIN
        if answer == b"N" and self.settings.upstream == "require":
            self._fail(
                f"sniff: the server {self.ctx.server[0]}:{self.ctx.server[1]} does not accept TLS "
                'but this proxy has tls.upstream = "require"',
                'set tls.upstream = "auto" or "off" on this [[proxy]], or enable ssl on the server',
            )
            return b""
        if queued:
            self.ctx.send_to_server(queued)
        if answer == b"N":
            self.state.warn_once(
                "upstream_plain",
                "%s: the server %s:%s does not accept TLS; sniff talks to it in plaintext "
                '(tls.upstream = "auto")',
                self.ctx.proxy.name,
                self.ctx.server[0],
                self.ctx.server[1],
            )
            return rest
        return data  # not an answer byte: an ErrorResponse for the client

    def _fail_tls(self, side: str, why: str) -> None:
        if side == "client":
            msg = f"sniff: TLS with the client failed: {why}"
            hint = "check the client trusts the certificate in this proxy's tls.cert"
        else:
            msg = (
                f"sniff: TLS to the server {self.ctx.server[0]}:{self.ctx.server[1]} failed: {why}"
            )
            hint = 'check tls.ca and tls.server_hostname, or set tls.upstream = "off"'
        self._fail(msg, hint, tell_client=side == "server")

    def _fail(self, message: str, hint: str, tell_client: bool = True) -> None:
        """End the connection with a log line and, when the client can read one, an ErrorResponse.

        A client still busy with its own SSLRequest cannot show an ErrorResponse, so the
        error waits for its StartupMessage (nothing reaches the server meanwhile)."""
        self._failed = True
        log.warning(
            "%s: connection %s: %s (%s)", self.ctx.proxy.name, self.ctx.conn_id, message, hint
        )
        self.ctx.emit(Note(time.time_ns(), self.ctx.conn_id, "postgres.tls_failed", message))
        if not tell_client:
            self.ctx.close(message)
        elif self.decoder.startup_done:
            self._tell_client_and_close(message, hint)
        else:
            self._deferred = (message, hint)

    def _tell_client_and_close(self, message: str, hint: str) -> None:
        self._deferred = None
        err = error_response(message, hint=hint)
        if self.client_tls is not None:
            try:
                err = self.client_tls.send(err)
            except TlsError:
                err = b""
        if err:
            self.ctx.send_to_client(err)
        self.ctx.close(message)


# ``meta`` of a shipped SSLRequest/GSSENCRequest that sniff answered itself: (ANSWERED, client)
ANSWERED = "answered"
_II = struct.Struct(">II")
_FALSE = ("false", "off", "no", "0")


class PostgresCaptureHandler(Handler):
    """``decode = "capture"``: answer SSL/GSSENC requests, relay, ship (see the module doc)."""

    observe = True
    rewrite_c2s = True  # until the first packet that is not an SSL/GSSENC request

    def __init__(self, ctx: ConnContext) -> None:
        super().__init__(ctx)
        self._held = b""  # the start of a packet that may still be a request
        self._off = 0  # client bytes consumed (answered requests)
        self.s2c = ctx.shipper(1)  # type: ignore[method-assign,assignment]

    def c2s(self, data: bytes) -> bytes:
        buf = self._held + data if self._held else data
        self._held = b""
        n = len(buf)
        pos = 0
        ctx = self.ctx
        while True:
            rem = n - pos
            if rem == 0:
                return b""
            if self._off == 0 and buf[0] == 0x16:
                break  # TLS from the first byte (sslnegotiation=direct): the decoder notes it
            if rem < 8:
                if rem >= 4 and buf[pos : pos + 4] != b"\x00\x00\x00\x08":
                    break  # not a request
                self._held = buf[pos:]  # it may still be a request
                return b""
            ln, code = _II.unpack_from(buf, pos)
            if ln != 8 or code not in (SSL_REQUEST, GSSENC_REQUEST):
                break
            ctx.send_to_client(b"N")  # plaintext, please: what the in-line decoder answers
            ctx.ship(0, buf[pos : pos + 8], (ANSWERED, f"{ctx.client[0]}:{ctx.client[1]}"))
            pos += 8
            self._off += 8
        out = buf[pos:] if pos else buf
        self.rewrite_c2s = False
        self.c2s = ctx.shipper(0)  # type: ignore[method-assign,assignment]
        ctx.ship(0, out)
        if _last_decoded(out, self._off == 0):
            self.observe = False  # nothing after this is decoded: a plain pump
        return out

    def flush_c2s(self) -> bytes:
        held, self._held = self._held, b""
        if held:
            self.ctx.ship(0, held)
        return held


def _last_decoded(p: bytes, stream_start: bool) -> bool:
    """The client's first packet (after any answered requests) is all that will be decoded
    of this connection: TLS from the first byte, a CancelRequest, a replication startup."""
    if stream_start and p[:1] == b"\x16":
        return len(p) >= 4  # the decoder decides once it has 4 bytes
    if len(p) < 8:
        return False
    ln, code = _II.unpack_from(p, 0)
    if ln > len(p):
        return False
    if code == CANCEL_REQUEST:
        return True
    if code >> 16 != 3:
        return False
    fields = p[8:ln].split(b"\x00")
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"replication":
            return fields[i + 1].decode("utf-8", "replace").lower() not in _FALSE
    return False


def _nothing(_: bytes) -> None:
    return None


class PostgresRawDecoder:
    """Capture side of ``decode = "capture"``: :class:`PostgresDecoder` over shipped copies,
    with the in-line handler's notes about refused TLS requests."""

    def __init__(
        self,
        decoder: PostgresDecoder,
        state: ProxyState,
        proxy_name: str,
        emit: Callable[[Event], None],
        clock: Callable[[], int],
    ) -> None:
        self.d = decoder
        self.state = state
        self.proxy_name = proxy_name
        self._emit = emit
        self._clock = clock
        self._peer = "?"
        self._c = decoder.feed_client
        self._s = decoder.feed_server

    def feed(self, direction: int, data: bytes, meta: object) -> None:
        if direction:
            self._s(data)
            return
        self._c(data)
        if isinstance(meta, tuple) and meta[:1] == (ANSWERED,):
            # an SSL/GSSENC request the proxy answered 'N' (the server never saw it); the
            # decoder, refusing as in-line, drops it from the stream and notes it
            self._peer = str(meta[1])
            if self.d.ssl_refused:
                _warn_ssl_refused(self.state, self.proxy_name)

    def closed(self, reason: str) -> None:
        dec = self.d
        dec.close(reason)
        if dec.ssl_refused and not dec.startup_done:
            now = self._clock()
            self._emit(_tls_required(self.state, self.proxy_name, self._peer, now, dec.conn))


def raw_decoder(
    conn: int,
    emit: Callable[[Event], None],
    settings: PgSettings,
    state: ProxyState,
    proxy_name: str,
    clock: Callable[[], int],
) -> PostgresRawDecoder:
    """The capture-side decoder: the in-line decoder's options, refusing TLS requests (the
    proxy already answered them), the chunk clock."""
    d = PostgresDecoder(
        conn,
        emit,
        keep_literals=settings.keep_literals,
        inject=False,
        max_statement_bytes=settings.max_statement_bytes,
        ssl_policy="refuse",
        reply=_nothing,
        shared=state,
        proxy_name=proxy_name,
        clock=clock,
    )
    return PostgresRawDecoder(d, state, proxy_name, emit, clock)
