"""``decode = "capture"`` against ``decode = "inline"`` on the same traffic.

The capture mode splits the work: :class:`HttpCaptureHandler` (the injector, on
the relay) forwards and ships copies; the decoder host of the capture process
runs :class:`HttpRawDecoder` over them. Fed the recorded sessions (whole, split
at every offset, one byte at a time) and fuzzed streams, with one fake clock for
both modes, the two must forward the same bytes and emit the same events, up to
the random ids (compared by order of first appearance), and the bytes shipped
must be exactly the bytes forwarded, in order.
"""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxies.http import _settings
from proxies.http.decoder import Http1Decoder
from proxies.http.events import HttpExchange, HttpExchanges, HttpRequest
from proxies.http.handler import HttpCaptureHandler
from sniff.config import ProxyConfig, from_dict
from sniff.decode_host import DecoderHost
from sniff.events import (
    ConnClose,
    ConnIdentity,
    ConnOpen,
    Event,
    Note,
    ProtocolError,
    RawChunk,
    RawGap,
    dumps,
)
from tests.unit.proxies.http.test_decoder import (
    _ALPHABET,
    ALL,
    Chunks,
    bytewise,
    merged,
    offsets,
    split_at,
    stream,
)

CONN = 7


def config(inject: bool = True, **options: Any) -> ProxyConfig:
    cfg = from_dict(
        {
            "capture": "x.db",
            "proxy": [
                {
                    "name": "nova-api",
                    "protocol": "http",
                    "listen": "127.0.0.1:18774",
                    "upstream": "127.0.0.1:8774",
                    "inject": inject,
                    **options,
                }
            ],
        }
    )
    return cfg.proxies[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


class FakeCtx:
    """What HttpCaptureHandler touches of a ConnContext; ships with the fake clock."""

    def __init__(self, cfg: ProxyConfig, clock: Clock) -> None:
        self.proxy = cfg
        self.conn_id = CONN
        self.clock = clock
        self.shipped: list[tuple[int, int, bytes, Any]] = []
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.sink = self
        self.emitted: list[Event] = []

    def emit(self, ev: Event) -> None:
        self.emitted.append(ev)

    def ship(self, direction: int, data: bytes, meta: Any = None) -> None:
        if data:
            self.shipped.append((self.clock(), direction, data, meta))

    def shipper(self, direction: int) -> Any:
        return lambda data: self.ship(direction, data)

    def send_to_server(self, data: bytes) -> None:
        self.to_server.append(data)


class Result:
    def __init__(self, events: list[Event], to_server: bytes, to_client: bytes) -> None:
        self.events = events
        self.to_server = to_server
        self.to_client = to_client


def run_inline(chunks: Chunks, cfg: ProxyConfig, close: str) -> Result:
    clock = Clock()
    events: list[Event] = []
    out: list[bytes] = []
    s = _settings(cfg)
    dec = Http1Decoder(
        CONN, events.append, proxy=cfg.name, inject=cfg.inject, rewrite=cfg.inject,
        release=out.append, clock=clock, policy=s["policy"], max_head=s["max_head"],
    )  # fmt: skip
    back: list[bytes] = []
    for i, (direction, data) in enumerate(chunks):
        clock.now = 1_000 + 10 * i
        if direction == 0:
            got = dec.feed_client(data)
            out.append(got if cfg.inject else data)
        else:
            back.append(data)
            dec.feed_server(data)
    clock.now = 1_000 + 10 * len(chunks)
    held = dec.flush_client()
    if cfg.inject:
        out.append(held)
    dec.closed(close)
    return Result(events, b"".join(out), b"".join(back))


def run_capture(
    chunks: Chunks, cfg: ProxyConfig, close: str, ticks: dict[int, int] | None = None
) -> tuple[Result, list[tuple[int, int, bytes, Any]]]:
    """The relay side (handler), then the capture side (a real DecoderHost)."""
    clock = Clock()
    ctx = FakeCtx(cfg, clock)
    s = _settings(cfg)
    s["clock"] = clock
    h = HttpCaptureHandler(ctx, s)  # type: ignore[arg-type]
    for i, (direction, data) in enumerate(chunks):
        clock.now = 1_000 + 10 * i
        if direction == 0:
            if h.rewrite_c2s:
                got = h.c2s(data)
                if got:
                    ctx.to_server.append(got)
            else:
                ctx.to_server.append(data)
                h.c2s(data)
        else:
            ctx.to_client.append(data)
            h.s2c(data)
    end = 1_000 + 10 * len(chunks)
    clock.now = end
    held = h.flush_c2s()
    if held:
        ctx.to_server.append(held)
    host = DecoderHost([cfg])
    batch: list[Event] = [
        ConnOpen(900, CONN, cfg.name, "http", "127.0.0.1", 40000, "127.0.0.1", 8774,
                 "127.0.0.1", 18774),
    ]  # fmt: skip
    events: list[Event] = []
    for ts, direction, data, meta in ctx.shipped:
        batch.append(RawChunk(ts, CONN, direction, data, meta))
        if ticks and ts in ticks:  # a tick of the capture process after this chunk
            events += host.expand(batch)
            batch = []
            events += host.tick(ticks[ts])
    batch.append(ConnClose(end, CONN, close, "client", 0, 0))
    events += host.expand(batch)
    decoded = [e for e in events if not isinstance(e, ConnOpen | ConnClose)]
    return Result(decoded, b"".join(ctx.to_server), b"".join(ctx.to_client)), ctx.shipped


_TP = re.compile(rb"traceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-01\r\n")


def canonical_bytes(data: bytes) -> bytes:
    return _TP.sub(b"traceparent: 00-T-S-01\r\n", data)


_ID = re.compile(r"\b[0-9a-f]{32}\b|\b[0-9a-f]{16}\b")


def canonical_events(events: list[Event]) -> list[str]:
    """Events as JSON with every trace/span id replaced by its order of appearance."""
    names: dict[str, str] = {}

    def name(m: re.Match[str]) -> str:
        return names.setdefault(m.group(0), f"<id{len(names)}>")

    return [_ID.sub(name, dumps(e).decode()) for e in events]


def injected_lines(shipped: list[tuple[int, int, bytes, Any]]) -> list[bytes]:
    """The traceparent lines the relay reported in its shipped metadata."""
    out = []
    for _, direction, _, meta in shipped:
        if direction == 0 and meta is not None:
            for it in (meta,) if isinstance(meta, bytes) else meta:
                if isinstance(it, bytes):
                    out.append(it[:-2])
    return out


def check(chunks: Chunks, inject: bool = True, close: str = "server closed") -> Result:
    cfg = config(inject)
    inline = run_inline(chunks, cfg, close)
    capture, shipped = run_capture(chunks, cfg, close)
    # exactly the forwarded bytes were shipped, each direction in order
    assert b"".join(d for _, k, d, _ in shipped if k == 0) == capture.to_server
    assert b"".join(d for _, k, d, _ in shipped if k == 1) == capture.to_client
    # nothing but the reported lines was added to the client's bytes
    restored = capture.to_server
    for line in injected_lines(shipped):
        assert line in restored
        restored = restored.replace(line, b"", 1)
    assert restored == stream(chunks, 0)
    inline_events = canonical_events(inline.events)
    if inject and any(isinstance(e, ProtocolError) and e.direction == "s2c" for e in inline.events):
        # the one planned difference: a response that cannot be decoded stops the
        # inline decoder's injection, not the relay's (it does not read responses)
        inline_events = [
            e.replace("without traceparent injection", "except for traceparent injection "
                      "(the relay does not read responses)")
            for e in inline_events
        ]  # fmt: skip
    else:
        # the same bytes forwarded, up to the ids in the traceparent lines
        assert canonical_bytes(capture.to_server) == canonical_bytes(inline.to_server)
    # the same events, up to ids
    assert canonical_events(capture.events) == inline_events
    # and the ids in the events are the ones the upstream received
    for e in exchanges(capture.events):
        if e.injected:
            assert f"traceparent: {e.traceparent}\r\n\r\n".encode() in capture.to_server
    return capture


def exchanges(events: list[Event]) -> list[HttpExchange]:
    out: list[HttpExchange] = []
    for e in events:
        if isinstance(e, HttpExchanges):
            out.extend(e.exchanges())
        elif isinstance(e, HttpExchange):
            out.append(e)
    return out


# --- recorded sessions ---------------------------------------------------------------------


@pytest.mark.parametrize("inject", [True, False], ids=["inject", "no-inject"])
@pytest.mark.parametrize("name", list(ALL))
def test_recorded_sessions_whole_and_bytewise(name: str, inject: bool) -> None:
    chunks = ALL[name]
    close = "client closed first, then the other side" if name == "websocket" else "server closed"
    got = check(chunks, inject, close)
    assert exchanges(got.events)
    assert not any(isinstance(e, ProtocolError) for e in got.events)
    check(merged(chunks), inject, close)
    check(bytewise(chunks), inject, close)


@pytest.mark.parametrize("name", list(ALL))
def test_recorded_sessions_split_at_every_offset(name: str) -> None:
    whole = merged(ALL[name])
    for direction in (0, 1):
        for k in offsets(stream(whole, direction))[::3]:
            check(split_at(whole, direction, k))


def test_requests_session_ids_heads_and_identity() -> None:
    got = check(merged(ALL["requests_session"]))
    ex = exchanges(got.events)
    assert sum(e.injected for e in ex) == 10
    # the recorded head is the client's: the relay's line is not in it
    for e in ex:
        assert not e.injected or (e.req_head is not None and b"traceparent: " not in e.req_head)
    (ident,) = [e for e in got.events if isinstance(e, ConnIdentity)]
    assert ident.attrs["product"] == "python-novaclient"


# --- what the relay side does alone --------------------------------------------------------


def test_held_head_is_dated_from_its_first_byte() -> None:
    """A head that arrives in pieces is held by the relay; the capture side gets
    it whole, later, and must still date the request from its first byte."""
    head = b"GET /slow HTTP/1.1\r\nHost: a\r\nUser-Agent: x/1\r\n\r\n"
    chunks = [(0, head[:5]), (0, head[5:20]), (0, head[20:]),
              (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]  # fmt: skip
    got = check(chunks)
    (ex,) = exchanges(got.events)
    assert ex.ts == 1_000 and ex.ts_response == 1_030


def test_declined_upgrade_resumes_http_on_the_held_bytes() -> None:
    chunks = [
        (0, b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
        (0, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"),  # sent before the answer: held
        (1, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ]  # fmt: skip
    got = check(chunks)
    assert got.to_server.count(b"traceparent: ") == 2
    assert [(e.upgrade, e.status, e.injected) for e in exchanges(got.events)] == [
        (None, 200, True),
        (None, 200, True),
    ]
    for cut in range(1, len(chunks[2][1])):  # the answer's status line in pieces
        check(split_at(chunks, 1, cut))


def test_accepted_upgrade_becomes_a_tunnel() -> None:
    chunks = [
        (0, b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
        (0, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),  # too eager: held until the answer
        (1, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
        (0, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00GET / HTTP/1.1\r\n\r\n"),
    ]  # fmt: skip
    got = check(chunks, close="client closed")
    (ex,) = exchanges(got.events)
    assert ex.upgrade == "h2c" and ex.tunnel_c2s == 24 + 27
    assert got.to_server.endswith(chunks[1][1] + chunks[3][1])  # tunnel bytes untouched


@pytest.mark.parametrize("status", [200, 407])
def test_connect(status: int) -> None:
    chunks = [
        (0, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"),
        (1, b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status),
        (0, b"GET /inner HTTP/1.1\r\nHost: x\r\n\r\n"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ]
    got = check(chunks)
    injected = got.to_server.count(b"traceparent: ")
    assert injected == (1 if status == 200 else 2)  # a tunnel's bytes are never edited


def test_upgrade_with_a_request_body_answered_early() -> None:
    chunks = [
        (0, b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x-proto\r\n"
            b"Content-Length: 10\r\n\r\n12345"),
        (1, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-proto\r\nConnection: upgrade\r\n\r\n"),
        (0, b"67890GET / HTTP/1.1\r\n\r\n"),
    ]  # fmt: skip
    got = check(chunks, close="client closed")
    assert got.to_server.count(b"traceparent: ") == 1


def test_malformed_answer_to_an_upgrade_releases_the_held_bytes() -> None:
    chunks = [
        (0, b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
        (0, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"),
        (1, b"HTTP/1.1 1O1 Bad\r\n\r\n"),
    ]
    got = check(chunks)
    assert got.to_server.endswith(chunks[1][1])  # released unchanged
    assert [e.direction for e in got.events if isinstance(e, ProtocolError)] == ["s2c"]


def test_upgrade_later_on_a_connection_stops_injection_but_not_decoding() -> None:
    """The relay cannot tell which response answers a switch asked after other
    requests (it does not frame responses): it stops injecting there. The capture
    side still decodes everything and says so; here the modes differ on purpose."""
    chunks = [
        (0, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (0, b"GET /b HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (0, b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ]
    cfg = config()
    capture, shipped = run_capture(chunks, cfg, "client closed")
    assert capture.to_server.count(b"traceparent: ") == 2  # /a and /b, not /c
    ex = exchanges(capture.events)
    assert [(e.status, e.injected) for e in ex] == [(200, True), (200, True), (200, False)]
    assert ex[2].inject_note and "no longer parsing" in ex[2].inject_note
    notes = [e for e in capture.events if isinstance(e, Note)]
    assert [n.code for n in notes] == ["http.inject_stopped"]
    assert b"".join(d for _, k, d, _ in shipped if k == 0) == capture.to_server


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n",  # obs-fold
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
)
def test_malformed_requests_pass_through_with_one_protocol_error(head: bytes) -> None:
    rest = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    ok = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n"
    got = check([(0, ok), (1, b"HTTP/1.1 200 OK\r\n\r\n"), (0, head + rest),
                 (1, b"HTTP/1.1 400 Bad Request\r\n\r\n")])  # fmt: skip
    assert got.to_server.endswith(head + rest)  # nothing injected after the failure
    assert [e.direction for e in got.events if isinstance(e, ProtocolError)] == ["c2s"]


def test_tick_flushes_batches_and_announces_slow_requests() -> None:
    chunks = [
        (0, b"GET /fast HTTP/1.1\r\nHost: a\r\n\r\n"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        (0, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"),
        (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ]
    # a tick after the third chunk (ts 1020), 1.5 s later in wall-clock time
    got, _ = run_capture(chunks, config(), "client closed", ticks={1_020: 1_020 + 1_500_000_000})
    kinds = [type(e) for e in got.events]
    assert kinds == [ConnIdentity, HttpExchanges, HttpRequest, HttpExchanges] or kinds == [
        HttpExchanges,
        HttpRequest,
        HttpExchanges,
    ]
    req = next(e for e in got.events if isinstance(e, HttpRequest))
    first, second = (x for e in got.events if isinstance(e, HttpExchanges) for x in e.exchanges())
    assert first.path is None and first.req_head is not None  # not prepared yet
    assert req.span_id == second.span_id and second.announced


def test_capture_gap_stops_decoding_with_a_note() -> None:
    cfg = config()
    host = DecoderHost([cfg])
    req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    out = host.expand(
        [
            ConnOpen(1, CONN, cfg.name, "http", "c", 1, "s", 2, "l", 3),
            RawChunk(2, CONN, 0, req, None),
            RawGap(3, CONN, 100),
            RawChunk(4, CONN, 1, b"HTTP/1.1 200 OK\r\n\r\n", None),
        ]
    )
    assert [e.kind for e in out] == ["core.conn_open", "http.exchanges", "core.note"]
    (ex,) = out[1].exchanges()  # type: ignore[attr-defined]
    assert ex.error == "no_response"


# --- fuzz ----------------------------------------------------------------------------------


def _same(chunks: Chunks) -> None:
    for inject in (True, False):
        check([(d, b) for d, b in chunks if b], inject)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    _same(chunks)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
        j = rnd.randrange(min(len(buf), 2048))
        if how == "flip":
            buf[j] ^= 1 << rnd.randrange(8)
        elif how == "drop":
            del buf[j]
        elif how == "insert":
            buf.insert(j, rnd.randrange(256))
        else:
            del buf[j:]
    _same([(d, bytes(b)) for d, b in chunks])


# --- which path a listener takes -----------------------------------------------------------


class _Sink:
    def emit(self, ev: Event) -> None:
        pass


class _ShippingSink(_Sink):
    def emit_raw(self, conn: int, direction: int, ts: int, data: bytes, meta: Any = None) -> bool:
        return True


@pytest.mark.parametrize(
    ("decode", "sink", "handler"),
    [
        ("capture", _ShippingSink, "HttpCaptureHandler"),
        ("inline", _ShippingSink, "HttpHandler"),
        ("capture", _Sink, "HttpHandler"),  # a sink that cannot ship: decode in-line
    ],
)
def test_listener_picks_the_handler_of_its_decode_mode(
    decode: str, sink: type[_Sink], handler: str
) -> None:
    from proxies.http import create_listener

    cfg = config(decode=decode)
    lst: Any = create_listener(cfg, sink())
    h = lst.handler_factory(FakeCtx(cfg, Clock()))
    assert type(h).__name__ == handler
