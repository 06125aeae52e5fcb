"""The embedded mitmproxy: HTTP/2 (h2c and over TLS), TLS upstreams, and the
``engine = "mitmproxy"`` reference path.

Strategy. One mitmproxy ``Master`` per process (mitmproxy keeps global
context), created inside sniff's running event loop the first time an HTTP
listener needs it, with its own ``confdir`` in a private temporary directory
(never ``~/.mitmproxy``; removed when the last listener stops). mitmproxy opens *no listening socket*: sniff's own
listener accepts every connection, terminates client TLS itself, looks at the
first bytes, and hands the connections the fast path cannot decode to a
mitmproxy reverse-proxy instance as an asyncio stream pair
(``ServerInstance.handle_stream``). The client's real address therefore reaches
mitmproxy unchanged, and no extra loopback hop is paid.

Routing facts mitmproxy cannot see (the client spoke h2c with prior knowledge,
or negotiated ``h2`` with sniff's TLS) are passed through :class:`SniffAddon`,
which finds each connection by its (peer, local) address pair:

- ``client_connected`` sets the client's ALPN to ``h2`` so mitmproxy's HTTP
  layer starts in HTTP/2 (mitmproxy 11 itself only does HTTP/2 after TLS ALPN);
- ``server_connected`` marks a plain upstream as ``h2`` for prior-knowledge
  clients (the upstream must speak h2c, or the client could not have);
- ``requestheaders`` adds ``traceparent`` when absent and streams both bodies
  through byte counters (never buffered whole);
- ``response``/``error``/``websocket_end`` emit the same
  :class:`~proxies.http.events.HttpExchange` events as the fast path.

Differences from the fast path that a user may see: mitmproxy answers
``Expect: 100-continue`` itself and re-encodes HTTP/1 framing; header names and
values are kept (``keep_host_header`` is on).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxies.http.decoder import product_of
from proxies.http.events import HttpExchange, HttpRequest
from sniff import ids
from sniff.config import Address
from sniff.events import ConnIdentity, ConnOpen, Event

log = logging.getLogger("sniff.http.mitm")


@dataclass(slots=True)
class MitmConn:
    """What sniff knows about a connection it handed to mitmproxy."""

    conn_id: int
    proxy: str
    scheme: str  # what the client spoke to sniff: http | https
    emit: Callable[[Event], None]
    inject: bool = True
    h2: bool = False  # the client speaks HTTP/2 (prior knowledge or ALPN h2)
    h2c_upstream: bool = False  # speak HTTP/2 prior knowledge to a plain upstream
    upstream_tls: bool = False
    upstream_verify: bool = True
    user_agents: dict[str, str] = field(default_factory=dict)
    policy: dict[str, Any] | None = None  # Policy.spec(), carried by the events
    identity_sent: bool = False
    opened: ConnOpen | None = None  # emitted once the upstream end is known
    held: list[Event] = field(default_factory=list)  # events that must follow it


class _FlowState:
    __slots__ = ("emitted", "ex", "info", "req", "resp", "ws_c2s", "ws_s2c")

    def __init__(self, ex: HttpExchange, info: MitmConn) -> None:
        self.ex = ex
        self.info = info
        self.req = 0
        self.resp = 0
        self.ws_c2s = 0
        self.ws_s2c = 0
        self.emitted = False

    def count_req(self, data: bytes) -> bytes:
        self.req += len(data)
        return data

    def count_resp(self, data: bytes) -> bytes:
        self.resp += len(data)
        return data


def _ns(ts: float | None) -> int:
    return int(ts * 1e9) if ts else time.time_ns()


def _head(start: str, fields: Any, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    lines = [start.encode("latin-1")]
    for k, v in fields:
        lines.append(bytes(k) + b": " + bytes(v))
    for k, v in extra or ():
        lines.append(k + b": " + v)
    return b"\r\n".join(lines)


class SniffAddon:
    """mitmproxy addon: routing hints in, HttpExchange events out."""

    def __init__(self) -> None:
        self.by_addr: dict[tuple[Any, Any], MitmConn] = {}
        self.by_client: dict[str, MitmConn] = {}
        self.inflight: dict[int, _FlowState] = {}

    def announce(self, cutoff: int) -> None:
        """Early notice of requests in flight since before ``cutoff`` (see HttpRequest)."""
        for st in list(self.inflight.values()):
            ex = st.ex
            if ex.ts < cutoff and not ex.announced:
                ex.announced = True
                self._emit(
                    st.info,
                    HttpRequest(
                        ex.ts, ex.conn, ex.proxy, ex.method, ex.trace_id, ex.span_id,
                        ex.parent_span_id, req_head=ex.req_head, policy=st.info.policy,
                    ),
                )  # fmt: skip

    # --- connections -----------------------------------------------------------------

    def client_connected(self, client: Any) -> None:
        info = self.by_addr.get((client.peername, client.sockname))
        if info is None:
            return
        self.by_client[client.id] = info
        if info.h2:
            client.alpn = b"h2"

    def client_disconnected(self, client: Any) -> None:
        info = self.by_client.pop(client.id, None)
        if info is not None:
            self.by_addr.pop((client.peername, client.sockname), None)

    def server_connect(self, data: Any) -> None:
        info = self.by_client.get(data.client.id)
        if info is not None and info.upstream_tls and not data.server.alpn_offers:
            data.server.alpn_offers = (b"h2", b"http/1.1") if info.h2 else (b"http/1.1",)

    def server_connected(self, data: Any) -> None:
        info = self.by_client.get(data.client.id)
        if info is None:
            return
        if info.h2c_upstream and not info.upstream_tls:
            data.server.alpn = b"h2"
        self.open(info, data.server.sockname)

    @staticmethod
    def open(info: MitmConn, ours: Any = None) -> None:
        """Emit the connection's ConnOpen (once), with our end of the upstream
        connection when known, then what was held until it (the User-Agent)."""
        ev = info.opened
        if ev is None:
            return
        info.opened = None
        if ours:
            ev.upstream_local_addr, ev.upstream_local_port = str(ours[0]), int(ours[1])
        info.emit(ev)
        for held in info.held:
            info.emit(held)
        info.held.clear()

    def _emit(self, info: MitmConn, ev: Event) -> None:
        if info.opened is not None:
            info.held.append(ev)  # before the ConnOpen: keep the order
        else:
            info.emit(ev)

    def tls_start_server(self, tls_start: Any) -> None:
        # runs after mitmproxy's tlsconfig (added later), which built ssl_conn
        info = self.by_client.get(tls_start.context.client.id)
        if info is not None and not info.upstream_verify and tls_start.ssl_conn is not None:
            from OpenSSL import SSL

            tls_start.ssl_conn.set_verify(SSL.VERIFY_NONE, None)

    # --- HTTP ------------------------------------------------------------------------

    def requestheaders(self, flow: Any) -> None:
        info = self.by_client.get(flow.client_conn.id)
        if info is None:
            return
        req = flow.request
        ts = _ns(req.timestamp_start)
        h2 = req.is_http2
        version = "2" if h2 else req.http_version.partition("/")[2] or "1.1"
        extra = []
        if h2 and "host" not in req.headers and req.authority:
            extra.append((b"host", req.authority.encode("idna")))
        head = _head(f"{req.method} {req.path} {req.http_version}", req.headers.fields, extra)
        vals = req.headers.get_all("traceparent")
        parent = None
        note = None
        injected = False
        tp: str | None = None
        if vals:
            parsed = ids.parse_traceparent(vals[0]) if len(vals) == 1 else None
            if parsed is not None:
                trace_id, parent = parsed[0], parsed[1]
            else:
                trace_id = ids.new_trace_id()
                note = (
                    "several traceparent headers; left unchanged"
                    if len(vals) > 1
                    else "invalid traceparent; left unchanged"
                )
            tp = vals[0]
            span_id = ids.new_span_id()
        else:
            trace_id = ids.new_trace_id()
            span_id = ids.new_span_id()
            if info.inject:
                tp = f"00-{trace_id}-{span_id}-01"
                req.headers["traceparent"] = tp
                injected = True
        upgrade = None
        if req.method == "CONNECT":
            upgrade = "connect"
        elif "upgrade" in req.headers and "upgrade" in req.headers.get("connection", "").lower():
            upgrade = req.headers["upgrade"]
        ex = HttpExchange(
            ts,
            info.conn_id,
            info.proxy,
            info.scheme,
            version,
            req.method,
            0,
            trace_id,
            span_id,
            parent,
            tp,
            injected,
            engine="mitmproxy",
            inject_note=note,
            upgrade=upgrade,
            req_head=head,
            policy=info.policy,
        )
        st = _FlowState(ex, info)
        flow.metadata["sniff"] = st
        self.inflight[id(st)] = st
        req.stream = st.count_req
        if not info.identity_sent:
            info.identity_sent = True
            ua = req.headers.get("user-agent")
            if ua:
                product = product_of(ua)
                low = ua.lower()
                for pattern, name in info.user_agents.items():
                    if pattern.lower() in low:
                        product = name
                        break
                if product:
                    self._emit(
                        info,
                        ConnIdentity(
                            ts,
                            info.conn_id,
                            "http.user_agent",
                            {"product": product, "user_agent": ua},
                        ),
                    )

    def responseheaders(self, flow: Any) -> None:
        st: _FlowState | None = flow.metadata.get("sniff")
        if st is not None:
            flow.response.stream = st.count_resp

    def _finish(self, flow: Any, st: _FlowState) -> None:
        ex = st.ex
        req = flow.request
        resp = flow.response
        ex.req_body_size = max(st.req, len(req.raw_content or b""))
        if resp is not None:
            ex.status = resp.status_code
            ex.ts_response = _ns(resp.timestamp_start)
            ex.resp_body_size = max(st.resp, len(resp.raw_content or b""))
            ex.resp_head = _head(
                f"{resp.http_version} {resp.status_code} {resp.reason}", resp.headers.fields
            )
            if resp.status_code != 101 and ex.upgrade != "connect":
                ex.upgrade = None
        self.inflight.pop(id(st), None)
        self._emit(st.info, ex)
        st.emitted = True

    def response(self, flow: Any) -> None:
        st: _FlowState | None = flow.metadata.get("sniff")
        if st is None or st.emitted:
            return
        if flow.websocket is not None:
            return  # one exchange for the whole WebSocket, at websocket_end
        st.ex.ts_end = _ns(flow.response.timestamp_end)
        self._finish(flow, st)

    def error(self, flow: Any) -> None:
        st: _FlowState | None = flow.metadata.get("sniff")
        if st is None or st.emitted:
            return
        ex = st.ex
        ex.ts_end = time.time_ns()
        if flow.request.timestamp_end is None:
            ex.error = "incomplete_request"
            ex.req_complete = False
        elif flow.response is None:
            ex.error = "no_response"
        else:
            ex.error = "incomplete_response"
        ex.error_message = str(flow.error.msg) if flow.error is not None else None
        self._finish(flow, st)

    def websocket_message(self, flow: Any) -> None:
        st: _FlowState | None = flow.metadata.get("sniff")
        ws = flow.websocket
        if st is None or ws is None or not ws.messages:
            return
        for m in ws.messages:
            if m.from_client:
                st.ws_c2s += len(m.content)
            else:
                st.ws_s2c += len(m.content)
        ws.messages.clear()  # counted; do not keep every message in memory

    def websocket_end(self, flow: Any) -> None:
        st: _FlowState | None = flow.metadata.get("sniff")
        if st is None or st.emitted:
            return
        self.websocket_message(flow)
        ex = st.ex
        ex.ts_end = time.time_ns()
        ex.upgrade = "websocket"
        ex.tunnel_c2s = st.ws_c2s
        ex.tunnel_s2c = st.ws_s2c
        self._finish(flow, st)


class _CountingTransport:
    """What mitmproxy writes to the client goes through here, to be counted."""

    __slots__ = ("_t", "sent")

    def __init__(self, t: asyncio.Transport) -> None:
        self._t = t
        self.sent = 0

    def write(self, data: bytes) -> None:
        self.sent += len(data)
        self._t.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class _CountingReaderProtocol(asyncio.StreamReaderProtocol):
    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.received = 0
        self.client_eof = False

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        return bool(super().eof_received())


@dataclass(slots=True, eq=False)
class Handoff:
    """A connection being served by mitmproxy (for ConnClose and shutdown)."""

    task: asyncio.Task[None]
    transport: asyncio.Transport
    protocol: _CountingReaderProtocol
    writer: _CountingTransport
    key: tuple[Any, Any]


class MitmEngine:
    """The process's one mitmproxy Master, shared by every HTTP listener."""

    _engine: MitmEngine | None = None
    _users = 0
    _lock: asyncio.Lock | None = None

    def __init__(self, master: Any, addon: SniffAddon, confdir: Path) -> None:
        self.master = master
        self.addon = addon
        self.confdir = confdir
        self._instances: dict[str, Any] = {}
        self._cas: list[str] = []

    @classmethod
    async def acquire(cls) -> MitmEngine:
        if cls._lock is None:
            cls._lock = asyncio.Lock()
        async with cls._lock:
            if cls._engine is None:
                # mitmproxy insists on a confdir with a CA of its own; sniff never
                # uses it (client TLS is sniff's), so it lives in a private temporary
                # directory, removed at shutdown: never ~/.mitmproxy, never the cwd
                confdir = Path(tempfile.mkdtemp(prefix="sniff-mitmproxy-"))
                cls._engine = await cls._create(confdir)
            cls._users += 1
            return cls._engine

    async def release(self) -> None:
        cls = type(self)
        cls._users -= 1
        if cls._users > 0 or cls._engine is not self:
            return
        cls._engine = None
        try:
            await self.master.done()
        except Exception:
            log.exception("mitmproxy shutdown failed")
        shutil.rmtree(self.confdir, ignore_errors=True)

    @classmethod
    async def _create(cls, confdir: Path) -> MitmEngine:
        from mitmproxy import addons, options
        from mitmproxy.addons import disable_h2c
        from mitmproxy.master import Master

        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
        confdir.mkdir(parents=True, exist_ok=True)
        opts: Any = options.Options(confdir=str(confdir), mode=[])
        master: Any = Master(opts)
        addon = SniffAddon()
        defaults: Any = addons.default_addons
        # mitmproxy's own h2c blocker would kill prior-knowledge flows sniff routes here
        master.addons.add(*[a for a in defaults() if not isinstance(a, disable_h2c.DisableH2C)])
        master.addons.add(addon)  # last: its tls_start_server runs after tlsconfig's
        opts.update(
            keep_host_header=True,
            connection_strategy="lazy",
            http2=True,
            websocket=True,
            rawtcp=True,
        )
        await master.running()
        return cls(master, addon, confdir)

    def trust_upstream_ca(self, path: str) -> None:
        """Add a CA bundle for upstream TLS verification (shared by all proxies)."""
        if path in self._cas:
            return
        self._cas.append(path)
        bundle = self.confdir / "upstream-ca-bundle.pem"
        bundle.write_bytes(b"\n".join(Path(p).read_bytes() for p in self._cas))
        self.master.options.update(ssl_verify_upstream_trusted_ca=str(bundle))

    def instance(self, upstream: Address, tls: bool) -> Any:
        from mitmproxy.proxy.mode_servers import ServerInstance

        host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
        spec = f"reverse:{'https' if tls else 'http'}://{host}:{upstream.port}"
        inst = self._instances.get(spec)
        if inst is None:
            inst = ServerInstance.make(spec, self.master.addons.get("proxyserver"))
            self._instances[spec] = inst
        return inst

    def handle(
        self, transport: asyncio.Transport, first: bytes, info: MitmConn, instance: Any
    ) -> Handoff:
        """Serve ``transport`` (already accepted, ``first`` already read) with mitmproxy."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16)
        proto = _CountingReaderProtocol(reader)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if first:
            proto.data_received(first)
        counting = _CountingTransport(transport)
        writer = asyncio.StreamWriter(counting, proto, reader, loop)  # type: ignore[arg-type]
        key = (transport.get_extra_info("peername"), transport.get_extra_info("sockname"))
        self.addon.by_addr[key] = info
        task = loop.create_task(instance.handle_stream(reader, writer))
        return Handoff(task, transport, proto, counting, key)

    def forget(self, key: tuple[Any, Any]) -> None:
        self.addon.by_addr.pop(key, None)
