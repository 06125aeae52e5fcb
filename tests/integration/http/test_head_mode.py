"""The relay's HTTP head mode in C (sniff._shipper.Tee.set_head), in-process, in front of
the aiohttp app: once a keep-alive client's first request has gone through the Python
injector, a chunk that repeats that head byte for byte is tagged, shipped and forwarded
in C. Every request still reaches the upstream with a traceparent of its own, whose line
travels with the shipped copy; a different head, a body, or a pipelined pair take the
Python path on the same connection and come out as they would there; and a failing
tagger fails the handler (passthrough, recorded), not the connection."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxies.http import create_listener
from sniff import capture_proc, relay
from sniff.capture_proc import _unpack_raw
from sniff.config import from_dict
from tests.helpers import RawSink, free_port
from tests.integration.http.upstream import AppServer

pytestmark = pytest.mark.skipif(
    not relay.HAVE_C or capture_proc._PURE,
    reason="sniff._shipper is not built, or SNIFF_PURE_PYTHON=1 asks for the Python path",
)


def _listener(tmp: Any, upstream: int, sink: RawSink) -> Any:
    cfg = from_dict(
        {
            "proxy": [
                {
                    "name": "api",
                    "protocol": "http",
                    "listen": f"127.0.0.1:{free_port()}",
                    "upstream": f"127.0.0.1:{upstream}",
                    "http2": False,
                    "state_dir": str(tmp),
                }
            ]
        }
    )
    return create_listener(cfg.proxies[0], sink)


async def _read_response(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    return head, await r.readexactly(n)


def _seen(body: bytes) -> dict[str, str]:
    headers: dict[str, str] = json.loads(body)["headers"]
    return headers


def test_repeated_heads_take_the_c_path_and_others_the_python_path(tmp_path: Any) -> None:
    sink = RawSink()
    head = b"GET /echo?x=1 HTTP/1.1\r\nHost: api\r\nUser-Agent: nova/1\r\n\r\n"
    post = b"POST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
    writes = [head] * 4 + [post, head, head + head, head, head]

    async def main(port: int) -> tuple[list[dict[str, str]], list[bool], Any]:
        lst = _listener(tmp_path, port, sink)
        await lst.start()
        r, w = await asyncio.open_connection("127.0.0.1", lst.cfg.listen.port)
        seen: list[dict[str, str]] = []
        modes: list[bool] = []
        for data in writes:
            w.write(data)
            for _ in range(data.count(b"HTTP/1.1\r\n")):
                _, body = await _read_response(r)
                seen.append(_seen(body))
            (conn,) = lst.conns
            modes.append(bool(conn.c_side is not None and conn.c_side.head))
        relayed = lst.conns and next(iter(lst.conns)).bytes_relayed()
        w.close()
        await asyncio.sleep(0.1)
        await lst.stop()
        return seen, modes, relayed

    with AppServer() as app:
        seen, modes, relayed = asyncio.run(main(app.port))
    assert len(seen) == 10
    parents = [s["traceparent"] for s in seen]
    assert all(p.startswith("00-") and len(p) == 55 for p in parents)
    assert len(set(parents)) == 10  # a span of its own per request, C path or not
    assert seen[4]["content-length"] == "5"  # the POST and its body, via the Python path
    # head mode from the first request on, kept through the chunks it handed back
    assert modes == [True] * 9
    # the shipped client copies are the bytes forwarded: each request with its line,
    # shipped as meta with the copy for the capture side (tag_head) or in Python
    chunks: list[Any] = []
    _unpack_raw(sink._buf, chunks)
    sent = b"".join(c.data for c in chunks if c.direction == 0)
    sent += b"".join(d for _, direction, d, _ in sink.slow if direction == 0)
    assert sent.count(b"traceparent: ") == 10
    for p in parents:
        assert f"traceparent: {p}\r\n".encode() in sent
    c_lines = [c.meta for c in chunks if c.direction == 0 and c.meta is not None]
    assert len(c_lines) >= 5  # the repeated heads, tagged in C
    # ... and, without the lines, the client's bytes, all counted as relayed
    untagged = sent
    for p in parents:
        untagged = untagged.replace(f"traceparent: {p}\r\n".encode(), b"")
    assert len(untagged) == sum(map(len, writes)) == relayed[0]


def test_a_failing_tagger_fails_the_handler_not_the_connection(tmp_path: Any) -> None:
    from sniff.events import ProtocolError

    sink = RawSink()
    head = b"GET /echo HTTP/1.1\r\nHost: api\r\n\r\n"

    async def main(port: int) -> tuple[list[dict[str, str]], bool]:
        lst = _listener(tmp_path, port, sink)
        await lst.start()
        r, w = await asyncio.open_connection("127.0.0.1", lst.cfg.listen.port)
        seen = []
        w.write(head)
        seen.append(_seen((await _read_response(r))[1]))
        (conn,) = lst.conns
        assert conn.c_side.head
        injector = conn.handler.head[0]

        def broken(data: bytes) -> bytes:
            raise RuntimeError("tagger bug")

        injector.tagger = broken  # the Python path calls it, and fails
        conn.c_side.set_head(conn.s_t.write, injector, broken, conn.handler.head[2])
        for _ in range(2):
            w.write(head)
            seen.append(_seen((await _read_response(r))[1]))
        head_after = bool(conn.c_side.head)
        w.close()
        await asyncio.sleep(0.1)
        await lst.stop()
        return seen, head_after

    with AppServer() as app:
        seen, head_after = asyncio.run(main(app.port))
    assert len(seen) == 3
    assert "traceparent" in seen[0]
    assert "traceparent" not in seen[1] and "traceparent" not in seen[2]  # passthrough
    assert not head_after
    errors = [e for e in sink.events if isinstance(e, ProtocolError)]
    assert any("internal decoder error: RuntimeError: tagger bug" in e.reason for e in errors)
