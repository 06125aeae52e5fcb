"""``decode = "inline"`` and ``decode = "capture"`` side by side, with real clients.

One ``sniff run`` with two HTTP proxies in front of the same aiohttp app, one per
mode; the same traffic (requests keep-alive session with every framing, curl
with 100-continue and HEAD, raw pipelining, HTTP/1.0, a WebSocket, a declined h2c
upgrade, a cut response) goes through each. The exchanges recorded and the
SERVER spans the correlator makes of them must be the same, up to ids, times,
connections and the listening port. The one planned difference is checked too:
a protocol switch asked late on a keep-alive connection stops the capture
mode's injection there (the relay does not frame responses), not the inline one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from tests.helpers import SniffProcess
from tests.integration.http.conftest import flatten
from tests.integration.http.upstream import AppServer, pattern, wait_for

UA = "nova-compute/27.1.0 keystoneauth1/5.1.2 python-requests/2.31 CPython/3.11"
MODES = ("inline", "capture")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SniffProcess, Path]]:
    tmp = tmp_path_factory.mktemp("sniff-http-modes")
    with AppServer() as app:
        proxies = [
            {"name": mode, "protocol": "http", "upstream": f"127.0.0.1:{app.port}",
             "decode": mode, "http2": False, "state_dir": str(tmp / "state"),
             "routes": ["/v2.1/servers/{server_id}/action"], "user_agents": {"nova": "nova"}}
            for mode in MODES
        ]  # fmt: skip
        proc = SniffProcess(tmp, proxies, identify_processes=False).start()
        try:
            for i, _ in enumerate(MODES):
                _traffic(proc.port(i), tmp)
            yield proc, tmp
        finally:
            proc.stop()


def _traffic(port: int, tmp: Path) -> None:
    base = f"http://127.0.0.1:{port}"
    s = requests.Session()
    s.trust_env = False
    s.headers["User-Agent"] = UA
    s.get(f"{base}/echo?limit=10&token=hunter2", headers={"X-Auth-Token": "secret-token",
          "X-Openstack-Request-Id": "req-modes-1"})  # fmt: skip
    s.post(f"{base}/echo/json", json={"server": {"name": "vm1"}})
    s.put(f"{base}/echo/chunked", data=(b"x" * (1000 + i) for i in range(5)))
    s.post(f"{base}/echo/big", data=pattern(300_000, 1))
    s.get(f"{base}/bytes/200000?seed=1")
    s.get(f"{base}/chunked/100000?seed=2&step=7000")
    s.head(f"{base}/bytes/10")
    s.get(f"{base}/status/204")
    s.get(f"{base}/status/500")
    s.get(f"{base}/cookie")
    s.get(f"{base}/echo/tp", headers={
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})  # fmt: skip
    s.post(f"{base}/v2.1/servers/6f1c2a3e-1234-4bcd-9abc-0123456789ab/action", json={"reboot": 1})
    with contextlib.suppress(requests.RequestException):
        s.get(f"{base}/cut")
    s.close()
    upload = tmp / "up.bin"
    upload.write_bytes(pattern(1_500_000, 9))
    curl = ["curl", "-s", "--noproxy", "*", "-A", "curl/8"]
    subprocess.run([*curl, "-H", "Expect: 100-continue", "--data-binary", f"@{upload}",
                    f"{base}/echo/expect"], capture_output=True, check=True)  # fmt: skip
    subprocess.run([*curl, "-I", f"{base}/bytes/1234"], capture_output=True, check=True)
    subprocess.run([*curl, "--http2", f"{base}/echo/h2c-declined"], capture_output=True,
                   check=True)  # fmt: skip
    pipelined = (
        b"".join(b"GET /echo/pipe%d HTTP/1.1\r\nHost: x\r\nUser-Agent: pipeliner/1\r\n\r\n" % i
                 for i in range(3))
        + b"POST /echo/pipe3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )  # fmt: skip
    _raw(port, pipelined)
    _raw(port, b"GET /echo/old HTTP/1.0\r\nUser-Agent: old/1\r\n\r\n")
    # a protocol switch asked late on a keep-alive connection (declined: stays HTTP/1.1)
    with socket.create_connection(("127.0.0.1", port)) as c:
        for req in (
            b"GET /echo/late-a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /echo/late-b HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-late\r\n\r\n",
            b"GET /echo/late-c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ):
            c.sendall(req)
            _read_response(c)

    async def ws() -> None:
        async with aiohttp.ClientSession() as sess, sess.ws_connect(f"{base}/ws") as w:
            for msg in ("one", "two"):
                await w.send_str(msg)
                await w.receive()
            await w.send_bytes(b"\x01" * 50_000)
            await w.receive()

    asyncio.run(ws())


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(data)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
        return got


def _read_response(c: socket.socket) -> bytes:
    """One Content-Length response (what the echo app sends)."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += c.recv(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < n:
        body += c.recv(65536)
    return head + b"\r\n\r\n" + body


