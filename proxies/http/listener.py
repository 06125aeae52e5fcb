"""The ``http``/``https`` listener: one socket, three paths per connection.

Strategy. Every accepted connection starts with a tiny router protocol that
waits for the client's first bytes (HTTP clients always speak first), then
picks a path and steps aside (``transport.set_protocol``):

- **fast path** (the default for HTTP/1.x): a :class:`sniff.relay.RelayConnection`
  with :class:`~proxies.http.handler.HttpCaptureHandler` (``decode = "capture"``:
  adds only the ``traceparent`` line and ships a copy of the bytes to the
  capture process, which decodes them) or :class:`~proxies.http.handler.HttpHandler`
  (``decode = "inline"``: decodes a copy on the relay). The upstream
  connection is opened once the first bytes are in (as nginx does), which costs
  one loopback connect on the first request of a connection only;
- **mitmproxy** (:mod:`proxies.http.mitm`): connections that start with the
  HTTP/2 preface (h2c with prior knowledge), TLS connections that negotiated
  ALPN ``h2``, every connection of a proxy with ``upstream_tls`` (the relay
  speaks plain TCP upstream), and every connection when ``engine = "mitmproxy"``;
- **passthrough** (plain relay, a ``core.note`` says why): a TLS ClientHello on
  a plain ``http`` listener, or HTTP/2 when ``http2 = false``.

``https`` listeners terminate TLS here with the event loop's TLS (uvloop's,
when installed) before routing, so HTTP/1.1 over TLS keeps the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxies.http.decoder import ANNOUNCE_AFTER_NS, PREFACE
from proxies.http.handler import HttpCaptureHandler, HttpHandler
from proxies.http.mitm import Handoff, MitmConn, MitmEngine
from sniff.config import ProxyConfig
from sniff.events import ConnClose, ConnOpen, Note, ProxyStart, new_conn_id
from sniff.relay import (
    ConnContext,
    EventSink,
    Handler,
    HandlerFactory,
    ListenError,
    RelayConnection,
    RelayListener,
    TeeBase,
    describe_listen_error,
)

log = logging.getLogger("sniff.http")

SWEEP_INTERVAL = 0.5


class _Variant:
    """A RelayListener look-alike with another handler factory (for passthrough
    connections); it shares the listener's config, sink and connection set."""

    def __init__(self, parent: HttpListener, factory: HandlerFactory) -> None:
        self.parent = parent
        self.cfg = parent.cfg
        self.sink = parent.sink
        self.conns = parent.conns
        self.handler_factory = factory

    @property
    def total(self) -> int:
        return self.parent.total

    @total.setter
    def total(self, value: int) -> None:
        self.parent.total = value


