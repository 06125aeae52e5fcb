"""The events both HTTP paths emit: one :class:`HttpExchange` per request/response pair.

Strategy. The hot path (the HTTP/1.1 fast path or the mitmproxy addon) fills
only the wire facts it already has in hand: timestamps, method, version, status,
body sizes, the span ids it made and the ``traceparent`` it sent upstream, and
the raw request and response *heads* (``req_head``/``resp_head``). Everything
that costs Python time per header (splitting the target into path and query,
redacting query parameters and secret headers, picking request ids, shared ids
and the recorded header subset, route templating) runs in ``prepare()``, which
the capture writer's thread calls before the event is stored or correlated.
``prepare`` always drops the raw heads, so the capture never holds a secret
header or query value in clear (see :mod:`proxies.http.policy`).

An exchange is finished when the response's last byte (and the request's) was
seen, or when the connection ended first (``error`` says which part was
missing), or, for a connection that switched protocols (WebSocket, CONNECT),
when the tunnel closed. The fast path emits finished exchanges in per-connection
batches (:class:`HttpExchanges`, stored as compact rows: one capture row per
batch instead of one per request); the mitmproxy path emits single
:class:`HttpExchange` events. :class:`HttpRequest` is the early notice of a slow
request, so the correlator knows its unit of work while it is still running.
"""

from __future__ import annotations

import operator
import time
from dataclasses import field
from dataclasses import fields as dc_fields
from typing import Any, ClassVar

from sniff.events import Event, event


@event("http.exchange")
class HttpExchange(Event):
    """One HTTP request and its final response, as one SERVER span of ``proxy``."""

    needs_prepare: ClassVar[bool] = True

    proxy: str  # the proxied service (the [[proxy]] name): the span's service.name
    scheme: str  # http | https (what the client spoke to sniff)
    version: str  # 1.0 | 1.1 | 2
    method: str
    ts_end: int  # the last byte of the exchange (or when the connection ended)
    trace_id: str  # of sniff's SERVER span
    span_id: str
    parent_span_id: str | None  # the client's span when it sent a valid traceparent
    traceparent: str | None  # what the upstream received (ours, the client's, or none)
    injected: bool
    engine: str = "fast"  # fast (HTTP/1.1 relay) | mitmproxy (HTTP/2, TLS upstream...)
    inject_note: str | None = None  # why no traceparent was added, when one was not
    status: int | None = None  # final status code; None when no response came
    ts_response: int | None = None  # when the final response head was complete
    req_body_size: int = 0  # body bytes as framed on the wire (chunk framing excluded)
    resp_body_size: int = 0
    req_complete: bool = True  # the whole request was seen
    interim: list[int] | None = None  # 1xx statuses before the final one (100, 103...)
    upgrade: str | None = None  # protocol switched to (websocket, h2c) or "connect"
    tunnel_c2s: int = 0  # bytes relayed after the switch, client to server
    tunnel_s2c: int = 0
    error: str | None = None  # incomplete_request | no_response | incomplete_response | ...
    error_message: str | None = None
    announced: bool = False  # an http.request event was emitted while it was in flight
    # filled by prepare(), from the request head (in policy.REQUEST_FIELDS order)...
    path: str | None = None
    query: str | None = None  # redacted
    request_headers: dict[str, str] | None = None  # recorded subset, secrets redacted
    request_ids: dict[str, str] | None = None  # X-Request-ID, X-Openstack-Request-Id...
    host: str | None = None  # Host / :authority
    user_agent: str | None = None
    forwarded_for: str | None = None  # the first X-Forwarded-For / Forwarded for= address
    route: str | None = None
    route_source: str | None = None  # config | inferred
    # shared ids for causality (correlate.shared_ids): id headers and UUIDs in the URL
    shared_ids: dict[str, str] | None = None
    # ... and from the response head (policy.RESPONSE_FIELDS order)
    response_headers: dict[str, str] | None = None
    response_ids: dict[str, str] | None = None
    response_shared_ids: dict[str, str] | None = None
    # raw heads: consumed (and removed) by prepare(), never stored; keep them last
    # (HttpExchanges rows are every field before them, in order)
    req_head: bytes | None = None
    resp_head: bytes | None = None
    # the proxy's redaction/route policy (policy.Policy.spec()), for prepare() in
    # the capture process; removed by prepare()
    policy: dict[str, Any] | None = None

    def prepare(self) -> None:
        from proxies.http.policy import prepare_exchange

        prepare_exchange(self)


