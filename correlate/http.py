"""HTTP exchanges -> SERVER spans, one per request, as the proxied service.

Strategy. The proxies already pair each request with its response on a
connection and emit one :class:`~proxies.http.events.HttpExchange` when the
exchange is over, so this builder holds no in-flight state: each event becomes
one SERVER span at once.

- ``service.name`` is the *proxied* service (the proxy's ``name``, e.g.
  ``nova-api``); the calling component, resolved by the engine from the
  config's address map, the peer's process or its User-Agent, goes in
  ``sniff.client.service`` next to ``client.address`` and ``user_agent.original``.
- The span id is the one sniff put in the ``traceparent`` it sent upstream, so
  whatever the upstream does next (an instrumented client, another sniff proxy
  that sees the header) joins this trace; a client that sent a valid
  ``traceparent`` becomes the parent.
- Names and attributes follow the stable HTTP semantic conventions: the name is
  ``"{method} {http.route}"`` (``"HTTP"`` for non-standard methods), 5xx and
  exchanges cut short (``error``) are errors, 4xx is not (a server span).
  Request-id headers become ``http.request.header.<name>`` /
  ``http.response.header.<name>`` string arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from correlate import shared_ids
from correlate.model import Span, SpanEvent
from exporters import semconv as sc
from proxies.http.events import HttpExchange, HttpExchanges, HttpRequest
from sniff.events import Event

if TYPE_CHECKING:
    from correlate.engine import Correlator
    from correlate.identity import ConnInfo

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)


def split_host(host: str | None, scheme: str) -> tuple[str | None, int | None]:
    """``Host`` header value -> (server.address, server.port)."""
    if not host:
        return None, None
    default = 443 if scheme == "https" else 80
    if host.startswith("["):
        addr, _, rest = host[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        addr, _, port_s = host.partition(":")
    else:
        addr, port_s = host, ""
    try:
        port = int(port_s) if port_s else default
    except ValueError:
        port = default
    return addr or None, port


class HttpSpans:
    def __init__(self, engine: Correlator) -> None:
        self.e = engine
        # span id -> start ts of requests announced in flight (HttpRequest) whose
        # exchange has not come yet: their unit of work is already registered
        self.started: dict[str, int] = {}

    def feed(self, ev: Event) -> None:
        if isinstance(ev, HttpExchanges):
            for item in ev.exchanges():
                self._exchange(item)
        elif isinstance(ev, HttpExchange):
            self._exchange(ev)
        elif isinstance(ev, HttpRequest):
            self._early(ev)

    def _early(self, ev: HttpRequest) -> None:
        if ev.req_head is not None:
            ev.prepare()
        causal = getattr(self.e, "causal", None)
        if causal is None or ev.span_id in self.started:
            return
        self.started[ev.span_id] = ev.ts
        placeholder = Span(
            ev.trace_id, ev.span_id, ev.parent_span_id, ev.method, "SERVER", ev.ts, ev.ts,
            ev.proxy, conn=ev.conn,
        )  # fmt: skip
        causal.unit_start(ev.conn, "server", placeholder, ev.ts, shared_ids.values(ev.shared_ids))

    def _exchange(self, ev: HttpExchange) -> None:
        """The SERVER span is a unit of work of the server (what the service was asked)
        and a call of the client component (what the caller asked of it)."""
        span = self.span(ev)
        causal = getattr(self.e, "causal", None)
        if causal is not None:
            ids = shared_ids.values(ev.shared_ids)
            if self.started.pop(ev.span_id, None) is None:
                causal.unit_start(ev.conn, "server", span, ev.ts, ids)
            more = shared_ids.values(ev.response_shared_ids)
            if more:
                causal.unit_ids(ev.span_id, ev.ts_response or span.end, more)
            causal.unit_end(ev.span_id, span.end)
            # the caller sent the request just before the server began on it: a nudge of
            # 1 ns keeps the span from being taken for its own caller when both ends
            # are one component (a service calling itself through sniff)
            causal.call(span, ev.conn, ev.ts - 1, ids, decided=ev.parent_span_id is not None)
        self.e.emit(span)

    def conn_closed(self, info: ConnInfo, ts: int, reason: str) -> None:
        """Nothing in flight here: the proxy reports cut exchanges itself."""

    def expire(self, now: int) -> None:
        if self.started:
            limit = now - getattr(self.e, "ttl_ns", 10 * 60 * 10**9)
            for sid in [s for s, ts in self.started.items() if ts < limit]:
                del self.started[sid]
                self.e.expired()

    def flush(self, now: int) -> None:
        pass

    def span(self, ev: HttpExchange) -> Span:
        if ev.req_head is not None or ev.resp_head is not None:
            ev.prepare()  # an event that did not go through the capture writer
        info = self.e.conn(ev.conn)
        client_service, _ = self.e.service(info)
        service = ev.proxy or (info.proxy if info is not None else "http")
        method = ev.method
        a: dict[str, Any] = {
            sc.NETWORK_PROTOCOL_NAME: "http",
            sc.NETWORK_PROTOCOL_VERSION: ev.version,
            sc.URL_SCHEME: ev.scheme,
            sc.HTTP_REQUEST_BODY_SIZE: ev.req_body_size,
            sc.SNIFF_CONN: ev.conn,
            sc.SNIFF_INJECTED: ev.injected,
            sc.SNIFF_HTTP_ENGINE: ev.engine,
            sc.SNIFF_CLIENT_SERVICE: client_service,
        }
        if method in KNOWN_METHODS:
            a[sc.HTTP_REQUEST_METHOD] = method
            name_method = method
        else:
            a[sc.HTTP_REQUEST_METHOD] = "_OTHER"
            a[sc.HTTP_REQUEST_METHOD_ORIGINAL] = method
            name_method = "HTTP"
        if ev.path is not None:
            a[sc.URL_PATH] = ev.path
        if ev.query is not None:
            a[sc.URL_QUERY] = ev.query
        if ev.route:
            a[sc.HTTP_ROUTE] = ev.route
            a[sc.SNIFF_HTTP_ROUTE_SOURCE] = ev.route_source
        if ev.status is not None:
            a[sc.HTTP_RESPONSE_STATUS_CODE] = ev.status
            a[sc.HTTP_RESPONSE_BODY_SIZE] = ev.resp_body_size
        addr, port = split_host(ev.host, ev.scheme)
        if addr is not None:
            a[sc.SERVER_ADDRESS] = addr
            a[sc.SERVER_PORT] = port
        if info is not None:
            a[sc.NETWORK_PEER_ADDRESS] = info.client_addr
            a[sc.NETWORK_PEER_PORT] = info.client_port
            if ev.forwarded_for:
                a[sc.CLIENT_ADDRESS] = ev.forwarded_for
            else:
                a[sc.CLIENT_ADDRESS] = info.client_addr
                a[sc.CLIENT_PORT] = info.client_port
            if addr is None:
                a[sc.SERVER_ADDRESS] = info.server_addr
                a[sc.SERVER_PORT] = info.server_port
        elif ev.forwarded_for:
            a[sc.CLIENT_ADDRESS] = ev.forwarded_for
        if ev.user_agent:
            a[sc.USER_AGENT_ORIGINAL] = ev.user_agent
        for k, v in (ev.request_ids or {}).items():
            a[sc.HTTP_REQUEST_HEADER_PREFIX + k] = [v]
        for k, v in (ev.response_ids or {}).items():
            a[sc.HTTP_RESPONSE_HEADER_PREFIX + k] = [v]
        if ev.inject_note:
            a[sc.SNIFF_INJECT_NOTE] = ev.inject_note
        if ev.parent_span_id is not None:
            a[sc.SNIFF_CORRELATION_METHOD] = "propagated"
            a[sc.SNIFF_CORRELATION_CONFIDENCE] = 1.0
        if ev.upgrade:
            a[sc.SNIFF_HTTP_UPGRADE] = ev.upgrade
            a[sc.SNIFF_HTTP_TUNNEL_C2S] = ev.tunnel_c2s
            a[sc.SNIFF_HTTP_TUNNEL_S2C] = ev.tunnel_s2c
        if ev.interim:
            a[sc.SNIFF_HTTP_INTERIM] = [str(s) for s in ev.interim]
        if not ev.req_complete:
            a[sc.SNIFF_HTTP_INCOMPLETE_REQUEST] = True
        status = "UNSET"
        message = ""
        if ev.error:
            status = "ERROR"
            a[sc.ERROR_TYPE] = ev.error
            message = ev.error_message or ev.error
        elif ev.status is not None and ev.status >= 500:
            status = "ERROR"
            a[sc.ERROR_TYPE] = str(ev.status)
        events = []
        if ev.ts_response:
            events.append(SpanEvent(ev.ts_response, "http.response.head", {}))
        name = f"{name_method} {ev.route}" if ev.route else name_method
        return Span(
            ev.trace_id,
            ev.span_id,
            ev.parent_span_id,
            name,
            "SERVER",
            ev.ts,
            max(ev.ts_end, ev.ts),
            service,
            a,
            {"service.name": service},
            status,
            message,
            events=events,
            conn=ev.conn,
        )