class _Bound(TeeBase, asyncio.Protocol):
    """Socket callbacks for a routed connection, straight to its RelayConnection: the
    client's side of it (``data_received``, from the C base, calls ``from_client``, or
    in the relay's fast modes forwards in C; see sniff.relay._Side)."""

    __slots__ = ("conn",)

    def __init__(self, conn: RelayConnection) -> None:
        self.conn = conn
        self.slow = conn.from_client
        conn.c_side = self

    def eof_received(self) -> bool:
        return self.conn.eof(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(True, exc)

    def pause_writing(self) -> None:
        self.conn.pause_other(True)

    def resume_writing(self) -> None:
        self.conn.resume_other(True)


class _BoundTLS(_Bound):
    """The same over sniff's TLS: asyncio cannot half-close TLS, so a client EOF
    ends the connection (returning True would only draw a warning)."""

    __slots__ = ()

    def eof_received(self) -> bool:
        self.conn.eof(True)
        return False


class _Router(asyncio.Protocol):
    """Holds a new connection until its first bytes say which path it takes."""

    __slots__ = ("alpn", "buf", "lst", "t")

    def __init__(self, lst: HttpListener) -> None:
        self.lst = lst
        self.t: asyncio.Transport | None = None
        self.buf = b""
        self.alpn: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]
        self.t = t
        lst = self.lst
        lst.routers.add(self)
        if lst.ssl_ctx is not None:
            obj = t.get_extra_info("ssl_object")
            self.alpn = obj.selected_alpn_protocol() if obj is not None else None
        if lst.all_mitm:
            self._to_mitm(self.alpn == "h2", prior_knowledge=False)
        elif self.alpn == "h2":
            self._to_mitm(True, prior_knowledge=False)

    def data_received(self, data: bytes) -> None:
        b = self.buf + data if self.buf else data
        if len(b) < len(PREFACE) and PREFACE.startswith(b):
            self.buf = b
            return
        self.buf = b""
        lst = self.lst
        if b.startswith(PREFACE):
            if lst.http2:
                self._to_mitm(True, prior_knowledge=True, first=b)
            else:
                self._to_relay(
                    b, "HTTP/2 with prior knowledge and http2 = false: relayed undecoded"
                )
        elif lst.ssl_ctx is None and b[0] == 0x16:
            self._to_relay(
                b,
                "TLS on a plain http listener: relayed undecoded "
                '(use protocol = "https" to decode it)',
            )
        else:
            self._to_relay(b, None)

    def eof_received(self) -> bool:
        b, self.buf = self.buf, b""
        conn = self._to_relay(b, None)
        return conn.eof(True) if conn is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lst.routers.discard(self)

    def _to_relay(self, first: bytes, note: str | None) -> RelayConnection | None:
        lst = self.lst
        t = self.t
        lst.routers.discard(self)
        if t is None or t.is_closing():
            return None
        target: Any = lst if note is None else lst.passthrough(note)
        conn = RelayConnection(target)
        conn.accepted(t)
        t.set_protocol(_BoundTLS(conn) if lst.ssl_ctx is not None else _Bound(conn))
        if first:
            conn.from_client(first)
        return conn

    def _to_mitm(self, h2: bool, prior_knowledge: bool, first: bytes = b"") -> None:
        lst = self.lst
        t = self.t
        lst.routers.discard(self)
        if t is None or t.is_closing():
            return
        lst.hand_to_mitm(t, first, h2, prior_knowledge)


