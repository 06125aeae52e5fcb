"""Redaction, recorded headers, routes, the traceparent rewrite, and config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxies.http import policy
from proxies.http.events import HttpExchange
from proxies.http.rewrite import (
    header_value,
    header_values,
    inject_traceparent,
    strip_injected,
    traceparent_line,
)
from proxies.http.routes import RouteTable, check_template, infer_route
from sniff.config import ConfigError, from_dict
from sniff.events import dumps

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def ex(head: bytes, resp: bytes | None = None, proxy: str = "p") -> HttpExchange:
    e = HttpExchange(1, 2, proxy, "http", "1.1", "GET", 3, "t" * 32, "s" * 16, None, None, True,
                     req_head=head, resp_head=resp)  # fmt: skip
    e.prepare()
    return e


# --- rewrite ----------------------------------------------------------------------------


def test_inject_and_strip_round_trip() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    out = inject_traceparent(head, TP)
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: " + TP.encode() + b"\r\n\r\n"
    assert strip_injected(out, TP) == head
    assert len(traceparent_line(TP)) == 70
    with pytest.raises(ValueError):
        inject_traceparent(b"GET / HTTP/1.1\r\n", TP)


def test_header_lookup_on_a_lowercased_head() -> None:
    head = b"GET / HTTP/1.1\r\nX-A: One\r\nx-a:  two \r\nX-AB: no\r\n"
    lh = head.lower()
    assert header_values(lh, b"x-a") == [b"one", b"two"]
    assert header_value(head, lh, b"x-a") == b"One"
    assert header_value(head, lh, b"x-b") is None


# --- redaction and recording ------------------------------------------------------------


def test_secret_headers_are_masked_everywhere() -> None:
    e = ex(
        b"GET /a HTTP/1.1\r\nHost: h\r\nAuthorization: Basic dXNlcjpwYXNz\r\n"
        b"Cookie: sid=abc\r\nProxy-Authorization: x\r\nX-Auth-Token: AUTHSECRET\r\nX-Service-Token: SVCSECRET",
        b"HTTP/1.1 201 Created\r\nSet-Cookie: sid=def\r\nX-Subject-Token: SUBJSECRET\r\nLocation: /a/1",
    )
    assert e.request_headers == {
        "host": "h",
        "authorization": "[REDACTED]",
        "cookie": "[REDACTED]",
        "proxy-authorization": "[REDACTED]",
        "x-auth-token": "[REDACTED]",
        "x-service-token": "[REDACTED]",
    }
    assert e.response_headers == {
        "set-cookie": "[REDACTED]",
        "x-subject-token": "[REDACTED]",
        "location": "/a/1",
    }
    blob = dumps(e)
    for secret in (b"dXNlcjpwYXNz", b"sid=abc", b"SECRET", b"sid=def"):
        assert secret not in blob
    assert e.req_head is None and e.resp_head is None


def test_configured_redaction_and_hmac_style() -> None:
    policy.register(
        "hm",
        policy.Policy.build(
            redact_headers=["X-Custom-Secret"], redact_query=["apikey2"], style="hmac",
            record_headers=["x-custom-secret", "x-trace-me"],
        ),
    )  # fmt: skip
    a = ex(b"GET /a?apikey2=v1&b=2 HTTP/1.1\r\nX-Custom-Secret: one\r\nX-Trace-Me: yes", proxy="hm")
    b = ex(b"GET /a?apikey2=v1 HTTP/1.1\r\nX-Custom-Secret: one", proxy="hm")
    c = ex(b"GET /a HTTP/1.1\r\nX-Custom-Secret: two", proxy="hm")
    assert a.request_headers is not None and b.request_headers is not None
    assert c.request_headers is not None
    va, vb, vc = (x.request_headers["x-custom-secret"] for x in (a, b, c))
    assert va.startswith("[REDACTED hmac:") and va == vb != vc
    assert a.request_headers["x-trace-me"] == "yes"
    assert (
        a.query is not None
        and a.query.startswith("apikey2=[REDACTED hmac:")
        and "v1" not in a.query
    )
    assert a.query.endswith("&b=2")


def test_record_all_headers() -> None:
    policy.register("all", policy.Policy.build(record_headers=["*"]))
    e = ex(b"GET / HTTP/1.1\r\nX-Anything: 1\r\nAuthorization: x", proxy="all")
    assert e.request_headers == {"x-anything": "1", "authorization": "[REDACTED]"}


def test_query_redaction_keeps_everything_else() -> None:
    names = policy.DEFAULT_REDACT_QUERY
    assert policy.redact_query("a=1&token=x&b=&password=p%20q&Token=z", names, "mask") == (
        "a=1&token=[REDACTED]&b=&password=[REDACTED]&Token=[REDACTED]"
    )
    assert policy.redact_query("flag&x=1", names, "mask") == "flag&x=1"


def test_request_ids_forwarded_for_and_absolute_targets() -> None:
    e = ex(
        b"GET http://nova:8774/v2.1/servers?x=1 HTTP/1.1\r\nX-Request-ID: r1\r\n"
        b"X-Forwarded-For: 192.0.2.1, 10.0.0.1\r\nX-Openstack-Request-Id: req-9",
        b"HTTP/1.1 200 OK\r\nX-Compute-Request-Id: req-c",
    )
    assert e.path == "/v2.1/servers" and e.query == "x=1" and e.host == "nova:8774"
    assert e.request_ids == {"x-request-id": "r1", "x-openstack-request-id": "req-9"}
    assert e.response_ids == {"x-compute-request-id": "req-c"}
    assert e.forwarded_for == "192.0.2.1"
    assert e.shared_ids is not None and {"r1", "req-9"} <= set(e.shared_ids.values())
    assert e.response_shared_ids is not None and "req-c" in e.response_shared_ids.values()
    f = ex(b'GET / HTTP/1.1\r\nForwarded: for="[2001:db8::1]:4711";proto=http')
    assert f.forwarded_for == "2001:db8::1"


def test_prepare_never_leaves_raw_heads_even_on_garbage() -> None:
    e = ex(b"\xff\xfe garbage without structure", b"\x00\x01")
    assert e.req_head is None and e.resp_head is None


# --- routes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,route",
    [
        ("/v2.1/servers/6f1c2a3e-1234-4bcd-9abc-0123456789ab", "/v2.1/servers/{id}"),
        ("/v2.1/servers/6f1c2a3e12344bcd9abc0123456789ab/action", "/v2.1/servers/{id}/action"),
        ("/v3/projects/9fe2ff9ee4384b1894a90878d3e92bab", "/v3/projects/{id}"),
        ("/v1/AUTH_9fe2ff9ee4384b1894a90878d3e92bab/c/o", "/v1/{id}/c/o"),
        ("/v2.0/ports/42", "/v2.0/ports/{id}"),
        ("/v2.1/os-hypervisors/detail", "/v2.1/os-hypervisors/detail"),
        ("/v2/images/deadbeefcafe0123", "/v2/images/{id}"),
        ("/", "/"),
        ("/v2.1/servers/vm-name", "/v2.1/servers/vm-name"),
    ],
)
def test_route_inference(path: str, route: str) -> None:
    assert infer_route(path) == route


def test_route_table_config_first_then_inference() -> None:
    t = RouteTable(["/v2.1/{project}/servers/detail", "/v2.1/{project}/servers/{id}"])
    assert t.route("/v2.1/p1/servers/detail") == ("/v2.1/{project}/servers/detail", "config")
    assert t.route("/v2.1/p1/servers/x/") == ("/v2.1/{project}/servers/{id}", "config")
    assert t.route("/v2.0/ports/42") == ("/v2.0/ports/{id}", "inferred")
    assert RouteTable([], infer=False).route("/v2.0/ports/42") == (None, None)
    assert check_template("v2/x") and check_template("/a/{b") and check_template("/a?b")
    assert check_template("/v2.1/servers/{id}") is None


# --- config -----------------------------------------------------------------------------


def cfg(tmp_path: Path, **opts: Any) -> Any:
    t = {
        "protocol": opts.pop("protocol", "http"),
        "listen": "127.0.0.1:1",
        "upstream": "127.0.0.1:2",
    }
    t.update(opts)
    return from_dict({"proxy": [t]})


def test_options_have_defaults(tmp_path: Path) -> None:
    p = cfg(tmp_path).proxies[0]
    assert p.options["http2"] is True and p.options["engine"] == "auto"
    assert p.options["routes"] == [] and p.options["redact_style"] == "mask"


@pytest.mark.parametrize(
    "opts,key,hint",
    [
        ({"routes": ["servers/{id}"]}, "proxy[0].routes[0]", "start with '/'"),
        ({"routes": [3]}, "proxy[0].routes[0]", "non-empty string"),
        ({"redact_headers": ["x auth"]}, "proxy[0].redact_headers[0]", "not a header name"),
        ({"redact_style": "rot13"}, "proxy[0].redact_style", "not one of"),
        ({"engine": "nginx"}, "proxy[0].engine", "not one of"),
        ({"tls_cert": "/x.pem"}, "proxy[0].tls_cert", 'protocol = "https"'),
        ({"protocol": "https", "tls_cert": "/etc/hostname"}, "proxy[0].tls_key", "set both"),
        ({"protocol": "https", "tls_cert": "/nope.pem", "tls_key": "/nope.key"},
         "proxy[0].tls_cert", "not a readable file"),
        ({"upstream_ca": "/etc/hostname"}, "proxy[0].upstream_ca", "upstream_tls = true"),
        ({"max_head": 10}, "proxy[0].max_head", "at least 1024"),
        ({"user_agents": {"nova": ""}}, "proxy[0].user_agents", "component name"),
        ({"bogus": 1}, "proxy[0].bogus", "unknown key"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key_and_the_fix(
    tmp_path: Path, opts: dict[str, Any], key: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(tmp_path, **opts)
    assert str(e.value).startswith(key) and hint in str(e.value)
