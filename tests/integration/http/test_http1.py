"""HTTP/1.1 on the fast path with real clients (requests, curl, raw sockets, aiohttp,
wrk) against real servers (aiohttp, nginx): transparency, traceparent, spans."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from proxies.http.events import ROW_FIELDS
from proxies.http.rewrite import strip_injected
from sniff.events import Note
from sniff.ids import parse_traceparent
from tests.helpers import ROOT, AsyncServer
from tests.integration.http.conftest import SECRET_QUERY, SECRET_TOKEN, Http, flatten
from tests.integration.http.upstream import pattern, sha, wait_for

UA = "nova-compute/27.1.0 keystoneauth1/5.1.2 python-requests/2.31 CPython/3.11"
SERVER_ID = "6f1c2a3e-1234-4bcd-9abc-0123456789ab"


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.headers["User-Agent"] = UA
    return s


def test_bodies_identical_both_ways_and_upstream_sees_traceparent(http: Http) -> None:
    s = session()
    big = os.urandom(5 * 1024 * 1024)
    r = s.post(http.url("app", "/echo/big"), data=big)
    got = r.json()
    assert r.status_code == 200 and got["body_sha256"] == sha(big) and got["body_len"] == len(big)
    tp = got["headers"]["traceparent"]
    assert parse_traceparent(tp) is not None

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(big), 300_001):
            yield big[i : i + 300_001]

    r = s.put(http.url("app", "/echo/chunked"), data=chunks())
    got = r.json()
    assert got["chunked"] and got["body_sha256"] == sha(big)
    r = s.get(http.url("app", "/bytes/8000000?seed=3"))
    assert sha(r.content) == sha(pattern(8_000_000, 3))
    r = s.get(http.url("app", "/chunked/3000000?seed=4&step=70000"))
    assert r.headers["transfer-encoding"] == "chunked"
    assert sha(r.content) == sha(pattern(3_000_000, 4))
    s.close()
    ex = {e.path: e for e in http.exchanges("app", "/", 4)}
    assert ex["/echo/big"].req_body_size == len(big) and ex["/echo/big"].traceparent == tp
    assert ex["/echo/big"].injected and ex["/echo/big"].status == 200
    assert ex["/echo/chunked"].req_body_size == len(big)
    assert ex["/bytes/8000000"].resp_body_size == 8_000_000
    assert ex["/chunked/3000000"].resp_body_size == 3_000_000
    # one keep-alive connection carried all four
    assert len({e.conn for e in ex.values()}) == 1


def test_server_span_attributes_and_redaction(http: Http) -> None:
    s = session()
    r = s.get(
        http.url("app", f"/v2.1/servers/{SERVER_ID}?mysecret={SECRET_QUERY}&limit=5"),
        headers={
            "X-Auth-Token": SECRET_TOKEN,
            "X-Custom-Secret": "custom-secret-value",
            "X-Openstack-Request-Id": "req-integration-1",
        },
    )
    assert r.status_code == 200
    assert r.headers["X-Openstack-Request-Id"] == "req-integration-1"
    (span,) = http.spans("app", "/v2.1/servers/")
    a = span.attrs
    assert span.kind == "SERVER" and span.service == "app"
    assert span.name == "GET /v2.1/servers/{server_id}"
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == f"/v2.1/servers/{SERVER_ID}"
    assert a["url.query"] == "mysecret=[REDACTED]&limit=5"
    assert a["http.route"] == "/v2.1/servers/{server_id}"
    assert a["http.response.status_code"] == 200
    assert a["http.request.body.size"] == 0 and a["http.response.body.size"] == len(r.content)
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == http.port("app")
    assert a["client.address"] == "127.0.0.1"
    assert a["user_agent.original"] == UA
    assert a["network.protocol.version"] == "1.1" and a["url.scheme"] == "http"
    assert a["sniff.client.service"] == "nova-compute"  # user_agents option
    assert a["http.request.header.x-openstack-request-id"] == ["req-integration-1"]
    assert a["http.response.header.x-openstack-request-id"] == ["req-integration-1"]
    # the upstream got the traceparent of this very span
    assert r.json()["headers"]["traceparent"] == f"00-{span.trace_id}-{span.span_id}-01"
    (ex,) = http.exchanges("app", "/v2.1/servers/")
    assert ex.request_headers["x-auth-token"] == "[REDACTED]"
    assert ex.request_headers["x-custom-secret"] == "[REDACTED]"


def test_secrets_never_reach_the_capture_file(http: Http) -> None:
    s = session()
    s.get(
        http.url("app", f"/echo/secret?token={SECRET_QUERY}"),
        headers={"Authorization": f"Bearer {SECRET_TOKEN}", "Cookie": f"sid={SECRET_TOKEN}"},
    )
    s.get(http.url("app", "/cookie"))
    http.exchanges("app", "/cookie")
    raw = b""
    for suffix in ("", "-wal"):
        p = Path(http.proc.capture + suffix)
        if p.exists():
            raw += p.read_bytes()
    assert SECRET_TOKEN.encode() not in raw and SECRET_QUERY.encode() not in raw
    assert b"top-secret-cookie" not in raw and b"top-secret-subject-token" not in raw
    (ex,) = http.exchanges("app", "/cookie")
    assert ex.response_headers["set-cookie"] == "[REDACTED]"


def test_existing_traceparent_is_respected(http: Http) -> None:
    client_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = session().get(http.url("app", "/echo/propagated"), headers={"traceparent": client_tp})
    assert r.json()["headers"]["traceparent"] == client_tp  # untouched
    (span,) = http.spans("app", "/echo/propagated")
    assert span.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent_id == "b7ad6b7169203331" and span.span_id != "b7ad6b7169203331"
    assert span.attrs["sniff.traceparent.injected"] is False


def test_errors_5xx_and_cut_connections(http: Http) -> None:
    s = session()
    assert s.get(http.url("app", "/status/503")).status_code == 503
    assert s.get(http.url("app", "/status/404")).status_code == 404
    with contextlib.suppress(requests.RequestException):
        s.get(http.url("app", "/cut"))
    # the client gives up mid-body
    with socket.create_connection(("127.0.0.1", http.port("app"))) as c:
        c.sendall(b"POST /echo/cut-by-client HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                  + b"a" * 10)  # fmt: skip
    http.exchanges("app", "/echo/cut-by-client")
    spans = {s.attrs["url.path"]: s for s in http.spans("app", "/")}
    assert spans["/status/503"].status == "ERROR"
    assert spans["/status/503"].attrs["error.type"] == "503"
    assert spans["/status/404"].status == "UNSET"
    cut = spans["/cut"]
    assert cut.status == "ERROR" and cut.attrs["error.type"] == "incomplete_response"
    assert cut.attrs["http.response.status_code"] == 200
    by_client = spans["/echo/cut-by-client"]
    assert by_client.status == "ERROR" and by_client.attrs["error.type"] == "incomplete_request"
    assert by_client.attrs["http.request.body.size"] == 10


def test_curl_head_204_and_expect_100_continue(http: Http, tmp_path: Path) -> None:
    upload = tmp_path / "up.bin"
    upload.write_bytes(pattern(2_000_000, 9))
    base = ["curl", "-s", "--noproxy", "*"]
    out = subprocess.run([*base, "-I", http.url("app", "/bytes/1234")], capture_output=True,
                         check=True).stdout  # fmt: skip
    assert b"Content-Length: 1234" in out
    out = subprocess.run([*base, "-o", "/dev/null", "-w", "%{http_code}",
                          http.url("app", "/status/204")], capture_output=True, check=True).stdout  # fmt: skip
    assert out == b"204"
    out = subprocess.run([*base, "-H", "Expect: 100-continue", "--data-binary", f"@{upload}",
                          http.url("app", "/echo/expect")], capture_output=True, check=True).stdout  # fmt: skip
    assert json.loads(out)["body_sha256"] == sha(upload.read_bytes())
    wanted = ("/bytes/1234", "/status/204", "/echo/expect")

    def pick() -> dict[str, Any]:
        got = {e.path: e for e in http.all_exchanges()
               if e.proxy == "app" and e.path in wanted}  # fmt: skip
        return got if len(got) == 3 else {}

    ex = wait_for(pick)
    assert ex["/bytes/1234"].method == "HEAD" and ex["/bytes/1234"].resp_body_size == 0
    assert ex["/status/204"].status == 204
    assert ex["/echo/expect"].interim == [100] and ex["/echo/expect"].req_body_size == 2_000_000


def test_pipelined_requests(http: Http) -> None:
    reqs = (
        b"".join(
            b"GET /echo/pipe%d HTTP/1.1\r\nHost: x\r\nUser-Agent: pipeliner/1\r\n\r\n" % i
            for i in range(3)
        )
        + b"POST /echo/pipe3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    with socket.create_connection(("127.0.0.1", http.port("app"))) as c:
        c.sendall(reqs)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 4
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"\nHTTP/1.1")[0] or b"{}")
              for part in data.split(b"HTTP/1.1 200 OK")[1:]]  # fmt: skip
    seen = [b.get("headers", {}).get("traceparent") for b in bodies if b]
    ex = sorted(http.exchanges("app", "/echo/pipe", 4), key=lambda e: e.path)
    assert [e.path for e in ex] == ["/echo/pipe0", "/echo/pipe1", "/echo/pipe2", "/echo/pipe3"]
    assert [e.traceparent for e in ex] == seen
    assert ex[3].req_body_size == 5 and len({e.conn for e in ex}) == 1


def test_websocket_is_relayed_and_recorded_as_one_span(http: Http) -> None:
    async def main() -> list[Any]:
        got = []
        async with aiohttp.ClientSession() as sess, sess.ws_connect(http.url("app", "/ws")) as ws:
            for msg in ("one", "two"):
                await ws.send_str(msg)
                got.append((await ws.receive()).data)
            await ws.send_bytes(b"\x01" * 100_000)
            got.append(len((await ws.receive()).data))
        return got

    assert asyncio.run(main()) == ["one", "two", 100_000]
    (span,) = http.spans("app", "/ws")
    assert span.attrs["http.response.status_code"] == 101
    assert span.attrs["sniff.http.upgrade"] == "websocket"
    assert span.attrs["sniff.http.tunnel.bytes_from_client"] > 100_000
    assert span.attrs["sniff.http.tunnel.bytes_from_server"] > 100_000
    assert span.status == "UNSET"


def test_injection_off_forwards_every_byte_unchanged(http: Http) -> None:
    r = session().get(http.url("app-noinject", "/echo/plain"))
    assert "traceparent" not in r.json()["headers"]
    (ex,) = http.exchanges("app-noinject", "/echo/plain")
    assert not ex.injected and ex.traceparent is None


def test_byte_exact_transparency_with_a_recording_upstream(sniff_run: Any, tmp_path: Path) -> None:
    """Requests of every framing go out with exactly one traceparent line added; the
    responses come back byte for byte."""
    received = bytearray()
    responses = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\nX-T: 1\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while len(received) < len(sent) + 3 * 70:
            data = await r.read(65536)
            if not data:
                break
            received.extend(data)
        w.write(responses)
        await w.drain()
        w.close()

    sent = (
        b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Mixed-Case: Keep Me \r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nTrailer-A: v\r\n\r\n"
        b"PUT /c HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n\x00\r\n\xff"
    )
    with AsyncServer(upstream) as up:
        proc = sniff_run([{"protocol": "http", "upstream": f"127.0.0.1:{up.port}",
                           "state_dir": str(tmp_path / "state"), "http2": False}],
                         identify_processes=False)  # fmt: skip
        with socket.create_connection(("127.0.0.1", proc.port())) as c:
            for i in range(0, len(sent), 7):  # dribble it in small pieces
                c.sendall(sent[i : i + 7])
            back = b""
            while chunk := c.recv(65536):
                back += chunk
    assert back == responses
    evs = wait_for(lambda: (lambda e: e if len(e) >= 3 else [])(flatten(proc.events("http."))))
    restored = bytes(received)
    for e in evs:
        assert e.injected
        restored = strip_injected(restored, e.traceparent)
    assert restored == sent
    assert [e.status for e in sorted(evs, key=lambda e: e.ts)] == [200, 200, 204]


def test_wrk_through_the_fast_path(http: Http) -> None:
    out = subprocess.run(["wrk", "-t1", "-c4", "-d2s", http.url("nginx-plain", "/wrk")],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "Non-2xx" not in out and "Socket errors" not in out
    done = int(out.split(" requests in ")[0].split()[-1])
    assert done > 500

    def counts() -> tuple[int, int, int]:
        r = http.proc.reader()
        try:
            col = {f: f"json_extract(j.value, '$[{ROW_FIELDS.index(f)}]')" for f in ROW_FIELDS}
            row = r.db.execute(
                f"SELECT count(*), sum({col['status']} = 200), sum({col['injected']})"
                " FROM events e, json_each(e.data, '$.rows') j WHERE e.kind='http.exchanges'"
                f" AND {col['proxy']} = 'nginx-plain'"
            ).fetchone()
            return int(row[0]), int(row[1] or 0), int(row[2] or 0)
        finally:
            r.close()

    n, ok, injected = (
        wait_for(lambda: (lambda c: c if c[0] >= done else None)(counts()), timeout=20) or counts()
    )
    assert n >= done and ok == n and injected == n


def test_declined_h2c_upgrade_stays_http1(http: Http) -> None:
    out = subprocess.run(["curl", "-s", "--noproxy", "*", "--http2", http.url("app", "/echo/h2c-up")],
                         capture_output=True, check=True).stdout  # fmt: skip
    got = json.loads(out)
    assert got["headers"]["upgrade"] == "h2c" and "traceparent" in got["headers"]
    (ex,) = http.exchanges("app", "/echo/h2c-up")
    assert ex.upgrade is None and ex.status == 200 and ex.version == "1.1"


def test_tls_client_on_a_plain_listener_is_passed_through(http: Http) -> None:
    subprocess.run(["curl", "-s", "-k", "--max-time", "3", "--noproxy", "*",
                    f"https://127.0.0.1:{http.port('app')}/"], capture_output=True)  # fmt: skip
    notes = wait_for(lambda: [e for e in http.proc.events("core.note")
                              if isinstance(e, Note) and "TLS on a plain" in e.message])  # fmt: skip
    assert notes


def test_stats_section_counts_requests_by_route(http: Http) -> None:
    session().get(http.url("app", "/echo/stats"))
    http.exchanges("app", "/echo/stats")
    out = subprocess.run([sys.executable, "-m", "sniff", "stats", http.proc.capture],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "HTTP requests received" in out.stdout and "GET /echo/stats" in out.stdout


def test_live_otlp_export_carries_server_spans(http: Http) -> None:
    session().get(http.url("app", "/echo/otlp"))
    got = wait_for(lambda: [s for s in http.otlp.spans() if s["attrs"].get("url.path") == "/echo/otlp"],
                   timeout=20)  # fmt: skip
    assert got, "no span exported"
    s = got[0]
    assert s["kind"] == "SERVER" and s["resource"]["service.name"] == "app"
    assert (
        s["attrs"]["http.request.method"] == "GET"
        and s["attrs"]["http.response.status_code"] == 200
    )


@pytest.mark.parametrize("decode", ["capture", "inline"])
def test_in_process_capture_applies_the_same_policy(
    sniff_run: Any, tmp_path: Path, decode: str
) -> None:
    """prepare() runs in the capture process by default; with capture_process =
    false it runs on a thread of sniff (and so does the decoding, with decode =
    "capture"): the proxy's policy applies either way."""
    with AsyncServer(_one_response) as up:
        proc = sniff_run(
            [{"protocol": "http", "upstream": f"127.0.0.1:{up.port}", "http2": False,
              "decode": decode,
              "state_dir": str(tmp_path / "state"), "redact_headers": ["x-private"],
              "redact_query": ["pin"], "routes": ["/things/{thing}"]}],
            capture_process=False, identify_processes=False,
        )  # fmt: skip
        with socket.create_connection(("127.0.0.1", proc.port())) as c:
            c.sendall(
                b"GET /things/7?pin=1234 HTTP/1.1\r\nHost: h\r\nX-Private: hidden-value\r\n\r\n"
            )
            c.recv(65536)
        ex = wait_for(lambda: flatten(proc.events("http.")))
    (e,) = ex
    assert e.request_headers["x-private"] == "[REDACTED]" and e.query == "pin=[REDACTED]"
    assert e.route == "/things/{thing}" and e.route_source == "config"


async def _one_response(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readuntil(b"\r\n\r\n")
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await w.drain()
    await asyncio.sleep(0.5)
    w.close()
