"""HTTP/2 (h2c prior knowledge, TLS with ALPN h2) and TLS: sniff's own TLS
termination for HTTP/1.1, mitmproxy for HTTP/2 and TLS upstreams, with httpx,
curl and requests against aiohttp and nginx."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import httpx
import requests

from sniff.events import ConnClose, ConnOpen
from sniff.ids import parse_traceparent
from tests.integration.http.conftest import Http
from tests.integration.http.upstream import pattern, sha, wait_for


def tp_from(text: str) -> str:
    return text.split("tp=", 1)[1].split()[0]


def test_h2c_prior_knowledge_with_httpx(http: Http) -> None:
    with httpx.Client(http1=False, http2=True, trust_env=False) as c:
        rs = [c.get(http.url("h2c", f"/h2c/{i}?token=abc")) for i in range(3)]
    assert all(r.http_version == "HTTP/2" and r.status_code == 200 for r in rs)
    seen = [tp_from(r.text) for r in rs]
    assert all(parse_traceparent(t) for t in seen)
    assert all("proto=HTTP/2.0" in r.text for r in rs)  # h2c to the upstream too
    ex = sorted(http.exchanges("h2c", "/h2c/", 3), key=lambda e: e.path)
    assert [e.traceparent for e in ex] == seen
    assert all(e.version == "2" and e.engine == "mitmproxy" and e.injected for e in ex)
    assert ex[0].query == "token=[REDACTED]"
    assert len({e.conn for e in ex}) == 1  # one connection, three streams
    (span,) = http.spans("h2c", "/h2c/0")
    assert span.attrs["network.protocol.version"] == "2"
    assert span.attrs["http.request.method"] == "GET"


def test_h2c_prior_knowledge_with_curl_and_a_large_body(http: Http) -> None:
    out = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "--http2-prior-knowledge", http.url("h2c", "/big")],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert sha(out) == sha(pattern(3 * 1024 * 1024, 7))
    (ex,) = http.exchanges("h2c", "/big")
    assert ex.resp_body_size == 3 * 1024 * 1024 and ex.status == 200


def test_https_http1_takes_the_fast_path(http: Http) -> None:
    s = requests.Session()
    s.trust_env = False
    big = os.urandom(3 * 1024 * 1024)
    r = s.post(http.url("tls", "/echo/tls1", "https"), data=big, verify=http.ca)
    got = r.json()
    assert got["body_sha256"] == sha(big) and parse_traceparent(got["headers"]["traceparent"])
    r = s.get(http.url("tls", "/bytes/2000000", "https"), verify=http.ca)
    assert sha(r.content) == sha(pattern(2_000_000))
    ex = {e.path: e for e in http.exchanges("tls", "/", 2)}
    assert ex["/echo/tls1"].engine == "fast" and ex["/echo/tls1"].scheme == "https"
    assert ex["/echo/tls1"].req_body_size == len(big)
    assert ex["/bytes/2000000"].resp_body_size == 2_000_000
    (span,) = http.spans("tls", "/echo/tls1")
    assert span.attrs["url.scheme"] == "https" and span.attrs["server.port"] == http.port("tls")


def test_https_http2_goes_through_mitmproxy(http: Http) -> None:
    with httpx.Client(http2=True, verify=http.ca, trust_env=False) as c:
        r = c.post(http.url("tls", "/echo/tls2", "https"), content=b"x" * 200_000)
        r2 = c.get(http.url("tls", "/chunked/1000000", "https"))
    assert r.http_version == "HTTP/2" and r2.http_version == "HTTP/2"
    got = r.json()
    assert got["body_len"] == 200_000 and parse_traceparent(got["headers"]["traceparent"])
    assert sha(r2.content) == sha(pattern(1_000_000))

    def pick() -> dict[str, Any]:
        got = {e.path: e for e in http.all_exchanges()
               if e.proxy == "tls" and e.version == "2"}  # fmt: skip
        return got if len(got) >= 2 else {}

    ex = wait_for(pick)
    e = ex["/echo/tls2"]
    assert e.engine == "mitmproxy" and e.scheme == "https" and e.req_body_size == 200_000
    assert e.traceparent == got["headers"]["traceparent"]
    assert ex["/chunked/1000000"].resp_body_size == 1_000_000


def test_upstream_tls_with_http2_both_sides(http: Http) -> None:
    with httpx.Client(http2=True, verify=http.ca, trust_env=False) as c:
        r = c.get(http.url("tls-up", "/secure?a=1", "https"))
    assert r.http_version == "HTTP/2" and r.text.startswith("tls tp=")
    assert "proto=HTTP/2.0" in r.text
    (e,) = http.exchanges("tls-up", "/secure")
    assert e.traceparent == tp_from(r.text) and e.engine == "mitmproxy"
    s = requests.Session()
    s.trust_env = False
    r = s.get(http.url("tls-up", "/secure-h1", "https"), verify=http.ca)
    assert r.text.startswith("tls tp=") and "proto=HTTP/1.1" in r.text


def test_mitmproxy_engine_for_http1(http: Http) -> None:
    s = requests.Session()
    s.trust_env = False
    big = os.urandom(2 * 1024 * 1024)
    r = s.put(http.url("mitm", "/echo/mitm"), data=big, headers={"Connection": "close"})
    got = r.json()
    assert got["body_sha256"] == sha(big)
    (e,) = http.exchanges("mitm", "/echo/mitm")
    assert e.engine == "mitmproxy" and e.traceparent == got["headers"]["traceparent"]
    assert e.req_body_size == len(big) and e.status == 200
    opens = [ev for ev in http.proc.events("core.conn_open") if ev.conn == e.conn]
    assert opens and isinstance(opens[0], ConnOpen) and opens[0].proxy == "mitm"
    closes = wait_for(
        lambda: [ev for ev in http.proc.events("core.conn_close") if ev.conn == e.conn]
    )
    assert closes and isinstance(closes[0], ConnClose) and closes[0].bytes_from_client > len(big)


def test_websocket_through_mitmproxy(http: Http) -> None:
    import asyncio

    import aiohttp

    async def main() -> Any:
        async with aiohttp.ClientSession() as sess, sess.ws_connect(http.url("mitm", "/ws")) as ws:
            await ws.send_str("ping")
            return (await ws.receive()).data

    assert asyncio.run(main()) == "ping"
    (e,) = http.exchanges("mitm", "/ws")
    assert e.upgrade == "websocket" and e.status == 101 and e.tunnel_c2s == 4


def test_http2_disabled_passes_h2c_through(http: Http) -> None:
    out = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "--http2-prior-knowledge", http.url("no-h2", "/raw")],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert out.startswith(b"h2c tp= ")  # relayed unchanged: nothing injected
    notes = wait_for(
        lambda: [n for n in http.proc.events("core.note") if "http2 = false" in n.message]
    )
    assert notes


def test_generated_certificate_is_announced(http: Http) -> None:
    text = http.proc.text()
    assert "generated by sniff" in text and http.ca in text and "curl --cacert" in text
