"""The HTTP/1 decoder on real captured sessions: fed whole, split at every offset,
and one byte at a time, it must give the same events and forward the same bytes
(the input plus one traceparent line per injected request); garbage gives at
most one ProtocolError and passthrough, never an exception."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxies.http.decoder import Http1Decoder
from proxies.http.events import HttpExchange, HttpExchanges
from proxies.http.rewrite import strip_injected
from sniff.events import ConnIdentity, Note, ProtocolError, dumps
from tests.fixtures.http.record import load

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "http"
SESSION = load(FIXTURES / "requests_session.bin")
EXPECT = load(FIXTURES / "curl_expect.bin")
PIPELINED = load(FIXTURES / "pipelined.bin")
WEBSOCKET = load(FIXTURES / "websocket.bin")
UNTIL_CLOSE = load(FIXTURES / "until_close.bin")
ALL = {
    "requests_session": SESSION,
    "curl_expect": EXPECT,
    "pipelined": PIPELINED,
    "websocket": WEBSOCKET,
    "until_close": UNTIL_CLOSE,
}

Chunks = list[tuple[int, bytes]]


def run(
    chunks: Chunks,
    inject: bool = True,
    close: str = "server closed",
    deterministic: bool = True,
) -> tuple[list[Any], bytes]:
    """Feed ``chunks`` to a *rewriting* decoder (``inject=False`` checks that holding
    and releasing heads alone never changes a byte); return events and the bytes
    it forwarded to the server."""
    events: list[Any] = []
    out: list[bytes] = []
    counter = itertools.count(1)
    kw: dict[str, Any] = {}
    if deterministic:
        kw = {
            "new_span_id": lambda: f"{next(counter):016x}",
            "new_trace_id": lambda: f"{next(counter):032x}",
        }
    dec = Http1Decoder(
        7,
        events.append,
        proxy="nova-api",
        inject=inject,
        rewrite=True,
        release=out.append,
        clock=lambda: 1000,
        **kw,
    )
    for direction, data in chunks:
        if direction == 0:
            out.append(dec.feed_client(data))
        else:
            dec.feed_server(data)
    out.append(dec.flush_client())
    dec.closed(close)
    return events, b"".join(out)


def merged(chunks: Chunks) -> Chunks:
    out: Chunks = []
    for d, data in chunks:
        if out and out[-1][0] == d:
            out[-1] = (d, out[-1][1] + data)
        else:
            out.append((d, data))
    return out


def split_at(chunks: Chunks, direction: int, offset: int) -> Chunks:
    out: Chunks = []
    seen = 0
    for d, data in chunks:
        if d == direction and seen < offset < seen + len(data):
            k = offset - seen
            out.extend([(d, data[:k]), (d, data[k:])])
        else:
            out.append((d, data))
        if d == direction:
            seen += len(data)
    return out


def bytewise(chunks: Chunks) -> Chunks:
    return [(d, data[i : i + 1]) for d, data in chunks for i in range(len(data))]


def stream(chunks: Chunks, direction: int) -> bytes:
    return b"".join(data for d, data in chunks if d == direction)


def fingerprint(events: list[Any]) -> list[bytes]:
    return [dumps(e) for e in events]


def offsets(data: bytes) -> list[int]:
    """Every offset of a small stream; for a large one, every offset within 4
    bytes of a CRLF (heads, chunk framing) plus a stride through the bodies."""
    if len(data) <= 8192:
        return list(range(1, len(data)))
    picked = set(range(1, len(data), 997))
    i = data.find(b"\r\n")
    while i >= 0:
        picked.update(range(max(1, i - 4), min(len(data), i + 6)))
        i = data.find(b"\r\n", i + 1)
    return sorted(picked)


def exchanges(events: list[Any]) -> list[HttpExchange]:
    out: list[HttpExchange] = []
    for e in events:
        if isinstance(e, HttpExchanges):
            out.extend(e.exchanges())
        elif isinstance(e, HttpExchange):
            out.append(e)
    return out


@pytest.mark.parametrize("name", list(ALL))
def test_whole_split_and_bytewise_agree(name: str) -> None:
    chunks = ALL[name]
    whole = merged(chunks)
    ref_events, ref_out = run(whole)
    assert exchanges(ref_events)
    assert not any(isinstance(e, ProtocolError) for e in ref_events)
    assert fingerprint(run(chunks)[0]) == fingerprint(ref_events)
    ev, out = run(bytewise(chunks))
    assert fingerprint(ev) == fingerprint(ref_events)
    assert out == ref_out
    for direction in (0, 1):
        for k in offsets(stream(whole, direction)):
            ev, out = run(split_at(whole, direction, k))
            assert fingerprint(ev) == fingerprint(ref_events), (direction, k)
            assert out == ref_out, (direction, k)


@pytest.mark.parametrize("name", list(ALL))
def test_only_traceparent_lines_are_added(name: str) -> None:
    chunks = ALL[name]
    original = stream(chunks, 0)
    assert run(chunks, inject=False)[1] == original  # injection off: byte-identical
    for deterministic in (True, False):
        events, out = run(chunks, deterministic=deterministic)
        injected = [e for e in exchanges(events) if e.injected]
        restored = out
        for e in injected:
            assert e.traceparent == f"00-{e.trace_id}-{e.span_id}-01"
            restored = strip_injected(restored, e.traceparent)
        assert restored == original
        assert len(out) - len(original) == 70 * len(injected)


def test_requests_session_events() -> None:
    events, out = run(merged(SESSION))
    ident = [e for e in events if isinstance(e, ConnIdentity)]
    assert len(ident) == 1 and ident[0].attrs["product"] == "python-novaclient"
    ex = exchanges(events)
    assert [(e.method, e.status) for e in ex] == [
        ("GET", 200),
        ("POST", 200),
        ("PUT", 200),
        ("GET", 200),
        ("GET", 200),
        ("HEAD", 200),
        ("GET", 204),
        ("GET", 500),
        ("GET", 200),
        ("GET", 200),
        ("POST", 200),
    ]
    assert all(e.error is None and e.version == "1.1" for e in ex)
    put = ex[2]
    assert put.req_body_size == sum(1000 + i for i in range(5))  # chunk framing excluded
    assert ex[3].resp_body_size == 200_000  # chunked response
    assert ex[4].resp_body_size == 100_000
    assert ex[5].resp_body_size == 0  # HEAD: Content-Length 10, no body
    assert ex[6].resp_body_size == 0
    # the request that carried a traceparent: respected, sniff's span is its child
    tp = ex[9]
    assert not tp.injected and tp.parent_span_id == "b7ad6b7169203331"
    assert tp.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert tp.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert sum(e.injected for e in ex) == 10
    # the upstream saw each injected traceparent
    for e in ex:
        if e.injected:
            assert f"traceparent: {e.traceparent}\r\n\r\n".encode() in out


def test_prepare_redacts_and_routes() -> None:
    events, _ = run(merged(SESSION))
    ex = exchanges(events)
    for e in ex:
        e.prepare()
        assert e.req_head is None and e.resp_head is None
    first = ex[0]
    assert first.path == "/echo" and first.query == "limit=10&token=[REDACTED]"
    assert first.request_headers is not None
    assert first.request_headers["x-auth-token"] == "[REDACTED]"
    assert first.request_ids == {"x-openstack-request-id": "req-abc"}
    assert first.response_ids == {"x-openstack-request-id": "req-abc"}
    assert first.user_agent is not None and first.user_agent.startswith("python-novaclient")
    cookie = ex[8]
    assert cookie.response_headers is not None
    assert cookie.response_headers["set-cookie"] == "[REDACTED]"
    assert cookie.response_headers["x-subject-token"] == "[REDACTED]"
    blob = b"".join(dumps(e) for e in ex)
    for secret in (b"hunter2", b"gAAAAABsecret-token", b"top-secret", b"gAAAAA-top"):
        assert secret not in blob
    assert ex[9].route == "/v2.1/servers/{id}" and ex[9].route_source == "inferred"
    assert ex[10].route == "/v2.1/servers/{id}/action"


def test_expect_100_continue() -> None:
    events, _ = run(merged(EXPECT))
    (ex,) = exchanges(events)
    assert ex.interim == [100] and ex.status == 200 and ex.req_body_size == 5000


def test_pipelined_requests_pair_in_order() -> None:
    events, out = run(merged(PIPELINED))
    ex = exchanges(events)
    assert [(e.method, e.status, e.req_body_size) for e in ex] == [
        ("GET", 200, 0),
        ("POST", 200, 11),
        ("GET", 404, 0),
    ]
    assert out.count(b"traceparent: ") == 3


def test_websocket_is_one_exchange() -> None:
    events, out = run(merged(WEBSOCKET), close="client closed first, then the other side")
    (ex,) = exchanges(events)
    assert ex.status == 101 and ex.upgrade == "websocket" and ex.error is None
    assert ex.tunnel_c2s == 11 + 3008 + 8 and ex.tunnel_s2c == 7 + 3004 + 4
    frames = stream(WEBSOCKET, 0)[232:]
    assert out.endswith(frames)  # frames after the upgrade are relayed untouched


def test_until_close_response() -> None:
    events, _ = run(merged(UNTIL_CLOSE))
    (ex,) = exchanges(events)
    assert ex.version == "1.0" and ex.status == 200 and ex.resp_body_size == 2100
    assert ex.error is None
    # the same response cut by the client is incomplete
    events, _ = run(merged(UNTIL_CLOSE), close="client closed")
    (ex,) = exchanges(events)
    assert ex.error == "incomplete_response"


def test_connection_cut_mid_request_and_before_response() -> None:
    body_cut = [(0, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")]
    (ex,) = exchanges(run(body_cut, close="client closed")[0])
    assert ex.error == "incomplete_request" and not ex.req_complete and ex.req_body_size == 3
    no_resp = [(0, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")]
    (ex,) = exchanges(run(no_resp, close="server closed")[0])
    assert ex.error == "no_response" and ex.status is None
    partial = [*no_resp, (1, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")]
    (ex,) = exchanges(run(partial, close="server connection lost: reset")[0])
    assert ex.error == "incomplete_response" and ex.resp_body_size == 3


def test_early_response_waits_for_the_request_body() -> None:
    chunks = [
        (0, b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc"),
        (1, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n"),
        (0, b"def"),
        (0, b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ]
    ex = exchanges(run(chunks)[0])
    assert [(e.method, e.status, e.req_body_size, e.error) for e in ex] == [
        ("PUT", 413, 6, None),
        ("GET", 200, 0, None),
    ]


def test_declined_upgrade_resumes_http() -> None:
    chunks = [
        (0, b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
        (0, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"),  # sent before the answer: held
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ]  # fmt: skip
    events, out = run(chunks)
    ex = exchanges(events)
    assert [(e.path or e.req_head, e.upgrade, e.status) for e in ex] == [
        (b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
         b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__", None, 200),
        (b"GET /b HTTP/1.1\r\nHost: a", None, 200),
    ]  # fmt: skip
    assert out.count(b"traceparent: ") == 2


def test_h2c_upgrade_accepted_becomes_a_tunnel() -> None:
    chunks = [
        (0, b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
        (1, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
        (0, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
    ]  # fmt: skip
    events, out = run(chunks, close="client closed")
    (ex,) = exchanges(events)
    assert ex.upgrade == "h2c" and ex.status == 101 and ex.tunnel_c2s == 33
    assert out.endswith(chunks[2][1])


def test_empty_lines_between_requests_are_forwarded() -> None:
    chunks = [(0, b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n")]
    events, out = run(chunks, inject=False)
    assert out == chunks[0][1]
    assert len(exchanges(events)) == 1


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\nHost: a\n\n\r\n\r\n",  # bare LF
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    ],
)
def test_ambiguous_or_malformed_requests_go_passthrough(head: bytes) -> None:
    rest = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    events, out = run([(0, head + rest), (1, b"HTTP/1.1 400 Bad Request\r\n\r\n")])
    assert out == head + rest  # nothing injected, not even into the next request
    errs = [e for e in events if isinstance(e, ProtocolError)]
    assert len(errs) == 1 and errs[0].direction == "c2s"
    assert not [e for e in exchanges(events) if e.error != "not_decoded"]


def test_oversized_head_goes_passthrough() -> None:
    big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000
    events, out = run([(0, big), (0, b"\r\n\r\n")])
    assert out == big + b"\r\n\r\n"
    assert [type(e) for e in events][:2] == [ProtocolError, Note]


def test_unsolicited_response_is_noted() -> None:
    events, _ = run([(1, b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")])
    assert any(isinstance(e, Note) and e.code == "http.unsolicited_response" for e in events)


def test_invalid_traceparent_is_left_alone() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-zz-yy-01\r\n\r\n"
    events, out = run([(0, head), (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")])
    (ex,) = exchanges(events)
    assert out == head and not ex.injected and ex.parent_span_id is None
    assert ex.inject_note == "invalid traceparent; left unchanged"


# --- fuzz --------------------------------------------------------------------------------


def _outcome(chunks: Chunks) -> None:
    original = stream(chunks, 0)
    events, out = run(chunks, inject=False)
    assert out == original
    errors = [i for i, e in enumerate(events) if isinstance(e, ProtocolError)]
    assert len(errors) <= 1
    if errors:  # passthrough: afterwards only the note and the abandoned exchanges
        for e in events[errors[0] + 1 :]:
            assert isinstance(e, Note) or (
                isinstance(e, HttpExchanges)
                and all(i.error == "not_decoded" for i in e.exchanges())
            )
    events, out = run(chunks, inject=True)
    for e in exchanges(events):
        if e.injected:
            out = strip_injected(out, e.traceparent or "")
    assert out == original


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans())
def test_fuzz_random_streams(data: bytes, with_request_line: bool) -> None:
    prefix = b"GET / HTTP/1.1\r\n" if with_request_line else b""
    _outcome([(0, prefix + data), (1, data[::-1])])


_ALPHABET = b"GET POST HTTP/1.1 \r\n:Content-Length:Transfer-Encoding: chunked 0123456789abc;\x00"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([bytes([c]) for c in _ALPHABET]), max_size=300),
    st.lists(st.integers(1, 50), max_size=10),
)
def test_fuzz_http_like_streams(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    chunks: Chunks = []
    pos = 0
    for c in cuts:
        chunks.append((0, data[pos : pos + c]))
        chunks.append((1, data[pos : pos + c][::-1]))
        pos += c
    chunks.append((0, data[pos:]))
    _outcome([(d, b) for d, b in chunks if b])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**32),
    st.integers(1, 8),
    st.sampled_from(["flip", "drop", "insert", "truncate"]),
    st.sampled_from(["pipelined", "curl_expect", "websocket", "requests_session"]),
)
def test_fuzz_mutated_sessions(seed: int, n: int, how: str, name: str) -> None:
    rnd = random.Random(seed)
    chunks = [(d, bytearray(data)) for d, data in merged(ALL[name])]
    for _ in range(n):
        i = rnd.randrange(len(chunks))
        buf = chunks[i][1]
        if not buf:
            continue
        j = rnd.randrange(min(len(buf), 2048))  # mostly the heads
        if how == "flip":
            buf[j] ^= 1 << rnd.randrange(8)
        elif how == "drop":
            del buf[j]
        elif how == "insert":
            buf.insert(j, rnd.randrange(256))
        else:
            del buf[j:]
    _outcome([(d, bytes(b)) for d, b in chunks if b])


def test_too_many_pipelined_requests_go_passthrough(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxies.http import decoder

    monkeypatch.setattr(decoder, "MAX_PENDING", 3)
    reqs = [b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5)]
    events, out = run([(0, r) for r in reqs], deterministic=False)
    assert out.count(b"traceparent: ") == 3
    assert strip_injected_all(out, exchanges(events)) == b"".join(reqs)
    assert [type(e) for e in events if isinstance(e, ProtocolError)] == [ProtocolError]


def strip_injected_all(out: bytes, exs: list[HttpExchange]) -> bytes:
    for e in exs:
        if e.injected and e.traceparent:
            out = strip_injected(out, e.traceparent)
    return out


def test_batches_are_stored_as_rows_and_read_back() -> None:
    from sniff.events import loads

    single, _ = run(merged(SESSION))
    batched, _ = run(merged(SESSION))
    expected = exchanges(single)
    for e in expected:
        e.prepare()
    stored = []
    for ev in batched:
        if isinstance(ev, HttpExchanges):
            ev.prepare()
            assert not ev.items and ev.rows
            back = loads(ev.kind, dumps(ev))
            assert isinstance(back, HttpExchanges)
            stored.extend(back.exchanges())
    assert [dumps(e) for e in stored] == [dumps(e) for e in expected]
    assert all(e.req_head is None and e.resp_head is None for e in stored)