ROW_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dc_fields(HttpExchange) if f.name not in ("req_head", "resp_head", "policy")
)
# a row is the hot-path fields, then what prepare() derives from each head
HOT_FIELDS = ROW_FIELDS[: ROW_FIELDS.index("path")]
REQUEST_FIELDS = ROW_FIELDS[ROW_FIELDS.index("path") : ROW_FIELDS.index("response_headers")]
RESPONSE_FIELDS = ROW_FIELDS[ROW_FIELDS.index("response_headers") :]
NO_REQUEST: tuple[None, ...] = (None,) * len(REQUEST_FIELDS)
NO_RESPONSE: tuple[None, ...] = (None,) * len(RESPONSE_FIELDS)
_hot = operator.attrgetter(*HOT_FIELDS)
_N_HOT = len(HOT_FIELDS)


def wire(ex: HttpExchange) -> tuple[Any, ...]:
    """A finished exchange as a batch item: its hot-path fields, then the raw
    request and response heads as latin-1 text (cheap to ship to the capture
    process as JSON; prepare() turns them into the derived fields)."""
    rq, rs = ex.req_head, ex.resp_head
    return (
        *_hot(ex),
        rq.decode("latin-1") if rq is not None else None,
        rs.decode("latin-1") if rs is not None else None,
    )


def _unwire(item: Any) -> HttpExchange:
    ex = HttpExchange(*item[:_N_HOT])
    rq, rs = item[_N_HOT], item[_N_HOT + 1]
    ex.req_head = rq.encode("latin-1") if isinstance(rq, str) else rq
    ex.resp_head = rs.encode("latin-1") if isinstance(rs, str) else rs
    return ex


@event("http.exchanges")
class HttpExchanges(Event):
    """Finished exchanges of one connection, in order, emitted together.

    The fast path batches a connection's exchanges (up to ``decoder.BATCH_MAX``,
    or what it holds when the listener's sweep runs, twice a second, or when the
    connection ends), so the capture and the pipe to the capture process cost
    one event per batch rather than one per request. ``items`` are compact
    tuples (:func:`wire`: hot-path fields and raw heads); :meth:`prepare` (in the
    capture process) turns them into ``rows`` (one JSON array per exchange,
    columns named once in ``fields``) and drops the raw heads: rows are what is
    stored. Use :meth:`exchanges` to read either form as :class:`HttpExchange`.
    """

    needs_prepare: ClassVar[bool] = True

    items: list[tuple[Any, ...]] | list[list[Any]] = field(default_factory=list)
    fields: list[str] | None = None
    rows: list[list[Any]] | list[tuple[Any, ...]] | None = None
    policy: dict[str, Any] | None = None  # as on HttpExchange; removed by prepare()

    def prepare(self) -> None:
        from proxies.http.policy import head_fields, resolve

        items = self.items
        proxy = str(items[0][2]) if items else ""  # one connection: one proxy
        p = resolve(self.policy, proxy)
        rows = []
        for item in items:
            req, resp = head_fields(p, proxy, item[_N_HOT], item[_N_HOT + 1])
            rows.append((*item[:_N_HOT], *req, *resp))  # stored as a JSON array
        self.fields = list(ROW_FIELDS)
        self.rows = rows
        self.items = []
        self.policy = None
        # with an in-process writer (capture_process = false) this runs on a thread
        # of the proxy: offer the GIL back after each batch, so the event loop never
        # waits long (CPython only forces a switch every 5 ms)
        time.sleep(0)

    def exchanges(self) -> list[HttpExchange]:
        if self.items:
            return [_unwire(item) for item in self.items]
        if not self.rows:
            return []
        names = self.fields or list(ROW_FIELDS)
        if tuple(names) == ROW_FIELDS:
            return [HttpExchange(*row) for row in self.rows]
        known = set(ROW_FIELDS)
        out = []
        for row in self.rows:  # a capture from another version: match columns by name
            d = {k: v for k, v in zip(names, row, strict=False) if k in known}
            out.append(HttpExchange(**d))
        return out


@event("http.request")
class HttpRequest(Event):
    """A request still in flight after a while (emitted by a periodic sweep, never
    on the hot path), so the correlator knows the server's unit of work has started
    before the exchange ends: calls the service makes meanwhile can join it."""

    needs_prepare: ClassVar[bool] = True

    proxy: str
    method: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    req_head: bytes | None = None  # removed by prepare()
    path: str | None = None
    route: str | None = None
    shared_ids: dict[str, str] | None = None
    policy: dict[str, Any] | None = None  # as on HttpExchange; removed by prepare()

    def prepare(self) -> None:
        from proxies.http.policy import prepare_request

        prepare_request(self)