class HttpListener(RelayListener):
    """Accepts clients on ``cfg.listen``; routes each to the fast path, mitmproxy or passthrough."""

    def __init__(self, cfg: ProxyConfig, sink: EventSink, settings: dict[str, Any]) -> None:
        handler: Callable[[ConnContext, dict[str, Any]], Handler] = (
            HttpCaptureHandler if settings.get("capture") else HttpHandler
        )
        super().__init__(cfg, sink, lambda ctx: handler(ctx, settings))
        self.settings = settings
        self.https = cfg.protocol == "https"
        self.http2: bool = bool(cfg.options["http2"])
        self.upstream_tls: bool = bool(cfg.options["upstream_tls"])
        self.all_mitm = cfg.options["engine"] == "mitmproxy" or self.upstream_tls
        self.state_dir = Path(cfg.options["state_dir"])
        self.ssl_ctx: Any = None
        self.mitm: MitmEngine | None = None
        self.mitm_instance: Any = None
        self.routers: set[_Router] = set()
        self.handoffs: set[Handoff] = set()
        self._variants: dict[str, _Variant] = {}
        self.messages: list[str] = []
        self._sweeper: asyncio.Task[None] | None = None

    # --- start / stop --------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        if self.https:
            self.ssl_ctx = self._tls_context()
        if self.http2 or self.all_mitm:
            self.mitm = await MitmEngine.acquire()
            self.mitm_instance = self.mitm.instance(cfg.upstream, self.upstream_tls)
            if cfg.options["upstream_ca"]:
                self.mitm.trust_upstream_ca(cfg.options["upstream_ca"])
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                lambda: _Router(self),
                cfg.listen.host,
                cfg.listen.port,
                reuse_address=True,
                backlog=1024,
                ssl=self.ssl_ctx,
            )
        except OSError as e:
            await self._release_mitm()
            raise ListenError(describe_listen_error(cfg, e)) from None
        for msg in self.messages:
            print(f"sniff: {cfg.name}: {msg}", flush=True)
        self._sweeper = loop.create_task(self._sweep())
        self.sink.emit(
            ProxyStart(
                time.time_ns(),
                0,
                cfg.name,
                cfg.protocol,
                str(cfg.listen),
                str(cfg.upstream),
                cfg.inject,
            )
        )

    def _tls_context(self) -> Any:
        from proxies.http import tls

        opts = self.cfg.options
        if opts["tls_cert"]:
            cert, key = opts["tls_cert"], opts["tls_key"]
        else:
            label = f"{self.cfg.name}-{self.cfg.listen.port}"
            cert_p, key_p, ca = tls.ensure_leaf(self.state_dir / "tls", label, self.cfg.listen.host)
            cert, key = str(cert_p), str(key_p)
            self.messages.append(f"TLS certificate {cert} generated by sniff; {tls.trust_hint(ca)}")
        return tls.server_context(cert, key, self.http2)

    async def _sweep(self) -> None:
        """Twice a second: emit the exchanges each connection holds for batching
        (HttpExchanges), and announce slow requests (HttpRequest) so that their
        units of work are known to the correlator while they are still in flight.
        Cost: a walk over the open connections, nothing per request."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            cutoff = time.time_ns() - ANNOUNCE_AFTER_NS
            # decode = "capture": nothing to do here, the capture process ticks its decoders
            for conn in [] if self.settings.get("capture") else list(self.conns):
                h = conn.handler
                if isinstance(h, HttpHandler):
                    try:
                        h.decoder.flush_events()
                        h.decoder.announce(cutoff)
                    except Exception:  # never let telemetry stop the sweep
                        log.exception("%s: announcing in-flight requests failed", self.cfg.name)
            if self.mitm is not None and self.handoffs:
                self.mitm.addon.announce(cutoff)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for r in list(self.routers):
            if r.t is not None:
                r.t.close()
        self.routers.clear()
        pending = [h.task for h in self.handoffs]
        for h in list(self.handoffs):
            h.transport.close()
        if pending:
            _, still = await asyncio.wait(pending, timeout=2.0)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        await super().stop()
        await self._release_mitm()

    async def _release_mitm(self) -> None:
        if self.mitm is not None:
            mitm, self.mitm = self.mitm, None
            await mitm.release()

    # --- paths ---------------------------------------------------------------------------

    def passthrough(self, why: str) -> _Variant:
        v = self._variants.get(why)
        if v is None:

            def factory(ctx: ConnContext) -> Handler:
                ctx.emit(Note(time.time_ns(), ctx.conn_id, "http.passthrough", why))
                return Handler(ctx)

            v = self._variants[why] = _Variant(self, factory)
        return v

    def hand_to_mitm(
        self, t: asyncio.Transport, first: bytes, h2: bool, prior_knowledge: bool
    ) -> None:
        cfg = self.cfg
        if self.mitm is None:  # http2 = false and the fast path is in charge
            conn = RelayConnection(self.passthrough("HTTP/2 needs mitmproxy: relayed undecoded"))  # type: ignore[arg-type]
            conn.accepted(t)
            t.set_protocol(_BoundTLS(conn) if self.ssl_ctx is not None else _Bound(conn))
            if first:
                conn.from_client(first)
            return
        conn_id = new_conn_id()
        peer = t.get_extra_info("peername") or ("?", 0)
        sock = t.get_extra_info("sockname") or (cfg.listen.host, cfg.listen.port)
        self.total += 1
        info = MitmConn(
            conn_id,
            cfg.name,
            "https" if self.https else "http",
            self.sink.emit,
            inject=cfg.inject,
            h2=h2,
            h2c_upstream=h2 and prior_knowledge,
            upstream_tls=self.upstream_tls,
            upstream_verify=bool(cfg.options["upstream_verify"]),
            user_agents=dict(cfg.options["user_agents"]),
            policy=self.settings.get("policy"),
            # emitted when mitmproxy has connected upstream (our end of that
            # connection names the server's process), or at the latest when the
            # connection ends; nothing about the connection is emitted before it
            opened=ConnOpen(
                time.time_ns(),
                conn_id,
                cfg.name,
                cfg.protocol,
                str(peer[0]),
                int(peer[1]),
                cfg.upstream.host,
                cfg.upstream.port,
                str(sock[0]),
                int(sock[1]),
            ),
        )
        handoff = self.mitm.handle(t, first, info, self.mitm_instance)
        self.handoffs.add(handoff)
        mitm = self.mitm

        def done(_: object) -> None:
            self.handoffs.discard(handoff)
            mitm.forget(handoff.key)
            mitm.addon.open(info)
            by = "client" if handoff.protocol.client_eof else "proxy"
            with contextlib.suppress(Exception):
                handoff.transport.close()
            self.sink.emit(
                ConnClose(
                    time.time_ns(),
                    conn_id,
                    "connection ended (mitmproxy)",
                    by,
                    handoff.protocol.received,
                    handoff.writer.sent,
                )
            )

        handoff.task.add_done_callback(done)
