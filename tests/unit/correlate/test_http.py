"""HTTP exchanges -> SERVER spans, on event lists with their own clock."""

from __future__ import annotations

from typing import Any

from correlate.engine import Correlator
from correlate.model import Span
from proxies.http import policy
from proxies.http.events import HttpExchange, HttpRequest
from sniff.events import ConnClose, ConnIdentity, ConnOpen

MS = 1_000_000
T0 = 1_700_000_000_000_000_000


def conn_open(
    conn: int, proxy: str = "nova-api", client: str = "10.0.0.7", server: str = "127.0.0.1"
) -> ConnOpen:
    return ConnOpen(T0, conn, proxy, "http", client, 40000 + conn, server, 8774, "0.0.0.0", 18774)


def exchange(
    conn: int,
    span_id: str,
    head: bytes,
    status: int | None = 200,
    start: int = 10,
    end: int = 30,
    resp_head: bytes | None = b"HTTP/1.1 200 OK\r\nContent-Length: 2",
    **kw: Any,
) -> HttpExchange:
    method = head.split(b" ", 1)[0].decode()
    ex = HttpExchange(
        T0 + start * MS,
        conn,
        kw.pop("proxy", "nova-api"),
        "http",
        "1.1",
        method,
        T0 + end * MS,
        kw.pop("trace_id", "1" * 32),
        span_id,
        kw.pop("parent_span_id", None),
        kw.pop("traceparent", None),
        kw.pop("injected", True),
        status=status,
        ts_response=T0 + (end - 1) * MS if status is not None else None,
        req_head=head,
        resp_head=resp_head if status is not None else None,
        **kw,
    )
    return ex


def spans(events: list[Any], **kw: Any) -> list[Span]:
    corr = Correlator(**kw)
    out = list(corr.feed_many(events))
    out += list(corr.finish())
    return sorted(out, key=lambda s: s.start)


def test_server_span_attributes() -> None:
    head = (
        b"GET /v2.1/servers/6f1c2a3e-1234-4bcd-9abc-0123456789ab?all_tenants=1&token=abc HTTP/1.1\r\n"
        b"Host: nova.example:8774\r\nUser-Agent: python-novaclient/17 keystoneauth1/5\r\n"
        b"X-Auth-Token: s3cret\r\nX-Openstack-Request-Id: req-1"
    )
    events = [
        conn_open(1),
        ConnIdentity(T0, 1, "http.user_agent", {"product": "python-novaclient"}),
        exchange(1, "a" * 16, head, req_body_size=0, resp_body_size=2),
    ]
    (s,) = spans(events)
    a = s.attrs
    assert s.kind == "SERVER" and s.service == "nova-api" and s.status == "UNSET"
    assert s.name == "GET /v2.1/servers/{id}"
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/v2.1/servers/6f1c2a3e-1234-4bcd-9abc-0123456789ab"
    assert a["url.query"] == "all_tenants=1&token=[REDACTED]"
    assert a["http.route"] == "/v2.1/servers/{id}"
    assert a["http.response.status_code"] == 200
    assert a["http.request.body.size"] == 0 and a["http.response.body.size"] == 2
    assert a["server.address"] == "nova.example" and a["server.port"] == 8774
    assert a["client.address"] == "10.0.0.7" and a["client.port"] == 40001
    assert a["network.peer.address"] == "10.0.0.7"
    assert a["user_agent.original"].startswith("python-novaclient")
    assert a["network.protocol.version"] == "1.1" and a["network.protocol.name"] == "http"
    assert a["sniff.client.service"] == "python-novaclient"
    assert a["http.request.header.x-openstack-request-id"] == ["req-1"]
    assert "s3cret" not in repr(s)
    assert s.end - s.start == 20 * MS


def test_errors_and_odd_methods() -> None:
    events = [
        conn_open(1),
        exchange(1, "1" * 16, b"GET /a HTTP/1.1\r\nHost: h", status=503,
                 resp_head=b"HTTP/1.1 503 Unavailable"),
        exchange(1, "2" * 16, b"GET /b HTTP/1.1\r\nHost: h", status=404,
                 resp_head=b"HTTP/1.1 404 Not Found"),
        exchange(1, "3" * 16, b"PUT /c HTTP/1.1\r\nHost: h", status=None,
                 error="incomplete_request", error_message="connection ended (client closed)",
                 req_complete=False),
        exchange(1, "4" * 16, b"PURGE /d HTTP/1.1\r\nHost: h"),
    ]  # fmt: skip
    by_id = {s.span_id: s for s in spans(events)}
    assert by_id["1" * 16].status == "ERROR" and by_id["1" * 16].attrs["error.type"] == "503"
    assert by_id["2" * 16].status == "UNSET"  # 4xx is not a server error
    cut = by_id["3" * 16]
    assert cut.status == "ERROR" and cut.attrs["error.type"] == "incomplete_request"
    assert "client closed" in cut.status_message
    assert "http.response.status_code" not in cut.attrs
    odd = by_id["4" * 16]
    assert odd.attrs["http.request.method"] == "_OTHER"
    assert odd.attrs["http.request.method_original"] == "PURGE"
    assert odd.name == "HTTP /d"