_SAME = (
    "method", "version", "status", "path", "query", "route", "route_source", "injected",
    "parent_span_id", "inject_note", "req_body_size", "resp_body_size", "req_complete",
    "interim", "upgrade", "tunnel_c2s", "tunnel_s2c", "error", "request_ids", "user_agent",
    "forwarded_for", "shared_ids", "response_ids", "response_headers", "response_shared_ids",
    "engine", "scheme",
)  # fmt: skip


def _view(e: Any) -> dict[str, Any]:
    d = {k: getattr(e, k) for k in _SAME}
    d["request_headers"] = {k: v for k, v in (e.request_headers or {}).items() if k != "host"}
    return d


def _exchanges(proc: SniffProcess, proxy: str) -> list[Any]:
    return sorted((e for e in flatten(proc.events("http.")) if e.proxy == proxy),
                  key=lambda e: e.ts)  # fmt: skip


def test_exchanges_are_the_same_in_both_modes(setup: tuple[SniffProcess, Path]) -> None:
    proc, _ = setup
    n = len(wait_for(lambda: _exchanges(proc, "inline"), timeout=20))
    got = wait_for(lambda: (lambda c: c if len(c) >= n else [])(_exchanges(proc, "capture")),
                   timeout=20)  # fmt: skip
    inline = [_view(e) for e in _exchanges(proc, "inline")]
    capture = [_view(e) for e in got]
    assert len(inline) >= 25
    late_c = [i for i, e in enumerate(inline) if e["path"] == "/echo/late-c"]
    assert len(late_c) == 1
    # the planned difference: injection stopped in capture mode after the late switch
    i = late_c[0]
    assert inline[i]["injected"] and inline[i]["inject_note"] is None
    assert not capture[i]["injected"] and "no longer parsing" in capture[i]["inject_note"]
    for d in (inline[i], capture[i]):
        del d["injected"], d["inject_note"], d["resp_body_size"]  # the echoed headers differ
        d["response_headers"].pop("content-length")
    assert capture == inline
    kinds = {e["path"]: e for e in capture}
    assert kinds["/ws"]["upgrade"] == "websocket" and kinds["/ws"]["tunnel_c2s"] > 50_000
    assert kinds["/echo/expect"]["interim"] == [100]
    assert kinds["/bytes/1234"]["method"] == "HEAD"
    assert kinds["/cut"]["error"] == "incomplete_response"
    assert kinds["/echo/h2c-declined"]["upgrade"] is None
    assert kinds["/echo/tp"]["parent_span_id"] == "b7ad6b7169203331"
    assert kinds["/echo"]["request_headers"]["x-auth-token"] == "[REDACTED]"


def test_notes_identities_and_spans_are_the_same(setup: tuple[SniffProcess, Path]) -> None:
    proc, _ = setup
    wait_for(lambda: len(_exchanges(proc, "capture")) >= len(_exchanges(proc, "inline")) > 0)
    conns = {mode: {e.conn for e in proc.events("core.conn_open") if e.proxy == mode}
             for mode in MODES}  # fmt: skip

    def of(mode: str, kind: str) -> list[Any]:
        return [e for e in proc.events(kind) if e.conn in conns[mode]]

    idents = {m: sorted(json.dumps(e.attrs, sort_keys=True) for e in of(m, "core.identity")
                        if e.source == "http.user_agent") for m in MODES}  # fmt: skip
    assert idents["capture"] == idents["inline"] and idents["inline"]
    notes = {m: [(e.code, e.message) for e in of(m, "core.note")] for m in MODES}
    assert notes["inline"] == []
    assert [c for c, _ in notes["capture"]] == ["http.inject_stopped"]
    assert not of("inline", "core.protocol_error") and not of("capture", "core.protocol_error")

    spans = {m: sorted(proc.spans(), key=lambda s: s.start) for m in MODES}
    for m in MODES:
        spans[m] = [s for s in spans[m] if s.kind == "SERVER" and s.service == m]

    def view(s: Any) -> tuple[Any, ...]:
        skip = {"network.peer.port", "client.port", "server.port", "sniff.conn", "sniff.conn_id",
                "sniff.traceparent.injected", "sniff.traceparent.note", "http.response.body.size"}  # fmt: skip
        attrs = {k: v for k, v in s.attrs.items() if k not in skip}
        return s.name, s.status, s.parent_id is not None, json.dumps(attrs, sort_keys=True)

    diffs = [
        (a[0], {k: (va, vb) for k in set(ja) | set(jb) if (va := ja.get(k)) != (vb := jb.get(k))})
        for a, b in zip([view(s) for s in spans["capture"]], [view(s) for s in spans["inline"]],
                        strict=True)
        if a != b
        for ja, jb in [(json.loads(a[3]), json.loads(b[3]))]
    ]  # fmt: skip
    assert not diffs
    assert len(spans["inline"]) >= 25