def test_client_traceparent_makes_the_parent() -> None:
    ev = exchange(
        1,
        "b" * 16,
        b"GET /x HTTP/1.1\r\nHost: h\r\ntraceparent: 00-" + b"c" * 32 + b"-" + b"d" * 16 + b"-01",
        trace_id="c" * 32,
        parent_span_id="d" * 16,
        injected=False,
    )
    (s,) = spans([conn_open(1), ev])
    assert s.trace_id == "c" * 32 and s.parent_id == "d" * 16
    assert s.attrs["sniff.correlation.method"] == "propagated"


def test_call_joins_the_callers_unit_by_request_id() -> None:
    """nova-api (serving a request with id req-42) calls neutron with that id: the
    neutron SERVER span becomes a child of the nova-api SERVER span."""
    services = {"10.0.0.7": "cli", "10.0.0.8": "nova-api"}
    events = [
        conn_open(1, "nova-api", "10.0.0.7", server="10.0.0.8"),  # nova-api runs on .8
        conn_open(2, "neutron", "10.0.0.8", server="10.0.0.9"),
        exchange(1, "a" * 16, b"POST /v2.1/servers HTTP/1.1\r\nHost: nova",
                 start=0, end=500, trace_id="a" * 32,
                 resp_head=b"HTTP/1.1 202 Accepted\r\nX-Openstack-Request-Id: req-42"),
        exchange(2, "b" * 16, b"POST /v2.0/ports HTTP/1.1\r\nHost: neutron\r\n"
                 b"X-Openstack-Request-Id: req-42", start=100, end=200, trace_id="b" * 32,
                 proxy="neutron"),
    ]  # fmt: skip
    # the server end of conn 1 and the client end of conn 2 are one component (.8)
    by_id = {s.span_id: s for s in spans(events, services=services)}
    nova, neutron = by_id["a" * 16], by_id["b" * 16]
    assert nova.service == "nova-api" and neutron.service == "neutron"
    assert neutron.parent_id == nova.span_id and neutron.trace_id == nova.trace_id
    assert neutron.attrs["sniff.correlation.method"] in ("shared_id", "timing")


def test_early_request_notice_registers_the_unit_once() -> None:
    head = b"POST /v2/images HTTP/1.1\r\nHost: glance"
    early = HttpRequest(T0, 1, "glance", "POST", "e" * 32, "f" * 16, None, req_head=head)
    events = [
        conn_open(1, "glance"),
        early,
        exchange(1, "f" * 16, head, start=0, end=5000, trace_id="e" * 32, proxy="glance"),
    ]
    (s,) = spans(events)
    assert s.span_id == "f" * 16 and s.name == "POST /v2/images"
    assert early.req_head is None and early.path == "/v2/images"


def test_configured_routes_and_policy() -> None:
    policy.register(
        "routed",
        policy.Policy.build(routes=["/v2.1/{project_id}/servers/{server_id}"], redact_query=["q"]),
    )
    head = b"GET /v2.1/abc/servers/def?q=1&x=2 HTTP/1.1\r\nHost: h"
    (s,) = spans([conn_open(1, "routed"), exchange(1, "9" * 16, head, proxy="routed")])
    assert s.attrs["http.route"] == "/v2.1/{project_id}/servers/{server_id}"
    assert s.attrs["sniff.http.route_source"] == "config"
    assert s.attrs["url.query"] == "q=[REDACTED]&x=2"


def test_conn_close_needs_nothing_from_the_builder() -> None:
    events = [conn_open(1), exchange(1, "5" * 16, b"GET / HTTP/1.1\r\nHost: h"),
              ConnClose(T0 + 100 * MS, 1, "client closed", "client", 10, 20)]  # fmt: skip
    assert len(spans(events)) == 1
